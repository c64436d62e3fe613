package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc/internal/config"
)

// flooder holds connections to a peer port the way an attacker outside
// the cluster would: from many loopback source addresses, each connection
// silent, slow or carrying a message 1 with a made-up mac1, and each one
// the server closes replaced after a short pause.
type flooder struct {
	addr   string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// floodPause is about how long a flood connection the server closed waits
// before it is replaced (jittered by up to as much again): short enough
// that a slot freed in a full table is taken again within a millisecond,
// long enough to bound the flood's churn, and this test's CPU.
const floodPause = 20 * time.Millisecond

func newFlooder(addr string) *flooder {
	ctx, cancel := context.WithCancel(context.Background())
	return &flooder{addr: addr, ctx: ctx, cancel: cancel}
}

// add keeps n connections from source address src, each behaving as
// behave does until the server closes it.
func (f *flooder) add(src string, n int, behave func(net.Conn)) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: time.Second}
	for range n {
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			for f.ctx.Err() == nil {
				if c, err := d.DialContext(f.ctx, "tcp", f.addr); err == nil {
					stop := context.AfterFunc(f.ctx, func() { c.Close() })
					behave(c)
					stop()
					c.Close()
				}
				select {
				case <-f.ctx.Done():
				case <-time.After(floodPause + mrand.N(floodPause)):
				}
			}
		}()
	}
}

func (f *flooder) stop() {
	f.cancel()
	f.wg.Wait()
}

// silent says nothing and waits for the close.
func silent(c net.Conn) {
	var b [1]byte
	c.Read(b[:])
}

// slow announces a message 1 and sends it one byte per 100ms: it would
// take five seconds.
func slow(c net.Conn) {
	if _, err := c.Write([]byte{0, 48}); err != nil {
		return
	}
	for range 48 {
		time.Sleep(100 * time.Millisecond)
		if _, err := c.Write([]byte{7}); err != nil {
			return
		}
	}
	silent(c)
}

// badMAC sends a well-formed message 1 with a random mac1.
func badMAC(c net.Conn) {
	m := make([]byte, 2+48)
	m[1] = 48
	rand.Read(m[2:])
	if _, err := c.Write(m); err != nil {
		return
	}
	silent(c)
}

// TestPeerPortFloodDoesNotStopRelinking: node-a dials node-b, which only
// accepts. Their link is cut from node-b's side five times without a
// flood and five times while some 300 connections from 74 other loopback
// addresses hold node-b's peer port — more than its 256 handshake slots,
// one source past its share of 8, a quarter of them slow, a few sending
// message 1s with a made-up mac1, each replaced soon after node-b closes
// it. node-b keeps the default handshake timeout (5s), as a real agent
// would. The link must come back about as fast under the flood as without
// it, node-b's handshake table must stay within its bound, and each kind
// of refusal must be counted.
func TestPeerPortFloodDoesNotStopRelinking(t *testing.T) {
	if testing.Short() {
		t.Skip("a flood of several hundred connections")
	}
	c := testCluster(t, "node-a", "node-b")
	b := startAgent(t, c.Nodes["node-b"], func(cfg *config.Config) {
		cfg.Peers["node-a"] = config.Peer{Name: "node-a", Address: "127.0.0.1:1"} // b only accepts
		cfg.Timers.Handshake = config.DefaultTimers.Handshake
	})
	a := startAgent(t, c.Nodes["node-a"], nil)
	waitUp(t, a, "node-b")
	if b.cfg.Limits.PendingHandshakes != 256 || b.cfg.Limits.PendingHandshakesPerSource != 8 {
		t.Fatalf("limits %+v: the test assumes the defaults", b.cfg.Limits)
	}

	// reform cuts the link at node-b and returns how long until both
	// sides hold a new one.
	reform := func() time.Duration {
		t.Helper()
		oldA, oldB := a.link("node-b"), b.link("node-a")
		start := time.Now()
		oldB.Close(errors.New("test: the link is cut"))
		for {
			la, lb := a.link("node-b"), b.link("node-a")
			if la != nil && la != oldA && lb != nil && lb != oldB {
				return time.Since(start)
			}
			if time.Since(start) > 10*time.Second {
				t.Fatalf("the link did not come back within 10s; node-b's counters: %v", b.counters.snapshot())
			}
			time.Sleep(time.Millisecond)
		}
	}
	const rounds = 5
	var calm, flooded []time.Duration
	for range rounds {
		calm = append(calm, reform())
	}

	f := newFlooder(c.Nodes["node-b"].Listen)
	defer f.stop()
	f.add("127.0.0.2", 16, silent) // one source past its 8
	for i := range 68 {
		behave := silent
		if i%4 == 0 {
			behave = slow
		}
		f.add(fmt.Sprintf("127.0.0.%d", 3+i), 4, behave)
	}
	for i := range 5 {
		f.add(fmt.Sprintf("127.0.0.%d", 71+i), 1, badMAC)
	}
	eventually(t, 10*time.Second, "the flood fills node-b's handshake table", func() bool { return b.pending.Len() == 256 })
	time.Sleep(300 * time.Millisecond) // the flood's turnover under way

	maxHeld := 0
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for f.ctx.Err() == nil {
			maxHeld = max(maxHeld, b.pending.Len())
			time.Sleep(time.Millisecond)
		}
	}()
	for range rounds {
		flooded = append(flooded, reform())
		time.Sleep(50 * time.Millisecond)
	}
	f.stop()
	<-sampled

	median := func(d []time.Duration) time.Duration {
		s := slices.Clone(d)
		slices.Sort(s)
		return s[len(s)/2]
	}
	t.Logf("link re-formed in %v without a flood (median %v), %v under it (median %v)",
		calm, median(calm), flooded, median(flooded))
	if bound := 4*median(calm) + 250*time.Millisecond; median(flooded) > bound || slices.Max(flooded) > 2*bound {
		t.Errorf("under the flood the link took %v (median %v) to come back; without it %v: want a median within %v and none past %v",
			flooded, median(flooded), median(calm), bound, 2*bound)
	}
	if maxHeld > 256 {
		t.Errorf("node-b held %d handshakes, past its bound of 256", maxHeld)
	}
	st := stats(t, b)
	for _, r := range []string{"handshake_evicted", "handshake_per_source", "handshake_bad_mac"} {
		if st["refused_"+r] == 0 {
			t.Errorf("refused_%s not counted; node-b's counters: %v", r, st)
		}
	}
	t.Logf("node-b refused: evicted %d, per_source %d, bad_mac %d, timeout %d, malformed %d",
		st["refused_handshake_evicted"], st["refused_handshake_per_source"], st["refused_handshake_bad_mac"],
		st["refused_handshake_timeout"], st["refused_handshake_malformed"])
}
