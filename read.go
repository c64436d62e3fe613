package sinc

import (
	"encoding/json"
	"errors"
	"io"
	"net"

	"sinc.dev/sinc/internal/local"
)

// The read side: records from the agent, taken apart in a way a deadline
// can stop anywhere and the next call resumes (see conn.go). Every
// function here runs under rmu.

// errTooLong: Read's buffer is shorter than the message; the message is
// dropped and the channel goes on.
var errTooLong = &Error{Code: ErrMessageTooLong.Code, Message: "message longer than the read buffer; dropped"}

// Read reads channel bytes (stream) or one message (message: if p is too
// short for it the message is dropped and the error wraps
// ErrMessageTooLong). After the other side's CloseWrite it returns io.EOF.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if err := c.readable(); err != nil {
		return 0, err
	}
	var n int
	var err error
	switch {
	case c.ring != nil && c.kind == Message:
		n, _, err = c.ringReadMessage(p, false)
	case c.ring != nil:
		n, err = c.ringReadStream(p)
	case c.kind == Message:
		n, _, err = c.readMessage(p, false)
	default:
		n, err = c.readStream(p)
	}
	return n, c.readErr(err)
}

// ReadMessage reads one message of a message channel.
func (c *Conn) ReadMessage() ([]byte, error) {
	if c.kind != Message {
		return nil, c.opErr("read", &Error{Code: ErrBadRequest.Code, Message: "ReadMessage on a stream channel"})
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if err := c.readable(); err != nil {
		return nil, err
	}
	var m []byte
	var err error
	if c.ring != nil {
		_, m, err = c.ringReadMessage(nil, true)
	} else {
		_, m, err = c.readMessage(nil, true)
	}
	return m, c.readErr(err)
}

// readable returns net.ErrClosed after Close (and lets go of a receive
// buffer still held), or the read side's end.
func (c *Conn) readable() error {
	if c.closing.Load() {
		c.br.release()
		return c.opErr("read", net.ErrClosed)
	}
	return c.rerr
}

// readErr turns what a read met into Read's error: a deadline or a
// dropped message leave the read side as it is; io.EOF and every other
// failure end it.
func (c *Conn) readErr(err error) error {
	switch {
	case err == nil:
		return nil
	case c.closing.Load():
		return c.opErr("read", net.ErrClosed)
	case isDeadline(err) || err == errTooLong:
		return c.opErr("read", err)
	case err == io.EOF:
		c.rerr = io.EOF // bare, as io.Reader promises
		return io.EOF
	}
	var se *Error
	if errors.As(err, &se) {
		c.reason.Store(se)
	}
	c.rerr = c.opErr("read", err)
	return c.rerr
}

// recvErr names a failure of the socket: a deadline and our own Close
// pass as they are; the socket closing or failing otherwise (ECONNRESET)
// means the agent went away without a word.
func (c *Conn) recvErr(err error, midRecord bool) error {
	switch {
	case isDeadline(err) || errors.Is(err, net.ErrClosed):
		return err
	case err == io.EOF && midRecord:
		return &Error{Code: ErrAgentGone.Code, Message: "the agent closed the channel in the middle of a record: it stopped or died"}
	case err == io.EOF:
		return &Error{Code: ErrAgentGone.Code, Message: "the agent closed the channel without a word (no fin, no close record): it stopped or died"}
	}
	return &Error{Code: ErrAgentGone.Code, Message: "the agent's end of the channel failed (" + errText(err) + "): it stopped or died", cause: err}
}

// header reads the next record's header, going on from the bytes an
// earlier call read, and makes that record the current one.
func (c *Conn) header() error {
	for c.rhn < len(c.rh) {
		n, err := c.br.Read(c.rh[c.rhn:])
		c.rhn += n
		if err != nil {
			return c.recvErr(err, c.rhn > 0)
		}
	}
	c.rhn = 0
	typ, n, err := local.ParseRecordHeader(c.rh[:])
	if err != nil {
		return &Error{Code: ErrProtocol.Code, Message: "bad record from the agent: " + err.Error()}
	}
	c.rec, c.rtyp, c.rlen, c.rgot, c.body = true, typ, n, 0, nil
	return nil
}

// fill reads the current record's payload into dst[c.rgot:c.rlen].
func (c *Conn) fill(dst []byte) error {
	for c.rgot < c.rlen {
		n, err := c.br.Read(dst[c.rgot:c.rlen])
		c.rgot += n
		if err != nil {
			return c.recvErr(err, true)
		}
	}
	return nil
}

// control handles a fin or close record as the current record: io.EOF,
// or the reason the agent gave for ending the channel.
func (c *Conn) control() error {
	if c.rtyp == local.RecFin {
		c.rec = false
		return io.EOF
	}
	if c.body == nil {
		c.body = make([]byte, c.rlen)
	}
	if err := c.fill(c.body); err != nil {
		return err
	}
	var le local.Error
	err := json.Unmarshal(c.body, &le)
	c.rec, c.body = false, nil
	if err != nil {
		return &Error{Code: ErrProtocol.Code, Message: "bad close record from the agent: " + err.Error()}
	}
	return fromLocal(&le)
}

// readStream reads bytes of the current data record, at most to its end.
func (c *Conn) readStream(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if !c.rec {
			if err := c.header(); err != nil {
				return 0, err
			}
		}
		if c.rtyp != local.RecData {
			return 0, c.control()
		}
		if c.rgot < c.rlen {
			break
		}
		c.rec = false // an empty data record
	}
	n, err := c.br.Read(p[:min(len(p), c.rlen-c.rgot)])
	if c.rgot += n; c.rgot == c.rlen {
		c.rec = false
	}
	if err != nil {
		return n, c.recvErr(err, true)
	}
	return n, nil
}

// readMessage reads one message into p (Read), or into a new slice
// (ReadMessage: alloc).
func (c *Conn) readMessage(p []byte, alloc bool) (int, []byte, error) {
	if c.skip > 0 {
		n, err := c.br.Discard(c.skip)
		if c.skip -= n; err != nil {
			return 0, nil, c.recvErr(err, true)
		}
	}
	if !c.rec {
		if err := c.header(); err != nil {
			return 0, nil, err
		}
	}
	if c.rtyp != local.RecData {
		return 0, nil, c.control()
	}
	// Invariant between calls: a message partly read has its bytes in
	// c.body.
	switch {
	case alloc:
		if c.body == nil {
			c.body = make([]byte, c.rlen)
		}
	case c.body == nil && c.rlen > len(p):
		c.rec, c.skip = false, c.rlen
		n, err := c.br.Discard(c.skip)
		if c.skip -= n; err != nil && !isDeadline(err) {
			return 0, nil, c.recvErr(err, true)
		}
		return 0, nil, errTooLong // a deadline: the next read skips the rest
	case c.body == nil:
		if err := c.fill(p); err != nil {
			if c.rgot > 0 {
				c.body = make([]byte, c.rlen)
				copy(c.body, p[:c.rgot])
			}
			return 0, nil, err
		}
		c.rec = false
		return c.rlen, nil, nil
	}
	if err := c.fill(c.body); err != nil {
		return 0, nil, err
	}
	m := c.body
	c.rec, c.body = false, nil
	switch {
	case alloc:
		return len(m), m, nil
	case len(m) > len(p):
		return 0, nil, errTooLong
	}
	return copy(p, m), nil, nil
}
