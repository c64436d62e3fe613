package agent

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/wire"
)

// Running out of file descriptors. Every channel holds sockets, so an
// agent under load can reach its RLIMIT_NOFILE. A process must then get a
// clear answer — limit: the agent is out of file descriptors — not a
// connection that hangs in the listen backlog (accept fails) or an
// internal error (its identity cannot be read without a pidfd). The agent
// keeps one descriptor spare for this: it lets it go to accept the waiting
// connection, answers it, and takes it back. It logs the condition once a
// minute, with how often it happened.

// fdSpare is the agent's spare file descriptor.
type fdSpare struct {
	mu     sync.Mutex
	f      io.Closer // nil while lent out, or if none could be had
	logged time.Time
	missed int // connections answered since the last log line
}

// outOfFDs reports whether err says the process or the system is out of
// file descriptors.
func outOfFDs(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// errOutOfFDs is what a process is told.
const errOutOfFDs = "the agent is out of file descriptors"

// refuseForFDs answers, with the spare descriptor, one connection waiting
// on ln while the agent is out of file descriptors. The answered
// connection, shut down both ways, stays open as the next spare: its
// descriptor is never free for another goroutine to take meanwhile.
func (a *Agent) refuseForFDs(ln *net.UnixListener) {
	s := &a.spare
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f != nil {
		s.f.Close()
		s.f = nil
	}
	ln.SetDeadline(time.Now().Add(10 * time.Millisecond)) // the connection may be gone already
	conn, err := ln.AcceptUnix()
	ln.SetDeadline(time.Time{})
	if err != nil {
		time.Sleep(10 * time.Millisecond) // nothing to answer: do not spin
		if f, err := os.Open(os.DevNull); err == nil {
			s.f = f
		}
		return
	}
	reply(conn, failure(wire.CodeLimit, a.cfg.Node, errOutOfFDs))
	if rc, err := conn.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_RDWR) })
	}
	s.f = conn
	a.counters.refuse("out_of_fds")
	s.missed++
	a.noteOutOfFDsLocked()
}

// noteOutOfFDs counts a refusal for want of file descriptors, and logs it
// at most once a minute.
func (a *Agent) noteOutOfFDs() {
	a.spare.mu.Lock()
	defer a.spare.mu.Unlock()
	a.counters.refuse("out_of_fds")
	a.spare.missed++
	a.noteOutOfFDsLocked()
}

func (a *Agent) noteOutOfFDsLocked() {
	s := &a.spare
	if time.Since(s.logged) >= time.Minute {
		a.log.Error("the agent is out of file descriptors: raise its RLIMIT_NOFILE or lower limits.channels",
			"refused", s.missed)
		s.logged, s.missed = time.Now(), 0
	}
}
