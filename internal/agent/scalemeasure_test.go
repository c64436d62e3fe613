package agent

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/secret"
)

// What the scale test measures with, apart from the agents: percentiles,
// a process's memory and CPU time from /proc, the Go heap, and the
// process's limits on descriptors and locked memory.

// spread is a set of durations, for percentiles.
type spread []time.Duration

// pct is the q-quantile (0 < q ≤ 1) by the nearest rank; 0 when empty.
func (s spread) pct(q float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	d := slices.Clone(s)
	slices.Sort(d)
	i := int(float64(len(d))*q+0.999999) - 1
	return d[min(max(i, 0), len(d)-1)]
}

func (s spread) max() time.Duration { return s.pct(1) }

// ms formats d in milliseconds, or seconds past ten.
func ms(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

// procSample is a process's CPU time and resident memory at one moment.
type procSample struct {
	at  time.Time
	cpu time.Duration // user + system
	rss int64         // bytes
}

// clockTick is the unit of times in /proc/PID/stat (USER_HZ, 100 on
// Linux whatever the kernel's HZ).
const clockTick = 10 * time.Millisecond

// sampleProc reads /proc/PID/stat and status ("self" for this process).
func sampleProc(pid string) (procSample, error) {
	s := procSample{at: time.Now()}
	stat, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return s, err
	}
	// The command name, in parentheses, may hold spaces: fields count from
	// the last ')'. utime and stime are fields 14 and 15.
	i := strings.LastIndexByte(string(stat), ')')
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 13 {
		return s, fmt.Errorf("/proc/%s/stat: %d fields after the name", pid, len(fields))
	}
	for _, f := range fields[11:13] {
		v, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return s, fmt.Errorf("/proc/%s/stat: %w", pid, err)
		}
		s.cpu += time.Duration(v) * clockTick
	}
	status, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return s, fmt.Errorf("/proc/%s/status: VmRSS %q: %w", pid, v, err)
			}
			s.rss = kb << 10
		}
	}
	return s, nil
}

// cpuShare is the share of one core a process used between a and b.
func cpuShare(a, b procSample) float64 {
	return float64(b.cpu-a.cpu) / float64(b.at.Sub(a.at))
}

// heap returns the runtime's memory statistics after collecting garbage
// twice (the second sweeps what finalizers of the first freed): HeapAlloc
// is then the live heap, HeapInuse the spans that hold it, StackInuse the
// goroutines' stacks.
func heap() runtime.MemStats {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m
}

// raiseFiles raises this process's RLIMIT_NOFILE to need, if the hard limit
// allows, and reports the limit in force.
func raiseFiles(need uint64) (uint64, error) {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 0, err
	}
	if r.Cur >= need {
		return r.Cur, nil
	}
	r.Cur = min(need, r.Max)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &r); err != nil {
		return 0, err
	}
	return r.Cur, nil
}

// lockedPerAgent is the locked memory an agent's key arena takes: its
// channels' slots and the node key's, in whole pages.
func lockedPerAgent(channels int) int {
	pg := unix.Getpagesize()
	return ((channels+1)*keySlot + pg - 1) / pg * pg
}

// lockable is how many agents' arenas fit in RLIMIT_MEMLOCK (secret.Fit
// counts slots; an arena takes whole pages).
func lockable(channels int) int {
	return secret.Fit(lockedPerAgent(channels), memlockReserve)
}

// openFiles is how many descriptors this process has open.
func openFiles() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// kib formats bytes in KiB, or MiB past ten of them.
func kib(b int64) string {
	if b >= 10<<20 || b <= -10<<20 {
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
}

// table is a Markdown table of measurements: what, result, target.
type table struct{ rows [][3]string }

func (t *table) add(what, result, target string) {
	t.rows = append(t.rows, [3]string{what, result, target})
}

func (t *table) String() string {
	var b strings.Builder
	b.WriteString("| measurement | result | target |\n|---|---|---|\n")
	for _, r := range t.rows {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", r[0], r[1], r[2])
	}
	return b.String()
}
