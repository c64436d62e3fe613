package sinc

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"sinc.dev/sinc/internal/local"
)

// Conn is one end of a channel. It is a net.Conn; Read and Write may be
// called from different goroutines at once.
type Conn struct {
	c      *net.UnixConn
	kind   Kind
	info   Connection
	remote Addr

	rmu    sync.Mutex
	br     *recvBuffer
	remain int   // bytes left of the data record being read (stream)
	rerr   error // sticky: the read side's end

	wmu    sync.Mutex
	hdr    [local.RecordHeaderLen]byte
	wdone  bool // FIN sent
	closed bool
}

func newConn(c *net.UnixConn, kind Kind, info *local.Conn, remote Addr) (*Conn, error) {
	br, err := newRecvBuffer(c)
	if err != nil {
		return nil, err
	}
	cn := &Conn{c: c, kind: kind, remote: remote, br: br}
	if info != nil {
		cn.info = *info
	}
	return cn, nil
}

// Info returns the channel's connection table row as it was when the
// channel opened.
func (c *Conn) Info() Connection { return c.info }

// Kind returns the channel's kind.
func (c *Conn) Kind() Kind { return c.kind }

// nextRecord reads a record header and handles FIN and close records. It
// returns the length of a data record.
func (c *Conn) nextRecord() (int, error) {
	var h [local.RecordHeaderLen]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, &Error{Code: ErrAgentGone.Code, Message: "the agent closed the channel without a word"}
		}
		return 0, err
	}
	typ, n, err := local.ParseRecordHeader(h[:])
	if err != nil {
		return 0, &Error{Code: ErrProtocol.Code, Message: "bad record from the agent: " + err.Error()}
	}
	switch typ {
	case local.RecFin:
		return 0, io.EOF
	case local.RecClose:
		b := make([]byte, n)
		if _, err := io.ReadFull(c.br, b); err != nil {
			return 0, &Error{Code: ErrAgentGone.Code, Message: "the agent closed the channel mid-record"}
		}
		var le local.Error
		if json.Unmarshal(b, &le) != nil {
			return 0, &Error{Code: ErrProtocol.Code, Message: "bad close record from the agent"}
		}
		return 0, fromLocal(&le)
	}
	return n, nil
}

// Read reads channel bytes (stream) or one message (message: if p is too
// short for it the message is dropped and the error is ErrMessageTooLong).
// After the other side's CloseWrite it returns io.EOF; after the channel
// broke, an *OpError wrapping the reason.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.kind == Message {
		return c.readMessage(p)
	}
	for c.remain == 0 {
		if c.rerr != nil {
			return 0, c.rerr
		}
		n, err := c.nextRecord()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return 0, c.opErr("read", err) // a deadline: not the end
			}
			c.rerr = c.wrapEnd("read", err)
			return 0, c.rerr
		}
		c.remain = n
	}
	if len(p) > c.remain {
		p = p[:c.remain]
	}
	n, err := c.br.Read(p)
	c.remain -= n
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return n, c.opErr("read", err)
		}
		c.rerr = c.wrapEnd("read", &Error{Code: ErrAgentGone.Code, Message: "the agent closed the channel mid-record"})
		return n, c.rerr
	}
	return n, nil
}

func (c *Conn) readMessage(p []byte) (int, error) {
	if c.rerr != nil {
		return 0, c.rerr
	}
	n, err := c.nextRecord()
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return 0, c.opErr("read", err)
		}
		c.rerr = c.wrapEnd("read", err)
		return 0, c.rerr
	}
	if n > len(p) {
		if err := c.br.Discard(n); err != nil {
			c.rerr = c.opErr("read", err)
			return 0, c.rerr
		}
		return 0, c.opErr("read", &Error{Code: ErrMessageTooLong.Code, Message: "message longer than the read buffer; dropped"})
	}
	if _, err := io.ReadFull(c.br, p[:n]); err != nil {
		c.rerr = c.opErr("read", err)
		return 0, c.rerr
	}
	return n, nil
}

// ReadMessage reads one message of a message channel.
func (c *Conn) ReadMessage() ([]byte, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.kind != Message {
		return nil, c.opErr("read", errors.New("ReadMessage on a stream channel"))
	}
	if c.rerr != nil {
		return nil, c.rerr
	}
	n, err := c.nextRecord()
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return nil, c.opErr("read", err)
		}
		c.rerr = c.wrapEnd("read", err)
		return nil, c.rerr
	}
	m := make([]byte, n)
	if _, err := io.ReadFull(c.br, m); err != nil {
		c.rerr = c.opErr("read", err)
		return nil, c.rerr
	}
	return m, nil
}

func (c *Conn) opErr(op string, err error) error {
	return &OpError{Op: op, Addr: c.remote.String(), Err: err}
}

// wrapEnd leaves io.EOF bare, as io.Reader promises.
func (c *Conn) wrapEnd(op string, err error) error {
	if err == io.EOF {
		return io.EOF
	}
	return c.opErr(op, err)
}

// Write writes bytes (stream) or one message (message; at most MaxMessage
// bytes).
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wdone || c.closed {
		return 0, c.opErr("write", net.ErrClosed)
	}
	if c.kind == Message {
		if len(p) > MaxMessage {
			return 0, c.opErr("write", &Error{Code: ErrMessageTooLong.Code, Message: "message longer than MaxMessage"})
		}
		if err := c.writeRecord(local.RecData, p); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	n := 0
	for n < len(p) {
		chunk := p[n:min(len(p), n+local.MaxRecord)]
		if err := c.writeRecord(local.RecData, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
	}
	return n, nil
}

// WriteMessage writes one message of a message channel.
func (c *Conn) WriteMessage(m []byte) error {
	_, err := c.Write(m)
	return err
}

func (c *Conn) writeRecord(typ byte, p []byte) error {
	local.PutRecordHeader(c.hdr[:], typ, len(p))
	bufs := net.Buffers{c.hdr[:], p}
	want := int64(len(p) + local.RecordHeaderLen)
	n, err := bufs.WriteTo(c.c)
	if err == nil && n != want {
		err = io.ErrShortWrite
	}
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		// The agent ended the channel; Read returns its reason.
		err = &Error{Code: ErrReset.Code, Message: "the channel was closed by the agent (read for the reason)"}
	}
	if err != nil {
		return c.opErr("write", err)
	}
	return nil
}

// CloseWrite ends this side's direction; the other side reads io.EOF once
// it has read everything before it. Reading goes on.
func (c *Conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wdone || c.closed {
		return nil
	}
	c.wdone = true
	return c.writeRecord(local.RecFin, nil)
}

// Close closes the channel: what was written is still delivered, then the
// other side reads io.EOF.
func (c *Conn) Close() error {
	c.wmu.Lock()
	if !c.wdone && !c.closed {
		c.wdone = true
		c.c.SetWriteDeadline(time.Now().Add(time.Second))
		c.writeRecord(local.RecFin, nil)
	}
	c.closed = true
	c.wmu.Unlock()
	return c.c.Close()
}

func (c *Conn) LocalAddr() net.Addr {
	if c.info.Partition == "" {
		return Addr("")
	}
	return Addr(c.info.Partition)
}

func (c *Conn) RemoteAddr() net.Addr               { return c.remote }
func (c *Conn) SetDeadline(t time.Time) error      { return c.c.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.c.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.c.SetWriteDeadline(t) }

var _ net.Conn = (*Conn)(nil)
