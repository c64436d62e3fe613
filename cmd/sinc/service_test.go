package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/cluster"
)

// TestAgentAsServiceUser runs the agent as contrib/systemd runs it: a user
// of its own, with CAP_CHOWN as its one capability. A partition whose
// config names another owner and group gets its socket with that owner,
// group and mode — the agent sets the mode while it still owns the socket,
// since without CAP_FOWNER only the owner may (it used to chown first and
// could then not chmod: such an agent did not start) — and the socket lets
// in its owner and refuses a third user.
func TestAgentAsServiceUser(t *testing.T) {
	uid, gid := testUser(t, "sinc-e2e-agent")
	ub, gb := testUser(t, "sinc-e2e-b")
	uc, gc := testUser(t, "sinc-e2e-c")
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web", "own"},
		PartitionExtra: map[string]string{"web": fmt.Sprintf("mode = \"0660\"\nowner = \"%d\"\ngroup = \"%d\"\n", ub, gb)}}},
		cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	filepath.Walk(dir, func(p string, _ os.FileInfo, _ error) error { return os.Lchown(p, uid, gid) })
	n := c.Nodes["node-a"]
	agentCmd := as(uid, gid, "agent", "--config", n.Config)
	agentCmd.SysProcAttr.AmbientCaps = []uintptr{unix.CAP_CHOWN}
	logf, _ := os.Create(filepath.Join(dir, "agent.log"))
	defer logf.Close()
	agentCmd.Stdout, agentCmd.Stderr = logf, logf
	if err := agentCmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { agentCmd.Process.Signal(syscall.SIGTERM); agentCmd.Wait() }()
	if err := waitAgent(n); err != nil {
		b, _ := os.ReadFile(filepath.Join(dir, "agent.log"))
		t.Fatalf("agent as uid %d with CAP_CHOWN did not start: %v\n%s", uid, err, b)
	}
	// The agent has CAP_CHOWN and nothing else (no CAP_FOWNER, which
	// would hide the order of chown and chmod).
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", agentCmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("CapEff:\t%016x\n", 1<<unix.CAP_CHOWN); !strings.Contains(string(status), want) {
		t.Fatalf("the agent's capabilities are not CAP_CHOWN alone (want %q):\n%s", want, status)
	}
	for _, s := range []struct {
		part      string
		uid, gid  int
		mode      os.FileMode
		reachable []int // uids that may connect
		refused   []int
	}{
		{"web", ub, gb, 0o660, []int{ub}, []int{uc}},
		{"own", uid, gid, 0o600, []int{uid}, []int{ub}},
	} {
		st, err := os.Lstat(n.Partitions[s.part])
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if int(sys.Uid) != s.uid || int(sys.Gid) != s.gid || st.Mode().Perm() != s.mode {
			t.Errorf("socket of %s: uid %d gid %d mode %04o, want %d %d %04o", s.part, sys.Uid, sys.Gid, st.Mode().Perm(), s.uid, s.gid, s.mode)
		}
		gids := map[int]int{ub: gb, uc: gc, uid: gid}
		for _, u := range s.reachable {
			if out, errs, code := runCmd(t, as(u, gids[u], "conns", "--socket", n.Partitions[s.part])); code != 0 {
				t.Errorf("uid %d could not use the socket of %s: %s%s", u, s.part, out, errs)
			}
		}
		for _, u := range s.refused {
			if _, errs, code := runCmd(t, as(u, gids[u], "conns", "--socket", n.Partitions[s.part])); code == 0 || !strings.Contains(errs, "permission denied") {
				t.Errorf("uid %d reached the socket of %s: exit %d, %s", u, s.part, code, errs)
			}
		}
	}
}
