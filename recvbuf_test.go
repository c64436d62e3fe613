package sinc

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func socketPair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c.(*net.UnixConn)
		t.Cleanup(func() { cs[i].Close() })
	}
	return cs[0], cs[1]
}

// TestRecvBufferHeldOnlyWithData: a channel's receive buffer exists only
// while it holds unread bytes: not while a read waits (here, until its
// deadline), not once read out, not for a read large enough to take the
// socket's bytes straight.
func TestRecvBufferHeldOnlyWithData(t *testing.T) {
	a, b := socketPair(t)
	rb, err := newRecvBuffer(a)
	if err != nil {
		t.Fatal(err)
	}
	a.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var small [10]byte
	if _, err := rb.Read(small[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read on an empty socket: %v, want the deadline", err)
	}
	if rb.buf != nil {
		t.Fatal("a read that waited holds a buffer")
	}
	a.SetReadDeadline(time.Time{})

	data := bytes.Repeat([]byte("0123456789"), 100)
	b.Write(data)
	got := make([]byte, 0, len(data))
	n, err := rb.Read(small[:])
	got = append(got, small[:n]...)
	if err != nil || rb.buf == nil {
		t.Fatalf("first small read: %d, %v, buffer held: %v", n, err, rb.buf != nil)
	}
	if n, err := rb.Discard(5); n != 5 || err != nil {
		t.Fatal(n, err)
	}
	rest, err := io.ReadAll(io.LimitReader(rb, int64(len(data)-15)))
	if err != nil {
		t.Fatal(err)
	}
	got = append(append(got, data[10:15]...), rest...)
	if !bytes.Equal(got, data) {
		t.Fatal("bytes read differ from those written")
	}
	if rb.buf != nil {
		t.Fatal("a buffer read out is still held")
	}

	big := bytes.Repeat([]byte{7}, recvSize)
	b.Write(big)
	p := make([]byte, recvSize)
	if _, err := io.ReadFull(rb, p); err != nil || !bytes.Equal(p, big) || rb.buf != nil {
		t.Fatalf("large read: %v, equal %v, buffer held %v", err, bytes.Equal(p, big), rb.buf != nil)
	}

	b.Close()
	if _, err := rb.Read(small[:]); err != io.EOF {
		t.Fatalf("read after the peer closed: %v, want io.EOF", err)
	}
	if n, err := rb.Discard(1); n != 0 || err != io.EOF {
		t.Fatalf("discard after the peer closed: %d, %v", n, err)
	}
}

// TestRecvBufsBounded: the free list keeps at most its bound.
func TestRecvBufsBounded(t *testing.T) {
	for range cap(recvBufs) + 10 {
		putRecvBuf(make([]byte, recvSize))
	}
	if len(recvBufs) != cap(recvBufs) {
		t.Fatalf("free list holds %d, bound %d", len(recvBufs), cap(recvBufs))
	}
	for len(recvBufs) > 0 {
		<-recvBufs
	}
}
