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
	"slices"
	"sync"
	"time"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/ident"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// partition is one partition this node hosts: its socket, its listeners
// and its channel count.
type partition struct {
	name    string
	cfg     config.Partition
	ln      *net.UnixListener
	pending chan struct{} // one token per request being read

	mu       sync.Mutex
	services map[string]*listener
	channels int
}

// listener is a process listening on a service of a partition.
type listener struct {
	part    *partition
	service string
	conn    *net.UnixConn
	proc    *procRef
	wmu     sync.Mutex
}

// notify hands the listener an accepted channel: the row, and the socket.
func (l *listener) notify(row *local.Conn, fd int) error {
	b, _ := json.Marshal(local.Notice{Event: "accept", Conn: row})
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.conn.SetWriteDeadline(time.Now().Add(time.Second))
	return local.SendWithFD(l.conn, append(b, '\n'), fd)
}

func (p *partition) listener(service string) *listener {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.services[service]
}

// procRef is a connected process and what it holds against the limits.
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

// take counts one more channel against the partition's limit and, for a
// channel the process dialed (dialed), against the process's: a process
// that floods opens meets its own limit, while a service is bounded by its
// partition's.
func (r *procRef) take(dialed bool) error {
	a, lim := r.a, r.a.cfg.Limits
	a.procMu.Lock()
	defer a.procMu.Unlock()
	k := r.key
	if dialed && a.procs[k] >= lim.ChannelsPerProcess {
		return fmt.Errorf("process %d has %d channels open, the limit per process", r.pid, lim.ChannelsPerProcess)
	}
	r.part.mu.Lock()
	defer r.part.mu.Unlock()
	if r.part.channels >= lim.ChannelsPerPartition {
		return fmt.Errorf("partition %s has %d channels open, its limit", r.part.name, lim.ChannelsPerPartition)
	}
	if dialed {
		a.procs[k]++
	}
	r.part.channels++
	return nil
}

// release gives back what take counted.
func (r *procRef) release(dialed bool) {
	a := r.a
	a.procMu.Lock()
	defer a.procMu.Unlock()
	if k := r.key; dialed {
		if a.procs[k]--; a.procs[k] <= 0 {
			delete(a.procs, k)
		}
	}
	r.part.mu.Lock()
	r.part.channels--
	r.part.mu.Unlock()
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
		a.partitions[name] = &partition{name: name, cfg: pc, ln: ln, services: map[string]*listener{},
			pending: make(chan struct{}, a.cfg.Limits.PendingRequests)}
	}
	return nil
}

func (a *Agent) closePartitions() {
	for _, p := range a.partitions {
		if p.ln != nil {
			p.ln.Close()
			os.Remove(p.cfg.Socket)
		}
	}
}

func (a *Agent) acceptLocal(p *partition) {
	for {
		conn, err := p.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			a.log.Warn("partition accept", "partition", p.name, "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		select {
		case p.pending <- struct{}{}:
		default:
			a.log.Warn("partition request refused: too many requests in progress", "partition", p.name,
				"limit", cap(p.pending))
			reply(conn, failure(wire.CodeBusy, a.cfg.Node, "too many requests in progress on partition "+p.name))
			conn.Close()
			continue
		}
		if !a.trackLocal(conn) {
			<-p.pending
			conn.Close()
			continue
		}
		a.goRun(func() { a.serveLocal(p, conn) })
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

func reply(c *net.UnixConn, r *local.Response) error {
	b, _ := json.Marshal(r)
	c.SetWriteDeadline(time.Now().Add(time.Second))
	_, err := c.Write(append(b, '\n'))
	c.SetWriteDeadline(time.Time{})
	return err
}

// serveLocal reads one request from a process and serves it.
func (a *Agent) serveLocal(p *partition, conn *net.UnixConn) {
	keep := false // the connection lives on as a channel or a listener
	defer func() {
		if !keep {
			conn.Close()
		}
		a.untrackLocal(conn)
	}()
	// The token taken in acceptLocal is held until the request is read.
	accepted := time.Now()
	id, err := ident.FromConn(conn, accepted)
	if err != nil {
		<-p.pending
		a.log.Warn("cannot identify a connecting process", "partition", p.name, "err", err)
		reply(conn, failure(wire.CodeInternal, a.cfg.Node, "cannot identify the connecting process"))
		return
	}
	proc := &procRef{a: a, part: p, pid: id.PID, uid: id.UID, gid: id.GID, key: id.Key()}
	id.Close() // the numbers are what the tables need

	conn.SetReadDeadline(accepted.Add(a.cfg.Timers.Request))
	req, rd, lerr := readRequest(conn, a.cfg.Timers.Request)
	<-p.pending
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
			reply(conn, &local.Response{Error: lerr})
			return
		}
		row := ch.row()
		if err := reply(conn, &local.Response{OK: true, Conn: &row}); err != nil {
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
	l := &listener{part: p, service: req.Service, conn: conn, proc: proc}
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

func sortRows(rows []local.Conn) {
	slices.SortFunc(rows, func(x, y local.Conn) int { return cmp.Compare(x.ID, y.ID) })
}
