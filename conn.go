package sinc

import (
	"encoding/json"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/local"
)

// A Conn is one end of a channel: a Unix socket to the agent that carries
// records both ways (docs/protocol.md §3):
//
//	+--------+------------------------+-----------------+
//	| type 8 | length 24 (big endian) | payload         |
//	+--------+------------------------+-----------------+
//
// It keeps the net.Conn contract over that framing, across deadlines and
// Close, without ever misframing the records:
//
// Reading (read.go, under rmu). The record being read is the Conn's state,
// not a call's: the header bytes read so far, how much of the current
// record's payload is read, a message or close record assembled so far,
// and the bytes of a dropped message still to skip. A read deadline may
// stop a read anywhere in a record; the next Read goes on from there. A
// message read straight into the caller's buffer that a deadline cuts
// short is copied into the Conn (the read path's one allocation besides
// ReadMessage's message and a close record's reason).
//
// Writing (write.go, under wmu). A record goes out in one writev. If a
// write deadline passes when part of a record is in the socket, the record
// is committed: its unsent tail (at most a header and MaxRecord bytes) is
// kept in the Conn, Write counts the record in n, and the next Write,
// CloseWrite or Close sends the tail before anything else. So the agent
// only ever sees whole records, Write's n is exactly what the peer gets
// (while the channel lives), and a message goes whole or not at all: n is
// 0 or len(p). Write reports the deadline even when n == len(p) (the error
// says that a record was begun): a caller that stops writing after it must
// Close, which sends the tail. Write(nil) on a stream only sends the tail.
//
// Closing (Close and Abort, below). Close marks the Conn closing and moves both
// socket deadlines into the past, so that a Read or Write blocked in the
// socket wakes and returns net.ErrClosed at once; then it takes the write
// lock. If no Write was in progress, it sends the committed tail and a fin
// record, waiting at most closeFlushWait for room (the peer may be slow);
// if it had to interrupt a Write (the peer is likely not reading), it
// tries once without waiting. Then it closes the socket. A socket that
// closes in the middle of a record or without a fin ends the channel as
// broken or reset at the other end, never as a clean end of stream.
//
// Errors are described in errors.go: a deadline is not sticky; any other
// failure ends its direction, and each later call returns it again.
//
// Locks: dmu (deadlines, closing) → wmu (write side); rmu (read side) is
// taken alone. Close takes dmu then wmu; Read and Write never take dmu.
type Conn struct {
	c      *net.UnixConn
	kind   Kind
	info   Connection
	remote Addr
	ring   *ringEnd // the ring path (ring.go), or nil: records on c

	closing atomic.Bool
	reason  atomic.Pointer[Error] // why the channel ended, once a Read learned it
	dmu     sync.Mutex            // orders deadline changes against Close

	// read side, guarded by rmu
	rmu  sync.Mutex
	br   *recvBuffer
	rh   [local.RecordHeaderLen]byte // header of the next record, rhn bytes of it read
	rhn  int
	rec  bool   // a record's header is read, its payload not all
	rtyp byte   // that record's type,
	rlen int    // payload length,
	rgot int    // and how much of the payload is read
	body []byte // a message or close record assembled across calls, or nil
	skip int    // bytes of a dropped message still to skip
	rerr error  // sticky: the read side's end

	// write side, guarded by wmu
	wmu   sync.Mutex
	hdr   [local.RecordHeaderLen]byte
	vec   [2][]byte   // header and payload of the record being written
	bufs  net.Buffers // over vec, for writev
	tail  []byte      // the unsent rest of a committed record
	wdone bool        // a fin record is committed
	werr  error       // sticky: the write side's end
	wpipe bool        // werr is the socket closing, its reason not yet known
}

// closeFlushWait bounds how long Close waits for room for the committed
// tail and the fin record.
const closeFlushWait = time.Second

// aLongTimeAgo is a deadline that has passed.
var aLongTimeAgo = time.Unix(1, 0)

func newConn(c *net.UnixConn, kind Kind, info *local.Conn, remote Addr, withRing bool) (*Conn, error) {
	br, err := newRecvBuffer(c)
	if err != nil {
		return nil, err
	}
	cn := &Conn{c: c, kind: kind, remote: remote, br: br}
	if withRing {
		if cn.ring, err = openRing(c); err != nil {
			return nil, err
		}
		trackRing(cn)
	}
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

// Close closes the channel: what was written (and committed) is still
// delivered, then the other side reads io.EOF; see the top of this file
// for when it cannot be. Reads and Writes in progress return an error
// matching net.ErrClosed.
func (c *Conn) Close() error { return c.end("close", local.RecFin, nil) }

// Abort ends the channel at once as a failure, where Close would end it
// cleanly: the other process's Read returns an error matching ErrAborted
// whose message ends with message (the agent passes at most 200 printable
// bytes of it). What this side wrote and the other has not yet read may be
// lost, as with a reset. A relay uses it to pass on a failure it cannot
// pass as bytes: a TCP reset, a target that refused. Reads and Writes in
// progress return an error matching net.ErrClosed; so do Abort and Close
// after it.
//
// The message travels in the channel, behind what this side wrote. If a
// Write is blocked because the other process does not read, there may be
// no room for it: the other side then reads ErrReset instead, still a
// failure, without the message. Abort never waits for room.
func (c *Conn) Abort(message string) error {
	if len(message) > maxAbortMessage {
		message = message[:maxAbortMessage]
	}
	var payload []byte
	if message != "" {
		payload, _ = json.Marshal(struct {
			Message string `json:"message"`
		}{message})
	}
	return c.end("abort", local.RecClose, payload)
}

// maxAbortMessage bounds the message Abort sends (escaped as JSON, it stays
// within the close record's 4096 bytes; the agent keeps 200 bytes of it).
const maxAbortMessage = 512

// end closes the socket after the last record the write side owes the
// agent: a fin (Close) or a close record (Abort).
func (c *Conn) end(op string, typ byte, payload []byte) error {
	c.dmu.Lock()
	if c.closing.Load() {
		c.dmu.Unlock()
		return c.opErr(op, net.ErrClosed)
	}
	c.closing.Store(true)
	c.c.SetReadDeadline(aLongTimeAgo)
	if c.ring != nil {
		c.ring.rdl.Store(aLongTimeAgo.UnixNano())
	}
	interrupted := !c.wmu.TryLock()
	if interrupted {
		c.c.SetWriteDeadline(aLongTimeAgo)
		if c.ring != nil {
			setDeadline(&c.ring.wdl, c.ring.writeWait, aLongTimeAgo)
		}
		c.wmu.Lock()
	}
	c.dmu.Unlock()
	if c.ring != nil {
		c.ringFinish(interrupted, typ, payload)
	} else {
		c.finish(interrupted, typ, payload)
	}
	c.wmu.Unlock()
	c.c.Close()
	if c.ring != nil {
		untrackRing(c)
		c.rmu.Lock() // a Read woken by the deadline has left the memory
		c.ring.close()
		c.rmu.Unlock()
	}
	return nil
}

func (c *Conn) opErr(op string, err error) error {
	return &OpError{Op: op, Addr: c.remote.String(), Err: err}
}

func (c *Conn) LocalAddr() net.Addr {
	if c.info.Partition == "" {
		return Addr("")
	}
	return Addr(c.info.Partition)
}

func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets the read and write deadlines. A deadline that passes
// leaves the channel consistent (see the top of this file).
func (c *Conn) SetDeadline(t time.Time) error {
	return c.setDeadline(t, func(t time.Time) error {
		if c.ring != nil {
			setDeadline(&c.ring.rdl, nil, t)
			setDeadline(&c.ring.wdl, c.ring.writeWait, t)
		}
		return c.c.SetDeadline(t)
	})
}

func (c *Conn) SetReadDeadline(t time.Time) error {
	return c.setDeadline(t, func(t time.Time) error {
		if c.ring != nil {
			setDeadline(&c.ring.rdl, nil, t)
		}
		return c.c.SetReadDeadline(t)
	})
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	return c.setDeadline(t, func(t time.Time) error {
		if c.ring != nil {
			setDeadline(&c.ring.wdl, c.ring.writeWait, t)
		}
		return c.c.SetWriteDeadline(t)
	})
}

func (c *Conn) setDeadline(t time.Time, set func(time.Time) error) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if c.closing.Load() {
		return c.opErr("set", net.ErrClosed)
	}
	if err := set(t); err != nil {
		return c.opErr("set", err)
	}
	return nil
}

var _ net.Conn = (*Conn)(nil)
