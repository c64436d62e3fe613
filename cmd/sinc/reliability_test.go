package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// heldDial starts `sinc dial` on a channel that stays open, and checks it
// echoes.
func heldDial(t *testing.T, sock, addr string) (*exec.Cmd, io.WriteCloser, *bufio.Reader, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(bin, "dial", addr, "--socket", sock)
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	errs := &syncBuffer{}
	cmd.Stderr = errs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	br := bufio.NewReader(out)
	fmt.Fprintln(in, "ping")
	if l, err := br.ReadString('\n'); err != nil || l != "ping\n" {
		t.Fatalf("echo: %q %v (%s)", l, err, errs)
	}
	return cmd, in, br, errs
}

// exitWithin waits for cmd to exit and returns how long that took.
func exitWithin(t *testing.T, cmd *exec.Cmd, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
		return time.Since(start)
	case <-time.After(limit):
		t.Fatalf("the client hung for %s", limit)
		return 0
	}
}

// TestAgentDeath: a client whose own agent is killed gets an error at
// once; a client whose remote agent is killed and restarted gets an error
// when the new agent links (its channels died with the old one), and a new
// dial works.
func TestAgentDeath(t *testing.T) {
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/*\"\n"},
		{Name: "node-b", Partitions: []string{"db"}, Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/*\"\n"},
	}, cluster.Timers{Keepalive: "200ms", DeadAfter: "1s", DialMin: "50ms", DialMax: "300ms", Grace: "20s"})
	if err != nil {
		t.Fatal(err)
	}
	a, b := c.Nodes["node-a"], c.Nodes["node-b"]
	pa, err := cluster.Start(bin, a)
	if err != nil {
		t.Fatal(err)
	}
	defer pa.Kill()
	pb, err := cluster.Start(bin, b)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { pb.Kill() }()
	waitState(t, a, "node-b", "up", 10*time.Second)
	listen := func() *exec.Cmd {
		l := exec.Command(bin, "listen", "echo", "--socket", b.Partitions["db"], "--exec", "cat")
		errs := &syncBuffer{}
		l.Stderr = errs
		if err := l.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(errs.String(), "listening"); {
			if time.Now().After(deadline) {
				t.Fatalf("listener: %s", errs)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return l
	}
	l := listen()
	defer func() { l.Process.Kill(); l.Wait() }()

	// The remote agent dies (kill -9) and comes back.
	cmd, _, _, errs := heldDial(t, a.Partitions["web"], "node-b/db/echo")
	pb.Kill()
	l.Process.Kill()
	l.Wait()
	pb, err = cluster.Start(bin, b)
	if err != nil {
		t.Fatal(err)
	}
	d := exitWithin(t, cmd, 15*time.Second)
	if !strings.Contains(errs.String(), "restarted") {
		t.Fatalf("client of the restarted agent's channel: %q", errs)
	}
	t.Logf("remote agent killed and restarted: the client got %q %s after the kill", strings.TrimSpace(errs.String()), d)
	waitState(t, a, "node-b", "up", 10*time.Second)
	l = listen()
	out, err := func() ([]byte, error) {
		c := exec.Command(bin, "dial", "node-b/db/echo", "--socket", a.Partitions["web"])
		c.Stdin = strings.NewReader("again\n")
		return c.Output()
	}()
	if err != nil || string(out) != "again\n" {
		t.Fatalf("a new dial after the restart: %q %v", out, err)
	}

	// The local agent dies: its client hears at once.
	cmd, _, _, errs = heldDial(t, a.Partitions["web"], "node-b/db/echo")
	pa.Kill()
	if d := exitWithin(t, cmd, 2*time.Second); d > 2*time.Second {
		t.Fatalf("client noticed its agent's death after %s", d)
	}
	if !strings.Contains(errs.String(), "agent_gone") {
		t.Fatalf("client of a dead agent: %q", errs)
	}
}

// TestThousandChannelsThreeNodes: 1,000 concurrent channels between three
// nodes, 1,000 messages each with sequence numbers and checksums, all
// delivered exactly once and in order; peak agent memory reported.
func TestThousandChannelsThreeNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: a thousand channels")
	}
	rule := "[[allow]]\nfrom = \"*/*\"\nto = \"*/*/*\"\n[limits]\nchannels_per_process = 2000\n"
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"p"}, Extra: rule},
		{Name: "node-b", Partitions: []string{"p"}, Extra: rule},
		{Name: "node-c", Partitions: []string{"p"}, Extra: rule},
	}, cluster.Timers{Keepalive: "500ms", DeadAfter: "5s"})
	if err != nil {
		t.Fatal(err)
	}
	procs := startAgents(t, c)
	names := c.Names()
	for _, x := range names {
		for _, y := range names {
			if x != y {
				waitState(t, c.Nodes[x], y, "up", 10*time.Second)
			}
		}
	}
	// The load runs in its own process, built without the race detector:
	// it echoes on every node, opens the channels and checks every message.
	args := []string{"-channels", "1000", "-messages", "1000"}
	for _, n := range names {
		args = append(args, "-node", n+"="+c.Nodes[n].Partitions["p"])
	}
	out, errb, werr, peak := runLoad(t, procs, args...)
	var res struct {
		Channels, Messages, Delivered int
		Seconds                       float64
		Error                         string
	}
	if err := json.Unmarshal(out, &res); err != nil || werr != nil || res.Error != "" {
		t.Fatalf("load client: %v %v %+v\n%s", werr, err, res, errb)
	}
	if res.Delivered != 1000*1000 {
		t.Fatalf("delivered %d messages, want %d", res.Delivered, 1000*1000)
	}
	// Each agent ends about 667 channels; each holds at most a window of
	// received data and a window of unacknowledged sent data (512 KiB each
	// by default), over a base of 64 MiB.
	bound := 64<<10 + 667*2*512
	for i, kib := range peak {
		if kib > bound {
			t.Errorf("agent %s peaked at %d KiB, over its bound of %d KiB", names[i], kib, bound)
		}
	}
	t.Logf("%d channels × %d messages each way, every one checked once and in order, in %.1fs; peak agent RSS %v KiB",
		res.Channels, res.Messages, res.Seconds, peak)
}

// startAgents starts an agent process for every node of c, each stopped
// when the test ends.
func startAgents(t *testing.T, c *cluster.Cluster) []*cluster.Process {
	t.Helper()
	var procs []*cluster.Process
	for _, n := range c.Names() {
		p, err := cluster.Start(bin, c.Nodes[n])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Stop(10 * time.Second) })
		procs = append(procs, p)
	}
	return procs
}

// runLoad builds internal/loadclient (without the race detector, so that
// the load is the agents', not the test's), runs it with args, and
// returns what it printed, its error, and the peak resident memory of
// each of procs while it ran.
func runLoad(t *testing.T, procs []*cluster.Process, args ...string) (out []byte, errs string, err error, peak []int) {
	t.Helper()
	load := filepath.Join(filepath.Dir(bin), "loadclient")
	if out, err := exec.Command("go", "build", "-o", load, "../../internal/loadclient").CombinedOutput(); err != nil {
		t.Fatalf("building the load client: %v\n%s", err, out)
	}
	cmd := exec.Command(load, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	peak = make([]int, len(procs))
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for waiting := true; waiting; {
		select {
		case err = <-done:
			waiting = false
		case <-time.After(50 * time.Millisecond):
		}
		for i, p := range procs {
			peak[i] = max(peak[i], rssKiB(p.Cmd.Process.Pid))
		}
	}
	return stdout.Bytes(), stderr.String(), err, peak
}

// rssKiB reads a process's resident set size.
func rssKiB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}
