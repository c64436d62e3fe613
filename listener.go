package sinc

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"sinc.dev/sinc/internal/local"
)

// Listener accepts the channels opened to a service. It is a net.Listener:
// after Close, Accept returns an error matching net.ErrClosed; when the
// agent goes away, one matching ErrAgentGone.
type Listener struct {
	c      *net.UnixConn
	addr   Addr
	closed atomic.Bool

	mu  sync.Mutex // serializes Accept
	nr  *local.NoticeReader
	end error // sticky: why accepting ended, guarded by mu
}

// ListenConfig configures Listen.
type ListenConfig struct {
	Socket string // the partition socket; "" for $SINC_SOCKET
	// NoRing keeps accepted channels' data on their sockets instead of
	// rings shared with the agent (ring.go); so does SINC_NO_RING=1.
	NoRing bool
}

// Listen listens on service in the partition of $SINC_SOCKET.
func Listen(service string) (*Listener, error) {
	return (&ListenConfig{}).Listen(context.Background(), service)
}

// Listen listens on service; ctx bounds the request (busy answers are
// retried as by Dialer), not the listener.
func (lc *ListenConfig) Listen(ctx context.Context, service string) (*Listener, error) {
	c, resp, err := request(ctx, lc.Socket, &local.Request{Op: local.OpListen, Service: service, Ring: !lc.NoRing && ringDefault()})
	if err != nil {
		return nil, &OpError{Op: "listen", Addr: service, Err: err}
	}
	return &Listener{c: c, addr: Addr(resp.Addr), nr: local.NewNoticeReader(c)}, nil
}

// Accept waits for the next channel to the service.
func (l *Listener) Accept() (net.Conn, error) {
	return l.AcceptSinc()
}

// AcceptSinc is Accept returning the *Conn.
func (l *Listener) AcceptSinc() (*Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed.Load() {
		return nil, l.opErr(net.ErrClosed)
	}
	if l.end != nil {
		return nil, l.end
	}
	n, f, err := l.nr.Next()
	if err != nil {
		if l.closed.Load() {
			return nil, l.opErr(net.ErrClosed)
		}
		l.end = l.opErr(noticeErr(err))
		return nil, l.end
	}
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, l.opErr(err)
	}
	kind := Stream
	if n.Conn != nil && n.Conn.Kind == local.KindMessage {
		kind = Message
	}
	var remote Addr
	if n.Conn != nil {
		remote = Addr(n.Conn.RemoteNode + "/" + n.Conn.RemotePartition)
	}
	c, err := newConn(fc.(*net.UnixConn), kind, n.Conn, remote, n.Ring)
	if err != nil {
		fc.Close()
		return nil, l.opErr(err)
	}
	return c, nil
}

// noticeErr names why the notices stopped: the socket closed or failed
// (the agent went away), or the agent sent something that is not a
// notice.
func noticeErr(err error) error {
	var oe *net.OpError
	switch {
	case errors.Is(err, io.EOF) || err.Error() == "agent closed the listener":
		return &Error{Code: ErrAgentGone.Code, Message: "the agent closed the listening socket: it stopped or died", cause: err}
	case errors.As(err, &oe):
		return &Error{Code: ErrAgentGone.Code, Message: "the listening socket failed (" + errText(err) + "): the agent stopped or died", cause: err}
	}
	return &Error{Code: ErrProtocol.Code, Message: err.Error(), cause: err}
}

func (l *Listener) opErr(err error) error {
	return &OpError{Op: "accept", Addr: l.addr.String(), Err: err}
}

// Close stops listening; channels already accepted go on. An Accept in
// progress returns an error matching net.ErrClosed.
func (l *Listener) Close() error {
	if l.closed.Swap(true) {
		return &OpError{Op: "close", Addr: l.addr.String(), Err: net.ErrClosed}
	}
	err := l.c.Close()
	l.mu.Lock()
	l.nr.Close()
	l.mu.Unlock()
	if err != nil {
		return &OpError{Op: "close", Addr: l.addr.String(), Err: err}
	}
	return nil
}

// Addr returns node/partition/service.
func (l *Listener) Addr() net.Addr { return l.addr }

var _ net.Listener = (*Listener)(nil)
