package ident

import (
	"errors"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// FromConn identifies the process at the other end of c: SO_PEERCRED for
// its pid, uid and gid (as they were when it connected), SO_PEERPIDFD for a
// pidfd of exactly that process, and its start time from /proc/PID/stat,
// read while the pidfd proves the process is still the one that connected.
//
// On a kernel without SO_PEERPIDFD it opens a pidfd with pidfd_open on the
// pid instead, and refuses (ErrPIDReused) a process that started after
// accepted, the time c was accepted: that pid was recycled after the
// connection was made. accepted is not used when SO_PEERPIDFD works.
//
// A peer that has already exited is refused with ErrExited. The caller owns
// the returned Process and must Close it.
func FromConn(c *net.UnixConn, accepted time.Time) (*Process, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	var (
		cred     *unix.Ucred
		credErr  error
		pidfd    = -1
		pidfdErr error
	)
	err = rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr != nil {
			return
		}
		if noPeerPidfd {
			pidfdErr = unix.ENOPROTOOPT
			return
		}
		pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	})
	if err != nil {
		return nil, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return nil, fmt.Errorf("peer credentials: getsockopt SO_PEERCRED: %w", credErr)
	}
	if pidfdErr != nil {
		pidfd = -1
	}

	p := &Process{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid, pidfd: pidfd}
	switch {
	case p.PID <= 0:
		err = ErrNoPID
	case pidfdErr == nil:
		err = p.identify()
	case unsupported(pidfdErr):
		err = p.identifyWithoutPeerPidfd(accepted)
	default:
		err = fmt.Errorf("getsockopt SO_PEERPIDFD: %w", pidfdErr)
	}
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("peer %v: %w", p, err)
	}
	return p, nil
}

// identify completes p, which holds the pidfd SO_PEERPIDFD gave.
func (p *Process) identify() error {
	// The kernel makes pidfds close-on-exec; make sure of it, since an
	// agent's pidfd in a child would keep the child able to wait on and
	// signal the peer.
	if err := setCloexec(p.pidfd); err != nil {
		return fmt.Errorf("pidfd: %w", err)
	}
	return p.readStart()
}

// identifyWithoutPeerPidfd completes p on a kernel without SO_PEERPIDFD:
// p.PID may by now name another process, so it opens a pidfd on the pid
// and refuses a process started after accepted.
func (p *Process) identifyWithoutPeerPidfd(accepted time.Time) error {
	acceptedTick, err := BootTimeTicks(accepted)
	if err != nil {
		return fmt.Errorf("accept time: %w", err)
	}
	fd, err := openPidfd(p.PID)
	switch {
	case err == nil:
		p.pidfd = fd
	case errors.Is(err, unix.ESRCH):
		return fmt.Errorf("pidfd_open: %w", ErrExited)
	case unsupported(err):
		// Before Linux 5.3: only /proc is left.
	default:
		return fmt.Errorf("pidfd_open: %w", err)
	}
	if err := p.readStart(); err != nil {
		return err
	}
	if p.Start > acceptedTick {
		return fmt.Errorf("process started at tick %d, connection accepted at tick %d: %w",
			p.Start, acceptedTick, ErrPIDReused)
	}
	return nil
}

// readStart sets p.Start from /proc/PID/stat. With a pidfd, the read is
// proved to be of the pidfd's process by the process not having exited
// after it: the pid cannot have been given to another process before this
// one was reaped, and it cannot be reaped before it exits.
//
// With a pidfd of pidfs, a start time proved so is cached by the pidfd's
// inode number, which no other process ever has (pidfs.go); a later
// connection of the same process takes it from there, once the pidfd
// shows the process has not exited.
func (p *Process) readStart() error {
	ino, cacheable := uint64(0), false
	if p.pidfd >= 0 {
		ino, cacheable = pidfsInode(p.pidfd)
	}
	if cacheable {
		if start, ok := starts.get(ino, p.PID); ok {
			if err := p.checkRunning("while identifying it"); err != nil {
				return err
			}
			p.Start = start
			return nil
		}
	}
	s, err := readStat(p.PID)
	if err != nil {
		return err
	}
	if err := p.checkRunning(fmt.Sprintf("after reading %s/%d/stat", procDir, p.PID)); err != nil {
		return err
	}
	if s.State == 'Z' || s.State == 'X' || s.State == 'x' {
		return fmt.Errorf("%s/%d/stat: state %c: %w", procDir, p.PID, s.State, ErrExited)
	}
	p.Start = s.Start
	if cacheable {
		starts.put(ino, p.PID, s.Start)
	}
	return nil
}

// checkRunning returns an error wrapping ErrExited, prefixed with when, if
// p has a pidfd and its process has exited.
func (p *Process) checkRunning(when string) error {
	if p.pidfd < 0 {
		return nil
	}
	exited, err := pidfdExited(p.pidfd)
	if err != nil {
		return err
	}
	if exited {
		return fmt.Errorf("%s: %w", when, ErrExited)
	}
	return nil
}
