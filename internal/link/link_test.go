package link

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cert/certtest"
)

// side is one agent of a test: its link config.
func side(t testing.TB, ca *certtest.CA, n *certtest.Node) *Config {
	priv, pub := KeyPair(n.Key)
	return &Config{
		Private:          priv,
		Public:           pub,
		Cert:             n.Cert,
		Verifier:         ca.Verifier(t),
		Instance:         NewInstance(),
		HandshakeTimeout: 2 * time.Second,
		Keepalive:        100 * time.Millisecond,
		DeadAfter:        400 * time.Millisecond,
	}
}

func listen(t testing.TB) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

type accepted struct {
	l   *Link
	err error
}

// serveOne accepts one connection on ln, runs the responder's handshake and
// confirms the link.
func serveOne(ln net.Listener, c *Config) <-chan accepted {
	ch := make(chan accepted, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			ch <- accepted{nil, err}
			return
		}
		l, err := Accept(conn, c)
		if err == nil {
			err = l.Confirm()
		}
		ch <- accepted{l, err}
	}()
	return ch
}

// dialRaw dials ln and returns the raw connection with the link on it.
func dialRaw(t testing.TB, ln net.Listener, c *Config, peer string) (net.Conn, *Link, error) {
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	l, err := Dial(conn, c, peer)
	return conn, l, err
}

type setup struct {
	ca   *certtest.CA
	a, b *certtest.Node
	ac   *Config
	bc   *Config
}

func newSetup(t testing.TB) *setup {
	ca := certtest.NewCA(t)
	s := &setup{ca: ca,
		a: ca.Node(t, cert.NodeRequest{Node: "node-a"}),
		b: ca.Node(t, cert.NodeRequest{Node: "node-b"}),
	}
	s.ac, s.bc = side(t, ca, s.a), side(t, ca, s.b)
	return s
}

// up links a (initiator) to b (responder).
func (s *setup) up(t testing.TB) (a, b *Link) {
	t.Helper()
	ln := listen(t)
	acc := serveOne(ln, s.bc)
	_, a, err := dialRaw(t, ln, s.ac, "node-b")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	r := <-acc
	if r.err != nil {
		t.Fatalf("accept: %v", r.err)
	}
	t.Cleanup(func() { a.Close(errors.New("test over")); r.l.Close(errors.New("test over")) })
	return a, r.l
}

type recorder struct {
	mu   sync.Mutex
	msgs [][]byte
	got  chan struct{}
}

func newRecorder() *recorder { return &recorder{got: make(chan struct{}, 1024)} }

func (r *recorder) HandleControl(l *Link, msg []byte) {
	r.mu.Lock()
	r.msgs = append(r.msgs, bytes.Clone(msg))
	r.mu.Unlock()
	r.got <- struct{}{}
}

func (r *recorder) HandleData(l *Link, frame []byte) {
	r.HandleControl(l, append([]byte{0}, frame...)) // op 0 marks a data frame
}

func (r *recorder) wait(t testing.TB, n int) [][]byte {
	t.Helper()
	for range n {
		select {
		case <-r.got:
		case <-time.After(5 * time.Second):
			t.Fatalf("timed out waiting for message")
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.msgs
}

func TestHandshakeAndMessages(t *testing.T) {
	s := newSetup(t)
	a, b := s.up(t)
	if a.Peer().Name != "node-b" || b.Peer().Name != "node-a" {
		t.Fatalf("peers: a sees %q, b sees %q", a.Peer().Name, b.Peer().Name)
	}
	if a.PeerInstance() != s.bc.Instance || b.PeerInstance() != s.ac.Instance {
		t.Fatal("instance ids not exchanged")
	}
	if !a.Initiator() || b.Initiator() {
		t.Fatal("initiator flags wrong")
	}
	rb, ra := newRecorder(), newRecorder()
	go b.Serve(rb)
	go a.Serve(ra)
	for i := range 100 {
		if err := a.Send([]byte{OpFirstAgent, byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	b.Send([]byte{OpFirstAgent + 1, 'x'})
	msgs := rb.wait(t, 100)
	for i, m := range msgs {
		if !bytes.Equal(m, []byte{OpFirstAgent, byte(i)}) {
			t.Fatalf("message %d = %x", i, m)
		}
	}
	if m := ra.wait(t, 1); !bytes.Equal(m[0], []byte{OpFirstAgent + 1, 'x'}) {
		t.Fatalf("reverse message %x", m[0])
	}
	if got := b.Stats().FramesIn.Load(); got < 100 {
		t.Fatalf("b counted %d frames in, sent 100", got)
	}
	if got := a.Stats().FramesIn.Load(); got < 2 { // the verdict and one message
		t.Fatalf("a counted %d frames in, want at least 2", got)
	}
	if err := a.Send([]byte{opClose}); err == nil {
		t.Fatal("Send of a link-reserved op succeeded")
	}
	if err := a.Send(append([]byte{OpFirstAgent}, make([]byte, MaxControlLen)...)); err == nil {
		t.Fatal("Send of an oversized control message succeeded")
	}
}

// TestHandshakeRefusals presents each bad certificate or key, in each
// direction, and checks that the side checking it refuses with the reason.
func TestHandshakeRefusals(t *testing.T) {
	s := newSetup(t)
	other := certtest.NewCA(t)
	now := time.Now()
	bad := map[string]*certtest.Node{
		"other CA":      other.Node(t, cert.NodeRequest{Node: "node-b"}),
		"expired":       s.ca.Node(t, cert.NodeRequest{Node: "node-b", NotBefore: now.Add(-48 * time.Hour), ValidFor: time.Hour}),
		"not yet valid": s.ca.Node(t, cert.NodeRequest{Node: "node-b", NotBefore: now.Add(time.Hour), ValidFor: time.Hour}),
		"wrong node":    s.ca.Node(t, cert.NodeRequest{Node: "node-c"}),
		"key mismatch":  {Key: certtest.NewKey(t), Cert: s.b.Cert},
	}
	check := func(t *testing.T, name string, err error) {
		t.Helper()
		if err == nil {
			t.Fatal("handshake succeeded")
		}
		var ve *cert.ValidityError
		ok := false
		switch name {
		case "other CA":
			ok = errors.Is(err, cert.ErrUnknownCA)
		case "expired":
			ok = errors.As(err, &ve) && !ve.NotYet
		case "not yet valid":
			ok = errors.As(err, &ve) && ve.NotYet
		case "wrong node":
			ok = errors.Is(err, ErrWrongNode)
		case "key mismatch":
			ok = errors.Is(err, ErrStaticKeyMismatch)
		}
		if !ok {
			t.Fatalf("error %q is not the %s refusal", err, name)
		}
	}
	for name, n := range bad {
		t.Run("responder presents "+name, func(t *testing.T) {
			ln := listen(t)
			acc := serveOne(ln, side(t, s.ca, n))
			_, _, err := dialRaw(t, ln, s.ac, "node-b")
			check(t, name, err)
			if r := <-acc; r.err == nil {
				t.Fatal("responder thinks the link is up")
			}
		})
		if name == "wrong node" {
			continue // the responder asks the agent who may connect
		}
		t.Run("initiator presents "+name, func(t *testing.T) {
			ln := listen(t)
			acc := serveOne(ln, s.bc)
			_, _, err := dialRaw(t, ln, side(t, s.ca, n), "node-b")
			r := <-acc
			check(t, name, r.err)
			if err == nil {
				t.Fatal("initiator thinks the link is up")
			}
		})
	}
}

func TestRefuseReasonReachesInitiator(t *testing.T) {
	s := newSetup(t)
	ln := listen(t)
	go func() {
		conn, _ := ln.Accept()
		if l, err := Accept(conn, s.bc); err == nil {
			l.Refuse("node-a is not a configured peer")
		}
	}()
	_, _, err := dialRaw(t, ln, s.ac, "node-b")
	if !errors.Is(err, ErrRefused) || !bytes.Contains([]byte(err.Error()), []byte("not a configured peer")) {
		t.Fatalf("err = %v, want a refusal naming the reason", err)
	}
}

// TestHandshakeTimeout: a client that connects and sends nothing is dropped
// when the handshake timeout runs out.
func TestHandshakeTimeout(t *testing.T) {
	s := newSetup(t)
	s.bc.HandshakeTimeout = 200 * time.Millisecond
	ln := listen(t)
	acc := serveOne(ln, s.bc)
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	r := <-acc
	var ne net.Error
	if !errors.As(r.err, &ne) || !ne.Timeout() {
		t.Fatalf("err = %v, want a timeout", r.err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Fatalf("dropped after %s, want about 200ms", d)
	}
	conn.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := io.ReadAll(conn); err != nil {
		t.Fatalf("server did not close the connection: %v", err)
	}
}

func TestGarbageHandshake(t *testing.T) {
	s := newSetup(t)
	for _, garbage := range [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		{0, 32}, // a message 1 of the right size, then nothing more
		{0, 0},
	} {
		ln := listen(t)
		acc := serveOne(ln, s.bc)
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		g := garbage
		if len(g) == 2 && g[1] == 32 {
			g = append(g, make([]byte, 32)...)
			rnd := make([]byte, 200)
			rand.Read(rnd)
			g = append(g, rnd...) // a bogus message 3
		}
		conn.Write(g)
		if r := <-acc; r.err == nil {
			t.Fatalf("garbage %q accepted", garbage)
		}
		conn.Close()
	}
}

// hostile handshakes as node-a, then writes raw bytes on the connection and
// returns what the responder's Serve reported.
func hostile(t *testing.T, raw func(conn net.Conn, l *Link)) error {
	s := newSetup(t)
	ln := listen(t)
	acc := serveOne(ln, s.bc)
	conn, a, err := dialRaw(t, ln, s.ac, "node-b")
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close(errors.New("done"))
	r := <-acc
	if r.err != nil {
		t.Fatal(r.err)
	}
	rec := newRecorder()
	done := make(chan error, 1)
	go func() { done <- r.l.Serve(rec) }()
	raw(conn, a)
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("responder did not drop the link")
		return nil
	}
}

func TestFrameAttacks(t *testing.T) {
	hdr := func(n uint32, typ byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, n)
		return append(b, typ)
	}
	cases := []struct {
		name string
		raw  func(conn net.Conn, l *Link)
		want error
	}{
		{"over maximum size", func(c net.Conn, _ *Link) { c.Write(hdr(MaxFrameLen+1, FrameControl)) }, ErrFrameTooLarge},
		{"truncated", func(c net.Conn, _ *Link) {
			c.Write(append(hdr(100, FrameControl), make([]byte, 10)...))
			c.(*net.TCPConn).CloseWrite()
		}, ErrTruncated},
		{"truncated header", func(c net.Conn, _ *Link) { c.Write([]byte{0, 0}); c.(*net.TCPConn).CloseWrite() }, ErrTruncated},
		{"fails authentication", func(c net.Conn, _ *Link) {
			body := make([]byte, 40)
			rand.Read(body)
			c.Write(append(hdr(41, FrameControl), body...))
		}, ErrAuth},
		{"unknown type", func(c net.Conn, _ *Link) { c.Write(append(hdr(20, 99), make([]byte, 19)...)) }, ErrFrameType},
		{"too small", func(c net.Conn, _ *Link) { c.Write(append(hdr(5, FrameControl), make([]byte, 4)...)) }, ErrFrameTooSmall},
		{"replayed frame", func(c net.Conn, l *Link) {
			// Seal a real frame as the link would, send it, then send it again.
			var buf bytes.Buffer
			rc := &recordConn{Conn: c, w: &buf}
			l.conn = rc
			l.Send([]byte{OpFirstAgent, 1})
			c.Write(buf.Bytes())
		}, ErrAuth},
		{"flipped bit", func(c net.Conn, l *Link) {
			var buf bytes.Buffer
			l.conn = &recordConn{Conn: discard{c}, w: &buf}
			l.Send([]byte{OpFirstAgent, 1})
			b := buf.Bytes()
			b[len(b)-1] ^= 1
			c.Write(b)
		}, ErrAuth},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := hostile(t, tc.raw)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Serve ended with %v, want %v", err, tc.want)
			}
		})
	}
}

// recordConn copies what is written to it into w.
type recordConn struct {
	net.Conn
	w io.Writer
}

func (c *recordConn) Write(b []byte) (int, error) {
	c.w.Write(b)
	return c.Conn.Write(b)
}

// discard is a conn whose writes go nowhere.
type discard struct{ net.Conn }

func (discard) Write(b []byte) (int, error) { return len(b), nil }

// TestKeepaliveAndDeadPeer: an idle link stays up on keepalives; a peer that
// goes silent is dropped within DeadAfter.
func TestKeepaliveAndDeadPeer(t *testing.T) {
	s := newSetup(t)
	a, b := s.up(t)
	aDone, bDone := make(chan error, 1), make(chan error, 1)
	go func() { aDone <- a.Serve(newRecorder()) }()
	go func() { bDone <- b.Serve(newRecorder()) }()
	select {
	case err := <-bDone:
		t.Fatalf("idle link dropped despite keepalives: %v", err)
	case err := <-aDone:
		t.Fatalf("idle link dropped despite keepalives: %v", err)
	case <-time.After(3 * s.bc.DeadAfter):
	}
	if n := b.Stats().FramesIn.Load(); n < 3 {
		t.Fatalf("only %d frames in over an idle period: keepalives not sent", n)
	}

	// A silent peer: a link whose other side never serves (no keepalives).
	a2, b2 := s.up(t)
	_ = a2
	start := time.Now()
	err := b2.Serve(newRecorder())
	if !errors.Is(err, ErrDead) {
		t.Fatalf("Serve = %v, want ErrDead", err)
	}
	if d := time.Since(start); d < s.bc.DeadAfter || d > s.bc.DeadAfter+time.Second {
		t.Fatalf("silent peer dropped after %s, want %s", d, s.bc.DeadAfter)
	}
}

func TestShutdownReason(t *testing.T) {
	s := newSetup(t)
	a, b := s.up(t)
	done := make(chan error, 1)
	go func() { done <- b.Serve(newRecorder()) }()
	a.Shutdown("agent shutting down")
	err := <-done
	if !errors.Is(err, ErrPeerClosed) || !bytes.Contains([]byte(err.Error()), []byte("agent shutting down")) {
		t.Fatalf("Serve = %v, want the peer's reason", err)
	}
	if a.Send([]byte{OpFirstAgent}) == nil {
		t.Fatal("Send on a closed link succeeded")
	}
}

func BenchmarkHandshake(b *testing.B) {
	s := newSetup(b)
	ln := listen(b)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				if l, err := Accept(conn, s.bc); err == nil {
					l.Confirm()
					l.Close(nil)
				}
			}()
		}
	}()
	b.ResetTimer()
	for b.Loop() {
		_, l, err := dialRaw(b, ln, s.ac, "node-b")
		if err != nil {
			b.Fatal(err)
		}
		l.Close(nil)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
}

func BenchmarkControlFrames(b *testing.B) {
	for _, size := range []int{64, 1024, MaxControlLen - 1} {
		b.Run(byteSize(size), func(b *testing.B) {
			s := newSetup(b)
			a, r := s.up(b)
			var n int
			done := make(chan struct{})
			h := handlerFunc(func(*Link, []byte) {
				n++
				if n == b.N {
					close(done)
				}
			})
			go r.Serve(h)
			msg := make([]byte, size)
			msg[0] = OpFirstAgent
			b.SetBytes(int64(size))
			b.ResetTimer()
			for range b.N {
				if err := a.Send(msg); err != nil {
					b.Fatal(err)
				}
			}
			<-done
		})
	}
}

type handlerFunc func(*Link, []byte)

func (f handlerFunc) HandleControl(l *Link, m []byte) { f(l, m) }
func (f handlerFunc) HandleData(*Link, []byte)        {}

func byteSize(n int) string { return fmt.Sprintf("%dB", n) }
