package agent

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/wire"
)

// TestChannelStateInterleavings drives the channel state machine of node-a
// through random interleavings of what ends, accepts, resumes and rekeys a
// channel, from a hostile peer (node-c, played by the test with its real
// identity) and an honest one (node-b, a real agent), while the local
// processes close channels at random:
//
//   - Opens, and Closes naming a channel right behind its Open (before or
//     while node-a accepts it), duplicate Opens;
//   - Credits with any grant and acknowledgement, Rekeys of any epoch, data
//     frames sealed right or not;
//   - node-c's link closed and dialed again by the same instance (resume)
//     or by a new one (a restart: every node-c channel ends);
//   - node-b dialing, writing and closing; its link cut; node-b restarted.
//
// After every run it checks the invariants: no panic (the agents still
// serve), every channel ended on both agents (their tables are empty), no
// key left (the key memory holds the node key alone), and every count back
// to zero (channels per partition and process, the memory budget). The
// sequence of actions comes from a seed (SINC_SEED to repeat one); the
// goroutines' interleaving is the scheduler's.
func TestChannelStateInterleavings(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SINC_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("SINC_SEED: %v", err)
		}
	}
	t.Logf("seed %d (SINC_SEED=%d repeats this sequence of actions)", seed, seed)
	runs, steps := 12, 400
	if testing.Short() {
		runs = 3
	}
	e := startHostileEnv(t, true)
	t.Cleanup(func() { e.h.l.Close(errors.New("test over")) }) // the link of the last reconnect
	// A bystander: node-b's channel to an echo on node-a, carrying checked
	// messages through every run: the attacked agent serves its other
	// peer throughout, nothing lost, duplicated or reordered.
	ln, err := (&sinc.ListenConfig{Socket: e.c.Nodes["node-a"].Partitions["db"]}).Listen(ctxT(t), "echo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	echo(t, ln)
	rng := rand.New(rand.NewPCG(seed, seed>>1|1))
	total := 0
	for run := range runs {
		stopBystander := bystand(t, e, run)
		total += interleave(t, e, rand.New(rand.NewPCG(rng.Uint64(), rng.Uint64())), steps)
		stopBystander()
		quiesce(t, e, run)
		checkInvariants(t, e, run)
		if run%4 == 3 { // now and then node-b restarts, losing its channels
			e.b.stop(t)
			e.b = startAgent(t, e.c.Nodes["node-b"], nil)
			waitUp(t, e.a, "node-b")
		}
	}
	t.Logf("%d runs, %d actions", runs, total)
}

// bystand runs node-b's checked echo channel until the returned func is
// called, which fails the test if a message was lost, changed or
// reordered, or none went through.
func bystand(t *testing.T, e *hostileEnv, run int) func() {
	t.Helper()
	c, err := (&sinc.Dialer{Socket: e.c.Nodes["node-b"].Partitions["x"], Kind: sinc.Message}).DialContext(ctxT(t), "node-a/db/echo")
	if err != nil {
		t.Fatalf("run %d: the bystander's channel: %v", run, err)
	}
	stop := make(chan struct{})
	done := make(chan error, 1)
	var n int
	go func() {
		for ; ; n++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			m := fmt.Sprintf("run %d message %d", run, n)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if err := c.WriteMessage([]byte(m)); err != nil {
				done <- fmt.Errorf("write %q: %w", m, err)
				return
			}
			if got, err := c.ReadMessage(); err != nil || string(got) != m {
				done <- fmt.Errorf("sent %q, the echo read %q, %v", m, got, err)
				return
			}
		}
	}()
	return func() {
		t.Helper()
		close(stop)
		err := <-done
		c.Close()
		if err != nil {
			t.Fatalf("run %d: the bystander's channel: %v", run, err)
		}
		if n == 0 {
			t.Fatalf("run %d: no message of the bystander went through", run)
		}
	}
}

// interleave runs one round of random actions from the hostile peer, the
// honest peer and the local processes at once, and returns how many.
func interleave(t *testing.T, e *hostileEnv, rng *rand.Rand, steps int) int {
	var wg sync.WaitGroup
	seeds := [3]uint64{rng.Uint64(), rng.Uint64(), rng.Uint64()}
	stop := make(chan struct{})
	// The local process on node-a: accepts what it is handed, and closes
	// some at once, some later, some after reading.
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(seeds[0], 1))
		for {
			select {
			case c := <-e.sink.conns:
				switch r.IntN(3) {
				case 0:
					c.Close()
				case 1:
					go func() {
						c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
						c.ReadMessage()
						c.Close()
					}()
				default:
					e.sink.keep(c)
				}
			case <-stop:
				return
			}
		}
	}()
	// node-b: dials node-a/db/sink, writes, closes; cuts its link now and
	// then.
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(seeds[1], 2))
		var held []*sinc.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for range steps / 4 {
			switch n := r.IntN(10); {
			case n < 5:
				c, err := (&sinc.Dialer{Socket: e.c.Nodes["node-b"].Partitions["x"], Kind: sinc.Message}).DialContext(ctxT(t), "node-a/db/sink")
				if err != nil {
					continue // refused while links come and go: fine
				}
				c.WriteMessage([]byte("honest"))
				if r.IntN(2) == 0 {
					c.Close()
				} else {
					held = append(held, c)
				}
			case n < 8 && len(held) > 0:
				i := r.IntN(len(held))
				held[i].Close()
				held = append(held[:i], held[i+1:]...)
			case n == 8:
				if l := e.b.link("node-a"); l != nil {
					l.Close(errors.New("the test cut the link"))
				}
			}
		}
	}()
	// node-c, hostile, on this goroutine.
	n := hostileRound(t, e, rand.New(rand.NewPCG(seeds[2], 3)), steps)
	close(stop)
	wg.Wait()
	return n + steps/4
}

// hostileRound plays node-c for steps actions.
func hostileRound(t *testing.T, e *hostileEnv, r *rand.Rand, steps int) int {
	type opened struct {
		open *wire.Open
		ctr  uint64
	}
	var chans []*opened
	pick := func() *opened {
		if len(chans) == 0 {
			return nil
		}
		return chans[r.IntN(len(chans))]
	}
	send := func(msg []byte) {
		e.h.l.Send(msg) // a link closed under us: the next reconnect mends it
	}
	// accepts returns node-a's Accept of o, if it came.
	accepts := func(o *opened) *wire.Accept {
		e.h.mu.Lock()
		defer e.h.mu.Unlock()
		for i := len(e.h.ctl) - 1; i >= 0; i-- {
			if acc, err := wire.ParseAccept(e.h.ctl[i]); err == nil && acc.InitConn == o.open.Conn {
				return acc
			}
		}
		return nil
	}
	for range steps {
		switch n := r.IntN(100); {
		case n < 25: // open
			o := &opened{open: e.h.newOpen()}
			chans = append(chans, o)
			send(o.open.Marshal())
		case n < 40: // open, and close it at once, before node-a answers
			o := &opened{open: e.h.newOpen()}
			send(o.open.Marshal())
			send((&wire.Close{SrcConn: o.open.Conn, Code: wire.CodeClosed, Reason: "changed my mind"}).Marshal())
		case n < 48: // close one, named by our id alone or by node-a's
			if o := pick(); o != nil {
				c := &wire.Close{SrcConn: o.open.Conn, Code: wire.Code(r.IntN(18))}
				if acc := accepts(o); acc != nil && r.IntN(2) == 0 {
					c.Index, c.DstConn = acc.Index, acc.Conn
				}
				send(c.Marshal())
			}
		case n < 52: // the same Open again
			if o := pick(); o != nil {
				send(o.open.Marshal())
			}
		case n < 64: // credit, honest or not
			if o := pick(); o != nil {
				if acc := accepts(o); acc != nil {
					grants := []uint64{0, 1 << 20, 1 << 62, r.Uint64()}
					send((&wire.Credit{Index: acc.Index, DstConn: acc.Conn, SrcConn: o.open.Conn,
						Granted: grants[r.IntN(len(grants))], Ack: uint64(r.IntN(4)), Flags: byte(r.IntN(2))}).Marshal())
				}
			}
		case n < 72: // rekey, of the next epoch or any
			if o := pick(); o != nil {
				if acc := accepts(o); acc != nil {
					send((&wire.Rekey{Index: acc.Index, DstConn: acc.Conn, SrcConn: o.open.Conn,
						Epoch: uint16(r.IntN(3)), Key: testKey()}).Marshal())
				}
			}
		case n < 92: // data, sealed right or damaged
			if o := pick(); o != nil {
				if acc := accepts(o); acc != nil {
					h := wire.DataHeader{Index: acc.Index, Counter: o.ctr, SrcConn: o.open.Conn, DstConn: acc.Conn}
					f := sealFrame(testGCM(acc.Key[:]), h, asMessage([]byte("hostile data")))
					if r.IntN(4) == 0 {
						f[len(f)-1-r.IntN(20)] ^= 1
					} else {
						o.ctr++
					}
					e.h.l.SendData(f)
				}
			}
		case n < 97: // link closed; the same instance comes back: node-a resumes
			e.h = reconnectHostile(t, e, false)
		default: // node-c restarts: a new instance, and its channels end
			e.h = reconnectHostile(t, e, true)
			chans = nil
		}
		if r.IntN(8) == 0 {
			time.Sleep(time.Duration(r.IntN(2000)) * time.Microsecond)
		}
	}
	return steps
}

// reconnectHostile closes node-c's link and links again, as the same
// instance or a new one.
func reconnectHostile(t *testing.T, e *hostileEnv, restart bool) *hostile {
	t.Helper()
	e.h.l.Close(errors.New("the test reconnects"))
	<-e.h.done
	if restart {
		id := *e.id
		id.Instance = link.NewInstance()
		e.id = &id
	}
	var h *hostile
	deadline := time.Now().Add(5 * time.Second)
	for h == nil {
		conn, err := net.DialTimeout("tcp", e.a.node.Listen, time.Second)
		if err == nil {
			var l *link.Link
			if l, err = link.Dial(conn, e.id, "node-a"); err == nil {
				h = &hostile{l: l, done: make(chan struct{}), sig: make(chan struct{}, 1)}
				go func() {
					h.served = l.Serve(h)
					close(h.done)
				}()
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("node-c could not link again: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // node-a may still hold the link it replaces
	}
	return h
}

// quiesce ends everything of a run: node-c restarts (node-a ends its
// channels), node-b's and the listener's channels are closed.
func quiesce(t *testing.T, e *hostileEnv, run int) {
	t.Helper()
	e.h = reconnectHostile(t, e, true)
	e.sink.closeKept()
	eventually(t, 10*time.Second, fmt.Sprintf("run %d: every channel ended on node-a and node-b", run), func() bool {
		for {
			select {
			case c := <-e.sink.conns: // handed over after the run: close it
				c.Close()
				continue
			default:
			}
			break
		}
		return e.a.tables.len() == 0 && e.b.tables.len() == 0
	})
}

// checkInvariants checks that nothing of the run's channels is left.
func checkInvariants(t *testing.T, e *hostileEnv, run int) {
	t.Helper()
	for _, a := range []*testAgent{e.a, e.b} {
		select {
		case err := <-a.done:
			t.Fatalf("run %d: agent %s stopped: %v", run, a.node.Name, err)
		default:
		}
		if total, free := a.arena.Slots(); total-free != 1 {
			t.Fatalf("run %d: %s holds %d key slots with no channel open, want 1 (the node key)", run, a.node.Name, total-free)
		}
		eventually(t, 5*time.Second, fmt.Sprintf("run %d: %s gave back its memory budget", run, a.node.Name), func() bool {
			return peerBudgetsFree(a)
		})
		// A channel leaves the tables before its end gives back its
		// quotas: a moment later, they must all be back.
		var left string
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			q := a.quotas
			q.mu.Lock()
			counted := len(q.procs) + len(q.dialed) + len(q.accepted) + len(q.byNode) + q.inbound
			left = fmt.Sprintf("procs %v, dialed %v, accepted %v, by node %v, inbound %d", q.procs, q.dialed, q.accepted, q.byNode, q.inbound)
			q.mu.Unlock()
			if counted == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("run %d: %s still counts channels against its limits (%s)", run, a.node.Name, left)
			}
		}
	}
}

// peerBudgetsFree reports whether a's memory budget, and each peer's part
// of it, hold nothing.
func peerBudgetsFree(a *testAgent) bool {
	if a.budget.inUse() != 0 || a.self.bud.inUse() != 0 {
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range a.peers {
		if p.carrier.bud.inUse() != 0 {
			return false
		}
	}
	return true
}

// keep holds an accepted channel open until closeKept.
func (s *sink) keep(c *sinc.Conn) {
	s.mu.Lock()
	s.kept = append(s.kept, c)
	s.mu.Unlock()
}

// closeKept closes the channels keep holds.
func (s *sink) closeKept() {
	s.mu.Lock()
	kept := s.kept
	s.kept = nil
	s.mu.Unlock()
	for _, c := range kept {
		c.Close()
	}
}
