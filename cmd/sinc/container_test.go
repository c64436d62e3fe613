package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// A partition as a container (DESIGN.md §4: a partition's socket is what
// gets mounted into a container). A client runs in new user, PID and mount
// namespaces made by unshare(1) as an unprivileged uid, root and pid 1 in
// its own eyes, with a private tmpfs over the cluster's folder and only
// its partition's socket bound back in.

// containerScript runs inside the namespaces: it stages the partition
// socket, hides every sinc file under a tmpfs, binds the one socket back,
// says who it thinks it is and what it can reach, then becomes the client.
const containerScript = `
set -e
mount --bind "$WEB" "$HOLE"
mount -t tmpfs -o mode=0755 tmpfs "$ROOT"
mkdir -p "$(dirname "$WEB")"
touch "$WEB"
mount --bind "$HOLE" "$WEB"
echo "inside: uid=$(id -u) pid=$$"
for s in "$BATCH" "$DB"; do
	echo "try $s: $("$SINC" conns --socket "$s" 2>&1 | tr '\n' ' ')"
done
echo "try admin: $("$SINC" conns --admin "$ADMIN" 2>&1 | tr '\n' ' ')"
echo "ready"
exec "$SINC" dial node-b/db/echo --socket "$WEB"
`

// TestPartitionAsContainer: the agent sees a containerized client by its
// real uid and pid, never the namespace's 0 and 1, and says so in the
// connection table; the other partitions' sockets, which the same uid can
// reach on the host, do not exist inside.
func TestPartitionAsContainer(t *testing.T) {
	ua, ga := testUser(t, "sinc-e2e-a")
	needTool(t, "/usr/bin/unshare", "util-linux")
	probe := exec.Command("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "true")
	probe.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(ua), Gid: uint32(ga)}}
	if out, err := probe.CombinedOutput(); err != nil {
		t.Skipf("this kernel does not let an unprivileged user make user namespaces: %v %s", err, out)
	}

	// node-a: web and batch, both uid A's; node-b: db with an echo service.
	own := fmt.Sprintf("mode = \"0600\"\nowner = \"%d\"\n", ua)
	rule := "\n[[allow]]\nfrom = \"node-a/*\"\nto = \"node-b/db/echo\"\n"
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"}, Extra: rule, PartitionExtra: map[string]string{"web": own, "batch": own}},
		{Name: "node-b", Partitions: []string{"db"}, Extra: rule},
	}, cluster.Timers{DialMin: "50ms", DialMax: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	startAgents(t, c)
	a, b := c.Nodes["node-a"], c.Nodes["node-b"]
	waitState(t, a, "node-b", "up", 10*time.Second)
	startDaemon(t, exec.Command(bin, "listen", "echo", "--socket", b.Partitions["db"], "--exec", "cat"), "listening on")

	// On the host, uid A reaches batch: only the mount namespace will keep
	// the container out of it.
	if out, errs, code := runCmd(t, as(ua, ga, "conns", "--socket", a.Partitions["batch"])); code != 0 {
		t.Fatalf("uid %d on the host cannot reach its batch partition: %s%s", ua, out, errs)
	}

	holeDir := shortTemp(t)
	os.Chmod(holeDir, 0o755)
	hole := filepath.Join(holeDir, "web.sock")
	os.WriteFile(hole, nil, 0o600)
	os.Chown(hole, ua, ga)
	cmd := exec.Command("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--mount-proc",
		"sh", "-c", containerScript)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SINC=" + bin, "ROOT=" + dir, "HOLE=" + hole,
		"WEB=" + a.Partitions["web"], "BATCH=" + a.Partitions["batch"], "DB=" + b.Partitions["db"], "ADMIN=" + a.Admin}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(ua), Gid: uint32(ga)},
		Pdeathsig: syscall.SIGKILL}
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	errs := &syncBuffer{}
	cmd.Stderr = errs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	out := bufio.NewReader(stdout)
	var said []string
	for {
		line, err := readLineWithin(out, 10*time.Second)
		if err != nil {
			t.Fatalf("inside the container: %v after %q; stderr %s", err, said, errs)
		}
		if line == "ready" {
			break
		}
		said = append(said, line)
		t.Logf("container: %s", line)
	}

	// (b) The namespaces are real: the client is root and pid 1 in them.
	if said[0] != "inside: uid=0 pid=1" {
		t.Fatalf("the client inside says %q; want uid 0 and pid 1", said[0])
	}
	// (c) Other partitions' sockets and the admin socket do not exist
	// inside; the client's own does (it dials below).
	for _, l := range said[1:] {
		if !strings.Contains(l, "no such file or directory") {
			t.Errorf("inside the container: %q; want no such file", l)
		}
	}

	// The channel through the bound socket works.
	fmt.Fprintln(stdin, "ping")
	if l, err := readLineWithin(out, 10*time.Second); err != nil || l != "ping" {
		t.Fatalf("echo through the container's socket: %q %v (%s)", l, err, errs)
	}

	// (a) The agent's row names the host's uid and pid of the client, not
	// 0 and 1; that pid is the process unshare forked, pid 1 in its
	// namespace.
	var row *struct{ pid, uid int }
	for _, r := range adminConns(t, a) {
		if r.Partition == "web" && r.RemoteService == "echo" {
			row = &struct{ pid, uid int }{int(r.Process.PID), int(r.Process.UID)}
		}
	}
	if row == nil {
		t.Fatalf("no row for the container's channel in node-a's table: %+v", adminConns(t, a))
	}
	if row.uid != ua || row.uid == 0 {
		t.Errorf("the row's uid is %d; want the host uid %d, not the namespace's 0", row.uid, ua)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", row.pid))
	if err != nil {
		t.Fatalf("the row's pid %d: %v", row.pid, err)
	}
	fields := map[string]string{}
	for _, l := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	if want := fmt.Sprintf("%d 1", row.pid); fields["NSpid"] != want || row.pid == 1 {
		t.Errorf("the row's pid %d has NSpid %q; want %q: the host pid of the namespace's pid 1", row.pid, fields["NSpid"], want)
	}
	if fields["PPid"] != strconv.Itoa(cmd.Process.Pid) {
		t.Errorf("the row's pid %d has parent %s; want unshare's %d", row.pid, fields["PPid"], cmd.Process.Pid)
	}
	t.Logf("the agent's row: uid %d pid %d; the kernel: NSpid %s, Uid %s (uid 0 and pid 1 inside)", row.uid, row.pid, fields["NSpid"], fields["Uid"])
	if text := mustSinc(t, "conns", "--admin", a.Admin); !strings.Contains(text, strconv.Itoa(row.pid)) {
		t.Errorf("sinc conns --admin does not show pid %d:\n%s", row.pid, text)
	} else {
		t.Logf("sinc conns --admin:\n%s", text)
	}

	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the container's client: %v (%s)", err, errs)
	}
}

// readLineWithin reads a line, without its newline, waiting at most d.
func readLineWithin(r *bufio.Reader, d time.Duration) (string, error) {
	type res struct {
		s   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := r.ReadString('\n')
		ch <- res{strings.TrimSuffix(s, "\n"), err}
	}()
	select {
	case r := <-ch:
		if r.err == io.EOF && r.s != "" {
			return r.s, nil
		}
		return r.s, r.err
	case <-time.After(d):
		return "", fmt.Errorf("no line within %s", d)
	}
}
