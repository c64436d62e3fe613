package agent

import (
	"net"
	"slices"
	"sync"
	"time"
)

// Admission of requests on a partition socket: who gets read, and when.
//
//	accept ─ SO_PEERCRED uid ─┬─ a slot free, in all and for the uid ──→ serve
//	                          ├─ else room in the queue, in all and ───→ wait
//	                          │  for the uid
//	                          └─ else ─────────────────────────────────→ busy
//
//	a served request read (or failed) ─→ its slot goes to the next waiting
//	                                     uid in turn that is under its share
//	a waiter's time runs out           ─→ timeout (timers.request, counted
//	                                      from its connect, as when served)
//
// Slots are limits.pending_requests, at most limits.pending_requests_per_uid
// of them for one uid; the queue holds limits.queued_requests, at most
// limits.queued_requests_per_uid of one uid. Waiters hold no goroutine:
// their socket, an entry in their uid's queue (first come, first served
// within a uid; uids take turns); one goroutine per partition socket (run)
// answers those whose time ran out. So a uid that floods a socket with silent connections fills its
// own share and gets busy answers, while other uids are read at once, and a
// burst of opens from one process waits its turn instead of being refused.
//
// admission.mu is a leaf lock; nothing under it blocks or does I/O.
type admission struct {
	slots, slotsPerUID int
	queue, queuePerUID int
	timeout            time.Duration
	expire             func([]*waiter) // answers waiters whose time ran out

	mu      sync.Mutex
	serving int
	waiting int
	uids    map[uint32]*uidShare // uids serving or waiting
	turns   []uint32             // uids with waiters, in turn order
	turn    int                  // the next uid's place in turns
	closed  bool
	wake    chan struct{} // run: the queue was empty and is not
}

// uidShare is one uid's requests on a partition socket.
type uidShare struct {
	serving int
	queue   []*waiter // oldest first
}

// waiter is a process connection that has not been read yet.
type waiter struct {
	conn     *net.UnixConn
	uid      uint32
	accepted time.Time
}

// verdict is what admit decided.
type verdict int

const (
	serveNow     verdict = iota
	queued               // waits for a slot
	busyUID              // the uid's share of the queue is full
	busyAll              // the queue is full
	admitClosing         // the socket is closing
)

func newAdmission(slots, slotsPerUID, queue, queuePerUID int, timeout time.Duration, expire func([]*waiter)) *admission {
	return &admission{slots: slots, slotsPerUID: min(slotsPerUID, slots), queue: queue,
		queuePerUID: min(queuePerUID, queue), timeout: timeout, expire: expire, uids: map[uint32]*uidShare{},
		wake: make(chan struct{}, 1)}
}

// admit takes a new connection: serve it now (it holds a slot until done),
// queue it, or refuse it.
func (ad *admission) admit(w *waiter) verdict {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	if ad.closed {
		return admitClosing
	}
	u := ad.uids[w.uid]
	if u == nil {
		u = &uidShare{}
		ad.uids[w.uid] = u
	}
	switch {
	case len(u.queue) == 0 && ad.serving < ad.slots && u.serving < ad.slotsPerUID:
		ad.serving++
		u.serving++
		return serveNow
	case ad.waiting >= ad.queue:
		ad.forget(w.uid, u)
		return busyAll
	case len(u.queue) >= ad.queuePerUID:
		return busyUID // u has waiters: it stays
	}
	if len(u.queue) == 0 {
		ad.turns = append(ad.turns, w.uid)
	}
	u.queue = append(u.queue, w)
	if ad.waiting++; ad.waiting == 1 {
		// Waiters come in the order their time runs out: only the first
		// into an empty queue can be sooner than what run waits for.
		select {
		case ad.wake <- struct{}{}:
		default:
		}
	}
	return queued
}

// done gives back the slot of a served request of uid, and returns the
// waiter that takes a slot now, if any: the caller serves it.
func (ad *admission) done(uid uint32) *waiter {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	if u := ad.uids[uid]; u != nil {
		ad.serving--
		u.serving--
		ad.forget(uid, u)
	}
	if ad.closed {
		return nil
	}
	return ad.next()
}

// next takes the oldest waiter of the next uid in turn that is under its
// share of slots, if a slot is free.
func (ad *admission) next() *waiter {
	if ad.serving >= ad.slots {
		return nil
	}
	for i := range len(ad.turns) {
		at := (ad.turn + i) % len(ad.turns)
		uid := ad.turns[at]
		u := ad.uids[uid]
		if u.serving >= ad.slotsPerUID {
			continue
		}
		w := u.queue[0]
		u.queue[0] = nil
		u.queue = u.queue[1:]
		ad.waiting--
		ad.serving++
		u.serving++
		ad.turn = at + 1
		if len(u.queue) == 0 {
			u.queue = nil
			ad.turns = slices.Delete(ad.turns, at, at+1)
			ad.turn = at
		}
		if len(ad.turns) > 0 {
			ad.turn %= len(ad.turns)
		} else {
			ad.turn = 0
		}
		return w
	}
	return nil
}

// forget drops u when it holds nothing.
func (ad *admission) forget(uid uint32, u *uidShare) {
	if u.serving == 0 && len(u.queue) == 0 {
		delete(ad.uids, uid)
	}
}

// run answers the waiters whose time ran out, as it runs out, until stop
// is closed.
func (ad *admission) run(stop <-chan struct{}) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		var due <-chan time.Time
		if oldest, ok := ad.oldest(); ok {
			t.Reset(time.Until(oldest.Add(ad.timeout)))
			due = t.C
		}
		select {
		case <-stop:
			return
		case <-ad.wake:
		case <-due:
		}
		if out := ad.takeExpired(time.Now()); len(out) > 0 {
			ad.expire(out)
		}
	}
}

// oldest returns the connect time of the oldest waiter.
func (ad *admission) oldest() (time.Time, bool) {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	var oldest time.Time
	for _, uid := range ad.turns {
		if a := ad.uids[uid].queue[0].accepted; oldest.IsZero() || a.Before(oldest) {
			oldest = a
		}
	}
	return oldest, !oldest.IsZero()
}

// takeExpired takes the waiters whose time ran out by now out of the queue.
func (ad *admission) takeExpired(now time.Time) []*waiter {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	var out []*waiter
	for i := 0; i < len(ad.turns); {
		uid := ad.turns[i]
		u := ad.uids[uid]
		n := 0
		for n < len(u.queue) && !u.queue[n].accepted.Add(ad.timeout).After(now) {
			n++
		}
		out = append(out, u.queue[:n]...)
		clear(u.queue[:n])
		u.queue = u.queue[n:]
		ad.waiting -= n
		if len(u.queue) > 0 {
			i++
			continue
		}
		u.queue = nil
		ad.turns = slices.Delete(ad.turns, i, i+1)
		if ad.turn > i {
			ad.turn--
		}
		ad.forget(uid, u)
	}
	if len(ad.turns) > 0 {
		ad.turn %= len(ad.turns)
	} else {
		ad.turn = 0
	}
	return out
}

// close stops admitting and returns every waiter, for the caller to close.
func (ad *admission) close() []*waiter {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	ad.closed = true
	var out []*waiter
	for _, uid := range ad.turns {
		u := ad.uids[uid]
		out = append(out, u.queue...)
		u.queue = nil
		ad.forget(uid, u)
	}
	ad.turns, ad.turn, ad.waiting = nil, 0, 0
	return out
}

// counts returns the requests being served and waiting, for tests and
// stats.
func (ad *admission) counts() (serving, waiting int) {
	ad.mu.Lock()
	defer ad.mu.Unlock()
	return ad.serving, ad.waiting
}
