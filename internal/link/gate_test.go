package link

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// fakeConn is a connection from a remote address, closed or not.
type fakeConn struct {
	net.Conn // nil: only RemoteAddr and Close are called
	remote   *net.TCPAddr
	closed   atomic.Bool
}

func (c *fakeConn) RemoteAddr() net.Addr { return c.remote }
func (c *fakeConn) Close() error         { c.closed.Store(true); return nil }

func from(ip string, port int) *fakeConn {
	return &fakeConn{remote: net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), uint16(port)))}
}

// evictedWith reports whether t's connection was closed by the gate for
// want.
func evictedWith(t *Ticket, want error) bool {
	return t.conn.(*fakeConn).closed.Load() && errors.Is(t.release(), want)
}

func TestGatePerSource(t *testing.T) {
	g := NewGate(100, 4)
	var ts []*Ticket
	for i := range 10 {
		ts = append(ts, g.Admit(from("10.0.0.1", 1000+i)))
	}
	other := g.Admit(from("10.0.0.2", 1))
	if g.Len() != 5 {
		t.Fatalf("the gate holds %d, want 4 from the flooding source and 1 other", g.Len())
	}
	for i, tk := range ts {
		if want := i < 6; evictedWith(tk, ErrEvictedPerSource) != want {
			t.Errorf("ticket %d: evicted %v, want %v (the oldest go first)", i, !want, want)
		}
	}
	if other.conn.(*fakeConn).closed.Load() {
		t.Fatal("another source's handshake was evicted")
	}
}

func TestGateFullEvictsFromTheBiggestSource(t *testing.T) {
	g := NewGate(8, 8)
	var a []*Ticket
	for i := range 5 {
		a = append(a, g.Admit(from("10.0.0.1", i)))
	}
	b1 := g.Admit(from("10.0.0.2", 1))
	b2 := g.Admit(from("10.0.0.2", 2))
	c := g.Admit(from("10.0.0.3", 1))
	// Full: the next one evicts the oldest of 10.0.0.1, which holds most.
	d := g.Admit(from("10.0.0.4", 1))
	if !evictedWith(a[0], ErrEvicted) {
		t.Fatal("the oldest handshake of the biggest source was not evicted")
	}
	for _, tk := range append(a[1:], b1, b2, c, d) {
		if tk.conn.(*fakeConn).closed.Load() {
			t.Fatal("another handshake was evicted")
		}
	}
	if g.Len() != 8 {
		t.Fatalf("the gate holds %d, want 8", g.Len())
	}
}

// TestGateSparesKnownHandshakes: handshakes whose mac1 held are evicted
// only when no other is left.
func TestGateSparesKnownHandshakes(t *testing.T) {
	g := NewGate(4, 4)
	var a []*Ticket
	for i := range 3 {
		tk := g.Admit(from("10.0.0.1", i))
		tk.markKnown()
		a = append(a, tk)
	}
	b := g.Admit(from("10.0.0.2", 1)) // unknown: it goes first
	g.Admit(from("10.0.0.3", 1))
	if !evictedWith(b, ErrEvicted) {
		t.Fatal("the one handshake without a mac1 was not the one evicted")
	}
	for _, tk := range a {
		if tk.conn.(*fakeConn).closed.Load() {
			t.Fatal("a known handshake was evicted while an unknown one remained")
		}
	}
	// Now only 10.0.0.3's is unknown; it goes next, then the known ones,
	// oldest of the biggest source first.
	g.Admit(from("10.0.0.4", 1)).markKnown()
	g.Admit(from("10.0.0.5", 1)).markKnown()
	if !evictedWith(a[0], ErrEvicted) {
		t.Fatal("with only known handshakes left, the oldest of the biggest source was not evicted")
	}
}

func TestGateIPv6Prefix(t *testing.T) {
	g := NewGate(100, 2)
	x := g.Admit(from("2001:db8::1", 1))
	g.Admit(from("2001:db8::2", 1))
	g.Admit(from("2001:db8::3", 1)) // the same /64
	y := g.Admit(from("2001:db8:0:1::1", 1))
	if !evictedWith(x, ErrEvictedPerSource) || y.conn.(*fakeConn).closed.Load() {
		t.Fatal("an IPv6 /64 is not one source")
	}
	// An IPv4-mapped address is its IPv4 address.
	z := g.Admit(from("10.0.0.9", 1))
	g.Admit(from("::ffff:10.0.0.9", 2))
	g.Admit(from("10.0.0.9", 3))
	if !evictedWith(z, ErrEvictedPerSource) {
		t.Fatal("an IPv4-mapped address is not its IPv4 source")
	}
}

// TestGateBounds drives the gate with random admissions, mac1 marks and
// releases from a few sources and checks after every step that it holds
// at most its bound, at most perSource from any source, and that its
// counts agree with its tickets.
func TestGateBounds(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	g := NewGate(16, 5)
	var live []*Ticket
	for step := range 20000 {
		switch r := rng.IntN(10); {
		case r < 6:
			live = append(live, g.Admit(from(fmt.Sprintf("10.0.0.%d", rng.IntN(12)), step)))
		case r < 8 && len(live) > 0:
			live[rng.IntN(len(live))].markKnown()
		case len(live) > 0:
			i := rng.IntN(len(live))
			live[i].release()
			live = append(live[:i], live[i+1:]...)
		}
		g.mu.Lock()
		n := 0
		for src, s := range g.sources {
			unknown := 0
			for _, tk := range s.tickets {
				if tk.out || tk.src != src {
					t.Fatalf("step %d: a ticket out of the gate is still listed", step)
				}
				if !tk.known {
					unknown++
				}
			}
			if len(s.tickets) > 5 || len(s.tickets) == 0 || unknown != s.unknown {
				t.Fatalf("step %d: source %v holds %d (%d unknown, counted %d)", step, src, len(s.tickets), unknown, s.unknown)
			}
			n += len(s.tickets)
		}
		if n != g.n || n > 16 {
			t.Fatalf("step %d: the gate holds %d, counts %d, bound 16", step, n, g.n)
		}
		g.mu.Unlock()
	}
}

func TestGateClose(t *testing.T) {
	g := NewGate(8, 8)
	a := g.Admit(from("10.0.0.1", 1))
	g.Close()
	if !evictedWith(a, ErrGateClosed) {
		t.Fatal("Close left a handshake")
	}
	b := g.Admit(from("10.0.0.1", 2))
	if !evictedWith(b, ErrGateClosed) || g.Len() != 0 {
		t.Fatal("a closed gate admitted a handshake")
	}
}

// TestGateEvictsARealHandshake: a silent connection in a full gate is
// evicted by the next, its Accept fails at once naming why, and the next
// one, a real initiator, links.
func TestGateEvictsARealHandshake(t *testing.T) {
	s := newSetup(t)
	ln := listen(t)
	g := NewGate(1, 8)
	results := make(chan error, 2)
	go func() {
		for range 2 {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			tk := g.Admit(conn)
			go func() {
				l, err := tk.Accept(s.bc)
				if err == nil {
					err = l.Confirm()
				}
				results <- err
			}()
		}
	}()
	silent, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	for g.Len() != 1 {
		time.Sleep(time.Millisecond)
	}
	_, a, err := dialRaw(t, ln, s.ac, "node-b")
	if err != nil {
		t.Fatalf("the real initiator: %v", err)
	}
	defer a.Close(nil)
	var he *HandshakeError
	if err := <-results; !errors.As(err, &he) || he.Reason() != "evicted" {
		t.Fatalf("the silent handshake: %v, want reason evicted", err)
	}
	if err := <-results; err != nil {
		t.Fatalf("the real handshake: %v", err)
	}
	if g.Len() != 0 {
		t.Fatalf("the gate holds %d after both handshakes ended", g.Len())
	}
}
