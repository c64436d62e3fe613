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
// Every error is an *OpError naming the operation (a net.Error), wrapping
// an *Error that errors.Is matches against the Err… values by code, or
// os.ErrDeadlineExceeded, or net.ErrClosed: see errors.go. How a Conn keeps
// the net.Conn contract across deadlines and Close is drawn in conn.go.
package sinc

import (
	"context"

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

// Addr is a sinc address, node/partition/service.
type Addr string

func (Addr) Network() string  { return "sinc" }
func (a Addr) String() string { return string(a) }

// Dialer opens channels. Its zero value dials stream channels through the
// socket named by SINC_SOCKET.
type Dialer struct {
	Socket string // the partition socket; "" for $SINC_SOCKET
	Kind   Kind
	// NoRing keeps the channel's data on its socket instead of a ring
	// shared with the agent (ring.go); so does SINC_NO_RING=1.
	NoRing bool
}

// Dial opens a stream channel to addr (node/partition/service).
func Dial(addr string) (*Conn, error) {
	return (&Dialer{}).DialContext(context.Background(), addr)
}

// DialContext opens a channel to addr. ctx bounds the open; once open, the
// channel does not depend on ctx. An agent that answers busy is asked
// again, after a jittered backoff from 2 ms doubling to 200 ms, until ctx
// ends, or for at most 10 s when ctx has no deadline; then the last busy
// answer is returned. No other answer is retried.
func (d *Dialer) DialContext(ctx context.Context, addr string) (*Conn, error) {
	req := &local.Request{Op: local.OpOpen, To: addr, Kind: d.Kind.String(), Ring: !d.NoRing && ringDefault()}
	c, resp, err := request(ctx, d.Socket, req)
	if err != nil {
		return nil, &OpError{Op: "dial", Addr: addr, Err: err}
	}
	cn, err := newConn(c, d.Kind, resp.Conn, Addr(addr), resp.Ring)
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
