// Package agent is the trusted per-node agent (docs/design.md): it holds the
// node's key, keeps one authenticated link to each peer agent, and serves
// the admin socket.
package agent

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/buildinfo"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/policy"
	"sinc.dev/sinc/internal/registry"
	"sinc.dev/sinc/internal/secret"
	"sinc.dev/sinc/internal/wire"
	"sinc.dev/sinc/internal/x25519"
)

// Agent is one node's agent.
type Agent struct {
	cfg       *config.Config
	log       *slog.Logger
	cert      *cert.Certificate
	linkCfg   *link.Config // the identity the agent started with
	ident     atomic.Pointer[link.Config]
	identSlot []byte // protected memory of the node key in force
	instance  [link.InstanceSize]byte

	arena     *secret.Arena // protected memory for every key the agent holds
	poller    *poller       // starts idle channels' outbound pumps; set by Run
	ringSlots ringSlots     // the header pages of ring channels, per process
	pending   *link.Gate    // handshakes in progress on the peer port

	// The registry (registry.go): Static over [peers], or etcd, whose
	// client the agent closes when it stops. lazy: links on demand
	// (lazylink.go).
	reg     registry.Registry
	etcd    *registry.Etcd
	etcdCli interface{ Close() error }
	lazy    bool

	mu       sync.Mutex
	peers    map[string]*peer // changes on reload (reloadPeers) and on demand (lazylink.go)
	stopping bool             // closeLinks ran: no new link is taken
	runCtx   context.Context  // Run's; the peers' loops run under it

	reloadMu sync.Mutex // one reload at a time

	partitions map[string]*partition // fixed after start
	self       *selfCarrier
	strays     chan struct{} // tokens of answers on links no peer uses (lazylink.go)
	budget     *memBudget    // limits.memory: bytes buffered for all channels
	spare      fdSpare       // a file descriptor kept for answering when out of them
	policy     atomic.Pointer[policy.Policy]
	pol        policyState // with a registry: its policy and the listen rules (policydoc.go)
	revoked    atomic.Pointer[cert.Revocations]
	rev        revocationState // serial order of revocation lists (revoke.go)
	tables     *tables
	counters   counters

	quotas *quotas // channels counted against the limits (quota.go)

	localMu    sync.Mutex
	localConns map[*net.UnixConn]struct{} // process connections being served; nil once stopping

	wg      sync.WaitGroup // every goroutine the agent started
	started atomic.Uint64  // how many goRun started: the hand-offs a test counts

	ready chan struct{} // closed once Run has every socket listening
}

// New loads the agent's certificate, key and CA and checks them against the
// config. Nothing is started: a bad setup fails here.
func New(cfg *config.Config, log *slog.Logger) (*Agent, error) {
	now := time.Now()
	ca, err := cert.LoadCertificate(cfg.CA)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	verifier, err := cert.NewVerifier(ca, now)
	if err != nil {
		return nil, fmt.Errorf("ca %s: %w", cfg.CA, err)
	}
	c, err := cert.LoadCertificate(cfg.Cert)
	if err != nil {
		return nil, fmt.Errorf("cert: %w", err)
	}
	if err := verifier.Verify(c, now); err != nil {
		return nil, fmt.Errorf("cert %s: %w", cfg.Cert, err)
	}
	if c.Name != cfg.Node {
		return nil, fmt.Errorf("cert %s is for node %q, but the config's node is %q", cfg.Cert, c.Name, cfg.Node)
	}
	for _, p := range sortedPartitions(cfg) {
		if !c.HasPartition(p) {
			return nil, fmt.Errorf("config %s: partition %q is not in the node's certificate (it lists %v)", cfg.Path, p, c.Partitions)
		}
	}
	// Keys live in protected memory: one slot per channel (both
	// directions' keys) and one for the node's key.
	if fit := secret.Fit(keySlot, memlockReserve); fit < cfg.Limits.Channels+1 {
		return nil, fmt.Errorf("config %s: limits.channels = %d needs %d KiB of locked memory for keys; RLIMIT_MEMLOCK allows %d channels",
			cfg.Path, cfg.Limits.Channels, (cfg.Limits.Channels+1)*keySlot>>10, max(fit-1, 0))
	}
	arena, err := secret.New(cfg.Limits.Channels+1, keySlot)
	if err != nil {
		return nil, err
	}
	// The node's key goes from its file straight into its slot, its one
	// copy: handshakes read it there (package x25519).
	nodeKey, _ := arena.Alloc()
	pub, err := loadNodeKey(cfg.Key, cfg.Cert, c, nodeKey)
	if err != nil {
		arena.Close()
		return nil, err
	}
	tellKey("node", nodeKey[:32])
	a := &Agent{
		arena:      arena,
		cfg:        cfg,
		log:        log.With("node", cfg.Node),
		cert:       c,
		instance:   link.NewInstance(),
		pending:    link.NewGate(cfg.Limits.PendingHandshakes, cfg.Limits.PendingHandshakesPerSource),
		peers:      make(map[string]*peer, len(cfg.Peers)),
		partitions: make(map[string]*partition, len(cfg.Partitions)),
		tables:     newTables(cfg.Limits.Channels),
		quotas:     newQuotas(cfg.Limits),
		localConns: map[*net.UnixConn]struct{}{},
		ready:      make(chan struct{}),
	}
	a.budget = newBudget(int64(cfg.Limits.Memory), int64(cfg.Limits.Memory)/8)
	a.self = &selfCarrier{a: a, bud: a.peerBudget(), pending: make(chan struct{}, maxAccepting),
		answers: make(chan struct{}, maxReplies)}
	a.strays = make(chan struct{}, maxReplies)
	a.policy.Store(cfg.Policy)
	a.pol.listen = cfg.ListenRules
	a.linkCfg = &link.Config{
		Private:          nodeKey[:32],
		Public:           pub,
		Cert:             c,
		Verifier:         verifier,
		Instance:         a.instance,
		Check:            a.checkPeer,
		HandshakeTimeout: cfg.Timers.Handshake,
		Keepalive:        cfg.Timers.Keepalive,
		DeadAfter:        cfg.Timers.DeadAfter,
	}
	a.ident.Store(a.linkCfg)
	a.identSlot = nodeKey
	for name, p := range cfg.Peers {
		pr := newPeer(name, p.Address)
		pr.carrier = a.newPeerCarrier(pr)
		a.peers[name] = pr
	}
	if err := a.setupRegistry(c); err != nil {
		arena.Close()
		return nil, err
	}
	if cfg.Revocations != "" || cfg.Registry != nil {
		if err := a.loadRevocations(); err != nil {
			a.closeRegistry()
			return nil, fmt.Errorf("revocations: %w", err)
		}
	}
	if cfg.Registry != nil {
		if err := a.restorePolicy(); err != nil {
			a.closeRegistry()
			return nil, fmt.Errorf("policy: %w", err)
		}
	}
	return a, nil
}

// peerBudget returns a peer's part of the memory budget: three quarters,
// so that the channels of one peer cannot take all of it.
func (a *Agent) peerBudget() *memBudget {
	limit := max(a.budget.limit/4*3, 2*int64(a.cfg.Limits.Window))
	return newBudget(limit, limit/8)
}

// MemoryLimit is the soft limit of the Go runtime for an agent process with
// this config (debug.SetMemoryLimit): its memory budget for channel data,
// and room for everything else — the tables, the free lists, idle
// channels and the runtime — so that memory the channels give back
// returns to the system promptly.
func MemoryLimit(cfg *config.Config) int64 {
	return 2*int64(cfg.Limits.Memory) + int64(cfg.Limits.Channels)*16<<10 + 64<<20
}

// maxAccepting bounds the channel opens from one peer being handed to
// their listeners at once: a burst of opens waits its turn up to this
// many, and only past it is refused busy.
const maxAccepting = 1024

// keySlot is the protected memory a channel's keys take: the key it sends
// with, the key it receives with, and the receiving key being retired
// while a new one takes over (and a slot holds the node's key).
const keySlot = 3 * wire.KeyLen

// memlockReserve is locked memory left for other uses than keys.
const memlockReserve = 64 << 10

// loadNodeKey reads the node's private key from keyPath into slot
// (protected memory) and checks it against the certificate c (read from
// certPath): it returns the public key. On error the slot is zero.
func loadNodeKey(keyPath, certPath string, c *cert.Certificate, slot []byte) (public []byte, err error) {
	if err := cert.ReadNodeKey(keyPath, slot); err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	public = make([]byte, x25519.Size)
	if err := x25519.PublicKey(public, slot[:x25519.Size]); err != nil || !bytes.Equal(public, c.PublicKey[:]) {
		clear(slot)
		return nil, fmt.Errorf("key %s does not match the public key in cert %s", keyPath, certPath)
	}
	return public, nil
}

func sortedPartitions(cfg *config.Config) []string {
	ps := make([]string, 0, len(cfg.Partitions))
	for name := range cfg.Partitions {
		ps = append(ps, name)
	}
	return ps
}

// Run starts the agent and serves until ctx is done, then shuts down: links
// are closed with a reason the peers log, and the agent's sockets are
// removed. It returns an error only if the agent could not start.
func (a *Agent) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", a.cfg.Listen)
	if err != nil {
		return fmt.Errorf("peer listener: %w", err)
	}
	adm, err := listenUnix(a.cfg.Admin, socketPerm{mode: 0o600, uid: -1, gid: -1, dirMode: 0o700})
	if err != nil {
		ln.Close()
		return fmt.Errorf("admin socket: %w", err)
	}
	if a.poller, err = newPoller(a); err != nil {
		ln.Close()
		adm.Close()
		os.Remove(a.cfg.Admin)
		return fmt.Errorf("channel poller: %w", err)
	}
	if err := a.listenPartitions(); err != nil {
		ln.Close()
		adm.Close()
		os.Remove(a.cfg.Admin)
		a.poller.close()
		return err
	}
	mln, err := a.listenMetrics()
	if err != nil {
		ln.Close()
		adm.Close()
		os.Remove(a.cfg.Admin)
		a.poller.close()
		a.closePartitions()
		return err
	}
	stopMetrics := a.serveMetrics(mln)
	a.spare.f, _ = os.Open(os.DevNull)
	defer func() {
		a.spare.mu.Lock()
		if a.spare.f != nil {
			a.spare.f.Close()
		}
		a.spare.mu.Unlock()
	}()
	build := buildinfo.Get()
	a.log.Info("agent started", "version", build.Version, "revision", cmp.Or(build.Revision, buildinfo.Unknown),
		"modified", build.Modified, "go", build.GoVersion, "listen", ln.Addr().String(), "admin", a.cfg.Admin,
		"partitions", len(a.partitions), "peers", len(a.peers), "policy_rules", a.policy.Load().Len(),
		"cert_expires", a.cert.NotAfter, "key_memory", a.arena.Protection(), "key_slots", a.cfg.Limits.Channels,
		"metrics", cmp.Or(a.cfg.Metrics, "off"))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.goRun(func() { a.acceptLoop(ctx, ln) })
	a.goRun(func() { admin.Serve(adm, a.log, a.handleAdmin) })
	for _, p := range a.partitions {
		a.goRun(func() { a.acceptLocal(p) })
	}
	a.mu.Lock()
	a.runCtx = ctx
	for _, p := range a.peers {
		a.startPeer(p)
	}
	a.mu.Unlock()
	a.goRun(func() { a.reg.Run(ctx, registrySink{a}) })
	if a.lazy {
		a.goRun(func() { a.linkSweep(ctx) })
	}
	a.goRun(func() { a.watchConfig(ctx) })
	a.goRun(func() { a.watchRevocations(ctx) })
	a.goRun(func() { a.watchLifecycle(ctx) })
	a.goRun(a.poller.run)
	a.goRun(func() { a.sweepIdle(ctx) })
	// Every socket listens and is served: tell whoever waits (sd_notify).
	close(a.ready)

	<-ctx.Done()
	a.log.Info("agent stopping")
	ln.Close()
	adm.Close()
	stopMetrics()
	a.closePartitions()
	a.localMu.Lock()
	for c := range a.localConns {
		c.Close()
	}
	a.localConns = nil
	a.localMu.Unlock()
	for _, ch := range a.tables.all() {
		ch.abort(wire.CodeAgentGone, "agent "+a.cfg.Node+" is shutting down", true)
	}
	a.closeLinks("agent shutting down")
	a.poller.close()
	a.wg.Wait()
	a.closeRegistry()
	os.Remove(a.cfg.Admin)
	a.arena.Close()
	a.log.Info("agent stopped")
	return nil
}

func (a *Agent) goRun(f func()) {
	a.started.Add(1)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		f()
	}()
}

// idleSweep is how often the channels are swept of what an idle channel
// need not hold (see channel.sweep): a channel direction idle for one to
// two sweeps holds its keys in protected memory only.
var idleSweep = time.Second

func (a *Agent) sweepIdle(ctx context.Context) {
	t := time.NewTicker(idleSweep)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, ch := range a.tables.all() {
			ch.sweep()
		}
	}
}

// Addr-independent helpers for tests and the CLI.

// Ready is closed once Run has every socket of the agent listening and
// served: the peer port, the admin socket, the partition sockets and the
// metrics address. An agent that fails to start never closes it.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// Instance returns the agent's per-start instance id.
func (a *Agent) Instance() [link.InstanceSize]byte { return a.instance }

// acceptLoop takes connections on the peer port into the handshake gate
// (link.Gate: bounded per source and in all, a full gate evicting the
// flood's oldest rather than refusing) and runs each one's handshake.
func (a *Agent) acceptLoop(ctx context.Context, ln net.Listener) {
	// When the listener closes, handshakes under way end now, not at
	// their timeout.
	defer a.pending.Close()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return
			}
			a.log.Warn("peer accept", "err", err)
			select {
			case <-time.After(50 * time.Millisecond):
			case <-ctx.Done():
				return
			}
			continue
		}
		t := a.pending.Admit(conn)
		a.goRun(func() {
			l, err := t.Accept(a.linkConfig())
			if err != nil {
				a.handshakeFailed(err)
				return
			}
			a.counters.handshakesOK.Add(1)
			a.adopt(ctx, l)
		})
	}
}

// handshakeFailed counts a handshake on the peer port that failed, by its
// reason (refused_handshake_<reason> in sinc stats), and logs it with the
// reason in the message, so that the log's rate limit (internal/logx),
// which goes by message, keeps a flood of one kind from hiding another.
func (a *Agent) handshakeFailed(err error) {
	reason, remote := "failed", ""
	var he *link.HandshakeError
	if errors.As(err, &he) {
		reason, remote = he.Reason(), he.Peer
	}
	if errors.Is(err, ErrRevoked) {
		reason = "revoked"
	}
	attrs := []any{"remote", remote, "err", err}
	switch reason {
	case "closing": // the agent is stopping: not a refusal
		a.log.Debug("peer handshake ended: agent stopping", attrs...)
		return
	case "evicted":
		attrs = append(attrs, "limit", a.pending.Max())
	case "per_source":
		attrs = append(attrs, "limit", a.cfg.Limits.PendingHandshakesPerSource)
	}
	a.counters.refuse("handshake_" + reason)
	a.log.Warn("peer handshake failed: "+reason, attrs...)
}

// adopt decides whether an accepted, authenticated link becomes its peer's
// link, and answers the initiator.
func (a *Agent) adopt(ctx context.Context, l *link.Link) {
	name := l.Peer().Name
	if ctx.Err() != nil {
		l.Refuse("agent shutting down")
		return
	}
	// register confirms the link (the verdict goes first on it) or says
	// why not.
	if reason, ok := a.register(l, nil); !ok {
		a.log.Info("peer link refused", "peer", name, "remote", l.RemoteAddr().String(), "reason", reason)
		l.Refuse(reason)
		return
	}
	a.goRun(func() { a.serve(l) })
}

// serve runs an up link until it closes; its channels wait for the next.
// A link that was replaced (a rekey) closes without the peer going down.
func (a *Agent) serve(l *link.Link) {
	err := l.Serve(a)
	if a.unregister(l) {
		a.log.Info("peer link down", "peer", l.Peer().Name, "reason", err)
	} else {
		a.log.Debug("replaced peer link closed", "peer", l.Peer().Name, "reason", err)
	}
}
