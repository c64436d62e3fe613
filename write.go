package sinc

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/local"
)

// The write side: whole records to the agent, a record that a deadline cut
// short committed and finished first (see conn.go). Every function here
// runs under wmu.

// errWriteClosed: Write after CloseWrite.
var errWriteClosed = fmt.Errorf("the write side is closed (CloseWrite): %w", net.ErrClosed)

// Write writes bytes (stream) or one message (message; at most MaxMessage
// bytes). n counts the bytes the peer will get, including a record begun
// when the write deadline passed (see conn.go): on a message channel n is
// 0 (the message was not sent) or len(p) (it goes whole).
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.writable("write"); err != nil {
		return 0, err
	}
	if c.kind == Message && len(p) > MaxMessage {
		return 0, c.opErr("write", &Error{Code: ErrMessageTooLong.Code, Message: fmt.Sprintf("message of %d bytes, max %d", len(p), MaxMessage)})
	}
	if err := c.flush(); err != nil {
		return 0, c.writeErr("write", err, false)
	}
	n := 0
	if c.ring != nil {
		for {
			rec := p[n:min(len(p), n+local.MaxRecord)]
			if len(rec) == 0 && c.kind == Stream {
				return n, nil
			}
			if err := c.ringWrite(local.RecData, rec); err != nil {
				return n, c.writeErr("write", err, false)
			}
			if n += len(rec); c.kind == Message || n == len(p) {
				return n, nil
			}
		}
	}
	for {
		rec := p[n:min(len(p), n+local.MaxRecord)]
		if len(rec) == 0 && c.kind == Stream {
			return n, nil
		}
		counted, err := c.writeRecord(local.RecData, rec)
		if counted {
			n += len(rec)
		}
		if err != nil {
			return n, c.writeErr("write", err, counted)
		}
		if c.kind == Message || n == len(p) {
			return n, nil
		}
	}
}

// WriteMessage writes one message of a message channel. An error that
// wraps os.ErrDeadlineExceeded and says a record was begun means the
// message is committed: it goes whole before anything written later, and
// must not be sent again (Write tells the same by n == len(m)).
func (c *Conn) WriteMessage(m []byte) error {
	_, err := c.Write(m)
	return err
}

// CloseWrite ends this side's direction; the other side reads io.EOF once
// it has read everything before it. Reading goes on.
func (c *Conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wdone && c.werr == nil && !c.closing.Load() {
		return nil // done already
	}
	if err := c.writable("close"); err != nil {
		return err
	}
	if err := c.flush(); err != nil {
		return c.writeErr("close", err, false)
	}
	if c.ring != nil {
		if err := c.ringWrite(local.RecFin, nil); err != nil {
			return c.writeErr("close", err, false)
		}
		c.wdone = true
		return nil
	}
	counted, err := c.writeRecord(local.RecFin, nil)
	c.wdone = counted
	if err != nil {
		return c.writeErr("close", err, counted)
	}
	return nil
}

func (c *Conn) writable(op string) error {
	switch {
	case c.closing.Load():
		return c.opErr(op, net.ErrClosed)
	case c.werr != nil:
		if c.wpipe {
			// The agent closed the socket: once a Read learned why, say why.
			if r := c.reason.Load(); r != nil {
				c.werr, c.wpipe = c.opErr(op, r), false
			}
		}
		return c.werr
	case c.wdone:
		return c.opErr(op, errWriteClosed)
	}
	return nil
}

// writeErr turns what a write met into the error returned: a deadline
// leaves the write side as it is; any other failure ends it. begun says
// that the record the deadline stopped was committed.
func (c *Conn) writeErr(op string, err error, begun bool) error {
	if c.closing.Load() {
		return c.opErr(op, net.ErrClosed)
	}
	if isDeadline(err) {
		if begun {
			err = errBegun{err}
		}
		return c.opErr(op, err)
	}
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		if r := c.reason.Load(); r != nil {
			err = r
		} else {
			err = &Error{Code: ErrReset.Code, Message: "the agent closed the channel's socket (a Read returns the reason)", cause: err}
			c.wpipe = true
		}
	}
	c.werr = c.opErr(op, err)
	return c.werr
}

// writeRecord writes one record and reports whether it is counted: all of
// it reached the socket, or a part did and the rest is kept in c.tail.
func (c *Conn) writeRecord(typ byte, p []byte) (bool, error) {
	local.PutRecordHeader(c.hdr[:], typ, len(p))
	c.vec = [2][]byte{c.hdr[:], p}
	c.bufs = c.vec[:]
	k, err := c.bufs.WriteTo(c.c)
	c.vec = [2][]byte{} // not to hold the caller's buffer
	if err == nil {
		return true, nil
	}
	if k == 0 {
		return false, err
	}
	// Part of the record is with the agent: the rest must follow before
	// anything else, or the agent would take payload for a header.
	c.tail = make([]byte, 0, local.RecordHeaderLen+len(p)-int(k))
	if k < local.RecordHeaderLen {
		c.tail = append(append(c.tail, c.hdr[k:]...), p...)
	} else {
		c.tail = append(c.tail, p[k-local.RecordHeaderLen:]...)
	}
	return true, err
}

// flush sends the rest of a committed record.
func (c *Conn) flush() error {
	for len(c.tail) > 0 {
		n, err := c.c.Write(c.tail)
		c.tail = c.tail[n:]
		if err != nil {
			return err
		}
	}
	c.tail = nil
	return nil
}

// finish sends what the write side owes the agent before the socket
// closes: the rest of a committed record and the last record, typ — a fin
// (Close; none if one went already) or a close record (Abort; allowed
// after a fin) — waiting at most closeFlushWait; if Close interrupted a
// Write, it tries once without waiting. What does not fit is lost, and the
// agent sees the socket close mid-record or without a fin: the channel
// broke.
func (c *Conn) finish(interrupted bool, typ byte, payload []byte) {
	if c.werr != nil {
		return
	}
	last := typ == local.RecClose || !c.wdone
	if !interrupted {
		c.c.SetWriteDeadline(time.Now().Add(closeFlushWait))
		if c.flush() == nil && last {
			counted, _ := c.writeRecord(typ, payload)
			c.wdone = c.wdone || counted
		}
		return
	}
	b := c.tail
	if last {
		local.PutRecordHeader(c.hdr[:], typ, len(payload))
		b = append(append(b, c.hdr[:]...), payload...)
	}
	rc, err := c.c.SyscallConn()
	if err != nil || len(b) == 0 {
		return
	}
	rc.Control(func(fd uintptr) {
		for len(b) > 0 {
			n, err := unix.SendmsgN(int(fd), b, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
			if err == unix.EINTR {
				continue
			}
			if err != nil || n <= 0 {
				return
			}
			b = b[n:]
		}
	})
}
