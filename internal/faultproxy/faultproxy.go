// Package faultproxy is a userspace TCP proxy for tests that injects network
// faults on command. This kernel has no netem, so tests put a Proxy between
// two agents (or any client and server) and switch faults on and off while
// traffic flows:
//
//   - SetDelay: every chunk is held back by d from the moment it was read,
//     order kept (a latency, not a throughput cap: up to queueLen chunks per
//     direction are in flight);
//   - Blackhole: every current connection goes silent for good: the proxy
//     stops reading and stops writing on both of its sockets (it does not
//     read and discard), so kernel buffers fill and the peers' writes
//     eventually block, exactly as over a path that silently drops every
//     packet. The sockets are held open, so neither peer sees a FIN or a
//     RST. Connections accepted while the blackhole is on are held the same
//     way and the target is never dialled for them. Blackhole(false) heals
//     the path for connections accepted after it only: the ones that died
//     stay dead (like a path that lost its state) until ResetAll or Close;
//   - Stall: forwarding pauses in both directions but connections are kept;
//     Stall(false) continues every stream intact, nothing lost or
//     duplicated;
//   - ResetAll: every current connection is closed with SO_LINGER 0, so
//     both peers see a RST (ECONNRESET);
//   - Corrupt / CorruptDir: one random bit is flipped in each of the next n
//     chunks forwarded; Corruptions reports exactly which bits;
//   - Refuse: new connections are accepted and reset at once. (The kernel
//     completes the TCP handshake before the proxy can refuse, so the
//     peer's connect usually succeeds and its first read or write fails
//     with ECONNRESET; if the RST wins the race, connect itself fails with
//     ECONNRESET. Either way a handshake on top of TCP fails at once.)
//     A target that cannot be dialled gives the same reset.
//
// All methods are safe for concurrent use. The proxy dials only the target
// it was given. Close ends every goroutine the proxy started.
package faultproxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Dir names a direction of a proxied connection.
type Dir int

const (
	// Up is client → target: bytes the proxy read from the accepted
	// connection and writes to the dialled one.
	Up Dir = iota
	// Down is target → client.
	Down
	// Any is either direction (for CorruptDir: whichever chunk comes first).
	Any
)

func (d Dir) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	case Any:
		return "any"
	}
	return "dir?"
}

// DialFunc dials the target; net.Dialer.DialContext has this shape. A
// different dialer lets the proxy reach a target in another network
// namespace (see netns.Net.DialContext).
type DialFunc func(ctx context.Context, network, address string) (net.Conn, error)

const (
	defaultChunk = 16 << 10
	queueLen     = 16 // chunks in flight per direction of a connection
	dialTimeout  = 5 * time.Second
	maxLog       = 4096 // corruptions remembered
)

type config struct {
	dial  DialFunc
	chunk int
}

// Option configures a Proxy.
type Option func(*config)

// WithDialer makes the proxy dial its target with d instead of a plain
// net.Dialer (timeout 5 s).
func WithDialer(d DialFunc) Option { return func(c *config) { c.dial = d } }

// WithChunkSize sets the largest chunk the proxy reads at once (default
// 16 KiB). Delays and corruptions apply per chunk.
func WithChunkSize(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.chunk = n
		}
	}
}

// Stats are the proxy's counters since New.
type Stats struct {
	BytesUp   int64 // bytes forwarded client → target
	BytesDown int64 // bytes forwarded target → client

	Accepted   int64 // connections accepted, refused ones included
	Active     int64 // connections open now (dead blackholed ones included)
	DialFailed int64 // connections reset because the target could not be dialled

	// Faults injected, by kind.
	Delayed    int64 // chunks forwarded late because of SetDelay
	Stalls     int64 // times Stall(true) began a stall
	Blackholed int64 // connections killed by Blackhole
	Resets     int64 // connections reset by ResetAll
	Corrupted  int64 // chunks in which a bit was flipped
	Refused    int64 // connections refused by Refuse
}

// Faults is the number of faults injected: stalls, blackholed, reset,
// corrupted and refused (delayed chunks are not counted as faults).
func (s Stats) Faults() int64 {
	return s.Stalls + s.Blackholed + s.Resets + s.Corrupted + s.Refused
}

// Corruption records one flipped bit.
type Corruption struct {
	Conn   uint64 // connection number, from 1 in accept order
	Dir    Dir    // Up or Down
	Offset int64  // offset of the byte in that direction's stream
	Bit    uint   // the byte was XORed with 1<<Bit
}

// Proxy forwards TCP connections to one target and injects faults.
type Proxy struct {
	ln     net.Listener
	target string
	dial   DialFunc
	chunk  int
	pool   sync.Pool
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	wake      chan struct{} // closed and replaced when a setting changes
	delay     time.Duration
	stalled   bool
	blackhole bool
	refuse    bool
	corrupt   [3]int // by Dir
	conns     map[*pconn]struct{}
	closed    bool
	nextID    uint64
	log       []Corruption

	bytes                                                     [2]atomic.Int64
	accepted, dialFailed, delayed, stalls, blackholed, resets atomic.Int64
	corrupted, refused                                        atomic.Int64
}

type pconn struct {
	id     uint64
	client net.Conn
	server net.Conn      // nil until dialled; guarded by Proxy.mu
	done   chan struct{} // closed (under Proxy.mu) when the connection ends
	dead   chan struct{} // closed (under Proxy.mu) when blackholed
	ends   atomic.Int32  // directions that ended with a clean EOF
	off    [2]int64      // bytes written per direction (by that writer only)
}

type chunk struct {
	buf []byte
	at  time.Time
	eof bool
}

// New listens on listen ("127.0.0.1:0" for a free loopback port) and
// forwards every accepted connection to target.
func New(listen, target string, opts ...Option) (*Proxy, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	return Serve(ln, target, opts...), nil
}

// Serve is New on a listener made by the caller (for instance inside a
// network namespace). The proxy owns ln and closes it in Close.
func Serve(ln net.Listener, target string, opts ...Option) *Proxy {
	cfg := config{chunk: defaultChunk}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.dial == nil {
		cfg.dial = (&net.Dialer{Timeout: dialTimeout}).DialContext
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{
		ln: ln, target: target, dial: cfg.dial, chunk: cfg.chunk,
		ctx: ctx, cancel: cancel,
		wake:  make(chan struct{}),
		conns: map[*pconn]struct{}{},
	}
	p.pool.New = func() any { b := make([]byte, p.chunk); return &b }
	p.wg.Add(1)
	go p.acceptLoop()
	return p
}

// Addr is the address the proxy listens on (host:port).
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target is the address the proxy forwards to.
func (p *Proxy) Target() string { return p.target }

// SetDelay holds every chunk back by d (0 turns the delay off). Chunks keep
// their order. A change applies to chunks still waiting, too.
func (p *Proxy) SetDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.broadcast()
	p.mu.Unlock()
}

// Stall(true) pauses forwarding in both directions of every connection,
// current and new; Stall(false) resumes it, every stream intact.
func (p *Proxy) Stall(on bool) {
	p.mu.Lock()
	if on && !p.stalled {
		p.stalls.Add(1)
	}
	p.stalled = on
	p.broadcast()
	p.mu.Unlock()
}

// Blackhole(true) kills every current connection silently: the proxy stops
// reading and writing on both of its sockets and keeps them open. New
// connections are held dead too while it is on. Blackhole(false) lets
// connections accepted afterwards through; the dead ones stay dead until
// ResetAll or Close.
func (p *Proxy) Blackhole(on bool) {
	p.mu.Lock()
	p.blackhole = on
	var victims []net.Conn
	if on {
		for c := range p.conns {
			if !isClosed(c.dead) {
				close(c.dead)
				p.blackholed.Add(1)
				victims = append(victims, c.client)
				if c.server != nil {
					victims = append(victims, c.server)
				}
			}
		}
	}
	p.broadcast()
	p.mu.Unlock()
	// Wake reads and writes blocked in the kernel without losing what is
	// still unread: a deadline in the past makes them return at once.
	now := time.Now()
	for _, c := range victims {
		c.SetDeadline(now)
	}
}

// ResetAll closes every current connection with SO_LINGER 0: both peers
// see a RST. Dead (blackholed) connections are closed too.
func (p *Proxy) ResetAll() {
	p.mu.Lock()
	all := make([]*pconn, 0, len(p.conns))
	for c := range p.conns {
		all = append(all, c)
	}
	p.mu.Unlock()
	for _, c := range all {
		if p.shutdown(c, true) {
			p.resets.Add(1)
		}
	}
}

// Corrupt flips one random bit in each of the next n chunks forwarded, in
// either direction. It replaces any earlier Corrupt count; 0 cancels.
func (p *Proxy) Corrupt(n int) { p.CorruptDir(Any, n) }

// CorruptDir is Corrupt for the chunks of one direction (Up, Down or Any).
func (p *Proxy) CorruptDir(d Dir, n int) {
	if d < Up || d > Any {
		return
	}
	p.mu.Lock()
	p.corrupt[d] = max(n, 0)
	p.mu.Unlock()
}

// Corruptions returns the bits flipped so far (the last 4096).
func (p *Proxy) Corruptions() []Corruption {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Corruption(nil), p.log...)
}

// Refuse(true) resets every new connection as soon as it is accepted;
// current connections are not touched.
func (p *Proxy) Refuse(on bool) {
	p.mu.Lock()
	p.refuse = on
	p.mu.Unlock()
}

// Stats returns the counters.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	active := int64(len(p.conns))
	p.mu.Unlock()
	return Stats{
		BytesUp: p.bytes[Up].Load(), BytesDown: p.bytes[Down].Load(),
		Accepted: p.accepted.Load(), Active: active, DialFailed: p.dialFailed.Load(),
		Delayed: p.delayed.Load(), Stalls: p.stalls.Load(), Blackholed: p.blackholed.Load(),
		Resets: p.resets.Load(), Corrupted: p.corrupted.Load(), Refused: p.refused.Load(),
	}
}

// Close stops listening, resets every connection and waits for every
// goroutine of the proxy to end.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	all := make([]*pconn, 0, len(p.conns))
	for c := range p.conns {
		all = append(all, c)
	}
	p.mu.Unlock()
	p.cancel()
	err := p.ln.Close()
	for _, c := range all {
		p.shutdown(c, true)
	}
	p.wg.Wait()
	return err
}

// broadcast wakes every goroutine waiting on a setting; p.mu is held.
func (p *Proxy) broadcast() {
	close(p.wake)
	p.wake = make(chan struct{})
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// abort closes c so that its peer sees a RST.
func abort(c net.Conn) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		l.SetLinger(0)
	}
	c.Close()
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if p.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// A passing error (out of descriptors…): back off, bounded.
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		p.accepted.Add(1)
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			abort(c)
			return
		}
		if p.refuse {
			p.mu.Unlock()
			p.refused.Add(1)
			abort(c)
			continue
		}
		p.nextID++
		pc := &pconn{id: p.nextID, client: c, done: make(chan struct{}), dead: make(chan struct{})}
		p.conns[pc] = struct{}{}
		if p.blackhole {
			// Held open, never read, never forwarded.
			close(pc.dead)
			p.blackholed.Add(1)
			p.mu.Unlock()
			continue
		}
		p.wg.Add(1)
		p.mu.Unlock()
		go p.handle(pc)
	}
}

// handle dials the target for c and starts its four pumps.
func (p *Proxy) handle(c *pconn) {
	defer p.wg.Done()
	ctx, cancel := context.WithTimeout(p.ctx, dialTimeout)
	srv, err := p.dial(ctx, "tcp", p.target)
	cancel()
	if err != nil {
		p.dialFailed.Add(1)
		p.shutdown(c, true)
		return
	}
	p.mu.Lock()
	if isClosed(c.done) {
		p.mu.Unlock()
		abort(srv)
		return
	}
	c.server = srv
	if isClosed(c.dead) {
		// Blackholed while dialling: hold both sockets, forward nothing.
		p.mu.Unlock()
		return
	}
	p.wg.Add(4)
	p.mu.Unlock()
	up := make(chan chunk, queueLen)
	down := make(chan chunk, queueLen)
	go p.reader(c, c.client, up)
	go p.writer(c, Up, srv, up)
	go p.reader(c, srv, down)
	go p.writer(c, Down, c.client, down)
}

// shutdown ends c once; rst closes its sockets with a RST. It reports
// whether this call ended it.
func (p *Proxy) shutdown(c *pconn, rst bool) bool {
	p.mu.Lock()
	if isClosed(c.done) {
		p.mu.Unlock()
		return false
	}
	close(c.done)
	delete(p.conns, c)
	srv := c.server
	p.mu.Unlock()
	for _, s := range []net.Conn{c.client, srv} {
		if s == nil {
			continue
		}
		if rst {
			abort(s)
		} else {
			s.Close()
		}
	}
	return true
}

// ended reports whether c was blackholed or closed.
func (c *pconn) ended() bool { return isClosed(c.dead) || isClosed(c.done) }

// wait blocks while forwarding is stalled and, if at is set, until at plus
// the current delay. It returns false when c is dead or closed.
func (p *Proxy) wait(c *pconn, at time.Time) bool {
	delayed := false
	for {
		p.mu.Lock()
		delay, stalled, wake := p.delay, p.stalled, p.wake
		p.mu.Unlock()
		if c.ended() {
			return false
		}
		var fire <-chan time.Time
		var timer *time.Timer
		if !stalled {
			left := time.Duration(0)
			if !at.IsZero() && delay > 0 {
				left = time.Until(at.Add(delay))
			}
			if left <= 0 {
				if delayed || (!at.IsZero() && delay > 0) {
					p.delayed.Add(1) // delayed is only ever set with at
				}
				return true
			}
			delayed = true
			timer = time.NewTimer(left)
			fire = timer.C
		}
		select {
		case <-fire:
		case <-wake:
		case <-c.dead:
		case <-c.done:
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

// reader reads chunks from src into q until EOF, an error or death.
func (p *Proxy) reader(c *pconn, src net.Conn, q chan<- chunk) {
	defer p.wg.Done()
	for {
		if !p.wait(c, time.Time{}) {
			return
		}
		bp := p.pool.Get().(*[]byte)
		n, err := src.Read(*bp)
		if n > 0 {
			select {
			case q <- chunk{buf: (*bp)[:n], at: time.Now()}:
			case <-c.dead:
				return
			case <-c.done:
				return
			}
		} else {
			p.pool.Put(bp)
		}
		if err != nil {
			switch {
			case c.ended():
			case errors.Is(err, io.EOF):
				select {
				case q <- chunk{eof: true, at: time.Now()}:
				case <-c.dead:
				case <-c.done:
				}
			default:
				p.shutdown(c, true)
			}
			return
		}
	}
}

// writer writes the chunks of q to dst, late by the delay, after stalls.
func (p *Proxy) writer(c *pconn, d Dir, dst net.Conn, q <-chan chunk) {
	defer p.wg.Done()
	for {
		var ck chunk
		select {
		case ck = <-q:
		case <-c.dead:
			return
		case <-c.done:
			return
		}
		if !p.wait(c, ck.at) {
			return
		}
		if ck.eof {
			cw, ok := dst.(interface{ CloseWrite() error })
			if !ok || cw.CloseWrite() != nil || c.ends.Add(1) == 2 {
				p.shutdown(c, false)
			}
			return
		}
		p.maybeCorrupt(c, d, ck.buf)
		n, err := dst.Write(ck.buf)
		p.bytes[d].Add(int64(n))
		c.off[d] += int64(n)
		b := ck.buf[:cap(ck.buf)]
		p.pool.Put(&b)
		if err != nil {
			if !c.ended() {
				p.shutdown(c, true)
			}
			return
		}
	}
}

func (p *Proxy) maybeCorrupt(c *pconn, d Dir, buf []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.corrupt[d] > 0:
		p.corrupt[d]--
	case p.corrupt[Any] > 0:
		p.corrupt[Any]--
	default:
		return
	}
	i := rand.IntN(len(buf))
	bit := uint(rand.IntN(8))
	buf[i] ^= 1 << bit
	p.corrupted.Add(1)
	if len(p.log) == maxLog {
		p.log = append(p.log[:0], p.log[1:]...)
	}
	p.log = append(p.log, Corruption{Conn: c.id, Dir: d, Offset: c.off[d] + int64(i), Bit: bit})
}
