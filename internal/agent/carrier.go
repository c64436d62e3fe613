package agent

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/wire"
)

// A channel is bound to a peer agent — one node, one instance of its agent
// — and rides whichever link to it is up. Frames of the channel are
// accepted only from links to that peer. When the link breaks, the channel
// is held until timers.grace has passed since the last frame heard from the
// peer (keepalives count): a new link to the same instance resumes it (each
// side sends again what the other may have lost); a link to a new instance
// (the peer restarted, losing its channels) or the end of the grace period
// ends it with a reason the process sees.

// peerCarrier carries channels to one peer over its current link.
type peerCarrier struct {
	a       *Agent
	p       *peer
	bud     *memBudget    // the peer's part of the memory budget
	pending chan struct{} // one token per open of the peer's being accepted
	answers chan struct{} // one token per reply being written
}

func (a *Agent) newPeerCarrier(p *peer) *peerCarrier {
	return &peerCarrier{a: a, p: p, bud: a.peerBudget(), pending: make(chan struct{}, maxAccepting),
		answers: make(chan struct{}, maxReplies)}
}

func (c *peerCarrier) budget() *memBudget     { return c.bud }
func (c *peerCarrier) opens() chan struct{}   { return c.pending }
func (c *peerCarrier) replies() chan struct{} { return c.answers }

// maxReplies bounds the answers to one peer being written at once (reply).
const maxReplies = 64

// reply sends msg, an answer to a frame of the peer's — a refusal, a Close
// for a channel this agent no longer has — off the link's reading
// goroutine, which must not wait for the peer to read: the peer's reader
// may be writing to us. A peer that sends such frames faster than it reads
// the answers has at most maxReplies of them being written; the rest are
// dropped and counted (its opens then time out, as when a frame is lost),
// so it cannot pile up goroutines.
func (a *Agent) reply(car carrier, msg []byte) {
	a.answer(car.replies(), func() { car.sendControl(msg) })
}

// answer runs send on a goroutine of its own if a token of tokens is free,
// and gives the token back when send returns; with none free it drops the
// answer and counts it (reply).
func (a *Agent) answer(tokens chan struct{}, send func()) {
	select {
	case tokens <- struct{}{}:
	default:
		a.counters.refuse("reply_backlog")
		return
	}
	a.goRun(func() {
		send()
		<-tokens
	})
}

var errNoLink = errors.New("no link to the peer")

func (c *peerCarrier) name() string { return c.p.name }

func (c *peerCarrier) link() *link.Link {
	c.a.mu.Lock()
	defer c.a.mu.Unlock()
	return c.p.link
}

func (c *peerCarrier) sendControl(msg []byte) error {
	if l := c.link(); l != nil {
		return l.Send(msg)
	}
	return errNoLink
}

func (c *peerCarrier) sendData(frame []byte) error {
	if l := c.link(); l != nil {
		return l.SendData(frame)
	}
	return errNoLink
}

// selfCarrier carries the frames of a channel between two partitions of
// this agent: straight into its own receiving side, through the same
// checks as frames from a peer.
type selfCarrier struct {
	a       *Agent
	bud     *memBudget
	pending chan struct{}
	answers chan struct{}
}

func (c *selfCarrier) budget() *memBudget     { return c.bud }
func (c *selfCarrier) opens() chan struct{}   { return c.pending }
func (c *selfCarrier) replies() chan struct{} { return c.answers }

func (c *selfCarrier) name() string { return c.a.cfg.Node }

func (c *selfCarrier) sendControl(msg []byte) error {
	return c.a.handleControl(c, msg)
}

func (c *selfCarrier) sendData(frame []byte) error {
	c.a.handleData(c, frame)
	return nil
}

// carrierOf returns the carrier of the peer behind l, or nil if l is a link
// to an instance of the peer that is no longer the current one.
func (a *Agent) carrierOf(l *link.Link) carrier {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.peers[l.Peer().Name]
	if p == nil || p.instance != l.PeerInstance() {
		return nil
	}
	return p.carrier
}

// channelsOf returns the channels carried to p.
func (a *Agent) channelsOf(p *peer) []*channel {
	var out []*channel
	for _, ch := range a.tables.all() {
		if ch.carrier == carrier(p.carrier) {
			out = append(out, ch)
		}
	}
	return out
}

// abortPeer ends every channel carried to p, for reason.
func (a *Agent) abortPeer(p *peer, reason string) {
	chs := a.channelsOf(p)
	for _, ch := range chs {
		ch.abort(codeLinkLost, reason, false)
	}
	if len(chs) > 0 {
		a.log.Info("channels ended", "peer", p.name, "count", len(chs), "reason", reason)
	}
}

// codeLinkLost is what a process is told when its channel's peer is lost.
const codeLinkLost = wire.CodeReset

// resumePeer sends again, on p's new link, what its channels may have lost.
func (a *Agent) resumePeer(p *peer) {
	// A channel still opening has sent and received nothing yet: its Open
	// and the answer go on whichever link is up, and it has no ids of the
	// peer's to name in a Credit.
	chs := slices.DeleteFunc(a.channelsOf(p), func(ch *channel) bool {
		ch.mu.Lock()
		defer ch.mu.Unlock()
		return ch.state.status != statusOpen
	})
	for _, ch := range chs {
		a.goRun(ch.resume)
	}
	if len(chs) > 0 {
		a.counters.resumes.Add(uint64(len(chs)))
		a.log.Info("channels resumed", "peer", p.name, "count", len(chs))
	}
}

// holdPeer starts the grace period of p's channels after its link broke:
// they end timers.grace after the last frame heard from p (p.heard), not
// after the link was found broken, which for a silent peer is dead_after
// later. A link found dead after that time ends them at once. Called with
// a.mu held.
func (a *Agent) holdPeer(p *peer, why string) {
	grace := a.cfg.Timers.Grace
	if p.grace != nil {
		p.grace.Stop()
	}
	p.grace = time.AfterFunc(time.Until(p.heard.Add(grace)), func() {
		a.mu.Lock()
		back := p.link != nil
		a.mu.Unlock()
		if back {
			return
		}
		a.counters.graceExpired.Add(1)
		a.abortPeer(p, fmt.Sprintf("the link to %s was lost (%s) and did not come back within %s of the last frame heard from it", p.name, why, grace))
	})
}
