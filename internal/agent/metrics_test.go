package agent

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
)

// TestMetricsCoverStats: every counter sinc stats shows is a metric, the
// ones by reason included (their reasons become a label), and the
// collector's output passes the pedantic registry's checks (every sample
// described, label names consistent, no duplicate series) after traffic
// and refusals.
func TestMetricsCoverStats(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	c := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Stream)
	c.Write([]byte("hello"))
	if _, err := io.ReadFull(c, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.dial(t, "node-a", "batch", "node-b/cache/x", sinc.Stream); err == nil {
		t.Fatal("a dial the policy denies went through")
	}
	// A reason of every family: each maps by its prefix.
	p.a.counters.refuse("handshake_bad_mac")

	stats := p.a.handleAdmin(admin.Request{Op: "stats"}).Counters
	for key := range stats {
		if strings.HasPrefix(key, "memory_") {
			continue // gauges of the budget: sinc_memory_*_bytes
		}
		if _, _, ok := statMetric(key); !ok {
			t.Errorf("sinc stats counter %q has no metric", key)
		}
	}
	for _, key := range []string{"refused_open_denied_policy", "refused_handshake_bad_mac", "rejected_auth", "handshakes_ok"} {
		if _, ok := stats[key]; !ok {
			t.Errorf("sinc stats lacks %q", key)
		}
	}

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(collector{p.a.Agent})
	// The echo's bytes are counted just after they are written to the
	// process, which may read them first: gather until they show.
	var got map[string]float64
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		got = gather(t, reg)
		if got["sinc_channel_bytes_total,direction=in,partition=web"] == 5 || time.Now().After(deadline) {
			break
		}
	}
	for key, want := range map[string]float64{
		"sinc_refusals_total,reason=open_denied_policy":            1,
		"sinc_refusals_total,reason=handshake_bad_mac":             1,
		"sinc_handshakes_total,result=bad_mac":                     1,
		"sinc_channels,kind=stream,partition=web,state=open":       1,
		"sinc_channel_bytes_total,direction=out,partition=web":     5,
		"sinc_channel_bytes_total,direction=in,partition=web":      5,
		"sinc_open_duration_seconds":                               1,
		"sinc_peer_state,peer=node-b,state=up":                     1,
		"sinc_memory_limit_bytes":                                  float64(p.a.cfg.Limits.Memory),
		"sinc_channels,kind=message,partition=batch,state=opening": 0,
	} {
		if v, ok := got[key]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", key, v, ok, want)
		}
	}
}

// gather collects reg and returns each sample's value (a histogram's
// count) by name and labels ("name,k=v,…").
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			key := f.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[key] = m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				got[key] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return got
}

// TestLatencyHistogram: observations land in the first bucket whose bound
// is at least the duration, the cumulative counts add up, and the sum is
// the durations'.
func TestLatencyHistogram(t *testing.T) {
	var l latency
	for _, d := range []time.Duration{100 * time.Microsecond, time.Millisecond, 3 * time.Millisecond, time.Minute} {
		l.observe(d)
	}
	cum, count, sum := l.read()
	if count != 4 || sum != 100*time.Microsecond+time.Millisecond+3*time.Millisecond+time.Minute {
		t.Fatalf("count %d sum %v", count, sum)
	}
	want := map[time.Duration]uint64{250 * time.Microsecond: 1, time.Millisecond: 2, 2500 * time.Microsecond: 2,
		5 * time.Millisecond: 3, 10 * time.Second: 3}
	for i, b := range latencyBuckets {
		if w, ok := want[b]; ok && cum[i] != w {
			t.Errorf("bucket ≤ %v: %d, want %d", b, cum[i], w)
		}
	}
}
