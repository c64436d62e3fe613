package agent

import (
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
)

// budgetSpecs: node-a hosts db and web, each with a listener; node-b (x)
// and node-c (y) may reach both; node-a/db may dial node-b/x/*. node-a's
// limits are small enough to reach each budget in a few channels.
var budgetSpecs = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"db", "web"}, Extra: `
[[allow]]
from = "node-[bc]/*"
to = "node-a/*/*"

[[allow]]
from = "node-a/db"
to = "node-b/x/*"

[limits]
channels = 64
accepted = 5
channels_per_partition = 2
accepted_per_partition = 4
accepted_per_node = 3
`},
	{Name: "node-b", Partitions: []string{"x"}, Extra: `
[[allow]]
from = "node-b/x"
to = "node-a/*/*"

[[allow]]
from = "node-a/db"
to = "node-b/x/*"
`},
	{Name: "node-c", Partitions: []string{"y"}, Extra: `
[[allow]]
from = "node-c/y"
to = "node-a/*/*"
`},
}

// TestAcceptedBudgets: remote dialers fill node-a's inbound budgets — one
// node its share, two nodes a partition's, then the agent's — and each is
// refused with a limit naming the budget, counted; all the while node-a/db's
// own processes dial out and within db, up to their own (dialed) budget,
// and another node still opens while one node holds its whole share.
func TestAcceptedBudgets(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), budgetSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, c.Nodes["node-a"], nil)
	b := startAgent(t, c.Nodes["node-b"], nil)
	cc := startAgent(t, c.Nodes["node-c"], nil)
	for _, peer := range []string{"node-b", "node-c"} {
		waitUp(t, a, peer)
	}
	waitUp(t, b, "node-a")
	waitUp(t, cc, "node-a")
	p := &pair{c: c}
	echo(t, p.listen(t, "node-a", "db", "svc"))
	echo(t, p.listen(t, "node-a", "web", "svc"))
	echo(t, p.listen(t, "node-b", "x", "echo"))
	if lim := a.cfg.Limits; lim.Accepted != 5 || lim.AcceptedPerNode != 3 || lim.AcceptedPerPartition != 4 || lim.ChannelsPerPartition != 2 {
		t.Fatalf("limits not as configured: %+v", lim)
	}

	var held []*sinc.Conn
	defer func() {
		for _, cn := range held {
			cn.Close()
		}
	}()
	// open dials addr from node/part and expects it to work or to fail
	// with a limit error naming want.
	open := func(node, part, addr, want string) {
		t.Helper()
		cn, err := p.dial(t, node, part, addr, sinc.Stream)
		if want == "" {
			if err != nil {
				t.Fatalf("%s/%s → %s: %v", node, part, addr, err)
			}
			buf := make([]byte, 4)
			if _, err := cn.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(cn, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("%s/%s → %s: echo %q %v", node, part, addr, buf, err)
			}
			held = append(held, cn)
			return
		}
		if err == nil {
			cn.Close()
			t.Fatalf("%s/%s → %s: opened past a budget (want %q)", node, part, addr, want)
		}
		var se *sinc.Error
		if !isOp(err, "dial", sinc.ErrLimit) || !errors.As(err, &se) || se.By != "node-a" || !strings.Contains(se.Message, want) {
			t.Fatalf("%s/%s → %s: %v; want a limit by node-a saying %q", node, part, addr, err, want)
		}
	}
	before := stats(t, a)

	// node-b takes its share of node-a and no more.
	for range 3 {
		open("node-b", "x", "node-a/db/svc", "")
	}
	open("node-b", "x", "node-a/db/svc", "node node-b holds 3 channels accepted here, the limit per node")
	open("node-b", "x", "node-a/web/svc", "node node-b holds 3 channels accepted here")
	// Another node still opens; with it, db's inbound budget is full.
	open("node-c", "y", "node-a/db/svc", "")
	open("node-c", "y", "node-a/db/svc", "partition db has 4 accepted channels open, its limit")
	// web still accepts, until the agent's inbound budget is spent.
	open("node-c", "y", "node-a/web/svc", "")
	open("node-c", "y", "node-a/web/svc", "the agent has 5 accepted channels open, its limit")

	// Through all of it, db's own processes dial out, and within db (whose
	// accepted end is db's own, not inbound), up to db's dialed budget.
	open("node-a", "db", "node-b/x/echo", "")
	open("node-a", "db", "node-a/db/svc", "")
	open("node-a", "db", "node-b/x/echo", "partition db has 2 channels open that its processes dialed, its limit")

	after := stats(t, a)
	for reason, n := range map[string]uint64{
		"open_accepted_limit_node": 2, "open_accepted_limit_partition": 1, "open_accepted_limit_agent": 1,
		"open_dialed_limit_partition": 1,
	} {
		if k := "refused_" + reason; after[k]-before[k] != n {
			t.Errorf("%s: %d more, want %d", k, after[k]-before[k], n)
		}
	}

	// Closing node-b's channels gives its share back: node-c opens again.
	for _, cn := range held[:3] {
		cn.Close()
	}
	held = held[3:]
	eventually(t, 5*time.Second, "node-b's channels gone from node-a", func() bool {
		for _, r := range conns(t, a) {
			if r.RemoteNode == "node-b" && !r.Dialed {
				return false
			}
		}
		return true
	})
	open("node-c", "y", "node-a/db/svc", "")

	// Everything closed: every budget is back to zero.
	for _, cn := range held {
		cn.Close()
	}
	held = nil
	eventually(t, 5*time.Second, "budgets back to zero", func() bool {
		bu := a.quotas
		bu.mu.Lock()
		defer bu.mu.Unlock()
		return len(bu.procs)+len(bu.dialed)+len(bu.accepted)+len(bu.byNode)+bu.inbound == 0
	})
}

// TestAcceptedWithinConfig: the agent takes its budgets from the config as
// parsed, a share (accepted) following its whole.
func TestAcceptedWithinConfig(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"p"},
		Extra: "[limits]\nchannels = 100\n"}}, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(c.Nodes["node-a"].Config)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Limits.Accepted != 75 {
		t.Fatalf("accepted = %d with channels = 100, want 75 (a quarter kept for dialed channels)", cfg.Limits.Accepted)
	}
}
