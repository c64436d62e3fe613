package sinc

import (
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// recvSize is the size of a channel's receive buffer.
const recvSize = 16 << 10

// recvBuffer reads a channel socket through a buffer that it holds only
// while the buffer has bytes in it: a channel waiting for data holds none
// (thousands of idle channels in a process would otherwise hold 16 KiB
// each). Buffers come from a bounded free list. Not safe for concurrent
// use: Conn's read lock guards it.
type recvBuffer struct {
	rc   syscall.RawConn
	buf  []byte // nil while empty
	r, w int

	// One read's argument and results, for readFd: a method value made
	// once, so that a read allocates no closure.
	readFd func(fd uintptr) bool
	p      []byte
	n      int
	rerr   error
}

func newRecvBuffer(c *net.UnixConn) (*recvBuffer, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	b := &recvBuffer{rc: rc}
	b.readFd = b.readOnce
	return b, nil
}

var recvBufs = make(chan []byte, 64)

func getRecvBuf() []byte {
	select {
	case b := <-recvBufs:
		return b
	default:
		return make([]byte, recvSize)
	}
}

func putRecvBuf(buf []byte) {
	select {
	case recvBufs <- buf:
	default:
	}
}

func (b *recvBuffer) release() {
	if b.buf != nil {
		putRecvBuf(b.buf)
	}
	b.buf, b.r, b.w = nil, 0, 0
}

// read reads from the socket into p, waiting (in the runtime's poller, with
// the socket's read deadline) until something is there. If p is nil it
// reads into a buffer from the free list, taken only once the socket is
// readable, and returns that.
func (b *recvBuffer) read(p []byte) ([]byte, int, error) {
	b.p, b.n, b.rerr = p, 0, nil
	err := b.rc.Read(b.readFd)
	p, n, rerr := b.p, b.n, b.rerr
	b.p, b.rerr = nil, nil
	if err != nil {
		return p, 0, err // a deadline, or closed
	}
	if rerr != nil {
		return p, 0, &net.OpError{Op: "read", Net: "unix", Err: rerr}
	}
	if n == 0 {
		return p, 0, io.EOF
	}
	return p, n, nil
}

// readOnce is read's step in the poller: one read(2) into b.p, or into a
// buffer from the free list if b.p is nil. It reports false (wait) when
// nothing is there.
func (b *recvBuffer) readOnce(fd uintptr) bool {
	q := b.p
	if q == nil {
		q = getRecvBuf()
	}
	for {
		b.n, b.rerr = unix.Read(int(fd), q)
		if b.rerr != unix.EINTR {
			break
		}
	}
	if b.rerr == unix.EAGAIN {
		if b.p == nil {
			putRecvBuf(q) // nothing to read: wait without a buffer
		}
		return false
	}
	b.p = q
	return true
}

// fill takes a buffer from the free list, once the socket is readable, and
// reads into it.
func (b *recvBuffer) fill() error {
	buf, n, err := b.read(nil)
	if err != nil {
		if buf != nil {
			putRecvBuf(buf)
		}
		return err
	}
	b.buf, b.r, b.w = buf, 0, n
	return nil
}

// Read reads buffered bytes, or from the socket: straight into p when p
// is at least a buffer long, else through a buffer.
func (b *recvBuffer) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if b.buf == nil {
		if len(p) >= recvSize {
			_, n, err := b.read(p)
			return n, err
		}
		if err := b.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, b.buf[b.r:b.w])
	b.r += n
	if b.r == b.w {
		b.release()
	}
	return n, nil
}

// Discard skips n bytes and returns how many it skipped: fewer only with
// an error (a deadline, or io.EOF), after which the caller may go on.
func (b *recvBuffer) Discard(n int) (int, error) {
	done := 0
	for done < n {
		if b.buf == nil {
			if err := b.fill(); err != nil {
				return done, err
			}
		}
		d := min(n-done, b.w-b.r)
		b.r += d
		done += d
		if b.r == b.w {
			b.release()
		}
	}
	return done, nil
}
