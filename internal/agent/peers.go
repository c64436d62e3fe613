package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/buildinfo"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/local"
)

// peer is one row of the peer table; fields are guarded by Agent.mu.
//
// The table changes on reload (reloadPeers): a peer added starts its own
// dial and rekey loops, under a context of its own; a peer removed has them
// stopped, its channels ended and its links closed, and is taken out of
// a.peers, so that everything that finds peers by name (dial, adopt,
// carrierOf) no longer finds it.
type peer struct {
	name, addr string
	link       *link.Link // the up link, or nil
	// prev is the link that link replaced, while the peer, which dialed
	// link, has not yet retired it (see register): it still carries what
	// the peer sent before it switched, and is fallen back on if link
	// fails first.
	prev     *link.Link
	state    string
	since    time.Time
	lastErr  string
	changed  chan struct{}           // closed and replaced at every state change
	carrier  *peerCarrier            // carries the channels to this peer
	instance [link.InstanceSize]byte // of the peer's agent, as its last link said
	heard    time.Time               // the last frame read from the peer, as of its last link that closed
	grace    *time.Timer             // running while channels wait for a link
	stop     context.CancelFunc      // ends the dial and rekey loops; nil until they run

	// With links on demand (lazylink.go): opens of this agent's under
	// way to the peer (from peerFor until their channel is in the
	// tables), the link asked to close as idle and when, and when the
	// link last carried a channel or an open (unix nanoseconds; read by
	// the sweep without a.mu).
	users     int
	dialing   bool // the dial loop dials, no link being up (see register)
	closing   *link.Link
	closingAt time.Time
	lastUse   atomic.Int64
	// cert is the peer's certificate as read from the registry and
	// checked, when a dial last needed it (registry.go).
	cert *cert.Certificate

	// What happened to the peer's links: handshakes this agent began,
	// links that became the peer's link, and falls from up to another
	// state. A rekey adds one dial (on one side) and one up (on each).
	dials, ups, downs uint64

	// traffic of links already closed
	framesOut, bytesOut, framesIn, bytesIn uint64
}

// The states of a peer. A process that dials a node whose peer is down is
// answered at once; one that dials a connecting peer waits for the dial
// (see waitLink).
const (
	stateDown       = "down"       // no link, and the dial loop waits out its backoff
	stateConnecting = "connecting" // no link, and a dial is under way or about to start
	stateUp         = "up"
)

func newPeer(name, addr string) *peer {
	// The first dial is pending from the start.
	return &peer{name: name, addr: addr, state: stateConnecting, since: time.Now(), changed: make(chan struct{})}
}

func (p *peer) setState(s, lastErr string) {
	if s != p.state {
		if p.state == stateUp {
			p.downs++
		}
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

// register makes l its peer's link, or says why not; want, if not nil, is
// the peer a dial of this agent meant (it may have been removed or
// replaced by a reload meanwhile). There is one link per peer pair, and
// both agents must pick the same one without talking:
//
//   - a link from a new instance of the peer (it restarted) replaces the old;
//   - of two links between the same instances dialed by different sides
//     (both dialed at once), the one the lesser node name dialed wins;
//   - of two dialed by the same side, the newer wins: that side dialed again
//     because it found the old link dead, or to rekey.
//
// The old link of a replacement between the same instances is retired by
// the side that dialed the new one, once it has registered it: the other
// side only switches to the new link. Were the accepting side to retire
// the old link first, its close could reach the dialing side before the
// verdict on the new link, and look to it like a broken link: it would
// mark the peer down and dial once more. The accepting side confirms the
// new link here, before it becomes the peer's link, so that the verdict
// is the first frame on it.
func (a *Agent) register(l *link.Link, want *peer) (reason string, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopping {
		return "agent " + a.cfg.Node + " is shutting down", false
	}
	name := l.Peer().Name
	p := a.peers[name]
	if p == nil && want == nil && a.lazy {
		// Linked to on demand: the handshake checked the node's record
		// (checkRecord), which must still be there.
		n, ok := a.reg.Lookup(name)
		if !ok {
			a.counters.refuse("not_in_registry")
			return fmt.Sprintf("node %q has no record in the registry", name), false
		}
		p = a.addLazyPeer(n)
	}
	if a.lazy && want != nil && p != want {
		// The peer this dial was for was dropped meanwhile (its last
		// link closed as idle, nothing needed it) and perhaps made anew
		// by an open. The node is the one dialed, and the other side has
		// confirmed the link and may already have sent opens on it:
		// refusing it now would lose them. Take it for the node's peer
		// as it is now, if the registry still knows the node.
		if p == nil {
			if n, ok := a.reg.Lookup(name); ok {
				p = a.addLazyPeer(n)
			}
		}
		want = p
	}
	if p == nil || want != nil && p != want {
		a.counters.refuse("peer_not_configured")
		return fmt.Sprintf("node %q is not a configured peer of %q", name, a.cfg.Node), false
	}
	if a.revoked.Load().Revoked(l.Peer()) {
		// Revoked after its handshake checked it: applyRevocations may have
		// looked at the links already.
		return fmt.Sprintf("the certificate of %s is revoked", name), false
	}
	cur := p.link
	// A link asked to close as idle is on its way out: a new one, dialed
	// by an open that crossed the question, replaces it.
	same := cur != nil && cur.PeerInstance() == l.PeerInstance() && p.closing != cur
	if same {
		ci, ni := a.initiatorName(cur), a.initiatorName(l)
		if ci != ni && ci < ni {
			return reasonAlreadyUp + " (dialed by " + ci + ")", false
		}
	}
	if a.lazy && cur == nil && p.dialing && !l.Initiator() && a.cfg.Node < name {
		// Both sides dial at once, for opens of their own: the link this
		// agent dials, the lesser name's, is the one, on both sides. Were
		// this one taken here, opens could go on it before the other side
		// refused it for ours, and be lost with it.
		return reasonAlreadyUp + " (being dialed by " + a.cfg.Node + ")", false
	}
	if p.closing != nil {
		p.closing = nil
	}
	if !l.Initiator() {
		// A write of a few bytes on a fresh connection: it does not wait.
		if err := l.Confirm(); err != nil {
			return "confirm: " + err.Error(), false
		}
	}
	if old := p.prev; old != nil && !same {
		p.prev = nil
		a.retire(p, old)
		a.goRun(func() { old.Retire("the agent of " + name + " restarted") })
	}
	if cur != nil {
		if same && !l.Initiator() {
			p.prev = cur // the peer retires it
		} else {
			a.retire(p, cur)
			a.goRun(func() { cur.Retire("replaced by a newer link") }) // it writes: not under a.mu
		}
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
	p.ups++
	p.touch()
	p.setState(stateUp, "")
	a.log.Info("peer link up", "peer", p.name, "remote", l.RemoteAddr().String(), "initiator", l.Initiator(),
		"cert_expires", l.Peer().NotAfter)
	return "", true
}

// unregister removes l from the peer table; it reports whether l was its
// peer's link (and the peer is now without one). A link that was replaced
// and is now closing changes nothing.
func (a *Agent) unregister(l *link.Link) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.peers[l.Peer().Name]
	if p == nil {
		return false // removed from the configuration
	}
	if p.prev == l {
		p.prev = nil
		a.retire(p, l)
		return false
	}
	if p.link != l {
		return false
	}
	a.retire(p, l)
	msg := ""
	if err := l.Err(); err != nil {
		msg = err.Error()
	}
	if prev := p.prev; prev != nil && prev.Err() == nil && l.Stats().FramesIn.Load() == 0 {
		// The new link failed before the peer sent anything on it — its
		// dial failed after our verdict, so it never took the link and
		// will not retire the old one, which still works: go on with
		// it, sending again what the failed link may have lost. (A peer
		// that took the new link retires the old one; so does a peer
		// that closed the new one on purpose: its close is a frame.)
		p.link, p.prev = prev, nil
		p.setState(stateUp, "")
		a.goRun(func() { a.resumePeer(p) })
		a.log.Info("peer link failed; back on the link it was replacing", "peer", p.name, "reason", msg)
		return false
	}
	p.link = nil
	p.heard = l.LastHeard()
	state := stateDown
	if p.stop != nil {
		state = stateConnecting // the dial loop dials again at once
	}
	p.setState(state, msg)
	a.holdPeer(p, msg)
	a.maybeDrop(p) // on demand, and no channel waits for the link: nobody dials again
	return true
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
		for _, l := range []*link.Link{p.link, p.prev} {
			if l != nil {
				ls = append(ls, l)
			}
		}
	}
	a.mu.Unlock()
	for _, l := range ls {
		l.Shutdown(reason)
	}
}

// reasonAlreadyUp is how register refuses the second of two links dialed
// at once, the other way round.
const reasonAlreadyUp = "a link between these agents is already up"

// reloadPeers makes the peer table the configured one: peers added start
// linking; peers removed have their channels ended, telling both
// processes why, and their links closed; a changed address is used from
// the next dial on (a link up stays up).
func (a *Agent) reloadPeers(want map[string]config.Peer) {
	a.mu.Lock()
	if a.stopping {
		a.mu.Unlock()
		return
	}
	var gone []*peer
	for name, p := range a.peers {
		if _, ok := want[name]; !ok {
			gone = append(gone, p)
			continue
		}
		if addr := want[name].Address; addr != p.addr {
			a.log.Info("peer address changed; the next dial uses it", "peer", name, "was", p.addr, "address", addr)
			p.addr = addr
		}
	}
	for name, c := range want {
		if a.peers[name] != nil {
			continue
		}
		p := newPeer(name, c.Address)
		p.carrier = a.newPeerCarrier(p)
		a.peers[name] = p
		a.startPeer(p)
		a.log.Info("peer added", "peer", name, "address", c.Address)
	}
	for _, p := range gone {
		// Out of the table first: nothing finds it by name any more, so
		// no new channel is opened to it or accepted from it.
		delete(a.peers, p.name)
		if p.stop != nil {
			p.stop()
		}
		if p.grace != nil {
			p.grace.Stop()
			p.grace = nil
		}
	}
	a.mu.Unlock()
	for _, p := range gone {
		a.removePeer(p, fmt.Sprintf("node %s was removed from the configuration of %s", p.name, a.cfg.Node))
	}
}

// removePeer ends the channels of p, a peer just taken out of the table,
// and closes its links, all with reason. Each channel's Close goes on the
// link before the link's own close, so the peer ends the channel with the
// same reason at once rather than when its grace period runs out.
func (a *Agent) removePeer(p *peer, reason string) {
	chs := a.channelsOf(p)
	for _, ch := range chs {
		ch.end(&local.Error{Code: codeLinkLost.String(), Message: reason, By: a.cfg.Node}, true)
	}
	a.mu.Lock()
	links := []*link.Link{p.link, p.prev}
	for _, l := range links {
		if l != nil {
			a.retire(p, l)
		}
	}
	p.link, p.prev = nil, nil
	p.setState(stateDown, reason)
	a.mu.Unlock()
	for _, l := range links {
		if l != nil {
			l.Shutdown(reason)
		}
	}
	// A dial that found p before it left the table may have added a
	// channel since: there is no link to tell the peer on any more.
	for _, ch := range a.channelsOf(p) {
		ch.end(&local.Error{Code: codeLinkLost.String(), Message: reason, By: a.cfg.Node}, false)
	}
	a.log.Info("peer removed", "peer", p.name, "channels_ended", len(chs))
}

// startPeer runs p's dial and rekey loops under a context of their own,
// if the agent runs. Called with a.mu held.
func (a *Agent) startPeer(p *peer) {
	if a.runCtx == nil || a.stopping || p.stop != nil {
		return
	}
	ctx, cancel := context.WithCancel(a.runCtx)
	p.stop = cancel
	a.goRun(func() { a.dialLoop(ctx, p) })
	a.goRun(func() { a.rekeyLoop(ctx, p) })
}

// dialLoop keeps a link to p: while none is up it dials, with exponential
// backoff and jitter between failures. Of two agents, the one with the
// lesser name dials at once and the other gives it a moment first, so that
// both seldom dial at the same time: of two links dialed at once one is
// refused (register), its handshake wasted.
func (a *Agent) dialLoop(ctx context.Context, p *peer) {
	t := a.cfg.Timers
	backoff := t.DialMin
	// On demand, the first dial is for an open that waits: at once.
	yield := !a.lazy && a.cfg.Node > p.name
	for {
		a.mu.Lock()
		up, changed := p.link != nil, p.changed
		if !up && a.lazy && a.unused(p) {
			// Nothing waits for a link any more (the open that wanted it
			// gave up, the channels that waited ended).
			a.maybeDrop(p)
			a.mu.Unlock()
			return
		}
		if !up && ctx.Err() == nil {
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

		// dialing tells register, under a.mu, that a link of this side
		// may be on its way (see crossedDial).
		a.mu.Lock()
		up = p.link != nil
		p.dialing = !up
		a.mu.Unlock()
		if up {
			continue
		}
		err := a.dialPeer(ctx, p)
		a.mu.Lock()
		p.dialing = false
		a.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = t.DialMin
			continue
		}
		if a.lazy && errors.Is(err, link.ErrRefused) && strings.Contains(err.Error(), reasonAlreadyUp) {
			// Both sides dialed for opens at once; the other side's link
			// is the one: wait for it to register here.
			select {
			case <-changed:
			case <-time.After(t.Handshake):
			case <-ctx.Done():
				return
			}
			continue
		}
		a.mu.Lock()
		if p.link == nil {
			p.setState(stateDown, err.Error())
		}
		addr := p.addr
		a.mu.Unlock()
		a.log.Info("peer dial failed", "peer", p.name, "address", addr, "err", err, "retry_in", backoff)
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

// dialPeer makes one attempt to link to p, at its address as configured
// now, or with links on demand at the addresses of its registry record,
// in turn, once its certificate in the registry checks out (dialTargets).
func (a *Agent) dialPeer(ctx context.Context, p *peer) error {
	a.mu.Lock()
	addrs := []string{p.addr}
	p.dials++
	a.mu.Unlock()
	if a.lazy {
		var err error
		if addrs, err = a.dialTargets(ctx, p); err != nil {
			return err
		}
	}
	d := net.Dialer{Timeout: a.cfg.Timers.Handshake}
	var conn net.Conn
	var err error
	for _, addr := range addrs {
		if conn, err = d.DialContext(ctx, "tcp", addr); err == nil {
			a.mu.Lock()
			p.addr = addr
			a.mu.Unlock()
			break
		}
	}
	if err != nil {
		return err
	}
	l, err := link.Dial(conn, a.linkConfig(), p.name)
	if err != nil {
		return err
	}
	if reason, ok := a.register(l, p); !ok {
		l.Shutdown(reason)
		return nil
	}
	a.goRun(func() { a.serve(l) })
	return nil
}

// peerRows returns the peer table, sorted by peer name; with links on
// demand, the nodes the registry knows and this agent has no peer for
// are rows too, unlinked.
func (a *Agent) peerRows() []admin.PeerRow {
	a.mu.Lock()
	defer a.mu.Unlock()
	rows := make([]admin.PeerRow, 0, len(a.peers))
	for _, p := range a.peers {
		r := admin.PeerRow{
			Peer: p.name, Address: p.addr, State: p.state, Link: a.linkState(p), Since: p.since, LastError: p.lastErr,
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
	if a.lazy {
		for _, n := range a.reg.Nodes() {
			if a.peers[n.Name] == nil && n.Name != a.cfg.Node {
				rows = append(rows, admin.PeerRow{Peer: n.Name, Address: n.Addresses[0], State: stateUnlinked, Link: stateUnlinked})
			}
		}
	}
	slices.SortFunc(rows, func(x, y admin.PeerRow) int { return cmp.Compare(x.Peer, y.Peer) })
	return rows
}

// The link states of sinc peers: a node known to the registry that this
// agent has no peer for (or a peer with no link) is unlinked.
const (
	stateLinked   = "linked"
	stateIdle     = "idle"
	stateUnlinked = "unlinked"
)

// linkState says whether p is linked (an up link that carries channels,
// or opens on their way), idle (an up link that carries none) or
// unlinked. Called with a.mu held.
func (a *Agent) linkState(p *peer) string {
	switch {
	case p.link == nil:
		return stateUnlinked
	case p.users > 0 || a.tables.count(p.name) > 0:
		return stateLinked
	}
	return stateIdle
}

func (a *Agent) handleAdmin(req admin.Request) *admin.Response {
	switch req.Op {
	case "peers":
		build := buildinfo.Get()
		return &admin.Response{OK: true, Node: a.cfg.Node, Peers: a.peerRows(), Build: &build}
	case "conns":
		rows := []admin.ConnRow{}
		for _, ch := range a.tables.all() {
			rows = append(rows, ch.adminRow())
		}
		slices.SortFunc(rows, func(x, y admin.ConnRow) int { return cmp.Compare(x.ID, y.ID) })
		return &admin.Response{OK: true, Node: a.cfg.Node, Conns: rows}
	case "nodes":
		st := a.reg.Status()
		return &admin.Response{OK: true, Node: a.cfg.Node, Registry: &st, Nodes: a.nodeRows()}
	case "stats":
		c := a.counters.snapshot()
		c["memory_limit"] = uint64(a.budget.limit)
		c["memory_in_use"] = uint64(a.budget.inUse())
		c["memory_peak"] = uint64(a.budget.peakUse())
		return &admin.Response{OK: true, Node: a.cfg.Node, Counters: c}
	}
	return admin.Fail("unknown_op", fmt.Sprintf("unknown op %.40q; this agent knows: peers, conns, stats, nodes", req.Op))
}
