package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/policy"
	"sinc.dev/sinc/internal/wire"
)

// Channel open (docs/design.md; claims 1, 8, 10, 11):
//
//	dialing agent A                            accepting agent B
//	check policy, pick index iA, key kA
//	(for traffic to A), enter channel   --Open{iA, connA, kA, src, dst}-->
//	                                           check: link's node = src node;
//	                                           src partition in its cert; dst
//	                                           partition and service here;
//	                                           policy; no such channel yet.
//	                                           store kA, pick iB, kB, enter
//	store kB, channel open  <--Accept{iA, connA, iB, connB, kB}--
//
// or B answers Refuse{code, by, reason}, which reaches the dialing process
// as a typed error naming the agent that refused.

// dial opens a channel for a process of partition p. On success the channel
// is running with sock as its data socket; otherwise the error says why.
func (a *Agent) dial(p *partition, proc *procRef, sock *net.UnixConn, pre *bytes.Reader, req *local.Request) (*channel, *local.Error) {
	fail := func(code wire.Code, by, format string, args ...any) (*channel, *local.Error) {
		return nil, &local.Error{Code: code.String(), Message: fmt.Sprintf(format, args...), By: by}
	}
	kind := wire.Stream
	switch req.Kind {
	case "", local.KindStream:
	case local.KindMessage:
		kind = wire.Message
	default:
		return fail(wire.CodeBadRequest, "", "kind %.20q is not stream or message", req.Kind)
	}
	addr, err := local.ParseAddr(req.To)
	if err != nil {
		return fail(wire.CodeBadRequest, "", "%v", err)
	}
	start := time.Now()
	deadline := start.Add(a.cfg.Timers.Open)

	// Policy first: a process the policy does not allow learns nothing of
	// the peers (which exist, which are up) from its answer.
	src := policy.Source{Node: a.cfg.Node, Partition: p.name, UID: proc.uid}
	if !a.policy.Load().Allows(src, policy.Dest{Node: addr.Node, Partition: addr.Partition, Service: addr.Service}) {
		a.counters.refuse("open_denied_policy")
		a.log.Info("channel open denied by policy", "from", p.name, "uid", proc.uid, "to", addr.String())
		return fail(wire.CodeDenied, a.cfg.Node, "policy of %s does not allow %s/%s (uid %d) to reach %s",
			a.cfg.Node, a.cfg.Node, p.name, proc.uid, addr)
	}
	var car carrier
	if addr.Node == a.cfg.Node {
		car = a.self
	} else {
		pr, release, code, why := a.peerFor(addr.Node)
		if pr == nil {
			if code == wire.CodeUnreachable {
				a.counters.refuse("node_unreachable")
			}
			return fail(code, a.cfg.Node, "%s", why)
		}
		defer release()
		if _, err := a.waitLink(pr, deadline, sock); err != nil {
			if !errors.Is(err, errProcessGone) {
				a.counters.refuse("node_unreachable")
			}
			// The peer's last error, with its address, is for the log and
			// the admin's sinc peers, not for the process.
			a.log.Info("channel open: no link to the peer", "from", p.name, "uid", proc.uid, "to", addr.String(), "err", err,
				"last_error", a.peerLastError(pr))
			return fail(wire.CodeUnreachable, a.cfg.Node, "node %q is unreachable: %v", addr.Node, err)
		}
		car = pr.carrier
	}
	if err := proc.take(true, addr.Node, addr.Partition); err != nil {
		return fail(wire.CodeLimit, a.cfg.Node, "%v", err)
	}
	ch := a.newChannel(kind, p.name, proc, car)
	ch.dialed = true
	ch.setSocket(sock, pre)
	ch.opened = make(chan *local.Error, 1)
	ch.state = chanState{peer: addr.Node, remotePart: addr.Partition, status: statusOpening}
	if !ch.openWindow() {
		proc.release(true, addr.Node, addr.Partition)
		return fail(wire.CodeLimit, a.cfg.Node, "%s", a.budgetSpent())
	}
	if err := ch.keys.alloc(a.arena); err != nil {
		proc.release(true, addr.Node, addr.Partition)
		return fail(wire.CodeLimit, a.cfg.Node, "%s", a.tableFull())
	}
	ch.conn = local.Conn{Partition: p.name, Process: proc.wire(), RemoteNode: addr.Node,
		RemotePartition: addr.Partition, RemoteService: addr.Service, Kind: kind.String(), Dialed: true, Created: time.Now()}
	if err := a.tables.add(ch); err != nil {
		ch.keys.zero()
		proc.release(true, addr.Node, addr.Partition)
		return fail(wire.CodeLimit, a.cfg.Node, "%s", a.tableFull())
	}
	// From here the channel is in the tables: anything may end it (the
	// peer restarting, the agent stopping, a reload), and its keys with
	// it. A policy reloaded since the check above has either swept the
	// tables after the channel entered them, or is seen here.
	if why, ok := a.allows(ch.row()); !ok {
		ch.end(nil, false)
		return fail(wire.CodeDenied, a.cfg.Node, "%s", why)
	}
	m := &wire.Open{Kind: kind, Index: ch.state.index, Conn: ch.id, Window: ch.window,
		SrcNode: a.cfg.Node, SrcPart: p.name, SrcProc: proc.wireID(),
		DstNode: addr.Node, DstPart: addr.Partition, DstSvc: addr.Service}
	if !ch.keys.copyRecv(m.Key[:]) {
		return nil, <-ch.opened // ended: end handed the reason to opened
	}
	msg := m.Marshal()
	clear(m.Key[:])
	err = car.sendControl(msg)
	clear(msg)
	if err != nil {
		ch.end(nil, false)
		return fail(wire.CodeUnreachable, a.cfg.Node, "node %q: the link failed as the open was sent", addr.Node)
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case le := <-ch.opened:
		if le != nil {
			ch.end(nil, false)
			return nil, le
		}
		a.counters.openLatency.observe(time.Since(start))
		return ch, nil
	case <-timer.C:
		ch.end(&local.Error{Code: wire.CodeTimeout.String()}, true)
		// The acceptor may have the channel (its Accept lost, or late):
		// name it by our connection id, the one it knows.
		c := &wire.Close{SrcConn: ch.id, Code: wire.CodeTimeout, Reason: "the dialing side gave up waiting"}
		car.sendControl(c.Marshal())
		return fail(wire.CodeTimeout, "", "%s did not answer within %s", addr.Node, a.cfg.Timers.Open)
	}
}

// tableFull says the channel table (and with it the key memory, sized to
// match) is full.
func (a *Agent) tableFull() string {
	return fmt.Sprintf("%s has %d channels open, its limit", a.cfg.Node, a.cfg.Limits.Channels)
}

// peerLastError returns why pr's last link or dial failed.
func (a *Agent) peerLastError(pr *peer) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return pr.lastErr
}

// budgetSpent says the memory budget is spent: only its reserve, for the
// channels already open, is left.
func (a *Agent) budgetSpent() string {
	return fmt.Sprintf("%s has spent its memory budget (limits.memory = %d bytes) on the channels it has open", a.cfg.Node, a.cfg.Limits.Memory)
}

// waitLink returns pr's link once it is up. A peer that is down — no
// link, and its dial loop waits out a backoff after a failed dial — fails
// at once: waiting would only delay the same answer. While a dial to pr is
// under way (or about to start, as at the agent's start) it waits for its
// outcome, until deadline, or until the process gives up waiting (closes
// its socket, sock). The error names no address: it goes to the process.
//
// A link asked to close as idle (lazylink.go) is waited past too: on yes
// the dial loop links again for this open.
func (a *Agent) waitLink(pr *peer, deadline time.Time, sock *net.UnixConn) (*link.Link, error) {
	a.mu.Lock()
	l, closing := pr.link, pr.closing
	a.mu.Unlock()
	if l != nil && closing == nil {
		return l, nil
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var poll <-chan time.Time
	if sock != nil {
		t := time.NewTicker(processPoll)
		defer t.Stop()
		poll = t.C
	}
	for {
		a.mu.Lock()
		l, state, changed, since, closing := pr.link, pr.state, pr.changed, pr.since, pr.closing
		a.mu.Unlock()
		if l != nil && closing == nil {
			return l, nil
		}
		if l == nil && state != stateConnecting {
			return nil, fmt.Errorf("no link is up, and the last attempt to link ended %s ago", time.Since(since).Round(time.Millisecond))
		}
		select {
		case <-changed:
		case <-timer.C:
			return nil, fmt.Errorf("no link came up within %s", a.cfg.Timers.Open)
		case <-poll:
			if processGone(sock) {
				return nil, errProcessGone
			}
		}
	}
}

var errProcessGone = errors.New("the dialing process gave up waiting")

// processPoll is how often a wait for a link checks that the process still
// waits.
const processPoll = 50 * time.Millisecond

// processGone reports whether the process closed its end of sock (a
// shutdown of its writing side alone is not leaving).
func processGone(sock *net.UnixConn) bool {
	rc, err := sock.SyscallConn()
	if err != nil {
		return true
	}
	gone := false
	rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd)}} // POLLHUP and POLLERR come unasked
		if n, err := unix.Poll(p, 0); err == nil && n > 0 {
			gone = p[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
		}
	})
	return gone
}

// handleAccept completes a channel this agent dialed.
func (a *Agent) handleAccept(car carrier, m *wire.Accept) {
	defer clear(m.Key[:])
	ch := a.tables.lookupIndex(m.InitIndex)
	if ch == nil || ch.id != m.InitConn {
		// The open timed out here meanwhile: tell the acceptor to drop it.
		c := &wire.Close{Index: m.Index, DstConn: m.Conn, SrcConn: m.InitConn, Code: wire.CodeTimeout, Reason: "the dialing side gave up"}
		a.reply(car, c.Marshal())
		return
	}
	ch.mu.Lock()
	if ch.carrier != car || ch.state.status != statusOpening {
		ch.mu.Unlock()
		a.counters.wrongIDs.Add(1)
		a.log.Warn("channel accept that does not match an open", "peer", car.name(), "index", m.InitIndex)
		return
	}
	if m.Window > wire.MaxWindow || m.Window == 0 {
		ch.mu.Unlock()
		a.counters.malformed.Add(1)
		a.log.Warn("peer accepted a channel with an impossible window", "peer", car.name(), "window", m.Window)
		ch.settle(&local.Error{Code: wire.CodeProtocol.String(), By: car.name(),
			Message: fmt.Sprintf("%s answered with a window of %d bytes", car.name(), m.Window)})
		return
	}
	// Under mu, not ended: the keys are there (end marks the channel
	// ended under mu before it zeroes them).
	ch.keys.setSend(m.Key[:])
	ch.state.remoteIndex, ch.state.remoteConn, ch.state.status = m.Index, m.Conn, statusOpen
	ch.conn.RemoteProcess = local.Proc{PID: m.DstProc.PID, UID: m.DstProc.UID, GID: m.DstProc.GID}
	ch.smu.Lock()
	ch.peerGrant = uint64(m.Window)
	ch.smu.Unlock()
	ch.mu.Unlock()
	if !a.tables.setRemote(ch) {
		ch.settle(&local.Error{Code: wire.CodeExists.String(), Message: "duplicate channel ids from " + car.name()})
		return
	}
	ch.settle(nil)
}

// settle hands dial the answer to its open: nil for accepted. The first
// answer is the one taken; a peer that answers again (Refuses back to
// back, say) before dial has ended the channel is not waited for — this
// runs on the link's reading goroutine.
func (ch *channel) settle(le *local.Error) {
	select {
	case ch.opened <- le:
	default:
	}
}

// handleRefuse fails a channel this agent dialed.
func (a *Agent) handleRefuse(car carrier, m *wire.Refuse) {
	ch := a.tables.lookupIndex(m.InitIndex)
	if ch == nil || ch.id != m.InitConn {
		return
	}
	ch.mu.Lock()
	ok := ch.carrier == car && ch.state.status == statusOpening
	ch.mu.Unlock()
	if !ok {
		a.counters.wrongIDs.Add(1)
		return
	}
	by := m.By
	if by != car.name() { // an agent speaks only for itself
		by = car.name()
	}
	ch.settle(&local.Error{Code: m.Code.String(), Message: m.Reason, By: by})
}

// handleOpen checks a peer's request to open a channel to a local service
// and, if every check passes, accepts it.
func (a *Agent) handleOpen(car carrier, m *wire.Open) {
	defer clear(m.Key[:])
	refuse := func(code wire.Code, format string, args ...any) {
		a.counters.opensRefused.Add(1)
		r := &wire.Refuse{InitIndex: m.Index, InitConn: m.Conn, Code: code, By: a.cfg.Node, Reason: fmt.Sprintf(format, args...)}
		a.log.Info("channel open refused", "peer", car.name(), "from", m.SrcNode+"/"+m.SrcPart,
			"to", m.DstNode+"/"+m.DstPart+"/"+m.DstSvc, "code", code, "reason", r.Reason)
		a.reply(car, r.Marshal())
	}
	if m.Window > wire.MaxWindow || m.Window == 0 {
		a.log.Warn("peer opened a channel with an impossible window", "peer", car.name(), "window", m.Window)
		refuse(wire.CodeProtocol, "a window of %d bytes is not between 1 and %d", m.Window, wire.MaxWindow)
		return
	}
	if m.SrcNode != car.name() {
		a.log.Warn("peer opened a channel in another node's name", "peer", car.name(), "claimed", m.SrcNode)
		refuse(wire.CodeDenied, "source node %q is not the link's node %q", m.SrcNode, car.name())
		return
	}
	if !a.nodeHasPartition(car, m.SrcPart) {
		a.log.Warn("peer opened a channel for a partition its certificate does not list", "peer", car.name(), "partition", m.SrcPart)
		refuse(wire.CodeDenied, "partition %q is not in the certificate of %s", m.SrcPart, car.name())
		return
	}
	if m.DstNode != a.cfg.Node {
		refuse(wire.CodeNoSuchNode, "this is %s, not %s", a.cfg.Node, m.DstNode)
		return
	}
	// Policy before the partition's existence: a peer the policy denies
	// learns nothing of what this node hosts.
	src := policy.Source{Node: m.SrcNode, Partition: m.SrcPart, UID: m.SrcProc.UID}
	if !a.policy.Load().Allows(src, policy.Dest{Node: a.cfg.Node, Partition: m.DstPart, Service: m.DstSvc}) {
		a.counters.refuse("open_denied_policy")
		refuse(wire.CodeDenied, "policy of %s does not allow %s/%s (uid %d) to reach %s/%s/%s",
			a.cfg.Node, m.SrcNode, m.SrcPart, m.SrcProc.UID, a.cfg.Node, m.DstPart, m.DstSvc)
		return
	}
	p := a.partitions[m.DstPart]
	if p == nil {
		refuse(wire.CodeNoSuchPart, "%s has no partition %q", a.cfg.Node, m.DstPart)
		return
	}
	l := p.listener(m.DstSvc)
	if l == nil {
		refuse(wire.CodeNoSuchService, "no process listens on %s/%s/%s", a.cfg.Node, m.DstPart, m.DstSvc)
		return
	}
	if a.tables.lookupRemote(car.name(), m.Conn) != nil {
		refuse(wire.CodeExists, "channel %d of %s is already open", m.Conn, car.name())
		return
	}
	select {
	case car.opens() <- struct{}{}:
	default:
		refuse(wire.CodeBusy, "%s has %d channel opens of %s in progress", a.cfg.Node, maxAccepting, car.name())
		return
	}
	if code, reason := a.accept(car, m, p, l, refuse); code != wire.CodeOK {
		<-car.opens()
		refuse(code, "%s", reason)
	}
}

// accept makes the channel for an Open that passed every check. It enters
// the channel in the tables at once, on the link's reading goroutine, so
// that a Close right behind the Open finds it; handing its socket to the
// listener (which may have to wait for the listener) and answering the
// peer run off that goroutine, and give back the accepting token.
func (a *Agent) accept(car carrier, m *wire.Open, p *partition, l *listener, refuse func(wire.Code, string, ...any)) (wire.Code, string) {
	if err := l.proc.take(false, car.name(), m.SrcPart); err != nil {
		return wire.CodeLimit, err.Error()
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		l.proc.release(false, car.name(), m.SrcPart)
		if outOfFDs(err) {
			a.noteOutOfFDs()
			return wire.CodeLimit, a.cfg.Node + ": " + errOutOfFDs
		}
		return wire.CodeInternal, "socketpair: " + err.Error()
	}
	f := os.NewFile(uintptr(fds[0]), "channel")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		unix.Close(fds[1])
		l.proc.release(false, car.name(), m.SrcPart)
		if outOfFDs(err) {
			a.noteOutOfFDs()
			return wire.CodeLimit, a.cfg.Node + ": " + errOutOfFDs
		}
		return wire.CodeInternal, "socket: " + err.Error()
	}
	ch := a.newChannel(m.Kind, p.name, l.proc, car)
	ch.setSocket(c.(*net.UnixConn), nil)
	ch.state = chanState{peer: car.name(), remotePart: m.SrcPart, remoteIndex: m.Index, remoteConn: m.Conn, status: statusOpen}
	if !ch.openWindow() {
		unix.Close(fds[1])
		ch.sock.Close()
		l.proc.release(false, car.name(), m.SrcPart)
		return wire.CodeLimit, a.budgetSpent()
	}
	if err := ch.keys.alloc(a.arena); err != nil {
		unix.Close(fds[1])
		ch.sock.Close()
		l.proc.release(false, car.name(), m.SrcPart)
		return wire.CodeLimit, a.tableFull()
	}
	ch.keys.setSend(m.Key[:])
	ch.peerGrant = uint64(m.Window)
	if l.ring {
		if r, err := a.makeRing(l.proc); err == nil {
			ch.ring = r // nothing else sees the channel yet
		} else {
			a.log.Warn("cannot make a channel's ring: it uses its socket", "conn", ch.id, "err", err)
		}
	}
	ch.conn = local.Conn{Partition: p.name, Process: l.proc.wire(), Service: l.service, RemoteNode: m.SrcNode,
		RemotePartition: m.SrcPart, RemoteProcess: local.Proc{PID: m.SrcProc.PID, UID: m.SrcProc.UID, GID: m.SrcProc.GID},
		Kind: m.Kind.String(), Created: time.Now()}
	if err := a.tables.add(ch); err != nil {
		unix.Close(fds[1])
		ch.end(nil, false)
		ch.sock.Close()
		if errors.Is(err, errDuplicate) {
			return wire.CodeExists, fmt.Sprintf("channel %d of %s is already open", m.Conn, car.name())
		}
		return wire.CodeLimit, a.tableFull()
	}
	// From here the channel is in the tables: the peer may close it, or
	// restart, at any moment, and its keys go with it. Each step finds
	// out; a channel that ended is told to its socket by start. A policy
	// reloaded since the check in handleOpen is seen here, or swept the
	// tables with the channel in them.
	if why, ok := a.allows(ch.row()); !ok {
		unix.Close(fds[1])
		ch.end(nil, false)
		ch.sock.Close()
		return wire.CodeDenied, why
	}
	acc := &wire.Accept{InitIndex: m.Index, InitConn: m.Conn, Index: ch.state.index, Conn: ch.id,
		Window: ch.window, DstProc: l.proc.wireID()}
	if !ch.keys.copyRecv(acc.Key[:]) {
		unix.Close(fds[1])
		<-car.opens()
		ch.start()
		return wire.CodeOK, ""
	}
	a.goRun(func() {
		defer func() { <-car.opens() }()
		defer clear(acc.Key[:])
		a.handOver(car, ch, l, fds[1], acc, refuse)
	})
	return wire.CodeOK, ""
}

// handOver gives an accepted channel's socket fd to its listener and
// answers the peer with acc.
func (a *Agent) handOver(car carrier, ch *channel, l *listener, fd int, acc *wire.Accept, refuse func(wire.Code, string, ...any)) {
	if ch.ended.Load() { // the peer closed it already: no need to bother the listener
		unix.Close(fd)
		ch.start()
		return
	}
	row := ch.row()
	var err error
	if ch.ring != nil {
		err = ch.offerRing() // waits in the socket for the listener
	}
	if err == nil {
		err = l.notify(&row, fd, ch.ring != nil)
	}
	unix.Close(fd)
	if err != nil {
		ch.end(nil, false)
		ch.start()
		a.log.Info("listener did not take a channel", "partition", ch.part, "service", l.service, "err", err)
		refuse(wire.CodeBusy, "the listener of %s/%s/%s is not taking channels", a.cfg.Node, ch.part, l.service)
		return
	}
	// The listener has the socket: what the peer sends once it has the
	// Accept may go to it from now, even if the channel ends (a Close
	// right behind the data) before its pumps start.
	ch.rmu.Lock()
	ch.deliver = true
	ch.rmu.Unlock()
	msg := acc.Marshal()
	err = car.sendControl(msg)
	clear(msg)
	if err != nil {
		ch.abort(wire.CodeUnreachable, "the link to "+car.name()+" failed as the channel was accepted", false)
	}
	a.counters.opensOK.Add(1)
	ch.start()
}

// nodeHasPartition reports whether the certificate of the node behind car
// lists partition.
func (a *Agent) nodeHasPartition(car carrier, partition string) bool {
	switch c := car.(type) {
	case *selfCarrier:
		return a.cert.HasPartition(partition)
	case *peerCarrier:
		l := c.link()
		return l != nil && l.Peer().HasPartition(partition) // the certificate the link verified
	}
	return false
}

// HandleControl receives the channel control messages of a link.
func (a *Agent) HandleControl(l *link.Link, msg []byte) {
	if msg[0] == wire.OpIdle {
		if err := a.handleIdle(l, msg); err != nil {
			a.counters.malformed.Add(1)
			a.log.Warn("peer sent a bad control message; closing link", "peer", l.Peer().Name, "err", err)
			l.Close(fmt.Errorf("bad control message: %w", err))
		}
		return
	}
	car := a.carrierOf(l)
	if car == nil {
		return // the link is ending
	}
	if err := a.handleControl(car, msg); err != nil {
		a.counters.malformed.Add(1)
		a.log.Warn("peer sent a bad control message; closing link", "peer", l.Peer().Name, "err", err)
		l.Close(fmt.Errorf("bad control message: %w", err))
	}
}

func (a *Agent) handleControl(car carrier, msg []byte) error {
	switch msg[0] {
	case wire.OpOpen:
		m, err := wire.ParseOpen(msg)
		if err != nil {
			return err
		}
		a.handleOpen(car, m)
	case wire.OpAccept:
		m, err := wire.ParseAccept(msg)
		if err != nil {
			return err
		}
		a.handleAccept(car, m)
	case wire.OpRefuse:
		m, err := wire.ParseRefuse(msg)
		if err != nil {
			return err
		}
		a.handleRefuse(car, m)
	case wire.OpClose:
		m, err := wire.ParseClose(msg)
		if err != nil {
			return err
		}
		a.handleClose(car, m)
	case wire.OpCredit:
		m, err := wire.ParseCredit(msg)
		if err != nil {
			return err
		}
		a.handleCredit(car, m)
	case wire.OpRekey:
		m, err := wire.ParseRekey(msg)
		if err != nil {
			return err
		}
		a.handleRekey(car, m)
	default:
		return fmt.Errorf("unknown control op %d", msg[0])
	}
	return nil
}
