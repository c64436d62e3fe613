package agent

import (
	"errors"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/wire"
)

// codeLinkLost is what a process is told when its channel's link is gone.
const codeLinkLost = wire.CodeReset

// peerCarrier carries a channel's frames over the current link to a peer.
type peerCarrier struct {
	a *Agent
	p *peer
}

var errNoLink = errors.New("no link to the peer")

func (c *peerCarrier) name() string { return c.p.name }

func (c *peerCarrier) link() *link.Link {
	c.a.mu.Lock()
	defer c.a.mu.Unlock()
	return c.p.link
}

func (c *peerCarrier) sendControl(msg []byte) error {
	l := c.link()
	if l == nil {
		return errNoLink
	}
	return l.Send(msg)
}

func (c *peerCarrier) sendData(frame []byte) error {
	l := c.link()
	if l == nil {
		return errNoLink
	}
	return l.SendData(frame)
}

// selfCarrier carries the frames of a channel between two partitions of
// this agent: straight into its own receiving side, through the same
// checks as frames from a peer.
type selfCarrier struct{ a *Agent }

func (c *selfCarrier) name() string { return c.a.cfg.Node }

func (c *selfCarrier) sendControl(msg []byte) error {
	return c.a.handleControl(c, msg)
}

func (c *selfCarrier) sendData(frame []byte) error {
	c.a.handleData(c, frame)
	return nil
}

// carrierOf returns the carrier of the peer behind l.
func (a *Agent) carrierOf(l *link.Link) carrier {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p := a.peers[l.Peer().Name]; p != nil {
		return p.carrier
	}
	return deadCarrier(l.Peer().Name)
}

// deadCarrier answers for a node that is not a peer: nothing gets through.
type deadCarrier string

func (c deadCarrier) name() string               { return string(c) }
func (c deadCarrier) sendControl(_ []byte) error { return errNoLink }
func (c deadCarrier) sendData(_ []byte) error    { return errNoLink }

// abortPeer ends every channel carried by car, for reason.
func (a *Agent) abortPeer(car carrier, reason string) {
	n := 0
	for _, ch := range a.tables.all() {
		if ch.carrier == car {
			ch.abort(codeLinkLost, reason, false)
			n++
		}
	}
	if n > 0 {
		a.log.Info("channels ended", "peer", car.name(), "count", n, "reason", reason)
	}
}
