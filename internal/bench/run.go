// Package bench is sinc's side-by-side benchmark (`sinc bench`, and the
// same code under `go test -bench`): raw TCP, Go crypto/tls 1.3 directly
// between two processes, a sinc stream channel and a sinc message channel
// on the socket path, a sinc stream channel through the rings each process
// shares with its agent (sinc-ring), and stunnel, each as separate OS
// processes on loopback (a server worker and a client worker, and for sinc
// two real `sinc agent` processes between them), measured in one run,
// interleaved: every repetition runs every transport in turn.
package bench

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"runtime"
	"slices"
	"time"
)

// Options sizes a run. DefaultOptions gives the full run and the quick
// one.
type Options struct {
	Bin        string   // the sinc binary
	Transports []string // nil: all
	Reps       int      // repetitions of every measurement

	BulkBytes int64 // per bulk transfer (64 KiB writes)
	PingPongs int   // round trips per repetition
	PingSize  int   // bytes per ping
	MsgSizes  []int // message sizes of the message rate
	// MsgBatched and MsgPerWrite: messages per measurement, by size.
	MsgBatched  map[int]int
	MsgPerWrite map[int]int
	SetupCycles int // open+close cycles for the rate, from SetupConc openers
	SetupConc   int
	SetupLat    int // open+close cycles for the latency, from one opener
	// MaxTime bounds each round-trip, message-rate and setup measurement:
	// a slow transport does fewer in that time (rates and percentiles stay
	// comparable). 0: only the counts bound them.
	MaxTime time.Duration
	// IdleCounts: idle channels held at the memory measurements, ascending;
	// IdleReps of the repetitions measure memory (each with fresh
	// processes).
	IdleCounts []int
	IdleReps   int
	IdleConc   int
	// IdleSettle: how long the processes are left alone after the opens
	// before their memory is read (default 300 ms).
	IdleSettle time.Duration

	// Notes says what the run left out and why (stunnel not installed).
	Notes []string

	Dir        string    // parent of temporary folders ("" for the system's)
	ProfileDir string    // CPU profiles of the workers, if set
	Keep       bool      // keep the temporary folders
	Log        io.Writer // progress; nil for none

	start time.Time
}

// DefaultOptions are the sizes of `sinc bench` (quick: `sinc bench
// --quick`).
func DefaultOptions(quick bool) Options {
	if quick {
		return Options{
			Reps: 3, BulkBytes: 32 << 20, PingPongs: 5000, PingSize: 64, MsgSizes: []int{64, 1024},
			MsgBatched: map[int]int{64: 200_000, 1024: 60_000}, MsgPerWrite: map[int]int{64: 10_000, 1024: 10_000},
			SetupCycles: 1000, SetupConc: 16, SetupLat: 300, MaxTime: 300 * time.Millisecond,
			// 5,000 rather than 10,000: opening 10,000 TLS connections or
			// sinc channels takes most of a minute on two cores.
			IdleCounts: []int{1000, 5000}, IdleReps: 1, IdleConc: 16,
		}
	}
	return Options{
		Reps: 5, BulkBytes: 256 << 20, PingPongs: 20_000, PingSize: 64, MsgSizes: []int{64, 1024},
		MsgBatched: map[int]int{64: 1_000_000, 1024: 300_000}, MsgPerWrite: map[int]int{64: 50_000, 1024: 50_000},
		SetupCycles: 4000, SetupConc: 16, SetupLat: 1000, MaxTime: 1500 * time.Millisecond,
		IdleCounts: []int{1000, 3000, 10000}, IdleReps: 2, IdleConc: 16,
	}
}

func (o *Options) check() error {
	if o.Bin == "" {
		return errors.New("bench: no sinc binary")
	}
	_, stunnelErr := StunnelPath()
	if o.Transports == nil {
		o.Transports = Transports
		if stunnelErr != nil {
			o.Transports = slices.DeleteFunc(slices.Clone(Transports), func(tr string) bool { return tr == Stunnel })
			o.Notes = append(o.Notes, "the stunnel column is left out: "+stunnelErr.Error())
		}
	}
	for _, tr := range o.Transports {
		if !validTransport(tr) {
			return fmt.Errorf("bench: unknown transport %q", tr)
		}
		if tr == Stunnel && stunnelErr != nil {
			return fmt.Errorf("bench: transport stunnel: %w", stunnelErr)
		}
	}
	if o.Reps < 1 || o.Reps > 100 {
		return fmt.Errorf("bench: repetitions %d outside 1..100", o.Reps)
	}
	if o.BulkBytes < chunk || o.PingPongs < 1 || o.PingSize < 1 || o.PingSize > maxPingSize ||
		o.SetupCycles < 1 || o.SetupConc < 1 || o.SetupLat < 1 || o.IdleConc < 1 {
		return fmt.Errorf("bench: bad sizes %+v", *o)
	}
	for _, s := range o.MsgSizes {
		if s < 0 || s > 64<<10 || o.MsgBatched[s] < 1 || o.MsgPerWrite[s] < 1 {
			return fmt.Errorf("bench: message size %d needs counts (batched %d, one write %d)", s, o.MsgBatched[s], o.MsgPerWrite[s])
		}
	}
	if n := len(o.IdleCounts); !slices.IsSorted(o.IdleCounts) || n > 0 && (o.IdleCounts[0] < 1 || o.IdleCounts[n-1] > 15000) {
		return fmt.Errorf("bench: idle counts %v: ascending, 1..15000", o.IdleCounts)
	}
	o.IdleReps = min(o.IdleReps, o.Reps)
	if o.IdleSettle <= 0 {
		o.IdleSettle = 300 * time.Millisecond
	}
	return nil
}

func (o *Options) logf(format string, a ...any) {
	if o.Log != nil {
		fmt.Fprintf(o.Log, "%6.1fs "+format+"\n", append([]any{time.Since(o.start).Seconds()}, a...)...)
	}
}

// Run runs every measurement of opts and returns the report.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	raiseFiles()
	start := time.Now()
	opts.start = start
	r := newReport(opts)
	r.LoadBefore = loadAvg()
	ticks0, ticksOK := readTicks()
	opts.logf("starting agents and workers (%v)", opts.Transports)
	env, err := StartEnv(ctx, EnvConfig{Bin: opts.Bin, Transports: opts.Transports, Dir: opts.Dir,
		ProfileDir: opts.ProfileDir, Keep: opts.Keep})
	if err != nil {
		return nil, err
	}
	defer env.Close()
	r.TLSInfo = env.TLSInfo
	if opts.Keep {
		opts.logf("folder kept: %s", env.Dir)
	}

	// Warm up every path once (buffers, the agents' link, caches): not
	// recorded.
	for _, tr := range opts.Transports {
		if _, err := env.Bulk(ctx, tr, min(opts.BulkBytes, 8<<20)); err != nil {
			return nil, err
		}
		if _, err := env.PingPong(ctx, tr, min(opts.PingPongs, 500), opts.PingSize, opts.MaxTime); err != nil {
			return nil, err
		}
		if !runsMetric(tr, mOpens) {
			continue
		}
		if _, err := env.Setup(ctx, tr, min(opts.SetupCycles, 100), min(opts.SetupConc, 4), opts.MaxTime); err != nil {
			return nil, err
		}
	}

	for rep := range opts.Reps {
		// Each repetition starts with another transport, so none is
		// always first after a pause or always last.
		order := rotate(opts.Transports, rep)
		opts.logf("repetition %d/%d (order %v)", rep+1, opts.Reps, order)
		for _, tr := range order {
			b, err := env.Bulk(ctx, tr, opts.BulkBytes)
			if err != nil {
				return nil, err
			}
			r.add(mBulk, tr, b.MiBps())
			r.add(mCPU, tr, b.CPUPerByte())
			for p, s := range b.CPU {
				r.addCPU(tr, p, s*1e9/float64(b.Bytes))
			}
			opts.logf("  %-12s bulk %8.0f MiB/s  %.2f ns/B CPU", tr, b.MiBps(), b.CPUPerByte())
		}
		for _, tr := range order {
			l, err := env.PingPong(ctx, tr, opts.PingPongs, opts.PingSize, opts.MaxTime)
			if err != nil {
				return nil, err
			}
			r.add(mRTT50, tr, us(l.P50))
			r.add(mRTT99, tr, us(l.P99))
			opts.logf("  %-12s round trip p50 %.1f µs p99 %.1f µs", tr, us(l.P50), us(l.P99))
		}
		for _, size := range opts.MsgSizes {
			for _, batched := range []bool{true, false} {
				n := opts.MsgPerWrite[size]
				if batched {
					n = opts.MsgBatched[size]
				}
				for _, tr := range order {
					if !runsMetric(tr, rateKey(size, batched)) {
						continue
					}
					m, err := env.MsgRate(ctx, tr, size, n, batched, opts.MaxTime)
					if err != nil {
						return nil, err
					}
					r.add(rateKey(size, batched), tr, m.PerSec()/1e3)
					opts.logf("  %-12s %5d B %-9s %8.0f k msg/s", tr, size, map[bool]string{true: "batched", false: "one write"}[batched], m.PerSec()/1e3)
				}
			}
		}
		for _, tr := range order {
			if !runsMetric(tr, mOpens) {
				continue
			}
			l, err := env.Setup(ctx, tr, opts.SetupLat, 1, opts.MaxTime/2)
			if err != nil {
				return nil, err
			}
			r.add(mSetup50, tr, us(l.P50))
			s, err := env.Setup(ctx, tr, opts.SetupCycles, opts.SetupConc, opts.MaxTime)
			if err != nil {
				return nil, err
			}
			r.add(mOpens, tr, s.PerSec())
			opts.logf("  %-12s setup p50 %.1f µs (1 opener), %.0f opens/s (%d openers)", tr, us(l.P50), s.PerSec(), opts.SetupConc)
		}
		if rep < opts.IdleReps && len(opts.IdleCounts) > 0 {
			for _, tr := range order {
				if !runsMetric(tr, memKey("endpoint", 0)) {
					continue
				}
				if err := idleMemory(ctx, &opts, r, tr); err != nil {
					return nil, err
				}
			}
		}
	}
	if slices.ContainsFunc(opts.Transports, usesRing) {
		if n := env.ringFallbacks(); n > 0 {
			r.Notes = append(r.Notes, fmt.Sprintf("the agents gave %d channels that asked for a ring the socket path (their logs say why): the sinc-ring rows mix both paths", n))
		}
	}
	if err := env.Close(); err != nil {
		return nil, err
	}
	r.Seconds = time.Since(start).Seconds()
	r.OtherCPU = -1
	if ticks1, ok := readTicks(); ok && ticksOK {
		r.OtherCPU = otherCPU(ticks0, ticks1)
	}
	r.finish()
	r.Goals = r.Targets()
	return r, nil
}

// idleMemory measures idle connections' memory with fresh processes.
func idleMemory(ctx context.Context, opts *Options, r *Report, tr string) error {
	counts := opts.IdleCounts
	if usesRing(tr) {
		// An agent gives rings at most half of its descriptors, three
		// each; past that, channels take the socket path, which is not
		// what the column is for.
		most := ringIdleMost()
		counts = slices.DeleteFunc(slices.Clone(counts), func(n int) bool { return n > most })
		if len(counts) < len(opts.IdleCounts) && !slices.Contains(r.Notes, ringIdleNote(most)) {
			r.Notes = append(r.Notes, ringIdleNote(most))
		}
		if len(counts) == 0 {
			return nil
		}
	}
	env, err := StartEnv(ctx, EnvConfig{Bin: opts.Bin, Transports: []string{tr}, Dir: opts.Dir, Keep: opts.Keep})
	if err != nil {
		return err
	}
	defer env.Close()
	res, err := env.Idle(ctx, tr, counts, opts.IdleConc, opts.IdleSettle)
	if err != nil {
		return err
	}
	for i, n := range res.Counts {
		if i < len(res.AgentBytes) {
			r.add(memKey("agent", n), tr, res.AgentBytes[i]/1024)
		}
		r.add(memKey("endpoint", n), tr, res.EndpointBytes[i]/1024)
		agent := "-"
		if i < len(res.AgentBytes) {
			agent = fmt.Sprintf("%.1f KiB", res.AgentBytes[i]/1024)
		}
		opts.logf("  %-12s %6d idle: agents %s, client+server %.1f KiB per connection", tr, n, agent, res.EndpointBytes[i]/1024)
	}
	return env.Close()
}

func rotate(s []string, k int) []string {
	k %= len(s)
	return append(slices.Clone(s[k:]), s[:k]...)
}

func us(d time.Duration) float64 { return float64(d) / 1e3 }

// machine describes where a run happened.
func machine() string {
	m := fmt.Sprintf("%s/%s, %d CPUs", runtime.GOOS, runtime.GOARCH, runtime.NumCPU())
	if c := cpuModel(); c != "" {
		m += " (" + c + ")"
	}
	return m + ", " + runtime.Version()
}

// ringIdleMost is how many idle ring channels an agent here holds as
// rings: half of its RLIMIT_NOFILE, three descriptors each, less a margin
// for everything else it holds.
func ringIdleMost() int {
	var r unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &r) != nil {
		return 0
	}
	return int((min(r.Max, 1<<30)/2 - 256) / 3)
}

func ringIdleNote(most int) string {
	return fmt.Sprintf("sinc-ring idle memory: measured up to %d channels, the most an agent here holds as rings (half of RLIMIT_NOFILE, three descriptors each; beyond, channels take the socket path)", most)
}

// serviceFiles is the RLIMIT_NOFILE the systemd units give the agent
// (contrib/systemd: LimitNOFILE=1048576).
const serviceFiles = 1 << 20

// raiseFiles gives this process, and so the agents and workers it starts,
// which inherit it, the descriptors the agent gets as a service, where it
// may (as root): ten thousand idle ring channels take three each in an
// agent. Elsewhere the limits stay as they are, and rings beyond half of
// an agent's descriptors take the socket path (the run then says so).
func raiseFiles() {
	var r unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &r) != nil || r.Max >= serviceFiles {
		return
	}
	unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: serviceFiles, Max: serviceFiles})
}
