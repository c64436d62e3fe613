package agent

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/ident"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/ring"
	"sinc.dev/sinc/internal/wire"
)

// The ring path (docs/protocol.md §8). A process that asks for it moves a
// channel's data through shared memory instead of the channel socket: a
// ring up (process to agent) and a ring down, in a memfd both map. The
// socket stays for what is not data: the process's wake-ups for the ring
// up and its close record, the agent's wake-ups for the ring down and its
// close record, and either side's end. Each waiter that is not the
// socket's reader has a pipe of its own: a process writer waiting for room
// up, and the agent's queue waiting for room down.
//
// The ring is hostile memory (see package ring): the agent reads each of
// the process's indices and record headers once, into private memory, and
// checks them; what it decrypts it opens into private memory and only then
// copies down; what it seals it first copies up out of the ring. A
// process that breaks the ring gets protocol on its own channel.
//
// Who does what:
//   - the outbound pump (ringOutbound) alone reads the ring up, under
//     ringMu, held only around the memory's use, never while waiting; it
//     alone reads the socket too: when the ring is empty it sleeps on the
//     socket for a while, then hands the socket to the poller and ends;
//     the poller starts a pump again when the socket is readable;
//   - the ring down is written under rmu, straight from the receive step
//     (flushDown), never waiting: what does not fit waits in the queue,
//     and the poller watches the room pipe (ringRoom).
// The memory is unmapped once the channel ended, under both locks.

// downBatch is one flushDown's records in the ring down: they end at
// position end, and hold n payload bytes.
type downBatch struct {
	end uint64
	n   int64
}

// chanRing is a channel's ring end in the agent.
type chanRing struct {
	slot *hdrSlot
	data *ring.Mem
	size int

	up        *ring.Consumer // outbound pump, under ringMu
	upTouched bool           // under ringMu: we read the ring up since dropUp
	lens      []int          // outbound pump: the lengths of the records it packs
	stalled   *time.Timer    // outbound pump: drops the ring up's pages while waiting long for credit
	upRoom    int            // pipe: we made room up (written under ringMu)
	downRoom  int            // pipe: the process made room down (read under rmu)

	down      *ring.Producer // under rmu
	downEmpty bool           // under rmu: the ring down's pages were given back
	ringHeld  int64          // under rmu: of ch.held, the payload bytes down and not yet taken
	batches   []downBatch    // under rmu: what was put down, in order, until taken
	finPut    bool           // under rmu: the peer's fin is down (finDone once taken)
	doneDue   bool           // under rmu: finDone was just set; checkDone is due
	ackDue    bool           // under rmu: credit is due to the peer (sendAck)

	gone    bool        // under ringMu and rmu: the memory is unmapped
	sockEOF atomic.Bool // the process closed its socket (or died)
	procFDs []int       // the process's descriptors until offered (under ringMu)
	sockHdr [local.RecordHeaderLen]byte
	sockN   int // bytes of a record header read so far (outbound pump)

	fds     bool       // it holds a reservation of descriptors (ringSlots.reserve)
	slotsOf *ringSlots // where

	closeSize int    // a close record's payload size (sockRead)
	closeHead []byte // and what of it came with its header
}

// attachRing gives a dialed channel, in the tables already, its rings
// before it starts; on failure it keeps the socket path. A channel that
// ended meanwhile gets none.
func (ch *channel) attachRing() {
	r, err := ch.a.makeRing(ch.owner)
	if err != nil {
		ch.a.log.Warn("cannot make a channel's ring: it uses its socket", "conn", ch.id, "err", err)
		return
	}
	ch.ringMu.Lock()
	ch.rmu.Lock()
	ended := ch.ended.Load()
	if !ended {
		ch.ring = r
	}
	ch.rmu.Unlock()
	ch.ringMu.Unlock()
	if ended {
		r.close()
	}
}

// makeRing makes a channel's rings, with the descriptors the process is
// to get (procFDs, until offer sends them).
func (a *Agent) makeRing(owner *procRef) (*chanRing, error) {
	// A ring channel holds ringFDs descriptors where a socket channel
	// holds one; rings take at most half of RLIMIT_NOFILE, so that an
	// agent with many channels gives the rest the socket path rather
	// than running out of descriptors.
	if !a.ringSlots.reserve() {
		a.counters.refuse("ring_no_descriptors")
		return nil, errors.New("rings hold half of the descriptors the agent may open")
	}
	size := a.cfg.Limits.Ring
	r := &chanRing{size: size, upRoom: -1, downRoom: -1, fds: true, slotsOf: &a.ringSlots}
	var fds []int
	fail := func(err error) (*chanRing, error) {
		if outOfFDs(err) {
			a.noteOutOfFDs()
		}
		closeFDs(fds)
		r.close()
		return nil, err
	}
	slot, hdrFD, err := a.ringSlots.alloc(owner.key)
	if err != nil {
		return fail(err)
	}
	r.slot = slot
	fds = append(fds, hdrFD)
	mem, f, err := ring.Create("sinc-ring", 2*size)
	if err != nil {
		return fail(err)
	}
	r.data = mem
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	f.Close()
	if err != nil {
		return fail(os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", err))
	}
	fds = append(fds, fd)
	rd, wr, err := ring.NewPipe() // up room: the process waits
	if err != nil {
		return fail(err)
	}
	fds = append(fds, rd)
	r.upRoom = wr
	rd, wr, err = ring.NewPipe() // down room: we wait
	if err != nil {
		return fail(err)
	}
	fds = append(fds, wr)
	r.downRoom = rd
	hdr := slot.bytes()
	ring.Init(hdr, slot.gen)
	r.up = ring.NewConsumer(hdr, ring.Up, mem.B[:size], local.MaxRecord, slot.gen)
	r.down = ring.NewProducer(hdr, ring.Down, mem.B[size:], slot.gen)
	r.downEmpty = true
	r.procFDs = fds
	return r, nil
}

// offerRing sends the ring record, with the process's descriptors, on
// the channel socket: the first thing on it after the open's answer.
func (ch *channel) offerRing() error {
	ch.ringMu.Lock()
	defer ch.ringMu.Unlock()
	r := ch.ring
	if r.gone {
		return errEnded
	}
	fds := r.procFDs
	r.procFDs = nil
	defer closeFDs(fds)
	b, _ := json.Marshal(local.RingOffer{Size: r.size, Slot: r.slot.off, Gen: r.slot.gen})
	rec := make([]byte, local.RecordHeaderLen+len(b))
	local.PutRecordHeader(rec, local.RecRing, len(b))
	copy(rec[local.RecordHeaderLen:], b)
	ch.sock.SetWriteDeadline(time.Now().Add(time.Second))
	defer ch.sock.SetWriteDeadline(time.Time{})
	n, _, err := ch.sock.WriteMsgUnix(rec, unix.UnixRights(fds...), nil)
	if err == nil && n < len(rec) {
		_, err = ch.sock.Write(rec[n:])
	}
	return err
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// close lets go of everything the ring holds. The caller made sure no
// one uses its memory (gone, under both locks).
func (r *chanRing) close() {
	if r == nil {
		return
	}
	if r.fds {
		r.fds = false
		r.slotsOf.unreserve()
	}
	closeFDs(r.procFDs)
	r.procFDs = nil
	if r.data != nil {
		r.data.Unmap()
	}
	if r.slot != nil {
		r.slot.free()
	}
	for _, fd := range []int{r.upRoom, r.downRoom} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// closeRing ends the channel's ring: a writer waiting for room reads end
// of file, and the memory goes once no pump uses it.
func (ch *channel) closeRing() {
	ch.ringMu.Lock()
	ch.rmu.Lock()
	r := ch.ring
	gone := r == nil || r.gone
	if r != nil {
		r.gone = true
	}
	ch.rmu.Unlock()
	ch.ringMu.Unlock()
	if !gone {
		r.close()
	}
}

// ringCorrupt ends the channel for a ring the process broke.
func (ch *channel) ringCorrupt(err error) {
	ch.a.counters.malformed.Add(1)
	ch.a.log.Info("process broke its channel's ring", "conn", ch.id, "pid", ch.owner.pid, "err", err)
	ch.abortTelling(wire.CodeProtocol, "bad ring from this process: "+err.Error(),
		"the remote process broke the protocol (a bad ring)")
}

// startRing starts a ring channel: the pump sleeps from the start, so the
// process's first record comes with a wake-up, and the poller starts a
// pump for it (a pump now if records are up already).
func (ch *channel) startRing() {
	r := ch.ring
	ch.ringMu.Lock()
	wait, err := false, error(nil)
	if !r.gone {
		wait, err = r.up.Sleep()
	}
	ch.ringMu.Unlock()
	if err != nil || !wait || ch.a.poller.arm(ch) != nil {
		ch.a.goRun(ch.ringOutbound)
	}
}

// takeDone reports, once, that finDone was set under rmu and checkDone is
// due (off rmu). Called under rmu.
func (ch *channel) takeDone() bool {
	due := ch.ring.doneDue
	ch.ring.doneDue = false
	return due
}

// Results of sockRead.
const (
	sockNothing = iota // nothing to read
	sockWake           // wake-ups
	sockEnded          // the channel ended (a bad record), or the pump is to stop
	sockEOF            // the process closed its socket
	sockClose          // a close record: its size and what came of it are in closeSize, closeHead
)

// sockRead reads, without waiting, what the process said on the socket:
// wake-ups, a close record (abort), or its end. Outbound pump only.
func (ch *channel) sockRead(fd uintptr) int {
	r := ch.ring
	var buf [256]byte
	got := sockNothing
	// A bounded number of reads: a process that keeps writing wake-ups
	// does not hold the pump here.
	for range 8 {
		n, err := unix.Read(int(fd), buf[:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return got
		case err != nil || n == 0:
			r.sockEOF.Store(true)
			if r.sockN > 0 {
				ch.readEnd(io.ErrUnexpectedEOF, false)
				return sockEnded
			}
			return sockEOF
		}
		for b := buf[:n]; len(b) > 0; {
			k := copy(r.sockHdr[r.sockN:], b)
			r.sockN += k
			b = b[k:]
			if r.sockN < len(r.sockHdr) {
				break
			}
			r.sockN = 0
			typ, size, err := local.ParseRecordHeader(r.sockHdr[:])
			switch {
			case err != nil:
				ch.abortTelling(wire.CodeProtocol, "bad record from this process: "+err.Error(),
					"the remote process broke the protocol (a bad record)")
				return sockEnded
			case typ == local.RecWake:
				got = sockWake
			case typ == local.RecClose:
				// Its payload may not all be here: it is read once the
				// socket's read lock, which this runs under, is free.
				r.closeSize, r.closeHead = size, append([]byte(nil), b[:min(len(b), size)]...)
				return sockClose
			default:
				ch.abortTelling(wire.CodeProtocol, "bad record from this process: a data or fin record on the socket of a ring channel",
					"the remote process broke the protocol (a bad record)")
				return sockEnded
			}
		}
	}
	return got
}

// sockWait waits for the socket, at most pumpLinger, and reads it.
func (ch *channel) sockWait() int {
	rc, err := ch.sock.SyscallConn()
	if err != nil {
		return sockEnded
	}
	got := sockNothing
	ch.sock.SetReadDeadline(time.Now().Add(pumpLinger))
	err = rc.Read(func(fd uintptr) bool {
		got = ch.sockRead(fd)
		return got != sockNothing
	})
	ch.sock.SetReadDeadline(time.Time{})
	if got == sockClose {
		ch.sock.SetReadDeadline(time.Now().Add(time.Second))
		ch.processAborts(io.MultiReader(bytes.NewReader(ch.ring.closeHead), ch.sock), ch.ring.closeSize)
		return sockEnded
	}
	if err != nil && got == sockNothing && !errors.Is(err, os.ErrDeadlineExceeded) {
		return sockEnded // closed: the channel ended
	}
	return got
}

// ringOutbound is the outbound pump of a ring channel: it takes the
// process's records from the ring up, packs them into frames as credit
// allows, and sends them. With nothing to send it sleeps on the socket a
// while, then hands the socket to the poller and ends.
func (ch *channel) ringOutbound() {
	r := ch.ring
	for {
		if ch.ended.Load() {
			return
		}
		ch.ringMu.Lock()
		if r.gone {
			ch.ringMu.Unlock()
			return
		}
		eof := r.sockEOF.Load() // before the look: what was up before the end is seen
		n, err := r.up.Avail()
		ch.ringMu.Unlock()
		if err != nil {
			ch.ringCorrupt(err)
			return
		}
		if n > 0 {
			if !ch.ringRecord() {
				return
			}
			continue
		}
		if eof {
			ch.ringEnd()
			return
		}
		ch.ringMu.Lock()
		wait := false
		if !r.gone {
			wait, err = r.up.Sleep()
		}
		ch.ringMu.Unlock()
		if err != nil {
			ch.ringCorrupt(err)
			return
		}
		if !wait {
			continue
		}
		switch ch.sockWait() {
		case sockEnded:
			return
		case sockNothing:
			// Idle: the sleeping flag stays raised, so the process's
			// next record comes with a wake-up, and the poller starts a
			// pump for it.
			if ch.a.poller.arm(ch) != nil {
				ch.a.log.Error("cannot watch a ring channel's socket", "conn", ch.id)
			}
			return
		}
		ch.ringMu.Lock()
		if !r.gone {
			r.up.Awake()
		}
		ch.ringMu.Unlock()
	}
}

// ringEnd handles the process's end of a ring channel, everything it put
// up taken: after its fin, a clean end; without one, a reset.
func (ch *channel) ringEnd() {
	if ch.finOut.Load() {
		ch.rmu.Lock()
		if !ch.ring.gone {
			ch.undeliverable() // what waits for it now cannot be delivered
		}
		ch.takeDone()
		ch.rmu.Unlock()
		ch.checkDone()
		return
	}
	ch.abortTelling(wire.CodeReset, "this process closed its socket without a fin",
		"the remote process closed its socket without a fin (it may have crashed): what it sent may be truncated")
}

// ringRecord takes the next record from the ring up (Avail saw it
// published). It reports false when the pump is to stop.
func (ch *channel) ringRecord() bool {
	r := ch.ring
	ch.ringMu.Lock()
	if r.gone {
		ch.ringMu.Unlock()
		return false
	}
	typ, n, err := r.up.Next()
	ch.ringMu.Unlock()
	if err != nil {
		ch.ringCorrupt(err)
		return false
	}
	if ch.finOut.Load() {
		ch.abortTelling(wire.CodeProtocol, "this process sent after its fin",
			"the remote process broke the protocol (it sent after its fin)")
		return false
	}
	switch {
	case typ == local.RecFin && n == 0:
		ch.ringSkip(ring.RecordHeaderLen)
		ch.sendFin()
		// With both fins, the peer's may be taken already.
		ch.rmu.Lock()
		if r.finPut && !r.gone {
			ch.finTaken()
		}
		ch.takeDone()
		ch.rmu.Unlock()
		ch.checkDone()
		return !ch.ended.Load()
	case typ != local.RecData:
		ch.abortTelling(wire.CodeProtocol, "bad record from this process: a record of type "+strconv.Itoa(int(typ))+" in its ring",
			"the remote process broke the protocol (a bad record)")
		return false
	case n == 0 && ch.kind == wire.Stream:
		ch.ringSkip(ring.RecordHeaderLen)
		return true
	}
	frame, recs, err := ch.ringPack(n)
	if err != nil {
		return false // the channel ended
	}
	if err := ch.send(frame, len(frame)-wire.DataHeaderLen-wire.TagLen, 0); err != nil {
		return false
	}
	ch.recsOut.Add(uint64(recs))
	return true
}

// ringSkip consumes n bytes of the ring up and gives the room back.
func (ch *channel) ringSkip(n int) {
	r := ch.ring
	ch.ringMu.Lock()
	if r.gone {
		ch.ringMu.Unlock()
		return
	}
	r.up.Skip(n)
	wake, err := r.up.Release()
	if wake {
		ring.WakeFD(r.upRoom) // a process that closed its end learns nothing more
	}
	ch.ringMu.Unlock()
	if err != nil {
		ch.ringCorrupt(err)
	}
}

// ringPack takes a data record of n payload bytes (checked by Next), and
// the data records published behind it while they fit one frame and the
// credit and budget allow, out of the ring into a frame (its header not
// yet filled), with the number of records.
func (ch *channel) ringPack(n int) ([]byte, int, error) {
	r := ch.ring
	prefix := 0
	if ch.kind == wire.Message {
		prefix = wire.MessageLenSize
	}
	short := ch.creditLeft() < uint64(prefix+n)
	if short {
		// Waiting for the peer: if it takes a while, the ring's pages
		// need not count as ours meanwhile.
		if r.stalled == nil {
			r.stalled = time.AfterFunc(stallDrop, ch.dropUp)
		} else {
			r.stalled.Reset(stallDrop)
		}
	}
	ok := ch.waitCredit(prefix + n)
	if short {
		r.stalled.Stop()
	}
	if !ok {
		return nil, 0, errEnded
	}
	size := wire.MaxPayload
	if n >= packDirect {
		size = prefix + n
	}
	frame := getFrame(size)
	p := frame[wire.DataHeaderLen:wire.DataHeaderLen]
	ch.ringMu.Lock()
	if r.gone {
		ch.ringMu.Unlock()
		putFrame(frame)
		return nil, 0, errEnded
	}
	put := func(n int) {
		if prefix > 0 {
			p = binary.BigEndian.AppendUint32(p, uint32(n))
		}
		p = p[:len(p)+n]
		r.up.Read(p[len(p)-n:], 0)
		r.up.Skip(ring.RecordHeaderLen + n)
	}
	put(n)
	r.upTouched = true
	data, recs := n, 1
	if n < packDirect {
		// Then the data records published behind it, while they fit the
		// frame and the credit: their lengths read once into private
		// memory, their credit and budget taken at once, then copied.
		credit := ch.creditLeft()
		lens, off, taken := r.lens[:0], 0, 0
		for off+ring.RecordHeaderLen <= r.up.Buffered() {
			typ, n2, err := r.up.NextAt(off)
			if err != nil || typ != local.RecData || (n2 == 0 && prefix == 0) ||
				len(p)+taken+prefix+n2 > packTarget || uint64(taken+prefix+n2) > credit {
				break // the pump reads it next, and ends the channel if it is bad
			}
			lens = append(lens, n2)
			taken += prefix + n2
			off += ring.RecordHeaderLen + n2
		}
		if taken > 0 && !ch.takeCredit(taken) {
			lens = lens[:0] // no budget for more: the next frame takes them
		}
		for _, n2 := range lens {
			put(n2)
			data += n2
		}
		recs += len(lens)
		r.lens = lens
	}
	wake, err := r.up.Release()
	if wake {
		ring.WakeFD(r.upRoom)
	}
	ch.ringMu.Unlock()
	if err != nil {
		putFrame(frame)
		ch.ringCorrupt(err)
		return nil, 0, errEnded
	}
	ch.bytesOut.Add(uint64(data))
	ch.owner.part.bytesOut.Add(uint64(data))
	if len(p) > smallFrame || cap(frame) != wire.MaxDataFrame {
		return frame[:wire.DataHeaderLen+len(p)+wire.TagLen], recs, nil
	}
	small := getFrame(len(p))
	copy(small[wire.DataHeaderLen:], p)
	putFrame(frame)
	return small, recs, nil
}

// flushDown writes what waits in the queue into the ring down, as far as
// it has room, and wakes the process if it sleeps. What does not fit
// waits for the process's wake-up. It never waits. Called under rmu.
func (ch *channel) flushDown() {
	r := ch.ring
	if r.gone || !ch.deliver {
		return
	}
	if r.sockEOF.Load() {
		ch.undeliverable()
		return
	}
	if r.finPut || len(ch.inq) == 0 {
		// Nothing to put: what the process took is released.
		if r.ringHeld > 0 {
			if _, err := r.down.Free(); err == nil {
				ch.releaseTaken()
			}
		}
		if r.finPut {
			ch.finTaken()
		}
		return
	}
	free, err := r.down.Free()
	if err != nil {
		ch.a.goRun(func() { ch.ringCorrupt(err) })
		return
	}
	ch.releaseTaken()
	payload, held, done, fin := 0, 0, 0, false
	var hdr [local.RecordHeaderLen]byte
	for _, it := range ch.inq {
		need := len(it.data)
		switch {
		case it.fin:
			need = ring.RecordHeaderLen
		case ch.kind == wire.Stream:
			need += ring.RecordHeaderLen
		}
		if need > free {
			// Waiting for room: the process's wake-up brings us back.
			wait, err := r.down.WaitRoom(need)
			if err != nil {
				ch.a.goRun(func() { ch.ringCorrupt(err) })
				return
			}
			if wait {
				ch.armRoom()
				break
			}
			free, _ = r.down.Free()
		}
		switch {
		case it.fin:
			r.down.Put(local.RecFin)
			fin = true
		case ch.kind == wire.Message: // the payload is the records
			r.down.PutRaw(it.data)
		default:
			local.PutRecordHeader(hdr[:], local.RecData, len(it.data))
			r.down.PutRaw(hdr[:])
			r.down.PutRaw(it.data)
		}
		r.downEmpty = false
		free -= need
		payload += it.n
		held += it.held
		done++
		putDataBuf(it.data)
		ch.countIn(it.n, it.recs)
	}
	rest := copy(ch.inq, ch.inq[done:])
	clear(ch.inq[rest:])
	ch.inq = ch.inq[:rest]
	if done == 0 {
		return
	}
	wake, err := r.down.Publish()
	if err != nil {
		ch.a.goRun(func() { ch.ringCorrupt(err) })
		return
	}
	if wake && !local.SendWake(ch.sock) {
		ch.undeliverable() // the process closed its socket
		return
	}
	// The budget keeps them, and the peer gets credit for them, once the
	// process takes them (releaseTaken): flow control runs from the
	// process's reading, as it does through a socket, where the kernel's
	// buffer is what the ring is here.
	r.ringHeld += int64(held)
	r.batches = append(r.batches, downBatch{end: r.down.Head(), n: int64(payload)})
	ch.askTaken()
	if fin {
		r.finPut = true
		ch.finTaken()
	}
}

// releaseTaken gives the budget back for what the process took from the
// ring down since the last look (Free): what sits in the ring is the
// agent's memory, and counts as the queue does. Called under rmu.
func (ch *channel) releaseTaken() {
	ch.releaseBatches()
	if ch.ring.ringHeld > 0 {
		// The process may have taken part of a batch, and lowered the
		// flag as it did: ask again.
		ch.askTaken()
	}
}

// releaseBatches gives back the budget of the batches the process has
// taken (as last seen), counts them delivered, and reports whether there
// were any. Called under rmu.
func (ch *channel) releaseBatches() bool {
	r := ch.ring
	var n int64
	i := 0
	for ; i < len(r.batches) && r.down.Taken(r.batches[i].end); i++ {
		n += r.batches[i].n
	}
	if i == 0 {
		return false
	}
	r.batches = r.batches[:copy(r.batches, r.batches[i:])]
	n = min(n, r.ringHeld)
	r.ringHeld -= n
	ch.held -= n
	ch.bud.release(n)
	if n > 0 && ch.delivered(uint64(n)) {
		r.ackDue = true
	}
	return true
}

// askTaken asks the process to wake us when it takes from the ring down
// (its next consumption, through the room pipe), so that the budget and
// the credit it frees are not left waiting, once the peer is short of
// credit; what it took before the question is released at once. Called
// under rmu.
func (ch *channel) askTaken() {
	r := ch.ring
	if ch.granted-ch.received >= minWindow {
		// The peer can still send a frame of the largest size, and its
		// next frame brings us back here (receive): no wake-up needed.
		return
	}
	wait, err := r.down.WaitRoom(r.size)
	if err != nil {
		ch.a.goRun(func() { ch.ringCorrupt(err) })
		return
	}
	ch.releaseBatches()
	if wait {
		ch.armRoom()
	}
}

// ackDueTaken reports, once, that credit is due to the peer after
// releaseTaken (sendAck, off rmu). Called under rmu.
func (ch *channel) ackDueTaken() bool {
	r := ch.ring
	due := r.ackDue
	r.ackDue = false
	return due
}

// finTaken ends the channel's down direction once the process has taken
// everything down, the peer's fin last: until then the slot's words are
// the process's to read (a slot is given again once the channel ends).
// It looks again when the process sends its fin (ringRecord), ends
// (ringEnd), wakes us for room, and at the sweep: a process that took the
// fin and keeps its end open has its channel ended within a sweep, without
// a wake-up of its own for every graceful end. Called under rmu; it sets
// doneDue.
func (ch *channel) finTaken() {
	r := ch.ring
	if !ch.finDone.Load() && r.down.Idle() {
		ch.finDone.Store(true)
		r.doneDue = true
	}
}

// armRoom asks the poller to run ringRoom when the process made room
// down. Called under rmu.
func (ch *channel) armRoom() {
	if err := ch.a.poller.armRoom(ch); err != nil {
		ch.a.log.Error("cannot wait for room in a ring", "conn", ch.id, "err", err)
	}
}

// ringRoom runs when the process made room down.
func (ch *channel) ringRoom() {
	ch.rmu.Lock()
	if ch.ring.gone {
		ch.rmu.Unlock()
		return
	}
	if eof, _ := ring.DrainFD(ch.ring.downRoom); eof {
		ch.ring.sockEOF.Store(true) // the process closed its end
	}
	ch.flushDown()
	done, ack := ch.takeDone(), ch.ackDueTaken()
	ch.rmu.Unlock()
	if ack {
		ch.sendAck(false)
	}
	if done {
		ch.checkDone()
	}
}

// undeliverable ends a channel whose process closed its end while
// something waits for it: as on the socket path, a reset, unless all that
// waits is the peer's fin after the process's own (a clean end). Called
// under rmu.
func (ch *channel) undeliverable() {
	r := ch.ring
	if ch.finDone.Load() {
		return
	}
	if _, err := r.down.Free(); err == nil {
		ch.releaseBatches()
	}
	data := r.ringHeld > 0 // down, and not taken
	for _, it := range ch.inq {
		data = data || !it.fin
	}
	fin := r.finPut || len(ch.inq) > 0 // the peer's fin (only a fin waits, or none)
	switch {
	case data:
		ch.a.goRun(func() {
			ch.abortTelling(wire.CodeReset, "this process closed the channel before reading all of it",
				"the remote process closed the channel before reading all of it")
		})
	case !fin:
		// Nothing waits: nothing is lost yet.
	case r.finPut && r.down.Idle() || ch.finOut.Load():
		// It took everything, the peer's fin last; or all it left is
		// the peer's fin, after its own: that direction ended cleanly.
		ch.inq = ch.inq[:0]
		ch.finDone.Store(true)
		r.doneDue = true
	default:
		// Only the peer's fin waits: whether the process ended with a
		// fin, the pump finds out as it takes the rest of the ring up,
		// and asks again (ringEnd).
	}
}

// stallDrop is how long the outbound pump waits for credit before it lets
// go of its mapping of the ring up's pages (dropUp).
const stallDrop = 20 * time.Millisecond

// dropUp lets go of our mapping of the ring up's pages: they are the
// process's (it writes them first, and its memory counts them), and stay
// as they are; we map them again as we read. So a channel waiting for its
// peer, or idle, does not hold a ring's worth of the process's pages in
// the agent.
func (ch *channel) dropUp() {
	ch.ringMu.Lock()
	defer ch.ringMu.Unlock()
	if r := ch.ring; r != nil && !r.gone && r.upTouched {
		unix.Madvise(r.data.B[:r.size], unix.MADV_DONTNEED)
		r.upTouched = false
	}
}

// sweepRing gives back the pages of an idle ring down: everything put
// there was taken. Called under rmu.
func (ch *channel) sweepRing() {
	r := ch.ring
	if r.gone {
		return
	}
	if _, err := r.down.Free(); err == nil {
		ch.releaseTaken()
	}
	if r.finPut && ch.finOut.Load() {
		ch.finTaken()
	}
	if r.downEmpty || len(ch.inq) > 0 || !r.down.Idle() {
		return
	}
	if ring.Release(r.data.B[r.size:]) == nil {
		r.downEmpty = true
	}
}

// Header slots: a channel's control words take ring.HeaderSize bytes, so
// the channels of one process share header pages (each a sealed memfd
// of its own, never shared between processes): an idle ring channel
// holds an eighth of a page of shared memory, not a page.

type ringSlots struct {
	mu    sync.Mutex
	pages map[ident.Key][]*hdrPage // the pages of each process with ring channels

	fds    int64 // descriptors reserved by ring channels
	fdsMax int64 // at most: half of RLIMIT_NOFILE (0: not read yet)
}

// ringFDs is what a ring channel holds beyond its socket: two pipe ends,
// and a share of a header page's memfd (counted whole).
const ringFDs = 3

// reserve takes ringFDs descriptors for a ring channel, if rings hold
// less than half of the agent's RLIMIT_NOFILE.
func (s *ringSlots) reserve() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fdsMax == 0 {
		var lim unix.Rlimit
		s.fdsMax = 512
		if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) == nil && lim.Cur > 0 {
			s.fdsMax = int64(min(lim.Cur, 1<<30) / 2)
		}
	}
	if s.fds+ringFDs > s.fdsMax {
		return false
	}
	s.fds += ringFDs
	return true
}

func (s *ringSlots) unreserve() {
	s.mu.Lock()
	s.fds -= ringFDs
	s.mu.Unlock()
}

type hdrPage struct {
	s    *ringSlots
	key  ident.Key
	mem  *ring.Mem
	f    *os.File // the memfd, handed to the process with each channel
	used [slotsPerPage]bool
	gens [slotsPerPage]uint16
	n    int
}

type hdrSlot struct {
	p   *hdrPage
	off int
	gen uint16 // the slot's generation: one more each time it is given
}

const pageSize = 4096
const slotsPerPage = pageSize / ring.HeaderSize

func (s *hdrSlot) bytes() []byte { return s.p.mem.B[s.off : s.off+ring.HeaderSize] }

// alloc takes a free header slot in one of the process's pages, and
// returns it with a duplicate of its page's memfd for the process.
func (s *ringSlots) alloc(key ident.Key) (*hdrSlot, int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pages == nil {
		s.pages = map[ident.Key][]*hdrPage{}
	}
	var page *hdrPage
	for _, p := range s.pages[key] {
		if p.n < slotsPerPage {
			page = p
			break
		}
	}
	if page == nil {
		mem, f, err := ring.Create("sinc-ring-hdr", pageSize)
		if err != nil {
			return nil, -1, err
		}
		page = &hdrPage{s: s, key: key, mem: mem, f: f}
		s.pages[key] = append(s.pages[key], page)
	}
	fd, err := unix.FcntlInt(page.f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, -1, os.NewSyscallError("fcntl(F_DUPFD_CLOEXEC)", err)
	}
	i := 0
	for page.used[i] {
		i++
	}
	page.used[i] = true
	page.gens[i] = ring.NextGen(page.gens[i])
	page.n++
	return &hdrSlot{p: page, off: i * ring.HeaderSize, gen: page.gens[i]}, fd, nil
}

// free gives the slot back; a page with no slot left in use goes. The
// slot's words take a generation of their own at once, which no channel
// has: a Conn of the process that has not yet learnt its channel ended
// fails at its next look or write (ring.ErrEnded), and its writes never
// reach the next channel given the slot.
func (sl *hdrSlot) free() {
	p := sl.p
	s := p.s
	s.mu.Lock()
	defer s.mu.Unlock()
	i := sl.off / ring.HeaderSize
	p.gens[i] = ring.NextGen(p.gens[i])
	ring.End(sl.bytes(), p.gens[i])
	p.used[i] = false
	if p.n--; p.n > 0 {
		return
	}
	pages := s.pages[p.key]
	for i, q := range pages {
		if q == p {
			pages = append(pages[:i], pages[i+1:]...)
			break
		}
	}
	if len(pages) == 0 {
		delete(s.pages, p.key)
	} else {
		s.pages[p.key] = pages
	}
	p.mem.Unmap()
	p.f.Close()
}
