package ident

import (
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// alivePollInterval is how often Exited looks at /proc when it has no
// pidfd to wait on.
const alivePollInterval = 500 * time.Millisecond

// Exited returns a channel that is closed when the process exits (it need
// not have been reaped), or when p is closed, so that nothing waiting on it
// outlives p. Every call returns the same channel.
//
// With a pidfd, one goroutine waits in Go's netpoller for the pidfd to
// become readable, which the kernel makes it when the process exits;
// without one, the goroutine looks at /proc every 500 ms. Close ends the
// goroutine and returns only after it has.
func (p *Process) Exited() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited != nil {
		return p.exited
	}
	p.exited = make(chan struct{})
	if p.closed {
		close(p.exited)
		return p.exited
	}
	var f *os.File
	if p.pidfd >= 0 {
		f, _ = pidfdFile(p.pidfd) // on error, poll /proc instead
	}
	p.stop = watch(f, p.PID, p.Start, p.exited)
	return p.exited
}

// pidfdFile returns a non-blocking duplicate of pidfd as an *os.File, which
// registers it with Go's netpoller (epoll). The duplicate shares its open
// file description, and so O_NONBLOCK, with pidfd; that only changes how
// waitid(P_PIDFD) behaves, which this package does not call.
func pidfdFile(pidfd int) (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(pidfd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "pidfd"), nil
}

// watch starts the goroutine that closes exited when the process exits:
// by waiting for f, the pidfd, to become readable, or if f is nil or the
// netpoller cannot wait for it, by polling /proc for pid and start. stop
// ends the goroutine, closing exited, and returns after it has.
func watch(f *os.File, pid int32, start uint64, exited chan<- struct{}) (stop func()) {
	stopping := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(exited)
		if f != nil && waitReadable(f) == nil {
			return // exited
		}
		select {
		case <-stopping:
			return // waitReadable was ended by Close
		default:
		}
		pollProc(pid, start, stopping)
	}()
	return func() {
		close(stopping)
		if f != nil {
			f.Close() // wakes waitReadable
		}
		<-done
	}
}

// waitReadable waits in the netpoller until the pidfd f polls readable,
// that is until its process exits. It returns an error if f is closed or
// cannot be waited for.
func waitReadable(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var pollErr error
	err = rc.Read(func(fd uintptr) bool {
		exited, err := pidfdExited(int(fd))
		if err != nil {
			pollErr = err
			return true
		}
		return exited // false: wait for readiness, then call again
	})
	if err != nil {
		return err
	}
	return pollErr
}

// pollProc returns when the process with pid and start no longer runs
// according to /proc, or when stopping is closed.
func pollProc(pid int32, start uint64, stopping <-chan struct{}) {
	t := time.NewTicker(alivePollInterval)
	defer t.Stop()
	for procAlive(pid, start) {
		select {
		case <-stopping:
			return
		case <-t.C:
		}
	}
}
