package agent

import (
	"cmp"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/registry"
)

// The agent and its registry (internal/registry). Without [registry] in
// the config the registry is Static — the configured [peers] — and the
// agent behaves as it always has: eager links, the revocation list's file,
// [[allow]] on reload. With one, the registry is etcd:
//
//   - this agent's record (advertise, instance, certificate fingerprint)
//     and certificate are published under a lease (registry.Etcd);
//   - the peer table follows the registry, links are made on demand
//     (lazylink.go);
//   - the revocation list and the cluster policy come from the registry as
//     CA-signed documents, applied as they arrive (the watch: well within a
//     second), each through the same serial order and state folder copy as
//     the file's list (revoke.go, policydoc.go).
//
// Trust: the registry is believed about where a node is, never about who
// it is. Before a dial, the node's certificate is read from the registry
// and checked — the cluster CA signed it, it is valid now, not revoked, it
// names the node, and its fingerprint is the one the record names
// (dialTargets) — and the handshake checks the certificate the peer
// presents as always, and that its fingerprint is the record's
// (checkRecord), on both sides. A node that renewed its certificate puts
// its record again before it presents the new one (renew.go), but a
// record seen through the watch may lag: a fingerprint that differs from
// the view is checked against the record read again from etcd, and only
// a certificate the record names is taken. So an old certificate of a
// node — one it replaced, whose key may be lost — links to no one once
// the record names its successor, revoked or not.

// errRegistry wraps the reasons a handshake is refused for the registry's
// sake: a node with no record, or a certificate its record does not name.
var errRegistry = errors.New("not as the registry records it")

// registrySink receives the registry's changes for the agent.
type registrySink struct{ a *Agent }

func (s registrySink) NodeChanged(n registry.Node) {
	if n.Name != s.a.cfg.Node {
		s.a.log.Debug("registry: node record", "peer", n.Name, "addresses", n.Addresses, "fingerprint", n.Fingerprint)
	}
}

func (s registrySink) NodeGone(name string) {
	if name != s.a.cfg.Node {
		s.a.log.Debug("registry: node record gone", "peer", name)
		s.a.nodeGone(name)
	}
}

func (s registrySink) Revocations(data []byte, source string) {
	a := s.a
	r, err := cert.ParseRevocations(data, a.linkConfig().Verifier)
	if err != nil {
		a.counters.refuse("registry_revocations")
		a.log.Error("revocation list from the registry refused; the list in force stays", "source", source, "err", err)
		return
	}
	a.rev.mu.Lock()
	defer a.rev.mu.Unlock()
	a.putRevocations(r, source)
}

func (s registrySink) Policy(data []byte, source string) { s.a.takePolicyDoc(data, source) }

// setupRegistry makes the agent's registry from its config; c is the
// agent's certificate.
func (a *Agent) setupRegistry(c *cert.Certificate) error {
	r := a.cfg.Registry
	if r == nil {
		a.reg = registry.NewStatic(a.cfg.Peers)
		return nil
	}
	cli, err := registry.NewClient(registry.ClientConfig{Endpoints: r.Etcd, CA: r.CA, Cert: r.Cert, Key: r.Key, DialTimeout: r.DialTimeout})
	if err != nil {
		return fmt.Errorf("config %s: registry: %w", a.cfg.Path, err)
	}
	e, err := registry.NewEtcd(cli, registry.EtcdConfig{Prefix: r.Prefix, Endpoints: r.Etcd,
		RequestTimeout: r.RequestTimeout, LeaseTTL: r.LeaseTTL, MaxNodes: r.MaxNodes, StartJitter: registryJitter}, a.selfRecord(c), a.log)
	if err != nil {
		cli.Close()
		return fmt.Errorf("config %s: registry: %w", a.cfg.Path, err)
	}
	a.reg, a.etcd, a.etcdCli, a.lazy = e, e, cli, true
	return nil
}

// registryJitter spreads the first requests of agents started at once.
var registryJitter = time.Second

// closeRegistry closes the etcd client, if any.
func (a *Agent) closeRegistry() {
	if a.etcdCli != nil {
		a.etcdCli.Close()
	}
}

// selfRecord is what this agent publishes.
func (a *Agent) selfRecord(c *cert.Certificate) registry.Self {
	return registry.Self{
		Node:    registry.Node{Name: a.cfg.Node, Addresses: a.cfg.Advertise, Instance: a.instance, Fingerprint: c.Fingerprint()},
		CertPEM: c.EncodePEM(),
	}
}

// dialTargets returns the addresses to dial p at, from its registry
// record, once the certificate the registry holds for it has been read and
// checked (unless the one read last time is still the record's).
func (a *Agent) dialTargets(ctx context.Context, p *peer) ([]string, error) {
	n, ok := a.reg.Lookup(p.name)
	if !ok {
		return nil, fmt.Errorf("node %s has no record in the registry", p.name)
	}
	a.mu.Lock()
	c := p.cert
	a.mu.Unlock()
	if c == nil || c.Fingerprint() != n.Fingerprint || a.revoked.Load().Revoked(c) || !time.Now().Before(c.NotAfter) {
		err := fmt.Errorf("%w since %s", registry.ErrUnreachable, a.reg.Status().Since.Format(time.RFC3339))
		if a.reg.Status().Connected {
			c, err = a.registryCert(ctx, n)
		}
		if errors.Is(err, registry.ErrUnreachable) {
			// etcd is down: the last view of the record says where the
			// node is, and the handshake checks its certificate as the
			// read would have (CA, validity, revocation, the record's
			// fingerprint: checkRecord).
			a.log.Info("registry unreachable: dialing on the last view of the record", "peer", p.name, "err", err)
			return n.Addresses, nil
		}
		if err != nil {
			a.counters.refuse("registry_certificate")
			a.log.Warn("registry certificate refused: not dialing the node", "peer", p.name, "err", err)
			return nil, err
		}
		a.mu.Lock()
		p.cert = c
		a.mu.Unlock()
	}
	return n.Addresses, nil
}

// registryCert reads node n's certificate from the registry and checks it
// against the CA, the revocation list and n's record.
func (a *Agent) registryCert(ctx context.Context, n registry.Node) (*cert.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.Timers.Handshake)
	defer cancel()
	pem, err := a.reg.Certificate(ctx, n.Name)
	if err != nil {
		return nil, err
	}
	c, err := cert.ParsePEM(pem)
	if err != nil {
		return nil, fmt.Errorf("the registry's certificate of %s: %w", n.Name, err)
	}
	if err := a.linkConfig().Verifier.Verify(c, time.Now()); err != nil {
		return nil, fmt.Errorf("the registry's certificate of %s: %w", n.Name, err)
	}
	if c.Name != n.Name {
		return nil, fmt.Errorf("the registry's certificate of %s is for node %q", n.Name, c.Name)
	}
	if err := a.checkRevoked(c); err != nil {
		return nil, fmt.Errorf("the registry's certificate of %s: %w", n.Name, err)
	}
	if fp := c.Fingerprint(); fp != n.Fingerprint {
		return nil, fmt.Errorf("the registry's certificate of %s has fingerprint %.16s…, its record names %.16s…", n.Name, fp, n.Fingerprint)
	}
	return c, nil
}

// checkPeer is the links' check of every peer certificate that verified
// with the CA: not revoked, and with links on demand, the one the node's
// registry record names (checkRecord).
func (a *Agent) checkPeer(c *cert.Certificate) error {
	if err := a.checkRevoked(c); err != nil {
		return err
	}
	if !a.lazy {
		return nil
	}
	return a.checkRecord(c)
}

// checkRecord checks that node c.Name has a record in the registry and
// that it names c. The view is asked first; when it says otherwise, the
// record is read again from etcd (the watch may lag a renewal or a new
// node), within half the handshake's time.
func (a *Agent) checkRecord(c *cert.Certificate) error {
	fp := c.Fingerprint()
	if n, ok := a.reg.Lookup(c.Name); ok && n.Fingerprint == fp {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.Timers.Handshake/2)
	defer cancel()
	n, ok, err := a.reg.Refresh(ctx, c.Name)
	switch {
	case err != nil:
		return fmt.Errorf("node %q: %w: its record could not be read (%v)", c.Name, errRegistry, err)
	case !ok:
		return fmt.Errorf("node %q: %w: it has no record", c.Name, errRegistry)
	case n.Fingerprint != fp:
		return fmt.Errorf("node %q: %w: its certificate %.16s… is not the one its record names (%.16s…)", c.Name, errRegistry, fp, n.Fingerprint)
	}
	return nil
}

// nodeRows returns the registry as this agent sees it (sinc nodes), with
// the link state of each node and the peers whose record is gone, sorted
// by name.
func (a *Agent) nodeRows() []admin.NodeRow {
	nodes := a.reg.Nodes()
	a.mu.Lock()
	defer a.mu.Unlock()
	rows := make([]admin.NodeRow, 0, len(nodes)+1)
	seen := make(map[string]bool, len(nodes))
	row := func(p *peer, name string) admin.NodeRow {
		r := admin.NodeRow{Node: name, Link: stateUnlinked, Record: "current", Channels: a.tables.count(name)}
		if !a.lazy {
			r.Record = "configured"
		}
		if p != nil {
			r.Link = a.linkState(p)
			if p.link != nil {
				r.CertExpiry = p.link.Peer().NotAfter
			} else if p.cert != nil {
				r.CertExpiry = p.cert.NotAfter
			}
		}
		return r
	}
	for _, n := range nodes {
		seen[n.Name] = true
		r := row(a.peers[n.Name], n.Name)
		r.Addresses = n.Addresses
		if n.Instance != ([link.InstanceSize]byte{}) {
			r.Instance = hex.EncodeToString(n.Instance[:])
			r.Fingerprint = n.Fingerprint.String()
		}
		if n.Name == a.cfg.Node {
			r.Self, r.Link, r.CertExpiry = true, "", a.linkConfig().Cert.NotAfter
		}
		rows = append(rows, r)
	}
	for name, p := range a.peers {
		if !seen[name] {
			r := row(p, name)
			r.Addresses, r.Record = []string{p.addr}, "gone"
			rows = append(rows, r)
		}
	}
	slices.SortFunc(rows, func(x, y admin.NodeRow) int { return cmp.Compare(x.Node, y.Node) })
	return rows
}
