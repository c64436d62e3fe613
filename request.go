package sinc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/local"
)

// A request is one connection to the partition socket: connect, send one
// JSON line, read one JSON line back (docs/protocol.md §1). What can go
// wrong, and what the caller gets:
//
//	no socket given, no file, nobody listens  → ErrNoAgent (names the socket)
//	the socket's backlog is full (EAGAIN)     → ErrBusy, retried
//	the agent answers busy                    → ErrBusy, retried
//	the socket breaks before the answer       → ErrAgentGone
//	the answer is not one JSON line           → ErrProtocol
//	ctx ends                                  → ctx.Err()
//	the agent answers an error                → that *Error

// Busy retries: jittered exponential backoff within the caller's context,
// and within busyGiveUp when the context has no deadline.
var (
	busyFirst  = 2 * time.Millisecond
	busyMax    = 200 * time.Millisecond
	busyGiveUp = 10 * time.Second
)

// request sends req to the agent of socket ("" for $SINC_SOCKET) and
// returns the connection and the agent's answer, retrying busy answers.
func request(ctx context.Context, socket string, req *local.Request) (*net.UnixConn, *local.Response, error) {
	path, err := socketPath(socket)
	if err != nil {
		return nil, nil, err
	}
	var giveUp time.Time
	if _, ok := ctx.Deadline(); !ok {
		giveUp = time.Now().Add(busyGiveUp)
	}
	backoff := busyFirst
	var busy error
	for {
		c, resp, err := exchange(ctx, path, req)
		if busy != nil && errors.Is(err, context.DeadlineExceeded) {
			return nil, nil, busy // busy until the caller's deadline
		}
		if err == nil || !errors.Is(err, ErrBusy) {
			return c, resp, err
		}
		busy = err
		wait := backoff/2 + rand.N(backoff) // [backoff/2, 3·backoff/2)
		backoff = min(2*backoff, busyMax)
		until := time.Now().Add(wait)
		if dl, ok := ctx.Deadline(); ok && until.After(dl) || !giveUp.IsZero() && until.After(giveUp) {
			return nil, nil, err // the last busy answer says more than a deadline would
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil, ctx.Err()
		case <-t.C:
		}
	}
}

func socketPath(s string) (string, error) {
	if s != "" {
		return s, nil
	}
	if s = os.Getenv(SocketEnv); s != "" {
		return s, nil
	}
	return "", &Error{Code: ErrNoAgent.Code, Message: "no partition socket: give one or set " + SocketEnv}
}

// exchange makes one request on a new connection to path.
func exchange(ctx context.Context, path string, req *local.Request) (*net.UnixConn, *local.Response, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, nil, ctxErr(ctx, connectErr(path, err))
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
	if _, werr := uc.Write(append(b, '\n')); werr != nil {
		// The agent may have answered before it read the request — a
		// refusal at the door (busy, out of descriptors) — and closed:
		// its answer is the reason, if it is there to read.
		uc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		resp, err := readResponse(uc)
		uc.Close()
		if err == nil && !resp.OK {
			return nil, nil, fromLocal(resp.Error)
		}
		return nil, nil, ctxErr(ctx, brokenErr("the agent's socket failed before it took the request", werr))
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

// ctxErr returns the context's error for an exchange that ctx ended; the
// net package's own timer may see the deadline a moment before ctx does.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ne net.Error
	if dl, ok := ctx.Deadline(); ok && errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return err
}

// connectErr names a failed connect: nobody there is ErrNoAgent, a full
// backlog is ErrBusy; anything else (permission denied) stays as it is.
func connectErr(path string, err error) error {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return err
	}
	switch errno {
	case unix.ENOENT, unix.ECONNREFUSED, unix.ENOTSOCK, unix.ENOTDIR:
		return &Error{Code: ErrNoAgent.Code, cause: err,
			Message: fmt.Sprintf("no agent answers at %s (%v): check that the agent runs and that %s is the socket of this process's partition", path, errno, path)}
	case unix.EAGAIN:
		return &Error{Code: ErrBusy.Code, cause: err, Message: "the agent's socket " + path + " has too many connections waiting"}
	}
	return err
}

// brokenErr names a socket that broke while a request or its answer was
// on it: the agent closed it or died.
func brokenErr(what string, err error) error {
	if isDeadline(err) {
		return err
	}
	return &Error{Code: ErrAgentGone.Code, Message: what + " (" + errText(err) + "): the agent stopped or died", cause: err}
}

// errText is the innermost error's text: "connection reset by peer", not
// the whole chain of the net package's wrapping.
func errText(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno.Error()
	}
	if errors.Is(err, io.EOF) {
		return "closed"
	}
	return err.Error()
}

// maxAnswer bounds the agent's answer line.
const maxAnswer = 1 << 20

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
			return nil, brokenErr("the agent's socket failed before its answer", err)
		}
		if n == 0 {
			return nil, brokenErr("the agent closed the socket without answering", io.EOF)
		}
		i := bytes.IndexByte(buf[:n], '\n')
		take := n
		if i >= 0 {
			take = i + 1
		}
		if _, err := io.ReadFull(c, buf[:take]); err != nil {
			return nil, brokenErr("the agent's socket failed in its answer", err)
		}
		if line = append(line, buf[:take]...); i >= 0 {
			break
		}
		if len(line) > maxAnswer {
			return nil, &Error{Code: ErrProtocol.Code, Message: fmt.Sprintf("the agent's answer is longer than %d bytes", maxAnswer)}
		}
	}
	var r local.Response
	if err := json.Unmarshal(line[:len(line)-1], &r); err != nil {
		return nil, &Error{Code: ErrProtocol.Code, Message: "the agent's answer is not JSON: " + err.Error()}
	}
	return &r, nil
}
