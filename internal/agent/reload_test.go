package agent

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/faultproxy"
)

// editConfig rewrites the config file at path with edit, in one step (a
// new file renamed over the old), so that the agent's watcher never reads
// half a file.
func editConfig(t *testing.T, path string, edit func(string) string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := edit(string(b))
	if s == string(b) {
		t.Fatalf("edit of %s changed nothing", path)
	}
	if err := os.WriteFile(path+".new", []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
}

// peerBlock is the config table of peer as cluster.Make writes it.
func peerBlock(c *cluster.Cluster, peer string) string {
	return fmt.Sprintf("\n[peers.%s]\naddress = %q\n", peer, c.Nodes[peer].Listen)
}

// pingPong exchanges numbered messages on cn until stop is closed, and
// reports the first failure (nil if none) and how many came back.
func pingPong(cn *sinc.Conn, stop <-chan struct{}) (done <-chan error, count *atomic.Int64) {
	errc := make(chan error, 1)
	count = new(atomic.Int64)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				errc <- nil
				return
			default:
			}
			want := fmt.Sprintf("ping %d", i)
			cn.SetDeadline(time.Now().Add(5 * time.Second))
			if err := cn.WriteMessage([]byte(want)); err != nil {
				errc <- fmt.Errorf("write %d: %w", i, err)
				return
			}
			if m, err := cn.ReadMessage(); err != nil || string(m) != want {
				errc <- fmt.Errorf("read %d: %q %v", i, m, err)
				return
			}
			count.Add(1)
		}
	}()
	return errc, count
}

// acceptOne accepts the next channel on l.
func acceptOne(t *testing.T, l *sinc.Listener) <-chan *sinc.Conn {
	ch := make(chan *sinc.Conn, 1)
	go func() {
		c, err := l.AcceptSinc()
		if err != nil {
			t.Errorf("accept: %v", err)
			close(ch)
			return
		}
		t.Cleanup(func() { c.Close() })
		ch <- c
	}()
	return ch
}

// endsWith waits up to within for c to fail with code target, and returns
// the error.
func endsWith(t *testing.T, c *sinc.Conn, within time.Duration, target error) *sinc.Error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	_, err := c.Read(make([]byte, 1))
	var se *sinc.Error
	if !errors.Is(err, target) || !errors.As(err, &se) {
		t.Fatalf("want %v within %s, got %v", target, within, err)
	}
	return se
}

// TestReloadAddsAndRemovesPeers: node-a starts without node-c in its
// config. Adding the peer to the file links the two (the agent notices the
// file change) and a channel to node-c works; removing it (Reload, as on
// SIGHUP) ends that channel on both agents with the reason, within a
// second, and node-a no longer links to node-c. A channel to node-b keeps
// flowing throughout.
func TestReloadAddsAndRemovesPeers(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-*/db/*"
`},
		{Name: "node-b", Partitions: []string{"db"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/*"
`},
		{Name: "node-c", Partitions: []string{"db"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-c/db/*"
`},
	}, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	na := c.Nodes["node-a"]
	block := peerBlock(c, "node-c")
	editConfig(t, na.Config, func(s string) string { return strings.Replace(s, block, "", 1) })
	p := &pair{c: c, a: startAgent(t, na, nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	nc := startAgent(t, c.Nodes["node-c"], nil)
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	echo(t, p.listen(t, "node-c", "db", "echo"))
	if _, err := p.dial(t, "node-a", "web", "node-c/db/echo", sinc.Message); !errors.Is(err, sinc.ErrNoSuchNode) {
		t.Fatalf("dial to node-c before it is a peer: %v", err)
	}
	nc.log.waitFor(t, 3*time.Second, "peer dial failed", "not a configured peer")

	stop := make(chan struct{})
	steady, pings := pingPong(p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message), stop)

	// Added to the file: node-a notices and links.
	editConfig(t, na.Config, func(s string) string { return s + block })
	waitUp(t, p.a, "node-c")
	waitUp(t, nc, "node-a")
	p.a.log.waitFor(t, time.Second, "peer added", "peer=node-c")
	cc := p.mustDial(t, "node-a", "web", "node-c/db/echo", sinc.Message)
	if err := cc.WriteMessage([]byte("hello node-c")); err != nil {
		t.Fatal(err)
	}
	if m, err := cc.ReadMessage(); err != nil || string(m) != "hello node-c" {
		t.Fatalf("echo through node-c: %q %v", m, err)
	}
	// And a channel whose node-c end is this test's, to see it end there.
	held := p.listen(t, "node-c", "db", "held")
	acc := acceptOne(t, held)
	hc := p.mustDial(t, "node-a", "web", "node-c/db/held", sinc.Stream)
	srv := <-acc

	// Removed: the channels end at both ends, saying why.
	editConfig(t, na.Config, func(s string) string { return strings.Replace(s, block, "", 1) })
	start := time.Now()
	if err := p.a.Reload(); err != nil {
		t.Fatal(err)
	}
	const why = "node node-c was removed from the configuration of node-a"
	for _, end := range []*sinc.Conn{cc, hc, srv} {
		se := endsWith(t, end, time.Second, sinc.ErrReset)
		if !strings.Contains(se.Message, why) || se.By != "node-a" {
			t.Fatalf("channel to a removed peer ended with %v", se)
		}
	}
	t.Logf("channels to the removed peer ended on both nodes %s after the reload", time.Since(start).Round(time.Millisecond))
	for _, r := range p.a.peerRows() {
		if r.Peer == "node-c" {
			t.Fatal("node-c still in node-a's peer table")
		}
	}
	eventually(t, 3*time.Second, "node-c without its link to node-a", func() bool {
		nc.mu.Lock()
		defer nc.mu.Unlock()
		return nc.peers["node-a"].link == nil
	})
	if _, err := p.dial(t, "node-a", "web", "node-c/db/echo", sinc.Message); !errors.Is(err, sinc.ErrNoSuchNode) {
		t.Fatalf("dial to node-c after its removal: %v", err)
	}
	before := pings.Load()
	time.Sleep(300 * time.Millisecond)
	close(stop)
	if err := <-steady; err != nil {
		t.Fatalf("the channel to node-b broke: %v", err)
	}
	if pings.Load() == before {
		t.Fatal("the channel to node-b stopped flowing")
	}
	t.Logf("channel to node-b: %d round trips throughout, none failed", pings.Load())
}

// TestReloadChangedAddress: a peer's new address is used from the next
// dial on; the link up stays up until then.
func TestReloadChangedAddress(t *testing.T) {
	p := startPair(t, channelSpecs)
	px, err := faultproxy.New("127.0.0.1:0", p.c.Nodes["node-b"].Listen)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	old := p.a.link("node-b")
	editConfig(t, p.c.Nodes["node-a"].Config, func(s string) string {
		return strings.Replace(s, peerBlock(p.c, "node-b"), fmt.Sprintf("\n[peers.node-b]\naddress = %q\n", px.Addr()), 1)
	})
	if err := p.a.Reload(); err != nil {
		t.Fatal(err)
	}
	if p.a.link("node-b") != old {
		t.Fatal("an address change replaced the link up")
	}
	old.Close(errors.New("test: cut"))
	eventually(t, 5*time.Second, "a link through the new address", func() bool {
		l := p.a.link("node-b")
		return l != nil && l != old && l.RemoteAddr().String() == px.Addr()
	})
	if px.Stats().Accepted == 0 {
		t.Fatal("the proxy at the new address saw no connection")
	}
}

// policySpecs: node-a hosts web and batch, node-b hosts db and cache; both
// agents allow web → db, web → cache and batch → db, and node-a allows web
// → batch.
var policySpecs = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"web", "batch"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/*"

[[allow]]
from = "node-a/web"
to = "node-b/cache/*"

[[allow]]
from = "node-a/batch"
to = "node-b/db/*"

[[allow]]
from = "node-a/web"
to = "node-a/batch/*"
`},
	{Name: "node-b", Partitions: []string{"db", "cache"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/*"

[[allow]]
from = "node-a/web"
to = "node-b/cache/*"

[[allow]]
from = "node-a/batch"
to = "node-b/db/*"
`},
}

// TestReloadEndsChannelsPolicyDenies: when a reload removes the rule that
// allowed open channels, they end within a second, code denied, both
// processes told by the agent whose policy changed: on the dialing
// agent's policy, on the accepting agent's, and for a channel within one
// node; the channels still allowed keep flowing.
func TestReloadEndsChannelsPolicyDenies(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), policySpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	stop := make(chan struct{})
	var once sync.Once
	defer once.Do(func() { close(stop) })
	steady, pings := pingPong(p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message), stop)

	// channel opens a channel from node-a/part to node/dpart/held and
	// returns both of its ends.
	channel := func(part, node, dpart string) (*sinc.Conn, *sinc.Conn) {
		held := p.listen(t, node, dpart, "held")
		acc := acceptOne(t, held)
		cn := p.mustDial(t, "node-a", part, node+"/"+dpart+"/held", sinc.Stream)
		srv := <-acc
		held.Close()
		return cn, srv
	}
	removeRule := func(node, from, to string) {
		t.Helper()
		rule := fmt.Sprintf("[[allow]]\nfrom = %q\nto = %q\n", from, to)
		editConfig(t, c.Nodes[node].Config, func(s string) string { return strings.Replace(s, rule, "", 1) })
	}
	agents := map[string]*testAgent{"node-a": p.a, "node-b": p.b}
	for _, tc := range []struct {
		name             string
		part, node, dest string // the channel
		policyOf         string // whose rule goes
		from, to         string
	}{
		{"dialing agent's policy", "web", "node-b", "cache", "node-a", "node-a/web", "node-b/cache/*"},
		{"accepting agent's policy", "batch", "node-b", "db", "node-b", "node-a/batch", "node-b/db/*"},
		{"within one node", "web", "node-a", "batch", "node-a", "node-a/web", "node-a/batch/*"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cn, srv := channel(tc.part, tc.node, tc.dest)
			removeRule(tc.policyOf, tc.from, tc.to)
			start := time.Now()
			if err := agents[tc.policyOf].Reload(); err != nil {
				t.Fatal(err)
			}
			for _, end := range []*sinc.Conn{cn, srv} {
				se := endsWith(t, end, time.Second, sinc.ErrDenied)
				if se.By != tc.policyOf || !strings.Contains(se.Message, "no longer allows") {
					t.Fatalf("ended with %v; want denied by %s", se, tc.policyOf)
				}
			}
			t.Logf("both ends told %s after the reload", time.Since(start).Round(time.Millisecond))
			if _, err := p.dial(t, "node-a", tc.part, tc.node+"/"+tc.dest+"/held", sinc.Stream); !errors.Is(err, sinc.ErrDenied) {
				t.Fatalf("a new open after the reload: %v", err)
			}
		})
	}
	if n := p.a.counters.refusedCount("denied_on_reload") + p.b.counters.refusedCount("denied_on_reload"); n < 3 {
		t.Fatalf("refused_denied_on_reload = %d, want at least 3", n)
	}
	before := pings.Load()
	time.Sleep(200 * time.Millisecond)
	once.Do(func() { close(stop) })
	if err := <-steady; err != nil {
		t.Fatalf("the channel still allowed broke: %v", err)
	}
	if pings.Load() == before {
		t.Fatal("the channel still allowed stopped flowing")
	}
	t.Logf("the channel still allowed: %d round trips throughout", pings.Load())
}
