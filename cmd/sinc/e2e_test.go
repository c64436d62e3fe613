package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
)

// bin is the sinc binary built for the end-to-end tests.
var bin string

func TestMain(m *testing.M) {
	// The test binary doubles as the attacker processes of the tests.
	if target := os.Getenv("SINC_TEST_STEAL"); target != "" {
		pid, _ := strconv.Atoi(target)
		stealMain(pid)
		os.Exit(0)
	}
	if target := os.Getenv("SINC_TEST_PEEK"); target != "" {
		pid, _ := strconv.Atoi(target)
		peekMain(pid)
		os.Exit(0)
	}
	if arg := os.Getenv("SINC_TEST_FLOOD"); arg != "" {
		floodMain(arg)
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "sinc-bin")
	if err != nil {
		panic(err)
	}
	os.Chmod(dir, 0o755) // client processes of other uids run the binary
	bin = filepath.Join(dir, "sinc")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building sinc: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	// Every client this process ran, every listener and pump, must be gone.
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines leaked by the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// runSinc runs the binary and returns stdout, stderr and the exit code.
func runSinc(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, errs, code := runCmd(t, exec.CommandContext(ctx, bin, args...))
	return string(out), errs, code
}

// runCmd runs cmd and returns its stdout, stderr and exit code; a command
// that could not run at all fails the test.
func runCmd(t *testing.T, cmd *exec.Cmd) ([]byte, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%v: %v", cmd.Args, err)
	}
	return out.Bytes(), errb.String(), code
}

func mustSinc(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := runSinc(t, args...)
	if code != 0 {
		t.Fatalf("sinc %v: exit %d\n%s%s", args, code, out, errs)
	}
	return out
}

func shortTemp(t *testing.T) string {
	d, err := os.MkdirTemp("", "sinc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// keyBytes returns the raw key inside a PEM key file.
func keyBytes(t *testing.T, path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		t.Fatalf("%s: no PEM", path)
	}
	return b.Bytes
}

func TestCAWorkflow(t *testing.T) {
	dir := shortTemp(t)
	ca := filepath.Join(dir, "ca")
	mustSinc(t, "ca", "init", "--dir", ca)
	if _, errs, code := runSinc(t, "ca", "init", "--dir", ca); code == 0 || !strings.Contains(errs, "refusing to replace") {
		t.Fatalf("second ca init: exit %d, %q", code, errs)
	}
	out := mustSinc(t, "ca", "sign", "--dir", ca, "--node", "node-a", "--partition", "web", "--partition", "db",
		"--valid-for", "48h", "--out", filepath.Join(dir, "a"))
	if !strings.Contains(out, "web,db") {
		t.Fatalf("sign output: %s", out)
	}
	for _, k := range []string{filepath.Join(ca, "ca.key"), filepath.Join(dir, "a", "node-a.key")} {
		st, err := os.Stat(k)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, %v; want 0600", k, st.Mode().Perm(), err)
		}
	}
	show := mustSinc(t, "cert", "show", filepath.Join(dir, "a", "node-a.crt"))
	for _, want := range []string{"name:        node-a", "partitions:  web, db", "fingerprint:", "not after:"} {
		if !strings.Contains(show, want) {
			t.Errorf("cert show lacks %q:\n%s", want, show)
		}
	}
	// No private key, in any encoding, in what cert show prints.
	for _, k := range []string{filepath.Join(ca, "ca.key"), filepath.Join(dir, "a", "node-a.key")} {
		kb := keyBytes(t, k)
		if strings.Contains(show, hex.EncodeToString(kb)) || strings.Contains(show, string(kb)) {
			t.Fatalf("cert show printed the private key of %s", k)
		}
	}
	// Usage errors name what is wrong.
	for _, args := range [][]string{
		{"ca", "sign", "--dir", ca, "--node", "x", "--out", dir},
		{"ca", "sign", "--dir", ca, "--partition", "p", "--out", dir},
		{"ca", "sign", "--dir", ca, "--node", "bad/name", "--partition", "p", "--out", filepath.Join(dir, "b")},
		{"cert", "show"},
		{"agent"},
		{"nosuch"},
	} {
		if _, errs, code := runSinc(t, args...); code == 0 || errs == "" {
			t.Errorf("sinc %v: exit %d, stderr %q; want a failure with a reason", args, code, errs)
		}
	}
}

func TestAgentRefusesBadConfig(t *testing.T) {
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"p1"}}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	good, _ := os.ReadFile(n.Config)
	for _, tc := range []struct{ edit, want string }{
		{strings.Replace(string(good), "listen =", "listn =", 1), `field "listn": unknown field`},
		{strings.Replace(string(good), "[timers]\n", "[timers]\nkeepalive = \"soon\"\n", 1), `field "timers.keepalive": "soon" is not a duration`},
		{string(good) + "\n[partitions.other]\nsocket = \"x.sock\"\n", `partition "other" is not in the node's certificate`},
	} {
		os.WriteFile(n.Config, []byte(tc.edit), 0o600)
		_, errs, code := runSinc(t, "agent", "--config", n.Config)
		if code == 0 || !strings.Contains(errs, tc.want) {
			t.Errorf("exit %d, stderr %q; want %q", code, errs, tc.want)
		}
		if _, err := os.Stat(n.Admin); err == nil {
			t.Errorf("admin socket made by an agent that refused its config")
		}
	}
	os.WriteFile(n.Config, good, 0o600)
	os.Chmod(filepath.Join(n.Dir, "node-a.key"), 0o640)
	_, errs, code := runSinc(t, "agent", "--config", n.Config)
	if code == 0 || !strings.Contains(errs, "node-a.key has mode 0640") {
		t.Errorf("loose key: exit %d, stderr %q", code, errs)
	}
}

func peerRow(t *testing.T, adminPath, peer string) admin.PeerRow {
	t.Helper()
	out := mustSinc(t, "peers", "--admin", adminPath, "--json")
	var rows []admin.PeerRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("peers --json: %v\n%s", err, out)
	}
	for _, r := range rows {
		if r.Peer == peer {
			return r
		}
	}
	t.Fatalf("no row for %s in %s", peer, out)
	return admin.PeerRow{}
}

// waitState polls `sinc peers` until peer is in state ("down" also matches
// "connecting": no link, and a dial in progress); it returns how long that
// took.
func waitState(t *testing.T, n *cluster.Node, peer, state string, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		var r admin.PeerRow
		if _, _, code := runSinc(t, "peers", "--admin", n.Admin); code == 0 { // the agent is serving
			r = peerRow(t, n.Admin, peer)
			if r.State == state || state == "down" && r.State == "connecting" {
				return time.Since(start)
			}
		}
		if time.Since(start) > limit {
			t.Fatalf("%s: peer %s is %q after %s, want %s (last error %q)", n.Name, peer, r.State, limit, state, r.LastError)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAgentsEndToEnd runs two real agent processes: they link; `sinc peers`
// shows it; a killed peer is seen down, a frozen one within the keepalive
// bound; a restarted one comes back; SIGTERM stops an agent cleanly.
func TestAgentsEndToEnd(t *testing.T) {
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}},
		{Name: "node-b", Partitions: []string{"db"}},
	}, cluster.Timers{Keepalive: "200ms", DeadAfter: "1s", DialMin: "50ms", DialMax: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	na, nb := c.Nodes["node-a"], c.Nodes["node-b"]
	pa, err := cluster.Start(bin, na)
	if err != nil {
		t.Fatal(err)
	}
	defer pa.Kill()
	pb, err := cluster.Start(bin, nb)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { pb.Kill() }()
	dumpLogs := func() {
		if t.Failed() {
			for _, p := range []string{pa.Log, pb.Log} {
				b, _ := os.ReadFile(p)
				t.Logf("%s:\n%s", p, b)
			}
		}
	}
	defer dumpLogs()

	waitState(t, na, "node-b", "up", 10*time.Second)
	waitState(t, nb, "node-a", "up", 10*time.Second)
	table := mustSinc(t, "peers", "--admin", na.Admin)
	if !strings.Contains(table, "node-b") || !strings.Contains(table, " up ") {
		t.Fatalf("peer table:\n%s", table)
	}

	// Freeze node-b: no FIN, no RST, just silence. node-a must call it down
	// within dead_after (1s) plus a poll.
	pb.Cmd.Process.Signal(syscall.SIGSTOP)
	d := waitState(t, na, "node-b", "down", 5*time.Second)
	if d > 2500*time.Millisecond {
		t.Fatalf("frozen peer seen down after %s, bound is 1s", d)
	}
	if r := peerRow(t, na.Admin, "node-b"); !strings.Contains(r.LastError, "silent") {
		t.Errorf("last error %q does not say the peer went silent", r.LastError)
	}
	pb.Cmd.Process.Signal(syscall.SIGCONT)
	waitState(t, na, "node-b", "up", 10*time.Second)

	// Kill node-b outright; then start it again: the link returns.
	pb.Kill()
	waitState(t, na, "node-b", "down", 5*time.Second)
	pb, err = cluster.Start(bin, nb)
	if err != nil {
		t.Fatal(err)
	}
	waitState(t, na, "node-b", "up", 10*time.Second)
	waitState(t, nb, "node-a", "up", 10*time.Second)

	// SIGTERM: clean exit, sockets removed, the peer learns why.
	if err := pb.Stop(5 * time.Second); err != nil {
		t.Fatalf("node-b exit after SIGTERM: %v", err)
	}
	if _, err := os.Stat(nb.Admin); err == nil {
		t.Fatal("node-b left its admin socket behind")
	}
	waitState(t, na, "node-b", "down", 5*time.Second)
	if r := peerRow(t, na.Admin, "node-b"); !strings.Contains(r.LastError, "shutting down") && !strings.Contains(r.LastError, "refused") {
		t.Errorf("last error after node-b's shutdown: %q", r.LastError)
	}
	if err := pa.Stop(5 * time.Second); err != nil {
		t.Fatalf("node-a exit after SIGTERM: %v", err)
	}
}

func TestDemo(t *testing.T) {
	out := mustSinc(t, "demo")
	for _, want := range []string{
		"peers of node-a (sinc ",                      // with the agent's build
		"echo: hello from node-a/web to node-b/db",    // across nodes
		"echo: hello from node-a/web to node-a/batch", // across partitions of one node
		"connections of node-a:", "connections of node-b:",
		"node-b/db/echo",                           // node-a's row names the remote service
		"denied (by node-b)", "denied (by node-a)", // each agent's policy, named
		"demo done",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("demo output lacks %q:\n%s", want, out)
		}
	}
}
