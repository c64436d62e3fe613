package agent

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// TestRingNoLostWakeups: on the ring path every wait ends by a wake-up,
// never by the agent's sweep. The sweep is turned off here (it would look
// again every second and hide a lost wake-up); transfers in both shapes
// that stress the handshakes — a fast bulk reader, and a slow reader that
// takes a few bytes at a time — must finish, each within a bound far
// above what it needs, with every byte in order, and the budget must be
// back to zero after. A lost wake-up (the credit the process's reading
// frees not going back, a reader not told of data) hangs a transfer here.
func TestRingNoLostWakeups(t *testing.T) {
	withRings(t)
	was := idleSweep
	idleSweep = time.Hour
	t.Cleanup(func() { idleSweep = was })
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "sink")
	type result struct {
		sum [32]byte
		n   int
		err error
	}
	got := make(chan result, 1)
	var slow atomic.Bool
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				buf := make([]byte, 64<<10)
				slowly := slow.Load()
				if slowly {
					buf = buf[:1500]
				}
				n := 0
				for {
					k, err := c.Read(buf)
					h.Write(buf[:k])
					n += k
					if err == io.EOF {
						break
					}
					if err != nil {
						got <- result{err: err}
						return
					}
					if slowly && n%(64<<10) < 1500 {
						time.Sleep(time.Millisecond)
					}
				}
				var r result
				copy(r.sum[:], h.Sum(nil))
				r.n = n
				got <- r
			}()
		}
	}()
	for i, shape := range []struct {
		name  string
		total int
		slow  bool
	}{
		{"bulk", 32 << 20, false}, {"bulk", 32 << 20, false}, {"bulk", 32 << 20, false},
		{"slow reader", 4 << 20, true}, {"slow reader", 4 << 20, true},
	} {
		slow.Store(shape.slow)
		c := p.mustDial(t, "node-a", "web", "node-b/db/sink", sinc.Stream)
		data := make([]byte, shape.total)
		r := rand.New(rand.NewPCG(uint64(i), 1))
		for j := range data {
			data[j] = byte(r.Uint32())
		}
		start := time.Now()
		go func() {
			for off := 0; off < len(data); {
				k := min(len(data)-off, 1+r.IntN(128<<10))
				if _, err := c.Write(data[off : off+k]); err != nil {
					return
				}
				off += k
			}
			c.CloseWrite()
		}()
		select {
		case res := <-got:
			if res.err != nil {
				t.Fatalf("%s %d: %v", shape.name, i, res.err)
			}
			if want := sha256.Sum256(data); res.n != len(data) || res.sum != want {
				t.Fatalf("%s %d: %d bytes of %d, same bytes: %v", shape.name, i, res.n, len(data), res.sum == want)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s %d: not done after 20 s: a wake-up was lost", shape.name, i)
		}
		t.Logf("%s: %d MiB in %v", shape.name, shape.total>>20, time.Since(start).Round(time.Millisecond))
		c.Close()
	}
	eventually(t, 5*time.Second, "every channel ended and the budget back", func() bool {
		return len(p.a.tables.all()) == 0 && len(p.b.tables.all()) == 0 &&
			p.a.budget.inUse() == 0 && p.b.budget.inUse() == 0
	})
}

// TestRingCloseWithUnread: a process that closes a ring channel (with its
// fin) before taking all that came down ends it as a reset at the other
// end, as on the socket path — the other side must not take a truncated
// stream for a whole one — and the budget the ring held comes back.
func TestRingCloseWithUnread(t *testing.T) {
	withRings(t)
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "sink")
	accepted := make(chan *sinc.Conn, 1)
	go func() {
		if c, err := l.AcceptSinc(); err == nil {
			accepted <- c
		}
	}()
	c := p.mustDial(t, "node-a", "web", "node-b/db/sink", sinc.Stream)
	if _, err := c.Write(bytes.Repeat([]byte("x"), 100<<10)); err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	eventually(t, 5*time.Second, "data down the ring", func() bool { return p.b.budget.inUse() > 0 })
	s.Close() // reads nothing
	// Its direction ended with its fin (the writer may read io.EOF), but
	// what the writer sent was not all read: the writer's side ends as a
	// reset, and its writes fail.
	var err error
	for deadline := time.Now().Add(5 * time.Second); err == nil && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		_, err = c.Write([]byte("more"))
	}
	if !errors.Is(err, sinc.ErrReset) {
		t.Fatalf("the writer's side: %v, want reset", err)
	}
	eventually(t, 5*time.Second, "every channel ended and the budget back", func() bool {
		return len(p.a.tables.all()) == 0 && len(p.b.tables.all()) == 0 &&
			p.a.budget.inUse() == 0 && p.b.budget.inUse() == 0
	})
}

// TestRingDescriptorBound: rings hold at most their share of the agent's
// descriptors (half of RLIMIT_NOFILE); past it, channels take the socket
// path — still working — instead of the agent running out.
func TestRingDescriptorBound(t *testing.T) {
	withRings(t)
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	for _, a := range []*testAgent{p.a, p.b} {
		a.ringSlots.mu.Lock()
		a.ringSlots.fdsMax = 2 * ringFDs
		a.ringSlots.mu.Unlock()
	}
	var conns []*sinc.Conn
	for range 4 {
		conns = append(conns, p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Stream))
	}
	rings := 0
	for _, ch := range p.a.tables.all() {
		ch.rmu.Lock()
		if ch.ring != nil {
			rings++
		}
		ch.rmu.Unlock()
	}
	if rings != 2 {
		t.Fatalf("node-a made %d rings for 4 channels, want 2 (its bound)", rings)
	}
	if n := p.a.counters.refusedCount("ring_no_descriptors"); n != 2 {
		t.Fatalf("ring_no_descriptors counted %d, want 2", n)
	}
	for i, c := range conns {
		msg := []byte("channel " + string(rune('0'+i)))
		if got := roundTrip(t, c, msg); !bytes.Equal(got, msg) {
			t.Fatalf("channel %d echoed %q", i, got)
		}
	}
	for _, c := range conns {
		c.Close()
	}
	eventually(t, 5*time.Second, "the rings' descriptors given back", func() bool {
		p.a.ringSlots.mu.Lock()
		defer p.a.ringSlots.mu.Unlock()
		return p.a.ringSlots.fds == 0
	})
}

// withRings makes the Go client ask for rings in this test, also in the
// run of this package on the socket path (TestSocketPathToo).
func withRings(t *testing.T) { t.Setenv(sinc.NoRingEnv, "") }

// TestSocketPathToo runs this package's tests again with the Go client
// on the socket path (SINC_NO_RING=1), the path of every client that does
// not ask for rings: the pumps, the queue and the direct delivery of
// receive.go and send.go keep their fault, interleaving and bound tests.
func TestSocketPathToo(t *testing.T) {
	if os.Getenv(sinc.NoRingEnv) == "1" {
		t.Skip("this is the socket path's run")
	}
	if testing.Short() {
		t.Skip("-short: the package once more")
	}
	cmd := exec.Command(os.Args[0], "-test.count=1", "-test.skip", "^TestSocketPathToo$|^TestRing")
	cmd.Env = append(os.Environ(), sinc.NoRingEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("on the socket path: %v\n%s", err, out)
	}
}
