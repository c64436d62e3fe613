// Package sinc is the client library of sinc, secure inter-node channels.
//
// A process reaches its node's agent through the Unix socket of its
// partition (given as an argument, or in the SINC_SOCKET environment
// variable) and asks it for a channel to a service of another process,
// addressed node/partition/service. The agent authenticates the process by
// the kernel's word, checks policy, agrees keys with the other node's agent
// and verifies every frame; the process sees a net.Conn:
//
//	c, err := sinc.Dial("node-b/db/pg")
//	...
//	ln, err := sinc.Listen("pg")
//	c, err := ln.Accept()
//
// A stream channel carries bytes, like TCP, with half-close (CloseWrite).
// A message channel keeps boundaries: each Write is one message of at most
// MaxMessage bytes, and each Read returns one message.
//
// Errors from the agent are *Error values that errors.Is matches against
// the Err… values by code, wrapped in an *OpError naming the operation.
package sinc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/local"
)

// SocketEnv is the environment variable that names the partition socket
// when a call is not given one.
const SocketEnv = "SINC_SOCKET"

// MaxMessage is the largest message of a message channel.
const MaxMessage = local.MaxMessage

// Kind is a channel's kind.
type Kind int

const (
	Stream  Kind = iota // bytes, like TCP
	Message             // boundaries kept, like SOCK_SEQPACKET
)

func (k Kind) String() string {
	if k == Message {
		return local.KindMessage
	}
	return local.KindStream
}

// Connection is a row of the connection table.
type Connection = local.Conn

// Proc is a process's kernel identity in a Connection.
type Proc = local.Proc

// Error is a failure the agent reported: Code says what kind (one of the
// codes in docs/protocol.md), By names the agent that refused, where one
// did.
type Error struct {
	Code    string
	Message string
	By      string
}

func (e *Error) Error() string {
	s := e.Code
	if e.By != "" {
		s += " (by " + e.By + ")"
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Is reports whether target is an *Error with the same code and no
// message: errors.Is(err, sinc.ErrDenied).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.By == "" && t.Code == e.Code
}

// Errors to test for with errors.Is.
var (
	ErrNoSuchNode      = &Error{Code: "no_such_node"}
	ErrUnreachable     = &Error{Code: "node_unreachable"}
	ErrNoSuchPartition = &Error{Code: "no_such_partition"}
	ErrNoSuchService   = &Error{Code: "no_such_service"}
	ErrDenied          = &Error{Code: "denied"}
	ErrTimeout         = &Error{Code: "timeout"}
	ErrLimit           = &Error{Code: "limit"}
	ErrBusy            = &Error{Code: "busy"}
	ErrExists          = &Error{Code: "exists"}
	ErrBadRequest      = &Error{Code: "bad_request"}
	ErrReset           = &Error{Code: "reset"}
	ErrClosed          = &Error{Code: "closed"}
	ErrProtocol        = &Error{Code: "protocol"}
	// ErrAgentGone: the agent stopped (it said so, or its socket closed
	// without a word).
	ErrAgentGone = &Error{Code: "agent_gone"}
	// ErrMessageTooLong: a message over MaxMessage, or longer than the
	// buffer given to Read.
	ErrMessageTooLong = &Error{Code: "message_too_long"}
)

func fromLocal(e *local.Error) *Error {
	if e == nil {
		return &Error{Code: "internal", Message: "agent failed without a reason"}
	}
	return &Error{Code: e.Code, Message: e.Message, By: e.By}
}

// OpError is the error of an operation: which, on what, and why.
type OpError struct {
	Op   string // "dial", "listen", "conns", "read", "write"
	Addr string // the channel's address or the service
	Err  error
}

func (e *OpError) Error() string {
	if e.Addr == "" {
		return "sinc: " + e.Op + ": " + e.Err.Error()
	}
	return "sinc: " + e.Op + " " + e.Addr + ": " + e.Err.Error()
}

func (e *OpError) Unwrap() error { return e.Err }

// Timeout reports whether the operation timed out.
func (e *OpError) Timeout() bool {
	var ne net.Error
	return errors.Is(e.Err, ErrTimeout) || errors.As(e.Err, &ne) && ne.Timeout()
}

// Addr is a sinc address, node/partition/service.
type Addr string

func (Addr) Network() string  { return "sinc" }
func (a Addr) String() string { return string(a) }

func socketPath(s string) (string, error) {
	if s != "" {
		return s, nil
	}
	if s = os.Getenv(SocketEnv); s != "" {
		return s, nil
	}
	return "", fmt.Errorf("no partition socket: give one or set %s", SocketEnv)
}

// request connects to the partition socket and sends req; it returns the
// connection and the agent's answer. ctx bounds the whole exchange.
func request(ctx context.Context, socket string, req *local.Request) (*net.UnixConn, *local.Response, error) {
	path, err := socketPath(socket)
	if err != nil {
		return nil, nil, err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, nil, err
	}
	uc := c.(*net.UnixConn)
	// Cancelling ctx interrupts the exchange, as in package net.
	stop := context.AfterFunc(ctx, func() { uc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		uc.SetDeadline(dl)
	}
	req.V = local.Version
	b, _ := json.Marshal(req)
	if _, err := uc.Write(append(b, '\n')); err != nil {
		uc.Close()
		return nil, nil, ctxErr(ctx, err)
	}
	resp, err := readResponse(uc)
	if err != nil {
		uc.Close()
		return nil, nil, ctxErr(ctx, err)
	}
	if !stop() {
		uc.Close()
		return nil, nil, ctx.Err()
	}
	uc.SetDeadline(time.Time{})
	if !resp.OK {
		uc.Close()
		return nil, nil, fromLocal(resp.Error)
	}
	return uc, resp, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// readResponse reads the agent's answer line and nothing after it (channel
// data may follow at once): it peeks at what has arrived, then takes just
// the line.
func readResponse(c *net.UnixConn) (*local.Response, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 4<<10) // an answer is a few hundred bytes; longer ones loop
	var line []byte
	for {
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_PEEK)
			return rerr != unix.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil, err
			}
			return nil, fmt.Errorf("agent's answer: %w", err)
		}
		if n == 0 {
			return nil, errors.New("agent's answer: the agent closed the socket")
		}
		i := bytes.IndexByte(buf[:n], '\n')
		take := n
		if i >= 0 {
			take = i + 1
		}
		if _, err := io.ReadFull(c, buf[:take]); err != nil {
			return nil, fmt.Errorf("agent's answer: %w", err)
		}
		if line = append(line, buf[:take]...); i >= 0 {
			break
		}
		if len(line) > 1<<20 {
			return nil, errors.New("agent's answer too long")
		}
	}
	var r local.Response
	if err := json.Unmarshal(line[:len(line)-1], &r); err != nil {
		return nil, fmt.Errorf("agent's answer: %w", err)
	}
	return &r, nil
}

// Dialer opens channels. Its zero value dials stream channels through the
// socket named by SINC_SOCKET.
type Dialer struct {
	Socket string // the partition socket; "" for $SINC_SOCKET
	Kind   Kind
}

// Dial opens a stream channel to addr (node/partition/service).
func Dial(addr string) (*Conn, error) {
	return (&Dialer{}).DialContext(context.Background(), addr)
}

// DialContext opens a channel to addr. ctx bounds the open; once open, the
// channel does not depend on ctx.
func (d *Dialer) DialContext(ctx context.Context, addr string) (*Conn, error) {
	c, resp, err := request(ctx, d.Socket, &local.Request{Op: local.OpOpen, To: addr, Kind: d.Kind.String()})
	if err != nil {
		return nil, &OpError{Op: "dial", Addr: addr, Err: err}
	}
	cn, err := newConn(c, d.Kind, resp.Conn, Addr(addr))
	if err != nil {
		c.Close()
		return nil, &OpError{Op: "dial", Addr: addr, Err: err}
	}
	return cn, nil
}

// Connections lists the connection table rows of the partition of socket
// ("" for $SINC_SOCKET).
func Connections(ctx context.Context, socket string) ([]Connection, error) {
	c, resp, err := request(ctx, socket, &local.Request{Op: local.OpConns})
	if err != nil {
		return nil, &OpError{Op: "conns", Err: err}
	}
	c.Close()
	return resp.Conns, nil
}
