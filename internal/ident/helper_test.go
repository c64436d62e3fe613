package ident

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// helperEnv, when set, makes the test binary a helper process: it connects
// to the Unix socket named by the variable and waits until the other end
// closes the connection (or 30 seconds pass), then exits.
const helperEnv = "SINC_IDENT_TEST_HELPER"

func TestHelperProcess(t *testing.T) {
	addr := os.Getenv(helperEnv)
	if addr == "" {
		return
	}
	c, err := net.Dial("unix", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(2)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	io.Copy(io.Discard, c)
	os.Exit(0)
}

// child is a helper process connected to the test, and the test's end of
// its connection.
type child struct {
	cmd    *exec.Cmd
	conn   *net.UnixConn
	waited atomic.Bool
}

var socketSeq atomic.Int64

// startChild starts the test binary at path (os.Args[0] if empty) as a
// helper process with the given credentials (nil: the test's own) and
// returns it once its connection is accepted. The child is killed and
// reaped at the end of the test.
func startChild(t *testing.T, path string, cred *syscall.Credential) *child {
	t.Helper()
	if path == "" {
		path = os.Args[0]
	}
	// An abstract socket needs no directory a child of another uid can reach.
	addr := fmt.Sprintf("@sinc-ident-test-%d-%d", os.Getpid(), socketSeq.Add(1))
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	cmd := exec.Command(path, "-test.run=^TestHelperProcess$")
	// Under -race a process sleeps a second at exit by default
	// (atexit_sleep_ms), which tests of exit timing do not want.
	cmd.Env = append(os.Environ(), helperEnv+"="+addr, "GORACE=atexit_sleep_ms=0")
	cmd.Stderr = os.Stderr // a file: no copying goroutine for goleak to see
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ch := &child{cmd: cmd}
	t.Cleanup(func() {
		if ch.conn != nil {
			ch.conn.Close()
		}
		ch.kill()
	})
	ln.SetDeadline(time.Now().Add(10 * time.Second))
	ch.conn, err = ln.AcceptUnix()
	if err != nil {
		t.Fatalf("accept from helper: %v", err)
	}
	return ch
}

func (c *child) pid() int32 { return int32(c.cmd.Process.Pid) }

// kill kills and reaps the child.
func (c *child) kill() {
	if c.waited.Swap(true) {
		return
	}
	c.cmd.Process.Kill()
	c.cmd.Wait()
}

// reap waits for the child to exit by itself.
func (c *child) reap(t *testing.T) {
	t.Helper()
	if c.waited.Swap(true) {
		return
	}
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
}

// procStart reads field 22 of /proc/PID/stat independently of parseStat.
func procStart(t *testing.T, pid int32) uint64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	rest := b[bytes.LastIndexByte(b, ')')+2:]
	f := strings.Split(string(rest), " ")
	n, err := strconv.ParseUint(f[22-3], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// withMode sets the test hooks as m asks until the end of the test.
func withMode(t *testing.T, m mode) {
	t.Helper()
	oldPeer, oldOpen := noPeerPidfd, noPidfdOpen
	noPeerPidfd, noPidfdOpen = m.noPeerPidfd, m.noPidfdOpen
	t.Cleanup(func() { noPeerPidfd, noPidfdOpen = oldPeer, oldOpen })
}

// mode is one way FromConn can get its pidfd.
type mode struct {
	name        string
	noPeerPidfd bool
	noPidfdOpen bool
	wantPidfd   bool
}

var modes = []mode{
	{name: "SO_PEERPIDFD", wantPidfd: true},
	{name: "pidfd_open", noPeerPidfd: true, wantPidfd: true},
	{name: "no pidfd", noPeerPidfd: true, noPidfdOpen: true},
}

// copyExecutable copies the test binary into a directory anyone can read,
// for a child of another uid to run.
func copyExecutable(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sinc-ident-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	path := filepath.Join(dir, "ident.test")
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}
