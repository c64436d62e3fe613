package agent

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/ident"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// partition is one partition this node hosts: its socket, the requests
// waiting to be read on it, and its listeners.
type partition struct {
	name  string
	cfg   config.Partition
	ln    *net.UnixListener
	adm   *admission // who is read when (admission.go)
	quiet quietLog   // refusals of the socket, logged at most once a second

	// Payload bytes its processes' channels carried, each way, in all
	// (for the metrics): in, delivered to its processes; out, taken from
	// them. One atomic add per frame, shared by the partition's channels.
	bytesIn, bytesOut atomic.Uint64

	mu       sync.Mutex
	services map[string]*listener
}

// listener is a process listening on a service of a partition.
type listener struct {
	part    *partition
	service string
	conn    *net.UnixConn
	proc    *procRef
	ring    bool // its channels go through rings (ring.go)
	wmu     sync.Mutex
}

// notify hands the listener an accepted channel: the row, and the socket.
func (l *listener) notify(row *local.Conn, fd int, ring bool) error {
	b, _ := json.Marshal(local.Notice{Event: "accept", Conn: row, Ring: ring})
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.conn.SetWriteDeadline(time.Now().Add(time.Second))
	return local.SendWithFD(l.conn, append(b, '\n'), fd)
}

// listener returns the listener of service, if any. A listener that the
// listen rules in force (they may have been reloaded since it started) no
// longer allow is dropped: it gets no more channels.
func (p *partition) listener(service string) *listener {
	p.mu.Lock()
	l := p.services[service]
	p.mu.Unlock()
	if l == nil {
		return nil
	}
	a := l.proc.a
	if ok, _ := a.policy.Load().MayListen(p.name, service, l.proc.uid); ok {
		return l
	}
	p.mu.Lock()
	if p.services[service] == l {
		delete(p.services, service)
	}
	p.mu.Unlock()
	a.counters.refuse("listen_denied")
	a.log.Warn("listener dropped: the partition's listen rules no longer allow it", "partition", p.name,
		"service", service, "pid", l.proc.pid, "uid", l.proc.uid)
	l.conn.Close() // its listen ends
	return nil
}

// procRef is a connected process; budget.go counts its channels against
// the limits.
type procRef struct {
	a        *Agent
	part     *partition
	pid      int32
	uid, gid uint32
	key      ident.Key // pid and start time: never names another process
}

// wire returns the process's identity for a connection table row.
func (r *procRef) wire() local.Proc {
	return local.Proc{PID: uint32(r.pid), UID: r.uid, GID: r.gid}
}

// wireID returns the process's identity for a control message.
func (r *procRef) wireID() wire.Proc {
	return wire.Proc{PID: uint32(r.pid), UID: r.uid, GID: r.gid}
}

// listenPartitions makes every partition's socket.
func (a *Agent) listenPartitions() error {
	for _, name := range sortedPartitions(a.cfg) {
		pc := a.cfg.Partitions[name]
		ln, err := listenUnix(pc.Socket, socketPerm{mode: pc.Mode, uid: pc.UID, gid: pc.GID, dirMode: 0o755})
		if err != nil {
			a.closePartitions()
			return fmt.Errorf("partition %s: %w", name, err)
		}
		p := &partition{name: name, cfg: pc, ln: ln, services: map[string]*listener{}}
		lim := a.cfg.Limits
		p.adm = newAdmission(lim.PendingRequests, lim.PendingRequestsPerUID, lim.QueuedRequests, lim.QueuedRequestsPerUID,
			a.cfg.Timers.Request, func(ws []*waiter) { a.expired(p, ws) })
		a.partitions[name] = p
	}
	return nil
}

func (a *Agent) closePartitions() {
	for _, p := range a.partitions {
		if p.ln != nil {
			p.ln.Close()
			os.Remove(p.cfg.Socket)
		}
		if p.adm != nil {
			for _, w := range p.adm.close() {
				w.conn.Close()
			}
		}
	}
}

// acceptLocal accepts the processes of partition p and admits them (see
// admission.go): the uid first, from SO_PEERCRED, nothing else before it.
func (a *Agent) acceptLocal(p *partition) {
	stop := make(chan struct{})
	defer close(stop)
	a.goRun(func() { p.adm.run(stop) })
	for {
		conn, err := p.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if outOfFDs(err) {
				a.refuseForFDs(p.ln)
				continue
			}
			a.log.Warn("partition accept", "partition", p.name, "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		w := &waiter{conn: conn, accepted: time.Now()}
		if w.uid, err = peerUID(conn); err != nil {
			a.refuseRequest(p, conn, "request_no_credentials", wire.CodeInternal,
				"cannot read the credentials of the connecting process", "err", err)
			continue
		}
		switch p.adm.admit(w) {
		case serveNow:
			a.serveRequest(p, w)
		case queued: // served when a slot frees (requestRead), or answered when its time runs out (expired)
		case busyUID:
			a.refuseRequest(p, conn, "request_queue_full_uid", wire.CodeBusy,
				fmt.Sprintf("uid %d has %d requests waiting on partition %s, its share; try again", w.uid, p.adm.queuePerUID, p.name),
				"uid", w.uid, "limit", p.adm.queuePerUID)
		case busyAll:
			a.refuseRequest(p, conn, "request_queue_full", wire.CodeBusy,
				fmt.Sprintf("%d requests are waiting on partition %s, its limit; try again", p.adm.queue, p.name),
				"uid", w.uid, "limit", p.adm.queue)
		default: // closing
			conn.Close()
		}
	}
}

// refuseRequest answers a process connection at once with code and msg,
// closes it, and counts and logs (at most once a second per reason) why.
func (a *Agent) refuseRequest(p *partition, conn *net.UnixConn, reason string, code wire.Code, msg string, logArgs ...any) {
	a.counters.refuse(reason)
	if n, ok := p.quiet.allow(reason, time.Now()); ok {
		a.log.Warn("partition request refused", append([]any{"partition", p.name, "reason", reason,
			"suppressed", n}, logArgs...)...)
	}
	by := a.cfg.Node
	if code == wire.CodeTimeout {
		by = "" // the process's own doing, as when its request is being read
	}
	reply(conn, failure(code, by, msg))
	conn.Close()
}

// serveRequest serves w, which holds a slot, and serves in its place the
// waiters that get its slot if it cannot be served (the agent is stopping).
func (a *Agent) serveRequest(p *partition, w *waiter) {
	for w != nil {
		if a.trackLocal(w.conn) {
			a.goRun(func() { a.serveLocal(p, w) })
			return
		}
		w.conn.Close()
		w = p.adm.done(w.uid)
	}
}

// requestRead gives back w's slot: its request was read, or will never be.
func (a *Agent) requestRead(p *partition, w *waiter) {
	if next := p.adm.done(w.uid); next != nil {
		a.serveRequest(p, next)
	}
}

// expired answers waiters whose request time ran out in the queue.
func (a *Agent) expired(p *partition, ws []*waiter) {
	for _, w := range ws {
		a.refuseRequest(p, w.conn, "request_timeout_queued", wire.CodeTimeout,
			fmt.Sprintf("request not received within %s", a.cfg.Timers.Request), "uid", w.uid)
	}
}

// trackLocal records a process connection so shutdown can close it.
func (a *Agent) trackLocal(c *net.UnixConn) bool {
	a.localMu.Lock()
	defer a.localMu.Unlock()
	if a.localConns == nil {
		return false // shutting down
	}
	a.localConns[c] = struct{}{}
	return true
}

func (a *Agent) untrackLocal(c *net.UnixConn) {
	a.localMu.Lock()
	defer a.localMu.Unlock()
	delete(a.localConns, c)
}

func failure(code wire.Code, by, msg string) *local.Response {
	return &local.Response{Error: &local.Error{Code: code.String(), Message: msg, By: by}}
}

// addrPattern matches the network addresses that error texts carry: IPv4
// (with or without a port) and bracketed IPv6 with a port.
var addrPattern = regexp.MustCompile(`\[[0-9A-Za-z:.%]*\]:[0-9]+|\b[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?::[0-9]+)?\b`)

// withheld stands in an error to a process for an address taken out.
const withheld = "(address withheld)"

// withoutAddrs returns e with every network address and configured peer
// address taken out of its message: a process learns which node failed,
// never where that node is (the admin's sinc peers shows that). The dial
// path words its own errors so; this also covers the error texts it passes
// on from below (a link's write error names both ends).
func (a *Agent) withoutAddrs(e *local.Error) *local.Error {
	msg := addrPattern.ReplaceAllString(e.Message, withheld)
	a.mu.Lock()
	for _, pr := range a.peers {
		msg = strings.ReplaceAll(msg, pr.addr, withheld)
		if host, _, err := net.SplitHostPort(pr.addr); err == nil && host != "" {
			msg = strings.ReplaceAll(msg, host, withheld)
		}
	}
	a.mu.Unlock()
	if msg == e.Message {
		return e
	}
	a.log.Info("address withheld from an error to a process", "code", e.Code, "message", e.Message)
	c := *e
	c.Message = msg
	return &c
}

func reply(c *net.UnixConn, r *local.Response) error {
	b, _ := json.Marshal(r)
	c.SetWriteDeadline(time.Now().Add(time.Second))
	_, err := c.Write(append(b, '\n'))
	c.SetWriteDeadline(time.Time{})
	return err
}

// serveLocal reads one request from a process and serves it. w holds a
// slot of the partition's admission until its request is read.
func (a *Agent) serveLocal(p *partition, w *waiter) {
	conn := w.conn
	keep := false // the connection lives on as a channel or a listener
	defer func() {
		if !keep {
			conn.Close()
		}
		a.untrackLocal(conn)
	}()
	id, err := ident.FromConn(conn, w.accepted)
	if err != nil {
		a.requestRead(p, w)
		if outOfFDs(err) {
			a.noteOutOfFDs()
			reply(conn, failure(wire.CodeLimit, a.cfg.Node, errOutOfFDs))
			return
		}
		a.log.Warn("cannot identify a connecting process", "partition", p.name, "err", err)
		reply(conn, failure(wire.CodeInternal, a.cfg.Node, "cannot identify the connecting process"))
		return
	}
	proc := &procRef{a: a, part: p, pid: id.PID, uid: id.UID, gid: id.GID, key: id.Key()}
	id.Close() // the numbers are what the tables need

	// The request is due timers.request after the connect, however long
	// the connection waited for its turn.
	conn.SetReadDeadline(w.accepted.Add(a.cfg.Timers.Request))
	req, rd, lerr := readRequest(conn, a.cfg.Timers.Request)
	a.requestRead(p, w)
	conn.SetReadDeadline(time.Time{})
	if lerr != nil {
		if lerr.Code != "" {
			a.log.Info("bad request on partition socket", "partition", p.name, "pid", proc.pid,
				"uid", proc.uid, "code", lerr.Code, "reason", lerr.Message)
			reply(conn, &local.Response{Error: lerr})
		}
		return
	}
	switch req.Op {
	case local.OpOpen:
		ch, lerr := a.dial(p, proc, conn, rd, req)
		if lerr != nil {
			reply(conn, &local.Response{Error: a.withoutAddrs(lerr)})
			return
		}
		if req.Ring {
			ch.attachRing()
		}
		row := ch.row()
		err := reply(conn, &local.Response{OK: true, Conn: &row, Ring: ch.ring != nil})
		if err == nil && ch.ring != nil {
			err = ch.offerRing()
		}
		if err != nil {
			ch.abort(wire.CodeReset, "the dialing process went away", true)
			return
		}
		keep = true
		ch.start()
	case local.OpListen:
		keep = a.listen(p, proc, conn, req)
	case local.OpConns:
		rows := []local.Conn{}
		for _, ch := range a.tables.all() {
			if ch.part == p.name {
				rows = append(rows, ch.row())
			}
		}
		sortRows(rows)
		reply(conn, &local.Response{OK: true, Conns: rows})
	default:
		reply(conn, failure(wire.CodeBadRequest, "", fmt.Sprintf("unknown op %.20q: want open, listen or conns", req.Op)))
	}
}

// readRequest reads the request line. The error is nil on success; an error
// with an empty code means the process left without a word.
func readRequest(conn *net.UnixConn, timeout time.Duration) (*local.Request, *bytes.Reader, *local.Error) {
	bad := func(code wire.Code, msg string) *local.Error { return &local.Error{Code: code.String(), Message: msg} }
	br := bufio.NewReaderSize(conn, local.MaxRequest)
	line, err := br.ReadSlice('\n')
	if err != nil {
		var ne net.Error
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			return nil, nil, bad(wire.CodeBadRequest, fmt.Sprintf("request longer than %d bytes", local.MaxRequest))
		case errors.As(err, &ne) && ne.Timeout():
			return nil, nil, bad(wire.CodeTimeout, fmt.Sprintf("request not received within %s", timeout))
		case len(line) == 0 && errors.Is(err, io.EOF):
			return nil, nil, &local.Error{}
		}
		return nil, nil, bad(wire.CodeBadRequest, "request must be one JSON line ending in a newline")
	}
	req, err := local.ParseRequest(line)
	if err != nil {
		return nil, nil, bad(wire.CodeBadRequest, err.Error())
	}
	var pre *bytes.Reader
	if n := br.Buffered(); n > 0 { // the process sent channel data at once
		rest, _ := br.Peek(n)
		pre = bytes.NewReader(bytes.Clone(rest))
	}
	return req, pre, nil
}

// listen registers a listener; it reports whether the connection lives on.
func (a *Agent) listen(p *partition, proc *procRef, conn *net.UnixConn, req *local.Request) bool {
	if err := validService(req.Service); err != nil {
		reply(conn, failure(wire.CodeBadRequest, "", err.Error()))
		return false
	}
	if ok, _ := a.policy.Load().MayListen(p.name, req.Service, proc.uid); !ok {
		a.counters.refuse("listen_denied")
		a.log.Warn("listen refused by the partition's listen rules", "partition", p.name, "service", req.Service,
			"pid", proc.pid, "uid", proc.uid)
		reply(conn, failure(wire.CodeDenied, a.cfg.Node, fmt.Sprintf(
			"uid %d may not listen on %s/%s/%s: the listen rules of partition %s reserve that service for other uids",
			proc.uid, a.cfg.Node, p.name, req.Service, p.name)))
		return false
	}
	p.listener(req.Service) // drops a holder the rules in force no longer allow
	l := &listener{part: p, service: req.Service, conn: conn, proc: proc, ring: req.Ring}
	p.mu.Lock()
	switch {
	case p.services[req.Service] != nil:
		p.mu.Unlock()
		reply(conn, failure(wire.CodeExists, a.cfg.Node, fmt.Sprintf("service %s/%s/%s already has a listener", a.cfg.Node, p.name, req.Service)))
		return false
	case len(p.services) >= a.cfg.Limits.ListenersPerPartition:
		p.mu.Unlock()
		reply(conn, failure(wire.CodeLimit, a.cfg.Node, fmt.Sprintf("partition %s has %d listeners, its limit", p.name, len(p.services))))
		return false
	}
	p.services[req.Service] = l
	p.mu.Unlock()
	l.wmu.Lock()
	err := reply(conn, &local.Response{OK: true, Addr: a.cfg.Node + "/" + p.name + "/" + req.Service})
	l.wmu.Unlock()
	a.log.Info("listening", "partition", p.name, "service", req.Service, "pid", proc.pid, "uid", proc.uid)
	if err == nil {
		// The listener says nothing more; its leaving ends the listen.
		var b [1]byte
		conn.Read(b[:])
	}
	p.mu.Lock()
	if p.services[req.Service] == l {
		delete(p.services, req.Service)
	}
	p.mu.Unlock()
	a.log.Info("listener gone", "partition", p.name, "service", req.Service)
	return false
}

func validService(s string) error {
	if s == "" {
		return errors.New("listen needs a service name")
	}
	if _, err := local.ParseAddr("n/p/" + s); err != nil {
		return fmt.Errorf("service name %.70q is not valid", s)
	}
	return nil
}

// quietLog lets a repeated log line through at most once a second per
// reason, and says how many it held back since the last one. Reasons are
// constants, so its maps stay small.
type quietLog struct {
	mu   sync.Mutex
	last map[string]time.Time
	held map[string]int
}

// allow reports whether a line for reason may be logged now, and how many
// were held back before it.
func (q *quietLog) allow(reason string, now time.Time) (held int, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.last == nil {
		q.last, q.held = map[string]time.Time{}, map[string]int{}
	}
	if now.Sub(q.last[reason]) < time.Second {
		q.held[reason]++
		return 0, false
	}
	held = q.held[reason]
	q.last[reason], q.held[reason] = now, 0
	return held, true
}

func sortRows(rows []local.Conn) {
	slices.SortFunc(rows, func(x, y local.Conn) int { return cmp.Compare(x.ID, y.ID) })
}
