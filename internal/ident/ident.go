// Package ident gives the kernel's identity of the process at the other end
// of a Unix socket (docs/design.md, "Trust"): its pid, uid and gid from
// SO_PEERCRED, and its start time, which together with the pid names the
// process for the life of the system. An agent trusts only this, never what
// a process says about itself.
//
// A pid alone is not an identity: once a process is reaped its pid can be
// given to a new process. So a Process also holds a pidfd, a file
// descriptor for exactly the process that connected, obtained with
// SO_PEERPIDFD (Linux 6.5 and later). The start time is read from
// /proc/PID/stat and then proved to belong to that process by checking,
// through the pidfd, that it had not exited by the time the read finished:
// a pid is only reused after its process is reaped. On kernels with pidfs
// (Linux 6.9 and later) a start time so proved is cached by the pidfd's
// inode number, which names one process for the life of the system, and a
// process's later connections are identified without reading /proc
// (pidfs.go).
//
// On kernels without SO_PEERPIDFD, FromConn opens a pidfd with pidfd_open
// on the pid SO_PEERCRED gave, which may already name a different process,
// and refuses a process that started after the connection was accepted.
// That closes the window from the accept on, not the one between connect and
// accept; the start time is known to clock-tick resolution (10 ms), so a
// process started within a tick of the accept passes the check.
//
// Without any pidfd (pidfd_open is missing, before Linux 5.3), a Process
// holds only the pid and start time, and Alive and Exited compare /proc
// with them.
//
// FromConn reads /proc/PID/stat of a peer not in that cache, so procfs must be mounted at
// /proc for the caller's pid namespace, and readable for other users'
// processes (no hidepid=, or the caller in its gid=).
//
// A Process's methods are safe for concurrent use.
package ident

import (
	"errors"
	"fmt"
	"sync"
)

// Errors a caller may test for with errors.Is.
var (
	// ErrExited: the peer exited before it could be identified.
	ErrExited = errors.New("peer process exited")
	// ErrPIDReused: on the fallback path, the process holding the peer's pid
	// started after the connection was accepted, so it is not the peer.
	ErrPIDReused = errors.New("peer pid reused by a process started after the accept")
	// ErrNoPID: the peer's pid is not visible in this pid namespace.
	ErrNoPID = errors.New("peer pid not visible in this pid namespace")
)

// Process is a connected process as the kernel reports it.
type Process struct {
	PID   int32
	UID   uint32
	GID   uint32
	Start uint64 // start time in clock ticks since boot (field 22 of /proc/PID/stat)

	mu     sync.Mutex
	pidfd  int  // -1 when none; owned by Process
	closed bool // Close has run
	// exited is made by the first call of Exited and closed by its watcher
	// goroutine; stop ends the watcher and waits for it to return.
	exited chan struct{}
	stop   func()
}

// Key names a process uniquely for the life of the system: a pid is reused
// only by a process that starts later, and for it to start within the same
// clock tick the kernel would have to cycle through its whole pid range in
// that tick.
type Key struct {
	PID   int32
	Start uint64
}

// Key returns a value unique to this process for the life of the system
// (pid and start time).
func (p *Process) Key() Key {
	return Key{PID: p.PID, Start: p.Start}
}

// String describes the process as "pid 123 uid 1000 gid 1000".
func (p *Process) String() string {
	return fmt.Sprintf("pid %d uid %d gid %d", p.PID, p.UID, p.GID)
}

// Alive reports whether the process still runs. With a pidfd, it asks the
// kernel about exactly this process; without one (or after Close) it
// compares /proc/PID/stat with the pid and start time. A process that has
// exited but not yet been reaped (a zombie) does not run.
func (p *Process) Alive() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pidfd >= 0 {
		exited, err := pidfdExited(p.pidfd)
		return err == nil && !exited
	}
	return procAlive(p.PID, p.Start)
}

// Close releases the pidfd and ends the watcher of Exited, closing its
// channel. It is safe to call more than once; calls after the first return
// nil.
func (p *Process) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	if p.stop != nil {
		p.stop()
		p.stop = nil
	}
	if p.pidfd < 0 {
		return nil
	}
	err := closeFD(p.pidfd)
	p.pidfd = -1
	if err != nil {
		return fmt.Errorf("close pidfd of pid %d: %w", p.PID, err)
	}
	return nil
}
