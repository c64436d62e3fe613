package sinc

import (
	"context"
	"errors"
	"net"
	"os"

	"sinc.dev/sinc/internal/local"
)

// Error contract. Every error a Dialer, Conn or Listener returns, except
// the io.EOF that ends a stream as io.Reader promises, is an *OpError: a
// net.Error naming the operation and the channel or service. What it wraps
// says what happened:
//
//   - a deadline: os.ErrDeadlineExceeded (Timeout and Temporary are true);
//   - use after Close: net.ErrClosed;
//   - everything else: an *Error whose Code errors.Is matches against the
//     Err… values below, with a cause where the client saw one (a syscall
//     error, say, that errors.Is also matches).
//
// A deadline leaves a Conn usable; every other failure of a Read or a Write
// is the end of that direction, and each later call returns it again.

// Error is a failure the agent reported, or one the client saw on its own
// (ErrNoAgent). Code says what kind (one of the codes in docs/protocol.md,
// or no_agent); By names the agent that refused, where one did.
type Error struct {
	Code    string
	Message string
	By      string

	cause error // what the client saw, where it saw something (a syscall error)
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

// Unwrap returns the cause the client saw, if any.
func (e *Error) Unwrap() error { return e.cause }

// Errors to test for with errors.Is.
var (
	ErrNoSuchNode      = &Error{Code: "no_such_node"}
	ErrUnreachable     = &Error{Code: "node_unreachable"}
	ErrNoSuchPartition = &Error{Code: "no_such_partition"}
	ErrNoSuchService   = &Error{Code: "no_such_service"}
	ErrDenied          = &Error{Code: "denied"}
	ErrTimeout         = &Error{Code: "timeout"}
	ErrLimit           = &Error{Code: "limit"}
	// ErrBusy: the agent has too much in progress. Dialer, ListenConfig
	// and Connections retry it with backoff before they return it.
	ErrBusy       = &Error{Code: "busy"}
	ErrExists     = &Error{Code: "exists"}
	ErrBadRequest = &Error{Code: "bad_request"}
	ErrReset      = &Error{Code: "reset"}
	ErrClosed     = &Error{Code: "closed"}
	ErrProtocol   = &Error{Code: "protocol"}
	// ErrAborted: the remote process aborted the channel (it sent a close
	// record).
	ErrAborted = &Error{Code: "aborted"}
	// ErrAgentGone: the agent stopped (it said so), or its end of a socket
	// closed or failed without a word: it died.
	ErrAgentGone = &Error{Code: "agent_gone"}
	// ErrMessageTooLong: a message over MaxMessage, or longer than the
	// buffer given to Read.
	ErrMessageTooLong = &Error{Code: "message_too_long"}
	// ErrNoAgent is the client's own code, never sent by an agent: no
	// agent answers at the partition socket (no such file, nobody
	// listening on it, or no socket given at all). Its message names the
	// socket and what to check.
	ErrNoAgent = &Error{Code: "no_agent"}
)

func fromLocal(e *local.Error) *Error {
	if e == nil {
		return &Error{Code: "internal", Message: "agent failed without a reason"}
	}
	return &Error{Code: e.Code, Message: e.Message, By: e.By}
}

// OpError is the error of an operation: which, on what, and why. It is a
// net.Error.
type OpError struct {
	Op   string // "dial", "listen", "conns", "accept", "read", "write", "close", "set"
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

// Timeout reports whether the operation timed out: a deadline passed, the
// context's deadline passed, or (dial, listen, conns) the agent answered
// timeout. A channel that the agent ended with the code timeout is ended,
// not timed out: retrying its reads would never succeed.
func (e *OpError) Timeout() bool {
	switch e.Op {
	case "dial", "listen", "conns":
		if errors.Is(e.Err, ErrTimeout) {
			return true
		}
	}
	var ne net.Error
	return errors.Is(e.Err, os.ErrDeadlineExceeded) || errors.Is(e.Err, context.DeadlineExceeded) ||
		errors.As(e.Err, &ne) && ne.Timeout()
}

// Temporary reports whether the operation may succeed if tried again
// later: it timed out, or the agent was busy.
//
// Deprecated: as with net.Error, Temporary is not well defined; use
// Timeout or errors.Is.
func (e *OpError) Temporary() bool {
	return e.Timeout() || errors.Is(e.Err, ErrBusy)
}

var _ net.Error = (*OpError)(nil)

func isDeadline(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// errBegun is the deadline error of a Write that had begun a record when
// its deadline passed: Write counted the record in n, and its rest goes to
// the agent before anything else (see conn.go).
type errBegun struct{ err error }

func (e errBegun) Error() string {
	return e.err.Error() + " (a record was begun: its rest is sent first by the next Write, CloseWrite or Close)"
}
func (e errBegun) Unwrap() error   { return e.err }
func (e errBegun) Timeout() bool   { return true }
func (e errBegun) Temporary() bool { return true }
