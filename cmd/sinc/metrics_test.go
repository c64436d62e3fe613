package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/buildinfo"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cluster"
)

// sample is one line of the Prometheus text format: a series and its value.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// scrape is what one GET /metrics returned: the samples by series key
// (name{k="v",…} with labels sorted), and the metric families by name
// with their type.
type scrape struct {
	series map[string]float64
	types  map[string]string
	raw    string
}

// seriesLine is name{labels} value (no timestamps: the agent sets none).
var seriesLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$`)

// labelPair is one k="v" of a label set; values here never hold a quote.
var labelPair = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func parseSample(line string) (sample, error) {
	m := seriesLine.FindStringSubmatch(line)
	if m == nil {
		return sample{}, fmt.Errorf("not a sample line: %q", line)
	}
	v, err := strconv.ParseFloat(m[4], 64)
	if err != nil {
		return sample{}, fmt.Errorf("value of %q: %v", line, err)
	}
	s := sample{name: m[1], labels: map[string]string{}, value: v}
	for _, p := range labelPair.FindAllStringSubmatch(m[3], -1) {
		s.labels[p[1]] = p[2]
	}
	return s, nil
}

// key names a series: its name and sorted labels.
func seriesKey(name string, labels map[string]string) string {
	if len(labels) == 0 {
		return name
	}
	ks := make([]string, 0, len(labels))
	for k := range labels {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	var b strings.Builder
	b.WriteString(name + "{")
	for i, k := range ks {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", k, labels[k])
	}
	b.WriteByte('}')
	return b.String()
}

// scrapeClient keeps no connection open between scrapes (which the leak
// check at the end of the tests would find).
var scrapeClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

// scrapeMetrics GETs http://addr/metrics in the text format and parses it.
func scrapeMetrics(t *testing.T, addr string) *scrape {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/metrics", nil)
	resp, err := scrapeClient.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("scrape %s: %s %v\n%s", addr, resp.Status, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("scrape %s: content type %q", addr, ct)
	}
	s := &scrape{series: map[string]float64{}, types: map[string]string{}, raw: string(body)}
	sc := bufio.NewScanner(strings.NewReader(s.raw))
	for sc.Scan() {
		line := sc.Text()
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(f, " ")
			s.types[name] = typ
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		smp, err := parseSample(line)
		if err != nil {
			t.Fatalf("scrape %s: %v", addr, err)
		}
		s.series[seriesKey(smp.name, smp.labels)] = smp.value
	}
	return s
}

// get returns the value of the series name{labels} ("k", "v", …); a
// series that is not there fails the test.
func (s *scrape) get(t *testing.T, name string, kv ...string) float64 {
	t.Helper()
	labels := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		labels[kv[i]] = kv[i+1]
	}
	v, ok := s.series[seriesKey(name, labels)]
	if !ok {
		t.Fatalf("no series %s in the scrape", seriesKey(name, labels))
	}
	return v
}

// names returns the sinc_ series keys.
func (s *scrape) sincSeries() []string {
	var out []string
	for k := range s.series {
		if strings.HasPrefix(k, "sinc_") {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// metricsCluster is node-a (web) and node-b (db) as agent processes, each
// serving metrics on a loopback port; web may reach node-b/db/echo, where
// `sinc listen echo --exec cat` serves.
type metricsCluster struct {
	c            *cluster.Cluster
	procs        []*cluster.Process
	metricsA     string
	metricsB     string
	webSock, dbS string
}

func startMetricsCluster(t *testing.T) *metricsCluster {
	t.Helper()
	var addrs []string
	for range 2 {
		port, err := cluster.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, fmt.Sprintf("127.0.0.1:%d", port))
	}
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Top: fmt.Sprintf("metrics = %q", addrs[0]),
			Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/echo\"\n"},
		{Name: "node-b", Partitions: []string{"db"}, Top: fmt.Sprintf("metrics = %q", addrs[1]),
			Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/echo\"\n"},
	}, cluster.Timers{DialMin: "50ms", DialMax: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	m := &metricsCluster{c: c, procs: startAgents(t, c), metricsA: addrs[0], metricsB: addrs[1],
		webSock: c.Nodes["node-a"].Partitions["web"], dbS: c.Nodes["node-b"].Partitions["db"]}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range m.procs {
				b, _ := os.ReadFile(p.Log)
				t.Logf("%s:\n%s", p.Log, b)
			}
		}
	})
	waitState(t, c.Nodes["node-a"], "node-b", "up", 10*time.Second)
	waitState(t, c.Nodes["node-b"], "node-a", "up", 10*time.Second)
	lst := exec.Command(bin, "listen", "echo", "--socket", m.dbS, "--exec", "cat")
	errs := &syncBuffer{}
	lst.Stderr = errs
	if err := lst.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lst.Process.Kill(); lst.Wait() })
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(errs.String(), "listening on"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("listener did not start: %s", errs)
		}
	}
	return m
}

// TestMetrics scrapes two agents' /metrics, moves traffic, and checks
// that what was moved shows: bytes and frames each way, the channel open
// in both tables, an open in the latency histogram, a denied dial as its
// refusal reason, the link's state and handshakes; that opening more
// channels adds no series (no label per channel); that no key is in the
// output; and that the port closes when the agent stops.
func TestMetrics(t *testing.T) {
	m := startMetricsCluster(t)
	a0, b0 := scrapeMetrics(t, m.metricsA), scrapeMetrics(t, m.metricsB)

	// The build, as sinc version says it.
	var want buildinfo.Info
	if err := json.Unmarshal([]byte(mustSinc(t, "version", "--json")), &want); err != nil {
		t.Fatal(err)
	}
	rev := want.Revision
	if rev == "" {
		rev = buildinfo.Unknown
	}
	if v := a0.get(t, "sinc_build_info", "node", "node-a", "version", want.Version, "revision", rev, "goversion", want.GoVersion); v != 1 {
		t.Errorf("sinc_build_info = %v, want 1", v)
	}
	// Before any channel: every partition's series, at zero.
	for _, kind := range []string{"stream", "message"} {
		for _, st := range []string{"opening", "open"} {
			if v := a0.get(t, "sinc_channels", "partition", "web", "kind", kind, "state", st); v != 0 {
				t.Errorf("sinc_channels{web,%s,%s} = %v before any channel", kind, st, v)
			}
		}
	}
	if v := a0.get(t, "sinc_peer_state", "peer", "node-b", "state", "up"); v != 1 {
		t.Errorf("sinc_peer_state{node-b,up} = %v", v)
	}
	if v := a0.get(t, "sinc_peer_state", "peer", "node-b", "state", "down"); v != 0 {
		t.Errorf("sinc_peer_state{node-b,down} = %v", v)
	}
	// One side accepted the link's handshake on its peer port.
	if ok := a0.get(t, "sinc_handshakes_total", "result", "ok") + b0.get(t, "sinc_handshakes_total", "result", "ok"); ok < 1 {
		t.Errorf("sinc_handshakes_total{ok} = %v on both, want the link's", ok)
	}
	if v := a0.get(t, "sinc_memory_limit_bytes"); v != 256<<20 {
		t.Errorf("sinc_memory_limit_bytes = %v", v)
	}
	if a0.types["sinc_open_duration_seconds"] != "histogram" || a0.types["process_resident_memory_bytes"] != "gauge" {
		t.Errorf("types: open latency %q, process memory %q", a0.types["sinc_open_duration_seconds"], a0.types["process_resident_memory_bytes"])
	}

	// A channel, held open, carrying 64 KiB + 5 bytes each way.
	cmd, in, br, _ := heldDial(t, m.webSock, "node-b/db/echo")
	payload := strings.Repeat("x", 64<<10) + "\n"
	go io.WriteString(in, payload)
	if got, err := br.ReadString('\n'); err != nil || len(got) != len(payload) {
		t.Fatalf("echo of 64 KiB: %d bytes, %v", len(got), err)
	}
	sent := float64(len("ping\n") + len(payload))
	a1 := waitMetric(t, m.metricsA, func(s *scrape) bool {
		return s.get(t, "sinc_channel_bytes_total", "partition", "web", "direction", "in") >= sent
	})
	b1 := scrapeMetrics(t, m.metricsB)
	for _, c := range []struct {
		s          *scrape
		part, name string
		want       float64
	}{
		{a1, "web", "sinc_channel_bytes_total", sent},
		{b1, "db", "sinc_channel_bytes_total", sent},
	} {
		for _, dir := range []string{"in", "out"} {
			if v := c.s.get(t, c.name, "partition", c.part, "direction", dir); v != c.want {
				t.Errorf("%s{%s,%s} = %v, want %v", c.name, c.part, dir, v, c.want)
			}
		}
	}
	if v := a1.get(t, "sinc_channels", "partition", "web", "kind", "stream", "state", "open"); v != 1 {
		t.Errorf("node-a sinc_channels{web,stream,open} = %v with one channel", v)
	}
	if v := b1.get(t, "sinc_channels", "partition", "db", "kind", "stream", "state", "open"); v != 1 {
		t.Errorf("node-b sinc_channels{db,stream,open} = %v with one channel", v)
	}
	for _, dir := range []string{"in", "out"} {
		if d := a1.get(t, "sinc_data_frames_total", "direction", dir) - a0.get(t, "sinc_data_frames_total", "direction", dir); d < 2 {
			t.Errorf("sinc_data_frames_total{%s} moved by %v, want ≥ 2 frames", dir, d)
		}
		if d := a1.get(t, "sinc_link_bytes_total", "peer", "node-b", "direction", dir) - a0.get(t, "sinc_link_bytes_total", "peer", "node-b", "direction", dir); d < sent {
			t.Errorf("sinc_link_bytes_total{node-b,%s} moved by %v, want ≥ %v", dir, d, sent)
		}
	}
	if n := a1.get(t, "sinc_open_duration_seconds_count") - a0.get(t, "sinc_open_duration_seconds_count"); n != 1 {
		t.Errorf("open latency count moved by %v, want 1", n)
	}
	if s := a1.get(t, "sinc_open_duration_seconds_sum"); s <= 0 || s > 5 {
		t.Errorf("open latency sum %vs", s)
	}
	if v := a1.get(t, "sinc_open_duration_seconds_bucket", "le", "+Inf"); v != a1.get(t, "sinc_open_duration_seconds_count") {
		t.Errorf("+Inf bucket %v != count", v)
	}

	// Many more channels add no series: no label is per channel.
	for i := range 10 {
		c := exec.Command(bin, "dial", "node-b/db/echo", "--socket", m.webSock)
		c.Stdin = strings.NewReader(fmt.Sprintf("channel %d\n", i))
		if out, err := c.Output(); err != nil || string(out) != fmt.Sprintf("channel %d\n", i) {
			t.Fatalf("dial %d: %q %v", i, out, err)
		}
	}
	a2 := scrapeMetrics(t, m.metricsA)
	if s1, s2 := a1.sincSeries(), a2.sincSeries(); strings.Join(s1, "\n") != strings.Join(s2, "\n") {
		t.Errorf("series changed with 10 more channels:\nbefore %d: %v\nafter %d: %v", len(s1), s1, len(s2), s2)
	}
	if n := a2.get(t, "sinc_open_duration_seconds_count") - a0.get(t, "sinc_open_duration_seconds_count"); n != 11 {
		t.Errorf("open latency count moved by %v after 11 opens", n)
	}

	// A dial node-a's policy denies: counted under its reason.
	if _, errs, code := runSinc(t, "dial", "node-b/db/other", "--socket", m.webSock); code == 0 || !strings.Contains(errs, "denied") {
		t.Fatalf("denied dial: exit %d, %s", code, errs)
	}
	a3 := scrapeMetrics(t, m.metricsA)
	if v := a3.get(t, "sinc_refusals_total", "reason", "open_denied_policy"); v != 1 {
		t.Errorf("sinc_refusals_total{open_denied_policy} = %v after one denied dial", v)
	}

	// The held channel ends: the table's gauge goes back to zero.
	in.Close()
	exitWithin(t, cmd, 5*time.Second)
	waitMetric(t, m.metricsA, func(s *scrape) bool {
		return s.get(t, "sinc_channels", "partition", "web", "kind", "stream", "state", "open") == 0
	})

	// No key in the output: the node's private key, in any spelling.
	_, keyPath := cert.NodeFiles(m.c.Nodes["node-a"].Dir, "node-a")
	nodeKey := keyBytes(t, keyPath)
	for _, enc := range []string{string(nodeKey), fmt.Sprintf("%x", nodeKey), fmt.Sprintf("%X", nodeKey)} {
		if strings.Contains(a3.raw, enc) {
			t.Fatal("the metrics carry node-a's private key")
		}
	}
	// Labels are only the bounded ones.
	allowed := map[string]bool{"node": true, "version": true, "revision": true, "goversion": true, "partition": true,
		"kind": true, "state": true, "direction": true, "reason": true, "result": true, "peer": true, "link": true, "le": true}
	for k := range a3.series {
		if !strings.HasPrefix(k, "sinc_") {
			continue
		}
		smp, _ := parseSample(k + " 0")
		for l := range smp.labels {
			if !allowed[l] {
				t.Errorf("series %s has label %q", k, l)
			}
		}
	}

	// The metrics port closes with the agent.
	if err := m.procs[0].Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", m.metricsA, time.Second); err == nil {
		c.Close()
		t.Errorf("metrics port %s still open after the agent stopped", m.metricsA)
	}
}

// waitMetric scrapes addr until ok holds of a scrape (within 5s) and
// returns that scrape.
func waitMetric(t *testing.T, addr string, ok func(*scrape) bool) *scrape {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := scrapeMetrics(t, addr)
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics of %s did not reach the expected values:\n%s", addr, strings.Join(s.sincSeries(), "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMetricsAddressTaken: an agent whose metrics address is in use does
// not start, and says which field.
func TestMetricsAddressTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web"},
		Top: fmt.Sprintf("metrics = %q", ln.Addr())}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	_, errs, code := runSinc(t, "agent", "--config", n.Config)
	if code == 0 || !strings.Contains(errs, `field "metrics"`) || !strings.Contains(errs, "address already in use") {
		t.Fatalf("agent with a taken metrics address: exit %d, %s", code, errs)
	}
	for _, p := range []string{n.Admin, n.Partitions["web"]} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left behind by the agent that did not start", p)
		}
	}
}
