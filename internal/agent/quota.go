package agent

import (
	"fmt"
	"sync"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/ident"
)

// Channel quotas (config.Limits). A channel is counted at each of its ends
// on the side that made that end:
//
//	dialed end   (a local process opened it):  channels_per_process,
//	                                           channels_per_partition
//	accepted end (a peer, or another local     accepted_per_partition,
//	partition, opened it to a listener here):  accepted_per_node (the
//	                                           dialing node, this one
//	                                           included), accepted (agent)
//
// so inbound pressure never takes what a partition's own processes dial:
// a remote dialer meets accepted_per_node, all of them together
// accepted_per_partition and accepted, and the rest of the channel table
// (limits.channels − accepted) stays for dialed ends. The accepted end of
// a channel dialed within one partition is counted on its dialed end only:
// the partition spends its own budget on it, not its inbound one.
//
// quotas.mu is a leaf lock: nothing is taken under it.
type quotas struct {
	lim config.Limits

	mu       sync.Mutex
	procs    map[ident.Key]int // dialed, by process
	dialed   map[string]int    // dialed, by partition
	accepted map[string]int    // accepted, by partition
	byNode   map[string]int    // accepted, by dialing node
	inbound  int               // accepted, in the agent
}

func newQuotas(lim config.Limits) *quotas {
	return &quotas{lim: lim, procs: map[ident.Key]int{}, dialed: map[string]int{},
		accepted: map[string]int{}, byNode: map[string]int{}}
}

// quotaError is a channel refused by a budget: reason is the refusal
// counter's name.
type quotaError struct {
	reason, msg string
}

func (e *quotaError) Error() string { return e.msg }

// take counts one more channel end of process r: one it dialed (dialed),
// or one it accepted from node/part.
func (r *procRef) take(dialed bool, node, part string) error {
	b := r.a.quotas
	b.mu.Lock()
	var err *quotaError
	switch {
	case dialed:
		err = b.takeDialed(r)
	case !r.internal(node, part):
		err = b.takeInbound(r.part.name, node)
	}
	b.mu.Unlock()
	if err != nil {
		r.a.counters.refuse(err.reason)
		return err
	}
	return nil
}

// internal reports whether a channel from node/part was dialed within r's
// own partition.
func (r *procRef) internal(node, part string) bool {
	return node == r.a.cfg.Node && part == r.part.name
}

// takeDialed counts a dialed end.
func (b *quotas) takeDialed(r *procRef) *quotaError {
	if n := b.procs[r.key]; n >= b.lim.ChannelsPerProcess {
		return &quotaError{"open_dialed_limit_process",
			fmt.Sprintf("process %d has %d channels open, the limit per process", r.pid, n)}
	}
	if n := b.dialed[r.part.name]; n >= b.lim.ChannelsPerPartition {
		return &quotaError{"open_dialed_limit_partition",
			fmt.Sprintf("partition %s has %d channels open that its processes dialed, its limit", r.part.name, n)}
	}
	b.procs[r.key]++
	b.dialed[r.part.name]++
	return nil
}

// takeInbound counts an accepted end for partition part, dialed from node.
func (b *quotas) takeInbound(part, node string) *quotaError {
	switch {
	case b.byNode[node] >= b.lim.AcceptedPerNode:
		return &quotaError{"open_accepted_limit_node",
			fmt.Sprintf("node %s holds %d channels accepted here, the limit per node", node, b.byNode[node])}
	case b.accepted[part] >= b.lim.AcceptedPerPartition:
		return &quotaError{"open_accepted_limit_partition",
			fmt.Sprintf("partition %s has %d accepted channels open, its limit", part, b.accepted[part])}
	case b.inbound >= b.lim.Accepted:
		return &quotaError{"open_accepted_limit_agent",
			fmt.Sprintf("the agent has %d accepted channels open, its limit", b.inbound)}
	}
	b.byNode[node]++
	b.accepted[part]++
	b.inbound++
	return nil
}

// release gives back what take counted for the same arguments.
func (r *procRef) release(dialed bool, node, part string) {
	b := r.a.quotas
	b.mu.Lock()
	defer b.mu.Unlock()
	if dialed {
		decr(b.procs, r.key)
		decr(b.dialed, r.part.name)
		return
	}
	if r.internal(node, part) {
		return
	}
	decr(b.byNode, node)
	decr(b.accepted, r.part.name)
	b.inbound--
}

// decr counts one less for k, dropping k at zero so the maps hold only
// what is open.
func decr[K comparable](m map[K]int, k K) {
	if m[k]--; m[k] <= 0 {
		delete(m, k)
	}
}
