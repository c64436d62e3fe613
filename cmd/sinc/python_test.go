package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// The Python client (clients/python), written from docs/protocol.md alone,
// run against real agents: if the document and the agent disagree, its
// tests fail. This file lays out the cluster those tests need and runs
// them; the tests themselves are in clients/python/tests.
//
//	node-a  web, batch   policy: web may reach anything; batch nothing.
//	                     listeners_per_partition 2, pending_requests 4, queued_requests 4
//	node-b  db, spare    policy: any partition may reach node-b/db/*;
//	                     nothing reaches spare
//	node-c  edge         channels_per_process 2 (the limit tests); the
//	                     tests stop it a moment (SIGSTOP) for an open timeout
//	node-d  gone         the tests stop it (SIGTERM) to see agent_gone
//	node-e  far          a peer of every node, never started
//
// Timers: request 1s, and open 2s (more than the 1s an agent waits for a
// listener to take a notice, so that a listener that takes none makes
// busy, not timeout); the tests that wait for them take that long.

// pyCluster is what the Python tests are told, as JSON in SINC_PY_CLUSTER.
type pyCluster struct {
	Sockets map[string]string `json:"sockets"` // "node-a/web" → socket path
	PIDs    map[string]int    `json:"pids"`    // "node-c" → agent pid
	Limits  map[string]int    `json:"limits"`  // the limits the tests reach
	Timers  map[string]string `json:"timers"`  // the timers the tests wait for
}

func TestPythonClient(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not found: the Python client's tests (clients/python) need it")
	}
	if out, err := exec.Command(python, "-c", "import sys; assert sys.version_info >= (3, 10)").CombinedOutput(); err != nil {
		t.Skipf("%s is older than 3.10: %s", python, out)
	}
	pc, procs := startPythonCluster(t)
	env, _ := json.Marshal(pc)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	start := time.Now()
	args := []string{"-B", "-m", "unittest", "discover", "-v", "-s", "tests", "-t", "."}
	if k := os.Getenv("SINC_PY_K"); k != "" { // run only the tests matching k (unittest -k)
		args = append(args, "-k", k)
	}
	cmd := exec.CommandContext(ctx, python, args...)
	cmd.Dir = filepath.Join("..", "..", "clients", "python")
	cmd.Env = append(os.Environ(), "SINC_PY_CLUSTER="+string(env), "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	t.Logf("python3 -m unittest (%s):\n%s", time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		for _, p := range procs {
			b, _ := os.ReadFile(p.Log)
			t.Logf("%s:\n%s", p.Log, b)
		}
		t.Fatalf("the Python client's tests failed: %v", err)
	}
	// A test skips only where the document states behaviour ahead of this
	// agent, and says which; name those here.
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "... skipped") {
			t.Logf("skipped: %s", strings.TrimSpace(line))
		}
	}
}

// startPythonCluster lays out and starts the cluster described above.
func startPythonCluster(t *testing.T) (*pyCluster, []*cluster.Process) {
	t.Helper()
	dir := shortTemp(t)
	allow := func(from, to string) string {
		return "\n[[allow]]\nfrom = \"" + from + "\"\nto = \"" + to + "\"\n"
	}
	specs := []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"},
			Extra: allow("node-a/web", "*/*/*") + "\n[limits]\nlisteners_per_partition = 2\npending_requests = 4\nqueued_requests = 4\n"},
		{Name: "node-b", Partitions: []string{"db", "spare"}, Extra: allow("*/*", "node-b/db/*") + allow("node-a/web", "node-b/nope/*")},
		{Name: "node-c", Partitions: []string{"edge"},
			Extra: allow("node-c/edge", "node-b/db/*") + "\n[limits]\nchannels_per_process = 2\n"},
		{Name: "node-d", Partitions: []string{"gone"}, Extra: allow("node-d/gone", "node-b/db/*")},
		{Name: "node-e", Partitions: []string{"far"}},
	}
	timers := cluster.Timers{Open: "2s", Request: "1s", DialMin: "50ms", DialMax: "300ms"}
	c, err := cluster.Make(dir, specs, timers)
	if err != nil {
		t.Fatal(err)
	}
	pc := &pyCluster{Sockets: map[string]string{}, PIDs: map[string]int{},
		Limits: map[string]int{"listeners_per_partition": 2, "pending_requests": 4, "queued_requests": 4, "channels_per_process": 2},
		Timers: map[string]string{"open": timers.Open, "request": timers.Request}}
	var procs []*cluster.Process
	for _, name := range []string{"node-a", "node-b", "node-c", "node-d"} {
		n := c.Nodes[name]
		p, err := cluster.Start(bin, n)
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
		t.Cleanup(func() {
			p.Cmd.Process.Signal(syscall.SIGCONT) // a test may have left it stopped
			if err := p.Stop(5 * time.Second); err != nil {
				t.Errorf("agent %s: %v", name, err)
			}
		})
		pc.PIDs[name] = p.Cmd.Process.Pid
		for part, sock := range n.Partitions {
			pc.Sockets[name+"/"+part] = sock
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, l := range [][2]string{{"node-a", "node-b"}, {"node-a", "node-c"}, {"node-c", "node-b"}, {"node-d", "node-b"}} {
		for _, dir := range [][2]string{l, {l[1], l[0]}} {
			if _, err := cluster.WaitPeer(ctx, c.Nodes[dir[0]], dir[1], "up"); err != nil {
				t.Fatalf("link %s → %s: %v", dir[0], dir[1], err)
			}
		}
	}
	t.Logf("cluster up: %s (node-e never runs)", strings.Join(c.Names(), ", "))
	return pc, procs
}
