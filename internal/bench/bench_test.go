package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// bin is the sinc binary: the agents and the worker processes.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sinc-bench-bin")
	if err != nil {
		panic(err)
	}
	bin = filepath.Join(dir, "sinc")
	out, err := exec.Command("go", "build", "-o", bin, "sinc.dev/sinc/cmd/sinc").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building sinc: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	if shared != nil {
		shared.Close()
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// tinyOptions: every measurement of the full run, at sizes that take a
// few seconds.
func tinyOptions() Options {
	return Options{
		Bin: bin, Reps: 2, BulkBytes: 2 << 20, PingPongs: 300, PingSize: 64, MsgSizes: []int{64, 1024},
		MsgBatched: map[int]int{64: 5000, 1024: 2000}, MsgPerWrite: map[int]int{64: 500, 1024: 500},
		SetupCycles: 60, SetupConc: 4, SetupLat: 30, MaxTime: 5 * time.Second,
		IdleCounts: []int{20, 200}, IdleReps: 1, IdleConc: 4, IdleSettle: 100 * time.Millisecond,
	}
}

// TestQuickHarness runs the whole harness, small: every metric is there
// for every transport, with sane values, and the table shows them.
func TestQuickHarness(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	opts := tinyOptions()
	var progress bytes.Buffer
	opts.Log = &progress
	r, err := Run(ctx, opts)
	if err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	// sinc-ring is in the default run, beside sinc-stream, and measured
	// in every row sinc-stream is (below).
	if i := slices.Index(r.Transports, SincRing); i < 0 || i == 0 || r.Transports[i-1] != SincStream {
		t.Errorf("transports %v: no sinc-ring beside sinc-stream", r.Transports)
	}
	wantKeys := []string{mBulk, mCPU, mRTT50, mRTT99, rateKey(64, true), rateKey(1024, true),
		rateKey(64, false), rateKey(1024, false), mOpens, mSetup50,
		memKey("agent", 20), memKey("agent", 200), memKey("endpoint", 20), memKey("endpoint", 200)}
	if len(r.Metrics) != len(wantKeys) {
		t.Errorf("%d metrics, want %d", len(r.Metrics), len(wantKeys))
	}
	for _, key := range wantKeys {
		m := r.Metric(key)
		if m == nil {
			t.Errorf("no metric %s", key)
			continue
		}
		wantN := opts.Reps
		if strings.HasPrefix(key, "mem_") {
			wantN = opts.IdleReps
		}
		for _, tr := range r.Transports {
			s, ok := m.Summary[tr]
			if m.SincOnly && !isSinc(tr) || !runsMetric(tr, key) {
				if ok {
					t.Errorf("%s: a value for %s", key, tr)
				}
				continue
			}
			if !ok || s.N != wantN {
				t.Errorf("%s %s: %d samples, want %d", key, tr, s.N, wantN)
				continue
			}
			if math.IsNaN(s.Median) || math.IsInf(s.Median, 0) || s.Min > s.Median || s.Median > s.Max {
				t.Errorf("%s %s: %+v", key, tr, s)
			}
			// Memory growth can be nought at 20 connections; every other
			// value is a positive quantity.
			if !strings.HasPrefix(key, "mem_") && s.Min <= 0 {
				t.Errorf("%s %s: not positive: %+v", key, tr, s)
			}
		}
		// sinc-ring has a value wherever sinc-stream has one.
		if _, ok := m.Summary[SincStream]; ok {
			if s := m.Summary[SincRing]; s.N == 0 {
				t.Errorf("%s: sinc-stream measured, sinc-ring not", key)
			}
		}
		for _, s := range []string{SincStream, SincRing, SincMessage} {
			for _, base := range []string{TLS, TCP} {
				v, ok := m.Ratios[s+"/"+base]
				if ok == m.SincOnly {
					t.Errorf("%s: ratio %s/%s present %v", key, s, base, ok)
				}
				if ok && !strings.HasPrefix(key, "mem_") && (v <= 0 || math.IsNaN(v) || math.IsInf(v, 0)) {
					t.Errorf("%s: ratio %s/%s = %v", key, s, base, v)
				}
			}
		}
	}
	// Two agents hold 200 channels: they grew.
	for _, tr := range []string{SincStream, SincRing, SincMessage} {
		if s := r.Metric(memKey("agent", 200)).Summary[tr]; s.Median <= 0 {
			t.Errorf("agent memory per channel of %s: %+v", tr, s)
		}
	}
	for _, tr := range r.Transports {
		p50, p99 := r.Metric(mRTT50).Summary[tr], r.Metric(mRTT99).Summary[tr]
		if p99.Median < p50.Median || p99.Min < p50.Min {
			t.Errorf("%s: round trip p99 %+v below p50 %+v", tr, p99, p50)
		}
		split := r.CPUSplit[tr]
		want := 2
		if isSinc(tr) || tr == Stunnel {
			want = 4 // with the agents, or the two stunnel processes
		}
		if len(split) != want {
			t.Errorf("%s: CPU split %v, want %d processes", tr, split, want)
		}
		for p, s := range split {
			if tr == Stunnel && p != "client" && p != "server" {
				continue // counted in 10 ms ticks: 2 MiB may take none (TestStunnelRun)
			}
			if s.Median <= 0 {
				t.Errorf("%s: no CPU time for %s: %+v", tr, p, s)
			}
		}
	}
	for _, tr := range sincTransports {
		found := false
		for _, g := range r.Targets() {
			found = found || g.Transport == tr
		}
		if !found {
			t.Errorf("no issue 6 target for %s", tr)
		}
	}
	if slices.ContainsFunc(r.Notes, func(n string) bool { return strings.Contains(n, "asked for a ring") }) {
		t.Errorf("notes: %q", r.Notes)
	}
	if !strings.Contains(r.TLSInfo, "TLS 1.3") {
		t.Errorf("TLS info %q", r.TLSInfo)
	}

	var table bytes.Buffer
	r.Format(&table)
	out := table.String()
	for _, m := range r.Metrics {
		if !strings.Contains(out, m.Name) {
			t.Errorf("table lacks %q", m.Name)
		}
	}
	for _, s := range append(slices.Clone(r.Transports), "stream/TLS", "stream/TCP", "ring/TLS", "ring/TCP", "message/TLS", "message/TCP", "higher is better") {
		if !strings.Contains(out, s) {
			t.Errorf("table lacks %q", s)
		}
	}
	if _, err := json.Marshal(r); err != nil {
		t.Errorf("report as JSON: %v", err)
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("table:\n%s\nprogress:\n%s", out, progress.String())
	}
}

// TestEnvCleansUp: after Close no worker or agent is left and the folders
// are gone.
func TestEnvCleansUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	parent := t.TempDir()
	e, err := StartEnv(ctx, EnvConfig{Bin: bin, Dir: parent, Transports: []string{TCP, SincStream}})
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, tr := range []string{TCP, SincStream} {
		for _, pid := range e.PIDs(tr) {
			pids = append(pids, pid)
		}
	}
	if _, err := e.Bulk(ctx, SincStream, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	for _, pid := range pids {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if !strings.Contains(string(b), ") Z") {
				t.Errorf("process %d still there: %s", pid, b)
			}
		}
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("left in the folder: %v", ents)
	}
	if _, err := e.Bulk(ctx, TCP, 1<<20); err == nil {
		t.Error("a closed Env ran a transfer")
	}
}

// A StartEnv that fails part way stops what it started and removes its
// folder (it used to call Close on the nil it was about to return).
func TestStartEnvFailureCleansUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	parent := t.TempDir()
	e, err := StartEnv(ctx, EnvConfig{Bin: "/bin/false", Dir: parent, Transports: []string{TCP}})
	if err == nil {
		e.Close()
		t.Fatal("StartEnv with workers that exit at once succeeded")
	}
	if e != nil {
		t.Errorf("StartEnv returned %v with its error %v", e, err)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("left in the folder: %v", ents)
	}
}

func TestSummaryAndRank(t *testing.T) {
	s := summarize([]float64{5, 1, 3, 2})
	if s != (Summary{N: 4, Median: 2.5, Min: 1, Max: 5}) {
		t.Errorf("summarize: %+v", s)
	}
	if s := summarize([]float64{7}); s.Median != 7 || s.N != 1 {
		t.Errorf("summarize one: %+v", s)
	}
	for _, c := range []struct {
		n    int
		q    float64
		want int
	}{{100, 0.5, 49}, {100, 0.99, 98}, {1, 0.99, 0}, {20000, 0.99, 19799}, {3, 0.5, 1}} {
		if got := rank(c.n, c.q); got != c.want {
			t.Errorf("rank(%d, %v) = %d, want %d", c.n, c.q, got, c.want)
		}
	}
	if got := rotate([]string{"a", "b", "c"}, 4); strings.Join(got, "") != "bca" {
		t.Errorf("rotate: %v", got)
	}
}

func TestBadOptions(t *testing.T) {
	for _, f := range []func(*Options){
		func(o *Options) { o.Bin = "" },
		func(o *Options) { o.Reps = 0 },
		func(o *Options) { o.Transports = []string{"udp"} },
		func(o *Options) { o.IdleCounts = []int{100, 10} },
		func(o *Options) { o.MsgSizes = []int{99} },
		func(o *Options) { o.BulkBytes = 1 },
	} {
		o := tinyOptions()
		f(&o)
		if _, err := Run(context.Background(), o); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
}

// The benchmarks drive the same paths as `sinc bench`, on one Env shared
// by all of them.

var (
	sharedOnce sync.Once
	shared     *Env
	sharedErr  error
)

func benchEnv(b *testing.B) *Env {
	sharedOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		// SINC_BENCH_PROFILE names a folder for CPU profiles of every process.
		shared, sharedErr = StartEnv(ctx, EnvConfig{Bin: bin, ProfileDir: os.Getenv("SINC_BENCH_PROFILE")})
	})
	if sharedErr != nil {
		b.Fatal(sharedErr)
	}
	return shared
}

// BenchmarkBulk: one op is a 64 KiB write; MB/s from SetBytes, CPU time
// of every process of the path per byte.
func BenchmarkBulk(b *testing.B) {
	for _, tr := range Transports {
		b.Run(tr, func(b *testing.B) {
			e := benchEnv(b)
			b.SetBytes(chunk)
			b.ResetTimer()
			r, err := e.Bulk(context.Background(), tr, int64(b.N)*chunk)
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(r.MiBps(), "MiB/s")
			b.ReportMetric(r.CPUPerByte(), "cpu-ns/B")
		})
	}
}

// BenchmarkPingPong: one op is a 64-byte round trip.
func BenchmarkPingPong(b *testing.B) {
	for _, tr := range Transports {
		b.Run(tr, func(b *testing.B) {
			e := benchEnv(b)
			b.ResetTimer()
			l, err := e.PingPong(context.Background(), tr, b.N, 64, 0)
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(us(l.P50), "p50-µs")
			b.ReportMetric(us(l.P99), "p99-µs")
		})
	}
}

// BenchmarkMessageRate: one op is a message sent one way.
func BenchmarkMessageRate(b *testing.B) {
	for _, tr := range Transports {
		for _, size := range []int{64, 1024} {
			for _, batched := range []bool{true, false} {
				name := fmt.Sprintf("%s/%s/%s", tr, sizeName(int64(size)), map[bool]string{true: "batched", false: "one-write"}[batched])
				b.Run(strings.ReplaceAll(name, " ", ""), func(b *testing.B) {
					e := benchEnv(b)
					b.SetBytes(int64(size))
					b.ResetTimer()
					r, err := e.MsgRate(context.Background(), tr, size, b.N, batched, 0)
					b.StopTimer()
					if err != nil {
						b.Fatal(err)
					}
					b.ReportMetric(r.PerSec(), "msgs/s")
				})
			}
		}
	}
}

// BenchmarkSetup: one op is an open+close cycle, from 16 openers (the
// rate of `sinc bench`) or from one (its latency).
func BenchmarkSetup(b *testing.B) {
	for _, tr := range Transports {
		for _, conc := range []int{16, 1} {
			b.Run(fmt.Sprintf("%s/openers=%d", tr, conc), func(b *testing.B) {
				e := benchEnv(b)
				b.ResetTimer()
				l, err := e.Setup(context.Background(), tr, b.N, conc, 0)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(l.PerSec(), "opens/s")
				b.ReportMetric(us(l.P50), "p50-µs")
			})
		}
	}
}

// BenchmarkIdleMemory: one op is an idle connection (at least 100, at most
// 10,000 are held); it reports the growth of the RSS per connection, of
// both agents (sinc) and of the client and server, each measurement in
// fresh processes, as `sinc bench` does. -benchtime=10000x matches the
// table's 10,000.
func BenchmarkIdleMemory(b *testing.B) {
	for _, tr := range Transports {
		b.Run(tr, func(b *testing.B) {
			n := min(max(b.N, 100), 10_000)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			e, err := StartEnv(ctx, EnvConfig{Bin: bin, Transports: []string{tr}})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			b.ResetTimer()
			r, err := e.Idle(ctx, tr, []int{n}, 16, 300*time.Millisecond)
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			if isSinc(tr) {
				b.ReportMetric(r.AgentBytes[0]/1024, "agent-KiB/conn")
			}
			b.ReportMetric(r.EndpointBytes[0]/1024, "ends-KiB/conn")
		})
	}
}

// The agents of the benchmark hold more channels than the default limits
// allow (accepted_per_node is 4,096): `sinc bench` holds up to 10,000 idle.
func TestIdleBeyondDefaultLimits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e, err := StartEnv(ctx, EnvConfig{Bin: bin, Transports: []string{SincStream}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	const n = 4200
	res, err := e.Idle(ctx, SincStream, []int{n}, 16, 10*time.Millisecond)
	if err != nil {
		t.Fatalf("holding %d idle channels: %v", n, err)
	}
	if len(res.AgentBytes) != 1 || res.AgentBytes[0] <= 0 {
		t.Errorf("agent memory at %d channels: %v", n, res.AgentBytes)
	}
}

// Each sinc transport takes the path it names, at both ends: sinc-stream
// and sinc-message keep their data on the channel socket, sinc-ring maps
// its rings (one data memfd per channel, in the client and in the
// server). SINC_NO_RING=1 where `sinc bench` runs changes nothing: the
// workers do not inherit it.
func TestTransportPaths(t *testing.T) {
	t.Setenv(sinc.NoRingEnv, "1")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	trs := []string{SincStream, SincRing, SincMessage}
	e, err := StartEnv(ctx, EnvConfig{Bin: bin, Transports: trs})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	const n = 3
	for _, tr := range trs {
		if _, err := e.call(ctx, tr, Command{Op: "idle", N: n, Conc: 1}); err != nil {
			t.Fatal(err)
		}
		if err := e.waitServer(ctx, tr, n); err != nil {
			t.Fatal(err)
		}
		want := 0
		if tr == SincRing {
			want = n
		}
		for role, pid := range map[string]int{"client": e.clients[tr].pid(), "server": e.servers[tr].pid()} {
			got, err := ringMaps(pid)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("%s %s: %d rings mapped with %d channels open, want %d", tr, role, got, n, want)
			}
		}
		if _, err := e.call(ctx, tr, Command{Op: "release"}); err != nil {
			t.Fatal(err)
		}
		// The ring path carries data both ways (a round trip) and in bulk.
		if _, err := e.PingPong(ctx, tr, 50, 64, 0); err != nil {
			t.Errorf("%s: round trips: %v", tr, err)
		}
		if _, err := e.Bulk(ctx, tr, 1<<20); err != nil {
			t.Errorf("%s: bulk: %v", tr, err)
		}
	}
	if k := e.ringFallbacks(); k != 0 {
		t.Errorf("the agents logged %d channels without the ring they asked for", k)
	}
}
