package agent

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/etcdtest"
	"sinc.dev/sinc/internal/policy"
)

func init() { registryJitter = 0 } // tests start their agents one by one

// regTimers are fastTimers with a short link_idle.
var regTimers = func() cluster.Timers {
	t := fastTimers
	t.LinkIdle = "400ms"
	return t
}()

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

	echo(t, listenOn(t, c.Nodes["node-b"], "echo"))
	start := time.Now()
	conn, err := dialer(c.Nodes["node-a"]).DialContext(ctxT(t), "node-b/p1/echo")
	if err != nil {
		t.Fatalf("first open: %v", err)
	}
	t.Logf("first open, with its link, took %s", time.Since(start))
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
