package agent

import (
	"bufio"
	"bytes"
	"crypto/cipher"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// A channel's data path, one direction at a time:
//
//	process socket → outbound pump: read records → wait for credit → pack
//	                 them into one frame → seal it with the peer's key →
//	                 keep it in the retransmit buffer → carrier
//	carrier → receive (HandleData, on the link's reading goroutine): index →
//	          ids → open with our key → next in order (replay window) →
//	          credit → write to the process socket if it takes it all now,
//	          else queue
//	queue → inbound pump: write records to the process socket → grant credit
//	        and acknowledge (one Credit message carries both)
//
// The pumps run only while there is work: the inbound pump while the queue
// is not empty, the outbound pump from the process's first byte (the
// poller starts it) until it has been idle for pumpLinger, so an idle
// channel holds no goroutine. The receive step never blocks (credit bounds
// the queue), so a process that stops reading stalls only its own
// channel. Every sealed frame stays in its sender's retransmit buffer until
// the receiver acknowledges it, so when a link breaks, the frames it may
// have lost are sent again on the next link to the same agent (resume), and
// the receiver, which takes frames strictly in counter order, drops the
// copies it already has. The retransmit buffer is bounded by the credit the
// receiver granted, the queue by the credit we granted.
//
// A stream ends gracefully when a FIN has gone each way and ours was
// acknowledged; anything else (a Close from the peer, a broken socket, a
// protocol error, the link not back within the grace period, the peer
// restarted) aborts it: the process gets a close record saying why.
//
// Locks: mu (state, conn, lifecycle) → txmu (sealing and sending, in order)
// → keys.mu → smu (send credit, retransmit buffer); rmu (receive side)
// is taken alone, or before keys.mu when keys are dropped.

// channel is one channel between a local process and a remote one.
type channel struct {
	a       *Agent
	id      uint64
	kind    wire.Kind
	part    string            // local partition
	owner   *procRef          // the local process
	dialed  bool              // the local process opened it (else it accepted it)
	sock    *net.UnixConn     // the process's data socket
	pre     *bytes.Reader     // bytes the process sent with its request, or nil
	carrier carrier           // how frames reach the peer agent
	window  uint32            // what we grant the peer at a time
	opened  chan *local.Error // dialing side: the open's outcome (nil: accepted)
	done    chan struct{}     // closed when the channel has ended
	ended   atomic.Bool

	mu       sync.Mutex // guards state, conn, closeErr, started and setting ended
	started  bool
	state    chanState
	conn     local.Conn
	closeErr *local.Error
	keys     keyEntry

	// sending side
	txmu      sync.Mutex // held while sealing and sending, so frames leave in counter order
	smu       sync.Mutex // guards the fields below
	sent      uint64     // payload bytes taken from credit
	peerGrant uint64     // payload bytes the peer allows in all
	rtx       []rtxFrame // sent and not yet acknowledged, in counter order
	acked     [][]byte   // frames acknowledged, for recycle
	finSeq    uint64     // counter of our FIN, once finQueued
	finQueued bool
	finAcked  bool
	creditSig chan struct{} // credit or an acknowledgement arrived
	finOut    atomic.Bool   // our FIN went out

	// receiving side, guarded by rmu
	rmu        sync.Mutex
	next       uint64 // counter of the frame expected next
	asked      uint64 // 1 + the value of next at which we last asked for a resend
	ackSent    uint64 // the value of next we last acknowledged
	granted    uint64 // payload bytes granted to the peer in all
	received   uint64 // payload bytes received
	deliveredB uint64 // payload bytes written to the process
	inq        []inItem
	delivering bool        // the inbound pump runs (see kickInbound)
	deliver    bool        // the process has its answer: deliveries may start
	finIn      bool        // the peer's FIN arrived
	finDone    atomic.Bool // the peer's FIN was delivered to the process

	bytesIn, bytesOut, recsIn, recsOut, retransmits atomic.Uint64
}

// rtxFrame is a sealed frame kept until the peer acknowledges it.
type rtxFrame struct {
	counter uint64
	frame   []byte
}

// inItem is one thing to deliver to the process: a frame's payload (data),
// a FIN, or the rest of a payload a direct delivery could not write whole
// (raw).
type inItem struct {
	data []byte
	raw  []byte
	n    int // payload bytes the item completes
	recs int // records the item completes
	fin  bool
}

// carrier takes frames to the peer agent of a channel: the current link to
// a peer, or this agent itself for a channel between two of its partitions.
type carrier interface {
	name() string // the peer node
	sendControl(msg []byte) error
	sendData(frame []byte) error
}

// setSocket gives the channel the process's data socket. Its send buffer
// is sized to hold the window, so that what the peer may send us in one
// go can be written to the process at once (deliverNow) rather than in
// pieces by the inbound pump; the kernel clamps it to net.core.wmem_max.
func (ch *channel) setSocket(sock *net.UnixConn, pre *bytes.Reader) {
	ch.sock, ch.pre = sock, pre
	sock.SetWriteBuffer(int(ch.window))
}

func (a *Agent) newChannel(kind wire.Kind, part string, owner *procRef, car carrier) *channel {
	return &channel{
		a:         a,
		kind:      kind,
		part:      part,
		owner:     owner,
		carrier:   car,
		window:    uint32(a.cfg.Limits.Window),
		done:      make(chan struct{}),
		creditSig: make(chan struct{}, 1),
		keys:      keyEntry{rekeySig: make(chan struct{}, 1)},
	}
}

// start runs the channel's pumps once the process has its answer. Until
// then the socket is its creator's; a channel that ended meanwhile tells
// the process why now.
func (ch *channel) start() {
	ch.mu.Lock()
	ch.started = true
	ended, why := ch.ended.Load(), ch.closeErr
	ch.mu.Unlock()
	if ended {
		ch.closeSocket(why)
		return
	}
	ch.rmu.Lock()
	ch.deliver = true
	ch.kickInbound()
	ch.rmu.Unlock()
	if ch.pre != nil || ch.a.poller.arm(ch) != nil {
		ch.a.goRun(ch.outbound) // bytes came with the request, or no poller: a pump now
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

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
	for {
		if br != nil && br.Buffered() == 0 && (ch.pre == nil || ch.pre.Len() == 0) {
			// At a record boundary with nothing read ahead: the pump
			// waits a while for more, and then, on a channel gone idle,
			// ends; the poller starts one again when the process sends.
			putReader(br)
			br = nil
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
		if br == nil {
			br = getReader(ch.reader())
		}
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if err == io.EOF { // at a record boundary: the process closed
				ch.sendFin()
				ch.checkDone()
				return
			}
			ch.abort(wire.CodeReset, "the local process broke off a record", true)
			return
		}
		typ, n, err := local.ParseRecordHeader(hdr[:])
		if err != nil {
			ch.abort(wire.CodeProtocol, "bad record from the local process: "+err.Error(), true)
			return
		}
		if ch.finOut.Load() && typ != local.RecClose {
			ch.abort(wire.CodeProtocol, "the local process sent after its FIN", true)
			return
		}
		switch typ {
		case local.RecFin:
			ch.sendFin()
			ch.checkDone()
		case local.RecClose:
			ch.abort(wire.CodeClosed, "closed by the remote process", true)
			return
		case local.RecData:
			if n == 0 && ch.kind == wire.Stream {
				continue
			}
			frame, recs, err := ch.pack(br, n)
			if err != nil {
				if !errors.Is(err, errEnded) {
					ch.abort(wire.CodeReset, "the local process broke off a record", true)
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
// credit allows, and returns a frame (its header not yet filled) holding
// them, with the number of records.
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
		if prefix == 0 {
			p = append(p, buf[off+local.RecordHeaderLen:end]...)
		}
		taken += prefix + n2
		data += n2
		recs++
		off = end
	}
	if prefix > 0 {
		p = append(p, buf[:off]...)
	}
	br.Discard(off)
	ch.takeCredit(taken)
	ch.bytesOut.Add(uint64(data))
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

// creditLeft returns the credit the peer granted that is not yet taken.
// Only the outbound pump takes credit, so it stays at least this much.
func (ch *channel) creditLeft() uint64 {
	ch.smu.Lock()
	defer ch.smu.Unlock()
	return ch.peerGrant - ch.sent
}

// takeCredit takes n bytes of the credit creditLeft returned.
func (ch *channel) takeCredit(n int) {
	ch.smu.Lock()
	ch.sent += uint64(n)
	ch.smu.Unlock()
}

// waitCredit takes n bytes of credit, waiting for the peer to grant them.
func (ch *channel) waitCredit(n int) bool {
	for {
		ch.smu.Lock()
		if ch.peerGrant-ch.sent >= uint64(n) {
			ch.sent += uint64(n)
			ch.smu.Unlock()
			return true
		}
		ch.smu.Unlock()
		select {
		case <-ch.creditSig:
		case <-ch.done:
			return false
		}
	}
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
	ch.recycleLocked()
	ch.rtx = append(ch.rtx, rtxFrame{counter: h.Counter, frame: frame})
	if flags&wire.FlagFin != 0 {
		ch.finSeq, ch.finQueued = h.Counter, true
	}
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

// receive takes a data frame for ch from car; it is the data path's check
// sequence after the index lookup. It must not block.
func (ch *channel) receive(car carrier, frame []byte) {
	c := &ch.a.counters
	h, sealed, err := wire.ParseDataHeader(frame)
	if err != nil {
		c.malformed.Add(1)
		return
	}
	ch.mu.Lock()
	st := ch.state
	ch.mu.Unlock()
	if st.status != "open" || car != ch.carrier || h.SrcConn != st.remoteConn || h.DstConn != ch.id {
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
		return
	}
	nonce := wire.Nonce(h.Counter)
	buf := getDataBuf(len(sealed) - wire.TagLen)
	pt, err := aead.Open(buf, nonce[:], sealed, frame[:wire.DataHeaderLen])
	if err != nil {
		putDataBuf(buf)
		c.auth.Add(1)
		return
	}
	keep := false
	defer func() {
		if !keep {
			putDataBuf(buf)
		}
	}()
	// In order only: a frame before the next expected one is a copy we
	// have (a retransmission, or a replay); one after it means frames went
	// missing, and the sender is asked to send them again.
	if h.Counter < ch.next || k.window.Seen(h.Counter) {
		c.replay.Add(1)
		ch.a.goRun(func() { ch.sendAck(false) }) // the sender may have missed our acknowledgement
		return
	}
	if h.Counter > ch.next {
		c.outOfOrder.Add(1)
		if ch.asked != ch.next+1 {
			ch.asked = ch.next + 1
			ch.a.goRun(func() { ch.sendAck(true) })
		}
		return
	}
	if ch.received+uint64(len(pt)) > ch.granted {
		c.credit.Add(1)
		ch.a.log.Warn("peer sent past its credit; closing channel", "peer", car.name(), "conn", ch.id)
		ch.a.goRun(func() { ch.abort(wire.CodeProtocol, "the peer agent sent past its credit", true) })
		return
	}
	recs, ok := 1, true
	if ch.kind == wire.Message {
		recs, ok = wire.CountMessages(pt, local.MaxMessage)
	}
	if ch.finIn || !ok {
		c.malformed.Add(1)
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
	if h.Flags&wire.FlagFin != 0 {
		ch.finIn = true
		ch.inq = append(ch.inq, inItem{fin: true})
		ch.a.goRun(func() { ch.sendAck(false) }) // so the peer may end its side
	} else if ch.deliver && len(ch.inq) == 0 && !ch.delivering && ch.deliverNow(pt, recs) {
		return // written straight to the process: one hand-off fewer
	} else {
		ch.inq = append(ch.inq, inItem{data: pt, n: len(pt), recs: recs})
		keep = true
	}
	ch.kickInbound()
}

// deliverNow tries to write a payload's recs records to the process at
// once, from the receiving goroutine, without waiting: what the socket
// does not take now is queued for the inbound pump. It reports whether it
// took the payload. Called under rmu, with nothing queued before it.
func (ch *channel) deliverNow(pt []byte, recs int) bool {
	var hdr [local.RecordHeaderLen]byte
	iov := [][]byte{pt} // a message payload is the records (see CountMessages)
	if ch.kind == wire.Stream {
		local.PutRecordHeader(hdr[:], local.RecData, len(pt))
		iov = [][]byte{hdr[:], pt}
	}
	rc, err := ch.sock.SyscallConn()
	if err != nil {
		return false
	}
	var n int
	var werr error
	if err := rc.Write(func(fd uintptr) bool {
		n, werr = unix.Writev(int(fd), iov)
		return true // never wait: this is the link's reading goroutine
	}); err != nil {
		return false
	}
	if werr != nil && werr != unix.EAGAIN {
		return false // the pump meets the error and ends the channel
	}
	n = max(n, 0)
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
		ch.inq = append(ch.inq, inItem{raw: rest, n: len(pt), recs: recs})
		ch.kickInbound()
		return true
	}
	ch.countIn(len(pt), recs)
	if ch.delivered(uint64(len(pt))) {
		ch.a.goRun(func() { ch.sendAck(false) })
	}
	return true
}

// countIn counts records of a payload of n bytes delivered to the process.
func (ch *channel) countIn(n, recs int) {
	if ch.kind == wire.Message {
		n -= recs * wire.MessageLenSize
	}
	ch.bytesIn.Add(uint64(n))
	ch.recsIn.Add(uint64(recs))
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
		payload, fin := 0, false
		for _, it := range items {
			payload += it.n
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
		if err != nil {
			ch.rmu.Lock()
			ch.delivering = false
			ch.rmu.Unlock()
			ch.abort(wire.CodeReset, "the destination process closed the channel", true)
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
// send meanwhile. After its FIN the peer sends nothing more. Called under
// rmu.
func (ch *channel) delivered(n uint64) bool {
	ch.deliveredB += n
	owed := ch.deliveredB + uint64(ch.window) - ch.granted
	if owed < uint64(ch.window)/2 || ch.finIn {
		return false
	}
	ch.granted += owed
	return true
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

// resume brings the channel back after its link came back: what the peer
// may have lost is sent again, and our receiving state is told anew (with
// the key of a rotation under way, whose Rekey may have been lost).
func (ch *channel) resume() {
	ch.resend()
	ch.rmu.Lock()
	rotating := ch.keys.old != nil
	ch.rmu.Unlock()
	if rotating {
		ch.sendRekey()
	}
	ch.sendAck(false)
}

// sendRekey gives the peer the key for its frames to us from now on.
func (ch *channel) sendRekey() {
	ch.rmu.Lock()
	k := &ch.keys
	m := &wire.Rekey{Epoch: k.recvEpoch}
	k.mu.Lock()
	ok := k.slot != nil
	if ok {
		copy(m.Key[:], k.recvKey())
	}
	k.mu.Unlock()
	ch.rmu.Unlock()
	if !ok {
		return
	}
	ch.mu.Lock()
	m.Index, m.DstConn, m.SrcConn = ch.state.remoteIndex, ch.state.remoteConn, ch.id
	ch.mu.Unlock()
	msg := m.Marshal()
	clear(m.Key[:])
	ch.carrier.sendControl(msg)
	clear(msg)
}

// handleRekey takes the new key the peer chose for our frames to it.
func (a *Agent) handleRekey(car carrier, m *wire.Rekey) {
	defer clear(m.Key[:])
	ch := a.tables.lookupIndex(m.Index)
	if ch == nil || !a.idsMatch(car, ch, m.DstConn, m.SrcConn) {
		return
	}
	k := &ch.keys
	k.mu.Lock()
	switch {
	case k.slot == nil || m.Epoch == k.sendEpoch: // gone, or sent again on a resume
	case m.Epoch == k.sendEpoch+1:
		copy(k.sendKey(), m.Key[:])
		k.send = nil // made again, with the new key, by the next seal
		k.sendEpoch, k.sealed, k.sealedB = m.Epoch, 0, 0
		tellKey("channel send", k.sendKey())
		signal(k.rekeySig)
	default:
		a.counters.malformed.Add(1)
	}
	k.mu.Unlock()
}

// checkDone ends the channel once a FIN has gone each way and ours was
// acknowledged.
func (ch *channel) checkDone() {
	if !ch.finDone.Load() {
		return
	}
	ch.smu.Lock()
	acked := ch.finAcked
	ch.smu.Unlock()
	if acked {
		ch.end(nil, false)
	}
}

// abort ends the channel at once with a reason the process is told; tell
// says whether to tell the peer agent too.
func (ch *channel) abort(code wire.Code, reason string, tell bool) {
	ch.end(&local.Error{Code: code.String(), Message: reason}, tell)
}

// end removes the channel from the tables, zeroes its keys, tells the
// process (and the peer, if tell) and closes the process's socket.
func (ch *channel) end(why *local.Error, tell bool) {
	ch.mu.Lock()
	if ch.ended.Load() {
		ch.mu.Unlock()
		return
	}
	ch.ended.Store(true)
	st, started := ch.state, ch.started
	ch.state.status = "closed"
	ch.closeErr = why
	ch.mu.Unlock()
	ch.a.tables.remove(ch, st)
	if st.status == "opening" {
		// The dialing process waits for its answer on the socket: hand
		// the reason to dial, which answers it.
		if why == nil {
			why = &local.Error{Code: wire.CodeReset.String(), Message: "channel ended while opening"}
		}
		select {
		case ch.opened <- why:
		default:
		}
	}
	if tell && st.remoteConn != 0 {
		code, reason := wire.CodeClosed, "closed"
		if why != nil {
			c, _ := wire.ParseCode(why.Code)
			code, reason = c, why.Message
		}
		m := &wire.Close{Index: st.remoteIndex, DstConn: st.remoteConn, SrcConn: ch.id, Code: code, Reason: reason}
		ch.carrier.sendControl(m.Marshal())
	}
	ch.rmu.Lock() // the receive step reads the keys under rmu
	ch.keys.zero()
	ch.inq = nil
	ch.rmu.Unlock()
	ch.smu.Lock()
	ch.rtx, ch.acked = nil, nil // to the garbage collector: a resend may hold them
	ch.smu.Unlock()
	close(ch.done)
	if started {
		ch.closeSocket(why)
	}
	ch.owner.release(ch.dialed, st.peer, st.remotePart)
	if why != nil {
		ch.a.log.Debug("channel ended", "conn", ch.id, "peer", st.peer, "code", why.Code, "reason", why.Message)
	}
}

// closeSocket tells the process why its channel ended, if it did not end
// gracefully, and closes the socket. The reason waits behind what the
// process has not read yet, for a while: a process that reads late still
// learns why.
func (ch *channel) closeSocket(why *local.Error) {
	if why == nil {
		ch.sock.Close()
		return
	}
	b, _ := json.Marshal(why)
	rec := make([]byte, local.RecordHeaderLen+len(b))
	local.PutRecordHeader(rec, local.RecClose, len(b))
	copy(rec[local.RecordHeaderLen:], b)
	ch.a.goRun(func() {
		ch.sock.SetWriteDeadline(time.Now().Add(closeRecordWait))
		ch.sock.Write(rec)
		ch.sock.Close()
	})
}

// closeRecordWait bounds how long a close record waits for the process to
// make room for it.
const closeRecordWait = 5 * time.Second

// handleClose ends a channel the peer closed.
func (a *Agent) handleClose(car carrier, m *wire.Close) {
	var ch *channel
	switch {
	case m.Index != 0:
		ch = a.tables.lookupIndex(m.Index)
	case m.DstConn != 0:
		ch = a.tables.lookupID(m.DstConn)
	default:
		ch = a.tables.lookupRemote(car.name(), m.SrcConn)
	}
	if ch == nil {
		return // already gone
	}
	dst := m.DstConn
	if dst == 0 { // named by the sender's connection id alone
		dst = ch.id
	}
	if !a.idsMatch(car, ch, dst, m.SrcConn) {
		a.log.Warn("channel close with ids that do not match", "peer", car.name(), "index", m.Index)
		return
	}
	if m.Code == wire.CodeClosed {
		// The peer ended the channel normally: it had all we sent. If we
		// have all it sent too, what remains is ours to deliver.
		ch.rmu.Lock()
		finIn := ch.finIn
		ch.rmu.Unlock()
		ch.smu.Lock()
		mine := ch.finQueued
		if finIn && mine {
			ch.finAcked = true
		}
		ch.smu.Unlock()
		if finIn && mine {
			ch.checkDone()
			return
		}
	}
	reason := m.Reason
	if m.Code == wire.CodeClosed {
		reason = "closed by the remote side: " + reason
	}
	ch.end(&local.Error{Code: m.Code.String(), Message: reason, By: car.name()}, false)
}

// idsMatch checks a control message about ch against its channel state
// table row: it must come from the channel's carrier and name both its
// connection ids. A mismatch is counted.
func (a *Agent) idsMatch(car carrier, ch *channel, dstConn, srcConn uint64) bool {
	ch.mu.Lock()
	remote := ch.state.remoteConn
	ch.mu.Unlock()
	if car != ch.carrier || remote != srcConn || ch.id != dstConn {
		a.counters.wrongIDs.Add(1)
		return false
	}
	return true
}

// handleCredit takes the peer's receiving state: credit, acknowledgement,
// and perhaps a request to send again.
func (a *Agent) handleCredit(car carrier, m *wire.Credit) {
	ch := a.tables.lookupIndex(m.Index)
	if ch == nil {
		// A channel we no longer have: tell the peer, so it does not wait
		// for it (its Close may have been lost with a link).
		c := &wire.Close{DstConn: m.SrcConn, SrcConn: m.DstConn, Code: wire.CodeClosed, Reason: "the channel is already closed"}
		msg := c.Marshal()
		a.goRun(func() { car.sendControl(msg) })
		return
	}
	if !a.idsMatch(car, ch, m.DstConn, m.SrcConn) {
		return
	}
	ch.smu.Lock()
	if m.Granted > ch.peerGrant {
		ch.peerGrant = m.Granted
	}
	i := 0
	for i < len(ch.rtx) && ch.rtx[i].counter < m.Ack {
		ch.acked = append(ch.acked, ch.rtx[i].frame)
		ch.rtx[i].frame = nil
		i++
	}
	ch.rtx = ch.rtx[i:]
	if ch.finQueued && m.Ack > ch.finSeq {
		ch.finAcked = true
	}
	ch.smu.Unlock()
	signal(ch.creditSig)
	if m.Flags&wire.FlagResend != 0 {
		a.goRun(ch.resend)
	}
	ch.checkDone()
}

// HandleData receives a data frame from a peer link.
func (a *Agent) HandleData(l *link.Link, frame []byte) {
	if car := a.carrierOf(l); car != nil {
		a.handleData(car, frame)
	}
}

func (a *Agent) handleData(car carrier, frame []byte) {
	h, _, err := wire.ParseDataHeader(frame)
	if err != nil {
		a.counters.malformed.Add(1)
		return
	}
	ch := a.tables.lookupIndex(h.Index)
	if ch == nil {
		a.counters.unknownIndex.Add(1)
		return
	}
	ch.receive(car, frame)
}
