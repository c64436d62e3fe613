package ident

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// socketpair returns both ends of a connected Unix stream socket pair.
func socketpair(t *testing.T) (a, b *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

func TestFromConnSelf(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			a, _ := socketpair(t)
			p, err := FromConn(a, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			self := int32(os.Getpid())
			if p.PID != self || p.UID != uint32(os.Getuid()) || p.GID != uint32(os.Getgid()) {
				t.Errorf("got %v, want pid %d uid %d gid %d", p, self, os.Getuid(), os.Getgid())
			}
			if want := procStart(t, self); p.Start != want {
				t.Errorf("Start = %d, /proc says %d", p.Start, want)
			}
			if (p.pidfd >= 0) != m.wantPidfd {
				t.Errorf("pidfd = %d, want one: %v", p.pidfd, m.wantPidfd)
			}
			if !p.Alive() {
				t.Error("Alive() = false for this very process")
			}
			want := "pid " + itoa(int(self)) + " uid " + itoa(os.Getuid()) + " gid " + itoa(os.Getgid())
			if p.String() != want {
				t.Errorf("String() = %q, want %q", p.String(), want)
			}
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestPidfdIsCloseOnExec(t *testing.T) {
	a, _ := socketpair(t)
	p, err := FromConn(a, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Ask about the kernel's own flags, before setCloexec could have
	// changed them: this documents the kernel's behaviour.
	rc, _ := a.SyscallConn()
	var fd int
	var gerr error
	rc.Control(func(s uintptr) {
		fd, gerr = unix.GetsockoptInt(int(s), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	})
	if gerr != nil {
		t.Fatal(gerr)
	}
	defer unix.Close(fd)
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.FD_CLOEXEC == 0 {
		t.Log("kernel returned an SO_PEERPIDFD pidfd without FD_CLOEXEC")
	}
	flags, err = unix.FcntlInt(uintptr(p.pidfd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.FD_CLOEXEC == 0 {
		t.Error("Process's pidfd is not close-on-exec")
	}
}

// identify is FromConn of c's connection, accepted now; the Process is
// closed when the test ends (Close may be called before).
func identify(t *testing.T, c *child) *Process {
	t.Helper()
	p, err := FromConn(c.conn, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestFromConnChild(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, "", nil)
			p := identify(t, c)
			if p.PID != c.pid() {
				t.Errorf("PID = %d, want the child's %d", p.PID, c.pid())
			}
			if p.UID != uint32(os.Getuid()) || p.GID != uint32(os.Getgid()) {
				t.Errorf("uid %d gid %d, want %d %d", p.UID, p.GID, os.Getuid(), os.Getgid())
			}
			if want := procStart(t, c.pid()); p.Start != want {
				t.Errorf("Start = %d, /proc says %d", p.Start, want)
			}
			if p.Key() != (Key{PID: c.pid(), Start: p.Start}) {
				t.Errorf("Key() = %+v", p.Key())
			}
			if !p.Alive() {
				t.Fatal("Alive() = false while the child runs")
			}
			c.kill()
			if p.Alive() {
				t.Fatal("Alive() = true after the child was killed and reaped")
			}
		})
	}
}

// A child that has exited but is not reaped yet is a zombie: it does not
// run, so Alive must say so although its pid is still taken.
func TestAliveFalseForZombie(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, "", nil)
			p := identify(t, c)
			c.cmd.Process.Signal(syscall.SIGKILL)
			// Wait for the zombie without reaping it.
			var info unix.Siginfo
			if err := unix.Waitid(unix.P_PID, int(c.pid()), &info, unix.WEXITED|unix.WNOWAIT, nil); err != nil {
				t.Fatal(err)
			}
			if p.Alive() {
				t.Error("Alive() = true for a zombie")
			}
			c.kill()
		})
	}
}

func TestExited(t *testing.T) {
	defer goleak.VerifyNone(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, "", nil)
			p := identify(t, c)
			ch := p.Exited()
			if p.Exited() != ch {
				t.Error("a second Exited() returned another channel")
			}
			select {
			case <-ch:
				t.Fatal("Exited() closed while the child runs")
			case <-time.After(100 * time.Millisecond):
			}
			c.conn.Close() // the child exits when it reads EOF
			// Wait for the exit without reaping the child.
			var info unix.Siginfo
			if err := unix.Waitid(unix.P_PID, int(c.pid()), &info, unix.WEXITED|unix.WNOWAIT, nil); err != nil {
				t.Fatal(err)
			}
			exit := time.Now()
			select {
			case <-ch:
			case <-time.After(time.Second):
				t.Fatal("Exited() not closed within 1s of the child's exit")
			}
			// A pidfd wakes the netpoller at once; only polling /proc is slow.
			if d := time.Since(exit); m.wantPidfd && d > alivePollInterval/2 {
				t.Errorf("Exited() closed %v after the exit: the pidfd was not waited on", d)
			}
			// Closed before the child is reaped: exit is what counts.
			c.reap(t)
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Close ends the watcher goroutine of a process that is still running, and
// closes the channel.
func TestCloseEndsExited(t *testing.T) {
	defer goleak.VerifyNone(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, "", nil)
			p := identify(t, c)
			ch := p.Exited()
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
			select {
			case <-ch:
			default:
				t.Fatal("Exited() channel still open after Close")
			}
			if err := p.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
			select {
			case <-p.Exited():
			default:
				t.Fatal("Exited() after Close returned an open channel")
			}
			if !p.Alive() {
				t.Error("Alive() = false after Close while the child runs")
			}
		})
	}
}

func TestExitedAfterCloseWithoutWatcher(t *testing.T) {
	a, _ := socketpair(t)
	p, err := FromConn(a, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	select {
	case <-p.Exited():
	default:
		t.Fatal("Exited() of a closed Process is open")
	}
}

func TestCredentialsOfOtherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("starting a child as uid 65534 needs root")
	}
	path := copyExecutable(t)
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, path, &syscall.Credential{Uid: 65534, Gid: 65534})
			p := identify(t, c)
			if p.UID != 65534 || p.GID != 65534 || p.PID != c.pid() {
				t.Errorf("got %v, want pid %d uid 65534 gid 65534", p, c.pid())
			}
			if !p.Alive() {
				t.Error("Alive() = false for a running child of another uid")
			}
		})
	}
}

// On the fallback path a process that started after the accept holds a
// recycled pid. Simulated by giving an accept time before the child started.
func TestFallbackRefusesLaterStart(t *testing.T) {
	accepted := time.Now()
	time.Sleep(50 * time.Millisecond) // several clock ticks
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, "", nil)
			p, err := FromConn(c.conn, accepted)
			if !m.noPeerPidfd {
				// SO_PEERPIDFD proves the identity; the time is not used.
				if err != nil {
					t.Fatal(err)
				}
				p.Close()
				return
			}
			if !errors.Is(err, ErrPIDReused) {
				t.Fatalf("FromConn with an accept time before the process started: %v, want ErrPIDReused", err)
			}
			if !strings.Contains(err.Error(), "pid "+itoa(int(c.pid()))) {
				t.Errorf("error %q does not name the pid", err)
			}
			// With the real accept time it passes.
			p, err = FromConn(c.conn, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			p.Close()
		})
	}
}

// A peer that exited and was reaped before FromConn is refused, whatever
// the kernel still tells about its socket.
func TestFromConnReapedPeer(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			withMode(t, m)
			c := startChild(t, "", nil)
			c.kill()
			p, err := FromConn(c.conn, time.Now())
			if err == nil {
				p.Close()
				t.Fatal("FromConn of a reaped peer succeeded")
			}
			if !errors.Is(err, ErrExited) {
				t.Fatalf("FromConn of a reaped peer: %v, want ErrExited", err)
			}
			t.Logf("reaped peer: %v", err)
		})
	}
}

// The attack SO_PEERPIDFD exists for: the peer exits, is reaped, and its
// pid goes to a new process before the agent looks. The kernel still hands
// out SO_PEERCRED's old pid and, on recent kernels, a pidfd for the reaped
// process; /proc/PID then shows the newcomer. Made up here with a fake /proc
// (a real pid cannot be recycled on demand without changing system-wide
// settings). The pidfd check after the /proc read must refuse it.
func TestFromConnRecycledPid(t *testing.T) {
	c := startChild(t, "", nil)
	pid := c.pid()
	c.kill()

	// A "process" holding the pid: this test's own stat, which shows a
	// running process that started before the connection.
	self, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	fake := t.TempDir()
	dir := filepath.Join(fake, itoa(int(pid)))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "stat"), self, 0o644); err != nil {
		t.Fatal(err)
	}
	old := procDir
	procDir = fake
	defer func() { procDir = old }()

	p, err := FromConn(c.conn, time.Now())
	if err == nil {
		p.Close()
		t.Fatalf("FromConn accepted the new holder of a recycled pid: %v", p)
	}
	if !errors.Is(err, ErrExited) {
		t.Fatalf("FromConn: %v, want ErrExited", err)
	}
	t.Logf("recycled pid: %v", err)
}

// The pidfd Exited waits on must be in Go's netpoller, not a blocked
// thread: only then does a file accept a deadline.
func TestPidfdFileIsPollable(t *testing.T) {
	a, _ := socketpair(t)
	p, err := FromConn(a, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	f, err := pidfdFile(p.pidfd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.SetReadDeadline(time.Now().Add(time.Hour)); err != nil {
		t.Fatalf("pidfd file not in the netpoller: %v", err)
	}
}

func TestKeyDiffers(t *testing.T) {
	c1 := startChild(t, "", nil)
	c2 := startChild(t, "", nil)
	p1, err := FromConn(c1.conn, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer p1.Close()
	p2, err := FromConn(c2.conn, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if p1.Key() == p2.Key() {
		t.Errorf("two processes have the same key %+v", p1.Key())
	}
	// The same process seen twice has the same key.
	a, _ := socketpair(t)
	b, _ := socketpair(t)
	s1, err := FromConn(a, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Close()
	s2, err := FromConn(b, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if s1.Key() != s2.Key() {
		t.Errorf("one process has keys %+v and %+v", s1.Key(), s2.Key())
	}
}

// BootTimeTicks brackets a process's start time: taken before the process
// starts it is not later, taken after it is not earlier.
func TestBootTimeTicksBracketsStart(t *testing.T) {
	before := time.Now()
	c := startChild(t, "", nil)
	after := time.Now()
	start := procStart(t, c.pid())
	b, err := BootTimeTicks(before)
	if err != nil {
		t.Fatal(err)
	}
	a, err := BootTimeTicks(after)
	if err != nil {
		t.Fatal(err)
	}
	if !(b <= start && start <= a) {
		t.Errorf("start %d not within [%d, %d]", start, b, a)
	}
	if _, err := BootTimeTicks(time.Time{}); err == nil {
		t.Error("BootTimeTicks of the zero time: no error")
	}
	if ClockTicks() != 100 {
		t.Logf("clock ticks per second: %d", ClockTicks())
	}
}

func TestParseStat(t *testing.T) {
	fields := func(comm string) string {
		// pid (comm) state ppid ... field 22 = 4242
		s := "123 (" + comm + ") S"
		for i := 4; i <= 52; i++ {
			if i == 22 {
				s += " 4242"
			} else {
				s += " " + itoa(i)
			}
		}
		return s + "\n"
	}
	for _, comm := range []string{"sleep", "a b", "x) Z 1 2 (y", ")", "((", ""} {
		s, err := parseStat([]byte(fields(comm)))
		if err != nil {
			t.Errorf("comm %q: %v", comm, err)
			continue
		}
		if s.State != 'S' || s.Start != 4242 {
			t.Errorf("comm %q: got %+v", comm, s)
		}
	}
	for _, bad := range []string{
		"",
		"123 sleep S 1",
		"123 (sleep) S 1 2 3",
		"123 (sleep) SS" + strings.Repeat(" 1", 30),
		"123 (sleep) S" + strings.Repeat(" 1", 18) + " x 1 1",
	} {
		if s, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q) = %+v, want an error", bad, s)
		}
	}
}
