package agent

import (
	"crypto/cipher"
	"net"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// The receiving side of a channel: a data frame from the peer is checked
// (receive), written to the process at once when it takes it, else queued
// for the inbound pump; credit goes back to the peer as the process reads,
// with the acknowledgement of what arrived (sendAck).

// ackDelay bounds how long a frame that arrived waits to be acknowledged
// when no credit goes back sooner: the sender's retransmission timer
// measures round trips by the acknowledgements.
const ackDelay = 20 * time.Millisecond

// HandleData receives a data frame from a peer link.
func (a *Agent) HandleData(l *link.Link, frame []byte) {
	if car := a.carrierOf(l); car != nil {
		if f := linkFault.Load(); f != nil {
			(*f)(a.cfg.Node, frame)
		}
		a.handleData(car, frame)
	}
}

// linkFault, set by tests only, may damage a data frame as it arrives
// from a link, as a flipped bit on the way would.
var linkFault atomic.Pointer[func(node string, frame []byte)]

func (a *Agent) handleData(car carrier, frame []byte) {
	h, sealed, err := wire.ParseDataHeader(frame)
	if err != nil {
		a.counters.malformed.Add(1)
		return
	}
	ch := a.tables.lookupIndex(h.Index)
	if ch == nil {
		a.counters.unknownIndex.Add(1)
		return
	}
	ch.receive(car, frame, &h, sealed)
}

// receive takes a data frame for ch from car, its header parsed; it is the
// data path's check sequence after the index lookup. It must not block.
func (ch *channel) receive(car carrier, frame []byte, h *wire.DataHeader, sealed []byte) {
	c := &ch.a.counters
	ch.mu.Lock()
	st := ch.state
	ch.mu.Unlock()
	if st.status == statusEnded {
		// Ended, on its way out of the tables (its end told the peer
		// first): for the peer the channel is gone, as when the index
		// is no longer found.
		c.unknownIndex.Add(1)
		return
	}
	if st.status != statusOpen || car != ch.carrier || h.SrcConn != st.remoteConn || h.DstConn != ch.id {
		c.wrongIDs.Add(1)
		ch.a.log.Debug("data frame ids do not match the channel", "peer", car.name(), "index", h.Index,
			"src", h.SrcConn, "dst", h.DstConn)
		return
	}
	ch.rmu.Lock()
	defer ch.rmu.Unlock()
	k := &ch.keys
	if k.slot == nil {
		c.unknownIndex.Add(1) // keys already dropped: the channel is ending
		return
	}
	var aead cipher.AEAD
	switch {
	case h.Epoch == k.recvEpoch:
		aead = k.opener()
	case k.old != nil && h.Epoch == k.oldEpoch: // sealed before the sender took the new key
		aead = k.old
	default:
		c.badEpoch.Add(1)
		ch.askResend(h.Counter)
		return
	}
	nonce := wire.Nonce(h.Counter)
	buf := getDataBuf(len(sealed) - wire.TagLen)
	pt, err := aead.Open(buf, nonce[:], sealed, frame[:wire.DataHeaderLen])
	if err != nil {
		putDataBuf(buf)
		c.auth.Add(1)
		ch.askResend(h.Counter) // damaged on the way, most likely: the sender has it
		return
	}
	keep := false
	defer func() {
		if !keep {
			putDataBuf(buf)
		}
	}()
	// In order only: a frame before the next expected one is a copy we
	// have — of a frame we asked for again (after a gap, a failed frame, a
	// new link) and had by the time it came, or else a replay; one after
	// it means frames went missing, and the sender is asked to send them
	// again.
	if h.Counter < ch.next || k.window.Seen(h.Counter) {
		if h.Counter >= ch.dupFloor && time.Now().Before(ch.dupUntil) {
			c.duplicates.Add(1) // we asked for it again, and had it by then
		} else {
			c.replay.Add(1)
		}
		return
	}
	if h.Counter > ch.next {
		c.outOfOrder.Add(1)
		ch.askResend(h.Counter)
		return
	}
	if ch.received+uint64(len(pt)) > ch.granted {
		c.credit.Add(1)
		ch.a.log.Warn("peer sent past its credit; closing channel", "peer", car.name(), "conn", ch.id)
		why := "the agent of " + car.name() + " sent past the credit " + ch.a.cfg.Node + " granted"
		ch.a.goRun(func() { ch.abort(wire.CodeProtocol, why, true) })
		return
	}
	recs, ok, finAck := 1, true, false
	if ch.kind == wire.Message {
		recs, ok = wire.CountMessages(pt, local.MaxMessage)
	}
	if ch.finIn || !ok {
		c.malformed.Add(1)
		return
	}
	// The memory budget: what does not fit is dropped, unacknowledged,
	// and comes again (the sender's retransmission timer). What a ring's
	// process took since the last look is given back first: the channel
	// is behind only by what it has not taken.
	behind := ch.held > 0
	if r := ch.ring; r != nil && !r.gone {
		if r.ringHeld > 0 {
			if _, err := r.down.Free(); err == nil {
				ch.releaseTaken()
			}
		}
		// The ring is the process's socket buffer: a process keeps up
		// while it holds less than half of it, and nothing is queued.
		behind = ch.held > r.ringHeld || r.ringHeld > int64(r.size/2)
	}
	if !ch.bud.take(int64(len(pt)), behind) {
		c.memoryDrops.Add(1)
		return
	}
	k.window.Accept(h.Counter)
	ch.next = h.Counter + 1
	c.framesIn.Add(1)
	ch.received += uint64(len(pt))
	if h.Epoch == k.recvEpoch {
		if k.old != nil {
			// The first frame under the new key: every frame before it
			// has come, and the old key opens nothing any more.
			k.retireOld()
			c.rotations.Add(1)
		}
		k.opened++
		k.openedB += uint64(len(pt))
		lim := &ch.a.cfg.Limits
		if k.opened >= uint64(lim.RotateFrames) || k.openedB >= uint64(lim.RotateBytes) ||
			time.Since(k.recvSince) >= ch.a.cfg.Timers.Rotate {
			k.rotateRecv()
			ch.a.goRun(ch.sendRekey)
		}
	}
	switch {
	case h.Flags&wire.FlagFin != 0:
		ch.finIn = true
		ch.inq = append(ch.inq, inItem{fin: true})
		// The fin is acknowledged at once, so the peer may end its side
		// (off this goroutine: a link write may wait). When nothing waits
		// before it, as when a channel closes, the same goroutine then
		// delivers it as the inbound pump: one hand-off, not two.
		if ch.ring != nil {
			finAck = true // with the delivery, below
		} else if len(ch.inq) == 1 && ch.deliver && !ch.delivering {
			ch.delivering = true
			ch.a.goRun(func() {
				ch.sendAck(false)
				ch.inbound()
			})
		} else {
			ch.a.goRun(func() { ch.sendAck(false) })
		}
	case ch.ring == nil && ch.deliver && len(ch.inq) == 0 && !ch.delivering:
		ch.deliverNow(pt, recs) // written straight to the process: one hand-off fewer
	default:
		ch.held += int64(len(pt))
		ch.inq = append(ch.inq, inItem{data: pt, n: len(pt), recs: recs, held: len(pt)})
		keep = true
	}
	ch.ackSoon()
	if ch.ring != nil {
		// Straight into the ring; the fin's acknowledgement and the end
		// it may complete share one goroutine.
		ch.flushDown()
		ack := finAck || ch.ackDueTaken()
		if done := ch.takeDone(); ack || done {
			ch.a.goRun(func() {
				if ack {
					ch.sendAck(false)
				}
				if done {
					ch.checkDone()
				}
			})
		}
		return
	}
	ch.kickInbound()
}

// askResend asks the sender to send again from the next frame expected,
// when a frame at or after it could not be taken (it failed, or frames
// before it are missing); once for each place in the stream, so that a
// burst of bad frames makes one request. Called under rmu.
func (ch *channel) askResend(counter uint64) {
	if counter < ch.next || ch.asked == ch.next+1 {
		return
	}
	ch.asked = ch.next + 1
	ch.expectCopies()
	ch.a.counters.resendAsks.Add(1)
	ch.a.goRun(func() { ch.sendAck(true) })
}

// copiesExpected is how long after asking for frames again their copies
// are taken for what they are, not for replays: the sender resends every
// frame it has no acknowledgement for, from the one we name.
const copiesExpected = 5 * time.Second

// expectCopies notes that frames from next on are asked for again. Called
// under rmu.
func (ch *channel) expectCopies() {
	ch.dupFloor, ch.dupUntil = ch.next, time.Now().Add(copiesExpected)
}

// ackSoon makes sure what arrived is acknowledged within ackDelay, if no
// Credit goes sooner. Called under rmu.
func (ch *channel) ackSoon() {
	if ch.ackArmed || ch.next <= ch.ackSent {
		return
	}
	ch.ackArmed = true
	if ch.ackTimer == nil {
		ch.ackTimer = time.AfterFunc(ackDelay, ch.delayedAck)
	} else {
		ch.ackTimer.Reset(ackDelay)
	}
}

func (ch *channel) delayedAck() {
	ch.rmu.Lock()
	ch.ackArmed = false
	due := ch.next > ch.ackSent && !ch.ended.Load()
	ch.rmu.Unlock()
	if due {
		ch.sendAck(false)
	}
}

// deliverNow writes a payload's recs records to the process at once, from
// the receiving goroutine, without waiting: what the socket does not take
// now is queued for the inbound pump, holding the budget it took (len(pt)
// bytes, taken by the caller). Called under rmu, with nothing queued
// before it.
func (ch *channel) deliverNow(pt []byte, recs int) {
	var hdr [local.RecordHeaderLen]byte
	iov := [][]byte{pt} // a message payload is the records (see CountMessages)
	if ch.kind == wire.Stream {
		local.PutRecordHeader(hdr[:], local.RecData, len(pt))
		iov = [][]byte{hdr[:], pt}
	}
	n := 0
	if rc, err := ch.sock.SyscallConn(); err == nil {
		var werr error
		rc.Write(func(fd uintptr) bool {
			n, werr = unix.Writev(int(fd), iov)
			return true // never wait: this is the link's reading goroutine
		})
		if werr != nil {
			n = 0 // EAGAIN, or an error the inbound pump meets and ends the channel for
		}
	}
	if total := len(hdr)*(len(iov)-1) + len(pt); n < total {
		var rest []byte
		for _, b := range iov {
			if n >= len(b) {
				n -= len(b)
				continue
			}
			rest = append(rest, b[n:]...)
			n = 0
		}
		ch.held += int64(len(pt))
		ch.inq = append(ch.inq, inItem{raw: rest, n: len(pt), recs: recs, held: len(pt)})
		return
	}
	ch.bud.release(int64(len(pt)))
	ch.countIn(len(pt), recs)
	if ch.delivered(uint64(len(pt))) {
		ch.a.goRun(func() { ch.sendAck(false) })
	}
}

// countIn counts records of a payload of n bytes delivered to the process.
func (ch *channel) countIn(n, recs int) {
	if ch.kind == wire.Message {
		n -= recs * wire.MessageLenSize
	}
	ch.bytesIn.Add(uint64(n))
	ch.recsIn.Add(uint64(recs))
	ch.owner.part.bytesIn.Add(uint64(n))
}

// dataBufs is a bounded free list of buffers for received payloads of the
// largest size; smaller ones come from the heap.
var dataBufs = make(chan []byte, 256)

func getDataBuf(n int) []byte {
	if n > packTarget/2 {
		select {
		case b := <-dataBufs:
			return b[:0]
		default:
			return make([]byte, 0, wire.MaxPayload)
		}
	}
	return make([]byte, 0, n)
}

func putDataBuf(b []byte) {
	if cap(b) != wire.MaxPayload {
		return
	}
	select {
	case dataBufs <- b:
	default:
	}
}

// kickInbound starts the inbound pump if something waits for it and it is
// not running. Called under rmu.
func (ch *channel) kickInbound() {
	if ch.ring != nil {
		ch.flushDown() // never waits: straight into the ring
		if done, ack := ch.takeDone(), ch.ackDueTaken(); done || ack {
			ch.a.goRun(func() {
				if ack {
					ch.sendAck(false)
				}
				if done {
					ch.checkDone()
				}
			})
		}
		return
	}
	if len(ch.inq) > 0 && !ch.delivering && ch.deliver {
		ch.delivering = true
		ch.a.goRun(ch.inbound)
	}
}

// inbound writes what arrived to the process, as many records as are
// waiting in one write, and grants credit back; it ends when nothing
// waits, so an idle channel holds no goroutine.
func (ch *channel) inbound() {
	var bufs net.Buffers
	var hdrs []byte
	for {
		ch.rmu.Lock()
		items := ch.inq
		ch.inq = nil
		if len(items) == 0 {
			ch.delivering = false
			ch.rmu.Unlock()
			return
		}
		ch.rmu.Unlock()
		bufs, hdrs = bufs[:0], hdrs[:0]
		// hdrs must not move while bufs points into it.
		if need := local.RecordHeaderLen * len(items); cap(hdrs) < need {
			hdrs = make([]byte, 0, need)
		}
		record := func(typ byte, b []byte) {
			hdrs = append(hdrs, 0, 0, 0, 0)
			h := hdrs[len(hdrs)-local.RecordHeaderLen:]
			local.PutRecordHeader(h, typ, len(b))
			bufs = append(bufs, h)
			if len(b) > 0 {
				bufs = append(bufs, b)
			}
		}
		payload, held, fin := 0, 0, false
		for _, it := range items {
			payload += it.n
			held += it.held
			switch {
			case it.fin:
				record(local.RecFin, nil)
				fin = true
			case it.raw != nil:
				bufs = append(bufs, it.raw)
			case ch.kind == wire.Message: // the payload is the records
				bufs = append(bufs, it.data)
			default:
				record(local.RecData, it.data)
			}
		}
		_, err := bufs.WriteTo(ch.sock)
		for _, it := range items {
			putDataBuf(it.data)
		}
		ch.rmu.Lock()
		if !ch.ended.Load() { // else end gave the budget back
			ch.held -= int64(held)
			ch.bud.release(int64(held))
		}
		ch.rmu.Unlock()
		if err != nil {
			ch.rmu.Lock()
			ch.delivering = false
			ch.rmu.Unlock()
			if fin && payload == 0 && ch.finOut.Load() {
				// The process sent its fin and closed its socket before the
				// peer's fin reached it: it had everything; a clean end.
				ch.finDone.Store(true)
				ch.checkDone()
				return
			}
			ch.abortTelling(wire.CodeReset, "this process closed the channel before reading all of it",
				"the remote process closed the channel before reading all of it")
			return
		}
		for _, it := range items {
			ch.countIn(it.n, it.recs)
		}
		if payload > 0 {
			ch.grant(uint64(payload))
		}
		if fin {
			ch.finDone.Store(true)
			ch.checkDone()
		}
	}
}

// grant returns credit to the peer for n delivered bytes (see delivered).
func (ch *channel) grant(n uint64) {
	ch.rmu.Lock()
	due := ch.delivered(n)
	ch.rmu.Unlock()
	if due {
		ch.sendAck(false)
	}
}

// delivered counts n bytes written to the process and reports whether
// credit is due: it goes back in batches of half a window, so that a bulk
// transfer costs a Credit message (a write on the link) per half window
// rather than per frame, while the sender still has the other half to
// send meanwhile; and whenever the sender would have less than a full
// frame once everything is delivered, so it never waits for ever with a
// record of the largest size. After its FIN the peer sends nothing more.
// Called under rmu.
//
// The window starts small and doubles at each grant while the process
// keeps up — its socket holds less than half its buffer unread — and as
// far as the memory budget allows; it halves when the process falls
// behind. So a channel whose reader stopped grants little, and holds
// little, while one that moves data soon grants its full window.
func (ch *channel) delivered(n uint64) bool {
	ch.deliveredB += n
	limit := ch.deliveredB + uint64(ch.window)
	// Due: half a window delivered since the last grant, or less than a
	// full frame left to the sender — which may be waiting for one (its
	// next record may be the largest), and would wait for ever.
	if limit <= ch.granted || limit-ch.granted < uint64(ch.window)/2 && ch.granted-ch.deliveredB >= minWindow || ch.finIn {
		return false
	}
	keepsUp := ch.held == 0 && ch.unread() < socketBuffer/2
	if r := ch.ring; r != nil {
		// What sits in the ring counts in held, and the ring is the
		// process's socket buffer.
		keepsUp = ch.held == r.ringHeld && ch.unread() < r.size/2
	}
	if keepsUp {
		ch.window = uint32(min(2*int64(ch.window), ch.bud.window(minWindow, int64(ch.a.cfg.Limits.Window), true)))
	} else {
		ch.window = uint32(max(int64(ch.window)/2, minWindow))
	}
	ch.granted = max(ch.granted, ch.deliveredB+uint64(ch.window))
	return true
}

// unread returns how many bytes the process has not read yet of what was
// written to its socket (as the kernel counts them, with their overhead).
func (ch *channel) unread() int {
	if ch.ring != nil {
		return ch.ring.down.Pending()
	}
	rc, err := ch.sock.SyscallConn()
	if err != nil {
		return 0
	}
	q := 0
	rc.Control(func(fd uintptr) { q, _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
	return q
}

// sendAck sends the receiving side's state: credit granted, frames had, and
// with resend, a request to send again what follows them.
func (ch *channel) sendAck(resend bool) {
	ch.rmu.Lock()
	m := &wire.Credit{Granted: ch.granted, Ack: ch.next}
	ch.ackSent = ch.next
	ch.rmu.Unlock()
	ch.mu.Lock()
	m.Index, m.DstConn, m.SrcConn = ch.state.remoteIndex, ch.state.remoteConn, ch.id
	ch.mu.Unlock()
	if m.DstConn == 0 {
		return // not open yet: there is no channel of the peer's to name
	}
	if resend {
		m.Flags = wire.FlagResend
	}
	ch.carrier.sendControl(m.Marshal())
}

// resume brings the channel back after its link came back: the peer is
// told our receiving state and asked to send again what follows what we
// have (its copies of frames we acknowledged are not sent again), with the
// key of a rotation under way, whose Rekey may have been lost. Our own
// frames go again when the peer's request comes.
func (ch *channel) resume() {
	ch.resetTimer()
	ch.rmu.Lock()
	rotating := ch.keys.old != nil
	ch.asked = ch.next + 1
	ch.expectCopies()
	ch.rmu.Unlock()
	if rotating {
		ch.sendRekey()
	}
	ch.sendAck(true)
}
