package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
)

// sinc forward and sinc expose between real agent processes, with plain Go
// TCP programs at both ends (the psql test is in forward_pg_test.go):
//
//	client ⇄ sinc forward (node-a/web) ⇄ agent a ⇄ agent b ⇄ sinc expose (node-b/db) ⇄ target server

// The test binary doubles as a client process of another uid.
func init() {
	if path := os.Getenv("SINC_TEST_CONNECT"); path != "" {
		c, err := net.Dial("unix", path)
		if err != nil {
			fmt.Println(err)
			os.Exit(3)
		}
		c.Close()
		fmt.Println("connected")
		os.Exit(0)
	}
}

// startPair lays out node-a (web) and node-b (db) with rules (TOML, in
// both configs) and partition settings, starts both agents and waits for
// their link.
func startPair(t *testing.T, rules string, partExtra map[string]string) (a, b *cluster.Node) {
	a, b, _ = startPairProcs(t, rules, partExtra)
	return a, b
}

// startPairProcs is startPair that also returns the agent processes.
func startPairProcs(t *testing.T, rules string, partExtra map[string]string) (a, b *cluster.Node, procs []*cluster.Process) {
	t.Helper()
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Extra: rules, PartitionExtra: map[string]string{"web": partExtra["web"]}},
		{Name: "node-b", Partitions: []string{"db"}, Extra: rules, PartitionExtra: map[string]string{"db": partExtra["db"]}},
	}, cluster.Timers{DialMin: "50ms", DialMax: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	procs = startAgents(t, c)
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range procs {
				b, _ := os.ReadFile(p.Log)
				t.Logf("%s:\n%s", p.Log, b)
			}
		}
	})
	a, b = c.Nodes["node-a"], c.Nodes["node-b"]
	waitState(t, a, "node-b", "up", 10*time.Second)
	waitState(t, b, "node-a", "up", 10*time.Second)
	return a, b, procs
}

// allowRules lets node-a/web reach each of services on node-b/db.
func allowRules(services ...string) string {
	var b strings.Builder
	for _, s := range services {
		fmt.Fprintf(&b, "\n[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/%s\"\n", s)
	}
	return b.String()
}

// daemon is a long-running sinc command (forward, expose).
type daemon struct {
	cmd  *exec.Cmd
	log  *syncBuffer // its stdout and stderr
	done chan struct{}
	err  error
}

// startDaemon starts cmd and waits until its log says ready; at the end
// of the test it is stopped with SIGTERM (and its log shown if the test
// failed).
func startDaemon(t *testing.T, cmd *exec.Cmd, ready string) *daemon {
	t.Helper()
	d := &daemon{cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.stop(5 * time.Second)
		if t.Failed() {
			t.Logf("%v:\n%s", cmd.Args, d.log)
		}
	})
	d.waitLog(t, 10*time.Second, ready)
	return d
}

// stop sends SIGTERM and waits up to limit, then kills; it returns the
// exit error (nil for status 0).
func (d *daemon) stop(limit time.Duration) error {
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.err
	case <-time.After(limit):
		d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("%v did not stop within %s of SIGTERM", d.cmd.Args, limit)
	}
}

// waitLog waits until the daemon's log holds every one of subs.
func (d *daemon) waitLog(t *testing.T, limit time.Duration, subs ...string) string {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		log := d.log.String()
		missing := ""
		for _, s := range subs {
			if !strings.Contains(log, s) {
				missing = s
				break
			}
		}
		if missing == "" {
			return log
		}
		select {
		case <-d.done:
			t.Fatalf("%v exited (%v) before logging %q:\n%s", d.cmd.Args, d.err, missing, log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v did not log %q within %s:\n%s", d.cmd.Args, missing, limit, log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var listenRE = regexp.MustCompile(`listen=(\S+)`)

// addr is where a forwarder listens, from its first log line.
func (d *daemon) addr(t *testing.T) string {
	m := listenRE.FindStringSubmatch(d.log.String())
	if m == nil {
		t.Fatalf("no listen= in the forwarder's log:\n%s", d.log)
	}
	return m[1]
}

// forward starts `sinc forward LISTEN TO --socket SOCK args...`.
func forward(t *testing.T, sock, listen, to string, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"forward", listen, to, "--socket", sock, "--log-level", "debug"}, args...)...)
	return startDaemon(t, cmd, "msg=forwarding")
}

// expose starts `sinc expose SERVICE TARGET --socket SOCK args...`.
func expose(t *testing.T, sock, service, target string, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"expose", service, target, "--socket", sock, "--log-level", "debug"}, args...)...)
	return startDaemon(t, cmd, "msg=exposing")
}

// targetServer is the program behind sinc expose. The first line of each
// connection says what to do:
//
//	sum    read to the end, then answer the SHA-256 of what came and
//	       answerSize bytes of pattern(), and close
//	hold TAG  answer "ok", then read until the connection ends and report
//	          how, under TAG (heldErr)
//	reset     reset the connection
type targetServer struct {
	ln net.Listener

	mu    sync.Mutex
	conns map[net.Conn]bool
	held  map[string]chan error
	wg    sync.WaitGroup
}

const answerSize = 2 << 20

// pattern is the target's answer, the same every time.
func pattern(n int) []byte {
	b := make([]byte, n)
	mrand.NewChaCha8([32]byte{'s', 'i', 'n', 'c'}).Read(b)
	return b
}

func startTarget(t *testing.T) *targetServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &targetServer{ln: ln, conns: map[net.Conn]bool{}, held: map[string]chan error{}}
	ts.wg.Add(1)
	go func() {
		defer ts.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ts.mu.Lock()
			ts.conns[c] = true
			ts.mu.Unlock()
			ts.wg.Add(1)
			go func() {
				defer ts.wg.Done()
				ts.serve(c)
				ts.mu.Lock()
				delete(ts.conns, c)
				ts.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		ts.mu.Lock()
		for c := range ts.conns {
			c.Close()
		}
		ts.mu.Unlock()
		ts.wg.Wait()
	})
	return ts
}

func (ts *targetServer) addr() string { return ts.ln.Addr().String() }

func (ts *targetServer) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	cmd, err := br.ReadString('\n')
	if err != nil {
		return
	}
	tag, held := strings.CutPrefix(cmd, "hold ")
	if held {
		cmd = "hold\n"
	}
	switch cmd {
	case "sum\n":
		h := sha256.New()
		if _, err := io.Copy(h, br); err != nil {
			return
		}
		c.Write(h.Sum(nil))
		c.Write(pattern(answerSize))
	case "hold\n":
		c.Write([]byte("ok\n"))
		_, err := io.Copy(io.Discard, br)
		select { // the first end of a tag is kept
		case ts.heldChan(strings.TrimSpace(tag)) <- err:
		default:
		}
	case "reset\n":
		c.(*net.TCPConn).SetLinger(0)
	}
}

func (ts *targetServer) heldChan(tag string) chan error {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.held[tag] == nil {
		ts.held[tag] = make(chan error, 1)
	}
	return ts.held[tag]
}

// heldErr returns how the held connection tagged tag ended, within 5 s.
func (ts *targetServer) heldErr(t *testing.T, tag string) error {
	t.Helper()
	select {
	case err := <-ts.heldChan(tag):
		return err
	case <-time.After(5 * time.Second):
		t.Fatalf("the target's held connection %s did not end", tag)
		return nil
	}
}

// exchange sends "sum" and size random bytes on c, half-closes, and checks
// the answer: the hash of what it sent and the pattern, then a clean end.
func exchange(t *testing.T, c net.Conn, size int) time.Duration {
	t.Helper()
	start := time.Now()
	data := make([]byte, size)
	rand.Read(data)
	go func() {
		c.Write([]byte("sum\n"))
		c.Write(data)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := readAll(c)
	if err != nil {
		t.Fatalf("reading the answer: %v (after %d bytes)", err, len(got))
	}
	sum := sha256.Sum256(data)
	if len(got) < len(sum) || !bytes.Equal(got[:len(sum)], sum[:]) {
		t.Fatalf("the target's hash of what it read differs from the hash of what was sent (%d bytes): bytes lost or changed on the way", size)
	}
	if !bytes.Equal(got[len(sum):], pattern(answerSize)) {
		t.Fatalf("the answer: %d bytes, not the %d the target sent, or changed", len(got)-len(sum), answerSize)
	}
	return time.Since(start)
}

// hold opens a connection to addr, asks the target to hold it under tag
// and waits for its "ok".
func hold(t *testing.T, network, addr, tag string) net.Conn {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.Write([]byte("hold " + tag + "\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "ok\n" {
		t.Fatalf("held connection: %q %v", line, err)
	}
	c.SetReadDeadline(time.Time{})
	return c
}

// refusedAtOnce dials addr and checks that the connection is reset within
// a second (having sent what a program would send first).
func refusedAtOnce(t *testing.T, network, addr, first string) {
	t.Helper()
	start := time.Now()
	c, err := net.Dial(network, addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return // reset before the connect returned
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte(first))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 64))
	took := time.Since(start)
	switch {
	case n > 0:
		t.Fatalf("a refused connection got %d bytes", n)
	case network == "tcp" && !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("a refused connection read %v, want ECONNRESET", err)
	case network == "unix" && err != io.EOF && !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("a refused connection read %v, want its end", err)
	case took > time.Second:
		t.Fatalf("a refused connection ended after %s, not at once", took)
	}
}

// TestForwardExpose: bytes, half-close, resets, refusals and limits pass
// through sinc forward and sinc expose between real agents as a program
// would see them over one TCP connection.
func TestForwardExpose(t *testing.T) {
	a, b, agents := startPairProcs(t, allowRules("pg", "down", "one"), nil)
	web, db := a.Partitions["web"], b.Partitions["db"]
	ts := startTarget(t)
	exposer := expose(t, db, "pg", ts.addr())
	fwd := forward(t, web, "127.0.0.1:0", "node-b/db/pg")

	t.Run("bytes both ways and half-close", func(t *testing.T) {
		c, err := net.Dial("tcp", fwd.addr(t))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		d := exchange(t, c, 8<<20)
		t.Logf("8 MiB up, 2 MiB down, byte-exact, through a half-close, in %s", d.Round(time.Millisecond))
	})

	t.Run("a client's reset reaches the server", func(t *testing.T) {
		c := hold(t, "tcp", fwd.addr(t), "client-reset")
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		if err := ts.heldErr(t, "client-reset"); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the server read %v; want ECONNRESET", err)
		}
		fwd.waitLog(t, 5*time.Second, "connection failed", "connection reset by peer")
	})

	t.Run("the server's reset reaches the client", func(t *testing.T) {
		c, err := net.Dial("tcp", fwd.addr(t))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("reset\n"))
		if _, err := readAll(c); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the client read %v; want ECONNRESET", err)
		}
		fwd.waitLog(t, 5*time.Second, "aborted")
	})

	t.Run("a target that refuses", func(t *testing.T) {
		port, _ := cluster.FreePort()
		closed := "127.0.0.1:" + strconv.Itoa(port)
		down := expose(t, db, "down", closed)
		f := forward(t, web, "127.0.0.1:0", "node-b/db/down")
		// Nothing sent first: data the exposer never read can make the
		// agent report a reset instead of the exposer's reason (see
		// the exposer's limit below).
		refusedAtOnce(t, "tcp", f.addr(t), "")
		down.waitLog(t, 5*time.Second, "target refused", "target="+closed, "connection refused")
		f.waitLog(t, 5*time.Second, "connection failed", "aborted", "connection refused")
	})

	t.Run("a channel that policy denies", func(t *testing.T) {
		f := forward(t, web, "127.0.0.1:0", "node-b/db/secret")
		refusedAtOnce(t, "tcp", f.addr(t), "hello")
		log := f.waitLog(t, 5*time.Second, `msg="channel refused: denied"`, "to=node-b/db/secret")
		t.Logf("the forwarder's line: %s", grepLine(log, "channel refused"))
	})

	t.Run("the forwarder's connection limit", func(t *testing.T) {
		f := forward(t, web, "127.0.0.1:0", "node-b/db/pg", "--max-conns", "2")
		c1 := hold(t, "tcp", f.addr(t), "limit-1")
		hold(t, "tcp", f.addr(t), "limit-2")
		refusedAtOnce(t, "tcp", f.addr(t), "hold\n")
		f.waitLog(t, 5*time.Second, "too many connections", "max_conns=2")
		c1.Close() // a slot frees: the next connection goes through
		ts.heldErr(t, "limit-1")
		var err error
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if err = tryHold(f.addr(t)); err == nil {
				return
			}
		}
		t.Fatalf("after a connection ended, a new one: %v", err)
	})

	t.Run("the exposer's connection limit", func(t *testing.T) {
		e := expose(t, db, "one", ts.addr(), "--max-conns", "1")
		f := forward(t, web, "127.0.0.1:0", "node-b/db/one")
		hold(t, "tcp", f.addr(t), "one")
		refusedAtOnce(t, "tcp", f.addr(t), "hold\n")
		e.waitLog(t, 5*time.Second, "channel refused: too many connections", "max_conns=1")
		// The forwarder learns the exposer's reason, or, when the bytes
		// it had sent reach the exposer's agent after the exposer closed,
		// that agent's reset (it reports the failed delivery first).
		log := f.waitLog(t, 5*time.Second, "connection failed")
		if !strings.Contains(log, "at its limit of 1 connections") && !strings.Contains(log, "reset (by node-b)") {
			t.Fatalf("the forwarder's log does not say why:\n%s", log)
		}
	})

	t.Run("a Unix socket, its mode and who may connect", func(t *testing.T) {
		dir := shortTemp(t)
		os.Chmod(dir, 0o755)
		path := filepath.Join(dir, "pg.sock")
		f := forward(t, web, path, "node-b/db/pg")
		if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
			t.Fatalf("the socket: %v %v; want a socket of mode 0600", st.Mode(), err)
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		exchange(t, c, 1<<20)
		c.Close()
		f.waitLog(t, 5*time.Second, "from_uid=", "from_pid=") // the forwarder logs who connected

		// --mode 0660 --group: the group's users may connect, others not.
		ua, ga := testUser(t, "sinc-e2e-a")
		ub, gb := testUser(t, "sinc-e2e-b")
		shared := filepath.Join(dir, "shared.sock")
		forward(t, web, "unix:"+shared, "node-b/db/pg", "--mode", "0660", "--group", strconv.Itoa(ga))
		st, err := os.Stat(shared)
		if err != nil || st.Mode().Perm() != 0o660 || int(st.Sys().(*syscall.Stat_t).Gid) != ga {
			t.Fatalf("the shared socket: %v, gid %d, %v; want mode 0660, gid %d", st.Mode(), st.Sys().(*syscall.Stat_t).Gid, err, ga)
		}
		for _, tc := range []struct {
			uid, gid int
			sock     string
			want     string
		}{
			{ua, ga, shared, "connected"},
			{ub, gb, shared, "permission denied"},
			{ua, ga, path, "permission denied"}, // the 0600 socket: its owner only
		} {
			cmd := exec.Command(testBin(t))
			cmd.Env = append(os.Environ(), "SINC_TEST_CONNECT="+tc.sock)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(tc.uid), Gid: uint32(tc.gid)}}
			out, _ := cmd.CombinedOutput()
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("uid %d connecting to %s: %q; want %q", tc.uid, filepath.Base(tc.sock), out, tc.want)
			}
		}
	})

	t.Run("SIGTERM stops it cleanly", func(t *testing.T) {
		dir := shortTemp(t)
		path := filepath.Join(dir, "stop.sock")
		f := forward(t, web, path, "node-b/db/pg")
		c := hold(t, "unix", path, "sigterm")
		start := time.Now()
		if err := f.stop(5 * time.Second); err != nil {
			t.Fatalf("after SIGTERM: %v", err)
		}
		t.Logf("stopped in %s", time.Since(start).Round(time.Millisecond))
		if _, err := readAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the held connection read %v; want its end", err)
		}
		if err := ts.heldErr(t, "sigterm"); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("the server of the held connection read %v; want ECONNRESET", err)
		}
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the socket is still there after the stop: %v", err)
		}
	})

	t.Run("only loopback TCP", func(t *testing.T) {
		for _, l := range []string{"0.0.0.0:0", "[::]:0", ":0", "192.0.2.1:5432"} {
			_, errs, code := runSinc(t, "forward", l, "node-b/db/pg", "--socket", web)
			if code != 2 || !strings.Contains(errs, "is not a loopback address") {
				t.Errorf("forward %s: exit %d, %q; want a refusal", l, code, errs)
			}
		}
		_, errs, code := runSinc(t, "forward", "127.0.0.1:0", "node-b/db", "--socket", web)
		if code != 2 || !strings.Contains(errs, "not node/partition/service") {
			t.Errorf("forward to a bad address: exit %d, %q", code, errs)
		}
	})

	// Last: it stops node-b's agent.
	t.Run("the agent of the exposer stops", func(t *testing.T) {
		if err := agents[1].Stop(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		select {
		case <-exposer.done:
		case <-time.After(5 * time.Second):
			t.Fatal("the exposer did not exit when its agent stopped")
		}
		var ee *exec.ExitError
		if !errors.As(exposer.err, &ee) || ee.ExitCode() != 1 || !strings.Contains(exposer.log.String(), "agent_gone") {
			t.Fatalf("the exposer exited with %v; want status 1 and agent_gone:\n%s", exposer.err, exposer.log)
		}
		// The forwarder stays, and refuses at once while node-b is down.
		refusedAtOnce(t, "tcp", fwd.addr(t), "sum\n")
		fwd.waitLog(t, 5*time.Second, "channel refused: node_unreachable")
	})
}

// tryHold is hold without the test: nil if the target answered.
func tryHold(addr string) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Write([]byte("hold\n"))
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if line != "ok\n" {
		return fmt.Errorf("%q %v", line, err)
	}
	return nil
}

// grepLine returns the first line of log that holds sub.
func grepLine(log, sub string) string {
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, sub) {
			return l
		}
	}
	return ""
}

// TestRelayGoroutinesEnd runs a forwarder and an exposer in this process,
// against real agents, through every way a connection ends (clean, reset
// either side, a refusing target, past the limit), then stops them: no
// goroutine of theirs is left.
func TestRelayGoroutinesEnd(t *testing.T) {
	a, b := startPair(t, allowRules("pg", "down"), nil)
	ts := startTarget(t)
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	log := newTestLog(t)
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop()

	serveExpose := func(service string, target string) {
		l, err := (&sinc.ListenConfig{Socket: b.Partitions["db"]}).Listen(ctx, service)
		if err != nil {
			t.Fatal(err)
		}
		la, _ := parseLocalAddr(target)
		e := &exposer{target: la, dialer: &net.Dialer{Timeout: time.Second}, slots: make(limiter, 8), log: log}
		wg.Add(1)
		go func() { defer wg.Done(); e.serve(ctx, l) }()
	}
	port, _ := cluster.FreePort()
	serveExpose("pg", ts.addr())
	serveExpose("down", "127.0.0.1:"+strconv.Itoa(port))
	serveForward := func(to string, max int) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f := &forwarder{target: to, timeout: 5 * time.Second, dialer: &sinc.Dialer{Socket: a.Partitions["web"]},
			slots: make(limiter, max), log: log}
		wg.Add(1)
		go func() { defer wg.Done(); f.serve(ctx, ln) }()
		return ln.Addr().String()
	}
	pg, down, secret := serveForward("node-b/db/pg", 8), serveForward("node-b/db/down", 2), serveForward("node-b/db/secret", 2)
	pg2 := serveForward("node-b/db/pg", 2)

	c, _ := net.Dial("tcp", pg)
	exchange(t, c, 1<<20)
	c.Close()
	c = hold(t, "tcp", pg, "reset")
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	ts.heldErr(t, "reset")
	c, _ = net.Dial("tcp", pg)
	c.Write([]byte("reset\n"))
	readAll(c)
	c.Close()
	refusedAtOnce(t, "tcp", down, "x")
	refusedAtOnce(t, "tcp", secret, "x")
	var held []net.Conn
	for range 2 {
		if err := retry(func() error {
			c, err := net.Dial("tcp", pg2)
			if err != nil {
				return err
			}
			c.Write([]byte("hold\n"))
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
				c.Close()
				return err
			}
			held = append(held, c)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	refusedAtOnce(t, "tcp", pg2, "hold\n")
	stop() // with two connections held
	wg.Wait()
	for _, c := range held {
		if _, err := readAll(c); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("a held connection after the stop read %v; want ECONNRESET", err)
		}
		c.Close()
	}
}

// newTestLog returns a debug log into a buffer that the test shows if it
// fails.
func newTestLog(t *testing.T) *slog.Logger {
	buf := &syncBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log:\n%s", buf)
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// retry calls f until it succeeds, for at most 5 s (a slot of a relay
// that just ended may take a moment to free).
func retry(f func() error) error {
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if err = f(); err == nil {
			return nil
		}
	}
	return err
}
