package agent

import (
	"errors"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/local"
)

// leakSpecs: node-a hosts db (no rights at all), ops (may try any node) and
// svc (a listener); node-b hosts x (which node-a does not admit) and
// trusted (which it does, to any partition); node-c is node-a's peer but is
// never started. node-b's own policy lets both its partitions try node-a.
var leakSpecs = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"db", "ops", "svc"}, Extra: `
[[allow]]
from = "node-a/ops"
to = "*/*/*"

[[allow]]
from = "node-b/trusted"
to = "node-a/*/*"
`},
	{Name: "node-b", Partitions: []string{"x", "trusted"}, Extra: `
[[allow]]
from = "node-b/*"
to = "node-a/*/*"
`},
	{Name: "node-c", Partitions: []string{"z"}},
}

// ipPort is anything that looks like an address with a port.
var ipPort = regexp.MustCompile(`[0-9]{1,3}(\.[0-9]{1,3}){3}(:[0-9]+)?|\[[0-9a-fA-F:]*\]:[0-9]+`)

// TestLeaksOfDeniedOpens (issue 11.10): a process or a peer that the policy
// does not allow gets "denied" whatever it names — a node that is no peer,
// a peer that is down, a partition that does not exist, one that does —
// so its answers tell it nothing of the cluster; one that is allowed gets
// the precise reason, which names no address.
func TestLeaksOfDeniedOpens(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), leakSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	open := func(cfg *configT) { cfg.Timers.Open = 500 * time.Millisecond }
	a := startAgent(t, c.Nodes["node-a"], open)
	b := startAgent(t, c.Nodes["node-b"], open)
	waitUp(t, a, "node-b")
	waitUp(t, b, "node-a")
	p := &pair{c: c, a: a, b: b}
	echo(t, p.listen(t, "node-a", "svc", "echo"))
	echo(t, p.listen(t, "node-b", "x", "echo"))

	var addrs []string // every address of the cluster, and its ports
	for _, n := range c.Nodes {
		addrs = append(addrs, n.Listen, n.Listen[strings.LastIndexByte(n.Listen, ':'):])
	}
	for _, tc := range []struct {
		name             string
		node, part, addr string
		want             error
		by               string
	}{
		// A local process with no rights.
		{"no rights, a node that is no peer", "node-a", "db", "node-z/p/s", sinc.ErrDenied, "node-a"},
		{"no rights, a peer that is down", "node-a", "db", "node-c/z/s", sinc.ErrDenied, "node-a"},
		{"no rights, a peer that is up", "node-a", "db", "node-b/x/echo", sinc.ErrDenied, "node-a"},
		// A local process with rights: the precise reason, no address.
		{"rights, a node that is no peer", "node-a", "ops", "node-z/p/s", sinc.ErrNoSuchNode, "node-a"},
		{"rights, a peer that is down", "node-a", "ops", "node-c/z/s", sinc.ErrUnreachable, "node-a"},
		// A peer's process that node-a's policy denies.
		{"denied peer, a partition that exists", "node-b", "x", "node-a/svc/echo", sinc.ErrDenied, "node-a"},
		{"denied peer, a partition that does not", "node-b", "x", "node-a/nope/echo", sinc.ErrDenied, "node-a"},
		// A peer's process that node-a's policy allows.
		{"allowed peer, a partition that does not exist", "node-b", "trusted", "node-a/nope/echo", sinc.ErrNoSuchPartition, "node-a"},
		{"allowed peer, a service that does not exist", "node-b", "trusted", "node-a/svc/nope", sinc.ErrNoSuchService, "node-a"},
	} {
		_, err := p.dial(t, tc.node, tc.part, tc.addr, sinc.Stream)
		var se *sinc.Error
		if !isOp(err, "dial", tc.want) || !errors.As(err, &se) || se.By != tc.by {
			t.Errorf("%s: %v; want %v by %s", tc.name, err, tc.want, tc.by)
			continue
		}
		for _, addr := range addrs {
			if strings.Contains(se.Message, addr) {
				t.Errorf("%s: the answer %q names %q", tc.name, se.Message, addr)
			}
		}
		if m := ipPort.FindString(se.Message); m != "" {
			t.Errorf("%s: the answer %q carries an address %q", tc.name, se.Message, m)
		}
	}
	// The address stays where the admin sees it: the log and sinc peers.
	a.log.waitFor(t, time.Second, "no link to the peer", "to=node-c/z/s", "err=")
	resp, err := admin.Query(ctxT(t), a.node.Admin, admin.Request{Op: "peers"})
	if err != nil {
		t.Fatal(err)
	}
	shown := false
	for _, r := range resp.Peers {
		shown = shown || r.Peer == "node-c" && r.Address == c.Nodes["node-c"].Listen
	}
	if !shown {
		t.Errorf("sinc peers does not show node-c's address: %+v", resp.Peers)
	}
}

// TestWithoutAddrs: the last net before an error reaches a process takes
// out any address a lower layer put in it, and the configured peers'.
func TestWithoutAddrs(t *testing.T) {
	a := &Agent{peers: map[string]*peer{"node-b": newPeer("node-b", "db.example.net:7701")}}
	a.log = slog.New(slog.DiscardHandler)
	for _, msg := range []string{
		`node "node-b": link closed: write tcp 127.0.0.1:41234->10.1.2.3:7702: broken pipe`,
		`node "node-b": link closed: read tcp [::1]:41234->[fe80::1%eth0]:7702: connection reset by peer`,
		`node "node-b": dial tcp: lookup db.example.net: no such host`,
		`node "node-b": dial tcp db.example.net:7701: i/o timeout`,
	} {
		e := a.withoutAddrs(&local.Error{Code: "node_unreachable", Message: msg, By: "node-a"})
		if m := ipPort.FindString(e.Message); m != "" || strings.Contains(e.Message, "db.example") {
			t.Errorf("%q became %q", msg, e.Message)
		}
		if !strings.Contains(e.Message, `node "node-b"`) || e.Code != "node_unreachable" || e.By != "node-a" {
			t.Errorf("%q lost more than its addresses: %+v", msg, e)
		}
	}
	clean := &local.Error{Code: "denied", Message: "policy of node-a does not allow node-a/web (uid 0) to reach node-b/db/pg"}
	if e := a.withoutAddrs(clean); e != clean {
		t.Errorf("a message without an address changed: %q", e.Message)
	}
}
