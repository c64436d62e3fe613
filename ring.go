package sinc

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/ring"
)

// The ring path (docs/protocol.md §8): a channel's data goes through
// shared memory with the agent instead of the channel socket, behind the
// same Conn. The process writes records into the ring up and reads them
// from the ring down. A side sleeps only when its ring is empty (reading)
// or full (writing), and is woken only then, so a busy channel makes no
// system calls for its data. A Read sleeps on the socket, where the agent
// writes a wake-up record; a Write waiting for room sleeps on a pipe of
// its own, so that it never competes with a Read for the socket. A Write
// wakes the agent with a wake-up record on the socket; a Read that made
// room the agent waits for wakes it through a pipe of the agent's. The
// socket also carries the channel's end: the process's close record
// (Abort), the agent's close record, and end of file.
//
// Read runs under rmu and is the only user of down; Write, CloseWrite and
// the Close's fin run under wmu and are the only users of up. Close takes
// rmu and wmu before it unmaps.

// NoRingEnv, set to 1, makes channels use their socket rather than a
// ring, unless a Dialer or ListenConfig says otherwise.
const NoRingEnv = "SINC_NO_RING"

func ringDefault() bool { return os.Getenv(NoRingEnv) != "1" }

// ringEnd is the process's end of a ring channel.
type ringEnd struct {
	hdr  *hdrPage
	data *ring.Mem

	// read side, under rmu
	down   *ring.Consumer
	cur    bool // a record's header is read
	ctyp   byte
	clen   int
	cgot   int   // payload bytes of it read
	endErr error // the agent ended the channel: why, once what is down is read

	// The deadlines, as Unix nanoseconds (0: none): a call whose deadline
	// passed fails even when the ring would not make it wait, as on a
	// socket.
	rdl, wdl atomic.Int64

	// write side, under wmu
	up        *ring.Producer
	writeWait *ring.Sleeper // the agent made room up
	upEmpty   bool          // the ring up's pages were given back (sweepRings)

	wakeRoom int // pipe: we took from the ring down (written and closed under rmu)
}

// openRing reads the channel's ring record from c and maps the rings.
func openRing(c *net.UnixConn) (*ringEnd, error) {
	offer, fds, err := local.ReadRing(c)
	if err != nil {
		return nil, &Error{Code: ErrProtocol.Code, Message: "the agent's ring offer: " + err.Error()}
	}
	r := &ringEnd{wakeRoom: fds[local.RingFDDownRoom]}
	hdrF := os.NewFile(uintptr(fds[local.RingFDHeader]), "sinc-ring-hdr")
	dataF := os.NewFile(uintptr(fds[local.RingFDData]), "sinc-ring")
	defer hdrF.Close() // mapped, or failed: the memfds are not needed
	defer dataF.Close()
	upRoom := fds[local.RingFDUpRoom]
	fail := func(err error) (*ringEnd, error) {
		if upRoom >= 0 {
			unix.Close(upRoom)
		}
		r.close()
		return nil, &Error{Code: ErrProtocol.Code, Message: "the agent's ring: " + err.Error()}
	}
	if err := ring.CheckSize(offer.Size); err != nil {
		return fail(err)
	}
	if r.hdr, err = mapHeader(hdrF); err != nil {
		return fail(err)
	}
	if offer.Slot < 0 || offer.Slot%ring.HeaderSize != 0 || offer.Slot+ring.HeaderSize > ringPage {
		return fail(fmt.Errorf("header slot at %d", offer.Slot))
	}
	if r.data, err = ring.Map(dataF, 2*offer.Size); err != nil {
		return fail(err)
	}
	hdr := r.hdr.mem.B[offer.Slot : offer.Slot+ring.HeaderSize]
	r.up = ring.NewProducer(hdr, ring.Up, r.data.B[:offer.Size], offer.Gen)
	r.down = ring.NewConsumer(hdr, ring.Down, r.data.B[offer.Size:], local.MaxRecord, offer.Gen)
	r.writeWait, err = ring.NewSleeper(upRoom) // it owns the descriptor, also on failure
	if upRoom = -1; err != nil {
		return fail(err)
	}
	if err := unix.SetNonblock(r.wakeRoom, true); err != nil {
		return fail(os.NewSyscallError("fcntl", err))
	}
	return r, nil
}

// passed reports whether the deadline dl has passed.
func passed(dl *atomic.Int64) bool {
	t := dl.Load()
	return t != 0 && time.Now().UnixNano() >= t
}

// setDeadline sets a ring's deadline and its sleeper's.
func setDeadline(dl *atomic.Int64, s *ring.Sleeper, t time.Time) {
	if t.IsZero() {
		dl.Store(0)
	} else {
		dl.Store(t.UnixNano())
	}
	if s != nil {
		s.SetDeadline(t)
	}
}

// ringPage is the size of the agent's header page.
const ringPage = 4096

// The agent puts the control words of up to eight of a process's ring
// channels in one header page: it is mapped once, however many channels
// use it.
var (
	hdrMu    sync.Mutex
	hdrPages = map[[2]uint64]*hdrPage{}
)

type hdrPage struct {
	key  [2]uint64 // the memfd's device and inode
	mem  *ring.Mem
	refs int
}

// mapHeader maps the header page of f, or takes the mapping the process
// has of it already.
func mapHeader(f *os.File) (*hdrPage, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, os.NewSyscallError("fstat", err)
	}
	key := [2]uint64{st.Dev, st.Ino}
	hdrMu.Lock()
	defer hdrMu.Unlock()
	if p := hdrPages[key]; p != nil {
		p.refs++
		return p, nil
	}
	m, err := ring.Map(f, ringPage)
	if err != nil {
		return nil, err
	}
	p := &hdrPage{key: key, mem: m, refs: 1}
	hdrPages[key] = p
	return p, nil
}

func (p *hdrPage) release() {
	hdrMu.Lock()
	defer hdrMu.Unlock()
	if p.refs--; p.refs == 0 {
		delete(hdrPages, p.key)
		p.mem.Unmap()
	}
}

// close unmaps the rings and closes the pipes; nothing may use them after.
func (r *ringEnd) close() {
	if r.hdr != nil {
		r.hdr.release()
	}
	r.data.Unmap()
	if r.writeWait != nil {
		r.writeWait.Close()
	}
	if r.wakeRoom >= 0 {
		unix.Close(r.wakeRoom)
		r.wakeRoom = -1
	}
}

// agentBroke is the error for a ring the agent left in a state no agent
// would.
func agentBroke(err error) error {
	return &Error{Code: ErrProtocol.Code, Message: "the agent's ring: " + err.Error()}
}

// errRingEnded: the agent gave the channel's slot to another channel: the
// channel ended, and the socket says why.
var errRingEnded = errors.New("ring ended")

// ringErr sorts a ring's error: a slot given again means the channel
// ended; anything else, that the agent broke the ring.
func ringErr(err error) error {
	if errors.Is(err, ring.ErrEnded) {
		return errRingEnded
	}
	return agentBroke(err)
}

// ringNext makes the next record down the current one, waiting for it
// (with the read deadline) on the socket. Once the agent ended the
// channel, what is down is read first, then the reason is returned.
func (c *Conn) ringNext() error {
	r := c.ring
	if passed(&r.rdl) {
		return os.ErrDeadlineExceeded
	}
	for !r.cur {
		n, err := r.down.Avail()
		if err != nil {
			if err = ringErr(err); err != errRingEnded {
				return err
			}
			// The channel ended: what came down before is read first,
			// while the slot is still ours.
			if n, err = r.down.AvailEnded(); err != nil || n == 0 {
				for r.endErr == nil { // the reason is on its way on the socket
					if err := c.socketRecord(); err != nil {
						return err
					}
				}
				return r.endErr
			}
		}
		if n > 0 {
			typ, size, err := r.down.Next()
			if err != nil {
				return agentBroke(err)
			}
			r.cur, r.ctyp, r.clen, r.cgot = true, typ, size, 0
			return nil
		}
		if r.endErr != nil {
			return r.endErr
		}
		wait, err := r.down.Sleep()
		if err != nil && ringErr(err) != errRingEnded {
			return ringErr(err)
		}
		if !wait && err == nil {
			continue
		}
		err = c.socketRecord()
		r.down.Awake()
		if err != nil {
			return err
		}
	}
	return nil
}

// socketRecord reads the next record on the socket of a ring channel: a
// wake-up, or the channel's end — the agent's close record, or end of
// file — which is kept in endErr. It returns a deadline's error, or a
// protocol error; nil otherwise.
func (c *Conn) socketRecord() error {
	if !c.rec {
		if err := c.header(); err != nil {
			var se *Error
			if errors.As(err, &se) && se.Code == ErrAgentGone.Code {
				c.ring.endErr = err
				return nil
			}
			return err
		}
	}
	switch c.rtyp {
	case local.RecWake:
		c.rec = false
		return nil
	case local.RecClose:
		err := c.control()
		if isDeadline(err) {
			return err
		}
		c.ring.endErr = err
		return nil
	}
	return &Error{Code: ErrProtocol.Code, Message: "the agent sent a data or fin record on the socket of a ring channel"}
}

// ringConsume ends the current record and gives its room back.
func (c *Conn) ringConsume() {
	r := c.ring
	r.down.Skip(ring.RecordHeaderLen + r.clen)
	r.cur = false
	if wake, _ := r.down.Release(); wake {
		ring.WakeFD(r.wakeRoom) // an agent that closed its end learns nothing more
	}
}

// ringReadStream reads bytes of the current data record down.
func (c *Conn) ringReadStream(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r := c.ring
	for {
		if err := c.ringNext(); err != nil {
			return 0, err
		}
		switch r.ctyp {
		case local.RecFin:
			c.ringConsume()
			return 0, io.EOF
		case local.RecData:
		default:
			return 0, &Error{Code: ErrProtocol.Code, Message: fmt.Sprintf("bad record from the agent: type %d in its ring", r.ctyp)}
		}
		if r.cgot < r.clen {
			break
		}
		c.ringConsume() // an empty data record
	}
	n := min(len(p), r.clen-r.cgot)
	r.down.Read(p[:n], r.cgot)
	if r.cgot += n; r.cgot == r.clen {
		c.ringConsume()
	}
	return n, nil
}

// ringReadMessage reads one message down into p (Read), or into a new
// slice (ReadMessage: alloc).
func (c *Conn) ringReadMessage(p []byte, alloc bool) (int, []byte, error) {
	r := c.ring
	if err := c.ringNext(); err != nil {
		return 0, nil, err
	}
	switch r.ctyp {
	case local.RecFin:
		c.ringConsume()
		return 0, nil, io.EOF
	case local.RecData:
	default:
		return 0, nil, &Error{Code: ErrProtocol.Code, Message: fmt.Sprintf("bad record from the agent: type %d in its ring", r.ctyp)}
	}
	if alloc {
		m := make([]byte, r.clen)
		r.down.Read(m, 0)
		c.ringConsume()
		return len(m), m, nil
	}
	if r.clen > len(p) {
		c.ringConsume()
		return 0, nil, errTooLong
	}
	n := r.clen
	r.down.Read(p[:n], 0)
	c.ringConsume()
	return n, nil, nil
}

// errAgentClosed: the agent closed its end of the ring while a Write
// waited; a Read returns the reason.
var errAgentClosed = fmt.Errorf("the agent closed the channel's ring: %w", syscall.EPIPE)

// ringRoom waits until the ring up has room for n bytes (with the write
// deadline).
func (c *Conn) ringRoom(n int) error {
	r := c.ring
	if passed(&r.wdl) {
		return os.ErrDeadlineExceeded
	}
	for {
		free, err := r.up.Free()
		if err != nil {
			return ringWriteErr(err)
		}
		if free >= n {
			return nil
		}
		wait, err := r.up.WaitRoom(n)
		if err != nil {
			return ringWriteErr(err)
		}
		if !wait {
			continue
		}
		switch err := r.writeWait.Wait(); {
		case err == io.EOF:
			return errAgentClosed
		case err != nil:
			return err // a deadline, or closed
		}
	}
}

// ringWrite puts one record up, waiting for room, and publishes it. A
// record is either all up or not at all: a deadline never cuts one.
func (c *Conn) ringWrite(typ byte, p []byte) error {
	r := c.ring
	if err := c.ringRoom(ring.RecordHeaderLen + len(p)); err != nil {
		return err
	}
	r.up.Put(typ, p)
	r.upEmpty = false
	wake, err := r.up.Publish()
	if err != nil {
		return ringWriteErr(err)
	}
	if wake && !local.SendWake(c.c) {
		return errAgentClosed
	}
	return nil
}

// ringWriteErr names a ring's error on the write side.
func ringWriteErr(err error) error {
	if errors.Is(err, ring.ErrEnded) {
		return errAgentClosed
	}
	return agentBroke(err)
}

// ringFinish puts the last record up before Close or Abort: a fin (if
// none went yet), waiting at most closeFlushWait for room, or not at all
// if Close interrupted a Write. An Abort's close record goes on the
// socket, where the agent looks when the ring is empty or it is woken.
func (c *Conn) ringFinish(interrupted bool, typ byte, payload []byte) {
	r := c.ring
	if c.werr != nil {
		return
	}
	if typ == local.RecClose {
		local.PutRecordHeader(c.hdr[:], typ, len(payload))
		c.c.SetWriteDeadline(time.Now().Add(closeFlushWait))
		c.c.Write(append(c.hdr[:], payload...))
		return
	}
	if c.wdone {
		return
	}
	if interrupted {
		// Once, without waiting: the agent is likely not taking.
		if free, err := r.up.Free(); err == nil && free >= ring.RecordHeaderLen {
			r.up.Put(local.RecFin)
			if wake, err := r.up.Publish(); err == nil && wake {
				local.SendWake(c.c)
			}
			c.wdone = true
		}
		return
	}
	setDeadline(&r.wdl, r.writeWait, time.Now().Add(closeFlushWait))
	if c.ringWrite(local.RecFin, nil) == nil {
		c.wdone = true
	}
}

// An idle ring holds no memory: every ringSweep, the pages of a ring up
// that the agent has taken everything from are given back (the agent does
// the same for the ring down). Only the writer may do it, and only while
// no Write runs — a Write could be copying into them — so a sweeper
// goroutine, running while the process has ring channels, takes each
// Conn's write lock without waiting, and skips a Conn whose lock is held.

var ringSweep = time.Second

var sweeper struct {
	mu    sync.Mutex
	conns map[*Conn]struct{}
	stop  chan struct{} // closed to stop the running sweeper
}

func trackRing(c *Conn) {
	sweeper.mu.Lock()
	defer sweeper.mu.Unlock()
	if sweeper.conns == nil {
		sweeper.conns = map[*Conn]struct{}{}
	}
	sweeper.conns[c] = struct{}{}
	if sweeper.stop == nil {
		sweeper.stop = make(chan struct{})
		go sweepRings(sweeper.stop)
	}
}

func untrackRing(c *Conn) {
	sweeper.mu.Lock()
	defer sweeper.mu.Unlock()
	delete(sweeper.conns, c)
	if len(sweeper.conns) == 0 && sweeper.stop != nil {
		close(sweeper.stop)
		sweeper.stop = nil
	}
}

func sweepRings(stop chan struct{}) {
	t := time.NewTicker(ringSweep)
	defer t.Stop()
	var conns []*Conn
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		sweeper.mu.Lock()
		conns = conns[:0]
		for c := range sweeper.conns {
			conns = append(conns, c)
		}
		sweeper.mu.Unlock()
		for _, c := range conns {
			c.sweepRing()
		}
		clear(conns)
	}
}

// sweepRing gives back the pages of the ring up if the agent took
// everything in it.
func (c *Conn) sweepRing() {
	if !c.wmu.TryLock() {
		return // a Write runs: the ring is busy
	}
	defer c.wmu.Unlock()
	r := c.ring
	if c.closing.Load() || r.upEmpty || !r.up.Idle() {
		return
	}
	if ring.Release(r.data.B[:r.up.Size()]) == nil {
		r.upEmpty = true
	}
}
