package agent

import (
	"cmp"
	"fmt"
	"net"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"sinc.dev/sinc/internal/buildinfo"
	"sinc.dev/sinc/internal/metrics"
	"sinc.dev/sinc/internal/wire"
)

// Metrics (config field metrics; served by package metrics). Everything is
// read when a scrape comes, from what the agent keeps anyway: the counters
// of sinc stats (counters.snapshot), the channel table, the peer table and
// the memory budget. The data path gains only what those did not have:
// per-partition byte counts (one atomic add per frame, shared by the
// partition's channels, never per channel), the handshakes that succeeded,
// and the open latency histogram (one observation per open).
//
// No metric carries a key or anything derived from one, and every label
// has a bound that traffic cannot raise:
//
//	partition   the node's partitions (its config, fixed at start)
//	kind        stream, message
//	state       channels: opening, open; peers: up, connecting, down
//	direction   in (to this node's processes, or read from peers), out
//	peer        the peers in the peer table: the configured ones, or with
//	            a registry the nodes this agent links to now (never the
//	            nodes it only knows of: sinc_peers counts those), never a
//	            dialing address
//	link        linked, idle, unlinked
//	reason      the constant reasons of sinc stats (counters.refuse and the
//	result      data path's rejections), never text from a peer or process
//
// and no label names a channel, a process or a uid.

var (
	descBuild = prometheus.NewDesc("sinc_build_info",
		"The agent's build: always 1, with the version, VCS revision and Go release as labels.",
		[]string{"node", "version", "revision", "goversion"}, nil)
	descChannels = prometheus.NewDesc("sinc_channels",
		"Channels in the channel table, by local partition, kind and state (opening: dialed, no answer yet).",
		[]string{"partition", "kind", "state"}, nil)
	descChannelBytes = prometheus.NewDesc("sinc_channel_bytes_total",
		"Payload bytes of the partition's channels: in, delivered to its processes; out, taken from them.",
		[]string{"partition", "direction"}, nil)
	descDataFrames = prometheus.NewDesc("sinc_data_frames_total",
		"Data frames: in, taken by the receive path (accepted); out, sealed and sent (retransmissions included).",
		[]string{"direction"}, nil)
	descRejected = prometheus.NewDesc("sinc_frames_rejected_total",
		"Data frames the receive path rejected, by reason (the rejected_<reason> counters of sinc stats).",
		[]string{"reason"}, nil)
	descRefusals = prometheus.NewDesc("sinc_refusals_total",
		"Refusals by reason (the refused_<reason> counters of sinc stats): handshakes, requests, opens, listens, limits.",
		[]string{"reason"}, nil)
	descHandshakes = prometheus.NewDesc("sinc_handshakes_total",
		"Handshakes on the peer port, by result: ok, or the reason it failed (also in sinc_refusals_total as handshake_<reason>).",
		[]string{"result"}, nil)
	descPeerState = prometheus.NewDesc("sinc_peer_state",
		"The state of the link to each peer in the peer table: 1 for the state it is in, 0 for the others.",
		[]string{"peer", "state"}, nil)
	descPeers = prometheus.NewDesc("sinc_peers",
		"Nodes this agent knows, by link: linked (an up link carrying channels), idle (an up link carrying none), unlinked (with a registry: known, no link).",
		[]string{"link"}, nil)
	descLinkFrames = prometheus.NewDesc("sinc_link_frames_total",
		"Frames on the links to a peer (control and data), each way.",
		[]string{"peer", "direction"}, nil)
	descLinkBytes = prometheus.NewDesc("sinc_link_bytes_total",
		"Bytes on the links to a peer, sealed, each way.",
		[]string{"peer", "direction"}, nil)
	descLinkDials = prometheus.NewDesc("sinc_link_dials_total",
		"Handshakes this agent began to a peer (first links, redials and rekeys).",
		[]string{"peer"}, nil)
	descLinkUps = prometheus.NewDesc("sinc_link_ups_total",
		"Links that became a peer's link (a rekey adds one at each side).",
		[]string{"peer"}, nil)
	descLinkDowns = prometheus.NewDesc("sinc_link_downs_total",
		"Times a peer's link went from up to another state.",
		[]string{"peer"}, nil)
	descOpenLatency = prometheus.NewDesc("sinc_open_duration_seconds",
		"Time from a local process's open request to its answer, for the opens that succeeded (dialing side).",
		nil, nil)
	descMemInUse = prometheus.NewDesc("sinc_memory_in_use_bytes",
		"Bytes buffered for channels now (payloads not yet written to their process, frames not yet acknowledged).", nil, nil)
	descMemPeak = prometheus.NewDesc("sinc_memory_peak_bytes",
		"The most bytes buffered for channels at once since the agent started.", nil, nil)
	descMemLimit = prometheus.NewDesc("sinc_memory_limit_bytes",
		"limits.memory: the most bytes the agent buffers for channels.", nil, nil)
)

// statCounters names the metric of each plain counter of sinc stats; the
// ones by reason (rejected_*, refused_*) and the directions are in
// statMetric.
var statCounters = map[string]*prometheus.Desc{}

func init() {
	for key, help := range map[string]string{
		"retransmitted_frames":  "Data frames sent again (asked for by the receiver, or on a retransmission timeout).",
		"retransmit_timeouts":   "Retransmission timers that fired.",
		"resend_requests":       "Requests to send again this agent made (a gap, a frame that failed to open, a new link).",
		"duplicate_frames":      "Copies of frames already received, sent again by a sender that had not heard they arrived.",
		"channel_resumes":       "Channels moved to a new link of their peer (after a broken link, or a rekey).",
		"grace_expired":         "Channels ended because their link did not come back within timers.grace.",
		"key_rotations":         "Channel keys replaced (a new epoch).",
		"link_rekeys":           "Links replaced by a fresh handshake (timers.rekey, limits.rekey_frames).",
		"sends_stalled_for_key": "Times a sender stopped at twice the rotation limits, waiting for a new key.",
		"opens_accepted":        "Channel opens from peers (and other partitions) this agent accepted.",
		"opens_refused":         "Channel opens from peers (and other partitions) this agent refused.",
		"frames_dropped_memory": "Data frames dropped unacknowledged for want of memory budget (they come again).",
	} {
		statCounters[key] = prometheus.NewDesc("sinc_"+key+"_total", help, nil, nil)
	}
}

// statMetric names the metric and label value of the sinc stats counter
// key; ok is false for a key no metric shows (a test keeps there none).
func statMetric(key string) (d *prometheus.Desc, label string, ok bool) {
	switch {
	case strings.HasPrefix(key, "rejected_"):
		return descRejected, strings.TrimPrefix(key, "rejected_"), true
	case strings.HasPrefix(key, "refused_"):
		return descRefusals, strings.TrimPrefix(key, "refused_"), true
	case key == "data_frames_in":
		return descDataFrames, "in", true
	case key == "data_frames_out":
		return descDataFrames, "out", true
	case key == "handshakes_ok":
		return descHandshakes, "ok", true
	}
	d, ok = statCounters[key]
	return d, "", ok
}

// collector is the agent's prometheus.Collector.
type collector struct{ a *Agent }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descBuild, descChannels, descChannelBytes, descDataFrames, descRejected,
		descRefusals, descHandshakes, descPeerState, descPeers, descLinkFrames, descLinkBytes, descLinkDials, descLinkUps,
		descLinkDowns, descOpenLatency, descMemInUse, descMemPeak, descMemLimit} {
		ch <- d
	}
	for _, d := range statCounters {
		ch <- d
	}
}

// emit sends one sample; a mistake in it is the scrape's error, never a
// panic of the agent.
func emit(ch chan<- prometheus.Metric, d *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) {
	m, err := prometheus.NewConstMetric(d, t, v, labels...)
	if err != nil {
		m = prometheus.NewInvalidMetric(d, err)
	}
	ch <- m
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	a := c.a
	b := buildinfo.Get()
	emit(ch, descBuild, prometheus.GaugeValue, 1, a.cfg.Node, b.Version, cmp.Or(b.Revision, buildinfo.Unknown), b.GoVersion)

	for key, v := range a.counters.snapshot() {
		if d, label, ok := statMetric(key); ok {
			var labels []string
			if label != "" {
				labels = []string{label}
			}
			emit(ch, d, prometheus.CounterValue, float64(v), labels...)
			if r, ok := strings.CutPrefix(key, "refused_handshake_"); ok {
				emit(ch, descHandshakes, prometheus.CounterValue, float64(v), r)
			}
		}
	}
	emit(ch, descMemInUse, prometheus.GaugeValue, float64(a.budget.inUse()))
	emit(ch, descMemPeak, prometheus.GaugeValue, float64(a.budget.peakUse()))
	emit(ch, descMemLimit, prometheus.GaugeValue, float64(a.budget.limit))

	c.collectChannels(ch)
	c.collectPeers(ch)

	cum, count, sum := a.counters.openLatency.read()
	buckets := make(map[float64]uint64, len(cum))
	for i, bound := range latencyBuckets {
		buckets[bound.Seconds()] = cum[i]
	}
	h, err := prometheus.NewConstHistogram(descOpenLatency, count, sum.Seconds(), buckets)
	if err != nil {
		h = prometheus.NewInvalidMetric(descOpenLatency, err)
	}
	ch <- h
}

// collectChannels counts the channel table by partition, kind and state,
// every combination shown (zero included), and the partitions' bytes.
func (c collector) collectChannels(ch chan<- prometheus.Metric) {
	type key struct {
		part  string
		kind  wire.Kind
		state chanStatus
	}
	n := map[key]int{}
	for _, x := range c.a.tables.all() {
		x.mu.Lock()
		st := x.state.status
		x.mu.Unlock()
		n[key{x.part, x.kind, st}]++
	}
	for name, p := range c.a.partitions {
		for _, kind := range []wire.Kind{wire.Stream, wire.Message} {
			for _, st := range []chanStatus{statusOpening, statusOpen} {
				emit(ch, descChannels, prometheus.GaugeValue, float64(n[key{name, kind, st}]), name, kind.String(), st.String())
			}
		}
		emit(ch, descChannelBytes, prometheus.CounterValue, float64(p.bytesIn.Load()), name, "in")
		emit(ch, descChannelBytes, prometheus.CounterValue, float64(p.bytesOut.Load()), name, "out")
	}
}

// collectPeers reads the peer table: each peer's state and what its links
// carried and did.
func (c collector) collectPeers(ch chan<- prometheus.Metric) {
	a := c.a
	byLink := map[string]int{stateLinked: 0, stateIdle: 0, stateUnlinked: 0}
	for _, r := range a.peerRows() {
		byLink[r.Link]++
		if r.State == stateUnlinked {
			// Known to the registry only: a thousand nodes known would be
			// thousands of series of zeros in every agent. They are
			// counted in sinc_peers.
			continue
		}
		for _, st := range []string{stateUp, stateConnecting, stateDown} {
			v := 0.0
			if r.State == st {
				v = 1
			}
			emit(ch, descPeerState, prometheus.GaugeValue, v, r.Peer, st)
		}
		emit(ch, descLinkFrames, prometheus.CounterValue, float64(r.FramesIn), r.Peer, "in")
		emit(ch, descLinkFrames, prometheus.CounterValue, float64(r.FramesOut), r.Peer, "out")
		emit(ch, descLinkBytes, prometheus.CounterValue, float64(r.BytesIn), r.Peer, "in")
		emit(ch, descLinkBytes, prometheus.CounterValue, float64(r.BytesOut), r.Peer, "out")
	}
	for link, n := range byLink {
		emit(ch, descPeers, prometheus.GaugeValue, float64(n), link)
	}
	type events struct{ dials, ups, downs uint64 }
	a.mu.Lock()
	ev := make(map[string]events, len(a.peers))
	for name, p := range a.peers {
		ev[name] = events{p.dials, p.ups, p.downs}
	}
	a.mu.Unlock()
	for name, e := range ev {
		emit(ch, descLinkDials, prometheus.CounterValue, float64(e.dials), name)
		emit(ch, descLinkUps, prometheus.CounterValue, float64(e.ups), name)
		emit(ch, descLinkDowns, prometheus.CounterValue, float64(e.downs), name)
	}
}

// listenMetrics opens the metrics address of the config, if it names one.
func (a *Agent) listenMetrics() (net.Listener, error) {
	if a.cfg.Metrics == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", a.cfg.Metrics)
	if err != nil {
		return nil, fmt.Errorf("config %s: field \"metrics\": %w", a.cfg.Path, err)
	}
	return ln, nil
}

// serveMetrics serves the agent's metrics on ln, if not nil, until the
// returned function is called.
func (a *Agent) serveMetrics(ln net.Listener) (stop func()) {
	if ln == nil {
		return func() {}
	}
	return metrics.Start(ln, metrics.NewRegistry(collector{a}), a.log).Close
}
