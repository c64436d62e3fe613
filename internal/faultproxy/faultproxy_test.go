package faultproxy

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echoServer echoes every connection until it is closed; errs receives
// the error that ended each connection (nil for EOF).
type echoServer struct {
	ln   net.Listener
	wg   sync.WaitGroup
	errs chan error
}

func newEcho(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echoServer{ln: ln, errs: make(chan error, 100)}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		var mu sync.Mutex
		var conns []net.Conn
		defer func() {
			mu.Lock()
			for _, c := range conns {
				c.Close()
			}
			mu.Unlock()
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				_, err := io.Copy(c, c)
				select {
				case e.errs <- err:
				default:
				}
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); e.wg.Wait() })
	return e
}

func (e *echoServer) addr() string { return e.ln.Addr().String() }

func newProxy(t *testing.T, target string, opts ...Option) *Proxy {
	t.Helper()
	p, err := New("127.0.0.1:0", target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, p *Proxy) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// expectReset dials p and expects a reset: the kernel completes the
// handshake before the proxy resets, so the RST shows up either in connect
// (if it arrives first) or in the first read.
func expectReset(t *testing.T, p *Proxy) {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 2*time.Second)
	if err == nil {
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("dial and read: %v, want ECONNRESET", err)
	}
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// roundTrip writes data (from a goroutine) and reads len(data) bytes back.
func roundTrip(t *testing.T, c net.Conn, data []byte, timeout time.Duration) []byte {
	t.Helper()
	werr := make(chan error, 1)
	go func() { _, err := c.Write(data); werr <- err }()
	c.SetReadDeadline(time.Now().Add(timeout))
	got := make([]byte, len(data))
	_, err := io.ReadFull(c, got)
	c.SetReadDeadline(time.Time{})
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	return got
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestForwardsBothWays(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr())
	c := dial(t, p)
	data := random(t, 1<<20)
	got := roundTrip(t, c, data, 5*time.Second)
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatal("echo through the proxy changed the data")
	}
	// Half-close travels through: the echo server sees EOF and closes.
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after CloseWrite: n=%d err=%v, want EOF", n, err)
	}
	st := p.Stats()
	if st.BytesUp != 1<<20 || st.BytesDown != 1<<20 || st.Accepted != 1 || st.Faults() != 0 {
		t.Fatalf("stats %+v", st)
	}
	deadline := time.Now().Add(2 * time.Second)
	for p.Stats().Active != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if a := p.Stats().Active; a != 0 {
		t.Fatalf("%d connections still active after both sides closed", a)
	}
}

func TestDelay(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr())
	c := dial(t, p)
	roundTrip(t, c, []byte("warm"), 2*time.Second)

	const d = 100 * time.Millisecond
	p.SetDelay(d)
	// Order kept across several writes; each direction adds d.
	var want []byte
	start := time.Now()
	for i := range 20 {
		msg := []byte{byte(i), 'x', byte(i)}
		want = append(want, msg...)
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(start); rtt < 2*d {
		t.Fatalf("round trip took %v with a delay of %v each way", rtt, d)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("order lost: got %v want %v", got, want)
	}
	if p.Stats().Delayed < 2 {
		t.Fatalf("delayed chunks not counted: %+v", p.Stats())
	}

	p.SetDelay(0)
	start = time.Now()
	roundTrip(t, c, []byte("fast"), 2*time.Second)
	if rtt := time.Since(start); rtt >= d {
		t.Fatalf("round trip %v after delay removed", rtt)
	}
}

func TestBlackhole(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr())
	old := dial(t, p)
	roundTrip(t, old, []byte("before"), 2*time.Second)

	p.Blackhole(true)
	if _, err := old.Write([]byte("lost")); err != nil {
		t.Fatal(err)
	}
	old.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := old.Read(make([]byte, 10)); !isTimeout(err) {
		t.Fatalf("read through a blackhole: %v, want a timeout", err)
	}
	// Nothing is read: the sender's writes block once the buffers fill.
	old.SetWriteDeadline(time.Now().Add(time.Second))
	block := make([]byte, 1<<20)
	var werr error
	for i := 0; i < 128 && werr == nil; i++ {
		_, werr = old.Write(block)
	}
	if !isTimeout(werr) {
		t.Fatalf("128 MiB written into a blackhole: %v, want the writes to block", werr)
	}

	// A connection made during the blackhole is dead too, and so is the
	// target: it is not even dialled.
	during := dial(t, p)
	during.Write([]byte("x"))
	during.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := during.Read(make([]byte, 1)); !isTimeout(err) {
		t.Fatalf("read on a connection made during the blackhole: %v", err)
	}

	p.Blackhole(false)
	fresh := dial(t, p)
	roundTrip(t, fresh, []byte("after"), 2*time.Second)
	// The old connections stay dead.
	for _, c := range []*net.TCPConn{old, during} {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); !isTimeout(err) {
			t.Fatalf("dead connection after Blackhole(false): %v, want a timeout", err)
		}
	}
	st := p.Stats()
	if st.Blackholed != 2 || st.Active != 3 {
		t.Fatalf("stats %+v", st)
	}
	// ResetAll frees the dead ones.
	p.ResetAll()
	old.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := old.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("dead connection after ResetAll: %v", err)
	}
}

func TestStallResumesIntact(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr())
	c := dial(t, p)
	roundTrip(t, c, []byte("before"), 2*time.Second)

	p.Stall(true)
	data := random(t, 512<<10)
	werr := make(chan error, 1)
	go func() { _, err := c.Write(data); werr <- err }()
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(make([]byte, 10)); !isTimeout(err) {
		t.Fatalf("read during a stall: n=%d err=%v, want a timeout", n, err)
	}
	up := p.Stats().BytesUp
	time.Sleep(50 * time.Millisecond)
	if p.Stats().BytesUp != up {
		t.Fatal("bytes forwarded during a stall")
	}

	p.Stall(false)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(data))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatal("stream changed across a stall")
	}
	if st := p.Stats(); st.Stalls != 1 || st.Faults() != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestResetAll(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr())
	c := dial(t, p)
	roundTrip(t, c, []byte("before"), 2*time.Second)

	p.ResetAll()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read after ResetAll: %v, want ECONNRESET", err)
	}
	select {
	case err := <-e.errs:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("server side ended with %v, want ECONNRESET", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("server side not reset")
	}
	if st := p.Stats(); st.Resets != 1 || st.Active != 0 {
		t.Fatalf("stats %+v", st)
	}
	// The proxy still takes new connections.
	roundTrip(t, dial(t, p), []byte("after"), 2*time.Second)
}

// flip applies the recorded corruptions to a copy of data (an echo keeps
// offsets, so an Up flip and a Down flip land on the same stream).
func flip(data []byte, cs []Corruption) []byte {
	out := append([]byte(nil), data...)
	for _, c := range cs {
		out[c.Offset] ^= 1 << c.Bit
	}
	return out
}

func TestCorrupt(t *testing.T) {
	for _, tc := range []struct {
		name string
		dir  Dir
	}{{"up", Up}, {"down", Down}, {"any", Any}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEcho(t)
			p := newProxy(t, e.addr(), WithChunkSize(4096))
			c := dial(t, p)
			const n = 3
			p.CorruptDir(tc.dir, n)
			data := random(t, 256<<10)
			got := roundTrip(t, c, data, 5*time.Second)

			cs := p.Corruptions()
			if len(cs) != n || p.Stats().Corrupted != n {
				t.Fatalf("%d corruptions logged, %d counted, want %d", len(cs), p.Stats().Corrupted, n)
			}
			for _, x := range cs {
				if tc.dir != Any && x.Dir != tc.dir {
					t.Fatalf("corruption in direction %v, want %v", x.Dir, tc.dir)
				}
			}
			if sha256.Sum256(got) == sha256.Sum256(data) {
				t.Fatal("nothing was corrupted")
			}
			if sha256.Sum256(got) != sha256.Sum256(flip(data, cs)) {
				t.Fatal("the bytes changed are not the ones reported")
			}
			diff := 0
			for i := range got {
				if got[i] != data[i] {
					diff++
				}
			}
			if diff > n {
				t.Fatalf("%d bytes differ, at most %d flipped", diff, n)
			}
			// After n chunks the stream is clean again.
			more := random(t, 64<<10)
			if !bytes.Equal(roundTrip(t, c, more, 5*time.Second), more) {
				t.Fatal("corruption went on past n chunks")
			}
		})
	}
}

func TestRefuse(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr())
	kept := dial(t, p)
	roundTrip(t, kept, []byte("before"), 2*time.Second)

	p.Refuse(true)
	expectReset(t, p)
	// Connections made before keep working.
	roundTrip(t, kept, []byte("still"), 2*time.Second)

	p.Refuse(false)
	roundTrip(t, dial(t, p), []byte("after"), 2*time.Second)
	if st := p.Stats(); st.Refused != 1 || st.Accepted != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestDialFailure(t *testing.T) {
	// A port that was free a moment ago: the dial is refused.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := ln.Addr().String()
	ln.Close()
	p := newProxy(t, target)
	expectReset(t, p)
	if st := p.Stats(); st.DialFailed != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// TestCloseEndsEverything closes a proxy with connections in every state
// and checks that no goroutine of it is left.
func TestCloseEndsEverything(t *testing.T) {
	e := newEcho(t)
	ignore := goleak.IgnoreCurrent()
	p, err := New("127.0.0.1:0", e.addr())
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	open := func() net.Conn {
		c, err := net.Dial("tcp", p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		return c
	}
	busy := open()
	roundTrip(t, busy, []byte("hi"), 2*time.Second)
	p.SetDelay(time.Hour) // a chunk waiting for an hour
	busy.Write([]byte("late"))
	p.SetDelay(0)
	p.Stall(true) // a stalled one
	stalled := open()
	stalled.Write(random(t, 100<<10))
	p.Stall(false)
	p.Blackhole(true) // dead ones
	open().Write([]byte("x"))
	p.Blackhole(false)
	p.SetDelay(time.Hour)
	time.Sleep(50 * time.Millisecond)

	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, c := range conns {
		c.Close()
	}
	goleak.VerifyNone(t, ignore)
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Fatal("closed proxy still accepts")
	}
}

// TestConcurrentFaults switches every fault from several goroutines while
// clients stream through the proxy (a check for -race and for hangs), then
// checks that the proxy still forwards cleanly.
func TestConcurrentFaults(t *testing.T) {
	e := newEcho(t)
	p := newProxy(t, e.addr(), WithChunkSize(1024))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(5+i) * time.Millisecond):
				}
				switch (i + j) % 7 {
				case 0:
					p.SetDelay(time.Duration(j%3) * time.Millisecond)
				case 1:
					p.Stall(j%2 == 0)
				case 2:
					p.Blackhole(j%5 == 0)
				case 3:
					p.ResetAll()
				case 4:
					p.Corrupt(1)
				case 5:
					p.Refuse(j%4 == 0)
				case 6:
					p.Stats()
					p.Corruptions()
				}
			}
		}()
	}
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
				if err != nil {
					continue
				}
				c.SetDeadline(time.Now().Add(100 * time.Millisecond))
				for k := 0; k < 20; k++ {
					if _, err := c.Write(buf[:1+k*50]); err != nil {
						break
					}
					if _, err := io.ReadFull(c, buf[:1+k*50]); err != nil {
						break
					}
				}
				c.Close()
			}
		}()
	}
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	p.Stall(false)
	p.Blackhole(false)
	p.Refuse(false)
	p.SetDelay(0)
	p.Corrupt(0)
	p.ResetAll()
	msg := random(t, 10<<10)
	if !bytes.Equal(roundTrip(t, dial(t, p), msg, 2*time.Second), msg) {
		t.Fatal("proxy broken after the storm")
	}
	t.Logf("stats after the storm: %+v", p.Stats())
}
