package agent

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/link"
)

// peer is one row of the peer table; fields are guarded by Agent.mu.
type peer struct {
	name, addr string
	link       *link.Link // the up link, or nil
	state      string
	since      time.Time
	lastErr    string
	changed    chan struct{}           // closed and replaced at every state change
	carrier    *peerCarrier            // carries the channels to this peer
	instance   [link.InstanceSize]byte // of the peer's agent, as its last link said
	grace      *time.Timer             // running while channels wait for a link

	// traffic of links already closed
	framesOut, bytesOut, framesIn, bytesIn uint64
}

const (
	stateDown       = "down"
	stateConnecting = "connecting"
	stateUp         = "up"
)

func newPeer(name, addr string) *peer {
	return &peer{name: name, addr: addr, state: stateDown, since: time.Now(), changed: make(chan struct{})}
}

func (p *peer) setState(s, lastErr string) {
	if s != p.state {
		p.state = s
		p.since = time.Now()
	}
	if lastErr != "" {
		p.lastErr = lastErr
	}
	close(p.changed)
	p.changed = make(chan struct{})
}

// initiatorName names the node that dialed l.
func (a *Agent) initiatorName(l *link.Link) string {
	if l.Initiator() {
		return a.cfg.Node
	}
	return l.Peer().Name
}

// register makes l its peer's link, or says why not. There is one link per
// peer pair, and both agents must pick the same one without talking:
//
//   - a link from a new instance of the peer (it restarted) replaces the old;
//   - of two links between the same instances dialed by different sides
//     (both dialed at once), the one the lesser node name dialed wins;
//   - of two dialed by the same side, the newer wins: that side dialed again
//     because it found the old link dead.
func (a *Agent) register(l *link.Link) (reason string, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopping {
		return "agent " + a.cfg.Node + " is shutting down", false
	}
	p := a.peers[l.Peer().Name]
	if cur := p.link; cur != nil {
		if cur.PeerInstance() == l.PeerInstance() {
			ci, ni := a.initiatorName(cur), a.initiatorName(l)
			if ci != ni && ci < ni {
				return "a link between these agents is already up (dialed by " + ci + ")", false
			}
		}
		a.retire(p, cur)
		a.goRun(func() { cur.Retire("replaced by a newer link") }) // it writes: not under a.mu
	}
	if p.grace != nil {
		p.grace.Stop()
		p.grace = nil
	}
	if p.instance != l.PeerInstance() {
		if p.instance != ([link.InstanceSize]byte{}) {
			// The peer restarted: the channels it held are gone with it.
			a.goRun(func() { a.abortPeer(p, "the agent of "+p.name+" restarted and lost the channel") })
		}
		p.instance = l.PeerInstance()
	} else {
		a.goRun(func() { a.resumePeer(p) })
	}
	p.link = l
	p.setState(stateUp, "")
	a.log.Info("peer link up", "peer", p.name, "remote", l.RemoteAddr().String(), "initiator", l.Initiator(),
		"cert_expires", l.Peer().NotAfter)
	return "", true
}

// unregister removes l from the peer table if it is still its peer's link.
func (a *Agent) unregister(l *link.Link) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.peers[l.Peer().Name]
	if p == nil || p.link != l {
		return
	}
	a.retire(p, l)
	p.link = nil
	msg := ""
	if err := l.Err(); err != nil {
		msg = err.Error()
	}
	p.setState(stateDown, msg)
	a.holdPeer(p, msg)
}

// retire adds a closing link's counters to its peer's totals.
func (a *Agent) retire(p *peer, l *link.Link) {
	s := l.Stats()
	p.framesOut += s.FramesOut.Load()
	p.bytesOut += s.BytesOut.Load()
	p.framesIn += s.FramesIn.Load()
	p.bytesIn += s.BytesIn.Load()
}

func (a *Agent) closeLinks(reason string) {
	a.mu.Lock()
	a.stopping = true // a handshake that ends after this is refused (register)
	var ls []*link.Link
	for _, p := range a.peers {
		if p.link != nil {
			ls = append(ls, p.link)
		}
	}
	a.mu.Unlock()
	for _, l := range ls {
		l.Shutdown(reason)
	}
}

// dialLoop keeps a link to p: while none is up it dials, with exponential
// backoff and jitter between failures. Of two agents, the one with the
// lesser name dials at once and the other gives it a moment first, so that
// both seldom dial at the same time: a second link would replace the first
// and end the channels on it.
func (a *Agent) dialLoop(ctx context.Context, p *peer) {
	t := a.cfg.Timers
	backoff := t.DialMin
	yield := a.cfg.Node > p.name
	for {
		a.mu.Lock()
		up, changed := p.link != nil, p.changed
		if !up {
			p.setState(stateConnecting, "")
		}
		a.mu.Unlock()
		if up {
			yield = a.cfg.Node > p.name
			select {
			case <-changed:
				continue
			case <-ctx.Done():
				return
			}
		}
		if yield {
			yield = false
			select {
			case <-time.After(t.Handshake / 4):
				continue
			case <-ctx.Done():
				return
			}
		}

		err := a.dialPeer(ctx, p)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = t.DialMin
			continue
		}
		a.mu.Lock()
		if p.link == nil {
			p.setState(stateDown, err.Error())
		}
		a.mu.Unlock()
		a.log.Info("peer dial failed", "peer", p.name, "address", p.addr, "err", err, "retry_in", backoff)
		// Full jitter over the upper half, so agents that lost each other at
		// once do not redial in step.
		sleep := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-time.After(sleep):
		case <-ctx.Done():
			return
		}
		backoff = min(backoff*2, t.DialMax)
	}
}

// rekeyLoop replaces p's link by a fresh one — a new handshake, new
// session keys — when it is older than timers.rekey or has carried
// limits.rekey_frames frames. The side that dialed the link dials its
// successor, so the two never rekey at once; the channels move to the new
// link as on any resume, and the old one is retired, its keys dropped.
func (a *Agent) rekeyLoop(ctx context.Context, p *peer) {
	t := time.NewTicker(max(a.cfg.Timers.Rekey/8, 20*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.mu.Lock()
		l := p.link
		a.mu.Unlock()
		if l == nil || !l.Initiator() {
			continue
		}
		s := l.Stats()
		if time.Since(l.Started()) < a.cfg.Timers.Rekey && s.FramesOut.Load()+s.FramesIn.Load() < uint64(a.cfg.Limits.RekeyFrames) {
			continue
		}
		if err := a.dialPeer(ctx, p); err != nil {
			a.log.Info("link rekey failed; the old link goes on", "peer", p.name, "err", err)
			continue
		}
		a.counters.rekeys.Add(1)
		a.log.Debug("link rekeyed", "peer", p.name)
	}
}

// dialPeer makes one attempt to link to p.
func (a *Agent) dialPeer(ctx context.Context, p *peer) error {
	d := net.Dialer{Timeout: a.cfg.Timers.Handshake}
	conn, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return err
	}
	l, err := link.Dial(conn, a.linkConfig(), p.name)
	if err != nil {
		return err
	}
	if reason, ok := a.register(l); !ok {
		l.Shutdown(reason)
		return nil
	}
	a.goRun(func() { a.serve(l) })
	return nil
}

// peerRows returns the peer table, sorted by peer name.
func (a *Agent) peerRows() []admin.PeerRow {
	a.mu.Lock()
	defer a.mu.Unlock()
	rows := make([]admin.PeerRow, 0, len(a.peers))
	for _, p := range a.peers {
		r := admin.PeerRow{
			Peer: p.name, Address: p.addr, State: p.state, Since: p.since, LastError: p.lastErr,
			FramesOut: p.framesOut, BytesOut: p.bytesOut, FramesIn: p.framesIn, BytesIn: p.bytesIn,
		}
		if l := p.link; l != nil {
			s := l.Stats()
			r.FramesOut += s.FramesOut.Load()
			r.BytesOut += s.BytesOut.Load()
			r.FramesIn += s.FramesIn.Load()
			r.BytesIn += s.BytesIn.Load()
			r.CertExpiry = l.Peer().NotAfter
			r.CertWarning = expiryWarning(l.Peer(), time.Now())
			if l.Initiator() {
				r.NextRekey = l.Started().Add(a.cfg.Timers.Rekey)
			}
			r.Initiator = l.Initiator()
		}
		rows = append(rows, r)
	}
	slices.SortFunc(rows, func(x, y admin.PeerRow) int {
		if x.Peer < y.Peer {
			return -1
		}
		if x.Peer > y.Peer {
			return 1
		}
		return 0
	})
	return rows
}

func (a *Agent) handleAdmin(req admin.Request) *admin.Response {
	switch req.Op {
	case "peers":
		return &admin.Response{OK: true, Node: a.cfg.Node, Peers: a.peerRows()}
	case "conns":
		rows := []admin.ConnRow{}
		for _, ch := range a.tables.all() {
			rows = append(rows, ch.adminRow())
		}
		slices.SortFunc(rows, func(x, y admin.ConnRow) int { return cmp.Compare(x.ID, y.ID) })
		return &admin.Response{OK: true, Node: a.cfg.Node, Conns: rows}
	case "stats":
		return &admin.Response{OK: true, Node: a.cfg.Node, Counters: a.counters.snapshot()}
	}
	return admin.Fail("unknown_op", fmt.Sprintf("unknown op %.40q; this agent knows: peers, conns, stats", req.Op))
}
