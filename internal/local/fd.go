package local

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// SendWithFD writes b on c with fd attached (SCM_RIGHTS) to its first byte.
func SendWithFD(c *net.UnixConn, b []byte, fd int) error {
	n, _, err := c.WriteMsgUnix(b, unix.UnixRights(fd), nil)
	if err != nil {
		return err
	}
	if n < len(b) {
		_, err = c.Write(b[n:])
	}
	return err
}

// NoticeReader reads a listener's notices and the sockets that ride with
// them. Each notice line is paired with the next received descriptor, in
// order: a descriptor arrives with the first byte of its line.
type NoticeReader struct {
	c     *net.UnixConn
	buf   []byte // received, not yet consumed
	fds   []int  // received, not yet paired
	chunk []byte
	oob   []byte
}

// NewNoticeReader reads notices from c.
func NewNoticeReader(c *net.UnixConn) *NoticeReader {
	return &NoticeReader{c: c, chunk: make([]byte, 4096), oob: make([]byte, unix.CmsgSpace(4*16))}
}

// Next returns the next notice and its socket as a file.
func (r *NoticeReader) Next() (*Notice, *os.File, error) {
	for {
		if i := bytes.IndexByte(r.buf, '\n'); i >= 0 {
			line := r.buf[:i]
			r.buf = r.buf[i+1:]
			var n Notice
			if err := json.Unmarshal(line, &n); err != nil {
				return nil, nil, fmt.Errorf("bad notice from agent: %w", err)
			}
			if len(r.fds) == 0 {
				return nil, nil, errors.New("notice from agent without its socket")
			}
			fd := r.fds[0]
			r.fds = r.fds[1:]
			return &n, os.NewFile(uintptr(fd), "sinc-channel"), nil
		}
		if len(r.buf) > MaxNotice {
			return nil, nil, errors.New("notice from agent too long")
		}
		n, oobn, _, _, err := r.c.ReadMsgUnix(r.chunk, r.oob)
		n, oobn = max(n, 0), max(oobn, 0)
		if oobn > 0 {
			fds, perr := parseRights(r.oob[:oobn])
			r.fds = append(r.fds, fds...)
			if perr != nil && err == nil {
				err = perr
			}
		}
		r.buf = append(r.buf, r.chunk[:n]...)
		if err != nil {
			return nil, nil, err
		}
		if n == 0 {
			return nil, nil, errors.New("agent closed the listener")
		}
	}
}

// Close closes descriptors received but not handed out.
func (r *NoticeReader) Close() {
	for _, fd := range r.fds {
		unix.Close(fd)
	}
	r.fds = nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		fs, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, fs...)
	}
	return fds, nil
}

// ReadRing reads a channel's ring record (RecRing) and the descriptors
// that ride with it, and nothing after it. On success the caller owns the
// RingFDs descriptors; on failure every descriptor received is closed.
func ReadRing(c *net.UnixConn) (*RingOffer, []int, error) {
	var hdr [RecordHeaderLen]byte
	oob := make([]byte, unix.CmsgSpace(4*(RingFDs+1)))
	var fds []int
	fail := func(err error) (*RingOffer, []int, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, nil, err
	}
	n, oobn, flags, _, err := c.ReadMsgUnix(hdr[:], oob)
	if oobn > 0 {
		fds, _ = parseRights(oob[:oobn])
	}
	switch {
	case err != nil:
		return fail(err)
	case flags&unix.MSG_CTRUNC != 0:
		return fail(errors.New("the ring's descriptors were cut short (MSG_CTRUNC)"))
	case n == 0:
		return fail(errors.New("the agent closed the channel before its ring record"))
	}
	if n < len(hdr) {
		if _, err := io.ReadFull(c, hdr[n:]); err != nil {
			return fail(err)
		}
	}
	v := binary.BigEndian.Uint32(hdr[:])
	typ, size := byte(v>>24), int(v&0xffffff)
	if typ != RecRing || size > MaxRequest {
		return fail(fmt.Errorf("the agent's first record is of type %d and %d bytes, not a ring record", typ, size))
	}
	if len(fds) != RingFDs {
		return fail(fmt.Errorf("the ring record came with %d descriptors, not %d", len(fds), RingFDs))
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(c, b); err != nil {
		return fail(err)
	}
	var o RingOffer
	if err := json.Unmarshal(b, &o); err != nil {
		return fail(fmt.Errorf("bad ring record: %w", err))
	}
	return &o, fds, nil
}

// wakeRecord is a wake-up record (RecWake).
var wakeRecord = []byte{RecWake, 0, 0, 0}

// SendWake writes a wake-up record on the socket of a ring channel, never
// waiting: a full socket holds wake-ups not yet read, so none is lost. It
// reports false if the other side closed the socket.
func SendWake(c *net.UnixConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var werr error
	rc.Control(func(fd uintptr) {
		for {
			_, werr = unix.SendmsgN(int(fd), wakeRecord, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			if werr != unix.EINTR {
				return
			}
		}
	})
	return werr == nil || werr == unix.EAGAIN
}
