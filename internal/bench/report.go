package bench

import (
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
)

// Metric keys.
const (
	mBulk    = "bulk"
	mCPU     = "cpu_per_byte"
	mRTT50   = "rtt_p50"
	mRTT99   = "rtt_p99"
	mOpens   = "opens_per_sec"
	mSetup50 = "setup_p50"
)

func rateKey(size int, batched bool) string {
	if batched {
		return fmt.Sprintf("rate_%d_batched", size)
	}
	return fmt.Sprintf("rate_%d_one_write", size)
}

func memKey(who string, n int) string { return fmt.Sprintf("mem_%s_%d", who, n) }

// Summary is a metric's values over the repetitions.
type Summary struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

func summarize(v []float64) Summary {
	if len(v) == 0 {
		return Summary{}
	}
	s := slices.Sorted(slices.Values(v))
	n := len(s)
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	return Summary{N: n, Median: med, Min: s[0], Max: s[n-1]}
}

// Metric is one row of the report.
type Metric struct {
	Key          string `json:"key"`
	Name         string `json:"name"`
	Unit         string `json:"unit"`
	HigherBetter bool   `json:"higher_better"`
	SincOnly     bool   `json:"sinc_only,omitempty"`
	// Samples and Summary by transport.
	Samples map[string][]float64 `json:"samples"`
	Summary map[string]Summary   `json:"summary"`
	// Ratios of medians: "sinc-stream/tls", "sinc-ring/tls" and so on.
	Ratios map[string]float64 `json:"ratios"`
}

// Report is the result of a run.
type Report struct {
	Machine    string    `json:"machine"`
	Options    Options   `json:"-"`
	Transports []string  `json:"transports"`
	Reps       int       `json:"reps"`
	Metrics    []*Metric `json:"metrics"`
	// CPU per byte of bulk by transport and process (ns/B), median over
	// the repetitions.
	CPUSplit   map[string]map[string]Summary `json:"cpu_split"`
	cpuSamples map[string]map[string][]float64
	TLSInfo    string            `json:"tls"`
	Goals      []Target          `json:"targets"`
	Notes      []string          `json:"notes,omitempty"` // what the run left out, and why
	Batched    map[string]string `json:"batched_means"`
	OneWrite   map[string]string `json:"one_write_means"`
	Seconds    float64           `json:"seconds"`
	// LoadBefore is the 1-minute load average before the run; OtherCPU
	// the share of the machine's CPU time that processes other than this
	// run's used while it ran (-1: unknown). Both show other work that
	// may have disturbed the run.
	LoadBefore string  `json:"load_before"`
	OtherCPU   float64 `json:"other_cpu"`
}

func newReport(o Options) *Report {
	r := &Report{Machine: machine(), Options: o, Transports: o.Transports, Reps: o.Reps, Notes: o.Notes,
		CPUSplit: map[string]map[string]Summary{}, cpuSamples: map[string]map[string][]float64{},
		Batched: batchedMeaning, OneWrite: oneWriteMeaning}
	add := func(key, name, unit string, higher, sincOnly bool) {
		r.Metrics = append(r.Metrics, &Metric{Key: key, Name: name, Unit: unit, HigherBetter: higher, SincOnly: sincOnly,
			Samples: map[string][]float64{}, Summary: map[string]Summary{}, Ratios: map[string]float64{}})
	}
	add(mBulk, fmt.Sprintf("bulk throughput (64 KiB writes, %s)", sizeName(o.BulkBytes)), "MiB/s", true, false)
	add(mCPU, "CPU per byte, all processes of the path", "ns/B", false, false)
	add(mRTT50, fmt.Sprintf("%d B round trip p50", o.PingSize), "µs", false, false)
	add(mRTT99, fmt.Sprintf("%d B round trip p99", o.PingSize), "µs", false, false)
	for _, size := range o.MsgSizes {
		add(rateKey(size, true), fmt.Sprintf("%s messages, batched", sizeName(int64(size))), "k msg/s", true, false)
	}
	for _, size := range o.MsgSizes {
		add(rateKey(size, false), fmt.Sprintf("%s messages, one write each", sizeName(int64(size))), "k msg/s", true, false)
	}
	add(mOpens, fmt.Sprintf("setup: open+close cycles, %d openers", o.SetupConc), "opens/s", true, false)
	add(mSetup50, "setup latency p50, 1 opener", "µs", false, false)
	for _, n := range o.IdleCounts {
		add(memKey("agent", n), fmt.Sprintf("agent memory per idle channel, %d open (both agents)", n), "KiB", false, true)
	}
	for _, n := range o.IdleCounts {
		add(memKey("endpoint", n), fmt.Sprintf("client+server memory per idle connection, %d open", n), "KiB", false, false)
	}
	return r
}

func sizeName(b int64) string {
	switch {
	case b >= 1<<20 && b%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", b>>20)
	case b >= 1<<10 && b%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", b>>10)
	}
	return fmt.Sprintf("%d B", b)
}

func (r *Report) metric(key string) *Metric {
	for _, m := range r.Metrics {
		if m.Key == key {
			return m
		}
	}
	return nil
}

// Metric returns the metric of key, or nil.
func (r *Report) Metric(key string) *Metric { return r.metric(key) }

func (r *Report) add(key, tr string, v float64) {
	if m := r.metric(key); m != nil {
		m.Samples[tr] = append(m.Samples[tr], v)
	}
}

func (r *Report) addCPU(tr, proc string, v float64) {
	if r.cpuSamples[tr] == nil {
		r.cpuSamples[tr] = map[string][]float64{}
	}
	r.cpuSamples[tr][proc] = append(r.cpuSamples[tr][proc], v)
}

// finish computes the summaries and the ratios.
func (r *Report) finish() {
	for _, m := range r.Metrics {
		for tr, v := range m.Samples {
			m.Summary[tr] = summarize(v)
		}
		for _, s := range sincTransports {
			for _, base := range ratioBases {
				a, okA := m.Summary[s]
				b, okB := m.Summary[base]
				if okA && okB && b.Median != 0 {
					m.Ratios[s+"/"+base] = a.Median / b.Median
				}
			}
		}
	}
	for tr, procs := range r.cpuSamples {
		r.CPUSplit[tr] = map[string]Summary{}
		for p, v := range procs {
			r.CPUSplit[tr][p] = summarize(v)
		}
	}
}

// ratioBases are the transports sinc's are compared with, in the order of
// the ratio columns.
var ratioBases = []string{TLS, TCP, Stunnel}

// What "batched" and "one write" mean for each transport.
var batchedMeaning = map[string]string{
	Stunnel:     "as tcp, through both stunnel processes",
	TCP:         "4-byte length prefix + message, packed in a 64 KiB bufio.Writer: one write(2) per 64 KiB",
	TLS:         "as tcp, through tls.Conn: 64 KiB per Write, which TLS cuts into 16 KiB records",
	SincStream:  "as tcp, inside the stream: 64 KiB per Conn.Write = one 64 KiB record, one writev(2)",
	SincRing:    "as tcp, inside the stream: 64 KiB per Conn.Write = one 64 KiB record into the ring up, the agent woken only if it sleeps",
	SincMessage: "one record per message (the protocol's own framing), records packed 64 KiB per write(2) on the channel socket (the Go client has no batching write)",
}

var oneWriteMeaning = map[string]string{
	Stunnel:     "not measured (the setup and idle rows neither)",
	TCP:         "Write(prefix+message) per message: one write(2) each",
	TLS:         "Write(prefix+message) per message: one TLS record, one write(2) each",
	SincStream:  "Write(prefix+message) per message: one record, one writev(2) each",
	SincRing:    "Write(prefix+message) per message: one record into the ring up each, no system call unless the agent sleeps",
	SincMessage: "WriteMessage per message: one record, one writev(2) each",
}

func format(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.3f", v)
}

func cell(s Summary) string {
	if s.N == 0 {
		return "—"
	}
	if s.N == 1 {
		return format(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", format(s.Median), format(s.Min), format(s.Max))
}

// Format writes the report as tables.
func (r *Report) Format(w io.Writer) {
	fmt.Fprintf(w, "sinc bench: %s; %d repetitions, interleaved; loopback, every transport in its own processes\n", r.Machine, r.Reps)
	fmt.Fprintf(w, "cells: median (min–max) over the repetitions; ratios: sinc ÷ other, of the medians.\n")
	fmt.Fprintf(w, "▲ higher is better (throughput, rates: a ratio above 1 means sinc is faster); ▼ lower is better (times, CPU, memory: a ratio below 1 means sinc is cheaper).\n\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := []string{"metric", "unit", ""}
	head = append(head, r.Transports...)
	var ratioCols []string
	for _, s := range sincTransports {
		if !slices.Contains(r.Transports, s) {
			continue
		}
		for _, base := range ratioBases {
			if slices.Contains(r.Transports, base) {
				ratioCols = append(ratioCols, s+"/"+base)
			}
		}
	}
	for _, c := range ratioCols {
		head = append(head, strings.NewReplacer("sinc-stream", "stream", "sinc-ring", "ring", "sinc-message", "message", "tls", "TLS", "tcp", "TCP").Replace(c))
	}
	fmt.Fprintln(tw, strings.Join(head, "\t"))
	for _, m := range r.Metrics {
		dir := "▼"
		if m.HigherBetter {
			dir = "▲"
		}
		row := []string{m.Name, m.Unit, dir}
		for _, tr := range r.Transports {
			row = append(row, cell(m.Summary[tr]))
		}
		for _, c := range ratioCols {
			if v, ok := m.Ratios[c]; ok {
				row = append(row, fmt.Sprintf("%.2f×", v))
			} else {
				row = append(row, "—")
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()

	fmt.Fprintf(w, "\nCPU per byte of the bulk transfer, by process (ns/B, median):\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	procs := []string{"client", "server", "agent-a", "agent-b"}
	fmt.Fprintln(tw, "transport\t"+strings.Join(procs, "\t")+"\ttotal")
	for _, tr := range r.Transports {
		split := r.CPUSplit[tr]
		if split == nil {
			continue
		}
		row := []string{tr}
		var total float64
		for _, p := range procs {
			if s, ok := split[p]; ok {
				row = append(row, format(s.Median))
				total += s.Median
			} else {
				row = append(row, "—")
			}
		}
		row = append(row, format(total))
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()

	if targets := r.Targets(); len(targets) > 0 {
		fmt.Fprintf(w, "\nissue 6 targets (ratios against direct TLS in this run):\n")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "target\ttransport\tnow\t")
		for _, t := range targets {
			met := "not met"
			if t.Met {
				met = "met"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Name, t.Transport, t.Value, met)
		}
		tw.Flush()
	}

	fmt.Fprintf(w, "\nbatched sender:\n")
	for _, tr := range r.Transports {
		fmt.Fprintf(w, "  %-12s %s\n", tr, r.Batched[tr])
	}
	fmt.Fprintf(w, "one write per message:\n")
	for _, tr := range r.Transports {
		fmt.Fprintf(w, "  %-12s %s\n", tr, r.OneWrite[tr])
	}
	fmt.Fprintf(w, "receivers: tcp, tls, sinc-stream, sinc-ring parse the prefixes from a 64 KiB bufio.Reader; sinc-message reads one message per Read.\n")
	if r.TLSInfo != "" {
		fmt.Fprintf(w, "tls: %s\n", r.TLSInfo)
	}
	fmt.Fprintf(w, "sinc: two `sinc agent` processes (node-a ↔ node-b, one Noise link), default window, ring size, timers and checks; limits raised for 10,000 channels per process.\n")
	fmt.Fprintf(w, "sinc paths: sinc-stream and sinc-message move the data between each process and its agent over the channel's Unix socket (NoRing); sinc-ring through the two rings it shares with its agent, at both ends (checked in /proc/PID/maps).\n")
	if slices.Contains(r.Transports, Stunnel) {
		fmt.Fprintf(w, "stunnel: client → stunnel (client side) → TLS 1.3 → stunnel (server side) → server, the tcp workers; agent-a and agent-b in the CPU split are stunnel's client and server sides.\n")
	}
	fmt.Fprintf(w, "setup: tcp = connect+close; tls = connect+full handshake+close; sinc = channel open through both agents (policy checked by each)+close (sinc-ring: with its rings made and handed over at both ends).\n")
	fmt.Fprintf(w, "memory: growth of VmRSS from before the opens, fresh processes for each measurement; CPU: run time of every thread (/proc/PID/task/*/schedstat; stunnel's, whose threads end with their connections: /proc/PID/stat, in 10 ms ticks).\n")
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	other := "unknown"
	if r.OtherCPU >= 0 {
		other = fmt.Sprintf("%.0f%%", 100*r.OtherCPU)
	}
	fmt.Fprintf(w, "run took %.0f s; load average before it %s; CPU used by other processes during it: %s of the machine\n",
		r.Seconds, r.LoadBefore, other)
}

// cpuModel is the CPU's model name, if /proc/cpuinfo says.
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// Target is where a sinc transport stands against a target of issue 6.
type Target struct {
	Name      string `json:"name"`
	Transport string `json:"transport"`
	Value     string `json:"value"`
	Met       bool   `json:"met"`
}

// Targets compares the run with the targets of issue 6.
func (r *Report) Targets() []Target {
	var out []Target
	ratio := func(name, key string, atLeast bool, bound float64) {
		m := r.metric(key)
		if m == nil {
			return
		}
		for _, tr := range sincTransports {
			v, ok := m.Ratios[tr+"/"+TLS]
			if !ok {
				continue
			}
			met := v <= bound
			if atLeast {
				met = v >= bound
			}
			out = append(out, Target{name, tr, fmt.Sprintf("%.2f×", v), met})
		}
	}
	abs := func(name, key, unit string, atLeast bool, bound float64) {
		m := r.metric(key)
		if m == nil {
			return
		}
		for _, tr := range sincTransports {
			s, ok := m.Summary[tr]
			if !ok {
				continue
			}
			met := s.Median <= bound
			if atLeast {
				met = s.Median >= bound
			}
			out = append(out, Target{name, tr, format(s.Median) + " " + unit, met})
		}
	}
	ratio("bulk throughput ≥ 0.8×", mBulk, true, 0.8)
	ratio("64 B round trip p50 ≤ 3.5×", mRTT50, false, 3.5)
	for _, size := range r.Options.MsgSizes {
		ratio(fmt.Sprintf("batched message rate, %s ≥ 0.8×", sizeName(int64(size))), rateKey(size, true), true, 0.8)
	}
	for _, size := range r.Options.MsgSizes {
		ratio(fmt.Sprintf("message rate one write each, %s ≥ 1.0×", sizeName(int64(size))), rateKey(size, false), true, 1.0)
	}
	abs("channel setup ≥ 20,000 opens/s", mOpens, "opens/s", true, 20000)
	if n := len(r.Options.IdleCounts); n > 0 {
		c := r.Options.IdleCounts[n-1]
		abs(fmt.Sprintf("agent memory per idle channel (%d) ≤ 8 KiB", c), memKey("agent", c), "KiB", false, 8)
	}
	return out
}

// loadAvg is the 1-minute load average, as /proc/loadavg says.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) > 0 {
		return f[0]
	}
	return "?"
}

// cpuTicks is the machine's busy and total CPU time and the time of this
// process and its reaped children, in clock ticks.
type cpuTicks struct{ busy, total, self int64 }

func readTicks() (cpuTicks, bool) {
	var t cpuTicks
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return t, false
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return t, false
	}
	var v [8]int64
	for i := range v {
		if v[i], err = strconv.ParseInt(f[i+1], 10, 64); err != nil {
			return t, false
		}
	}
	// user nice system idle iowait irq softirq steal
	t.busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
	t.total = t.busy + v[3] + v[4]
	b, err = os.ReadFile("/proc/self/stat")
	if err != nil {
		return t, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return t, false
	}
	f = strings.Fields(s[i+1:])
	if len(f) < 15 {
		return t, false
	}
	for _, k := range []int{11, 12, 13, 14} { // utime stime cutime cstime
		n, err := strconv.ParseInt(f[k], 10, 64)
		if err != nil {
			return t, false
		}
		t.self += n
	}
	return t, true
}

// otherCPU is the share of the machine's CPU time between a and b that
// went to processes other than this one and its children (all reaped by
// b).
func otherCPU(a, b cpuTicks) float64 {
	total := b.total - a.total
	if total <= 0 {
		return -1
	}
	other := (b.busy - a.busy) - (b.self - a.self)
	return max(0, float64(other)/float64(total))
}
