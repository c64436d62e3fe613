// Package agent is the trusted per-node agent (DESIGN.md §1): it holds the
// node's key, keeps one authenticated link to each peer agent, and serves
// the admin socket.
package agent

import (
	"context"
	"crypto/ecdh"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/policy"
	"sinc.dev/sinc/internal/secret"
	"sinc.dev/sinc/internal/wire"
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
	pending   chan struct{} // one token per handshake in progress
	accepting chan struct{} // one token per channel accept in progress

	mu       sync.Mutex
	peers    map[string]*peer
	stopping bool // closeLinks ran: no new link is taken

	partitions map[string]*partition // fixed after start
	self       *selfCarrier
	policy     atomic.Pointer[policy.Policy]
	revoked    atomic.Pointer[cert.Revocations]
	tables     *tables
	counters   counters

	budget *budget // channels counted against the limits (budget.go)

	localMu    sync.Mutex
	localConns map[*net.UnixConn]struct{} // process connections being served; nil once stopping

	wg sync.WaitGroup // every goroutine the agent started
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
	key, err := cert.LoadNodeKey(cfg.Key)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	if !key.PublicKey().Equal(mustX25519(c.PublicKey[:])) {
		return nil, fmt.Errorf("key %s does not match the public key in cert %s", cfg.Key, cfg.Cert)
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
	nodeKey, _ := arena.Alloc()
	priv, pub := link.KeyPair(key)
	copy(nodeKey, priv)
	clear(priv)
	tellKey("node", nodeKey[:32])
	a := &Agent{
		arena:      arena,
		cfg:        cfg,
		log:        log.With("node", cfg.Node),
		cert:       c,
		instance:   link.NewInstance(),
		pending:    make(chan struct{}, cfg.Limits.PendingHandshakes),
		accepting:  make(chan struct{}, maxAccepting),
		peers:      make(map[string]*peer, len(cfg.Peers)),
		partitions: make(map[string]*partition, len(cfg.Partitions)),
		tables:     newTables(cfg.Limits.Channels),
		budget:     newBudget(cfg.Limits),
		localConns: map[*net.UnixConn]struct{}{},
	}
	a.self = &selfCarrier{a}
	a.policy.Store(cfg.Policy)
	a.linkCfg = &link.Config{
		Private:          nodeKey[:32],
		Public:           pub,
		Cert:             c,
		Verifier:         verifier,
		Instance:         a.instance,
		Check:            a.checkRevoked,
		HandshakeTimeout: cfg.Timers.Handshake,
		Keepalive:        cfg.Timers.Keepalive,
		DeadAfter:        cfg.Timers.DeadAfter,
	}
	a.ident.Store(a.linkCfg)
	a.identSlot = nodeKey
	for name, p := range cfg.Peers {
		pr := newPeer(name, p.Address)
		pr.carrier = &peerCarrier{a: a, p: pr}
		a.peers[name] = pr
	}
	if cfg.Revocations != "" {
		if err := a.loadRevocations(); err != nil {
			return nil, fmt.Errorf("revocations: %w", err)
		}
	}
	return a, nil
}

// maxAccepting bounds the channel opens from peers being accepted at once.
const maxAccepting = 256

// keySlot is the protected memory a channel's keys take: the key it sends
// with, the key it receives with, and the receiving key being retired
// while a new one takes over (and a slot holds the node's key).
const keySlot = 3 * wire.KeyLen

// memlockReserve is locked memory left for other uses than keys.
const memlockReserve = 64 << 10

func mustX25519(b []byte) *ecdh.PublicKey {
	k, err := ecdh.X25519().NewPublicKey(b)
	if err != nil {
		panic(err) // cannot happen: every 32-byte string is an X25519 key
	}
	return k
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
	a.log.Info("agent started", "listen", ln.Addr().String(), "admin", a.cfg.Admin,
		"partitions", len(a.partitions), "peers", len(a.peers), "policy_rules", a.policy.Load().Len(),
		"cert_expires", a.cert.NotAfter, "key_memory", a.arena.Protection(), "key_slots", a.cfg.Limits.Channels)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.goRun(func() { a.acceptLoop(ctx, ln) })
	a.goRun(func() { admin.Serve(adm, a.log, a.handleAdmin) })
	for _, p := range a.partitions {
		a.goRun(func() { a.acceptLocal(p) })
	}
	for _, p := range a.peers {
		a.goRun(func() { a.dialLoop(ctx, p) })
		a.goRun(func() { a.rekeyLoop(ctx, p) })
	}
	a.goRun(func() { a.watchRevocations(ctx) })
	a.goRun(func() { a.watchLifecycle(ctx) })
	a.goRun(a.poller.run)
	a.goRun(func() { a.sweepIdle(ctx) })

	<-ctx.Done()
	a.log.Info("agent stopping")
	ln.Close()
	adm.Close()
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
	os.Remove(a.cfg.Admin)
	a.arena.Close()
	a.log.Info("agent stopped")
	return nil
}

// Reload rereads the config file and takes its policy; a bad file keeps the
// policy in force. Other changes need a restart.
func (a *Agent) Reload() error {
	cfg, err := config.Load(a.cfg.Path)
	if err != nil {
		a.log.Error("reload failed; keeping the policy in force", "err", err)
		return err
	}
	a.policy.Store(cfg.Policy)
	a.log.Info("policy reloaded", "rules", cfg.Policy.Len())
	if err := a.reloadIdentity(); err != nil {
		a.log.Error("certificate reload failed; keeping the one in force", "err", err)
		return err
	}
	return a.loadRevocations()
}

func (a *Agent) goRun(f func()) {
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

// Instance returns the agent's per-start instance id.
func (a *Agent) Instance() [link.InstanceSize]byte { return a.instance }

func (a *Agent) acceptLoop(ctx context.Context, ln net.Listener) {
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
		select {
		case a.pending <- struct{}{}:
		default:
			a.log.Warn("peer connection refused: too many handshakes in progress",
				"remote", conn.RemoteAddr().String(), "limit", cap(a.pending))
			conn.Close()
			continue
		}
		a.goRun(func() {
			l, err := link.Accept(conn, a.linkConfig())
			<-a.pending
			if err != nil {
				a.log.Warn("peer handshake failed", "remote", conn.RemoteAddr().String(), "err", err)
				return
			}
			a.adopt(ctx, l)
		})
	}
}

// adopt decides whether an accepted, authenticated link becomes its peer's
// link, and answers the initiator.
func (a *Agent) adopt(ctx context.Context, l *link.Link) {
	name := l.Peer().Name
	if ctx.Err() != nil {
		l.Refuse("agent shutting down")
		return
	}
	if _, ok := a.peers[name]; !ok {
		a.log.Warn("peer handshake refused: not a configured peer", "remote", l.RemoteAddr().String(), "peer", name)
		l.Refuse(fmt.Sprintf("node %q is not a configured peer of %q", name, a.cfg.Node))
		return
	}
	if reason, ok := a.register(l); !ok {
		a.log.Debug("peer link refused", "peer", name, "reason", reason)
		l.Refuse(reason)
		return
	}
	if err := l.Confirm(); err != nil {
		a.unregister(l)
		return
	}
	a.goRun(func() { a.serve(l) })
}

// serve runs an up link until it closes; its channels wait for the next.
func (a *Agent) serve(l *link.Link) {
	err := l.Serve(a)
	a.unregister(l)
	a.log.Info("peer link down", "peer", l.Peer().Name, "reason", err)
}
