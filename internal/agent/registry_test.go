package agent

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cert/certtest"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/etcdtest"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/policy"
	"sinc.dev/sinc/internal/registry"
)

func init() { registryJitter = 0 } // tests start their agents one by one

// regTimers are fast timers with a short link_idle. A link's death is
// not what these tests look at: dead_after and grace are long enough that
// a machine busy with etcd members does not end a channel by itself.
var regTimers = cluster.Timers{Handshake: "1s", Keepalive: "200ms", DeadAfter: "3s", DialMin: "20ms", DialMax: "200ms",
	Grace: "3s", LinkIdle: "400ms"}

// regNode is a node of a registry cluster: its name, and the etcd
// endpoints its agent uses (all of the cluster's when nil).
type regNode struct {
	name      string
	endpoints []string
}

// registryCluster lays out nodes that find each other in the registry on
// ec, under prefix /sinc: no [peers], a lease of 3 s.
func registryCluster(t *testing.T, ec *etcdtest.Cluster, timers cluster.Timers, nodes ...regNode) *cluster.Cluster {
	t.Helper()
	var specs []cluster.NodeSpec
	for _, n := range nodes {
		eps := n.endpoints
		if eps == nil {
			eps = ec.Endpoints()
		}
		specs = append(specs, cluster.NodeSpec{Name: n.name, Partitions: []string{"p1"}, NoPeers: true, Extra: fmt.Sprintf(
			"[registry]\netcd = [%s]\nlease_ttl = \"3s\"\nrequest_timeout = \"500ms\"\ndial_timeout = \"1s\"\n", quoteList(eps))})
	}
	c, err := cluster.Make(shortTempDir(t), specs, timers)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func quoteList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}

// allowAll gives a registry agent a policy that allows every channel, as
// a policy document from the registry would.
func allowAll(t testing.TB, ta *testAgent) {
	t.Helper()
	r, err := policy.ParseRule("*/*", "*/*/*", nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := policy.New([]policy.Rule{r})
	if err != nil {
		t.Fatal(err)
	}
	ta.pol.mu.Lock()
	ta.pol.rules = p
	ta.installPolicy()
	ta.pol.mu.Unlock()
}

// startRegistryAgent starts n's agent with a policy that allows all.
func startRegistryAgent(t *testing.T, n *cluster.Node) *testAgent {
	t.Helper()
	ta := startAgent(t, n, nil)
	allowAll(t, ta)
	return ta
}

// peerRow returns ta's row for peer in sinc peers.
func peerRow(t *testing.T, ta *testAgent, peer string) admin.PeerRow {
	t.Helper()
	for _, r := range ta.peerRows() {
		if r.Peer == peer {
			return r
		}
	}
	return admin.PeerRow{}
}

// knows waits until ta's registry has node.
func knows(t *testing.T, ta *testAgent, node string) {
	t.Helper()
	eventually(t, 5*time.Second, ta.node.Name+" knows "+node, func() bool {
		_, ok := ta.reg.Lookup(node)
		return ok
	})
}

func dialer(n *cluster.Node) *sinc.Dialer {
	return &sinc.Dialer{Socket: n.Partitions["p1"]}
}

func listenOn(t *testing.T, n *cluster.Node, service string) *sinc.Listener {
	t.Helper()
	l, err := (&sinc.ListenConfig{Socket: n.Partitions["p1"]}).Listen(ctxT(t), service)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// TestRegistryLazyLink: with a registry, agents that know each other
// are not linked until a channel needs it; the first open links (and
// waits for the handshake); the link, idle for timers.link_idle, is
// closed by the side that dialed it, after asking the other, which
// neither dials again nor counts it a failure; the next open links again.
func TestRegistryLazyLink(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	b := startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	knows(t, b, "node-a")
	if r := peerRow(t, a, "node-b"); r.Link != "unlinked" || r.State != "unlinked" {
		t.Fatalf("node-a's row for node-b before any channel: %+v", r)
	}
	a.mu.Lock()
	n := len(a.peers)
	a.mu.Unlock()
	if n != 0 {
		t.Fatalf("node-a has %d peers before any channel", n)
	}
	// A node only known is counted in the metrics, with no series of its
	// own: a thousand known nodes are not thousands of series of zeros.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(collector{a.Agent})
	got := gather(t, reg)
	if got["sinc_peers,link=unlinked"] != 1 || got["sinc_peers,link=linked"] != 0 {
		t.Errorf("sinc_peers before any channel: unlinked %v, linked %v; want 1, 0",
			got["sinc_peers,link=unlinked"], got["sinc_peers,link=linked"])
	}
	for k := range got {
		if strings.Contains(k, "peer=node-b") {
			t.Errorf("a series for node-b, which is only known: %s", k)
		}
	}

	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	start := time.Now()
	conn, err := dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-b/p1/echo")
	if err != nil {
		t.Fatalf("first open: %v", err)
	}
	t.Logf("first open, with its link, took %s", time.Since(start))
	if got := gather(t, reg); got["sinc_peers,link=linked"] != 1 || got["sinc_peer_state,peer=node-b,state=up"] != 1 {
		t.Errorf("metrics with a channel to node-b: sinc_peers linked %v, peer state up %v; want 1, 1",
			got["sinc_peers,link=linked"], got["sinc_peer_state,peer=node-b,state=up"])
	}
	if r := peerRow(t, a, "node-b"); r.Link != "linked" || r.State != "up" || !r.Initiator {
		t.Errorf("node-a's row for node-b with a channel: %+v", r)
	}
	mustEqual(t, "echo", roundTrip(t, conn, []byte("hello")), []byte("hello"))
	conn.Close()

	// Idle: node-a, which dialed, asks and closes; node-b forgets.
	a.log.waitFor(t, 5*time.Second, "peer link closed", "peer=node-b", "idle")
	b.log.waitFor(t, 2*time.Second, "peer link closing: idle", "peer=node-a")
	eventually(t, 2*time.Second, "both unlinked", func() bool {
		return peerRow(t, a, "node-b").Link == "unlinked" && peerRow(t, b, "node-a").Link == "unlinked"
	})
	a.mu.Lock()
	na := len(a.peers)
	a.mu.Unlock()
	b.mu.Lock()
	nb := len(b.peers)
	b.mu.Unlock()
	if na != 0 || nb != 0 {
		t.Errorf("peers left after the idle close: node-a %d, node-b %d", na, nb)
	}
	time.Sleep(300 * time.Millisecond) // would a redial come?
	for _, ta := range []*testAgent{a, b} {
		for _, bad := range []string{"peer link down", "peer dial failed", "link rekey failed"} {
			if strings.Contains(ta.log.String(), bad) {
				t.Errorf("%s logged %q after an idle close", ta.node.Name, bad)
			}
		}
	}
	if r := peerRow(t, b, "node-a"); r.State != "unlinked" {
		t.Errorf("node-b redialed: %+v", r)
	}

	// The next open links again.
	conn, err = dialer(c.Nodes["node-b"]).DialContext(ctxT(t), "node-b/p1/echo")
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	conn, err = dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-b/p1/echo")
	if err != nil {
		t.Fatalf("open after the idle close: %v", err)
	}
	mustEqual(t, "echo", roundTrip(t, conn, []byte("again")), []byte("again"))
	conn.Close()
}

// TestRegistryUnknownNode: a node the registry does not have is answered
// node_unreachable at once, with no dial.
func TestRegistryUnknownNode(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"})
	startRegistryAgent(t, c.Nodes["node-a"])
	start := time.Now()
	_, err := dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-x/p1/echo")
	if !isOp(err, "dial", sinc.ErrUnreachable) {
		t.Fatalf("dial of an unknown node: %v, want node_unreachable", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("answered after %s", d)
	}
	if !strings.Contains(err.Error(), "no record in the registry") {
		t.Errorf("error %q does not say why", err)
	}
}

// TestRegistryIdleRace: opens that cross idle closes are never lost. With
// a link_idle of a few milliseconds both agents open channels to each
// other at random moments around the idle time, so that many opens meet a
// link being asked to close, or just closed: every one succeeds.
func TestRegistryIdleRace(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	timers := regTimers
	timers.LinkIdle = "15ms"
	c := registryCluster(t, ec, timers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	b := startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	knows(t, b, "node-a")
	echo(t, listenOn(t, c.Nodes["node-a"], "echo"))
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	const n = 120
	dirs := []struct{ node, to string }{{"node-a", "node-b"}, {"node-b", "node-a"}}
	errs := make(chan error, len(dirs)*n)
	for k, from := range dirs {
		go func() {
			for i := range n {
				time.Sleep(time.Duration((i*7+k*3)%13) * 3 * time.Millisecond)
				conn, err := dialer(c.Nodes[from.node]).DialContext(ctxT(t), from.to+"/p1/echo")
				if err == nil {
					_, err = conn.Write([]byte("x"))
					if err == nil {
						var buf [1]byte
						_, err = conn.Read(buf[:])
					}
					conn.Close()
				}
				if err != nil {
					err = fmt.Errorf("%s open %d: %w", from.node, i, err)
				}
				errs <- err
			}
		}()
	}
	failed := 0
	for range len(dirs) * n {
		if err := <-errs; err != nil {
			failed++
			t.Error(err)
		}
	}
	closes := strings.Count(a.log.String(), "reason=\""+reasonIdle) + strings.Count(b.log.String(), "reason=\""+reasonIdle)
	t.Logf("%d opens, %d failed, %d idle closes", len(dirs)*n, failed, closes)
	if closes < 5 {
		t.Errorf("only %d idle closes: the race was not tried", closes)
	}
}

// etcdClient is a client of ec for a test's own reads and writes.
func etcdClient(t *testing.T, ec *etcdtest.Cluster) *clientv3.Client { return ec.Client(t) }

func put(t *testing.T, cli *clientv3.Client, key string, value []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, string(value)); err != nil {
		t.Fatal(err)
	}
}

// openEcho opens a channel from n to service echo of node to, and checks
// one round trip.
func openEcho(t *testing.T, n *cluster.Node, to string) *sinc.Conn {
	t.Helper()
	conn, err := dialer(n).DialContext(ctxT(t), to+"/p1/echo")
	if err != nil {
		t.Fatalf("%s → %s: %v", n.Name, to, err)
	}
	t.Cleanup(func() { conn.Close() })
	ping(t, conn)
	return conn
}

// ping writes a message on conn and reads it back (echo).
func ping(t *testing.T, conn *sinc.Conn) {
	t.Helper()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	defer conn.SetDeadline(time.Time{})
	msg := []byte("ping " + time.Now().String())
	if _, err := conn.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	mustEqual(t, "echo", got, msg)
}

// TestRegistryRevocation: a revocation list published in the registry is
// applied within a second — the revoked node's link closed, its channel
// ended — and the node cannot link again; the list is kept in the state
// folder; an older list published after it is refused.
func TestRegistryRevocation(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	conn := openEcho(t, c.Nodes["node-a"], "node-b")

	crl := filepath.Join(t.TempDir(), "revoked.crl")
	r1, err := cert.Revoke(c.CADir, crl, []string{"node-x"}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	r2, err := cert.Revoke(c.CADir, crl, []string{"node-b"}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cli := etcdClient(t, ec)
	start := time.Now()
	put(t, cli, "/sinc/revocations", r2.EncodePEM())
	eventually(t, 2*time.Second, "node-b's link closed", func() bool { return linkOf(a, "node-b") == nil })
	d := time.Since(start)
	conn.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Error("the channel to the revoked node still reads")
	}
	t.Logf("revocation applied %s after its put", d)
	if d > time.Second {
		t.Errorf("revocation applied after %s, more than 1s", d)
	}
	if _, err := os.Stat(filepath.Join(c.Nodes["node-a"].Dir, "state", "node-a.revoked.crl")); err != nil {
		t.Errorf("the list is not in the state folder: %v", err)
	}
	_, err = dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-b/p1/echo")
	if !isOp(err, "dial", sinc.ErrUnreachable) {
		t.Errorf("open to the revoked node: %v, want node_unreachable", err)
	}
	// An older list does not take the revocation back.
	put(t, cli, "/sinc/revocations", r1.EncodePEM())
	a.log.waitFor(t, 2*time.Second, "revocation list refused: older", "serial=1", "in_force_serial=2")
	if a.revoked.Load().Serial != 2 {
		t.Errorf("list in force: serial %d", a.revoked.Load().Serial)
	}
}

// TestRegistryNodeGone: a node whose record leaves the registry (its
// agent lost etcd past its lease) is answered node_unreachable at once;
// the channel to it on an up link carries on; once the channel ends the
// link is closed at once (not after link_idle); when the node's record is
// back, a channel opens again.
func TestRegistryNodeGone(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	timers := regTimers
	timers.LinkIdle = "1m" // node-gone closes must not wait for idleness
	c := registryCluster(t, ec, timers,
		regNode{name: "node-a", endpoints: []string{ec.Endpoint(0), ec.Endpoint(1)}},
		regNode{name: "node-b", endpoints: []string{ec.Endpoint(2)}})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	b := startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	conn := openEcho(t, c.Nodes["node-a"], "node-b")

	ec.Kill(2) // node-b's only member: its lease runs out
	eventually(t, 8*time.Second, "node-b gone from node-a's view", func() bool {
		_, ok := a.reg.Lookup("node-b")
		return !ok
	})
	ping(t, conn)
	start := time.Now()
	_, err := dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-b/p1/echo")
	if !isOp(err, "dial", sinc.ErrUnreachable) || time.Since(start) > 200*time.Millisecond {
		t.Errorf("open to a gone node: %v after %s, want node_unreachable at once", err, time.Since(start))
	}
	if r := peerRow(t, a, "node-b"); r.Link != "linked" {
		t.Errorf("node-a's row for node-b: %+v", r)
	}
	rows := nodesOf(t, a)
	if r := rows["node-b"]; r.Record != "gone" || r.Link != "linked" || r.Channels != 1 {
		t.Errorf("sinc nodes row of node-b: %+v", r)
	}
	ping(t, conn)
	conn.Close()
	a.log.waitFor(t, 3*time.Second, "peer link closed", "peer=node-b", "gone from the registry")
	if st := b.reg.Status(); st.Connected {
		t.Errorf("node-b's registry status during its outage: %+v", st)
	}

	ec.Restart(2)
	eventually(t, 10*time.Second, "node-b back in node-a's view", func() bool {
		_, ok := a.reg.Lookup("node-b")
		return ok
	})
	openEcho(t, c.Nodes["node-a"], "node-b")
}

// nodesOf returns ta's sinc nodes rows by node.
func nodesOf(t *testing.T, ta *testAgent) map[string]admin.NodeRow {
	t.Helper()
	resp, err := admin.Query(ctxT(t), ta.node.Admin, admin.Request{Op: "nodes"})
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]admin.NodeRow{}
	for _, r := range resp.Nodes {
		m[r.Node] = r
	}
	return m
}

// linkOf returns ta's link to peer, nil if none (or no peer).
func linkOf(ta *testAgent, peer string) *link.Link {
	ta.mu.Lock()
	defer ta.mu.Unlock()
	if p := ta.peers[peer]; p != nil {
		return p.link
	}
	return nil
}

// issue signs a node certificate for node with the CA in caDir (a fresh
// key) and returns it.
func issue(t *testing.T, caDir, node string) *cert.Certificate {
	t.Helper()
	ca, key, err := cert.LoadCA(caDir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c, err := cert.IssueNode(ca, key, certtest.NewKey(t).PublicKey(), cert.NodeRequest{Node: node, Partitions: []string{"p1"}, ValidFor: time.Hour}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// record returns a node record naming fp, at addr.
func record(t *testing.T, name, addr string, fp cert.Fingerprint) []byte {
	t.Helper()
	b, err := registry.EncodeRecord(registry.Node{Name: name, Addresses: []string{addr}, Instance: link.NewInstance(), Fingerprint: fp})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRegistryPoisonedRecords: every way a registry can lie about a node
// is refused before a dial, with a log line, and costs only that node:
// another CA's certificate, a certificate whose fingerprint the record
// does not name, a certificate of another node, a certificate with a bad
// signature, a record that is garbage, a record too large. The record of
// a poisoned node points at a real agent (node-b), so a dial that was
// made would reach it: node-b sees none. A channel to node-b works
// throughout.
func TestRegistryPoisonedRecords(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	b := startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	conn := openEcho(t, c.Nodes["node-a"], "node-b")
	bAddr := c.Nodes["node-b"].Listen
	cli := etcdClient(t, ec)

	foreign := certtest.NewCA(t)
	other := foreign.Node(t, cert.NodeRequest{Node: "node-x"}).Cert
	mismatch := issue(t, c.CADir, "node-y")
	bCert := b.cert
	badSig := issue(t, c.CADir, "node-w")
	raw := bytes.Clone(badSig.Raw())
	raw[len(raw)-1] ^= 1
	badSigPEM := pem.EncodeToMemory(&pem.Block{Type: "SINC CERTIFICATE", Bytes: raw})
	if _, err := cert.ParsePEM(badSigPEM); err != nil {
		t.Fatalf("the bad-signature certificate does not even parse: %v", err)
	}
	var wrongFP cert.Fingerprint
	wrongFP[0] = 1
	for _, p := range []struct {
		node string
		rec  []byte
		pem  []byte
	}{
		{"node-x", record(t, "node-x", bAddr, other.Fingerprint()), other.EncodePEM()},
		{"node-y", record(t, "node-y", bAddr, wrongFP), mismatch.EncodePEM()},
		{"node-z", record(t, "node-z", bAddr, bCert.Fingerprint()), bCert.EncodePEM()},
		{"node-w", record(t, "node-w", bAddr, badSig.Fingerprint()), badSigPEM},
		{"node-g", []byte("{garbage"), nil},
		{"node-h", []byte(`{"v":1,"addresses":["` + bAddr + `"],"x":"` + strings.Repeat("x", 2000) + `"}`), nil},
	} {
		put(t, cli, "/sinc/nodes/"+p.node, p.rec)
		if p.pem != nil {
			put(t, cli, "/sinc/certs/"+p.node, p.pem)
		}
	}
	for _, tc := range []struct{ node, log string }{
		{"node-x", "unknown CA"},
		{"node-y", "its record names"},
		{"node-z", `is for node \"node-b\"`},
		{"node-w", "signature does not verify"},
		{"node-g", ""},
		{"node-h", ""},
	} {
		if tc.log != "" {
			knows(t, a, tc.node)
		}
		_, err := dialer(c.Nodes["node-a"]).DialContext(ctxT(t), tc.node+"/p1/echo")
		if !isOp(err, "dial", sinc.ErrUnreachable) {
			t.Errorf("open to %s: %v, want node_unreachable", tc.node, err)
			continue
		}
		if tc.log != "" {
			a.log.waitFor(t, time.Second, "registry certificate refused", "peer="+tc.node, tc.log)
		} else if !strings.Contains(err.Error(), "no record in the registry") {
			t.Errorf("open to %s: %v, want no record", tc.node, err)
		}
		ping(t, conn)
	}
	a.log.waitFor(t, time.Second, "registry record refused", "peer=node-g")
	a.log.waitFor(t, time.Second, "registry record refused", "peer=node-h", "more than 1024")
	if n := stats(t, a)["refused_registry_certificate"]; n != 4 {
		t.Errorf("refused_registry_certificate = %d, want 4", n)
	}
	if strings.Contains(b.log.String(), "peer handshake failed") {
		t.Error("node-b saw a handshake: a poisoned record was dialed")
	}
	openEcho(t, c.Nodes["node-a"], "node-b")
}

// TestRegistryReplacedCertificate: a certificate of a node that its
// record no longer names — one the node replaced, whose key may be in
// other hands — is refused in the handshake, though the CA signed it and
// nobody revoked it.
func TestRegistryReplacedCertificate(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")

	// The impostor holds another certificate of node-b, from the same CA.
	dir := t.TempDir()
	if _, err := cert.SignNode(c.CADir, dir, cert.NodeRequest{Node: "node-b", Partitions: []string{"p1"}, ValidFor: time.Hour}, time.Now()); err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := cert.NodeFiles(dir, "node-b")
	cfg, err := config.Load(c.Nodes["node-b"].Config)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Cert, cfg.Key = certPath, keyPath
	id, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer id.closeRegistry()
	conn, err := net.Dial("tcp", c.Nodes["node-a"].Listen)
	if err != nil {
		t.Fatal(err)
	}
	if l, err := link.Dial(conn, id.linkCfg, "node-a"); err == nil {
		l.Close(nil)
		t.Fatal("node-a took a link from a certificate node-b's record does not name")
	}
	a.log.waitFor(t, 2*time.Second, "peer handshake failed", "not as the registry records it", "is not the one its record names")
}

// TestRegistryMemberKilled: one member of three killed (SIGKILL) mid-test
// changes nothing a process sees: the open channel carries on, and a node
// started after the kill is linked to on demand within seconds.
func TestRegistryMemberKilled(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"}, regNode{name: "node-c"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	conn := openEcho(t, c.Nodes["node-a"], "node-b")

	ec.Kill(0)
	ping(t, conn)
	cAgent := startRegistryAgent(t, c.Nodes["node-c"])
	echo(t, listenOn(t, c.Nodes["node-c"], "echo"))
	start := time.Now()
	knows(t, a, "node-c")
	openEcho(t, c.Nodes["node-a"], "node-c")
	t.Logf("a node started after the kill was linked to %s later", time.Since(start))
	ping(t, conn)
	time.Sleep(3500 * time.Millisecond) // past a lease TTL: nothing expired
	for _, n := range []string{"node-b", "node-c"} {
		if _, ok := a.reg.Lookup(n); !ok {
			t.Errorf("%s gone from node-a's view after a member was killed", n)
		}
	}
	if _, ok := cAgent.reg.Lookup("node-a"); !ok {
		t.Error("node-a gone from node-c's view")
	}
	ping(t, conn)
}

// TestRegistryDownAndBack: etcd wholly down for longer than the lease TTL,
// then back. Meanwhile the open channel carries on, the agents keep their
// view, new links form on it, and sinc nodes says the registry is
// unreachable and why. Once etcd is back every record is in it again — the
// keepalive that closed is noticed, the lease granted anew — and the
// agents see each other again within a few seconds, for good.
func TestRegistryDownAndBack(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"}, regNode{name: "node-c"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	b := startRegistryAgent(t, c.Nodes["node-b"])
	cc := startRegistryAgent(t, c.Nodes["node-c"])
	for _, n := range []string{"node-b", "node-c"} {
		knows(t, a, n)
	}
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	echo(t, listenOn(t, c.Nodes["node-c"], "echo"))
	conn := openEcho(t, c.Nodes["node-a"], "node-b")

	ec.StopAll()
	down := time.Now()
	ping(t, conn)
	eventually(t, 3*time.Second, "node-a's registry unreachable", func() bool { return !a.reg.Status().Connected })
	for time.Since(down) < 4*time.Second { // past the lease TTL (3 s)
		ping(t, conn)
		time.Sleep(200 * time.Millisecond)
	}
	resp, err := admin.Query(ctxT(t), a.node.Admin, admin.Request{Op: "nodes"})
	if err != nil {
		t.Fatal(err)
	}
	if st := resp.Registry; st == nil || st.Connected || st.LastError == "" || !strings.Contains(st.LastError, "registry unreachable") {
		t.Errorf("sinc nodes during the outage: %+v", st)
	}
	if len(resp.Nodes) != 3 {
		t.Errorf("sinc nodes during the outage lists %d nodes, want the last view's 3", len(resp.Nodes))
	}
	// A new link, on the last view, while etcd is down.
	openEcho(t, c.Nodes["node-a"], "node-c")
	a.log.waitFor(t, time.Second, "registry unreachable; keeping the last view")

	ec.StartAll()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ec.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	cli := etcdClient(t, ec)
	eventually(t, 5*time.Second, "every record back in etcd", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		resp, err := cli.Get(ctx, "/sinc/nodes/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count == 3
	})
	eventually(t, 5*time.Second, "every agent's registry reachable", func() bool {
		return a.reg.Status().Connected && b.reg.Status().Connected && cc.reg.Status().Connected
	})
	t.Logf("records and agents back %s after etcd was healthy", time.Since(back))
	time.Sleep(4 * time.Second) // past a TTL: the records live under renewed leases
	for _, ta := range []*testAgent{a, b, cc} {
		if n := len(ta.reg.Nodes()); n != 3 {
			t.Errorf("%s sees %d nodes after the outage", ta.node.Name, n)
		}
		if st := ta.reg.Status(); !st.Published {
			t.Errorf("%s: record not published after the outage: %+v", ta.node.Name, st)
		}
	}
	ping(t, conn)
}

// signPolicy signs the rules' text with the CA of c under serial.
func signPolicy(t *testing.T, caDir string, serial uint64, body string) *cert.Policy {
	t.Helper()
	p, err := cert.SignPolicy(caDir, []byte(body), serial-1, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func policySerial(ta *testAgent) uint64 {
	ta.pol.mu.Lock()
	defer ta.pol.mu.Unlock()
	if ta.pol.doc == nil {
		return 0
	}
	return ta.pol.doc.Serial
}

// TestRegistryPolicy: the cluster policy is the registry's signed
// document. Before one is seen nothing crosses nodes; a published policy
// is in force on every agent within a second; a newer one that denies an
// open channel ends it (denied) within a second; an older one, or one of
// another CA, is refused and changes nothing; the newest is kept in the
// state folder and in force again at the next start.
func TestRegistryPolicy(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startAgent(t, c.Nodes["node-a"], nil)
	b := startAgent(t, c.Nodes["node-b"], nil)
	knows(t, a, "node-b")
	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	if _, err := dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-b/p1/echo"); !isOp(err, "dial", sinc.ErrDenied) {
		t.Fatalf("open before any policy: %v, want denied", err)
	}
	cli := etcdClient(t, ec)
	const allow = "[[allow]]\nfrom = \"node-a/p1\"\nto = \"node-b/p1/echo\"\n"
	p1 := signPolicy(t, c.CADir, 1, allow)
	start := time.Now()
	put(t, cli, "/sinc/policy", p1.EncodePEM())
	eventually(t, 2*time.Second, "policy 1 on both agents", func() bool { return policySerial(a) == 1 && policySerial(b) == 1 })
	d := time.Since(start)
	t.Logf("policy in force on both agents %s after its put", d)
	if d > time.Second {
		t.Errorf("policy in force after %s, more than 1s", d)
	}
	conn := openEcho(t, c.Nodes["node-a"], "node-b")

	p2 := signPolicy(t, c.CADir, 2, "[[allow]]\nfrom = \"node-a/p1\"\nto = \"node-b/p1/other\"\n")
	start = time.Now()
	put(t, cli, "/sinc/policy", p2.EncodePEM())
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err := io.ReadAll(conn)
	d = time.Since(start)
	if !errors.Is(err, sinc.ErrDenied) {
		t.Fatalf("open channel under a policy that denies it: %v, want denied", err)
	}
	t.Logf("channel ended, denied, %s after the policy's put", d)
	if d > time.Second {
		t.Errorf("channel ended after %s, more than 1s", d)
	}

	// Older, and another CA's: refused, the policy in force stays.
	put(t, cli, "/sinc/policy", p1.EncodePEM())
	a.log.waitFor(t, 2*time.Second, "cluster policy refused: older", "serial=1", "in_force_serial=2")
	foreign := certtest.NewCA(t)
	fp, err := cert.SignPolicy(foreign.Dir, []byte(allow), 9, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	put(t, cli, "/sinc/policy", fp.EncodePEM())
	a.log.waitFor(t, 2*time.Second, "cluster policy from the registry refused", "unknown CA")
	if policySerial(a) != 2 {
		t.Errorf("policy in force: serial %d, want 2", policySerial(a))
	}

	// A restart: the stored copy is in force before the registry answers.
	a.stop(t)
	delKey(t, cli, "/sinc/policy")
	a = startAgent(t, c.Nodes["node-a"], nil)
	if policySerial(a) != 2 {
		t.Errorf("after a restart: policy serial %d, want 2 from the state folder", policySerial(a))
	}
	a.log.waitFor(t, time.Second, "cluster policy restored from the state folder", "serial=2")
}

func delKey(t *testing.T, cli *clientv3.Client, key string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
}

// TestStaticNodes: without [registry] the agent's registry is its
// [peers]: sinc nodes lists them, configured, with their links (eager, as
// always), and sinc peers says idle for a link without channels.
func TestStaticNodes(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	a := startAgent(t, c.Nodes["node-a"], nil)
	startAgent(t, c.Nodes["node-b"], nil)
	waitUp(t, a, "node-b")
	resp, err := admin.Query(ctxT(t), a.node.Admin, admin.Request{Op: "nodes"})
	if err != nil {
		t.Fatal(err)
	}
	if st := resp.Registry; st.Backend != "static" || !st.Connected || st.Nodes != 1 {
		t.Errorf("static registry status %+v", st)
	}
	if len(resp.Nodes) != 1 || resp.Nodes[0].Node != "node-b" || resp.Nodes[0].Record != "configured" ||
		resp.Nodes[0].Link != "idle" || resp.Nodes[0].Addresses[0] != c.Nodes["node-b"].Listen || resp.Nodes[0].CertExpiry.IsZero() {
		t.Errorf("static nodes %+v", resp.Nodes)
	}
	if r := peerRow(t, a, "node-b"); r.State != "up" || r.Link != "idle" {
		t.Errorf("static peer row %+v", r)
	}
}

// TestRegistryRenewal: a node that renews its certificate puts its
// record again before it presents the new certificate, and links with it
// at once: the peer takes the new certificate on the record (read again
// from etcd if its view still names the old one), and its view follows.
func TestRegistryRenewal(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	c := registryCluster(t, ec, regTimers, regNode{name: "node-a"}, regNode{name: "node-b"})
	a := startRegistryAgent(t, c.Nodes["node-a"])
	b := startRegistryAgent(t, c.Nodes["node-b"])
	knows(t, a, "node-b")
	knows(t, b, "node-a")
	echo(t, listenOn(t, c.Nodes["node-a"], "echo"))
	old := b.linkConfig().Cert.Fingerprint()
	nc := renewCert(t, c, "node-b", time.Hour)
	eventually(t, 3*time.Second, "node-b presents its new certificate", func() bool {
		return b.linkConfig().Cert.Fingerprint() == nc.Fingerprint()
	})
	openEcho(t, c.Nodes["node-b"], "node-a")
	if l := linkOf(a, "node-b"); l == nil || l.Peer().Fingerprint() != nc.Fingerprint() {
		t.Errorf("node-a's link to node-b does not carry the new certificate")
	}
	eventually(t, 2*time.Second, "node-a's view names the new certificate", func() bool {
		n, _ := a.reg.Lookup("node-b")
		return n.Fingerprint == nc.Fingerprint() && n.Fingerprint != old
	})
}

// lagging is a registry whose view lags the store: Lookup answers from
// view, Refresh from store (or fails with err).
type lagging struct {
	registry.Static
	view, store map[string]registry.Node
	err         error
	refreshes   int
}

func (r *lagging) Lookup(name string) (registry.Node, bool) { n, ok := r.view[name]; return n, ok }

func (r *lagging) Refresh(_ context.Context, name string) (registry.Node, bool, error) {
	r.refreshes++
	if r.err != nil {
		return registry.Node{}, false, r.err
	}
	n, ok := r.store[name]
	return n, ok, nil
}

// TestCheckRecordReadsAgain: a handshake certificate the view does not
// name is checked against the record read again from the store — a
// renewal the watch has not brought yet is taken, a certificate the store
// does not name either is refused, and so is one when the store cannot be
// read; a certificate the view names needs no read.
func TestCheckRecordReadsAgain(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	cfg, err := config.Load(c.Nodes["node-a"].Config)
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.arena.Close()
	oldCert := issue(t, c.CADir, "node-b")
	newCert := issue(t, c.CADir, "node-b")
	node := func(c *cert.Certificate) registry.Node {
		return registry.Node{Name: "node-b", Addresses: []string{"127.0.0.1:1"}, Fingerprint: c.Fingerprint()}
	}
	r := &lagging{view: map[string]registry.Node{"node-b": node(oldCert)}, store: map[string]registry.Node{"node-b": node(newCert)}}
	a.reg, a.lazy = r, true
	if err := a.checkPeer(oldCert); err != nil || r.refreshes != 0 {
		t.Errorf("the view's certificate: %v, %d reads", err, r.refreshes)
	}
	if err := a.checkPeer(newCert); err != nil || r.refreshes != 1 {
		t.Errorf("a renewal the view lags: %v, %d reads", err, r.refreshes)
	}
	r.store["node-b"] = node(oldCert)
	if err := a.checkPeer(newCert); !errors.Is(err, errRegistry) || !strings.Contains(err.Error(), "is not the one its record names") {
		t.Errorf("a certificate the store does not name: %v", err)
	}
	delete(r.store, "node-b")
	if err := a.checkPeer(newCert); !errors.Is(err, errRegistry) || !strings.Contains(err.Error(), "has no record") {
		t.Errorf("a node the store does not have: %v", err)
	}
	r.err = registry.ErrUnreachable
	if err := a.checkPeer(newCert); !errors.Is(err, errRegistry) || !strings.Contains(err.Error(), "could not be read") {
		t.Errorf("the store unreachable: %v", err)
	}
}
