package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/wire"
)

// The channel test cluster: node-a hosts web and batch, node-b hosts db and
// cache. node-a lets web reach anything on node-b and node-a/batch/*, and
// lets batch try node-b/db/*; node-b admits web to db only.
var channelSpecs = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"web", "batch"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/*/*"

[[allow]]
from = "node-a/web"
to = "node-a/batch/*"

[[allow]]
from = "node-a/batch"
to = "node-b/db/*"
`},
	{Name: "node-b", Partitions: []string{"db", "cache"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/*"
`},
}

// pair is two running agents of the channel test cluster, linked.
type pair struct {
	c    *cluster.Cluster
	a, b *testAgent
}

func startPair(t testing.TB, specs []cluster.NodeSpec) *pair {
	t.Helper()
	c, err := cluster.Make(shortTempDir(t), specs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	waitUp(t, p.a, "node-b")
	waitUp(t, p.b, "node-a")
	return p
}

// sock returns the socket of node/partition.
func (p *pair) sock(node, part string) string { return p.c.Nodes[node].Partitions[part] }

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// listen listens on service in node/partition.
func (p *pair) listen(t testing.TB, node, part, service string) *sinc.Listener {
	t.Helper()
	l, err := (&sinc.ListenConfig{Socket: p.sock(node, part)}).Listen(ctxT(t), service)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func (p *pair) dial(t testing.TB, node, part, addr string, kind sinc.Kind) (*sinc.Conn, error) {
	t.Helper()
	return (&sinc.Dialer{Socket: p.sock(node, part), Kind: kind}).DialContext(ctxT(t), addr)
}

func (p *pair) mustDial(t testing.TB, node, part, addr string, kind sinc.Kind) *sinc.Conn {
	t.Helper()
	c, err := p.dial(t, node, part, addr, kind)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echo serves l until it closes: every accepted channel's bytes (stream) or
// messages come back, then the write side is closed.
func echo(t *testing.T, l *sinc.Listener) {
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if c.Kind() == sinc.Message {
					for {
						m, err := c.ReadMessage()
						if err != nil {
							break
						}
						if c.WriteMessage(m) != nil {
							return
						}
					}
				} else if _, err := io.Copy(c, c); err != nil {
					return
				}
				c.CloseWrite()
			}()
		}
	}()
}

func random(t testing.TB, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// conns returns an agent's whole connection table through its admin socket.
func conns(t *testing.T, a *testAgent) []admin.ConnRow {
	t.Helper()
	resp, err := admin.Query(ctxT(t), a.node.Admin, admin.Request{Op: "conns"})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Conns
}

func stats(t *testing.T, a *testAgent) map[string]uint64 {
	t.Helper()
	resp, err := admin.Query(ctxT(t), a.node.Admin, admin.Request{Op: "stats"})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Counters
}

// eventually polls cond until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// roundTrip writes data on c, closes the write side, and returns all read.
func roundTrip(t *testing.T, c *sinc.Conn, data []byte) []byte {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	return got
}

func mustEqual(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: got %d bytes, want %d; differ", what, len(got), len(want))
	}
}

// isOp reports whether err is an *OpError of op wrapping target.
func isOp(err error, op string, target error) bool {
	var oe *sinc.OpError
	return errors.As(err, &oe) && oe.Op == op && errors.Is(err, target)
}

type configT = config.Config

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

// mutePeer plays a node's agent that links up and then ignores every
// channel message: the hostile or hung peer.
type mutePeer struct {
	ln    net.Listener
	mu    sync.Mutex
	links []*link.Link
	n     atomic.Int32
	wg    sync.WaitGroup
}

func (m *mutePeer) opens() int { return int(m.n.Load()) }

func (m *mutePeer) HandleControl(_ *link.Link, msg []byte) {
	if msg[0] == wire.OpOpen {
		m.n.Add(1)
	}
}

func (m *mutePeer) HandleData(*link.Link, []byte) {}

// startMutePeer listens as node n (with n's real identity).
func startMutePeer(t *testing.T, n, _ *cluster.Node) *mutePeer {
	t.Helper()
	cfg, err := config.Load(n.Config)
	if err != nil {
		t.Fatal(err)
	}
	id, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", n.Listen)
	if err != nil {
		t.Fatal(err)
	}
	m := &mutePeer{ln: ln}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			l, err := link.Accept(conn, id.linkCfg)
			if err != nil || l.Confirm() != nil {
				continue
			}
			m.mu.Lock()
			m.links = append(m.links, l)
			m.mu.Unlock()
			m.wg.Add(1)
			go func() { defer m.wg.Done(); l.Serve(m) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		m.mu.Lock()
		for _, l := range m.links {
			l.Close(errors.New("test over"))
		}
		m.mu.Unlock()
		m.wg.Wait()
	})
	return m
}
