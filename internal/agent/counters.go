package agent

import (
	"sync"
	"sync/atomic"
)

// counters counts what the data path rejected, by reason, and what it
// passed; and every refusal elsewhere (peer port, partition sockets, opens),
// by reason. Fields are updated atomically.
type counters struct {
	unknownIndex, wrongIDs, badEpoch, auth, replay, outOfOrder, credit, malformed atomic.Uint64
	framesIn, framesOut, retransmits, opensOK, opensRefused                       atomic.Uint64
	resumes, graceExpired, rotations, rekeys, keyStalls                           atomic.Uint64
	duplicates, memoryDrops, resendAsks, timeouts                                 atomic.Uint64

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
	}
	c.mu.Lock()
	for r, n := range c.refused {
		m["refused_"+r] = n.Load()
	}
	c.mu.Unlock()
	return m
}
