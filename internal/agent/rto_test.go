package agent

import (
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// damageNext makes the next n data frames that node receives from a link
// arrive damaged by damage; it returns how many were damaged so far.
func damageNext(t *testing.T, node string, n int, damage func(frame []byte)) func() int {
	var mu sync.Mutex
	left, done := n, 0
	f := func(at string, frame []byte) {
		mu.Lock()
		defer mu.Unlock()
		if at != node || left == 0 {
			return
		}
		left--
		done++
		damage(frame)
	}
	linkFault.Store(&f)
	t.Cleanup(func() { linkFault.Store(nil) })
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return done
	}
}

// echoRoundTrip sends one message on c and waits for the echo, returning the
// round trip.
func echoRoundTrip(t *testing.T, c *sinc.Conn, m string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	if err := c.WriteMessage([]byte(m)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(start.Add(within))
	got, err := c.ReadMessage()
	if err != nil || string(got) != m {
		t.Fatalf("echo of %q: %q, %v (after %s)", m, got, err, time.Since(start).Round(time.Millisecond))
	}
	return time.Since(start)
}

// TestLostFrameRecovers: in request/response traffic a data frame that is
// lost on the way, with no frame behind it, is sent again at once when the
// receiver can tell it failed (a bit flipped in its payload: the receiver
// asks for it again), and after a retransmission timeout when it cannot (a
// bit flipped in its index: the frame names no channel). Before the fix
// nothing asked for it until the link was replaced, two minutes later.
func TestLostFrameRecovers(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	c := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	var rtt time.Duration
	for range 20 { // a measured round trip: the timer's base
		rtt = max(rtt, echoRoundTrip(t, c, "warm", 2*time.Second))
	}
	s := stats(t, p.b)

	damaged := damageNext(t, "node-b", 1, func(f []byte) { f[len(f)-1] ^= 0x10 }) // the tag
	took := echoRoundTrip(t, c, "payload damaged", 5*time.Second)
	if damaged() != 1 {
		t.Fatal("no frame was damaged")
	}
	t.Logf("a damaged payload: the round trip took %s (round trips before: up to %s)", took, rtt)
	if took > 250*time.Millisecond {
		t.Fatalf("a damaged frame took %s to recover; want a few round trips (the receiver asks for it again)", took)
	}
	if d := stats(t, p.b)["resend_requests"] - s["resend_requests"]; d < 1 {
		t.Fatalf("node-b did not ask for the damaged frame again")
	}

	s = stats(t, p.a)
	damaged = damageNext(t, "node-b", 1, func(f []byte) { f[8] ^= 0x40 }) // the receiver's index
	took = echoRoundTrip(t, c, "index damaged", 5*time.Second)
	if damaged() != 1 {
		t.Fatal("no frame was damaged")
	}
	t.Logf("a damaged index: the round trip took %s", took)
	if took < minRTO || took > 3*time.Second {
		t.Fatalf("a frame that names no channel took %s to recover; want a retransmission timeout (%s or more, backed off at most a few times)", took, minRTO)
	}
	if d := stats(t, p.a)["retransmit_timeouts"] - s["retransmit_timeouts"]; d < 1 {
		t.Fatal("node-a's retransmission timer did not fire")
	}
	// The channel goes on, in order, nothing lost or duplicated.
	for i := range 10 {
		echoRoundTrip(t, c, "after "+string(rune('0'+i)), 2*time.Second)
	}
	if st := stats(t, p.b); st["rejected_replay"] != 0 {
		t.Fatalf("node-b counted %d replays: retransmissions it asked for are not replays", st["rejected_replay"])
	}
}
