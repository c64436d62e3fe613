package ident

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Test hooks: force the fallback paths that this kernel would not take.
var (
	// noPeerPidfd makes FromConn act as if SO_PEERPIDFD were unsupported.
	noPeerPidfd bool
	// noPidfdOpen makes FromConn act as if pidfd_open were unsupported.
	noPidfdOpen bool
)

// unsupported reports whether err from getsockopt(SO_PEERPIDFD) or
// pidfd_open means the kernel lacks the feature, rather than that the call
// failed for this peer.
func unsupported(err error) bool {
	return errors.Is(err, unix.ENOPROTOOPT) || errors.Is(err, unix.EOPNOTSUPP) ||
		errors.Is(err, unix.ENOSYS)
}

// pidfdExited reports whether the process of pidfd has exited. A pidfd polls
// readable once its process has exited, whether or not it has been reaped
// yet. Unlike pidfd_send_signal(pidfd, 0), which succeeds on a zombie, this
// treats a zombie as exited, and it needs no permission to signal the
// process.
func pidfdExited(pidfd int) (bool, error) {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("poll pidfd: %w", err)
		}
		if n > 0 && fds[0].Revents&unix.POLLNVAL != 0 {
			return false, fmt.Errorf("poll pidfd: %w", unix.EBADF)
		}
		return n > 0, nil
	}
}

// openPidfd opens a pidfd for pid with pidfd_open(2). It is close-on-exec.
func openPidfd(pid int32) (int, error) {
	if noPidfdOpen {
		return -1, unix.ENOSYS
	}
	for {
		fd, err := unix.PidfdOpen(int(pid), 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, err
	}
}

// setCloexec makes sure fd is not inherited across exec.
func setCloexec(fd int) error {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		return err
	}
	if flags&unix.FD_CLOEXEC != 0 {
		return nil
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags|unix.FD_CLOEXEC)
	return err
}

func closeFD(fd int) error {
	return unix.Close(fd)
}
