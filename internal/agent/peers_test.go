package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/faultproxy"
	"sinc.dev/sinc/internal/link"
)

// linkCounts is what happened to one agent's links to a peer.
type linkCounts struct {
	dials, ups, downs, rekeys uint64
	lastErr                   string
}

// quietCounts returns both agents' counts for each other at a moment when
// no rekey is under way: the link both use is younger than half of rekey,
// so neither side is due to dial its successor (a dial that straddled the
// moment would count on one side and not the other).
func quietCounts(t *testing.T, a, b *testAgent, rekey time.Duration) (ca, cb linkCounts) {
	t.Helper()
	get := func(ta *testAgent, peer string) (linkCounts, time.Time) {
		ta.mu.Lock()
		defer ta.mu.Unlock()
		p := ta.peers[peer]
		var started time.Time
		if p.link != nil {
			started = p.link.Started()
		}
		return linkCounts{p.dials, p.ups, p.downs, ta.counters.rekeys.Load(), p.lastErr}, started
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ca, sa := get(a, b.node.Name)
		cb, sb := get(b, a.node.Name)
		_, sa2 := get(a, b.node.Name)
		young := func(s time.Time) bool { return !s.IsZero() && time.Since(s) < rekey/2 }
		if young(sa) && young(sb) && sa2.Equal(sa) && ca.ups == cb.ups {
			return ca, cb
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("no quiet moment between rekeys within 10s")
	return
}

// TestRekeyIsOneHandshake: links rekeyed every 300ms under traffic on
// message channels: each rekey is exactly one handshake (one dial, on the
// side that dialed the link it replaces) and one new link on each side;
// the peer is never seen other than up, no rekey leaves a last error, and
// every message arrives in order.
func TestRekeyIsOneHandshake(t *testing.T) {
	const rekey = 300 * time.Millisecond
	timers := fastTimers
	timers.Rekey = rekey.String()
	c, err := cluster.Make(shortTempDir(t), channelSpecs, timers)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	waitUp(t, p.a, "node-b")
	waitUp(t, p.b, "node-a")
	echo(t, p.listen(t, "node-b", "db", "echo"))

	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	sent := make([]int, 4)
	for i := range sent {
		cn := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				want := fmt.Sprintf("%d/%d", i, j)
				cn.SetDeadline(time.Now().Add(10 * time.Second))
				if err := cn.WriteMessage([]byte(want)); err != nil {
					errs <- fmt.Errorf("channel %d: write %d: %w", i, j, err)
					return
				}
				m, err := cn.ReadMessage()
				if err != nil || string(m) != want {
					errs <- fmt.Errorf("channel %d: got %q (%v), want %q", i, m, err, want)
					return
				}
				sent[i]++
			}
		}()
	}

	a0, b0 := quietCounts(t, p.a, p.b, rekey)
	eventually(t, 15*time.Second, "12 rekeys", func() bool {
		return p.a.counters.rekeys.Load()+p.b.counters.rekeys.Load() >= a0.rekeys+b0.rekeys+12
	})
	a1, b1 := quietCounts(t, p.a, p.b, rekey)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	rekeys := (a1.rekeys - a0.rekeys) + (b1.rekeys - b0.rekeys)
	dials := (a1.dials - a0.dials) + (b1.dials - b0.dials)
	t.Logf("%d rekeys: %d handshakes; links up node-a %d, node-b %d; falls from up node-a %d, node-b %d; messages %v",
		rekeys, dials, a1.ups-a0.ups, b1.ups-b0.ups, a1.downs-a0.downs, b1.downs-b0.downs, sent)
	if dials != rekeys || a1.ups-a0.ups != rekeys || b1.ups-b0.ups != rekeys {
		t.Errorf("%d rekeys took %d handshakes and %d/%d new links (node-a/node-b): want one each per rekey",
			rekeys, dials, a1.ups-a0.ups, b1.ups-b0.ups)
	}
	if a1.downs != a0.downs || b1.downs != b0.downs {
		t.Errorf("the peer fell from up during rekeys: node-a %d times, node-b %d times", a1.downs-a0.downs, b1.downs-b0.downs)
	}
	// A rekey loses nothing, so its resume resends nothing the peer has
	// acknowledged; copies of frames in flight on the old link are counted
	// as duplicates, never as the replays an attack would make.
	for _, a := range []*testAgent{p.a, p.b} {
		s := stats(t, a)
		t.Logf("%s: %d resumes, %d frames retransmitted, %d duplicates", a.node.Name,
			s["channel_resumes"], s["retransmitted_frames"], s["duplicate_frames"])
		for _, k := range []string{"rejected_replay", "rejected_bad_epoch", "rejected_auth", "rejected_wrong_ids", "rejected_unknown_index"} {
			if s[k] != 0 {
				t.Errorf("%s counted %s %d during rekeys: an attack's counter moved by an honest rekey", a.node.Name, k, s[k])
			}
		}
	}
	// (A last error from before the link first came up — the peer's
	// agent not started yet — may stay: nothing failed since.)
	if a1.lastErr != a0.lastErr || b1.lastErr != b0.lastErr {
		t.Errorf("last error of a healthy link: node-a %q, node-b %q (before the rekeys: %q, %q)",
			a1.lastErr, b1.lastErr, a0.lastErr, b0.lastErr)
	}
}

// peerTimers are fastTimers with a slow redial: after a failed dial the
// dial loop sleeps at least half a second, so a peer found down stays down
// for a while.
func peerTimers() cluster.Timers {
	t := fastTimers
	t.DialMin, t.DialMax = "1s", "2s"
	return t
}

// TestDialDownPeerAnswersAtOnce: a process that dials a node whose link is
// down while the agent waits out its redial backoff is answered
// node_unreachable at once, not after timers.open (5s here), and the
// answer names no address of the peer.
func TestDialDownPeerAnswersAtOnce(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, peerTimers())
	if err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) { cfg.Timers.Open = 5 * time.Second })
	p := &pair{c: c, a: a}
	// node-b never runs: the first dial is refused and the loop backs off.
	eventually(t, 5*time.Second, "node-b down", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.peers["node-b"].state == stateDown
	})
	for range 3 {
		start := time.Now()
		_, err := p.dial(t, "node-a", "web", "node-b/db/echo", sinc.Stream)
		took := time.Since(start)
		var se *sinc.Error
		if !errors.Is(err, sinc.ErrUnreachable) || !errors.As(err, &se) || se.By != "node-a" {
			t.Fatalf("dial to a down node: %v", err)
		}
		if took > time.Second {
			t.Fatalf("node_unreachable took %s; the link was known down", took)
		}
		_, port, _ := net.SplitHostPort(c.Nodes["node-b"].Listen)
		if strings.Contains(err.Error(), port) || strings.Contains(err.Error(), "127.0.0.1") {
			t.Fatalf("the error to the process names the peer's address: %v", err)
		}
		t.Logf("answered in %s: %v", took, err)
	}
	if n := a.counters.refusedCount("node_unreachable"); n != 3 {
		t.Fatalf("refused_node_unreachable = %d, want 3", n)
	}
}

// TestDialWaitsForDialInProgress: a process that dials a node while a dial
// to it is under way (slow here: every byte to node-b is delayed 250ms, so
// the handshake takes about a second) waits for it and gets its channel;
// one that gives up meanwhile (closes its socket) ends the agent's wait at
// once, not when the link comes up or at timers.open.
func TestDialWaitsForDialInProgress(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, peerTimers())
	if err != nil {
		t.Fatal(err)
	}
	px, err := faultproxy.New("127.0.0.1:0", c.Nodes["node-b"].Listen)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	px.SetDelay(250 * time.Millisecond)
	slow := func(cfg *config.Config) {
		cfg.Timers.Open = 5 * time.Second
		cfg.Timers.Handshake, cfg.Timers.DeadAfter = 3*time.Second, 3*time.Second
		cfg.Peers["node-b"] = config.Peer{Name: "node-b", Address: px.Addr()}
	}
	p := &pair{c: c}
	p.b = startAgent(t, c.Nodes["node-b"], func(cfg *config.Config) {
		cfg.Timers.Handshake, cfg.Timers.DeadAfter = 3*time.Second, 3*time.Second
		cfg.Peers["node-a"] = config.Peer{Name: "node-a", Address: "127.0.0.1:1"} // node-a dials
	})
	echo(t, p.listen(t, "node-b", "db", "echo"))

	// A process that gives up while the first dial is under way.
	p.a = startAgent(t, c.Nodes["node-a"], slow)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err = (&sinc.Dialer{Socket: p.sock("node-a", "web")}).DialContext(ctx, "node-b/db/echo")
	cancel()
	if err == nil {
		t.Fatal("a dial with 100ms of patience was served before the link could be up")
	}
	gaveUp := time.Now()
	eventually(t, 400*time.Millisecond, "the agent stops waiting for the process that left", func() bool {
		p.a.localMu.Lock()
		defer p.a.localMu.Unlock()
		return len(p.a.localConns) == 0
	})
	t.Logf("the agent let go of the process %s after it left", time.Since(gaveUp).Round(time.Millisecond))

	// A patient process: it waits for the dial under way, and is served.
	p.a.mu.Lock()
	state := p.a.peers["node-b"].state
	p.a.mu.Unlock()
	if state != stateConnecting {
		t.Fatalf("peer node-b is %s; the test needs a dial under way", state)
	}
	start := time.Now()
	cn, err := p.dial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	if err != nil {
		t.Fatalf("dial while a dial is under way: %v", err)
	}
	defer cn.Close()
	t.Logf("served after %s, waiting for the link", time.Since(start).Round(time.Millisecond))
	if err := cn.WriteMessage([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	cn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := cn.ReadMessage(); err != nil || string(m) != "hello" {
		t.Fatalf("echo: %q %v", m, err)
	}
}

// TestGraceCountsFromLastFrameHeard: with keepalives every 100ms, a link
// found dead after 1s of silence and a grace of 1.5s, a path that goes
// silent ends the channels on both agents 1.5s after the last frame heard,
// not 1.5s after the link was found dead (2.5s).
func TestGraceCountsFromLastFrameHeard(t *testing.T) {
	const grace, deadAfter = 1500 * time.Millisecond, time.Second
	timers := fastTimers
	timers.Grace, timers.DeadAfter, timers.Keepalive = grace.String(), deadAfter.String(), "100ms"
	p, px := proxiedPair(t, timers)
	l := p.listen(t, "node-b", "db", "hold")
	cn := p.mustDial(t, "node-a", "web", "node-b/db/hold", sinc.Stream)
	srv := acceptNext(t, l)
	time.Sleep(300 * time.Millisecond) // keepalives flow on the idle link

	px.Blackhole(true)
	silent := time.Now() // the last frame either agent heard came at most a keepalive before
	ended := make(chan time.Duration, 2)
	for _, end := range []*sinc.Conn{cn, srv} {
		go func() {
			end.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := end.Read(make([]byte, 1))
			if !errors.Is(err, sinc.ErrReset) || !containsAll(err.Error(), "did not come back within 1.5s") {
				t.Errorf("after the grace period: %v", err)
			}
			ended <- time.Since(silent)
		}()
	}
	for range 2 {
		d := <-ended
		t.Logf("channel ended %s after the path went silent (grace %s, dead_after %s)", d.Round(time.Millisecond), grace, deadAfter)
		// The last frame was heard up to ~150ms before the path went
		// silent; the close record takes a moment to reach the process.
		if d < grace-300*time.Millisecond || d > grace+400*time.Millisecond {
			t.Errorf("channel ended %s after the last frames; want grace (%s) from the last frame heard", d, grace)
		}
	}
}

// TestFailedReplacementFallsBack: when a link that replaced the current one
// on the accepting side fails before the dialing side sent anything on it
// (its dial failed after the verdict, so it never took the link), the
// accepting side goes back to the link it was replacing, which the peer
// still uses: the peer never goes down and the channels keep flowing.
func TestFailedReplacementFallsBack(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	stop := make(chan struct{})
	steady, pings := pingPong(p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message), stop)
	eventually(t, 5*time.Second, "traffic", func() bool { return pings.Load() > 10 })
	cur := p.b.link("node-a")
	p.b.mu.Lock()
	downs := p.b.peers["node-a"].downs
	p.b.mu.Unlock()

	// A second link from node-a's agent instance, as its rekey would
	// dial, dropped right after node-b's verdict.
	conn, err := net.Dial("tcp", p.c.Nodes["node-b"].Listen)
	if err != nil {
		t.Fatal(err)
	}
	l, err := link.Dial(conn, p.a.linkConfig(), "node-b")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "node-b switched to the new link", func() bool { return p.b.link("node-a") != cur })
	l.Close(errors.New("test: the dial failed after the verdict"))
	eventually(t, 2*time.Second, "node-b back on the link it was replacing", func() bool { return p.b.link("node-a") == cur })
	before := pings.Load()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	if err := <-steady; err != nil {
		t.Fatalf("the channel broke: %v", err)
	}
	if pings.Load() == before {
		t.Fatal("the channel stopped flowing")
	}
	p.b.mu.Lock()
	defer p.b.mu.Unlock()
	if pb := p.b.peers["node-a"]; pb.downs != downs || pb.lastErr != "" {
		t.Fatalf("node-b's peer fell from up %d times, last error %q", pb.downs-downs, pb.lastErr)
	}
}
