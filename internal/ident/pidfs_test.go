package ident

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// needPidfs skips a test of the start-time cache on a kernel without pidfs.
func needPidfs(t *testing.T) {
	t.Helper()
	if _, ok := pidfsDevice(); !ok {
		t.Skip("pidfds are not files of pidfs on this kernel (before Linux 6.9) or this is a 32-bit program: no start-time cache")
	}
}

// The kernel property the cache rests on: one process, one inode number,
// however many pidfds; another process, another number; and the number
// stays with the pidfd after its process is reaped.
func TestPidfsInodeNamesTheProcess(t *testing.T) {
	needPidfs(t)
	pidfd := func(pid int32) int {
		fd, err := openPidfd(pid)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	inode := func(fd int) uint64 {
		ino, ok := pidfsInode(fd)
		if !ok {
			t.Fatalf("pidfd %d is not a file of pidfs", fd)
		}
		return ino
	}
	self := int32(os.Getpid())
	if a, b := inode(pidfd(self)), inode(pidfd(self)); a != b {
		t.Errorf("two pidfds of this process have inodes %d and %d", a, b)
	}
	c1 := startChild(t, "", nil)
	c2 := startChild(t, "", nil)
	fd1 := pidfd(c1.pid())
	i1, i2 := inode(fd1), inode(pidfd(c2.pid()))
	if i1 == i2 || i1 == inode(pidfd(self)) {
		t.Errorf("different processes share inode %d", i1)
	}
	c1.kill()
	if after := inode(fd1); after != i1 {
		t.Errorf("inode of a reaped process's pidfd changed from %d to %d", i1, after)
	}
	// A file that is not a pidfd is not taken for one.
	f, err := os.Open("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if ino, ok := pidfsInode(int(f.Fd())); ok {
		t.Errorf("/proc/self/stat taken for a pidfd of inode %d", ino)
	}
}

// A second connection of a process takes its start time from the cache:
// with /proc emptied, it is still identified, with the right start time.
func TestStartCacheHit(t *testing.T) {
	needPidfs(t)
	c := startChild(t, "", nil)
	want := procStart(t, c.pid())
	identify(t, c) // fills the cache

	old := procDir
	procDir = t.TempDir() // no process is there
	defer func() { procDir = old }()
	p, err := FromConn(c.conn, time.Now())
	if err != nil {
		t.Fatalf("second FromConn of a process, /proc empty: %v (the cache was not used)", err)
	}
	defer p.Close()
	if p.Start != want || p.PID != c.pid() {
		t.Errorf("from the cache: pid %d start %d, want pid %d start %d", p.PID, p.Start, c.pid(), want)
	}

	// With the cache off the same call reads /proc, and fails.
	noStartCache = true
	defer func() { noStartCache = false }()
	if p, err := FromConn(c.conn, time.Now()); !errors.Is(err, ErrExited) {
		if p != nil {
			p.Close()
		}
		t.Fatalf("FromConn with the cache off and /proc empty: %v, want ErrExited", err)
	}
}

// A process in the cache that has exited is refused on its next
// connection: a hit still asks the pidfd. /proc is made to show a running
// process with its pid, as if the pid had been recycled, and its start time
// agrees with the cache's; only the pidfd tells the truth.
func TestStartCacheRefusesExitedPeer(t *testing.T) {
	needPidfs(t)
	c := startChild(t, "", nil)
	p := identify(t, c) // fills the cache
	ino, ok := pidfsInode(p.pidfd)
	if !ok {
		t.Fatal("no pidfs inode")
	}
	if _, ok := starts.get(ino, p.PID); !ok {
		t.Fatal("FromConn did not fill the cache")
	}
	c.kill()

	fake := t.TempDir()
	if err := os.Mkdir(fake+"/"+itoa(int(p.PID)), 0o755); err != nil {
		t.Fatal(err)
	}
	stat := fakeStat(p.PID, 'S', p.Start)
	if err := os.WriteFile(fake+"/"+itoa(int(p.PID))+"/stat", []byte(stat), 0o644); err != nil {
		t.Fatal(err)
	}
	old := procDir
	procDir = fake
	defer func() { procDir = old }()

	q, err := FromConn(c.conn, time.Now())
	if err == nil {
		q.Close()
		t.Fatalf("FromConn of a cached process that exited succeeded: %v", q)
	}
	if !errors.Is(err, ErrExited) {
		t.Fatalf("FromConn of a cached process that exited: %v, want ErrExited", err)
	}
	t.Logf("exited peer, cached: %v", err)
}

// fakeStat makes a /proc/PID/stat line with the given state and start time.
func fakeStat(pid int32, state byte, start uint64) string {
	s := itoa(int(pid)) + " (fake) " + string(state)
	for i := 4; i <= 52; i++ {
		if i == 22 {
			s += " " + strconv.FormatUint(start, 10)
		} else {
			s += " 0"
		}
	}
	return s + "\n"
}

// The cache holds at most startCacheSize processes; the newest is kept.
func TestStartCacheBound(t *testing.T) {
	c := &startCache{m: make(map[uint64]cachedStart)}
	for i := range startCacheSize + 100 {
		c.put(uint64(i+1), int32(i+1), uint64(1000+i))
		if n := c.len(); n > startCacheSize {
			t.Fatalf("%d entries after %d puts, bound %d", n, i+1, startCacheSize)
		}
	}
	if n := c.len(); n != startCacheSize {
		t.Errorf("%d entries, want the bound %d", n, startCacheSize)
	}
	last := startCacheSize + 100
	if s, ok := c.get(uint64(last), int32(last)); !ok || s != uint64(1000+last-1) {
		t.Errorf("newest entry: %d %v", s, ok)
	}
	// Updating an entry of a full cache evicts nothing.
	c.put(uint64(last), int32(last), 7)
	if n := c.len(); n != startCacheSize {
		t.Errorf("%d entries after an update, want %d", n, startCacheSize)
	}
	// The pid must match too.
	if _, ok := c.get(uint64(last), int32(last+1)); ok {
		t.Error("an entry answered for another pid")
	}
}

// pidnsEnv, when set, makes the test binary run the body of
// TestRecycledPidInPidNamespace as the first process of a new pid
// namespace.
const pidnsEnv = "SINC_IDENT_TEST_PIDNS"

// The attack itself, for real: a peer is identified (its start time goes
// into the cache), exits and is reaped, and its pid is given to a new
// process that connects. The new process must get its own start time and
// key, and the dead peer's connection, asked about again, must be refused,
// although /proc shows a running process under its pid. A pid is recycled
// on demand by ns_last_pid, in a pid namespace of the test's own.
func TestRecycledPidInPidNamespace(t *testing.T) {
	if os.Getenv(pidnsEnv) != "" {
		recycleInNamespace(t)
		return
	}
	if os.Getuid() != 0 {
		t.Skip("a pid namespace and ns_last_pid need root")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestRecycledPidInPidNamespace$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), pidnsEnv+"=1", "GORACE=atexit_sleep_ms=0")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if errors.Is(err, syscall.EPERM) {
		t.Skipf("cannot make a pid namespace here (root without CAP_SYS_ADMIN?): %v", err)
	}
	if err != nil {
		t.Fatalf("in a pid namespace: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "recycled pid") {
		t.Fatalf("the namespace test did not run:\n%s", out)
	}
	t.Logf("%s", out)
}

// recycleInNamespace is TestRecycledPidInPidNamespace inside its pid
// namespace, as its process 1, with a mount namespace of its own for a
// /proc of the new pid namespace.
func recycleInNamespace(t *testing.T) {
	if os.Getpid() != 1 {
		t.Fatalf("pid %d, want 1 in a new pid namespace", os.Getpid())
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		t.Fatalf("make mounts private: %v", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", 0, ""); err != nil {
		t.Fatalf("mount /proc: %v", err)
	}

	c1 := startChild(t, "", nil)
	accepted := time.Now()
	p1 := identify(t, c1)             // fills the cache, on a kernel with pidfs
	time.Sleep(30 * time.Millisecond) // so the newcomer starts clock ticks later
	c1.kill()

	// The next pid the kernel hands out is the one after ns_last_pid. A
	// thread the Go runtime starts meanwhile may take it: try again.
	var c2 *child
	for range 5 {
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(itoa(int(p1.PID)-1)), 0o644); err != nil {
			t.Fatalf("set ns_last_pid: %v", err)
		}
		c2 = startChild(t, "", nil)
		if c2.pid() == p1.PID {
			break
		}
		c2.kill()
	}
	if c2.pid() != p1.PID {
		t.Fatalf("pid %d was not recycled in 5 tries", p1.PID)
	}

	p2 := identify(t, c2)
	if p2.PID != p1.PID {
		t.Fatalf("newcomer identified as pid %d, want %d", p2.PID, p1.PID)
	}
	if want := procStart(t, c2.pid()); p2.Start != want {
		t.Errorf("newcomer's start time %d, /proc says %d (the dead peer's was %d)", p2.Start, want, p1.Start)
	}
	if p2.Key() == p1.Key() {
		t.Errorf("the newcomer holding a recycled pid has the dead peer's key %+v", p1.Key())
	}

	p, err := FromConn(c1.conn, accepted)
	if err == nil {
		p.Close()
		t.Fatalf("the dead peer's connection was identified as %v (start %d) after its pid was recycled", p, p.Start)
	}
	if !errors.Is(err, ErrExited) && !errors.Is(err, ErrPIDReused) {
		t.Fatalf("the dead peer's connection: %v, want ErrExited or ErrPIDReused", err)
	}
	t.Logf("recycled pid %d: newcomer start %d, dead peer start %d; the dead peer's connection: %v",
		p1.PID, p2.Start, p1.Start, err)
}
