package agent

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// counters counts what the data path rejected, by reason, and what it
// passed; and every refusal elsewhere (peer port, partition sockets, opens),
// by reason. Fields are updated atomically.
type counters struct {
	unknownIndex, wrongIDs, badEpoch, auth, replay, outOfOrder, credit, malformed atomic.Uint64
	framesIn, framesOut, retransmits, opensOK, opensRefused                       atomic.Uint64
	resumes, graceExpired, rotations, rekeys, keyStalls                           atomic.Uint64
	duplicates, memoryDrops, resendAsks, timeouts                                 atomic.Uint64
	handshakesOK                                                                  atomic.Uint64 // handshakes on the peer port that succeeded

	// openLatency is the time from a process's open request to its
	// answer, for the opens that succeeded (the dialing side's view).
	openLatency latency

	mu      sync.Mutex
	refused map[string]*atomic.Uint64 // by reason; the reasons are constants of this package
}

// refuse counts one refusal for reason: a constant naming what was
// refused and why ("handshake_timeout", "request_busy", …), never a value
// from a peer or a process, so the set of keys stays bounded.
func (c *counters) refuse(reason string) {
	c.mu.Lock()
	n := c.refused[reason]
	if n == nil {
		if c.refused == nil {
			c.refused = map[string]*atomic.Uint64{}
		}
		n = new(atomic.Uint64)
		c.refused[reason] = n
	}
	c.mu.Unlock()
	n.Add(1)
}

// refusedCount returns the refusals counted for reason.
func (c *counters) refusedCount(reason string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := c.refused[reason]; n != nil {
		return n.Load()
	}
	return 0
}

func (c *counters) snapshot() map[string]uint64 {
	m := map[string]uint64{
		"rejected_unknown_index": c.unknownIndex.Load(),
		"rejected_wrong_ids":     c.wrongIDs.Load(),
		"rejected_bad_epoch":     c.badEpoch.Load(),
		"rejected_auth":          c.auth.Load(),
		"rejected_replay":        c.replay.Load(),
		"rejected_out_of_order":  c.outOfOrder.Load(),
		"retransmitted_frames":   c.retransmits.Load(),
		"channel_resumes":        c.resumes.Load(),
		"grace_expired":          c.graceExpired.Load(),
		"key_rotations":          c.rotations.Load(),
		"link_rekeys":            c.rekeys.Load(),
		"sends_stalled_for_key":  c.keyStalls.Load(),
		"rejected_credit":        c.credit.Load(),
		"rejected_malformed":     c.malformed.Load(),
		"data_frames_in":         c.framesIn.Load(),
		"data_frames_out":        c.framesOut.Load(),
		"opens_accepted":         c.opensOK.Load(),
		"opens_refused":          c.opensRefused.Load(),
		// Not rejections: copies of frames we had, sent again by a sender
		// that had not yet heard we had them (a resume, a retransmission).
		"duplicate_frames":      c.duplicates.Load(),
		"frames_dropped_memory": c.memoryDrops.Load(),
		"resend_requests":       c.resendAsks.Load(),
		"retransmit_timeouts":   c.timeouts.Load(),
		"handshakes_ok":         c.handshakesOK.Load(),
	}
	c.mu.Lock()
	for r, n := range c.refused {
		m["refused_"+r] = n.Load()
	}
	c.mu.Unlock()
	return m
}

// latency is a histogram of durations over fixed buckets (latencyBuckets),
// updated without a lock: its zero value is ready to use.
type latency struct {
	counts [len(latencyBuckets) + 1]atomic.Uint64 // per bucket, not cumulative; the last is +Inf
	sum    atomic.Int64                           // nanoseconds
}

// latencyBuckets are the upper bounds of the buckets: from an open between
// two partitions of one agent (about a millisecond on loopback) to an open
// that waited for a link to come up (timers.open, 5s by default).
var latencyBuckets = [...]time.Duration{
	250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond,
	5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond, time.Second,
	2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

func (l *latency) observe(d time.Duration) {
	i, _ := slices.BinarySearch(latencyBuckets[:], d) // the first bound ≥ d
	l.counts[i].Add(1)
	l.sum.Add(int64(d))
}

// read returns the cumulative count at each bucket's bound, the count of
// all, and the sum. The count is the buckets' total, so the three agree
// even while observations land.
func (l *latency) read() (cumulative [len(latencyBuckets)]uint64, count uint64, sum time.Duration) {
	for i := range l.counts {
		count += l.counts[i].Load()
		if i < len(cumulative) {
			cumulative[i] = count
		}
	}
	return cumulative, count, time.Duration(l.sum.Load())
}
