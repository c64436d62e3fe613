package agent

import (
	"context"
	"fmt"
	"time"

	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/registry"
	"sinc.dev/sinc/internal/wire"
)

// Links on demand (docs/design.md, section 12), when the registry says so (etcd): a node in
// the registry costs this agent its registry.Node and nothing else — no
// peer, no carrier, no goroutine, no timer. It enters the peer table when
// a channel needs it:
//
//	dial     a process opens a channel to it: peerFor makes the peer, whose
//	         dial loop dials at once, and the open waits for the handshake
//	         as any open waits for a connecting peer (waitLink, bounded by
//	         timers.open)
//	accept   its agent links to this one: the handshake checked its record
//	         (checkRecord), and register makes the peer
//
// and leaves it (dropPeer) once nothing needs it — no channel, no open
// under way, no link:
//
//	idle     the link carried no channel for timers.link_idle: the side
//	         that dialed it asks the other (wire.Idle); on yes both forget
//	         the link, the asking side closes it, and neither dials again
//	down     the link broke and no channel waits for it: nobody redials
//	grace    the link broke, its channels waited timers.grace, and ended
//	gone     the node's record left the registry: a new channel to it is
//	         answered node_unreachable at once (peerFor), a link without
//	         channels is closed at once; channels on an up link are kept
//	         while it stays up — an etcd hiccup must not become an outage —
//	         but a link that breaks is not dialed again
//
// The race this guards against is an open crossing the close. An open
// raises peer.users under a.mu before it looks at the link and lowers it
// once its channel is in the tables; the sweep reads users and the
// channel count under a.mu, so it asks only when no open of this side
// can be on its way to the link. The other side answers yes only on the
// same condition of its own, and after a yes its opens take a new link.
// An open of this side that comes while the question is out waits for the
// answer (waitLink): on yes the dial loop links again for it.

// reasonIdle is what an idle link's close tells the peer.
const reasonIdle = "idle: the link carried no channel for timers.link_idle"

// peerFor returns the peer a channel to node goes to and a release func
// the caller calls once its open is over (its channel in the tables, or
// failed). In static mode that is the configured peer; with links on
// demand, the peer is made if the registry knows the node. ok false says
// the node is not known: code and why say how to answer.
func (a *Agent) peerFor(node string) (p *peer, release func(), code wire.Code, why string) {
	if !a.lazy {
		a.mu.Lock()
		p = a.peers[node]
		a.mu.Unlock()
		if p == nil {
			return nil, nil, wire.CodeNoSuchNode, fmt.Sprintf("node %q is not a peer of %s", node, a.cfg.Node)
		}
		return p, func() {}, wire.CodeOK, ""
	}
	n, ok := a.reg.Lookup(node)
	if !ok {
		return nil, nil, wire.CodeUnreachable, fmt.Sprintf("node %q is unreachable: it has no record in the registry (its agent is not running, or not registered)", node)
	}
	a.mu.Lock()
	p = a.peers[node]
	if p == nil {
		p = a.addLazyPeer(n)
	}
	p.users++
	a.mu.Unlock()
	return p, func() {
		a.mu.Lock()
		p.users--
		p.touch()
		a.maybeDrop(p)
		a.mu.Unlock()
	}, wire.CodeOK, ""
}

// addLazyPeer enters node n in the peer table and starts linking to it.
// Called with a.mu held.
func (a *Agent) addLazyPeer(n registry.Node) *peer {
	p := newPeer(n.Name, n.Addresses[0])
	p.carrier = a.newPeerCarrier(p)
	p.touch()
	a.peers[n.Name] = p
	a.startPeer(p)
	a.log.Debug("peer linking on demand", "peer", n.Name)
	return p
}

// touch marks p as used now: its link's idle time starts again.
func (p *peer) touch() { p.lastUse.Store(time.Now().UnixNano()) }

// unused says whether nothing of this agent needs p's link now: no open
// under way, no channel, no question of idleness out. Called with a.mu
// held.
func (a *Agent) unused(p *peer) bool {
	return p.users == 0 && p.closing == nil && a.tables.count(p.name) == 0
}

// maybeDrop takes p out of the table if links are on demand and nothing
// needs it: no link, nothing unused says. Called with a.mu held.
func (a *Agent) maybeDrop(p *peer) {
	if a.lazy && a.peers[p.name] == p && p.link == nil && p.prev == nil && a.unused(p) {
		a.dropPeer(p)
	}
}

// dropPeer takes p out of the table and stops its loops: the node is
// known (or not) to the registry only. Called with a.mu held.
func (a *Agent) dropPeer(p *peer) {
	if a.peers[p.name] == p {
		delete(a.peers, p.name)
	}
	if p.stop != nil {
		p.stop()
	}
	if p.grace != nil {
		p.grace.Stop()
		p.grace = nil
	}
	p.setState(stateDown, "")
	a.log.Debug("peer unlinked", "peer", p.name)
}

// detach takes l, p's link, away from p and drops p if nothing else needs
// it, with reason as the peer's last state. Called with a.mu held.
func (a *Agent) detach(p *peer, l *link.Link) {
	if p.link != l {
		return
	}
	a.retire(p, l)
	p.link = nil
	p.heard = l.LastHeard()
	st := stateDown
	if p.users > 0 {
		st = stateConnecting // an open waits: the dial loop links again
	}
	p.setState(st, "")
	a.maybeDrop(p)
}

// linkSweep runs sweepLinks every quarter of timers.link_idle (at most a
// second apart).
func (a *Agent) linkSweep(ctx context.Context) {
	every := min(max(a.cfg.Timers.LinkIdle/4, 10*time.Millisecond), time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			a.sweepLinks(now)
		}
	}
}

// sweepLinks asks the peer of each link this agent dialed that has been
// idle for timers.link_idle whether it may close, closes at once the idle
// links of nodes gone from the registry, gives up on questions not
// answered within timers.handshake, and drops peers nothing needs.
func (a *Agent) sweepLinks(now time.Time) {
	type closing struct {
		l      *link.Link
		reason string
	}
	var asks []*link.Link
	var closes []closing
	a.mu.Lock()
	for _, p := range a.peers {
		if p.closing != nil {
			if now.Sub(p.closingAt) > a.cfg.Timers.Handshake {
				a.log.Info("idle link: the peer did not answer; keeping the link", "peer", p.name)
				p.closing = nil
				p.touch()
				p.setState(p.state, "")
			}
			continue
		}
		if !a.unused(p) {
			continue
		}
		l := p.link
		if l == nil {
			a.maybeDrop(p)
			continue
		}
		if _, ok := a.reg.Lookup(p.name); !ok {
			reason := fmt.Sprintf("node %s is gone from the registry", p.name)
			a.detach(p, l)
			closes = append(closes, closing{l, reason})
			continue
		}
		if !l.Initiator() || p.prev != nil || now.Sub(time.Unix(0, p.lastUse.Load())) < a.cfg.Timers.LinkIdle {
			continue
		}
		p.closing, p.closingAt = l, now
		asks = append(asks, l)
	}
	a.mu.Unlock()
	ask := (&wire.Idle{Step: wire.IdleAsk}).Marshal()
	for _, l := range asks {
		a.goRun(func() { l.Send(ask) })
	}
	for _, c := range closes {
		a.log.Info("peer link closed", "peer", c.l.Peer().Name, "reason", c.reason)
		a.goRun(func() { c.l.Shutdown(c.reason) })
	}
}

// handleIdle answers a step of closing the idle link l.
func (a *Agent) handleIdle(l *link.Link, msg []byte) error {
	m, err := wire.ParseIdle(msg)
	if err != nil {
		return err
	}
	name := l.Peer().Name
	a.mu.Lock()
	p := a.peers[name]
	if p != nil && p.link != l && p.prev != l {
		p = nil // a link of the peer that is not in use here
	}
	switch m.Step {
	case wire.IdleAsk:
		yes := a.lazy && !l.Initiator() && (p == nil || p.link == l && p.prev == nil && a.unused(p))
		if p != nil && yes {
			a.detach(p, l)
		}
		a.mu.Unlock()
		answer := wire.IdleNo
		if yes {
			answer = wire.IdleYes
			a.log.Info("peer link closing: idle", "peer", name, "asked_by", name)
		}
		// Bounded as every answer to a peer is (reply): a peer that asks
		// again and again while it reads nothing holds at most
		// maxReplies answers being written.
		tokens := a.strays
		if p != nil {
			tokens = p.carrier.replies()
		}
		reply := (&wire.Idle{Step: answer}).Marshal()
		a.answer(tokens, func() { l.Send(reply) })
	case wire.IdleYes:
		// The peer sends nothing more on l: take it away whatever this
		// side thought, and close it.
		if p != nil {
			if p.closing == l {
				p.closing = nil
			}
			a.detach(p, l)
		}
		a.mu.Unlock()
		a.log.Info("peer link closed", "peer", name, "reason", reasonIdle)
		a.goRun(func() { l.Shutdown(reasonIdle) })
	case wire.IdleNo:
		if p != nil && p.closing == l {
			p.closing = nil
			p.touch()
			p.setState(p.state, "")
		}
		a.mu.Unlock()
	}
	return nil
}

// nodeGone is the registry telling that node's record is gone: an unused
// link to it is closed now (the sweep would at its next round); channels
// on an up link stay while it is up.
func (a *Agent) nodeGone(node string) {
	a.mu.Lock()
	p := a.peers[node]
	if p == nil {
		a.mu.Unlock()
		return
	}
	l := p.link
	chans := a.tables.count(node)
	if l == nil || !a.unused(p) {
		a.mu.Unlock()
		if chans > 0 {
			a.log.Info("node gone from the registry; its channels stay while their link is up", "peer", node, "channels", chans)
		}
		return
	}
	a.detach(p, l)
	a.mu.Unlock()
	reason := fmt.Sprintf("node %s is gone from the registry", node)
	a.log.Info("peer link closed", "peer", node, "reason", reason)
	a.goRun(func() { l.Shutdown(reason) })
}
