package ring

import (
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Wake-ups go through pipes, one per sleeper, each end owned by one side.
// Not an eventfd: its non-blocking flag lives in the open file that both
// sides share, so a process could clear it and fill the counter, and the
// agent's next wake-up would block. A pipe's ends are two open files; the
// agent's flags are its own. A full pipe holds wake-ups not yet taken, so
// a wake-up that finds it full is not lost.

// NewPipe returns a wake-up pipe's read and write ends, non-blocking and
// close-on-exec.
func NewPipe() (r, w int, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return -1, -1, os.NewSyscallError("pipe2", err)
	}
	return p[0], p[1], nil
}

// file makes fd non-blocking and a file in the runtime's poller, which
// then owns it.
func file(fd int, name string) (*os.File, syscall.RawConn, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, nil, os.NewSyscallError("fcntl", err)
	}
	f := os.NewFile(uintptr(fd), name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, rc, nil
}

// Sleeper waits on a pipe's read end.
type Sleeper struct {
	f    *os.File
	rc   syscall.RawConn
	fn   func(fd uintptr) bool
	got  bool
	eof  bool
	buf  [64]byte
	rerr error
}

// NewSleeper waits on fd, a pipe's read end, which it owns from here.
func NewSleeper(fd int) (*Sleeper, error) {
	f, rc, err := file(fd, "ring-wake-r")
	if err != nil {
		return nil, err
	}
	s := &Sleeper{f: f, rc: rc}
	s.fn = s.drain
	return s, nil
}

// drainReads bounds the reads of one drain: a process that keeps writing
// cannot hold the agent in it. What is left wakes the next wait at once.
const drainReads = 8

func (s *Sleeper) drain(fd uintptr) bool {
	for range drainReads {
		n, err := unix.Read(int(fd), s.buf[:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return s.got
		case err != nil:
			s.rerr = err
			return true
		case n == 0:
			s.eof = true
			return true
		}
		s.got = true
		if n < len(s.buf) {
			return true
		}
	}
	return true
}

// Wait waits for a wake-up (or returns at once if one is pending), taking
// every pending one. It returns io.EOF once the waker's end is closed (the
// other side ended or died), or the deadline's error.
func (s *Sleeper) Wait() error {
	if s.eof {
		return io.EOF
	}
	s.got = false
	err := s.rc.Read(s.fn)
	if s.eof {
		return io.EOF
	}
	if err == nil && s.rerr != nil {
		err = os.NewSyscallError("read", s.rerr)
		s.rerr = nil
	}
	return err
}

// SetDeadline sets the deadline of Wait.
func (s *Sleeper) SetDeadline(t time.Time) error { return s.f.SetReadDeadline(t) }

// Close closes the read end.
func (s *Sleeper) Close() error { return s.f.Close() }

var token = []byte{1}

// WakeFD writes one wake-up to fd, a non-blocking pipe's write end,
// without a file around it (for a caller that guards the descriptor's
// life itself, and keeps it out of the runtime's poller). A full pipe
// is not an error.
func WakeFD(fd int) error {
	for {
		_, err := unix.Write(fd, token)
		switch err {
		case unix.EINTR:
			continue
		case nil, unix.EAGAIN:
			return nil
		}
		return os.NewSyscallError("write", err)
	}
}

// DrainFD takes the pending wake-ups of fd, a non-blocking pipe's read
// end, in a bounded number of reads, and reports whether the write end is
// closed.
func DrainFD(fd int) (eof bool, err error) {
	var buf [64]byte
	for range drainReads {
		n, err := unix.Read(fd, buf[:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return false, nil
		case err != nil:
			return false, os.NewSyscallError("read", err)
		case n == 0:
			return true, nil
		case n < len(buf):
			return false, nil
		}
	}
	return false, nil
}
