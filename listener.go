package sinc

import (
	"context"
	"net"
	"sync"

	"sinc.dev/sinc/internal/local"
)

// Listener accepts the channels opened to a service. It is a net.Listener.
type Listener struct {
	c    *net.UnixConn
	addr Addr

	mu sync.Mutex // serializes Accept
	nr *local.NoticeReader
}

// ListenConfig configures Listen.
type ListenConfig struct {
	Socket string // the partition socket; "" for $SINC_SOCKET
}

// Listen listens on service in the partition of $SINC_SOCKET.
func Listen(service string) (*Listener, error) {
	return (&ListenConfig{}).Listen(context.Background(), service)
}

// Listen listens on service; ctx bounds the request, not the listener.
func (lc *ListenConfig) Listen(ctx context.Context, service string) (*Listener, error) {
	c, resp, err := request(ctx, lc.Socket, &local.Request{Op: local.OpListen, Service: service})
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
	n, f, err := l.nr.Next()
	if err != nil {
		return nil, &OpError{Op: "accept", Addr: l.addr.String(), Err: err}
	}
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, &OpError{Op: "accept", Addr: l.addr.String(), Err: err}
	}
	kind := Stream
	if n.Conn != nil && n.Conn.Kind == local.KindMessage {
		kind = Message
	}
	var remote Addr
	if n.Conn != nil {
		remote = Addr(n.Conn.RemoteNode + "/" + n.Conn.RemotePartition)
	}
	c, err := newConn(fc.(*net.UnixConn), kind, n.Conn, remote)
	if err != nil {
		fc.Close()
		return nil, &OpError{Op: "accept", Addr: l.addr.String(), Err: err}
	}
	return c, nil
}

// Close stops listening; channels already accepted go on.
func (l *Listener) Close() error {
	err := l.c.Close()
	l.mu.Lock()
	l.nr.Close()
	l.mu.Unlock()
	return err
}

// Addr returns node/partition/service.
func (l *Listener) Addr() net.Addr { return l.addr }

var _ net.Listener = (*Listener)(nil)
