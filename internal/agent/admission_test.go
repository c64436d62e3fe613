package agent

import (
	"bufio"
	"encoding/json"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/local"
)

// TestAdmissionQueue drives the admission of one partition socket through
// every bound: the slots in all and per uid, the queue in all and per uid,
// the turns uids take, and the expiry of waiters, counting as it goes.
func TestAdmissionQueue(t *testing.T) {
	var mu sync.Mutex
	var gone []*waiter
	ad := newAdmission(3, 2, 4, 2, 200*time.Millisecond, func(ws []*waiter) {
		mu.Lock()
		gone = append(gone, ws...)
		mu.Unlock()
	})
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { ad.run(stop); close(done) }()
	defer func() { close(stop); <-done }()

	w := func(uid uint32) *waiter { return &waiter{uid: uid, accepted: time.Now()} }
	u1 := []*waiter{w(1), w(1), w(1), w(1), w(1)}
	u2 := []*waiter{w(2), w(2), w(2)}
	u3 := w(3)
	for i, tc := range []struct {
		w    *waiter
		want verdict
	}{
		{u1[0], serveNow},
		{u1[1], serveNow},
		{u1[2], queued}, // uid 1 has its 2 slots
		{u1[3], queued},
		{u1[4], busyUID},  // uid 1 has its 2 places in the queue
		{u2[0], serveNow}, // the third slot
		{u2[1], queued},   // no slot left
		{u2[2], queued},   // the queue is full now (4)
		{u3, busyAll},
	} {
		if got := ad.admit(tc.w); got != tc.want {
			t.Fatalf("admit %d (uid %d) = %v, want %v", i, tc.w.uid, got, tc.want)
		}
	}
	if s, q := ad.counts(); s != 3 || q != 4 {
		t.Fatalf("serving %d, waiting %d; want 3, 4", s, q)
	}
	if len(ad.uids) != 2 {
		t.Fatalf("%d uids held, want 2: a refused uid holds nothing", len(ad.uids))
	}
	// Slots go round the uids in turn, oldest first within a uid, and
	// never past a uid's share.
	var order []*waiter
	for _, uid := range []uint32{1, 2, 1, 2} {
		n := ad.done(uid)
		if n == nil {
			t.Fatalf("done(%d) started no waiter", uid)
		}
		order = append(order, n)
	}
	if want := []*waiter{u1[2], u2[1], u1[3], u2[2]}; !slices.Equal(order, want) {
		t.Fatalf("waiters started out of turn: got uids %v", uidsOf(order))
	}
	if s, q := ad.counts(); s != 3 || q != 0 {
		t.Fatalf("serving %d, waiting %d; want 3, 0", s, q)
	}
	if n := ad.done(1); n != nil {
		t.Fatal("done with an empty queue started a waiter")
	}
	for _, uid := range []uint32{1, 2} {
		ad.done(uid)
	}
	if s, q := ad.counts(); s != 0 || q != 0 || len(ad.uids) != 0 {
		t.Fatalf("all done: serving %d, waiting %d, %d uids", s, q, len(ad.uids))
	}

	// Waiters leave the queue when their time runs out, counted from their
	// connect, and not before.
	for range 2 {
		ad.admit(w(7)) // the slots of uid 7
	}
	late := []*waiter{w(7), w(7)}
	for _, x := range late {
		if ad.admit(x) != queued {
			t.Fatal("not queued")
		}
	}
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	early := len(gone)
	mu.Unlock()
	if early != 0 {
		t.Fatalf("%d waiters expired before their time", early)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		mu.Lock()
		n := len(gone)
		mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 2 waiters expired", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if took := time.Since(late[1].accepted); took > time.Second {
		t.Fatalf("waiters expired after %s, their time is 200ms", took)
	}
	if !slices.Equal(gone, late) {
		t.Fatal("the wrong waiters expired")
	}
	if s, q := ad.counts(); s != 2 || q != 0 {
		t.Fatalf("after expiry: serving %d, waiting %d; want 2, 0", s, q)
	}

	// Closing hands back every waiter and admits no more.
	var waiters []*waiter
	for _, uid := range []uint32{9, 9, 8, 8} { // uid 9 takes the last slot
		x := w(uid)
		if ad.admit(x) == queued {
			waiters = append(waiters, x)
		}
	}
	out := ad.close()
	slices.SortFunc(out, func(x, y *waiter) int { return x.accepted.Compare(y.accepted) })
	if len(waiters) != 3 || !slices.Equal(out, waiters) {
		t.Fatalf("close returned uids %v, want the waiters %v", uidsOf(out), uidsOf(waiters))
	}
	if ad.admit(w(10)) != admitClosing {
		t.Fatal("admitted after close")
	}
	if ad.done(9) != nil {
		t.Fatal("started a waiter after close")
	}
}

func uidsOf(ws []*waiter) []uint32 {
	var out []uint32
	for _, w := range ws {
		out = append(out, w.uid)
	}
	return out
}

func (v verdict) String() string {
	return [...]string{"serveNow", "queued", "busyUID", "busyAll", "admitClosing"}[v]
}

// TestAdmissionOnSocket: the same bounds on a real partition socket, one
// uid (this process's): a silent connection holds the uid's one slot, the
// next ones wait, the one past the uid's share of the queue gets busy at
// once, counted; a waiter that sends its request is served as soon as the
// slot frees, and a silent waiter gets timeout at timers.request after its
// connect.
func TestAdmissionOnSocket(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	const request = 700 * time.Millisecond
	a := startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) {
		cfg.Timers.Request = request
		cfg.Limits.PendingRequests = 4
		cfg.Limits.PendingRequestsPerUID = 1
		cfg.Limits.QueuedRequests = 10
		cfg.Limits.QueuedRequestsPerUID = 2
	})
	sock := c.Nodes["node-a"].Partitions["web"]
	dial := func() net.Conn {
		t.Helper()
		s, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	answer := func(s net.Conn, wait time.Duration) *local.Response {
		t.Helper()
		s.SetReadDeadline(time.Now().Add(wait))
		line, err := bufio.NewReader(s).ReadBytes('\n')
		if err != nil {
			return nil
		}
		var r local.Response
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("answer %q: %v", line, err)
		}
		return &r
	}
	before := stats(t, a)

	silent := dial() // holds uid 0's one slot
	time.Sleep(50 * time.Millisecond)
	waiting := dial() // queued: sends its request at once
	waiting.Write([]byte(`{"v":2,"op":"conns"}` + "\n"))
	lingering := dial() // queued: never sends
	lingerStart := time.Now()
	over := dial() // past uid 0's share of the queue
	if r := answer(over, time.Second); r == nil || r.Error == nil || r.Error.Code != "busy" ||
		!strings.Contains(r.Error.Message, "its share") {
		t.Fatalf("past the uid's share of the queue: %+v", r)
	}
	if r := answer(waiting, 100*time.Millisecond); r != nil {
		t.Fatalf("a waiter was served while the uid's slot was held: %+v", r)
	}
	// The silent one times out at its request time, and the waiter is
	// served then, its request read from the socket where it waited.
	if r := answer(silent, 2*request); r == nil || r.Error == nil || r.Error.Code != "timeout" {
		t.Fatalf("silent request: %+v", r)
	}
	if r := answer(waiting, time.Second); r == nil || !r.OK {
		t.Fatalf("the waiter after the slot freed: %+v", r)
	}
	r := answer(lingering, 2*request)
	if r == nil || r.Error == nil || r.Error.Code != "timeout" {
		t.Fatalf("silent waiter: %+v", r)
	}
	if took := time.Since(lingerStart); took > request+500*time.Millisecond {
		t.Fatalf("silent waiter answered %s after its connect; its time is %s", took, request)
	}
	after := stats(t, a)
	if k := "refused_request_queue_full_uid"; after[k] != before[k]+1 {
		t.Errorf("%s: %d → %d, want one more", k, before[k], after[k])
	}
	a.log.waitFor(t, time.Second, "partition request refused", "reason=request_queue_full_uid", "uid=0")
	// All slots are free again: a client works.
	if _, err := sinc.Connections(ctxT(t), sock); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "admission back to empty", func() bool {
		s, q := a.partitions["web"].adm.counts()
		return s == 0 && q == 0
	})
}
