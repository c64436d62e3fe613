package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// dashboardPath is the Grafana dashboard shipped for the agents' metrics.
const dashboardPath = "../../contrib/grafana/sinc.json"

// grafanaDashboard is the part of Grafana's dashboard JSON the test reads.
type grafanaDashboard struct {
	Title         string         `json:"title"`
	UID           string         `json:"uid"`
	SchemaVersion int            `json:"schemaVersion"`
	Panels        []grafanaPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name       string          `json:"name"`
			Type       string          `json:"type"`
			Query      json.RawMessage `json:"query"` // a string, or {"query": …}
			Datasource *grafanaDS      `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
}

type grafanaDS struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaPanel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource *grafanaDS     `json:"datasource"`
	Panels     []grafanaPanel `json:"panels"` // a collapsed row's
	GridPos    struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		RefID      string     `json:"refId"`
		Expr       string     `json:"expr"`
		Datasource *grafanaDS `json:"datasource"`
	} `json:"targets"`
}

// promqlFunctions are the PromQL functions and aggregations the
// dashboard may use; an identifier followed by "(" must be one of them.
var promqlFunctions = map[string]bool{
	"sum": true, "max": true, "min": true, "avg": true, "count": true, "topk": true, "bottomk": true,
	"rate": true, "irate": true, "increase": true, "delta": true, "deriv": true, "histogram_quantile": true,
	"label_values": true, "clamp_min": true, "clamp_max": true, "abs": true, "vector": true, "time": true,
	"max_over_time": true, "min_over_time": true, "avg_over_time": true, "changes": true, "resets": true,
}

// promqlKeywords are words of PromQL that are not metric names.
var promqlKeywords = map[string]bool{
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"bool": true, "and": true, "or": true, "unless": true, "offset": true, "inf": true, "nan": true,
}

var (
	promqlString   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	promqlMatchers = regexp.MustCompile(`\{[^}]*\}`)
	promqlRange    = regexp.MustCompile(`\[[^\]]*\]`)
	// A grouping clause's list holds label names, not metrics.
	promqlGrouping = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlVariable = regexp.MustCompile(`\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?`)
	promqlIdent    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
	// label_values(metric, label): the label is not a metric.
	labelValues = regexp.MustCompile(`label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)`)
)

// promqlMetrics returns the metric names expr selects: every identifier
// that is not a function, a keyword, a number, a label name (in matchers
// and grouping clauses) or a dashboard variable. An identifier before "("
// that is no known function is an error: it might be a metric the test
// would otherwise miss.
func promqlMetrics(expr string) ([]string, error) {
	e := labelValues.ReplaceAllString(expr, "$1")
	e = promqlString.ReplaceAllString(e, `""`)
	e = promqlMatchers.ReplaceAllString(e, " ")
	e = promqlRange.ReplaceAllString(e, " ")
	e = promqlGrouping.ReplaceAllString(e, " ")
	e = promqlVariable.ReplaceAllString(e, " ")
	var out []string
	for _, m := range promqlIdent.FindAllStringSubmatchIndex(e, -1) {
		word := strings.TrimRight(e[m[0]:m[1]], " \t\n(")
		if m[2] >= 0 { // followed by "("
			if !promqlFunctions[word] {
				return nil, fmt.Errorf("%q calls %q, not a function this test knows", expr, word)
			}
			continue
		}
		// Part of a number (1e3, 0x1f)?
		if m[0] > 0 && (e[m[0]-1] >= '0' && e[m[0]-1] <= '9' || e[m[0]-1] == '.') {
			continue
		}
		if promqlKeywords[strings.ToLower(word)] {
			continue
		}
		out = append(out, word)
	}
	return out, nil
}

// readDashboard parses the dashboard and returns it with every PromQL
// expression it holds (panel targets, nested panels, template queries).
func readDashboard(t *testing.T) (*grafanaDashboard, []string) {
	t.Helper()
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	dec := json.NewDecoder(strings.NewReader(string(b)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	var exprs []string
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				exprs = append(exprs, tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q string
		if json.Unmarshal(v.Query, &q) != nil {
			var obj struct {
				Query string `json:"query"`
			}
			if err := json.Unmarshal(v.Query, &obj); err != nil {
				t.Fatalf("variable %s: query %s: %v", v.Name, v.Query, err)
			}
			q = obj.Query
		}
		exprs = append(exprs, q)
	}
	return &d, exprs
}

// missingMetrics returns the names among names that the scrape does not
// serve. A name is served if a family of that name is in the scrape, or
// if it is a histogram's (or summary's) _bucket, _sum or _count and the
// family it is cut from is one: a suffix cut from a gauge or a counter is
// no metric.
func missingMetrics(names []string, s *scrape) []string {
	var missing []string
	for _, n := range names {
		if _, ok := s.types[n]; ok {
			continue
		}
		found := false
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			base, ok := strings.CutSuffix(n, suf)
			if !ok {
				continue
			}
			typ := s.types[base]
			if typ == "histogram" || suf != "_bucket" && typ == "summary" {
				found = true
			}
		}
		if !found {
			missing = append(missing, n)
		}
	}
	return missing
}

// TestDashboardQueriesLiveMetrics: the Grafana dashboard is valid JSON of
// the shape Grafana imports (a Prometheus data source variable used by
// every panel, unique panel ids, refIds and grid places), and every
// metric its PromQL queries is served by a live agent.
func TestDashboardQueriesLiveMetrics(t *testing.T) {
	d, exprs := readDashboard(t)
	if d.Title == "" || d.UID == "" || d.SchemaVersion < 30 {
		t.Errorf("dashboard title %q, uid %q, schemaVersion %d", d.Title, d.UID, d.SchemaVersion)
	}
	hasDS := false
	for _, v := range d.Templating.List {
		var q string
		json.Unmarshal(v.Query, &q)
		if v.Name == "datasource" && v.Type == "datasource" && q == "prometheus" {
			hasDS = true
		}
	}
	if !hasDS {
		t.Error("no Prometheus data source variable named datasource")
	}
	ids := map[int]bool{}
	var check func([]grafanaPanel)
	check = func(ps []grafanaPanel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel id %d used twice", p.ID)
			}
			ids[p.ID] = true
			if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("panel %q: grid place %+v", p.Title, p.GridPos)
			}
			if p.Type != "row" && (p.Datasource == nil || p.Datasource.UID != "${datasource}" || p.Datasource.Type != "prometheus") {
				t.Errorf("panel %q: data source %+v, want the ${datasource} variable", p.Title, p.Datasource)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if refs[tg.RefID] || tg.RefID == "" {
					t.Errorf("panel %q: refId %q empty or used twice", p.Title, tg.RefID)
				}
				refs[tg.RefID] = true
				if tg.Expr == "" {
					t.Errorf("panel %q: target %s has no expression", p.Title, tg.RefID)
				}
				if tg.Datasource == nil || tg.Datasource.UID != "${datasource}" {
					t.Errorf("panel %q: target %s data source %+v", p.Title, tg.RefID, tg.Datasource)
				}
			}
			if p.Type != "row" && len(p.Targets) == 0 {
				t.Errorf("panel %q queries nothing", p.Title)
			}
			check(p.Panels)
		}
	}
	check(d.Panels)

	// The metric names, from every expression.
	set := map[string]bool{}
	for _, e := range exprs {
		names, err := promqlMetrics(e)
		if err != nil {
			t.Fatal(err)
		}
		if len(names) == 0 {
			t.Errorf("expression %q selects no metric", e)
		}
		for _, n := range names {
			set[n] = true
		}
	}
	var names []string
	for n := range set {
		names = append(names, n)
	}
	sort.Strings(names)
	// What the issue asks the dashboard to show is among them.
	for _, want := range []string{"sinc_channel_bytes_total", "sinc_channels", "sinc_refusals_total", "sinc_frames_rejected_total",
		"sinc_peer_state", "sinc_open_duration_seconds_bucket", "sinc_retransmitted_frames_total", "sinc_channel_resumes_total",
		"sinc_memory_in_use_bytes", "sinc_handshakes_total", "sinc_build_info"} {
		if !set[want] {
			t.Errorf("the dashboard does not query %s (it queries %v)", want, names)
		}
	}

	// A live agent, with a refusal and a failed handshake behind it, so
	// that the families by reason have a series.
	m := startMetricsCluster(t)
	if _, errs, code := runSinc(t, "dial", "node-b/db/other", "--socket", m.webSock); code == 0 {
		t.Fatalf("denied dial went through: %s", errs)
	}
	conn, err := net.Dial("tcp", m.c.Nodes["node-a"].Listen)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("not a handshake"))
	conn.Close()
	live := waitMetric(t, m.metricsA, func(s *scrape) bool {
		for k := range s.series {
			if strings.HasPrefix(k, `sinc_handshakes_total{result="`) && !strings.Contains(k, `"ok"`) {
				return true
			}
		}
		return false
	})
	if missing := missingMetrics(names, live); len(missing) > 0 {
		t.Errorf("the dashboard queries metrics a live agent does not serve: %v", missing)
	} else {
		t.Logf("%d expressions, %d metrics, all served", len(exprs), len(names))
	}
}

// TestDashboardCheckCatchesMissing: the checks above fail for a metric
// that does not exist, for a histogram suffix on a metric that is no
// histogram, and for a call the test does not know (which might hide a
// metric); and they do not take label names, variables or functions for
// metrics.
func TestDashboardCheckCatchesMissing(t *testing.T) {
	s := &scrape{types: map[string]string{"sinc_channels": "gauge", "sinc_open_duration_seconds": "histogram",
		"sinc_refusals_total": "counter"}}
	for _, tc := range []struct {
		expr    string
		missing []string
	}{
		{`sum by (instance, le) (rate(sinc_open_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval]))`, nil},
		{`histogram_quantile(0.99, sum by (le) (rate(sinc_open_duration_seconds_bucket[5m])))`, nil},
		{`rate(sinc_open_duration_seconds_count[1m]) / rate(sinc_open_duration_seconds_sum[1m])`, nil},
		{`2 * sum by (peer) (sinc_channels{state="open", kind=~"stream|message"}) + 1e3`, nil},
		{`label_values(sinc_channels, instance)`, nil},
		{`sum(rate(sinc_no_such_metric[5m]))`, []string{"sinc_no_such_metric"}},
		{`sinc_channels_count`, []string{"sinc_channels_count"}},                                          // a gauge has no _count
		{`sinc_refusals_total_sum + sinc_refusals`, []string{"sinc_refusals_total_sum", "sinc_refusals"}}, // nor a counter _sum
		{`sinc_channels and on (partition) sinc_gone`, []string{"sinc_gone"}},
	} {
		names, err := promqlMetrics(tc.expr)
		if err != nil {
			t.Fatalf("%q: %v", tc.expr, err)
		}
		if got := missingMetrics(names, s); !slices.Equal(got, tc.missing) {
			t.Errorf("%q: names %v, missing %v, want %v", tc.expr, names, got, tc.missing)
		}
	}
	if _, err := promqlMetrics(`sinc_magic(sinc_channels)`); err == nil {
		t.Error("an unknown call passed")
	}
}
