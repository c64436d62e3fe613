package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/local"
)

// The claims (docs/design.md, "The claims and where they live"), end to end: real agent processes, and real
// client processes under two different uids.

// testUser makes (or finds) a system user for the end-to-end tests.
func testUser(t *testing.T, name string) (uid, gid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs client processes under other uids (CI runs as root)")
	}
	u, err := user.Lookup(name)
	if err != nil {
		out, err := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name).CombinedOutput()
		if err != nil && !strings.Contains(string(out), "already exists") {
			t.Skipf("cannot make user %s: %v %s", name, err, out)
		}
		if u, err = user.Lookup(name); err != nil {
			t.Fatal(err)
		}
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

// as returns a command running bin with args as uid/gid.
func as(uid, gid int, args ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
		Pdeathsig: syscall.SIGKILL}
	return cmd
}

type claimsCluster struct {
	c              *cluster.Cluster
	a, b           *cluster.Node
	pa, pb         *cluster.Process
	ua, ga, ub, gb int
	seen           string // the echo listener's log of accepted channels
}

// startClaims lays out node-a (web: uid A; batch: uid B) and node-b (db:
// uid B; cache: uid A), each partition socket 0600 for its user, a policy
// that lets uid A in node-a/web reach node-b/db/echo, and starts both
// agents and, as uid B, an echo service on node-b/db that logs each
// channel it accepts.
func startClaims(t *testing.T) *claimsCluster {
	k := &claimsCluster{}
	k.ua, k.ga = testUser(t, "sinc-e2e-a")
	k.ub, k.gb = testUser(t, "sinc-e2e-b")
	own := func(uid int) string { return fmt.Sprintf("mode = \"0600\"\nowner = \"%d\"\n", uid) }
	rule := fmt.Sprintf("\n[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/echo\"\nuids = [%d]\n", k.ua)
	dir := shortTemp(t)
	var err error
	k.c, err = cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"}, Extra: rule,
			PartitionExtra: map[string]string{"web": own(k.ua), "batch": own(k.ub)}},
		{Name: "node-b", Partitions: []string{"db", "cache"}, Extra: rule,
			PartitionExtra: map[string]string{"db": own(k.ub), "cache": own(k.ua)}},
	}, cluster.Timers{Keepalive: "200ms", DeadAfter: "1s", DialMin: "50ms", DialMax: "300ms", Open: "2s"})
	if err != nil {
		t.Fatal(err)
	}
	k.a, k.b = k.c.Nodes["node-a"], k.c.Nodes["node-b"]
	for _, n := range []*cluster.Node{k.a, k.b} {
		p, err := cluster.Start(bin, n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := p.Stop(5 * time.Second); err != nil {
				t.Errorf("agent %s: %v", n.Name, err)
			}
			if t.Failed() {
				b, _ := os.ReadFile(p.Log)
				t.Logf("%s:\n%s", p.Log, b)
			}
		})
		if n == k.a {
			k.pa = p
		} else {
			k.pb = p
		}
	}
	waitState(t, k.a, "node-b", "up", 10*time.Second)
	waitState(t, k.b, "node-a", "up", 10*time.Second)

	// The echo service, as uid B, logging each channel to a file uid B owns.
	k.seen = filepath.Join(k.b.Dir, "seen.log")
	os.WriteFile(k.seen, nil, 0o600)
	os.Chown(k.seen, k.ub, k.gb)
	srv := as(k.ub, k.gb, "listen", "echo", "--socket", k.b.Partitions["db"],
		"--exec", "echo \"$SINC_REMOTE uid=$SINC_REMOTE_UID\" >> "+k.seen+"; exec cat")
	srvErr := &syncBuffer{}
	srv.Stderr = srvErr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Process.Signal(os.Interrupt)
		srv.Wait()
		if t.Failed() {
			t.Logf("echo service stderr:\n%s", srvErr.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(srvErr.String(), "listening on") {
		if time.Now().After(deadline) {
			t.Fatalf("echo service did not start: %s", srvErr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return k
}

// dialAs runs `sinc dial` as uid with stdin in and returns stdout, stderr
// and the exit code.
func (k *claimsCluster) dialAs(t *testing.T, uid, gid int, part, addr string, in []byte, extra ...string) ([]byte, string, int) {
	t.Helper()
	cmd := as(uid, gid, append([]string{"dial", addr, "--socket", k.a.Partitions[part]}, extra...)...)
	cmd.Stdin = bytes.NewReader(in)
	return runCmd(t, cmd)
}

func (k *claimsCluster) seenCount(t *testing.T) int {
	b, err := os.ReadFile(k.seen)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

func adminConns(t *testing.T, n *cluster.Node) []admin.ConnRow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := admin.Query(ctx, n.Admin, admin.Request{Op: "conns"})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Conns
}

// TestClaimsEndToEnd runs the whole story between processes of two uids.
func TestClaimsEndToEnd(t *testing.T) {
	k := startClaims(t)

	t.Run("1MiB stream byte-exact across nodes", func(t *testing.T) {
		data := make([]byte, 1<<20)
		rand.Read(data)
		out, errs, code := k.dialAs(t, k.ua, k.ga, "web", "node-b/db/echo", data)
		if code != 0 || !bytes.Equal(out, data) {
			t.Fatalf("exit %d, %d bytes back (want %d equal): %s", code, len(out), len(data), errs)
		}
	})

	t.Run("10000 messages keep their boundaries", func(t *testing.T) {
		var in bytes.Buffer
		for i := range 10000 {
			b := make([]byte, 1+i%97)
			rand.Read(b)
			fmt.Fprintf(&in, "%d:%s\n", i, hex.EncodeToString(b))
		}
		out, errs, code := k.dialAs(t, k.ua, k.ga, "web", "node-b/db/echo", in.Bytes(), "--message")
		if code != 0 || !bytes.Equal(out, in.Bytes()) {
			t.Fatalf("exit %d, %d bytes back (want %d equal): %s", code, len(out), in.Len(), errs)
		}
	})

	t.Run("identity comes from the kernel", func(t *testing.T) {
		// Hold a channel open as uid A and read both connection tables.
		cmd := as(k.ua, k.ga, "dial", "node-b/db/echo", "--socket", k.a.Partitions["web"])
		in, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { in.Close(); cmd.Wait() }()
		fmt.Fprintln(in, "ping")
		if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ping\n" {
			t.Fatalf("echo: %q %v", line, err)
		}
		var ra, rb *local.Conn
		for _, r := range adminConns(t, k.a) {
			if r.Process.PID == uint32(cmd.Process.Pid) {
				ra = &r.Conn
			}
		}
		for _, r := range adminConns(t, k.b) {
			if r.RemoteProcess.PID == uint32(cmd.Process.Pid) {
				rb = &r.Conn
			}
		}
		if ra == nil || rb == nil {
			t.Fatalf("no rows for the dialing process %d", cmd.Process.Pid)
		}
		if ra.Process.UID != uint32(k.ua) || ra.RemoteProcess.UID != uint32(k.ub) || ra.Partition != "web" ||
			ra.RemoteNode != "node-b" || ra.RemotePartition != "db" || ra.RemoteService != "echo" {
			t.Fatalf("node-a row %+v", *ra)
		}
		if rb.Process.UID != uint32(k.ub) || rb.RemoteProcess.UID != uint32(k.ua) || rb.Service != "echo" ||
			rb.RemoteNode != "node-a" || rb.RemotePartition != "web" {
			t.Fatalf("node-b row %+v", *rb)
		}
		// The process itself sees its partition's rows (and no key).
		conns := as(k.ua, k.ga, "conns", "--socket", k.a.Partitions["web"], "--json")
		js, err := conns.Output()
		if err != nil {
			t.Fatal(err)
		}
		var rows []local.Conn
		if err := json.Unmarshal(js, &rows); err != nil || len(rows) == 0 {
			t.Fatalf("conns as uid A: %v %s", err, js)
		}
		for _, r := range rows {
			if r.Partition != "web" {
				t.Fatalf("uid A in web sees a row of %s", r.Partition)
			}
		}

		// Another uid cannot take the channel's socket from the process:
		// not through /proc, not with pidfd_getfd.
		thief := exec.Command(testBin(t), "-test.run=^$")
		thief.Env = append(os.Environ(), "SINC_TEST_STEAL="+strconv.Itoa(cmd.Process.Pid))
		thief.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(k.ub), Gid: uint32(k.gb)}}
		res, _ := thief.CombinedOutput()
		if !strings.Contains(string(res), "stole nothing") {
			t.Fatalf("another uid took a channel socket: %s", res)
		}
	})

	t.Run("a partition's socket refuses other users", func(t *testing.T) {
		_, errs, code := k.dialAs(t, k.ub, k.gb, "web", "node-b/db/echo", []byte("x"))
		if code == 0 || !strings.Contains(errs, "permission denied") {
			t.Fatalf("uid B on web's socket: exit %d, %q", code, errs)
		}
		_, errs, code = k.dialAs(t, k.ua, k.ga, "batch", "node-b/db/echo", []byte("x"))
		if code == 0 || !strings.Contains(errs, "permission denied") {
			t.Fatalf("uid A on batch's socket: exit %d, %q", code, errs)
		}
	})

	t.Run("a denied pair never reaches the destination", func(t *testing.T) {
		before := k.seenCount(t)
		// uid B in node-a/batch: node-a's policy has no rule for batch.
		_, errs, code := k.dialAs(t, k.ub, k.gb, "batch", "node-b/db/echo", []byte("must not arrive\n"))
		if code == 0 || !strings.Contains(errs, "denied (by node-a)") {
			t.Fatalf("batch → db: exit %d, %q", code, errs)
		}
		// root in node-a/web: the rule names uid A; root is not uid A,
		// whatever it may claim.
		_, errs, code = k.dialAs(t, 0, 0, "web", "node-b/db/echo", []byte("must not arrive\n"))
		if code == 0 || !strings.Contains(errs, "denied (by node-a)") || !strings.Contains(errs, "(uid 0)") {
			t.Fatalf("root in web → db: exit %d, %q", code, errs)
		}
		time.Sleep(100 * time.Millisecond)
		if after := k.seenCount(t); after != before {
			t.Fatalf("the echo service accepted %d channels during denied dials", after-before)
		}
	})

	t.Run("a process exiting closes its channel on both sides", func(t *testing.T) {
		cmd := as(k.ua, k.ga, "dial", "node-b/db/echo", "--socket", k.a.Partitions["web"])
		in, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(in, "ping")
		bufio.NewReader(out).ReadString('\n')
		pid := uint32(cmd.Process.Pid)
		has := func() bool {
			for _, r := range adminConns(t, k.b) {
				if r.RemoteProcess.PID == pid {
					return true
				}
			}
			return false
		}
		if !has() {
			t.Fatal("no row on node-b for the dialing process")
		}
		cmd.Process.Kill()
		cmd.Wait()
		deadline := time.Now().Add(5 * time.Second)
		for has() {
			if time.Now().After(deadline) {
				t.Fatal("node-b kept the row of a killed process's channel")
			}
			time.Sleep(20 * time.Millisecond)
		}
		for _, r := range adminConns(t, k.a) {
			if r.Process.PID == pid {
				t.Fatal("node-a kept the row of a killed process's channel")
			}
		}
	})

	t.Run("policy reloads on SIGHUP; a bad file keeps the old one", func(t *testing.T) {
		batch := fmt.Sprintf("\n[[allow]]\nfrom = \"node-a/batch\"\nto = \"node-b/db/echo\"\nuids = [%d]\n", k.ub)
		for _, n := range []*cluster.Node{k.a, k.b} {
			f, _ := os.OpenFile(n.Config, os.O_APPEND|os.O_WRONLY, 0)
			f.WriteString(batch)
			f.Close()
		}
		k.pa.Cmd.Process.Signal(syscall.SIGHUP)
		k.pb.Cmd.Process.Signal(syscall.SIGHUP)
		var out []byte
		var errs string
		var code int
		for i := 0; i < 50; i++ {
			if out, errs, code = k.dialAs(t, k.ub, k.gb, "batch", "node-b/db/echo", []byte("now allowed\n")); code == 0 {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if code != 0 || string(out) != "now allowed\n" {
			t.Fatalf("after reload: exit %d %q %q", code, out, errs)
		}
		// Break node-a's file: the policy in force stays.
		good, _ := os.ReadFile(k.a.Config)
		os.WriteFile(k.a.Config, append(good, []byte("\n[[allow]]\nfrom = \"broken\n")...), 0o600)
		k.pa.Cmd.Process.Signal(syscall.SIGHUP)
		deadline := time.Now().Add(5 * time.Second)
		for {
			b, _ := os.ReadFile(k.pa.Log)
			if strings.Contains(string(b), "reload failed; keeping the policy in force") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no log line for the failed reload")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if out, errs, code := k.dialAs(t, k.ub, k.gb, "batch", "node-b/db/echo", []byte("still\n")); code != 0 || string(out) != "still\n" {
			t.Fatalf("after a bad reload: exit %d %q %q", code, out, errs)
		}
	})
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testBin copies the test binary where another uid can run it.
func testBin(t *testing.T) string {
	t.Helper()
	src, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(filepath.Dir(bin), "sinc.test")
	if _, err := os.Stat(dst); err == nil {
		return dst
	}
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// stealMain runs as the thief process: it tries every way to get the
// target's file descriptors and prints what it got.
func stealMain(target int) {
	got := 0
	for fd := 0; fd < 64; fd++ {
		p := fmt.Sprintf("/proc/%d/fd/%d", target, fd)
		if f, err := os.OpenFile(p, os.O_RDWR, 0); err == nil {
			f.Close()
			fmt.Printf("opened %s\n", p)
			got++
		}
	}
	if pfd, err := unix.PidfdOpen(target, 0); err == nil {
		for fd := 0; fd < 64; fd++ {
			if nfd, err := unix.PidfdGetfd(pfd, fd, 0); err == nil {
				unix.Close(nfd)
				fmt.Printf("pidfd_getfd took fd %d\n", fd)
				got++
			}
		}
		unix.Close(pfd)
	}
	if got == 0 {
		fmt.Println("stole nothing")
	}
}
