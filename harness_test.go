package sinc_test

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/agent"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
)

// topology is where the two ends of the test channels live: the socket the
// dialing end uses, the socket the accepting end listens on, and the
// address of a service there.
type topology struct {
	name         string
	dial, listen string // partition sockets
	node, part   string // where the listener is: node/partition
}

func (tp topology) addr(service string) string { return tp.node + "/" + tp.part + "/" + service }

// onePartitionPair: two partitions of one node (startNode's n1/a → n1/b).
func onePartitionPair(t *testing.T) topology {
	n := startNode(t)
	return topology{name: "partitions", dial: n.n.Partitions["a"], listen: n.n.Partitions["b"], node: "n1", part: "b"}
}

// twoNodes: node-a/web → node-b/db, two agents in this process, linked.
func twoNodes(t *testing.T) topology {
	t.Helper()
	dir, err := os.MkdirTemp("", "sinc") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	specs := []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/*\"\n"},
		{Name: "node-b", Partitions: []string{"db"}, Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/*\"\n"},
	}
	c, err := cluster.Make(dir, specs, cluster.Timers{DialMin: "20ms", DialMax: "200ms"})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range c.Names() {
		runAgent(t, c.Nodes[name])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cluster.WaitPeer(ctx, c.Nodes["node-a"], "node-b", "up"); err != nil {
		t.Fatal(err)
	}
	if _, err := cluster.WaitPeer(ctx, c.Nodes["node-b"], "node-a", "up"); err != nil {
		t.Fatal(err)
	}
	return topology{name: "nodes", dial: c.Nodes["node-a"].Partitions["web"], listen: c.Nodes["node-b"].Partitions["db"], node: "node-b", part: "db"}
}

// runAgent runs n's agent in this process until the test ends.
func runAgent(t *testing.T, n *cluster.Node) {
	t.Helper()
	cfg, err := config.Load(n.Config)
	if err != nil {
		t.Fatal(err)
	}
	ag, err := agent.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ag.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// pairOn opens a channel of kind on tp through l (listening on service):
// the dialed end and the accepted end.
func pairOn(t testing.TB, tp topology, l *sinc.Listener, service string, kind sinc.Kind) (*sinc.Conn, *sinc.Conn, error) {
	accepted := make(chan *sinc.Conn, 1)
	aerr := make(chan error, 1)
	go func() {
		c, err := l.AcceptSinc()
		if err != nil {
			aerr <- err
			return
		}
		accepted <- c
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := (&sinc.Dialer{Socket: tp.dial, Kind: kind}).DialContext(ctx, tp.addr(service))
	if err != nil {
		return nil, nil, err
	}
	select {
	case s := <-accepted:
		return c, s, nil
	case err := <-aerr:
		c.Close()
		return nil, nil, err
	}
}

// mustPair is pairOn on a listener of its own, both ends closed when the
// test ends.
func mustPair(t *testing.T, tp topology, service string, kind sinc.Kind) (*sinc.Conn, *sinc.Conn) {
	t.Helper()
	l, err := (&sinc.ListenConfig{Socket: tp.listen}).Listen(context.Background(), service)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, s, err := pairOn(t, tp, l, service, kind)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		s.Close()
	})
	return c, s
}
