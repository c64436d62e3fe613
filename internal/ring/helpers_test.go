package ring

import (
	"io"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The process's side of a wake-up pipe and a page counter, for the tests:
// the agent and the client use WakeFD and Sleeper.

// Waker writes wake-ups to a pipe's write end.
type Waker struct {
	f  *os.File
	rc syscall.RawConn
	fn func(fd uintptr)
	e  error
}

// NewWaker wakes through fd, a pipe's write end, which it owns from here.
func NewWaker(fd int) (*Waker, error) {
	f, rc, err := file(fd, "ring-wake-w")
	if err != nil {
		return nil, err
	}
	w := &Waker{f: f, rc: rc}
	w.fn = w.write
	return w, nil
}

func (w *Waker) write(fd uintptr) {
	for {
		_, err := unix.Write(int(fd), token)
		switch err {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			err = nil // full: wake-ups are waiting to be taken
		}
		w.e = err
		return
	}
}

// Wake writes one wake-up without ever waiting, and reports a failure
// (EPIPE: the sleeper closed its end). Not safe for concurrent use.
func (w *Waker) Wake() error {
	if err := w.rc.Control(w.fn); err != nil {
		return err
	}
	err := w.e
	w.e = nil
	if err != nil {
		return os.NewSyscallError("write", err)
	}
	return nil
}

// Close closes the write end: the sleeper reads end of file.
func (w *Waker) Close() error { return w.f.Close() }

// Resident returns how many of b's pages are in memory (mincore).
func Resident(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	pg := os.Getpagesize()
	vec := make([]byte, (len(b)+pg-1)/pg)
	if err := mincore(b, vec); err != nil {
		return 0, err
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n, nil
}

func mincore(b []byte, vec []byte) error {
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return os.NewSyscallError("mincore", e)
	}
	return nil
}

// Poll takes pending wake-ups without waiting; it reports io.EOF once the
// waker's end is closed.
func (s *Sleeper) Poll() error {
	if s.eof {
		return io.EOF
	}
	s.got = false
	s.rc.Control(func(fd uintptr) { s.drain(fd) })
	if s.eof {
		return io.EOF
	}
	return nil
}

// File is the read end, for an epoll set of the caller's.
func (s *Sleeper) File() *os.File { return s.f }
