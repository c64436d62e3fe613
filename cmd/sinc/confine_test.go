package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
)

// peekMain runs as an attacker process: it tries to read the target's
// memory and environment and to attach to it, and prints what worked.
func peekMain(target int) {
	got := []string{}
	if f, err := os.Open(fmt.Sprintf("/proc/%d/mem", target)); err == nil {
		f.Close()
		got = append(got, "opened mem")
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", target)); err == nil && len(b) > 0 {
		got = append(got, "read environ")
	}
	runtime.LockOSThread()
	if err := unix.PtraceAttach(target); err == nil {
		var ws unix.WaitStatus
		unix.Wait4(target, &ws, unix.WALL, nil)
		unix.PtraceDetach(target)
		got = append(got, "attached")
	}
	if len(got) == 0 {
		fmt.Println("refused: mem, environ, ptrace")
		return
	}
	fmt.Println("got: " + strings.Join(got, ", "))
}

// floodMain opens channels from one process until the agent says no, and
// prints how many it got and why it stopped.
func floodMain(arg string) {
	sock, addr, _ := strings.Cut(arg, ",")
	var held []*sinc.Conn
	for i := 0; i < 1000; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := (&sinc.Dialer{Socket: sock}).DialContext(ctx, addr)
		cancel()
		if err != nil {
			fmt.Printf("opened %d; then: %v\n", len(held), err)
			return
		}
		held = append(held, c)
	}
	fmt.Printf("opened %d; never refused\n", len(held))
}

// TestAgentMemoryClosedToOtherProcesses runs an agent as an unprivileged
// user and tries, as that same user and as another, to read its memory and
// environment and to ptrace it. A dumpable process of the same user is the
// control: there the same tries work, so the refusals are the agent's doing.
func TestAgentMemoryClosedToOtherProcesses(t *testing.T) {
	uid, gid := testUser(t, "sinc-e2e-agent")
	ub, gb := testUser(t, "sinc-e2e-b")
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"p"}}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	filepath.Walk(dir, func(p string, _ os.FileInfo, _ error) error { return os.Lchown(p, uid, gid) })
	n := c.Nodes["node-a"]
	agentCmd := as(uid, gid, "agent", "--config", n.Config)
	agentCmd.Env = append(os.Environ(), "SINC_TEST_ENV_CANARY=visible-if-environ-leaks")
	logf, _ := os.Create(filepath.Join(dir, "agent.log"))
	defer logf.Close()
	agentCmd.Stdout, agentCmd.Stderr = logf, logf
	if err := agentCmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { agentCmd.Process.Signal(syscall.SIGTERM); agentCmd.Wait() }()
	if err := waitAgent(n); err != nil {
		b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
		t.Fatalf("agent as uid %d did not start: %v\n%s", uid, err, b)
	}

	peek := func(asUID, asGID, target int) string {
		cmd := exec.Command(testBin(t), "-test.run=^$")
		cmd.Env = append(os.Environ(), "SINC_TEST_PEEK="+strconv.Itoa(target))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(asUID), Gid: uint32(asGID)}}
		out, _ := cmd.CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	pid := agentCmd.Process.Pid
	for _, who := range []struct {
		name     string
		uid, gid int
	}{{"the agent's own uid", uid, gid}, {"another uid", ub, gb}} {
		if got := peek(who.uid, who.gid, pid); got != "refused: mem, environ, ptrace" {
			t.Errorf("%s against the agent: %s", who.name, got)
		}
	}
	// The control: a plain process of the agent's uid is open to its uid.
	control := exec.Command("sleep", "30")
	control.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if err := control.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { control.Process.Kill(); control.Wait() }()
	if got := peek(uid, gid, control.Process.Pid); !strings.Contains(got, "read environ") || !strings.Contains(got, "attached") {
		t.Fatalf("control: the same uid could not reach a dumpable process (%s): the test proves nothing here", got)
	}
	// The agent says how its keys are kept.
	b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
	if !strings.Contains(string(b), "key_memory=") {
		t.Errorf("the agent's start line does not say how keys are kept:\n%s", b)
	}
}

// TestOpenFlood: one process opens channels as fast as it can; it meets its
// own limit, and another process's channel keeps working meanwhile.
func TestOpenFlood(t *testing.T) {
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web", "db"},
		Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-a/db/*\"\n[limits]\nchannels_per_process = 40\n"}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	p, err := cluster.Start(bin, n)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop(5 * time.Second)
	if err := waitAgent(n); err != nil {
		t.Fatal(err)
	}
	srv := exec.Command(bin, "listen", "echo", "--socket", n.Partitions["db"], "--exec", "cat")
	errs := &syncBuffer{}
	srv.Stderr = errs
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Signal(os.Interrupt); srv.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(errs.String(), "listening"); {
		if time.Now().After(deadline) {
			t.Fatal("listener did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A bystander holds a channel.
	by := exec.Command(bin, "dial", "node-a/db/echo", "--socket", n.Partitions["web"])
	in, _ := by.StdinPipe()
	out, _ := by.StdoutPipe()
	if err := by.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); by.Wait() }()
	br := bufio.NewReader(out)
	fmt.Fprintln(in, "before")
	if l, _ := br.ReadString('\n'); l != "before\n" {
		t.Fatalf("bystander: %q", l)
	}

	flood := exec.Command(testBin(t), "-test.run=^$")
	flood.Env = append(os.Environ(), "SINC_TEST_FLOOD="+n.Partitions["web"]+",node-a/db/echo")
	res, _ := flood.CombinedOutput()
	if !strings.HasPrefix(string(res), "opened 40; then:") || !strings.Contains(string(res), "limit per process") {
		t.Fatalf("flooder: %s", res)
	}
	fmt.Fprintln(in, "after")
	if l, _ := br.ReadString('\n'); l != "after\n" {
		t.Fatalf("bystander after the flood: %q", l)
	}
	// The flooder is gone; its channels with it; a new dial works.
	cmd := exec.Command(bin, "dial", "node-a/db/echo", "--socket", n.Partitions["web"])
	cmd.Stdin = strings.NewReader("fresh\n")
	if o, err := cmd.Output(); err != nil || string(o) != "fresh\n" {
		t.Fatalf("a new dial after the flood: %q %v", o, err)
	}
}

// waitAgent waits until n's agent answers on its admin socket.
func waitAgent(n *cluster.Node) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := admin.Query(ctx, n.Admin, admin.Request{Op: "peers"})
		cancel()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
