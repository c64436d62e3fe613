package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/etcdtest"
	"sinc.dev/sinc/internal/registry"
)

// TestRegistryFromEmptyEtcd goes from an empty etcd to two agent
// processes talking, as the README's "Running with etcd" does: sign and
// publish the cluster policy, start agents whose configs name etcd and no
// peers, and open a channel. On the way, sinc nodes and sinc peers show
// the registry and the links as the agent sees them.
func TestRegistryFromEmptyEtcd(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	eps := ec.Endpoints()
	var specs []cluster.NodeSpec
	for _, n := range []string{"node-a", "node-b"} {
		specs = append(specs, cluster.NodeSpec{Name: n, Partitions: []string{"p1"}, NoPeers: true,
			Extra: fmt.Sprintf("[registry]\netcd = [%q, %q, %q]\nlease_ttl = \"5s\"\n", eps[0], eps[1], eps[2])})
	}
	c, err := cluster.Make(t.TempDir(), specs, cluster.Timers{LinkIdle: "2s"})
	if err != nil {
		t.Fatal(err)
	}
	pol := filepath.Join(t.TempDir(), "policy.toml")
	if err := os.WriteFile(pol, []byte("[[allow]]\nfrom = \"node-a/p1\"\nto = \"node-b/p1/echo\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "ca", "policy", "--dir", c.CADir, "--file", pol, "--etcd", strings.Join(eps, ","))
	procs := startAgents(t, c)
	a, b := c.Nodes["node-a"], c.Nodes["node-b"]

	// sinc nodes: both records, the registry connected, this node's
	// record published.
	var got struct {
		Node     string           `json:"node"`
		Registry *registry.Status `json:"registry"`
		Nodes    []admin.NodeRow  `json:"nodes"`
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _, code := runIn("nodes", "--admin", a.Admin, "--json")
		if code == 0 && json.Unmarshal([]byte(out), &got) == nil && len(got.Nodes) == 2 && got.Registry.Published {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sinc nodes did not show both nodes: %s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got.Node != "node-a" || got.Registry.Backend != "etcd" || !got.Registry.Connected || got.Registry.LeaseTTL != 5 {
		t.Errorf("registry status %+v", got.Registry)
	}
	self, peer := got.Nodes[0], got.Nodes[1]
	if !self.Self || self.Node != "node-a" || self.CertExpiry.IsZero() || len(self.Fingerprint) != 64 || len(self.Instance) != 32 {
		t.Errorf("own row %+v", self)
	}
	if peer.Node != "node-b" || peer.Record != "current" || peer.Link != "unlinked" || peer.Addresses[0] != b.Listen {
		t.Errorf("node-b's row before any channel %+v", peer)
	}
	out := mustRun(t, "peers", "--admin", a.Admin)
	if !strings.Contains(out, "LINK") || !regexpLine(out, "node-b", b.Listen, "unlinked") {
		t.Errorf("sinc peers before any channel:\n%s", out)
	}

	// An open links, on demand.
	l, err := (&sinc.ListenConfig{Socket: b.Partitions["p1"]}).Listen(context.Background(), "echo")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if conn, err := l.Accept(); err == nil {
			conn.Write([]byte("hi"))
			conn.Close()
		}
	}()
	conn, err := (&sinc.Dialer{Socket: a.Partitions["p1"]}).DialContext(context.Background(), "node-b/p1/echo")
	if err != nil {
		t.Fatalf("open to node-b: %v", err)
	}
	defer conn.Close()
	out = mustRun(t, "peers", "--admin", a.Admin)
	if !regexpLine(out, "node-b", "up", "linked") {
		t.Errorf("sinc peers with a channel:\n%s", out)
	}
	out = mustRun(t, "nodes", "--admin", a.Admin)
	for _, want := range []string{"registry of node-a: etcd (" + eps[0], "state: connected since", "this node's record: published under lease",
		"node-a (self)", "NODE", "CERT EXPIRES"} {
		if !strings.Contains(out, want) {
			t.Errorf("sinc nodes lacks %q:\n%s", want, out)
		}
	}
	t.Logf("sinc nodes:\n%s", out)
	t.Logf("sinc peers:\n%s", mustRun(t, "peers", "--admin", a.Admin))
	if !regexpLine(out, "node-b", b.Listen, "current", "linked", "1") {
		t.Errorf("sinc nodes, node-b's line:\n%s", out)
	}
	conn.Close()

	// node-b's agent stopped: its record goes at once (the lease is
	// revoked); killed (kill -9): within the lease's TTL.
	if err := procs[1].Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	d := waitNodes(t, a, 1, 2*time.Second)
	t.Logf("node-b gone from node-a's view %s after a clean stop", d)
	pb, err := cluster.Start(bin, b)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pb.Stop(10 * time.Second) })
	waitNodes(t, a, 2, 10*time.Second)
	pb.Kill()
	d = waitNodes(t, a, 1, 8*time.Second)
	t.Logf("node-b gone from node-a's view %s after a kill (lease TTL 5s)", d)
	if d < 2*time.Second {
		t.Errorf("gone %s after a kill: sooner than the lease could run out", d)
	}

	// Static agents answer sinc nodes too.
	if _, errs, code := runIn("nodes"); code == 0 || !strings.Contains(errs, "--admin is required") {
		t.Errorf("sinc nodes without --admin: exit %d, %s", code, errs)
	}
}

// regexpLine reports whether a line of out has every one of words, in
// order.
func regexpLine(out string, words ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		rest, ok := line, true
		for _, w := range words {
			i := strings.Index(rest, w)
			if i < 0 {
				ok = false
				break
			}
			rest = rest[i+len(w):]
		}
		if ok {
			return true
		}
	}
	return false
}

// waitNodes waits until n's sinc nodes lists count nodes and returns how
// long that took.
func waitNodes(t *testing.T, n *cluster.Node, count int, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		out, _, code := runIn("nodes", "--admin", n.Admin, "--json")
		var got struct {
			Nodes []admin.NodeRow `json:"nodes"`
		}
		if code == 0 && json.Unmarshal([]byte(out), &got) == nil && len(got.Nodes) == count {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("sinc nodes of %s did not list %d nodes within %s: %s", n.Name, count, within, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
