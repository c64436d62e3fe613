package agent

import (
	"sync"
)

// The memory budget (limits.memory). A peer agent decides how much it
// sends and a process how fast it reads, so without a bound of the agent's
// own the bytes it buffers for channels — payloads received and not yet
// written to their process (the inbound queues), frames sent and not yet
// acknowledged (the retransmit buffers) — would be whatever peers and
// processes make them. The budget counts those bytes, and no channel holds
// a byte it could not take from it:
//
//   - a frame that arrives when the budget cannot take its payload is
//     dropped unopened into the queue and not acknowledged: the sender
//     sends it again later (retransmission timer), so nothing is lost;
//   - a channel that cannot take budget for a frame it would send stops
//     reading its process's socket until acknowledgements give some back;
//   - the windows a channel grants its peer shrink as the budget fills, so
//     that peers seldom send what would be dropped; and opens are refused
//     (`limit`) once only the reserve is left.
//
// A reserve (an eighth) is kept for channels that keep up — that have
// nothing queued for their process, or little unacknowledged — so that
// channels whose readers stopped, which hold their bytes, cannot take the
// last of it from channels that move data. Each peer has a budget of its
// own inside the agent's (three quarters), so one peer's channels cannot
// take all of it either.

// memBudget is a bound on bytes held, with a reserve. Safe for concurrent use.
type memBudget struct {
	mu      sync.Mutex
	limit   int64
	reserve int64 // only channels that keep up may use it
	used    int64
	peak    int64 // the most used at once
	waiters bool
	freed   chan struct{} // closed and replaced when bytes come back with waiters
}

func newBudget(limit, reserve int64) *memBudget {
	return &memBudget{limit: limit, reserve: reserve, freed: make(chan struct{})}
}

// take takes n bytes for a channel: from the shared part while it lasts,
// and from the reserve if the channel is not behind (it keeps up). It
// reports whether it took them.
func (b *memBudget) take(n int64, behind bool) bool {
	if b == nil || n <= 0 {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+n <= b.limit-b.reserve || (!behind && b.used+n <= b.limit) {
		b.used += n
		b.peak = max(b.peak, b.used)
		return true
	}
	return false
}

// release gives back n bytes.
func (b *memBudget) release(n int64) {
	if b == nil || n <= 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	if b.used < 0 {
		panic("agent: memory budget released more than it took")
	}
	if b.waiters {
		close(b.freed)
		b.freed = make(chan struct{})
		b.waiters = false
	}
	b.mu.Unlock()
}

// wait returns a channel closed when bytes next come back.
func (b *memBudget) wait() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.waiters = true
	return b.freed
}

// inUse returns the bytes held.
func (b *memBudget) inUse() int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// peakUse returns the most bytes held at once so far.
func (b *memBudget) peakUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peak
}

// spent reports whether only the reserve is left: no new channel opens.
func (b *memBudget) spent() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used >= b.limit-b.reserve
}

// window returns the window to grant a channel now, between lo and hi: a
// channel is offered at most a sixteenth of what is free — of the shared
// part, or with the reserve if it keeps up — so windows shrink as the
// budget fills.
func (b *memBudget) window(lo, hi int64, keepsUp bool) int64 {
	if b == nil {
		return hi
	}
	b.mu.Lock()
	free := b.limit - b.used
	if !keepsUp {
		free -= b.reserve
	}
	b.mu.Unlock()
	return min(max(free/16, lo), hi)
}

// budgets is the pair of budgets a channel takes from: its peer's and the
// agent's.
type budgets struct{ peer, agent *memBudget }

// take takes n bytes from both, or from neither.
func (bs budgets) take(n int64, behind bool) bool {
	if !bs.peer.take(n, behind) {
		return false
	}
	if !bs.agent.take(n, behind) {
		bs.peer.release(n)
		return false
	}
	return true
}

func (bs budgets) release(n int64) {
	bs.peer.release(n)
	bs.agent.release(n)
}

// wait returns channels closed when either budget gets bytes back.
func (bs budgets) wait() (<-chan struct{}, <-chan struct{}) {
	var p <-chan struct{}
	if bs.peer != nil {
		p = bs.peer.wait()
	}
	return p, bs.agent.wait()
}

func (bs budgets) window(lo, hi int64, keepsUp bool) int64 {
	return min(bs.peer.window(lo, hi, keepsUp), bs.agent.window(lo, hi, keepsUp))
}
