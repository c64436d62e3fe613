package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/local"
)

// Workers are the `sinc bench-worker` processes: a server and a client per
// transport. Each reads commands, one JSON line at a time, on its stdin
// and answers each with one JSON line on its stdout; the first line a
// worker writes says it is ready. A worker exits when its stdin ends.

// Command is one request of the orchestrator to a worker.
type Command struct {
	Op      string `json:"op"` // bulk, pingpong, msgrate, setup, idle, release, info, count, quit
	Bytes   int64  `json:"bytes,omitempty"`
	N       int    `json:"n,omitempty"`
	Size    int    `json:"size,omitempty"`
	Batched bool   `json:"batched,omitempty"`
	Conc    int    `json:"conc,omitempty"`
	// Timeout bounds the command (default 2 minutes): past it, it fails.
	Timeout time.Duration `json:"timeout,omitempty"`
	// MaxTime ends pingpong, msgrate and setup early, with what they did
	// by then (0: only N bounds them).
	MaxTime time.Duration `json:"max_time,omitempty"`
}

// Reply is a worker's answer.
type Reply struct {
	Err     string  `json:"err,omitempty"`
	Ready   bool    `json:"ready,omitempty"`
	Addr    string  `json:"addr,omitempty"`    // server: where it listens
	Seconds float64 `json:"seconds,omitempty"` // the timed part of the command
	Bytes   int64   `json:"bytes,omitempty"`
	N       int     `json:"n,omitempty"`      // round trips, messages, cycles
	P50     float64 `json:"p50_ns,omitempty"` // latencies of round trips or opens
	P99     float64 `json:"p99_ns,omitempty"`
	Mean    float64 `json:"mean_ns,omitempty"`
	Max     float64 `json:"max_ns,omitempty"`
	Conns   int     `json:"conns,omitempty"` // idle: connections held; count: live connections
	Info    string  `json:"info,omitempty"`
}

const defaultTimeout = 2 * time.Minute

// Test header: the first 16 bytes a client sends on a connection (on a
// message channel, the first message): op, message size, count.
const (
	hdrLen        = 16
	opBulk        = 'B'
	opPing        = 'P'
	opFramed      = 'F'        // length-prefixed messages in a byte stream
	opMessages    = 'M'        // one message per message-channel message, then an empty one
	endMark       = 0xffffffff // the length prefix after the last framed message
	chunk         = 64 << 10
	ackLen        = 8
	maxPingSize   = 64 << 10
	maxFramedSize = 1 << 20
)

func putHeader(op byte, size int, count int64) []byte {
	h := make([]byte, hdrLen)
	h[0] = op
	binary.BigEndian.PutUint32(h[4:], uint32(size))
	binary.BigEndian.PutUint64(h[8:], uint64(count))
	return h
}

// WorkerMain runs `sinc bench-worker server|client [flags]`.
func WorkerMain(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 || (args[0] != "server" && args[0] != "client") {
		return errors.New("usage: sinc bench-worker server|client --transport T [flags]")
	}
	role := args[0]
	fs := flag.NewFlagSet("sinc bench-worker "+role, flag.ContinueOnError)
	fs.SetOutput(stderr)
	tr := fs.String("transport", "", "tcp, tls, sinc-stream, sinc-ring or sinc-message")
	addr := fs.String("addr", "", "client: the server's address (host:port, or node/partition/service)")
	socket := fs.String("socket", "", "sinc: the partition socket")
	certPath := fs.String("cert", "", "tls: the certificate (server: with --key; client: trusted)")
	keyPath := fs.String("key", "", "tls server: the key")
	profile := fs.String("cpuprofile", "", "write a CPU profile of this worker to this file")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if !validTransport(*tr) {
		return fmt.Errorf("unknown transport %q", *tr)
	}
	raiseNoFile()
	if *profile != "" {
		f, err := os.Create(*profile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	out := &replier{w: stdout}
	if role == "server" {
		return serverMain(*tr, *socket, *certPath, *keyPath, stdin, out)
	}
	ep := &endpoint{transport: *tr, addr: *addr, socket: *socket}
	if *tr == TLS {
		c, err := clientTLSConfig(*certPath)
		if err != nil {
			return err
		}
		ep.tlsConf = c
	}
	return clientMain(ep, stdin, out)
}

// raiseNoFile raises the soft limit of open files to the hard one (Go
// does it at start already; this makes it explicit).
func raiseNoFile() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

type replier struct {
	mu sync.Mutex
	w  io.Writer
}

func (r *replier) send(rep Reply) error {
	b, _ := json.Marshal(rep)
	r.mu.Lock()
	defer r.mu.Unlock()
	_, err := r.w.Write(append(b, '\n'))
	return err
}

// commands yields the commands on in until it ends or a quit.
func commands(in io.Reader, do func(Command) Reply, out *replier) error {
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		var cmd Command
		if err := json.Unmarshal(sc.Bytes(), &cmd); err != nil {
			if err := out.send(Reply{Err: "bad command: " + err.Error()}); err != nil {
				return err
			}
			continue
		}
		if cmd.Op == "quit" {
			return out.send(Reply{})
		}
		if err := out.send(do(cmd)); err != nil {
			return err
		}
	}
	return sc.Err()
}

// --- server ---

func serverMain(tr, socket, certPath, keyPath string, stdin io.Reader, out *replier) error {
	var ln net.Listener
	var err error
	switch tr {
	case TCP, TLS:
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		if err == nil && tr == TLS {
			var conf *tls.Config
			if conf, err = serverTLSConfig(certPath, keyPath); err == nil {
				ln = tls.NewListener(ln, conf)
			}
		}
	default:
		lc := sinc.ListenConfig{Socket: socket, NoRing: !usesRing(tr)}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ln, err = lc.Listen(ctx, serviceOf(tr))
		cancel()
	}
	if err != nil {
		return err
	}
	defer ln.Close()
	s := &server{tr: tr}
	go s.accept(ln)
	if err := out.send(Reply{Ready: true, Addr: ln.Addr().String()}); err != nil {
		return err
	}
	return commands(stdin, func(c Command) Reply {
		switch c.Op {
		case "count":
			return Reply{Conns: int(s.live.Load()), N: int(s.served.Load()), Info: s.lastErr()}
		}
		return Reply{Err: "server: unknown op " + c.Op}
	}, out)
}

type server struct {
	tr     string
	live   atomic.Int64 // connections open (after the TLS handshake)
	served atomic.Int64 // connections accepted in all
	mu     sync.Mutex
	err    string // the last failure of a connection
}

func (s *server) fail(err error) {
	s.mu.Lock()
	s.err = err.Error()
	s.mu.Unlock()
}

func (s *server) lastErr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.err
	s.err = ""
	return e
}

func (s *server) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			if !errors.Is(err, net.ErrClosed) {
				s.fail(fmt.Errorf("accept: %w", err))
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return
		}
		s.served.Add(1)
		go s.handle(c)
	}
}

func (s *server) handle(c net.Conn) {
	defer c.Close()
	if tc, ok := c.(*tls.Conn); ok {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			return // a client that hung up during setup
		}
		c.SetDeadline(time.Time{})
	}
	s.live.Add(1)
	defer s.live.Add(-1)
	// An idle connection waits here, holding nothing of its own, until
	// its client closes it.
	var hdr [hdrLen]byte
	if err := readExactly(c, hdr[:], isMessage(s.tr)); err != nil {
		if err != io.EOF {
			s.fail(fmt.Errorf("header: %w", err))
		}
		return
	}
	op, size, count := hdr[0], int(binary.BigEndian.Uint32(hdr[4:])), int64(binary.BigEndian.Uint64(hdr[8:]))
	c.SetDeadline(time.Now().Add(defaultTimeout))
	buf := make([]byte, chunk)
	got, err := s.serve(c, op, size, count, buf)
	if err != nil {
		s.fail(fmt.Errorf("%c: %w", op, err))
		return
	}
	var ack [ackLen]byte
	binary.BigEndian.PutUint64(ack[:], uint64(got))
	if op != opPing {
		if _, err := c.Write(ack[:]); err != nil {
			s.fail(err)
			return
		}
	}
	// The client closes: wait for it, so that the close is its own.
	c.Read(buf)
}

func (s *server) serve(c net.Conn, op byte, size int, count int64, buf []byte) (int64, error) {
	msg := isMessage(s.tr)
	switch op {
	case opBulk:
		var got int64
		for got < count {
			n, err := c.Read(buf)
			if err != nil {
				return got, err
			}
			got += int64(n)
		}
		return got, nil
	case opPing:
		if size <= 0 || size > maxPingSize {
			return 0, fmt.Errorf("ping size %d", size)
		}
		// Until count round trips, or the client ends early.
		for i := int64(0); i < count; i++ {
			if err := readExactly(c, buf[:size], msg); err != nil {
				if err == io.EOF {
					return i, nil
				}
				return i, err
			}
			if _, err := c.Write(buf[:size]); err != nil {
				return i, err
			}
		}
		return count, nil
	case opFramed:
		if size < 0 || size > maxFramedSize {
			return 0, fmt.Errorf("message size %d", size)
		}
		if size > len(buf) {
			buf = make([]byte, size)
		}
		br := bufio.NewReaderSize(c, chunk)
		var pre [4]byte
		for i := int64(0); ; i++ {
			if _, err := io.ReadFull(br, pre[:]); err != nil {
				return i, err
			}
			n := binary.BigEndian.Uint32(pre[:])
			if n == endMark {
				return i, nil
			}
			if int(n) != size || i == count {
				return i, fmt.Errorf("message %d of at most %d: %d bytes, want %d", i, count, n, size)
			}
			if _, err := io.ReadFull(br, buf[:size]); err != nil {
				return i, err
			}
		}
	case opMessages:
		if !msg || size == 0 {
			return 0, errors.New("message test on a stream, or of empty messages")
		}
		for i := int64(0); ; i++ {
			n, err := c.Read(buf)
			if err != nil {
				return i, err
			}
			if n == 0 { // the end
				return i, nil
			}
			if n != size || i == count {
				return i, fmt.Errorf("message %d of at most %d: %d bytes, want %d", i, count, n, size)
			}
		}
	}
	return 0, fmt.Errorf("unknown op %q", op)
}

// readExactly reads len(p) bytes: one message on a message channel, else
// as many reads as it takes.
func readExactly(c net.Conn, p []byte, msg bool) error {
	if !msg {
		_, err := io.ReadFull(c, p)
		return err
	}
	n, err := c.Read(p)
	if err != nil {
		return err
	}
	if n != len(p) {
		return fmt.Errorf("message of %d bytes, want %d", n, len(p))
	}
	return nil
}

// --- client ---

type client struct {
	ep   *endpoint
	held []net.Conn // idle connections
}

func clientMain(ep *endpoint, stdin io.Reader, out *replier) error {
	cl := &client{ep: ep}
	defer cl.release()
	if err := out.send(Reply{Ready: true}); err != nil {
		return err
	}
	return commands(stdin, cl.do, out)
}

func (cl *client) do(cmd Command) Reply {
	timeout := cmd.Timeout
	if timeout <= 0 {
		timeout = defaultTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var rep Reply
	var err error
	switch cmd.Op {
	case "bulk":
		rep, err = cl.bulk(ctx, cmd.Bytes)
	case "pingpong":
		rep, err = cl.pingpong(ctx, cmd.N, cmd.Size, cmd.MaxTime)
	case "msgrate":
		rep, err = cl.msgrate(ctx, cmd.N, cmd.Size, cmd.Batched, cmd.MaxTime)
	case "setup":
		rep, err = cl.setup(ctx, cmd.N, cmd.Conc, cmd.MaxTime)
	case "idle":
		rep, err = cl.idle(ctx, cmd.N, cmd.Conc)
	case "release":
		cl.release()
	case "info":
		rep, err = cl.info(ctx)
	default:
		err = fmt.Errorf("client: unknown op %q", cmd.Op)
	}
	if err != nil {
		rep.Err = err.Error()
	}
	return rep
}

// open dials and sends the test header; the connection's deadline is the
// context's.
func (cl *client) open(ctx context.Context, op byte, size int, count int64) (net.Conn, error) {
	c, err := cl.ep.dial(ctx)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := c.Write(putHeader(op, size, count)); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func readAck(c net.Conn, want int64, msg bool) error {
	var ack [ackLen]byte
	if err := readExactly(c, ack[:], msg); err != nil {
		return fmt.Errorf("ack: %w", err)
	}
	if got := int64(binary.BigEndian.Uint64(ack[:])); got != want {
		return fmt.Errorf("the server got %d, want %d", got, want)
	}
	return nil
}

// bulk writes total bytes in 64 KiB writes (on a message channel, 64 KiB
// messages) and waits for the server to say it has them all.
func (cl *client) bulk(ctx context.Context, total int64) (Reply, error) {
	if total <= 0 {
		return Reply{}, errors.New("bulk: bytes must be positive")
	}
	c, err := cl.open(ctx, opBulk, chunk, total)
	if err != nil {
		return Reply{}, err
	}
	defer c.Close()
	buf := pattern(chunk)
	t0 := time.Now()
	for sent := int64(0); sent < total; {
		n := int(min(int64(chunk), total-sent))
		if _, err := c.Write(buf[:n]); err != nil {
			return Reply{}, err
		}
		sent += int64(n)
	}
	if err := readAck(c, total, isMessage(cl.ep.transport)); err != nil {
		return Reply{}, err
	}
	return Reply{Seconds: time.Since(t0).Seconds(), Bytes: total}, nil
}

// pattern is n bytes that are not all zero.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

// deadline is when a command of at most maxTime that starts now ends
// early (far away for 0).
func deadline(maxTime time.Duration) time.Time {
	if maxTime <= 0 {
		return time.Now().Add(24 * time.Hour)
	}
	return time.Now().Add(maxTime)
}

// pingpong times up to n round trips of a size-byte message, for at most
// maxTime.
func (cl *client) pingpong(ctx context.Context, n, size int, maxTime time.Duration) (Reply, error) {
	if n <= 0 || size <= 0 || size > maxPingSize {
		return Reply{}, fmt.Errorf("pingpong: n %d, size %d", n, size)
	}
	c, err := cl.open(ctx, opPing, size, int64(n))
	if err != nil {
		return Reply{}, err
	}
	defer c.Close()
	msg := isMessage(cl.ep.transport)
	out, in := pattern(size), make([]byte, size)
	lat := make([]time.Duration, 0, n)
	t0 := time.Now()
	end := deadline(maxTime)
	for t := t0; len(lat) < n && t.Before(end); {
		if _, err := c.Write(out); err != nil {
			return Reply{}, err
		}
		if err := readExactly(c, in, msg); err != nil {
			return Reply{}, err
		}
		now := time.Now()
		lat = append(lat, now.Sub(t))
		t = now
	}
	rep := latencies(lat)
	rep.Seconds, rep.N = time.Since(t0).Seconds(), len(lat)
	return rep, nil
}

func latencies(lat []time.Duration) Reply {
	slices.Sort(lat)
	var sum time.Duration
	for _, l := range lat {
		sum += l
	}
	n := len(lat)
	if n == 0 {
		return Reply{}
	}
	return Reply{
		P50:  float64(lat[rank(n, 0.50)]),
		P99:  float64(lat[rank(n, 0.99)]),
		Mean: float64(sum) / float64(n),
		Max:  float64(lat[n-1]),
	}
}

// rank is the index of the q-quantile of n sorted values (nearest rank).
func rank(n int, q float64) int {
	i := int(float64(n)*q+0.999999999) - 1
	return max(0, min(n-1, i))
}

// msgrate sends up to n messages of size bytes one way, for at most
// maxTime, then an end mark, and waits for the server's count. Batched:
// many messages per write(2); else one write per message (see
// batchedMeaning).
func (cl *client) msgrate(ctx context.Context, n, size int, batched bool, maxTime time.Duration) (Reply, error) {
	msg := isMessage(cl.ep.transport)
	if n <= 0 || size < 0 || size > maxFramedSize || msg && (size == 0 || size > sinc.MaxMessage) {
		return Reply{}, fmt.Errorf("msgrate: n %d, size %d", n, size)
	}
	if msg && batched {
		return cl.msgrateRaw(ctx, n, size, maxTime)
	}
	op, one := byte(opFramed), make([]byte, 4+size)
	binary.BigEndian.PutUint32(one, uint32(size))
	copy(one[4:], pattern(size))
	endMsg := binary.BigEndian.AppendUint32(nil, endMark)
	if msg {
		op, one, endMsg = opMessages, one[4:], nil
	}
	c, err := cl.open(ctx, op, size, int64(n))
	if err != nil {
		return Reply{}, err
	}
	defer c.Close()
	var w io.Writer = c
	var bw *bufio.Writer
	if batched {
		bw = bufio.NewWriterSize(c, chunk)
		w = bw
	}
	t0 := time.Now()
	end := deadline(maxTime)
	sent := 0
	for sent < n {
		if sent%256 == 0 && time.Now().After(end) {
			break
		}
		if _, err := w.Write(one); err != nil {
			return Reply{}, err
		}
		sent++
	}
	if _, err := w.Write(endMsg); err != nil {
		return Reply{}, err
	}
	if bw != nil {
		if err := bw.Flush(); err != nil {
			return Reply{}, err
		}
	}
	if err := readAck(c, int64(sent), msg); err != nil {
		return Reply{}, err
	}
	return Reply{Seconds: time.Since(t0).Seconds(), N: sent, Bytes: int64(sent) * int64(size)}, nil
}

// msgrateRaw is the batched sender of a message channel: one record per
// message, records packed into 64 KiB writes on the channel's socket.
func (cl *client) msgrateRaw(ctx context.Context, n, size int, maxTime time.Duration) (Reply, error) {
	uc, err := rawOpen(ctx, cl.ep.socket, cl.ep.addr)
	if err != nil {
		return Reply{}, err
	}
	defer uc.Close()
	if dl, ok := ctx.Deadline(); ok {
		uc.SetDeadline(dl)
	}
	bw := bufio.NewWriterSize(uc, chunk)
	var rh [local.RecordHeaderLen]byte
	record := func(typ byte, p []byte) error {
		local.PutRecordHeader(rh[:], typ, len(p))
		if _, err := bw.Write(rh[:]); err != nil {
			return err
		}
		_, err := bw.Write(p)
		return err
	}
	if err := record(local.RecData, putHeader(opMessages, size, int64(n))); err != nil {
		return Reply{}, err
	}
	p := pattern(size)
	t0 := time.Now()
	end := deadline(maxTime)
	sent := 0
	for sent < n {
		if sent%256 == 0 && time.Now().After(end) {
			break
		}
		if err := record(local.RecData, p); err != nil {
			return Reply{}, err
		}
		sent++
	}
	if err := record(local.RecData, nil); err != nil { // the end
		return Reply{}, err
	}
	if err := bw.Flush(); err != nil {
		return Reply{}, err
	}
	br := bufio.NewReader(uc)
	var ack [ackLen]byte
	if k, err := readRecord(br, ack[:]); err != nil || k != ackLen {
		return Reply{}, fmt.Errorf("ack: %d bytes, %v", k, err)
	}
	if got := int(binary.BigEndian.Uint64(ack[:])); got != sent {
		return Reply{}, fmt.Errorf("the server got %d, want %d", got, sent)
	}
	dt := time.Since(t0)
	record(local.RecFin, nil)
	bw.Flush()
	return Reply{Seconds: dt.Seconds(), N: sent, Bytes: int64(sent) * int64(size)}, nil
}

// setup runs up to n open+close cycles from conc goroutines, for at most
// maxTime; the latency is the open's (tcp: connect; tls: connect and
// handshake; sinc: the channel open through both agents).
func (cl *client) setup(ctx context.Context, n, conc int, maxTime time.Duration) (Reply, error) {
	if n <= 0 || conc <= 0 {
		return Reply{}, fmt.Errorf("setup: n %d, conc %d", n, conc)
	}
	var next atomic.Int64
	lats := make([][]time.Duration, conc)
	errs := make([]error, conc)
	var wg sync.WaitGroup
	t0 := time.Now()
	end := deadline(maxTime)
	for g := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				t := time.Now()
				if t.After(end) {
					return
				}
				c, err := cl.ep.dial(ctx)
				if err != nil {
					errs[g] = err
					next.Store(int64(n)) // stop the others
					return
				}
				lats[g] = append(lats[g], time.Since(t))
				c.Close()
			}
		}()
	}
	wg.Wait()
	dt := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		return Reply{}, err
	}
	all := slices.Concat(lats...)
	rep := latencies(all)
	rep.Seconds, rep.N = dt.Seconds(), len(all)
	return rep, nil
}

// idle opens n more connections and keeps them, sending nothing.
func (cl *client) idle(ctx context.Context, n, conc int) (Reply, error) {
	if n < 0 || conc <= 0 {
		return Reply{}, fmt.Errorf("idle: n %d, conc %d", n, conc)
	}
	var next atomic.Int64
	got := make([][]net.Conn, conc)
	errs := make([]error, conc)
	var wg sync.WaitGroup
	for g := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				c, err := cl.ep.dial(ctx)
				if err != nil {
					errs[g] = err
					next.Store(int64(n))
					return
				}
				got[g] = append(got[g], c)
			}
		}()
	}
	wg.Wait()
	for _, g := range got {
		cl.held = append(cl.held, g...)
	}
	if err := errors.Join(errs...); err != nil {
		return Reply{Conns: len(cl.held)}, err
	}
	return Reply{Conns: len(cl.held)}, nil
}

func (cl *client) release() {
	for _, c := range cl.held {
		c.Close()
	}
	cl.held = nil
}

// info opens one connection and describes it.
func (cl *client) info(ctx context.Context) (Reply, error) {
	c, err := cl.ep.dial(ctx)
	if err != nil {
		return Reply{}, err
	}
	defer c.Close()
	if tc, ok := c.(*tls.Conn); ok {
		st := tc.ConnectionState()
		return Reply{Info: fmt.Sprintf("%s, %s, key exchange %s, server certificate ECDSA P-256, full handshake (no resumption)",
			tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite), st.CurveID)}, nil
	}
	return Reply{}, nil
}
