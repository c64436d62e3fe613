package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// notifySocket is a stand-in for systemd's notify socket: a datagram
// socket whose messages the test reads.
type notifySocket struct {
	conn *net.UnixConn
	addr string
}

func newNotifySocket(t *testing.T, addr string) *notifySocket {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &notifySocket{conn: c, addr: addr}
}

// next returns the next message, or fails the test after limit.
func (s *notifySocket) next(t *testing.T, limit time.Duration) string {
	t.Helper()
	s.conn.SetReadDeadline(time.Now().Add(limit))
	b := make([]byte, 4096)
	n, err := s.conn.Read(b)
	if err != nil {
		t.Fatalf("no notification within %s: %v", limit, err)
	}
	return string(b[:n])
}

// fields splits a notification into its assignments.
func fields(msg string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSuffix(msg, "\n"), "\n") {
		k, v, _ := strings.Cut(l, "=")
		m[k] = v
	}
	return m
}

// TestNotifyReadiness: an agent run with NOTIFY_SOCKET (as systemd runs a
// Type=notify service) sends READY=1 only when every socket it has
// listens: frozen with SIGSTOP the moment READY=1 arrives, it already
// accepts connections on its admin socket, its partition sockets, its
// peer port and its metrics port, and nothing came before READY=1. SIGHUP
// gives RELOADING=1 (with MONOTONIC_USEC) then READY=1; SIGTERM gives
// STOPPING=1 before the process exits.
func TestNotifyReadiness(t *testing.T) {
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", port)
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"}, Top: fmt.Sprintf("metrics = %q", metricsAddr)},
		{Name: "node-b", Partitions: []string{"db"}}, // never started: a peer that is down
	}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	ns := newNotifySocket(t, filepath.Join(dir, "notify.sock"))
	p, err := cluster.StartWith(bin, n, []string{"NOTIFY_SOCKET=" + ns.addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Cmd.Process.Signal(syscall.SIGCONT)
		p.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(p.Log)
			t.Logf("agent log:\n%s", b)
		}
	})

	msg := ns.next(t, 10*time.Second)
	// Freeze the agent at once: what listens now listened when it sent.
	p.Cmd.Process.Signal(syscall.SIGSTOP)
	f := fields(msg)
	if f["READY"] != "1" {
		t.Fatalf("first notification %q is not READY=1", msg)
	}
	if f["MAINPID"] != strconv.Itoa(p.Cmd.Process.Pid) {
		t.Errorf("MAINPID=%s, the agent is %d", f["MAINPID"], p.Cmd.Process.Pid)
	}
	if !strings.Contains(f["STATUS"], "node-a") || !strings.Contains(f["STATUS"], metricsAddr) {
		t.Errorf("STATUS=%q", f["STATUS"])
	}
	for _, s := range []struct{ network, addr string }{
		{"unix", n.Admin}, {"unix", n.Partitions["web"]}, {"unix", n.Partitions["batch"]},
		{"tcp", n.Listen}, {"tcp", metricsAddr},
	} {
		conn, err := net.DialTimeout(s.network, s.addr, time.Second)
		if err != nil {
			t.Errorf("at READY=1, %s %s does not accept: %v", s.network, s.addr, err)
			continue
		}
		conn.Close()
	}
	p.Cmd.Process.Signal(syscall.SIGCONT)

	// Reload: RELOADING=1, then READY=1 once done.
	p.Cmd.Process.Signal(syscall.SIGHUP)
	f = fields(ns.next(t, 10*time.Second))
	if f["RELOADING"] != "1" {
		t.Fatalf("after SIGHUP: %v, want RELOADING=1", f)
	}
	if usec, err := strconv.ParseInt(f["MONOTONIC_USEC"], 10, 64); err != nil || usec <= 0 {
		t.Errorf("MONOTONIC_USEC=%q", f["MONOTONIC_USEC"])
	}
	if f = fields(ns.next(t, 10*time.Second)); f["READY"] != "1" {
		t.Fatalf("after the reload: %v, want READY=1", f)
	}

	// Stop: STOPPING=1, and a clean exit.
	p.Cmd.Process.Signal(syscall.SIGTERM)
	if f = fields(ns.next(t, 10*time.Second)); f["STOPPING"] != "1" {
		t.Fatalf("after SIGTERM: %v, want STOPPING=1", f)
	}
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not exit after SIGTERM")
	}
	if !p.Cmd.ProcessState.Success() {
		t.Errorf("agent exit: %v", p.Cmd.ProcessState)
	}
}

// TestNotifyAbstractAndFailedStart: an abstract NOTIFY_SOCKET (@name)
// works; an agent that cannot start (its admin socket's place is taken by
// a folder) sends nothing at all, READY=1 least of all.
func TestNotifyAbstractAndFailedStart(t *testing.T) {
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web"}}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	ns := newNotifySocket(t, fmt.Sprintf("@sinc-test-notify-%d", os.Getpid()))
	p, err := cluster.StartWith(bin, n, []string{"NOTIFY_SOCKET=" + ns.addr})
	if err != nil {
		t.Fatal(err)
	}
	if f := fields(ns.next(t, 10*time.Second)); f["READY"] != "1" {
		t.Fatalf("abstract socket: %v", f)
	}
	if err := p.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if f := fields(ns.next(t, 5*time.Second)); f["STOPPING"] != "1" {
		t.Fatalf("abstract socket, at stop: %v", f)
	}

	if err := os.MkdirAll(n.Admin, 0o700); err != nil { // a folder where the socket goes
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(n.Admin, "keep"), nil, 0o600)
	p, err = cluster.StartWith(bin, n, []string{"NOTIFY_SOCKET=" + ns.addr})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		p.Kill()
		t.Fatal("an agent that cannot listen on its admin socket kept running")
	}
	ns.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if k, err := ns.conn.Read(make([]byte, 4096)); err == nil {
		t.Errorf("a failed start sent a notification (%d bytes)", k)
	}
	if b, _ := os.ReadFile(p.Log); !strings.Contains(string(b), "admin socket") || p.Cmd.ProcessState.Success() {
		t.Errorf("failed start exited %v; log:\n%s", p.Cmd.ProcessState, b)
	}
}
