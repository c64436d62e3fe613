package agent

import (
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/wire"
)

// codeLinkLost is what a process is told when its channel's link is gone.
const codeLinkLost = wire.CodeReset

// A channel is bound to the carrier it opened on: one peer link, or this
// agent itself. Frames of the channel are accepted only from that carrier,
// and when the link ends its channels end with it, on both agents alike.

// linkCarrier carries channels over one peer link.
type linkCarrier struct {
	l *link.Link
}

func (c *linkCarrier) name() string                 { return c.l.Peer().Name }
func (c *linkCarrier) sendControl(msg []byte) error { return c.l.Send(msg) }
func (c *linkCarrier) sendData(frame []byte) error  { return c.l.SendData(frame) }

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

// carrierOf returns the carrier of link l, or nil once the link has ended.
func (a *Agent) carrierOf(l *link.Link) carrier {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.carriers[l]; c != nil {
		return c
	}
	return nil
}

// dropCarrier ends every channel carried by l, for reason.
func (a *Agent) dropCarrier(l *link.Link, reason string) {
	a.mu.Lock()
	c := a.carriers[l]
	delete(a.carriers, l)
	a.mu.Unlock()
	if c == nil {
		return
	}
	n := 0
	for _, ch := range a.tables.all() {
		if ch.carrier == carrier(c) {
			ch.abort(codeLinkLost, reason, false)
			n++
		}
	}
	if n > 0 {
		a.log.Info("channels ended with their link", "peer", c.name(), "count", n, "reason", reason)
	}
}
