package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// A channel's data path, one direction at a time:
//
//	process socket → outbound pump: read record → wait for credit → seal with
//	                 the peer's key → carrier (peer link, or this agent)
//	carrier → receive (HandleData, on the link's reading goroutine): index →
//	          ids → open with our key → replay window → credit → queue
//	queue → inbound pump: write record to the process socket → grant credit
//
// Each channel has its two pumps; the receive step never blocks (credit
// bounds the queue), so a process that stops reading stalls only its own
// channel. A stream ends gracefully when a FIN has gone each way; anything
// else (a Close from the peer, a broken socket, a protocol error, the link
// lost) aborts it: the process gets a close record saying why.

// channel is one channel between a local process and a remote one.
type channel struct {
	a       *Agent
	id      uint64
	kind    wire.Kind
	part    string            // local partition
	owner   *procRef          // the local process
	dialed  bool              // the local process opened it (else it accepted it)
	sock    *net.UnixConn     // the process's data socket
	rd      io.Reader         // reads sock (after bytes read with the request)
	carrier carrier           // how frames reach the peer agent
	window  uint32            // what we grant the peer at a time
	opened  chan *local.Error // dialing side: the open's outcome (nil: accepted)
	done    chan struct{}     // closed when the channel has ended
	ended   atomic.Bool

	mu      sync.Mutex // guards state, conn, closeErr, started and setting ended
	started bool
	state   chanState
	conn    local.Conn
	keys    keyEntry

	// sending side
	credit    atomic.Int64  // bytes we may still send
	creditSig chan struct{} // a credit arrived

	// receiving side, guarded by rmu
	rmu       sync.Mutex
	granted   uint64 // total bytes granted to the peer
	received  uint64 // total bytes received from the peer
	delivered uint64 // total bytes written to the process
	inq       []inItem
	inqSig    chan struct{}
	finIn     bool // a FIN arrived

	finOut   atomic.Bool // our FIN went out
	finDone  atomic.Bool // the peer's FIN was delivered to the process
	closeErr *local.Error

	bytesIn, bytesOut, recsIn, recsOut atomic.Uint64
}

// inItem is one thing to deliver to the process.
type inItem struct {
	data []byte
	fin  bool
}

// carrier takes frames to the peer agent of a channel: a peer link, or this
// agent itself for a channel between two of its partitions.
type carrier interface {
	name() string // the peer node
	sendControl(msg []byte) error
	sendData(frame []byte) error
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
		inqSig:    make(chan struct{}, 1),
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
	ch.a.goRun(ch.outbound)
	ch.a.goRun(ch.inbound)
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// outbound moves the process's records to the peer.
func (ch *channel) outbound() {
	var hdr [local.RecordHeaderLen]byte
	for {
		if _, err := io.ReadFull(ch.rd, hdr[:]); err != nil {
			if err == io.EOF { // at a record boundary: the process closed
				if !ch.finOut.Load() {
					ch.sendFin()
				}
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
			if !ch.waitCredit(n) {
				return
			}
			frame := make([]byte, wire.DataHeaderLen+n+wire.TagLen)
			if _, err := io.ReadFull(ch.rd, frame[wire.DataHeaderLen:wire.DataHeaderLen+n]); err != nil {
				ch.abort(wire.CodeReset, "the local process broke off a record", true)
				return
			}
			if err := ch.seal(frame, n, 0); err != nil {
				ch.abort(wire.CodeReset, err.Error(), false)
				return
			}
			ch.bytesOut.Add(uint64(n))
			ch.recsOut.Add(1)
		}
		if ch.ended.Load() {
			return
		}
	}
}

// waitCredit takes n bytes of credit, waiting for the peer to grant them.
func (ch *channel) waitCredit(n int) bool {
	for {
		c := ch.credit.Load()
		if c >= int64(n) {
			if ch.credit.CompareAndSwap(c, c-int64(n)) {
				return true
			}
			continue
		}
		select {
		case <-ch.creditSig:
		case <-ch.done:
			return false
		}
	}
}

// seal fills in the header of frame, seals its n payload bytes with the
// peer's key and sends it.
func (ch *channel) seal(frame []byte, n int, flags byte) error {
	k := &ch.keys
	k.mu.Lock()
	if k.send == nil {
		k.mu.Unlock()
		return errors.New("channel keys are gone")
	}
	h := wire.DataHeader{Flags: flags, Epoch: k.epoch, Index: ch.state.remoteIndex, Counter: k.sendCtr,
		SrcConn: ch.id, DstConn: ch.state.remoteConn}
	k.sendCtr++
	h.Put(frame, n)
	nonce := wire.Nonce(h.Counter)
	k.send.Seal(frame[wire.DataHeaderLen:wire.DataHeaderLen], nonce[:], frame[wire.DataHeaderLen:wire.DataHeaderLen+n], frame[:wire.DataHeaderLen])
	k.mu.Unlock()
	ch.a.counters.framesOut.Add(1)
	// Frames of one channel leave in counter order: only this pump sends
	// data for the channel, and FIN comes from it too.
	return ch.carrier.sendData(frame)
}

func (ch *channel) sendFin() {
	if ch.finOut.Swap(true) {
		return
	}
	frame := make([]byte, wire.DataHeaderLen+wire.TagLen)
	if err := ch.seal(frame, 0, wire.FlagFin); err != nil {
		ch.abort(wire.CodeReset, err.Error(), false)
	}
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
	if h.Epoch != k.epoch {
		c.badEpoch.Add(1)
		return
	}
	if k.recv == nil {
		c.unknownIndex.Add(1) // keys already zeroed: the channel is ending
		return
	}
	nonce := wire.Nonce(h.Counter)
	pt, err := k.recv.Open(sealed[:0], nonce[:], sealed, frame[:wire.DataHeaderLen])
	if err != nil {
		c.auth.Add(1)
		return
	}
	if !k.window.Accept(h.Counter) {
		c.replay.Add(1)
		return
	}
	if ch.received+uint64(len(pt)) > ch.granted {
		c.credit.Add(1)
		ch.a.log.Warn("peer sent past its credit; closing channel", "peer", car.name(), "conn", ch.id)
		go ch.abort(wire.CodeProtocol, "the peer agent sent past its credit", true)
		return
	}
	if ch.finIn {
		c.malformed.Add(1)
		return
	}
	c.framesIn.Add(1)
	ch.received += uint64(len(pt))
	if h.Flags&wire.FlagFin != 0 {
		ch.finIn = true
		ch.inq = append(ch.inq, inItem{fin: true})
	} else {
		ch.inq = append(ch.inq, inItem{data: append([]byte(nil), pt...)})
	}
	signal(ch.inqSig)
}

// inbound writes what arrived to the process and grants credit back.
func (ch *channel) inbound() {
	var hdr [local.RecordHeaderLen]byte
	bufs := make(net.Buffers, 0, 2)
	for {
		select {
		case <-ch.inqSig:
		case <-ch.done:
			return
		}
		ch.rmu.Lock()
		items := ch.inq
		ch.inq = nil
		ch.rmu.Unlock()
		for _, it := range items {
			if it.fin {
				local.PutRecordHeader(hdr[:], local.RecFin, 0)
				if _, err := ch.sock.Write(hdr[:]); err != nil {
					ch.abort(wire.CodeReset, "the remote process's peer went away", true)
					return
				}
				ch.finDone.Store(true)
				ch.checkDone()
				continue
			}
			local.PutRecordHeader(hdr[:], local.RecData, len(it.data))
			bufs = append(bufs[:0], hdr[:], it.data)
			if _, err := bufs.WriteTo(ch.sock); err != nil {
				ch.abort(wire.CodeReset, "the destination process closed the channel", true)
				return
			}
			ch.bytesIn.Add(uint64(len(it.data)))
			ch.recsIn.Add(1)
			ch.grant(uint64(len(it.data)))
		}
	}
}

// grant returns credit to the peer for n delivered bytes, in batches of a
// quarter window.
func (ch *channel) grant(n uint64) {
	ch.rmu.Lock()
	ch.delivered += n
	owed := ch.delivered + uint64(ch.window) - ch.granted
	if owed < uint64(ch.window)/4 {
		ch.rmu.Unlock()
		return
	}
	ch.granted += owed
	ch.rmu.Unlock()
	ch.mu.Lock()
	m := &wire.Credit{Index: ch.state.remoteIndex, DstConn: ch.state.remoteConn, SrcConn: ch.id, Bytes: uint32(owed)}
	ch.mu.Unlock()
	ch.carrier.sendControl(m.Marshal())
}

// checkDone ends the channel once a FIN has gone each way.
func (ch *channel) checkDone() {
	if ch.finOut.Load() && ch.finDone.Load() {
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
	ch.keys.zero()
	close(ch.done)
	if started {
		ch.closeSocket(why)
	}
	ch.owner.release(ch.dialed)
	if why != nil {
		ch.a.log.Debug("channel ended", "conn", ch.id, "peer", st.peer, "code", why.Code, "reason", why.Message)
	}
}

// closeSocket tells the process why its channel ended, if it did not end
// gracefully, and closes the socket.
func (ch *channel) closeSocket(why *local.Error) {
	if why != nil {
		b, _ := json.Marshal(why)
		rec := make([]byte, local.RecordHeaderLen+len(b))
		local.PutRecordHeader(rec, local.RecClose, len(b))
		copy(rec[local.RecordHeaderLen:], b)
		ch.sock.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		ch.sock.Write(rec)
	}
	ch.sock.Close()
}

// handleClose ends a channel the peer closed.
func (a *Agent) handleClose(car carrier, m *wire.Close) {
	ch := a.tables.lookupIndex(m.Index)
	if ch == nil {
		return // already gone
	}
	ch.mu.Lock()
	st := ch.state
	ch.mu.Unlock()
	if car != ch.carrier || st.remoteConn != m.SrcConn || ch.id != m.DstConn {
		a.counters.wrongIDs.Add(1)
		a.log.Warn("channel close with ids that do not match", "peer", car.name(), "index", m.Index)
		return
	}
	reason := m.Reason
	if m.Code == wire.CodeClosed {
		reason = "closed by the remote side: " + reason
	}
	ch.end(&local.Error{Code: m.Code.String(), Message: reason, By: car.name()}, false)
}

// handleCredit adds the credit the peer granted.
func (a *Agent) handleCredit(car carrier, m *wire.Credit) {
	ch := a.tables.lookupIndex(m.Index)
	if ch == nil {
		return
	}
	ch.mu.Lock()
	st := ch.state
	ch.mu.Unlock()
	if car != ch.carrier || st.remoteConn != m.SrcConn || ch.id != m.DstConn {
		a.counters.wrongIDs.Add(1)
		return
	}
	ch.credit.Add(int64(m.Bytes))
	signal(ch.creditSig)
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

func describe(e *local.Error) string {
	if e == nil {
		return "closed"
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}
