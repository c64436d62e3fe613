package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// filterSet expands a unit's SystemCallFilter= lines into the system
// calls they allow, as systemd reads them: the first line, an allow list,
// sets them; a later line adds its calls, or, after "~", takes them out.
// Groups (@name) are expanded with systemd-analyze.
func filterSet(t *testing.T, unitFile string) map[string]bool {
	t.Helper()
	set := map[string]bool{}
	first := true
	for _, opt := range unitOptions(t, unitFile) {
		v, ok := strings.CutPrefix(opt, "[Service] SystemCallFilter=")
		if !ok {
			continue
		}
		deny := strings.HasPrefix(v, "~")
		if first && deny {
			t.Fatalf("%s: the first SystemCallFilter= is a deny list; this test reads allow lists", unitFile)
		}
		first = false
		for _, item := range strings.Fields(strings.TrimPrefix(v, "~")) {
			for _, call := range expandFilter(t, item, map[string]bool{}) {
				set[call] = !deny
			}
		}
	}
	for k, v := range set {
		if !v {
			delete(set, k)
		}
	}
	return set
}

// expandFilter returns the calls of a filter item: a call's name, or a
// group's calls, groups within it expanded.
func expandFilter(t *testing.T, item string, seen map[string]bool) []string {
	t.Helper()
	if !strings.HasPrefix(item, "@") {
		return []string{item}
	}
	if seen[item] {
		return nil
	}
	seen[item] = true
	out, err := exec.Command("systemd-analyze", "syscall-filter", "--no-pager", item).Output()
	if err != nil {
		t.Fatalf("systemd-analyze syscall-filter %s: %v", item, err)
	}
	var calls []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		w := strings.TrimSpace(sc.Text())
		switch {
		case w == "" || w == item || strings.HasPrefix(w, "#"):
		case strings.HasPrefix(w, "@"):
			calls = append(calls, expandFilter(t, w, seen)...)
		default:
			calls = append(calls, w)
		}
	}
	return calls
}

// TestSyscallFilterCoversAgent traces two agent processes (strace -f)
// through start, channels carrying data, a denied dial, metrics and admin
// requests, rekeys and key rotations, a reload, a partition socket given
// to another owner, a peer that leaves, and stop; and checks that every
// system call they made is one the shipped unit's SystemCallFilter allows
// (it answers the others with EPERM). Run under systemd, TestSystemdUnit
// shows the same on this kernel; this test names the call when a change
// to the agent needs one the filter lacks.
func TestSyscallFilterCoversAgent(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: traces the agents (and chowns a partition socket)")
	}
	for _, tool := range []string{"strace", "systemd-analyze"} {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, tool+" is not installed (Debian packages strace, systemd)")
		}
	}
	allowed := filterSet(t, unitPath)
	if !allowed["read"] || !allowed["memfd_secret"] || allowed["setuid"] {
		t.Fatalf("the filter read from %s is not what it says (read %v, memfd_secret %v, setuid %v)",
			unitPath, allowed["read"], allowed["memfd_secret"], allowed["setuid"])
	}
	ub, gb := testUser(t, "sinc-e2e-b")
	dir := shortTemp(t)
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := fmt.Sprintf("127.0.0.1:%d", port)
	traces := []string{filepath.Join(dir, "a.strace"), filepath.Join(dir, "b.strace")}
	strace := func(out string) []string { return []string{"strace", "-f", "-qq", "-c", "-o", out} }
	allow := "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/echo\"\n"
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Top: fmt.Sprintf("metrics = %q", metricsAddr), Extra: allow, Exec: strace(traces[0]),
			PartitionExtra: map[string]string{"web": fmt.Sprintf("mode = \"0660\"\nowner = \"%d\"\ngroup = \"%d\"\n", ub, gb)}},
		{Name: "node-b", Partitions: []string{"db"}, Extra: allow, Exec: strace(traces[1])},
	}, cluster.Timers{DialMin: "50ms", DialMax: "300ms", Rekey: "500ms", Rotate: "500ms"})
	if err != nil {
		t.Fatal(err)
	}
	na, nb := c.Nodes["node-a"], c.Nodes["node-b"]
	procs := startAgents(t, c)
	waitState(t, na, "node-b", "up", 10*time.Second)
	lst := exec.Command(bin, "listen", "echo", "--socket", nb.Partitions["db"], "--exec", "cat")
	errs := &syncBuffer{}
	lst.Stderr = errs
	if err := lst.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { lst.Process.Kill(); lst.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(errs.String(), "listening on"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("listener did not start: %s", errs)
		}
	}
	payload := strings.Repeat("y", 200<<10) + "\n"
	for i := range 5 {
		d := exec.Command(bin, "dial", "node-b/db/echo", "--socket", na.Partitions["web"])
		d.Stdin = strings.NewReader(payload)
		if out, err := d.Output(); err != nil || string(out) != payload {
			t.Fatalf("dial %d: %d bytes, %v", i, len(out), err)
		}
	}
	runSinc(t, "dial", "node-b/db/other", "--socket", na.Partitions["web"])
	scrapeMetrics(t, metricsAddr)
	for _, op := range []string{"peers", "conns", "stats"} {
		mustSinc(t, op, "--admin", na.Admin)
	}
	time.Sleep(1200 * time.Millisecond) // links rekey, keys rotate
	procs[0].Cmd.Process.Signal(syscall.SIGHUP)
	time.Sleep(200 * time.Millisecond)
	// Stop node-b (node-a sees its peer leave), then node-a. SIGTERM goes
	// to each agent, strace's child: strace writes its count as it ends.
	for _, i := range []int{1, 0} {
		sp := procs[i].Cmd.Process.Pid
		children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", sp, sp))
		var agentPID int
		if _, err := fmt.Sscan(string(children), &agentPID); err != nil {
			t.Fatalf("the agent under strace %d: %v", sp, err)
		}
		syscall.Kill(agentPID, syscall.SIGTERM)
		select {
		case <-procs[i].Done():
		case <-time.After(10 * time.Second):
			t.Fatal("a traced agent did not stop")
		}
		if i == 1 {
			waitState(t, na, "node-b", "down", 10*time.Second)
		}
	}

	var used []string
	for _, tr := range traces {
		b, err := os.ReadFile(tr)
		if err != nil {
			t.Fatal(err)
		}
		// strace -c: a header, a rule, one line per call (its name last),
		// a rule and a total.
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) < 5 || strings.HasPrefix(f[0], "-") || f[0] == "%" || f[len(f)-1] == "total" {
				continue
			}
			if name := f[len(f)-1]; !slices.Contains(used, name) {
				used = append(used, name)
			}
		}
	}
	slices.Sort(used)
	if len(used) < 30 || !slices.Contains(used, "fchownat") || !slices.Contains(used, "accept4") {
		t.Fatalf("the traces hold too little to prove anything: %v", used)
	}
	var refused []string
	for _, call := range used {
		if !allowed[call] {
			refused = append(refused, call)
		}
	}
	if len(refused) > 0 {
		t.Errorf("the agents made system calls the unit's SystemCallFilter refuses: %v (all calls: %v)", refused, used)
	}
	t.Logf("%d system calls, all allowed: %v", len(used), used)
}
