package agent

import (
	"bytes"
	"encoding/json"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// A channel between a local process and a remote one. Its data path, one
// direction at a time (send.go, receive.go):
//
//	process socket → outbound pump: read records → wait for credit and
//	                 budget → pack them into one frame → seal it with the
//	                 peer's key → keep it in the retransmit buffer → carrier
//	carrier → receive (on the link's reading goroutine): index → ids →
//	          open with our key → next in order (replay window) → credit →
//	          budget → write to the process socket if it takes it all now,
//	          else queue
//	queue → inbound pump: write records to the process socket → grant
//	        credit and acknowledge (one Credit message carries both)
//
// The pumps run only while there is work: the inbound pump while the queue
// is not empty, the outbound pump from the process's first byte (the
// poller starts it) until it has been idle for pumpLinger, so an idle
// channel holds no goroutine. The receive step never blocks (credit and
// the memory budget bound the queue), so a process that stops reading
// stalls only its own channel. Every sealed frame stays in its sender's
// retransmit buffer until the receiver acknowledges it; a frame the
// receiver could not take (corrupted on the way, dropped for memory, lost
// with a link) is sent again when the receiver asks (a Credit with
// FlagResend: a gap, a frame that failed, a new link) or when the
// retransmission timer fires. The receiver takes frames strictly in
// counter order and drops the copies it already has.
//
// A channel's life, the channel state machine. Its status changes only
// under mu; what each event does:
//
//	status   event                                      next     action
//	opening  Accept from the channel's peer             open     keep the peer's key and grant; answer the process
//	opening  Refuse from the channel's peer             ended    the process gets the peer's reason
//	opening  no answer within timers.open               ended    tell the peer, naming our connection id
//	open     data, Credit, Rekey whose ids match        open     checked against the tables; keys under keys.mu
//	open     the process's fin, the peer's fin          open     half-closed (finOut, finIn)
//	open     a fin each way, ours acknowledged          ended    a graceful end: the socket is closed
//	open     the link is lost                           open     held for grace; resumed on the next link
//	any      Close from the channel's peer              ended    the process gets the peer's reason
//	any      the process breaks off, a protocol error   ended    the process and the peer are told why
//	any      grace over, the peer restarted, revoked,   ended    the process is told why
//	         denied by a reloaded policy, agent stops
//	ended    anything                                   ended    nothing: the tables no longer find it
//
// end is the one way to ended: it marks the channel ended under mu, then
// takes it out of the tables and zeroes its keys. So a handler that holds
// mu and finds the channel not ended may use its keys; a handler that does
// not hold mu checks for the keys under keys.mu (or rmu) instead — never a
// key slice outside those locks.
//
// Locks: mu (status, conn, lifecycle) → txmu (sealing and sending, in
// order) → keys.mu → smu (send credit, retransmit buffer, timer); rmu
// (receive side) is taken alone, or before keys.mu and smu.

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
	bud     budgets           // the memory its buffered bytes take
	opened  chan *local.Error // dialing side: the open's outcome (nil: accepted)
	done    chan struct{}     // closed when the channel has ended
	ended   atomic.Bool       // set with status ended, for checks without mu

	mu       sync.Mutex // guards state, conn, closeErr, started
	started  bool
	state    chanState
	conn     local.Conn
	closeErr *local.Error
	told     *wire.Close // the Close its end sent the peer (code and reason), or nil
	keys     keyEntry

	// sending side
	txmu      sync.Mutex // held while sealing and sending, so frames leave in counter order
	smu       sync.Mutex // guards the fields below
	sent      uint64     // payload bytes taken from credit (and the budget)
	ackedB    uint64     // payload bytes of frames the peer acknowledged
	peerGrant uint64     // payload bytes the peer allows in all
	rtx       []rtxFrame // sent and not yet acknowledged, in counter order
	acked     [][]byte   // frames acknowledged, for recycle
	finSeq    uint64     // counter of our FIN, once finQueued
	finQueued bool
	finAcked  bool
	timer     rtxTimer
	resentAck uint64        // the acknowledgement of the last request to send again we honoured
	resentAt  time.Time     // and when
	creditSig chan struct{} // credit or an acknowledgement arrived
	finOut    atomic.Bool   // our FIN went out

	// receiving side, guarded by rmu
	rmu        sync.Mutex
	window     uint32 // what we grant the peer at a time, now
	next       uint64 // counter of the frame expected next
	asked      uint64 // 1 + the value of next at which we last asked for a resend
	ackSent    uint64 // the value of next we last acknowledged
	dupFloor   uint64 // copies of frames from here on, until dupUntil, were asked for (see expectCopies)
	dupUntil   time.Time
	ackTimer   *time.Timer
	ackArmed   bool
	granted    uint64 // payload bytes granted to the peer in all
	received   uint64 // payload bytes received
	deliveredB uint64 // payload bytes written to the process
	held       int64  // bytes of the queue taken from the budget
	inq        []inItem
	delivering bool        // the inbound pump runs (see kickInbound)
	deliver    bool        // the process has its answer: deliveries may start
	finIn      bool        // the peer's FIN arrived
	finDone    atomic.Bool // the peer's FIN was delivered to the process

	// the ring path (ring.go), or nil: the socket path
	ring   *chanRing
	ringMu sync.Mutex // guards the ring up's memory (see ring.go)

	bytesIn, bytesOut, recsIn, recsOut, retransmits atomic.Uint64
}

// chanStatus is where a channel is in its life (see the table above).
type chanStatus uint8

const (
	statusOpening chanStatus = iota // dialed: the Open went, no answer yet
	statusOpen                      // both directions may carry frames
	statusEnded                     // out of the tables, keys zeroed
)

func (s chanStatus) String() string {
	switch s {
	case statusOpening:
		return "opening"
	case statusOpen:
		return "open"
	}
	return "closed"
}

// chanState is a channel's row in the channel state table.
type chanState struct {
	index       uint32 // ours: data frames to us carry it
	peer        string // the node frames must come from (the link's authenticated peer)
	remotePart  string
	remoteIndex uint32 // theirs: data frames we send carry it
	remoteConn  uint64
	status      chanStatus
}

// rtxFrame is a sealed frame kept until the peer acknowledges it.
type rtxFrame struct {
	counter uint64
	frame   []byte
	n       int // payload bytes, taken from credit and the budget
}

// inItem is one thing to deliver to the process: a frame's payload (data),
// a FIN, or the rest of a payload a direct delivery could not write whole
// (raw).
type inItem struct {
	data []byte
	raw  []byte
	n    int // payload bytes the item completes
	recs int // records the item completes
	held int // bytes it holds of the budget
	fin  bool
}

// carrier takes frames to the peer agent of a channel: the current link to
// a peer, or this agent itself for a channel between two of its partitions.
type carrier interface {
	name() string // the peer node
	sendControl(msg []byte) error
	sendData(frame []byte) error
	budget() *memBudget     // the peer's part of the memory budget
	opens() chan struct{}   // tokens of the peer's opens being accepted
	replies() chan struct{} // tokens of answers being written (reply)
}

// minWindow is the least a channel grants at a time: room for the largest
// record, or the largest message with its length.
const minWindow = wire.MaxPayload

// setSocket gives the channel the process's data socket. Its send buffer
// holds a few full frames, so that what the peer sends in a burst is
// mostly written to the process at once (deliverNow) rather than in pieces
// by the inbound pump — but no more: a channel whose process stops reading
// holds its send buffer full, in kernel memory the budget does not see
// (the kernel doubles the size asked for, up to net.core.wmem_max).
func (ch *channel) setSocket(sock *net.UnixConn, pre *bytes.Reader) {
	ch.sock, ch.pre = sock, pre
	sock.SetWriteBuffer(min(ch.a.cfg.Limits.Window, socketBuffer))
}

// socketBuffer bounds the send buffer of a process's data socket.
const socketBuffer = 256 << 10

func (a *Agent) newChannel(kind wire.Kind, part string, owner *procRef, car carrier) *channel {
	return &channel{
		a:         a,
		kind:      kind,
		part:      part,
		owner:     owner,
		carrier:   car,
		bud:       budgets{peer: car.budget(), agent: a.budget},
		done:      make(chan struct{}),
		creditSig: make(chan struct{}, 1),
		keys:      keyEntry{rekeySig: make(chan struct{}, 1)},
	}
}

// openWindow sets the window the channel grants its peer first: the
// least, which grows as the process reads (see delivered). It reports
// false when the memory budget is spent (the open is refused).
func (ch *channel) openWindow() bool {
	if ch.a.budget.spent() {
		return false
	}
	ch.window = minWindow
	ch.granted = uint64(ch.window)
	return true
}

// start runs the channel's pumps once the process has its answer. Until
// then the socket is its creator's; a channel that ended meanwhile tells
// the process why now.
func (ch *channel) start() {
	ch.mu.Lock()
	ch.started = true
	ended, why := ch.state.status == statusEnded, ch.closeErr
	ch.mu.Unlock()
	if ended {
		ch.closeSocket(why)
		return
	}
	ch.rmu.Lock()
	ch.deliver = true
	ch.kickInbound()
	ch.rmu.Unlock()
	if ch.ring != nil {
		ch.startRing()
		return
	}
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

// sweep makes an idle channel let go of what it need not hold:
//   - the AEADs not used since the last sweep (keyEntry.sweepAEADs);
//   - the frames acknowledged since the channel last sent, back to the
//     free list, unless a send holds them now;
//   - and, in the peer, the frames we have and did not acknowledge yet:
//     they are acknowledged now (a delayed acknowledgement lost with a
//     link would otherwise wait for the next frame).
func (ch *channel) sweep() {
	if ch.txmu.TryLock() {
		ch.smu.Lock()
		ch.recycleLocked()
		ch.smu.Unlock()
		ch.txmu.Unlock()
	}
	ch.dropUp()
	ch.rmu.Lock()
	ch.keys.sweepAEADs()
	due, done := false, false
	if ch.ring != nil {
		ch.sweepRing()
		due = ch.ackDueTaken() // the acknowledgement below carries the credit
		done = ch.takeDone()
	}
	unacked := ch.next > ch.ackSent || due
	ch.rmu.Unlock()
	if done {
		ch.a.goRun(ch.checkDone)
	}
	if unacked {
		ch.a.goRun(func() { ch.sendAck(false) })
	}
}

// abort ends the channel at once with a reason the process is told; tell
// says whether to tell the peer agent too (with the same reason).
func (ch *channel) abort(code wire.Code, reason string, tell bool) {
	ch.end(&local.Error{Code: code.String(), Message: reason}, tell)
}

// abortTelling ends the channel at once: the local process is told code
// and reason, the peer agent code and peerReason (what its process is to
// read).
func (ch *channel) abortTelling(code wire.Code, reason, peerReason string) {
	ch.finish(&local.Error{Code: code.String(), Message: reason}, &wire.Close{Code: code, Reason: peerReason})
}

// end removes the channel from the tables, zeroes its keys, tells the
// process why (why nil: a graceful end), and the peer too if tell.
func (ch *channel) end(why *local.Error, tell bool) {
	var c *wire.Close
	if tell {
		c = closeFor(why)
	}
	ch.finish(why, c)
}

// closeFor is the Close that tells the peer a channel ended for why (nil:
// a graceful end), its ids not yet filled.
func closeFor(why *local.Error) *wire.Close {
	c := &wire.Close{Code: wire.CodeClosed, Reason: "closed"}
	if why != nil {
		c.Code, _ = wire.ParseCode(why.Code)
		c.Reason = why.Message
	}
	return c
}

// closeAgain is the Close of an ended channel, as its end sent it, for a
// peer that shows it did not get it (handleCredit).
func (ch *channel) closeAgain() *wire.Close {
	ch.mu.Lock()
	why, told, st := ch.closeErr, ch.told, ch.state
	ch.mu.Unlock()
	c := closeFor(why)
	if told != nil {
		// What the peer's process is to read may differ from what ours
		// read (abortTelling): the peer gets its own reason again.
		c = &wire.Close{Code: told.Code, Reason: told.Reason}
	}
	c.Index, c.DstConn, c.SrcConn = st.remoteIndex, st.remoteConn, ch.id
	return c
}

// finish is end: tell, if not nil, is the Close for the peer, its ids not
// yet filled.
func (ch *channel) finish(why *local.Error, tell *wire.Close) {
	ch.mu.Lock()
	if ch.state.status == statusEnded {
		ch.mu.Unlock()
		return
	}
	st, started := ch.state, ch.started
	ch.state.status = statusEnded
	ch.ended.Store(true)
	ch.closeErr = why
	if tell != nil {
		ch.told = &wire.Close{Code: tell.Code, Reason: tell.Reason}
	}
	ch.mu.Unlock()
	// The peer hears why before the channel leaves the tables: a message
	// of the peer's about it that comes meanwhile finds it ended, rather
	// than no channel, which would be answered with a Close of its own
	// that could overtake this one and lose the reason.
	if tell != nil && st.remoteConn != 0 {
		tell.Index, tell.DstConn, tell.SrcConn = st.remoteIndex, st.remoteConn, ch.id
		ch.carrier.sendControl(tell.Marshal())
	}
	ch.a.tables.remove(ch, st)
	if pc, ok := ch.carrier.(*peerCarrier); ok {
		pc.p.touch() // the link's idle time starts (lazylink.go)
	}
	if st.status == statusOpening {
		// The dialing process waits for its answer on the socket: hand
		// the reason to dial, which answers it.
		if why == nil {
			why = &local.Error{Code: wire.CodeReset.String(), Message: "channel ended while opening"}
		}
		ch.settle(why)
	}
	ch.rmu.Lock() // the receive step reads the keys under rmu
	ch.keys.zero()
	for _, it := range ch.inq {
		putDataBuf(it.data)
	}
	ch.inq = nil
	ch.bud.release(ch.held)
	ch.held = 0
	if ch.ackTimer != nil {
		ch.ackTimer.Stop()
	}
	ch.rmu.Unlock()
	ch.smu.Lock()
	ch.timer.stop()
	ch.bud.release(int64(ch.sent - ch.ackedB))
	ch.ackedB = ch.sent
	ch.rtx, ch.acked = nil, nil // to the garbage collector: a resend may hold them
	ch.smu.Unlock()
	close(ch.done)
	ch.closeRing()
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
