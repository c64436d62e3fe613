package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// logBuffer collects an agent's log lines for assertions.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor waits until the log has a line containing every one of parts.
func (l *logBuffer) waitFor(t *testing.T, d time.Duration, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		for _, line := range strings.Split(l.String(), "\n") {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(line, p)
			}
			if ok {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q within %s; log:\n%s", parts, d, l.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testAgent is an agent running in this process.
type testAgent struct {
	*Agent
	node   *cluster.Node
	log    *logBuffer
	cancel context.CancelFunc
	done   chan error
}

var fastTimers = cluster.Timers{Handshake: "500ms", Keepalive: "100ms", DeadAfter: "500ms", DialMin: "20ms", DialMax: "200ms", Grace: "300ms"}

// testCluster lays out nodes named in names (partition "p1" each) in a
// temporary folder.
func testCluster(t *testing.T, names ...string) *cluster.Cluster {
	t.Helper()
	var specs []cluster.NodeSpec
	for _, n := range names {
		specs = append(specs, cluster.NodeSpec{Name: n, Partitions: []string{"p1"}})
	}
	c, err := cluster.Make(shortTempDir(t), specs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// shortTempDir returns a temporary folder with a short path: Unix socket
// paths are limited to 108 bytes.
func shortTempDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "sinc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func startAgent(t testing.TB, n *cluster.Node, edit func(*config.Config)) *testAgent {
	t.Helper()
	cfg, err := config.Load(n.Config)
	if err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(cfg)
	}
	logs := &logBuffer{}
	a, err := New(cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ta := &testAgent{Agent: a, node: n, log: logs, cancel: cancel, done: make(chan error, 1)}
	go func() { ta.done <- a.Run(ctx) }()
	t.Cleanup(func() { ta.stop(t) })
	// Wait for the admin socket: the agent is serving.
	for i := 0; ; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := admin.Query(ctx, n.Admin, admin.Request{Op: "peers"})
		cancel()
		if err == nil {
			break
		}
		if i > 200 {
			t.Fatalf("agent %s did not start; log:\n%s", n.Name, logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return ta
}

func (ta *testAgent) stop(t testing.TB) {
	ta.cancel()
	select {
	case err := <-ta.done:
		if err != nil {
			t.Errorf("agent %s: %v", ta.node.Name, err)
		}
		ta.done <- err // later calls return at once
	case <-time.After(10 * time.Second):
		buf := make([]byte, 4<<20)
		t.Fatalf("agent %s did not stop; goroutines:\n%s", ta.node.Name, buf[:runtime.Stack(buf, true)])
	}
	if t.Failed() {
		t.Logf("log of %s:\n%s", ta.node.Name, ta.log)
	}
}

func waitUp(t testing.TB, a *testAgent, peer string) *admin.PeerRow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := cluster.WaitPeer(ctx, a.node, peer, "up")
	if err != nil {
		t.Fatalf("%s→%s: %v\nlog:\n%s", a.node.Name, peer, err, a.log)
	}
	return r
}

// link returns the agent's current link to peer.
func (ta *testAgent) link(peer string) *link.Link {
	ta.mu.Lock()
	defer ta.mu.Unlock()
	return ta.peers[peer].link
}

func TestTwoAgentsLink(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	a := startAgent(t, c.Nodes["node-a"], nil)
	b := startAgent(t, c.Nodes["node-b"], nil)
	ra, rb := waitUp(t, a, "node-b"), waitUp(t, b, "node-a")
	if ra.CertExpiry.IsZero() || ra.Address != c.Nodes["node-b"].Listen {
		t.Fatalf("row %+v lacks expiry or address", ra)
	}
	// One link, the same one on both sides.
	la, lb := a.link("node-b"), b.link("node-a")
	if la.LocalAddr().String() != lb.RemoteAddr().String() {
		t.Fatalf("a's link %s, b's link from %s: not the same connection", la.LocalAddr(), lb.RemoteAddr())
	}
	if la.Initiator() == lb.Initiator() {
		t.Fatal("both sides think they dialed")
	}
	_ = rb
	st, err := os.Stat(c.Nodes["node-a"].Admin)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode %v, %v; want 0600", st.Mode().Perm(), err)
	}
	// Keepalives flow on an idle link, and the counters see them.
	time.Sleep(300 * time.Millisecond)
	r2 := waitUp(t, a, "node-b")
	if r2.FramesOut <= ra.FramesOut || r2.BytesIn <= ra.BytesIn {
		t.Fatalf("counters did not move on an idle link: before %+v after %+v", ra, r2)
	}
	// Shutdown removes the admin socket and tells the peer why.
	a.stop(t)
	if _, err := os.Stat(c.Nodes["node-a"].Admin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("admin socket left behind: %v", err)
	}
	b.log.waitFor(t, 2*time.Second, "peer link down", "agent shutting down")
}

// TestSimultaneousDial starts both agents at once, many times: each time
// they must settle on one link, the same on both sides, and stay on it.
func TestSimultaneousDial(t *testing.T) {
	for round := range 5 {
		c := testCluster(t, "node-a", "node-b")
		var a, b *testAgent
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); a = startAgent(t, c.Nodes["node-a"], nil) }()
		go func() { defer wg.Done(); b = startAgent(t, c.Nodes["node-b"], nil) }()
		wg.Wait()
		if a == nil || b == nil {
			t.FailNow() // startAgent said why
		}
		waitUp(t, a, "node-b")
		waitUp(t, b, "node-a")
		time.Sleep(150 * time.Millisecond) // let any duplicate settle
		la, lb := a.link("node-b"), b.link("node-a")
		if la == nil || lb == nil || la.LocalAddr().String() != lb.RemoteAddr().String() {
			t.Fatalf("round %d: sides disagree on the link", round)
		}
		time.Sleep(300 * time.Millisecond)
		if a.link("node-b") != la || b.link("node-a") != lb {
			t.Fatalf("round %d: link flapped", round)
		}
		a.stop(t)
		b.stop(t)
	}
}

func TestBogusConnectionsOnPeerPort(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	a := startAgent(t, c.Nodes["node-a"], nil)
	addr := c.Nodes["node-a"].Listen

	// Plain TCP garbage.
	g, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	g.Write([]byte("GET / HTTP/1.1\r\nHost: sinc\r\n\r\n"))
	a.log.waitFor(t, 3*time.Second, "peer handshake failed", "remote="+g.LocalAddr().String())
	g.Close()

	// A client that connects and says nothing is dropped at the handshake
	// timeout (500ms here).
	s, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1)
	_, err = s.Read(buf)
	if err == nil || time.Since(start) > 3*time.Second {
		t.Fatalf("silent client: read %v after %s, want a close after the handshake timeout", err, time.Since(start))
	}
	a.log.waitFor(t, time.Second, "peer handshake failed", "remote="+s.LocalAddr().String(), "timeout")
	s.Close()

	// 200 bogus connections while the real peer connects.
	var bogus []net.Conn
	for range 200 {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		bogus = append(bogus, conn)
	}
	defer func() {
		for _, c := range bogus {
			c.Close()
		}
	}()
	b := startAgent(t, c.Nodes["node-b"], nil)
	waitUp(t, a, "node-b")
	waitUp(t, b, "node-a")
}

// TestPendingHandshakeLimit fills the handshake table and checks that the
// excess is refused and named in the log, and that a real peer links once
// the idle ones time out.
func TestPendingHandshakeLimit(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	a := startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) {
		cfg.Limits.PendingHandshakes = 4
		delete(cfg.Peers, "node-b") // a only accepts: b must get through the limit
		cfg.Peers["node-b"] = config.Peer{Name: "node-b", Address: "127.0.0.1:1"}
	})
	var idle []net.Conn
	for range 10 {
		conn, err := net.Dial("tcp", c.Nodes["node-a"].Listen)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, conn)
	}
	defer func() {
		for _, c := range idle {
			c.Close()
		}
	}()
	a.log.waitFor(t, 2*time.Second, "too many handshakes in progress", "limit=4")
	b := startAgent(t, c.Nodes["node-b"], nil)
	waitUp(t, b, "node-a")
}

func TestUnconfiguredPeerRefused(t *testing.T) {
	c := testCluster(t, "node-a", "node-b", "node-c")
	a := startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) { delete(cfg.Peers, "node-c") })
	cc := startAgent(t, c.Nodes["node-c"], func(cfg *config.Config) { delete(cfg.Peers, "node-b") })
	a.log.waitFor(t, 3*time.Second, "not a configured peer", "peer=node-c")
	cc.log.waitFor(t, 3*time.Second, "peer dial failed", "refused by peer", "not a configured peer")
}

// attack handshakes with node-a as node-c (a real, configured identity)
// and sends raw bytes; node-a must drop that link, name the reason in its
// log, and keep its link to node-b.
func TestHostileFrames(t *testing.T) {
	c := testCluster(t, "node-a", "node-b", "node-c")
	a := startAgent(t, c.Nodes["node-a"], nil)
	b := startAgent(t, c.Nodes["node-b"], nil)
	waitUp(t, a, "node-b")
	lb := a.link("node-b")

	cfgC, err := config.Load(c.Nodes["node-c"].Config)
	if err != nil {
		t.Fatal(err)
	}
	hostile, err := New(cfgC, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	hdr := func(n uint32, typ byte) []byte { return append(binary.BigEndian.AppendUint32(nil, n), typ) }
	for _, tc := range []struct {
		name, reason string
		raw          []byte
	}{
		{"oversized", "frame larger than the maximum", hdr(link.MaxFrameLen+1, link.FrameControl)},
		{"truncated", "truncated frame", append(hdr(64, link.FrameControl), 1, 2, 3)},
		{"forged", "frame failed authentication", append(hdr(33, link.FrameControl), bytes.Repeat([]byte{7}, 32)...)},
	} {
		conn, err := net.Dial("tcp", c.Nodes["node-a"].Listen)
		if err != nil {
			t.Fatal(err)
		}
		l, err := link.Dial(conn, hostile.linkCfg, "node-a")
		if err != nil {
			t.Fatalf("%s: handshake: %v", tc.name, err)
		}
		conn.Write(tc.raw)
		conn.(*net.TCPConn).CloseWrite()
		a.log.waitFor(t, 3*time.Second, "peer link down", "peer=node-c", tc.reason)
		l.Close(nil)
	}
	if a.link("node-b") != lb {
		t.Fatal("the link to node-b was disturbed by node-c's bad frames")
	}
	waitUp(t, b, "node-a")
}

func TestAdminSocketBadRequests(t *testing.T) {
	c := testCluster(t, "node-a")
	a := startAgent(t, c.Nodes["node-a"], nil)
	ask := func(req string) string {
		conn, err := net.Dial("unix", c.Nodes["node-a"].Admin)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		conn.Write([]byte(req))
		if uc, ok := conn.(*net.UnixConn); ok {
			uc.CloseWrite()
		}
		var out bytes.Buffer
		out.ReadFrom(conn)
		return out.String()
	}
	for req, code := range map[string]string{
		"not json\n":                                    "bad_request",
		`{"v":1,"op":"peers"`:                           "bad_request", // no newline, then EOF
		`{"v":2,"op":"peers"}` + "\n":                   "bad_version",
		`{"v":1,"op":"keys"}` + "\n":                    "unknown_op",
		`{"v":1,"op":"peers","x":1}` + "\n":             "bad_request",
		strings.Repeat("x", admin.MaxRequest+10) + "\n": "too_large",
	} {
		if got := ask(req); !strings.Contains(got, `"code":"`+code+`"`) {
			t.Errorf("request %.30q: reply %q, want code %s", req, got, code)
		}
	}
	if got := ask(`{"v":1,"op":"peers"}` + "\n"); !strings.Contains(got, `"ok":true`) {
		t.Fatalf("a good request after bad ones: %q", got)
	}
	_ = a
}

func TestNewRefusesBadSetup(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	load := func() *config.Config {
		cfg, err := config.Load(c.Nodes["node-a"].Config)
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	cases := []struct {
		name string
		edit func(*config.Config)
		want string
	}{
		{"cert of another node", func(cfg *config.Config) { cfg.Cert, _ = cert.NodeFiles(c.Nodes["node-b"].Dir, "node-b") },
			`is for node "node-b"`},
		{"key of another node", func(cfg *config.Config) { _, cfg.Key = cert.NodeFiles(c.Nodes["node-b"].Dir, "node-b") },
			"does not match the public key"},
		{"partition not in cert", func(cfg *config.Config) {
			cfg.Partitions["rogue"] = config.Partition{Name: "rogue", Socket: "/tmp/x.sock"}
		}, `partition "rogue" is not in the node's certificate`},
		{"CA file is a node cert", func(cfg *config.Config) { cfg.CA = cfg.Cert }, "not a CA certificate"},
	}
	for _, tc := range cases {
		cfg := load()
		tc.edit(cfg)
		_, err := New(cfg, slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want %q", tc.name, err, tc.want)
		}
	}
	// A key file others can read is refused, naming file and mode.
	cfg := load()
	os.Chmod(cfg.Key, 0o644)
	_, err := New(cfg, slog.New(slog.DiscardHandler))
	var me *cert.KeyModeError
	if !errors.As(err, &me) || !strings.Contains(err.Error(), cfg.Key) || !strings.Contains(err.Error(), "0644") {
		t.Fatalf("loose key mode: err %v", err)
	}
}

func TestAdminSocketDirChecks(t *testing.T) {
	c := testCluster(t, "node-a")
	cfg, err := config.Load(c.Nodes["node-a"].Config)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(shortTempDir(t), "open")
	os.Mkdir(dir, 0o777)
	os.Chmod(dir, 0o777)
	cfg.Admin = filepath.Join(dir, "admin.sock")
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	err = a.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "must not be writable by group or others") {
		t.Fatalf("world-writable admin dir: %v", err)
	}

	// A live socket of another agent is not taken over.
	first := startAgent(t, c.Nodes["node-a"], nil)
	_ = first
	cfg2, _ := config.Load(c.Nodes["node-a"].Config)
	port, _ := cluster.FreePort()
	cfg2.Listen = fmt.Sprintf("127.0.0.1:%d", port)
	a2, err := New(cfg2, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := a2.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second agent on a live admin socket: %v", err)
	}
}
