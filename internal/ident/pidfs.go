package ident

import (
	"sync"

	"golang.org/x/sys/unix"
)

// The start-time cache. Reading /proc/PID/stat costs an open, a read the
// kernel formats 52 fields for, and a close, on every connection an agent
// accepts, and a process that opens many channels is read again each time.
// A pidfd names its process better than the pid does, so the start time is
// cached by the pidfd's identity, where the kernel gives it one:
//
// On Linux 6.9 and later a pidfd is a file of pidfs, and its inode number
// names the process (the kernel's struct pid) for the life of the system:
// every pidfd of one process has the same inode number, and each new
// process takes a fresh one from a 64-bit counter that never goes back. A
// pid handed to a new process comes with a new inode number, so an entry
// of the cache can never be taken for the new holder of a recycled pid.
// Before pidfs, pidfds were anonymous-inode files that all share one
// inode: pidfsDevice tells the two apart, and without pidfs nothing is
// cached. On 32-bit kernels the inode number is 32 bits and wraps, so this
// is only done by a 64-bit program (which needs a 64-bit kernel).
//
// An entry is made only from a start time readStart proved with the pidfd
// (the process had not exited after the read). A hit still asks the pidfd
// whether its process has exited since: a dead peer is refused as before.

// pidfsMagic is PIDFS_MAGIC from <linux/magic.h>, the f_type statfs(2)
// gives for a file of pidfs.
const pidfsMagic = 0x50494446

// startCacheSize bounds the cache: 1,024 processes, about 40 KiB. When it
// is full an arbitrary entry makes room: a miss costs only a /proc read.
const startCacheSize = 1024

// is64bit: uintptr has 64 bits, so the kernel's inode numbers do too.
const is64bit = ^uintptr(0)>>63 == 1

// noStartCache turns the cache off (a test hook).
var noStartCache bool

// pidfsDevice returns the device number of pidfs, taken from a pidfd of
// this process, and whether pidfds are files of pidfs with inode numbers
// that are never reused.
var pidfsDevice = sync.OnceValues(func() (uint64, bool) {
	if !is64bit {
		return 0, false
	}
	fd, err := openPidfd(int32(unix.Getpid()))
	if err != nil {
		return 0, false
	}
	defer unix.Close(fd)
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil || fs.Type != pidfsMagic {
		return 0, false
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, false
	}
	return st.Dev, true
})

// pidfsInode returns the pidfs inode number of pidfd, and false if pidfd
// is not a file of pidfs (or the cache is off).
func pidfsInode(pidfd int) (uint64, bool) {
	if noStartCache {
		return 0, false
	}
	dev, ok := pidfsDevice()
	if !ok {
		return 0, false
	}
	var st unix.Stat_t
	if err := unix.Fstat(pidfd, &st); err != nil || st.Dev != dev {
		return 0, false
	}
	return st.Ino, true
}

// startCache maps pidfs inode numbers to the pid and start time of their
// process. It is safe for concurrent use.
type startCache struct {
	mu sync.Mutex
	m  map[uint64]cachedStart
}

type cachedStart struct {
	pid   int32
	start uint64
}

var starts = &startCache{m: make(map[uint64]cachedStart)}

// get returns the start time cached for the process of inode ino, if its
// pid is pid. (The pid cannot differ for the same inode in one pid
// namespace; the check costs nothing.)
func (c *startCache) get(ino uint64, pid int32) (uint64, bool) {
	c.mu.Lock()
	e, ok := c.m[ino]
	c.mu.Unlock()
	if !ok || e.pid != pid {
		return 0, false
	}
	return e.start, true
}

// put records the start time of the process of inode ino.
func (c *startCache) put(ino uint64, pid int32, start uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[ino]; !ok && len(c.m) >= startCacheSize {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[ino] = cachedStart{pid: pid, start: start}
}

// len returns the number of entries.
func (c *startCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
