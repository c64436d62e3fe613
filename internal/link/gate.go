package link

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
)

// Gate bounds the handshakes in progress on a peer listener so that a flood
// of connections, from anyone who can reach the port, cannot keep a
// configured peer from linking:
//
//   - a source (an IPv4 address, or an IPv6 /64, one host's usual share)
//     holds at most perSource handshakes at once: its next connection
//     evicts its own oldest handshake;
//   - the gate holds at most max: when it is full, a new connection evicts
//     the oldest handshake of the source that holds the most;
//   - a handshake whose message 1 carried a valid mac1 (mac1.go: its sender
//     knows the cluster) is evicted only when no other is left to evict.
//
// A new connection is never refused. Under a flood the handshakes that go
// are the flood's own, oldest first, and a peer's handshake — one round
// trip — is over long before the flood's turnover reaches it: to evict it,
// a flood must hold as many sources as the gate has slots and replace all
// of them within that round trip.
//
// An evicted handshake's connection is closed; its Accept fails with
// ErrEvicted or ErrEvictedPerSource. A Gate is safe for concurrent use.
type Gate struct {
	max, perSource int

	mu      sync.Mutex
	seq     uint64
	n       int // tickets in the gate
	sources map[netip.Prefix]*source
	closed  bool
}

// source is one source's tickets, oldest first.
type source struct {
	tickets []*Ticket
	unknown int // tickets without a verified mac1
}

// Ticket is one connection's place in a Gate, from Admit until its
// handshake ends (Accept).
type Ticket struct {
	g    *Gate
	conn net.Conn
	src  netip.Prefix
	seq  uint64

	// Guarded by g.mu.
	known   bool  // message 1's mac1 verified
	out     bool  // no longer in the gate
	evicted error // why the gate closed the connection, if it did
}

// Eviction reasons.
var (
	ErrEvicted          = errors.New("evicted: too many handshakes in progress")
	ErrEvictedPerSource = errors.New("evicted: too many handshakes in progress from one source")
	ErrGateClosed       = errors.New("the listener is closing")
)

// NewGate returns a gate for at most limit handshakes at once, perSource
// of them from one source.
func NewGate(limit, perSource int) *Gate {
	return &Gate{max: max(limit, 1), perSource: max(perSource, 1), sources: map[netip.Prefix]*source{}}
}

// Max returns the most handshakes the gate holds at once.
func (g *Gate) Max() int { return g.max }

// Len returns the handshakes in the gate now.
func (g *Gate) Len() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.n
}

// Admit takes conn into the gate, evicting another handshake if conn's
// source or the gate is full. Run the handshake with the ticket's Accept.
func (g *Gate) Admit(conn net.Conn) *Ticket {
	t := &Ticket{g: g, conn: conn, src: sourceOf(conn.RemoteAddr())}
	var victim *Ticket
	g.mu.Lock()
	if g.closed {
		t.out, t.evicted = true, ErrGateClosed
		g.mu.Unlock()
		conn.Close()
		return t
	}
	g.seq++
	t.seq = g.seq
	s := g.sources[t.src]
	switch {
	case s != nil && len(s.tickets) >= g.perSource:
		victim = s.oldest(s.unknown > 0)
		g.evict(victim, ErrEvictedPerSource)
	case g.n >= g.max:
		victim = g.victim()
		g.evict(victim, ErrEvicted)
	}
	if s = g.sources[t.src]; s == nil {
		s = &source{}
		g.sources[t.src] = s
	}
	s.tickets = append(s.tickets, t)
	s.unknown++
	g.n++
	g.mu.Unlock()
	if victim != nil {
		victim.conn.Close()
	}
	return t
}

// oldest returns the source's oldest ticket, among those without a
// verified mac1 if unknownOnly.
func (s *source) oldest(unknownOnly bool) *Ticket {
	for _, t := range s.tickets {
		if !unknownOnly || !t.known {
			return t
		}
	}
	return nil
}

// victim picks the handshake a full gate evicts: the oldest of the source
// holding the most, counting only handshakes without a verified mac1 if
// there are any. Ties go to the source whose candidate is older.
func (g *Gate) victim() *Ticket {
	unknownOnly := false
	for _, s := range g.sources {
		if s.unknown > 0 {
			unknownOnly = true
			break
		}
	}
	var best *Ticket
	bestN := 0
	for _, s := range g.sources {
		n := len(s.tickets)
		if unknownOnly {
			n = s.unknown
		}
		if n == 0 || n < bestN {
			continue
		}
		t := s.oldest(unknownOnly)
		if n > bestN || t.seq < best.seq {
			best, bestN = t, n
		}
	}
	return best
}

// evict takes t out of the gate with err as its reason; the caller closes
// its connection (outside the lock).
func (g *Gate) evict(t *Ticket, err error) {
	g.remove(t)
	t.evicted = err
}

// remove takes t out of the gate. g.mu is held.
func (g *Gate) remove(t *Ticket) {
	if t.out {
		return
	}
	t.out = true
	s := g.sources[t.src]
	s.tickets = slices.DeleteFunc(s.tickets, func(x *Ticket) bool { return x == t })
	if !t.known {
		s.unknown--
	}
	if len(s.tickets) == 0 {
		delete(g.sources, t.src)
	}
	g.n--
}

// Close evicts every handshake in the gate and closes the ones admitted
// after: the listener is going away.
func (g *Gate) Close() {
	g.mu.Lock()
	g.closed = true
	var all []*Ticket
	for _, s := range g.sources {
		all = append(all, s.tickets...)
	}
	for _, t := range all {
		g.evict(t, ErrGateClosed)
	}
	g.mu.Unlock()
	for _, t := range all {
		t.conn.Close()
	}
}

// markKnown records that the ticket's message 1 carried a valid mac1. A
// nil ticket (a handshake outside any gate) does nothing.
func (t *Ticket) markKnown() {
	if t == nil {
		return
	}
	t.g.mu.Lock()
	defer t.g.mu.Unlock()
	if t.out || t.known {
		return
	}
	t.known = true
	t.g.sources[t.src].unknown--
}

// release takes the ticket out of the gate at the end of its handshake and
// returns why it was evicted, if it was.
func (t *Ticket) release() error {
	if t == nil {
		return nil
	}
	t.g.mu.Lock()
	defer t.g.mu.Unlock()
	t.g.remove(t)
	return t.evicted
}

// Conn returns the ticket's connection.
func (t *Ticket) Conn() net.Conn { return t.conn }

// sourceOf returns the source a remote address counts against: the
// address for IPv4, its /64 for IPv6.
func sourceOf(a net.Addr) netip.Prefix {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Prefix{}
	}
	ip := ta.AddrPort().Addr().Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}
