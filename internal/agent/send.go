package agent

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// The sending side of a channel: the outbound pump reads the process's
// records, takes credit (what the peer granted, capped by our own window)
// and budget for them, packs them into a frame, seals it and keeps it
// until the peer acknowledges it (send). Acknowledgements and grants come
// in Credit messages (handleCredit); a frame not acknowledged in time is
// sent again (the retransmission timer, rtxTimer).

// Outbound framing.
const (
	// outboundBuffer is what the outbound pump reads from a process at
	// once: a full frame of small records per read. Only a channel with
	// something to send holds one (see outbound).
	outboundBuffer = 64 << 10
	// pumpLinger is how long an outbound pump waits for the process to
	// send more before it ends: a busy channel keeps its pump (starting
	// one through the poller costs a hand-off per message), an idle one
	// holds none.
	pumpLinger = 100 * time.Millisecond
	// packDirect is the record size from which the pump reads a record
	// straight into its frame instead of packing records together.
	packDirect = 8 << 10
)

// outbound moves the process's records to the peer. Records that arrive
// together are packed into one frame, sealed once, as far as credit allows.
// An idle channel holds no read buffer: the pump waits for the socket to be
// readable, takes a buffer from a pool, and gives it back once empty.
func (ch *channel) outbound() {
	var hdr [local.RecordHeaderLen]byte
	var br *bufio.Reader
	defer func() {
		if br != nil && br.Buffered() == 0 {
			putReader(br)
		}
	}()
	for first := true; ; first = false {
		if (br == nil || br.Buffered() == 0) && (ch.pre == nil || ch.pre.Len() == 0) {
			// At a record boundary with nothing read ahead: the pump holds
			// no read buffer while it waits. Unless the poller just
			// started it, it waits a while for the process to send more,
			// and on a channel gone idle ends; the poller starts one again
			// when the process sends. With little credit it waits for
			// more before reading on, so that a channel whose peer stopped
			// reading holds no buffer (its process's bytes wait in its
			// socket).
			if br != nil {
				putReader(br)
				br = nil
			}
			if !first {
				ch.sock.SetReadDeadline(time.Now().Add(pumpLinger))
				idle := ch.waitReadable()
				ch.sock.SetReadDeadline(time.Time{})
				if idle {
					if ch.a.poller.arm(ch) == nil {
						return
					}
					ch.waitReadable()
				}
			}
			if ch.creditLeft() < minWindow && !ch.awaitCredit(minWindow) {
				return
			}
		}
		if br == nil {
			br = getReader(ch.reader())
		}
		if n, err := io.ReadFull(br, hdr[:]); err != nil {
			ch.readEnd(err, n == 0)
			return
		}
		typ, n, err := local.ParseRecordHeader(hdr[:])
		if err != nil {
			ch.abortTelling(wire.CodeProtocol, "bad record from this process: "+err.Error(),
				"the remote process broke the protocol (a bad record)")
			return
		}
		if ch.finOut.Load() && typ != local.RecClose {
			ch.abortTelling(wire.CodeProtocol, "this process sent after its fin",
				"the remote process broke the protocol (it sent after its fin)")
			return
		}
		switch typ {
		case local.RecFin:
			ch.sendFin()
			ch.checkDone()
		case local.RecClose:
			ch.processAborts(br, n)
			return
		case local.RecData:
			if n == 0 && ch.kind == wire.Stream {
				continue
			}
			frame, recs, err := ch.pack(br, n)
			if err != nil {
				if !errors.Is(err, errEnded) {
					ch.readEnd(err, false)
				}
				return
			}
			if err := ch.send(frame, len(frame)-wire.DataHeaderLen-wire.TagLen, 0); err != nil {
				return // the channel ended
			}
			ch.recsOut.Add(uint64(recs))
		}
		if ch.ended.Load() {
			return
		}
	}
}

var errEnded = errors.New("channel ended")

// readEnd handles the end of what the process sends: its socket read
// err, at a record boundary or inside a record. A stream ends cleanly only
// by a fin: a fin record, or shutdown(SHUT_WR), which the agent reads as
// the end of the socket while the process still reads. A socket closed
// without a fin — the process crashed, or closed without ending its side —
// ends the channel as a reset at the other end, which must not take a
// truncated stream for a whole one.
func (ch *channel) readEnd(err error, boundary bool) {
	switch {
	case !boundary:
		ch.abortTelling(wire.CodeReset, "this process broke off a record",
			"the remote process's socket closed in the middle of a record: what it sent is truncated")
	case ch.finOut.Load():
		ch.checkDone() // it closed after its fin: nothing is lost
	case err == io.EOF && !ch.hungUp():
		ch.sendFin() // shutdown(SHUT_WR): a fin
		ch.checkDone()
	default:
		ch.abortTelling(wire.CodeReset, "this process closed its socket without a fin",
			"the remote process closed its socket without a fin (it may have crashed): what it sent may be truncated")
	}
}

// hungUp reports whether the process closed its socket (or died), rather
// than only shut down its sending side: then the socket has hung up both
// ways.
func (ch *channel) hungUp() bool {
	rc, err := ch.sock.SyscallConn()
	if err != nil {
		return true
	}
	hup := true
	rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		if n, err := unix.Poll(p, 0); err == nil && n == 1 {
			hup = p[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
		}
	})
	return hup
}

// processAborts ends the channel for the process's close record of n
// bytes: an optional JSON object whose "message" the other process is
// told, after the code aborted.
func (ch *channel) processAborts(br io.Reader, n int) {
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		ch.readEnd(err, false)
		return
	}
	why := "the remote process aborted the channel"
	var rec struct {
		Message string `json:"message"`
	}
	if n > 0 && json.Unmarshal(b, &rec) == nil {
		if m := printable(rec.Message, 200); m != "" {
			why += ": " + m
		}
	}
	ch.abortTelling(wire.CodeAborted, "this process aborted the channel", why)
}

// printable returns s cut to at most max bytes of printable characters,
// for a message a process gives to be shown to another.
func printable(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return -1
	}, s)
	for len(s) > max {
		_, size := lastRune(s)
		s = s[:len(s)-size]
	}
	return s
}

func lastRune(s string) (rune, int) {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i]&0xc0 != 0x80 {
			return rune(s[i]), len(s) - i
		}
	}
	return 0, len(s)
}

// reader is what the outbound pump reads: the bytes the process sent with
// its request, then the socket.
func (ch *channel) reader() io.Reader {
	if ch.pre == nil || ch.pre.Len() == 0 {
		return ch.sock
	}
	return io.MultiReader(ch.pre, ch.sock)
}

// waitReadable blocks, without a buffer, until the process's socket has
// something to read (or an error, or is closed: the read says which), or
// until the socket's read deadline, which it reports.
func (ch *channel) waitReadable() (deadline bool) {
	rc, err := ch.sock.SyscallConn()
	if err != nil {
		return false
	}
	err = rc.Read(func(fd uintptr) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		return err != nil || n > 0
	})
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// readers is a bounded free list of the outbound pumps' read buffers.
var readers = make(chan *bufio.Reader, 64)

func getReader(r io.Reader) *bufio.Reader {
	select {
	case br := <-readers:
		br.Reset(r)
		return br
	default:
		return bufio.NewReaderSize(r, outboundBuffer)
	}
}

func putReader(br *bufio.Reader) {
	br.Reset(nil)
	select {
	case readers <- br:
	default:
	}
}

// pack reads a data record of n bytes whose header was read, and the data
// records already buffered behind it while they fit one frame and the
// credit and budget allow, and returns a frame (its header not yet filled)
// holding them, with the number of records.
func (ch *channel) pack(br *bufio.Reader, n int) ([]byte, int, error) {
	prefix := 0
	if ch.kind == wire.Message {
		prefix = wire.MessageLenSize
	}
	if !ch.waitCredit(prefix + n) {
		return nil, 0, errEnded
	}
	if n >= packDirect { // big: straight into the frame
		frame := getFrame(prefix + n)
		p := frame[wire.DataHeaderLen : wire.DataHeaderLen+prefix+n]
		if prefix > 0 {
			binary.BigEndian.PutUint32(p, uint32(n))
		}
		if _, err := io.ReadFull(br, p[prefix:]); err != nil {
			return nil, 0, err
		}
		ch.bytesOut.Add(uint64(n))
		ch.owner.part.bytesOut.Add(uint64(n))
		return frame, 1, nil
	}
	frame := getFrame(wire.MaxPayload)
	p := frame[wire.DataHeaderLen:wire.DataHeaderLen]
	if prefix > 0 {
		p = binary.BigEndian.AppendUint32(p, uint32(n))
	}
	p = p[:len(p)+n]
	if _, err := io.ReadFull(br, p[len(p)-n:]); err != nil {
		putFrame(frame)
		return nil, 0, err
	}
	// Then the data records already here whole, while they fit the frame
	// and the credit. A message record is, byte for byte, the message as
	// the payload carries it (see wire.CountMessages): a run of them is
	// copied at once.
	credit := ch.creditLeft()
	buf, _ := br.Peek(br.Buffered())
	base, off, taken, data, recs := len(p), 0, 0, n, 1
	for off+local.RecordHeaderLen <= len(buf) {
		typ, n2, err := local.ParseRecordHeader(buf[off:])
		if err != nil || typ != local.RecData || (n2 == 0 && prefix == 0) {
			break // the pump reads it next, and ends the channel if it is bad
		}
		end := off + local.RecordHeaderLen + n2
		if end > len(buf) || base+taken+prefix+n2 > packTarget || uint64(taken+prefix+n2) > credit {
			break
		}
		taken += prefix + n2
		data += n2
		recs++
		off = end
	}
	if taken > 0 && !ch.takeCredit(taken) { // no budget for more: the next frame takes them
		off, taken, data, recs = 0, 0, n, 1
	}
	if prefix > 0 {
		p = append(p, buf[:off]...)
	} else {
		for o := 0; o < off; {
			_, n2, _ := local.ParseRecordHeader(buf[o:])
			o += local.RecordHeaderLen
			p = append(p, buf[o:o+n2]...)
			o += n2
		}
	}
	br.Discard(off)
	ch.bytesOut.Add(uint64(data))
	ch.owner.part.bytesOut.Add(uint64(data))
	if len(p) > smallFrame {
		return frame[:wire.DataHeaderLen+len(p)+wire.TagLen], recs, nil
	}
	small := getFrame(len(p))
	copy(small[wire.DataHeaderLen:], p)
	putFrame(frame)
	return small, recs, nil
}

// packTarget is the payload size at which packing stops.
const packTarget = 64 << 10

// A frame of more than smallFrame payload bytes is cut from a full-size
// buffer of the bounded free list frames, and goes back to it once the
// peer acknowledged it (see recycleLocked); smaller ones are exact allocations,
// so that many small frames waiting for acknowledgement hold little.
const smallFrame = 8 << 10

var frames = make(chan []byte, 128)

// getFrame returns a data frame for payload bytes, its header and tag not
// yet written.
func getFrame(payload int) []byte {
	n := wire.DataHeaderLen + payload + wire.TagLen
	if payload <= smallFrame {
		return make([]byte, n)
	}
	select {
	case b := <-frames:
		return b[:n]
	default:
		return make([]byte, n, wire.MaxDataFrame)
	}
}

func putFrame(b []byte) {
	if cap(b) != wire.MaxDataFrame {
		return
	}
	select {
	case frames <- b[:0]:
	default:
	}
}

// recycleLocked returns the frames the peer acknowledged to the free list.
// It is called under txmu, as a resend, which also holds it, may still be
// writing a frame that an acknowledgement has just released; and under
// smu, which guards acked.
func (ch *channel) recycleLocked() {
	for i, f := range ch.acked {
		putFrame(f)
		ch.acked[i] = nil
	}
	ch.acked = ch.acked[:0]
}

// creditLocked returns the payload bytes the channel may send now: what
// the peer granted, but never more unacknowledged than our own window — a
// peer cannot make us hold more by granting more. Called under smu.
func (ch *channel) creditLocked() uint64 {
	limit := min(ch.peerGrant, ch.ackedB+uint64(ch.a.cfg.Limits.Window))
	if limit <= ch.sent {
		return 0
	}
	return limit - ch.sent
}

// creditLeft returns the credit not yet taken. Only the outbound pump
// takes credit, so it stays at least this much.
func (ch *channel) creditLeft() uint64 {
	ch.smu.Lock()
	defer ch.smu.Unlock()
	return ch.creditLocked()
}

// takeCredit takes n bytes of the credit creditLeft returned, and of the
// memory budget; it reports false, taking nothing, if the budget cannot
// give them now.
func (ch *channel) takeCredit(n int) bool {
	ch.smu.Lock()
	defer ch.smu.Unlock()
	return ch.takeLocked(n)
}

// takeLocked takes n bytes of credit and budget if both have them, and
// the channel has not ended (end gave its budget back). Called under smu.
func (ch *channel) takeLocked(n int) bool {
	if ch.ended.Load() || !ch.bud.take(int64(n), ch.sent-ch.ackedB+uint64(n) > 2*minWindow) {
		return false
	}
	ch.sent += uint64(n)
	return true
}

// waitCredit takes n bytes of credit and budget, waiting for the peer to
// grant them and for acknowledgements to give budget back. It reports
// false if the channel ended meanwhile.
func (ch *channel) waitCredit(n int) bool {
	for {
		ch.smu.Lock()
		ok := ch.creditLocked() >= uint64(n) && ch.takeLocked(n)
		ch.smu.Unlock()
		if ok {
			return true
		}
		// Wait for credit, or for the budget to get bytes back (asked
		// before looking again, so a release between is not missed).
		bp, ba := ch.bud.wait()
		ch.smu.Lock()
		ok = ch.creditLocked() >= uint64(n) && ch.takeLocked(n)
		ch.smu.Unlock()
		if ok {
			return true
		}
		select {
		case <-ch.creditSig:
		case <-bp:
		case <-ba:
		case <-ch.done:
			return false
		}
	}
}

// awaitCredit waits until the peer's credit allows n bytes, without taking
// them; it reports false if the channel ended meanwhile.
func (ch *channel) awaitCredit(n int) bool {
	for ch.creditLeft() < uint64(n) {
		select {
		case <-ch.creditSig:
		case <-ch.done:
			return false
		}
	}
	return true
}

var errKeysGone = errors.New("channel keys are gone")

// send seals frame's n payload bytes with the peer's key, keeps the frame
// for retransmission and sends it. A frame the carrier cannot take now
// (no link) waits in the retransmit buffer for the next link.
func (ch *channel) send(frame []byte, n int, flags byte) error {
	ch.txmu.Lock()
	defer ch.txmu.Unlock()
	k := &ch.keys
	lim := &ch.a.cfg.Limits
	for {
		k.mu.Lock()
		if k.slot == nil {
			k.mu.Unlock()
			return errKeysGone
		}
		// Past twice the rotation limits no new key came: stop rather
		// than use this one further.
		if k.sealed < 2*uint64(lim.RotateFrames) && k.sealedB < 2*uint64(lim.RotateBytes) {
			break
		}
		k.mu.Unlock()
		ch.a.counters.keyStalls.Add(1)
		select {
		case <-k.rekeySig:
		case <-ch.done:
			return errKeysGone
		}
	}
	h := wire.DataHeader{Flags: flags, Epoch: k.sendEpoch, Index: ch.state.remoteIndex, Counter: k.sendCtr,
		SrcConn: ch.id, DstConn: ch.state.remoteConn}
	k.sendCtr++
	k.sealed++
	k.sealedB += uint64(n)
	h.Put(frame, n)
	nonce := wire.Nonce(h.Counter)
	k.sealer().Seal(frame[wire.DataHeaderLen:wire.DataHeaderLen], nonce[:], frame[wire.DataHeaderLen:wire.DataHeaderLen+n], frame[:wire.DataHeaderLen])
	k.mu.Unlock()
	ch.smu.Lock()
	if ch.ended.Load() {
		ch.smu.Unlock()
		return errKeysGone // end took the budget back already
	}
	ch.recycleLocked()
	ch.rtx = append(ch.rtx, rtxFrame{counter: h.Counter, frame: frame, n: n})
	if flags&wire.FlagFin != 0 {
		ch.finSeq, ch.finQueued = h.Counter, true
	}
	ch.timer.sent(ch, h.Counter)
	ch.smu.Unlock()
	ch.a.counters.framesOut.Add(1)
	ch.carrier.sendData(frame) // on failure the frame waits for a resume
	return nil
}

// resend sends again every frame not yet acknowledged, in order.
func (ch *channel) resend() {
	ch.txmu.Lock()
	defer ch.txmu.Unlock()
	ch.smu.Lock()
	frames := append([]rtxFrame(nil), ch.rtx...)
	ch.timer.resent()
	ch.smu.Unlock()
	for _, f := range frames {
		if ch.carrier.sendData(f.frame) != nil {
			return // the link is gone again; the next resume sends them
		}
		ch.retransmits.Add(1)
		ch.a.counters.retransmits.Add(1)
	}
}

func (ch *channel) sendFin() {
	if ch.finOut.Swap(true) {
		return
	}
	ch.send(make([]byte, wire.DataHeaderLen+wire.TagLen), 0, wire.FlagFin)
}

// handleCredit takes the peer's receiving state: credit, acknowledgement,
// and perhaps a request to send again. A grant or an acknowledgement the
// peer could not honestly send — more in flight than any window, frames
// we never sent — is a protocol error that ends the channel.
func (a *Agent) handleCredit(car carrier, m *wire.Credit) {
	ch := a.tables.lookupIndex(m.Index)
	if ch == nil {
		// A channel we no longer have: tell the peer, so it does not wait
		// for it (its Close may have been lost with a link).
		c := &wire.Close{DstConn: m.SrcConn, SrcConn: m.DstConn, Code: wire.CodeClosed, Reason: "the channel is already closed"}
		a.reply(car, c.Marshal())
		return
	}
	if !a.idsMatch(car, ch, m.DstConn, m.SrcConn) {
		return
	}
	if ch.ended.Load() {
		// Ended, on its way out of the tables. Its end sent the peer a
		// Close, but perhaps on a link that broke under it (the send
		// can wait for a dying link while the peer resumes the channel
		// on the next one): the peer, which still has the channel,
		// would wait for it for good. Tell it again, with the same
		// reason (a Close of our own making could overtake the first
		// and lose it).
		a.reply(car, ch.closeAgain().Marshal())
		return
	}
	ch.keys.mu.Lock()
	sealed := ch.keys.sendCtr
	ch.keys.mu.Unlock()
	ch.smu.Lock()
	var bad string
	switch {
	case m.Ack > sealed:
		bad = fmt.Sprintf("acknowledged frame %d, but only %d were sent", m.Ack, sealed)
	case m.Granted > ch.sent+wire.MaxWindow:
		bad = fmt.Sprintf("granted %d bytes with %d sent: more than any window", m.Granted, ch.sent)
	}
	if bad != "" {
		ch.smu.Unlock()
		a.counters.malformed.Add(1)
		a.log.Warn("peer sent an impossible credit; closing channel", "peer", car.name(), "conn", ch.id, "reason", bad)
		why := "the agent of " + car.name() + " broke the protocol: it " + bad
		a.goRun(func() { ch.abort(wire.CodeProtocol, why, true) })
		return
	}
	if m.Granted > ch.peerGrant {
		ch.peerGrant = m.Granted
	}
	i, freed := 0, 0
	for i < len(ch.rtx) && ch.rtx[i].counter < m.Ack {
		ch.acked = append(ch.acked, ch.rtx[i].frame)
		freed += ch.rtx[i].n
		ch.rtx[i].frame = nil
		i++
	}
	ch.rtx = ch.rtx[i:]
	if freed > 0 && !ch.ended.Load() {
		ch.ackedB += uint64(freed)
		ch.bud.release(int64(freed))
	}
	ch.timer.acked(ch, m.Ack, i > 0)
	if ch.finQueued && m.Ack > ch.finSeq {
		ch.finAcked = true
	}
	// A request to send again is honoured once for each place in the
	// stream, or again after a retransmission timeout: a peer cannot make
	// us resend a window for every small message it sends.
	resend := m.Flags&wire.FlagResend != 0 && len(ch.rtx) > 0 &&
		(m.Ack != ch.resentAck || time.Since(ch.resentAt) >= ch.timer.base())
	if resend {
		ch.resentAck, ch.resentAt = m.Ack, time.Now()
	}
	ch.smu.Unlock()
	signal(ch.creditSig)
	if resend {
		a.goRun(ch.resend)
	} else if m.Flags&wire.FlagResend != 0 {
		a.counters.refuse("resend_request_ignored")
	}
	ch.checkDone()
}

// The retransmission timer. A frame the receiver drops without a word —
// one whose header was damaged, so that it cannot even name the channel
// to ask for it again — or whose request to send again was lost is sent
// again when no acknowledgement came for a retransmission timeout: as in
// TCP (RFC 6298), a smoothed round trip plus four deviations, measured on
// frames sent once (Karn), at least minRTO, doubled at each expiry up to
// maxRTO. The timer runs only while frames wait for acknowledgement.

const (
	minRTO     = 200 * time.Millisecond
	maxRTO     = 30 * time.Second
	initialRTO = time.Second
)

// rtxTimer is a channel's retransmission timer; guarded by channel.smu.
type rtxTimer struct {
	t       *time.Timer
	armed   bool
	rto     time.Duration // the timeout now (backed off)
	srtt    time.Duration
	rttvar  time.Duration
	timing  bool // a round trip is being measured
	timeSeq uint64
	timeAt  time.Time
}

func (r *rtxTimer) base() time.Duration {
	if r.srtt == 0 {
		return initialRTO
	}
	return max(minRTO, r.srtt+4*r.rttvar)
}

// sent notes frame counter sent: the timer starts if it was not running,
// and a round trip is measured if none is.
func (r *rtxTimer) sent(ch *channel, counter uint64) {
	if !r.timing {
		r.timing, r.timeSeq, r.timeAt = true, counter, time.Now()
	}
	if !r.armed {
		r.arm(ch)
	}
}

func (r *rtxTimer) arm(ch *channel) {
	if r.rto == 0 {
		r.rto = r.base()
	}
	if r.t == nil {
		r.t = time.AfterFunc(r.rto, ch.retransmitTimeout)
	} else {
		r.t.Reset(r.rto)
	}
	r.armed = true
}

// acked notes an acknowledgement of the frames before ack (progress: some
// were waiting): the round trip is measured, the timeout is its base
// again, and the timer runs on only if frames still wait.
func (r *rtxTimer) acked(ch *channel, ack uint64, progress bool) {
	if r.timing && ack > r.timeSeq {
		r.timing = false
		rtt := time.Since(r.timeAt)
		if r.srtt == 0 {
			r.srtt, r.rttvar = rtt, rtt/2
		} else {
			d := r.srtt - rtt
			if d < 0 {
				d = -d
			}
			r.rttvar = (3*r.rttvar + d) / 4
			r.srtt = (7*r.srtt + rtt) / 8
		}
	}
	if !progress {
		return
	}
	r.rto = r.base()
	if len(ch.rtx) == 0 {
		r.stop()
		return
	}
	r.arm(ch)
}

// resent notes that every waiting frame went again: none of them may time
// a round trip any more.
func (r *rtxTimer) resent() { r.timing = false }

func (r *rtxTimer) stop() {
	if r.t != nil {
		r.t.Stop()
	}
	r.armed = false
}

// retransmitTimeout sends again what waits for acknowledgement, and backs
// the timer off.
func (ch *channel) retransmitTimeout() {
	ch.smu.Lock()
	r := &ch.timer
	r.armed = false
	if ch.ended.Load() || len(ch.rtx) == 0 {
		ch.smu.Unlock()
		return
	}
	r.rto = min(2*r.rto, maxRTO)
	r.arm(ch)
	ch.smu.Unlock()
	ch.a.counters.timeouts.Add(1)
	ch.resend()
}

// resetTimer puts the retransmission timer back to its measured base: a
// new link, with nothing learned yet of its losses.
func (ch *channel) resetTimer() {
	ch.smu.Lock()
	ch.timer.rto = ch.timer.base()
	if ch.timer.armed {
		ch.timer.arm(ch)
	}
	ch.smu.Unlock()
}
