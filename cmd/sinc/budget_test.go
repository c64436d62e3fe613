package main

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
)

// TestStalledChannelsStayInBudget: 2,000 channels whose reader never
// reads, each written to until it blocks, keep each agent's buffered
// bytes under its memory budget (limits.memory) and its memory under the
// budget and a fixed base; a bulk transfer beside them keeps its
// throughput. Before the budget, each such channel held about a window in
// an agent (2,000 channels: over 1 GB each).
func TestStalledChannelsStayInBudget(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: two thousand channels")
	}
	const budget = 256 << 20 // the default
	rule := "[[allow]]\nfrom = \"*/*\"\nto = \"*/*/*\"\n[limits]\nchannels_per_process = 4000\nwindow = 2097152\n"
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"p"}, Extra: rule},
		{Name: "node-b", Partitions: []string{"p"}, Extra: rule},
	}, cluster.Timers{Keepalive: "500ms", DeadAfter: "5s"})
	if err != nil {
		t.Fatal(err)
	}
	procs := startAgents(t, c)
	waitState(t, c.Nodes["node-a"], "node-b", "up", 10*time.Second)
	waitState(t, c.Nodes["node-b"], "node-a", "up", 10*time.Second)
	base := make([]int, len(procs))
	for i, p := range procs {
		base[i] = rssKiB(p.Cmd.Process.Pid)
	}
	out, errb, werr, peak := runLoad(t, procs, "-stall", "2000", "-bulk", "32000000",
		"-node", "node-a="+c.Nodes["node-a"].Partitions["p"], "-node", "node-b="+c.Nodes["node-b"].Partitions["p"])
	var res struct {
		Stalled      int     `json:"stalled"`
		Refused      int     `json:"refused_limit"`
		StalledBytes int64   `json:"stalled_bytes"`
		BulkBefore   float64 `json:"bulk_before_mibps"`
		BulkDuring   float64 `json:"bulk_during_mibps"`
		Error        string  `json:"error"`
	}
	if err := json.Unmarshal(out, &res); err != nil || werr != nil || res.Error != "" {
		t.Fatalf("load client: %v %v %+v\n%s", werr, err, res, errb)
	}
	t.Logf("%d channels stalled (%d opens refused: limit), %d MiB written into them; bulk %.0f MiB/s before, %.0f MiB/s beside them",
		res.Stalled, res.Refused, res.StalledBytes>>20, res.BulkBefore, res.BulkDuring)
	for i, n := range c.Names() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := admin.Query(ctx, c.Nodes[n].Admin, admin.Request{Op: "stats"})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		s := r.Counters
		// The load client exited, its channels with it: what they held
		// goes back.
		for deadline := time.Now().Add(5 * time.Second); s["memory_in_use"] != 0 && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if r, err := admin.Query(ctx, c.Nodes[n].Admin, admin.Request{Op: "stats"}); err == nil {
				s["memory_in_use"] = r.Counters["memory_in_use"]
			}
			cancel()
		}
		if s["memory_in_use"] != 0 {
			t.Errorf("%s still holds %d bytes of its budget after every channel closed", n, s["memory_in_use"])
		}
		t.Logf("%s: memory budget peak %d KiB of %d KiB; RSS %d KiB at start, peak %d KiB; %d frames dropped for memory",
			n, s["memory_peak"]>>10, s["memory_limit"]>>10, base[i], peak[i], s["frames_dropped_memory"])
		if s["memory_peak"] > budget || s["memory_limit"] != budget {
			t.Errorf("%s buffered up to %d bytes, over its budget of %d", n, s["memory_peak"], s["memory_limit"])
		}
		// The budget, the bounded free lists (about 25 MiB), and per
		// channel its tables' share, over what the agent held at start.
		if bound := base[i] + budget>>10 + 32<<10 + 2000*24; peak[i] > bound {
			t.Errorf("%s peaked at %d KiB of memory, over its bound of %d KiB", n, peak[i], bound)
		}
	}
	if res.Stalled+res.Refused != 2000 || res.Stalled < 1000 {
		t.Errorf("%d channels stalled and %d refused, of 2000", res.Stalled, res.Refused)
	}
	// Other channels go on at a good share of their speed (the machine is
	// shared with the other packages' tests, so the bound is loose).
	if res.BulkDuring < res.BulkBefore/8 {
		t.Errorf("bulk throughput beside the stalled channels fell from %.0f to %.0f MiB/s", res.BulkBefore, res.BulkDuring)
	}
}
