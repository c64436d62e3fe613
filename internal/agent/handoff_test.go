package agent

import (
	"testing"
	"time"

	"sinc.dev/sinc"
)

// maxHandOffs bounds the goroutines both agents start, together, for one
// open+close cycle of a stream channel between them: the process's request
// (serveLocal), the hand-over to the listener, a pump each side for the
// process's close, one goroutine each side that acknowledges the peer's
// fin and delivers it, and a few acknowledgements and close records that
// depend on timing: about 6.1. A fin that took a goroutine to acknowledge
// and another to deliver made 8.0.
const maxHandOffs = 7

// TestOpenCloseHandOffs counts the goroutines started per open+close cycle:
// each is a hand-off between threads that an open pays for in wake-ups.
func TestOpenCloseHandOffs(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "sink")
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	cycle := func() {
		c, err := p.dial(t, "node-a", "web", "node-b/db/sink", sinc.Stream)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	settled := func() {
		eventually(t, 5*time.Second, "every channel ended", func() bool {
			return len(p.a.tables.all()) == 0 && len(p.b.tables.all()) == 0
		})
		time.Sleep(2 * ackDelay) // delayed acknowledgements fire
	}
	for range 20 { // links, buffers and pools warm
		cycle()
	}
	settled()
	const n = 300
	before := p.a.started.Load() + p.b.started.Load()
	for range n {
		cycle()
	}
	settled()
	per := float64(p.a.started.Load()+p.b.started.Load()-before) / n
	t.Logf("%.2f goroutines started per open+close cycle (both agents)", per)
	if per > maxHandOffs {
		t.Errorf("%.2f goroutines started per open+close cycle, want at most %d", per, maxHandOffs)
	}
}
