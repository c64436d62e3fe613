package config_test

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/policy"
)

// goodConfig uses every field, with relative and absolute paths.
const goodConfig = `# agent of node-a
node = "node-a"
cert = "node-a.crt"
key  = "keys/node-a.key"
ca   = "/etc/sinc/../sinc/ca.crt"
listen = "127.0.0.1:7701"
admin  = "run/admin.sock"

[timers]
handshake = "2s"
keepalive = "1s"
dead_after = "3.5s"
dial_min = "50ms"
dial_max = "1m"
open = "750ms"

[limits]
pending_handshakes = 16
channels = 100
channels_per_partition = 50
channels_per_process = 10
listeners_per_partition = 8
pending_requests = 4
window = 131072
ring = 131072

[partitions.web]
socket = "web.sock"
mode = "0660"
owner = "root"
group = "root"

[partitions.db]
socket = "/run/sinc/node-a/db.sock"
owner = "0"

[peers.node-b]
address = "127.0.0.1:7702"

[peers."node-c.example"]
address = "[::1]:7703"

[[allow]]
from = "node-a/web"
to = "node-b/db/pg"

[[allow]]
from = "*/batch"
to = "node-[bc]*/db/*"
uids = [1000, 1001]
`

// minimalConfig has only the fields that have no default.
const minimalConfig = `node = "n"
cert = "n.crt"
key = "n.key"
ca = "ca.crt"
listen = "localhost:1"
admin = "/run/admin.sock"
[partitions.p]
socket = "/run/p.sock"
`

func TestParseGood(t *testing.T) {
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct{ name, got, want string }{
		{"Path", c.Path, "/etc/sinc/agent.toml"},
		{"Node", c.Node, "node-a"},
		{"Cert", c.Cert, "/etc/sinc/node-a.crt"},
		{"Key", c.Key, "/etc/sinc/keys/node-a.key"},
		{"CA", c.CA, "/etc/sinc/ca.crt"},
		{"Listen", c.Listen, "127.0.0.1:7701"},
		{"Admin", c.Admin, "/etc/sinc/run/admin.sock"},
	} {
		if f.got != f.want {
			t.Errorf("%s = %q, want %q", f.name, f.got, f.want)
		}
	}
	wantTimers := config.Timers{Handshake: 2 * time.Second, Keepalive: time.Second, DeadAfter: 3500 * time.Millisecond,
		DialMin: 50 * time.Millisecond, DialMax: time.Minute, Open: 750 * time.Millisecond, Request: 5 * time.Second, Grace: 30 * time.Second, Rekey: 2 * time.Minute, Rotate: 10 * time.Minute, LinkIdle: 3 * time.Minute}
	if c.Timers != wantTimers {
		t.Errorf("Timers = %+v, want %+v", c.Timers, wantTimers)
	}
	wantLimits := config.Limits{PendingHandshakes: 16, PendingHandshakesPerSource: 8, Channels: 100, Accepted: 75, ChannelsPerPartition: 50,
		AcceptedPerPartition: 8192, AcceptedPerNode: 4096, ChannelsPerProcess: 10,
		ListenersPerPartition: 8, PendingRequests: 4, PendingRequestsPerUID: 1, QueuedRequests: 4096, QueuedRequestsPerUID: 1024,
		Window: 128 << 10, Ring: 128 << 10, RekeyFrames: 1 << 30, RotateFrames: 1 << 24, RotateBytes: 1 << 34, Memory: 256 << 20}
	if c.Limits != wantLimits {
		t.Errorf("Limits = %+v, want %+v", c.Limits, wantLimits)
	}
	wantParts := map[string]config.Partition{
		"web": {Name: "web", Socket: "/etc/sinc/web.sock", Mode: 0o660, UID: 0, GID: 0},
		"db":  {Name: "db", Socket: "/run/sinc/node-a/db.sock", Mode: 0o600, UID: 0, GID: -1},
	}
	if len(c.Partitions) != len(wantParts) {
		t.Errorf("Partitions = %+v", c.Partitions)
	}
	for k, v := range wantParts {
		if c.Partitions[k] != v {
			t.Errorf("Partitions[%q] = %+v, want %+v", k, c.Partitions[k], v)
		}
	}
	wantPeers := map[string]config.Peer{
		"node-b":         {Name: "node-b", Address: "127.0.0.1:7702"},
		"node-c.example": {Name: "node-c.example", Address: "[::1]:7703"},
	}
	if len(c.Peers) != len(wantPeers) {
		t.Errorf("Peers = %+v", c.Peers)
	}
	for k, v := range wantPeers {
		if c.Peers[k] != v {
			t.Errorf("Peers[%q] = %+v, want %+v", k, c.Peers[k], v)
		}
	}
	if n := c.Policy.Len(); n != 2 {
		t.Errorf("Policy has %d rules, want 2", n)
	}
	for _, tc := range []struct {
		src  policy.Source
		dst  policy.Dest
		want bool
	}{
		{policy.Source{Node: "node-a", Partition: "web", UID: 7}, policy.Dest{Node: "node-b", Partition: "db", Service: "pg"}, true},
		{policy.Source{Node: "node-a", Partition: "web", UID: 7}, policy.Dest{Node: "node-b", Partition: "db", Service: "redis"}, false},
		{policy.Source{Node: "node-z", Partition: "batch", UID: 1001}, policy.Dest{Node: "node-c.example", Partition: "db", Service: "x"}, true},
		{policy.Source{Node: "node-z", Partition: "batch", UID: 1002}, policy.Dest{Node: "node-c.example", Partition: "db", Service: "x"}, false},
		{policy.Source{Node: "node-z", Partition: "batch", UID: 1000}, policy.Dest{Node: "node-a", Partition: "db", Service: "x"}, false},
	} {
		if got := c.Policy.Allows(tc.src, tc.dst); got != tc.want {
			t.Errorf("Allows(%+v, %+v) = %v, want %v", tc.src, tc.dst, got, tc.want)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(minimalConfig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Timers != config.DefaultTimers {
		t.Errorf("Timers = %+v, want the defaults %+v", c.Timers, config.DefaultTimers)
	}
	if c.Limits != config.DefaultLimits {
		t.Errorf("Limits = %+v, want the defaults %+v", c.Limits, config.DefaultLimits)
	}
	if c.Peers == nil || len(c.Peers) != 0 {
		t.Errorf("Peers = %#v, want an empty map", c.Peers)
	}
	// A partition's socket is the agent's own, mode 0600.
	if p, want := c.Partitions["p"], (config.Partition{Name: "p", Socket: "/run/p.sock", Mode: 0o600, UID: -1, GID: -1}); p != want || len(c.Partitions) != 1 {
		t.Errorf("Partitions = %+v, want p: %+v", c.Partitions, want)
	}
	// No rules: only channels within a partition.
	if c.Policy == nil || c.Policy.Len() != 0 {
		t.Fatalf("Policy = %+v, want an empty policy", c.Policy)
	}
	if c.Policy.Allows(policy.Source{Node: "n", Partition: "p"}, policy.Dest{Node: "n", Partition: "q", Service: "s"}) ||
		!c.Policy.Allows(policy.Source{Node: "n", Partition: "p"}, policy.Dest{Node: "n", Partition: "p", Service: "s"}) {
		t.Error("the empty policy allows across partitions or denies within one")
	}
	// The defaults are what the package documents.
	want := config.Timers{Handshake: 5 * time.Second, Keepalive: 5 * time.Second, DeadAfter: 15 * time.Second,
		DialMin: 200 * time.Millisecond, DialMax: 30 * time.Second, Open: 5 * time.Second, Request: 5 * time.Second, Grace: 30 * time.Second, Rekey: 2 * time.Minute, Rotate: 10 * time.Minute, LinkIdle: 3 * time.Minute}
	wantLimits := config.Limits{PendingHandshakes: 256, PendingHandshakesPerSource: 8, Channels: 16384, Accepted: 12288, ChannelsPerPartition: 8192,
		AcceptedPerPartition: 8192, AcceptedPerNode: 4096, ChannelsPerProcess: 1024,
		ListenersPerPartition: 256, PendingRequests: 64, PendingRequestsPerUID: 16, QueuedRequests: 4096, QueuedRequestsPerUID: 1024,
		Window: 524288, Ring: 256 << 10, RekeyFrames: 1 << 30, RotateFrames: 1 << 24, RotateBytes: 1 << 34, Memory: 256 << 20}
	if config.DefaultTimers != want || config.DefaultLimits != wantLimits {
		t.Errorf("defaults changed: %+v %+v", config.DefaultTimers, config.DefaultLimits)
	}
	if config.MinWindow != 65536+64 || config.MaxWindow != 64<<20 {
		t.Errorf("window bounds changed: %d..%d", config.MinWindow, config.MaxWindow)
	}
	// Empty tables change nothing.
	c, err = config.Parse("/etc/sinc/agent.toml", []byte(strings.Replace(minimalConfig, "[partitions.p]", "[timers]\n[limits]\n[peers]\n[partitions.p]", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Timers != config.DefaultTimers || c.Limits != config.DefaultLimits || c.Policy.Len() != 0 {
		t.Errorf("empty tables: %+v %+v %d rules", c.Timers, c.Limits, c.Policy.Len())
	}
}

// TestOpsFields: metrics, log_format and log_level, and their defaults
// (metrics off, text, info).
func TestOpsFields(t *testing.T) {
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(minimalConfig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Metrics != "" || c.LogFormat != "text" || c.LogLevel != slog.LevelInfo {
		t.Errorf("defaults: metrics %q, log_format %q, log_level %v; want off, text, info", c.Metrics, c.LogFormat, c.LogLevel)
	}
	c, err = config.Parse("/etc/sinc/agent.toml", []byte(set("listen",
		"listen = \"h:1\"\nmetrics = \"127.0.0.1:9464\"\nlog_format = \"json\"\nlog_level = \"debug\"")))
	if err != nil {
		t.Fatal(err)
	}
	if c.Metrics != "127.0.0.1:9464" || c.LogFormat != "json" || c.LogLevel != slog.LevelDebug {
		t.Errorf("set: metrics %q, log_format %q, log_level %v", c.Metrics, c.LogFormat, c.LogLevel)
	}
	for in, want := range map[string]slog.Level{"debug": slog.LevelDebug, "INFO": slog.LevelInfo, "warn": slog.LevelWarn,
		"warning": slog.LevelWarn, "error": slog.LevelError} {
		if l, err := config.ParseLogLevel(in); err != nil || l != want {
			t.Errorf("ParseLogLevel(%q) = %v, %v; want %v", in, l, err, want)
		}
	}
}

// TestTimersOverride sets one timer at a time: the others keep their
// defaults.
func TestTimersOverride(t *testing.T) {
	for _, tc := range []struct {
		line string
		set  func(*config.Timers)
	}{
		{`handshake = "250ms"`, func(t *config.Timers) { t.Handshake = 250 * time.Millisecond }},
		{`keepalive = "10s"`, func(t *config.Timers) { t.Keepalive = 10 * time.Second }},
		{`dead_after = "1h"`, func(t *config.Timers) { t.DeadAfter = time.Hour }},
		{`dial_min = "1ms"`, func(t *config.Timers) { t.DialMin = time.Millisecond }},
		{`dial_max = "24h"`, func(t *config.Timers) { t.DialMax = 24 * time.Hour }},
		{`dial_max = "200ms"`, func(t *config.Timers) { t.DialMax = 200 * time.Millisecond }}, // equal to dial_min
		{`open = "1ms"`, func(t *config.Timers) { t.Open = time.Millisecond }},
		{`open = "24h"`, func(t *config.Timers) { t.Open = 24 * time.Hour }},
		{`open = "90s"`, func(t *config.Timers) { t.Open = 90 * time.Second }},
		{`request = "250ms"`, func(t *config.Timers) { t.Request = 250 * time.Millisecond }},
		{`grace = "2m"`, func(t *config.Timers) { t.Grace = 2 * time.Minute }},
	} {
		data := withTimers(tc.line)
		c, err := config.Parse("/etc/a.toml", []byte(data))
		if err != nil {
			t.Fatalf("%s: %v", tc.line, err)
		}
		want := config.DefaultTimers
		tc.set(&want)
		if want == config.DefaultTimers {
			t.Fatalf("%s: the test sets a default", tc.line)
		}
		if c.Timers != want {
			t.Errorf("%s: Timers = %+v, want %+v", tc.line, c.Timers, want)
		}
	}
	c, err := config.Parse("/etc/a.toml", []byte(with("[limits]\npending_handshakes = 65536\n")))
	if err != nil || c.Limits.PendingHandshakes != 65536 {
		t.Fatalf("pending_handshakes = 65536: %v", err)
	}
}

// TestLimits: each limit takes its bounds and any value between them, and
// refuses one past either bound, naming itself; the others keep their
// defaults, but for the shares of it that were not given (see TestShares).
func TestLimits(t *testing.T) {
	for _, l := range []struct {
		key      string
		min, max int
		get      func(*config.Limits) *int
		share    func(*config.Limits) // the shares of it that follow it
	}{
		{"pending_handshakes", 1, 65536, func(l *config.Limits) *int { return &l.PendingHandshakes }, nil},
		{"pending_handshakes_per_source", 1, 65536, func(l *config.Limits) *int { return &l.PendingHandshakesPerSource }, nil},
		{"channels", 1, 1 << 20, func(l *config.Limits) *int { return &l.Channels },
			func(l *config.Limits) { l.Accepted = max(1, l.Channels*3/4) }},
		{"accepted", 1, 16384, func(l *config.Limits) *int { return &l.Accepted }, nil}, // at most channels
		{"channels_per_partition", 1, 1 << 20, func(l *config.Limits) *int { return &l.ChannelsPerPartition }, nil},
		{"accepted_per_partition", 1, 1 << 20, func(l *config.Limits) *int { return &l.AcceptedPerPartition }, nil},
		{"accepted_per_node", 1, 1 << 20, func(l *config.Limits) *int { return &l.AcceptedPerNode }, nil},
		{"channels_per_process", 1, 1 << 20, func(l *config.Limits) *int { return &l.ChannelsPerProcess }, nil},
		{"listeners_per_partition", 1, 65536, func(l *config.Limits) *int { return &l.ListenersPerPartition }, nil},
		{"pending_requests", 1, 65536, func(l *config.Limits) *int { return &l.PendingRequests },
			func(l *config.Limits) { l.PendingRequestsPerUID = max(1, l.PendingRequests/4) }},
		{"pending_requests_per_uid", 1, 64, func(l *config.Limits) *int { return &l.PendingRequestsPerUID }, nil},
		{"queued_requests", 1, 1 << 20, func(l *config.Limits) *int { return &l.QueuedRequests },
			func(l *config.Limits) { l.QueuedRequestsPerUID = max(1, l.QueuedRequests/4) }},
		{"queued_requests_per_uid", 1, 4096, func(l *config.Limits) *int { return &l.QueuedRequestsPerUID }, nil},
		{"window", 65536 + 64, 64 << 20, func(l *config.Limits) *int { return &l.Window }, nil},
		{"memory", 4 << 20, 1 << 40, func(l *config.Limits) *int { return &l.Memory }, nil},
	} {
		for _, v := range []int{l.min, l.min + 1, (l.min + l.max) / 2, l.max} {
			line := l.key + " = " + strconv.Itoa(v)
			c, err := config.Parse("/etc/a.toml", []byte(withLimits(line)))
			if err != nil {
				t.Errorf("%s: %v", line, err)
				continue
			}
			want := config.DefaultLimits
			*l.get(&want) = v
			if l.share != nil {
				l.share(&want)
			}
			if c.Limits != want {
				t.Errorf("%s: Limits = %+v, want %+v", line, c.Limits, want)
			}
		}
		field := "limits." + l.key
		for _, v := range []int{l.min - 1, l.max + 1, 0, -1, -1 << 63, 1<<63 - 1} {
			if v >= l.min && v <= l.max {
				continue
			}
			line := l.key + " = " + strconv.Itoa(v)
			c, err := config.Parse("/etc/a.toml", []byte(withLimits(line)))
			var ce *config.Error
			if c != nil || !errors.As(err, &ce) || ce.Field != field {
				t.Errorf("%s: got %v, want an error for %s", line, err, field)
				continue
			}
			want := fmt.Sprintf("%d is outside ", v)
			if l.max < 65536 { // a share: past its whole
				want = fmt.Sprintf("%d is ", v)
			}
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q does not say %q", line, err, want)
			}
		}
	}
	// All of them at once.
	c, err := config.Parse("/etc/a.toml", []byte(withLimits("pending_handshakes = 1\nchannels = 2\nchannels_per_partition = 3\n"+
		"channels_per_process = 4\nlisteners_per_partition = 5\npending_requests = 6\nwindow = 65600\nmemory = 8388608")))
	want := config.Limits{PendingHandshakes: 1, PendingHandshakesPerSource: 8, Channels: 2, Accepted: 1, ChannelsPerPartition: 3,
		AcceptedPerPartition: 8192, AcceptedPerNode: 4096, ChannelsPerProcess: 4,
		ListenersPerPartition: 5, PendingRequests: 6, PendingRequestsPerUID: 1, QueuedRequests: 4096, QueuedRequestsPerUID: 1024,
		Window: 65600, Ring: 256 << 10, RekeyFrames: 1 << 30, RotateFrames: 1 << 24, RotateBytes: 1 << 34, Memory: 8 << 20}
	if err != nil || c.Limits != want {
		t.Fatalf("got %+v, %v; want %+v", c, err, want)
	}
}

// TestPartitionSettings: a partition socket's mode, owner and group.
func TestPartitionSettings(t *testing.T) {
	for _, tc := range []struct {
		lines string
		want  config.Partition
	}{
		{"", config.Partition{Mode: 0o600, UID: -1, GID: -1}},
		{`mode = "0660"`, config.Partition{Mode: 0o660, UID: -1, GID: -1}},
		{`mode = "660"`, config.Partition{Mode: 0o660, UID: -1, GID: -1}},
		{`mode = "0"`, config.Partition{Mode: 0, UID: -1, GID: -1}},
		{`mode = "0777"`, config.Partition{Mode: 0o777, UID: -1, GID: -1}},
		{`mode = "00000644"`, config.Partition{Mode: 0o644, UID: -1, GID: -1}},
		{`owner = "root"`, config.Partition{Mode: 0o600, UID: 0, GID: -1}},
		{`owner = "0"`, config.Partition{Mode: 0o600, UID: 0, GID: -1}},
		{`owner = "1000"`, config.Partition{Mode: 0o600, UID: 1000, GID: -1}},
		{`owner = "2147483647"`, config.Partition{Mode: 0o600, UID: 1<<31 - 1, GID: -1}},
		{`group = "root"`, config.Partition{Mode: 0o600, UID: -1, GID: 0}},
		{`group = "0"`, config.Partition{Mode: 0o600, UID: -1, GID: 0}},
		{`group = "4242"`, config.Partition{Mode: 0o600, UID: -1, GID: 4242}},
		{"mode = \"0640\"\nowner = \"123\"\ngroup = \"root\"", config.Partition{Mode: 0o640, UID: 123, GID: 0}},
	} {
		c, err := config.Parse("/etc/a.toml", []byte(withPartition(tc.lines)))
		if err != nil {
			t.Errorf("%q: %v", tc.lines, err)
			continue
		}
		tc.want.Name, tc.want.Socket = "web", "/w.sock"
		if got := c.Partitions["web"]; got != tc.want {
			t.Errorf("%q: partition %+v, want %+v", tc.lines, got, tc.want)
		}
		// The other partition keeps the defaults.
		if p := c.Partitions["p"]; p.Mode != 0o600 || p.UID != -1 || p.GID != -1 {
			t.Errorf("%q: partition p changed: %+v", tc.lines, p)
		}
	}
}

// TestAllowRules: [[allow]] rules, as tables or inline, make the policy.
func TestAllowRules(t *testing.T) {
	src := func(node, part string, uid uint32) policy.Source {
		return policy.Source{Node: node, Partition: part, UID: uid}
	}
	dst := func(node, part, svc string) policy.Dest {
		return policy.Dest{Node: node, Partition: part, Service: svc}
	}
	type check struct {
		src  policy.Source
		dst  policy.Dest
		want bool
	}
	for _, tc := range []struct {
		name   string
		data   string
		rules  int
		checks []check
	}{
		{"one rule", withRule("from = \"n/web\"\nto = \"b/db/pg\""), 1, []check{
			{src("n", "web", 0), dst("b", "db", "pg"), true},
			{src("n", "web", 1000), dst("b", "db", "pg"), true},
			{src("n", "web", 0), dst("b", "db", "pg2"), false},
			{src("n", "api", 0), dst("b", "db", "pg"), false},
			{src("m", "web", 0), dst("b", "db", "pg"), false},
			{src("n", "web", 0), dst("c", "db", "pg"), false},
			{src("b", "db", 0), dst("n", "web", "x"), false}, // not the other way
			{src("n", "web", 0), dst("n", "web", "x"), true}, // within a partition
		}},
		{"uids", withRule("from = \"n/web\"\nto = \"*/*/*\"\nuids = [1000, 0]"), 1, []check{
			{src("n", "web", 1000), dst("b", "db", "pg"), true},
			{src("n", "web", 0), dst("x", "y", "z"), true},
			{src("n", "web", 1001), dst("b", "db", "pg"), false},
		}},
		{"empty uids: any uid", withRule("from = \"n/web\"\nto = \"b/db/pg\"\nuids = []"), 1, []check{
			{src("n", "web", 4294967295), dst("b", "db", "pg"), true},
		}},
		{"globs", withRule("from = \"node-[a-c]/w?b\"\nto = \"*/db/pg*\""), 1, []check{
			{src("node-b", "wab", 5), dst("z", "db", "pg-main"), true},
			{src("node-d", "web", 5), dst("z", "db", "pg"), false},
			{src("node-a", "webb", 5), dst("z", "db", "pg"), false},
			{src("node-a", "web", 5), dst("z", "dbx", "pg"), false},
		}},
		{"two rules", withRule("from = \"n/a\"\nto = \"b/x/s\"\n[[allow]]\nfrom = \"n/c\"\nto = \"b/y/s\"\nuids = [7]"), 2, []check{
			{src("n", "a", 1), dst("b", "x", "s"), true},
			{src("n", "a", 7), dst("b", "y", "s"), false},
			{src("n", "c", 7), dst("b", "y", "s"), true},
			{src("n", "c", 8), dst("b", "y", "s"), false},
			{src("n", "c", 7), dst("b", "x", "s"), false},
		}},
		{"inline", "allow = [{ from = \"n/a\", to = \"b/x/s\", uids = [3] }, { from = \"*/*\", to = \"b/pub/*\" }]\n" + minimalConfig, 2, []check{
			{src("n", "a", 3), dst("b", "x", "s"), true},
			{src("n", "a", 4), dst("b", "x", "s"), false},
			{src("q", "r", 4), dst("b", "pub", "web"), true},
		}},
	} {
		c, err := config.Parse("/etc/a.toml", []byte(tc.data))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if c.Policy.Len() != tc.rules {
			t.Errorf("%s: %d rules, want %d", tc.name, c.Policy.Len(), tc.rules)
		}
		for _, ch := range tc.checks {
			if got := c.Policy.Allows(ch.src, ch.dst); got != ch.want {
				t.Errorf("%s: Allows(%+v, %+v) = %v, want %v", tc.name, ch.src, ch.dst, got, ch.want)
			}
		}
	}
}

// TestRelativePaths: paths in the file are taken from the file's folder,
// whether the file is named by an absolute or a relative path.
func TestRelativePaths(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "conf", "agent.toml")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(goodConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "conf")
	if c.Cert != filepath.Join(conf, "node-a.crt") || c.Key != filepath.Join(conf, "keys/node-a.key") ||
		c.Admin != filepath.Join(conf, "run/admin.sock") || c.Partitions["web"].Socket != filepath.Join(conf, "web.sock") {
		t.Errorf("relative paths not from %s: %+v", conf, c)
	}
	if c.CA != "/etc/sinc/ca.crt" || c.Partitions["db"].Socket != "/run/sinc/node-a/db.sock" {
		t.Errorf("absolute paths changed: %s %s", c.CA, c.Partitions["db"].Socket)
	}

	// A relative config path: from the working folder.
	t.Chdir(dir)
	c, err = config.Load(filepath.Join("conf", "agent.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Path != filepath.Join("conf", "agent.toml") {
		t.Errorf("Path = %q", c.Path)
	}
	wd, _ := os.Getwd() // dir, with any symbolic links resolved as the OS does
	if want := filepath.Join(wd, "conf", "node-a.crt"); c.Cert != want {
		t.Errorf("Cert = %q, want %q", c.Cert, want)
	}
	// Paths that climb out of the folder are cleaned.
	data := strings.Replace(minimalConfig, `cert = "n.crt"`, `cert = "../x/./n.crt"`, 1)
	c, err = config.Parse("/etc/sinc/agent.toml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if c.Cert != "/etc/x/n.crt" {
		t.Errorf("Cert = %q", c.Cert)
	}
}

// set replaces the line that starts with key (followed by " =" or "=")
// in minimalConfig, or removes it when line is "".
func set(key, line string) string {
	lines := strings.Split(minimalConfig, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, key+" =") || strings.HasPrefix(l, key+"=") {
			lines[i] = line
			return strings.Join(lines, "\n")
		}
	}
	panic("no line " + key)
}

// with adds tables to minimalConfig.
func with(tables string) string { return minimalConfig + tables }

// withTimers puts a [timers] table with the given lines in minimalConfig.
func withTimers(lines string) string { return with("[timers]\n" + lines + "\n") }

// withLimits puts a [limits] table with the given lines in minimalConfig.
func withLimits(lines string) string { return with("[limits]\n" + lines + "\n") }

// withPartition adds a partition web (on line 9) with a socket and the
// given lines (from line 11) to minimalConfig.
func withPartition(lines string) string {
	return with("[partitions.web]\nsocket = \"/w.sock\"\n" + lines + "\n")
}

// withRule adds an [[allow]] rule (on line 9) with the given lines (from
// line 10) to minimalConfig.
func withRule(lines string) string { return with("[[allow]]\n" + lines + "\n") }

// goodRule is a rule that parses.
const goodRule = "from = \"a/b\"\nto = \"c/d/e\""

func TestParseBad(t *testing.T) {
	noPartitions := strings.Replace(minimalConfig, "[partitions.p]\nsocket = \"/run/p.sock\"\n", "", 1)
	for _, tc := range []struct {
		name  string
		data  string
		field string
		want  string
	}{
		{"missing node", set("node", ""), "node", "missing: the name of this node"},
		{"empty node", set("node", `node = ""`), "node", "missing"},
		{"bad node name", set("node", `node = "node/a"`), "node", `name "node/a" has '/'`},
		{"node name too long", set("node", `node = "`+strings.Repeat("n", 64)+`"`), "node", "longer than 63"},
		{"missing cert", set("cert", ""), "cert", "missing: a file path"},
		{"missing key", set("key", ""), "key", "missing: a file path"},
		{"missing ca", set("ca", ""), "ca", "missing: a file path"},
		{"missing admin", set("admin", ""), "admin", "missing: a file path"},
		{"missing listen", set("listen", ""), "listen", "missing: the peer link address"},
		{"listen without port", set("listen", `listen = "127.0.0.1"`), "listen", `"127.0.0.1" is not host:port`},
		{"listen without host", set("listen", `listen = ":7701"`), "listen", `":7701" has no host`},
		{"listen with bad host", set("listen", `listen = "a b:7701"`), "listen", "has a bad host"},
		{"listen with a path", set("listen", `listen = "/run/x:7701"`), "listen", "has a bad host"},
		{"listen with bad port", set("listen", `listen = "h:http"`), "listen", "has a bad port"},
		{"listen with port too large", set("listen", `listen = "h:65536"`), "listen", "has a bad port"},
		{"listen with negative port", set("listen", `listen = "h:-1"`), "listen", "has a bad port"},
		{"listen with signed port", set("listen", `listen = "h:+80"`), "listen", "has a bad port"},
		{"listen with empty port", set("listen", `listen = "h:"`), "listen", "has a bad port"},
		{"metrics without port", set("listen", "listen = \"h:1\"\nmetrics = \"127.0.0.1\""), "metrics", `"127.0.0.1" is not host:port`},
		{"metrics with bad port", set("listen", "listen = \"h:1\"\nmetrics = \"h:prom\""), "metrics", "has a bad port"},
		{"metrics not a string", set("listen", "listen = \"h:1\"\nmetrics = 9464"), "metrics", ""},
		{"bad log format", set("listen", "listen = \"h:1\"\nlog_format = \"xml\""), "log_format", `"xml" is not a log format: text or json`},
		{"bad log level", set("listen", "listen = \"h:1\"\nlog_level = \"loud\""), "log_level", `"loud" is not a log level: debug, info, warn or error`},

		{"bad duration", withTimers(`handshake = "5 seconds"`), "timers.handshake", `"5 seconds" is not a duration like "5s"`},
		{"duration without unit", withTimers(`keepalive = "5"`), "timers.keepalive", "is not a duration"},
		{"bad dead_after", withTimers(`dead_after = "x"`), "timers.dead_after", "is not a duration"},
		{"bad dial_min", withTimers(`dial_min = "1d"`), "timers.dial_min", "is not a duration"},
		{"bad dial_max", withTimers(`dial_max = "--1s"`), "timers.dial_max", "is not a duration"},
		{"zero duration", withTimers(`handshake = "0s"`), "timers.handshake", "0s is outside 1ms..24h"},
		{"negative duration", withTimers(`dial_min = "-1s"`), "timers.dial_min", "-1s is outside 1ms..24h"},
		{"duration too short", withTimers(`keepalive = "999us"`), "timers.keepalive", "999µs is outside 1ms..24h"},
		{"duration too long", withTimers(`dead_after = "24h0m0.001s"`), "timers.dead_after", "is outside 1ms..24h"},
		{"dial_max too long", withTimers(`dial_max = "100000h"`), "timers.dial_max", "is outside 1ms..24h"},
		{"dead_after equal to keepalive", withTimers(`dead_after = "5s"`), "timers.dead_after", "5s must be longer than timers.keepalive (5s)"},
		{"dead_after less than keepalive", withTimers("keepalive = \"20s\""), "timers.dead_after", "15s must be longer than timers.keepalive (20s)"},
		{"dial_max less than dial_min", withTimers(`dial_min = "1m"`), "timers.dial_max", "30s is less than timers.dial_min (1m0s)"},
		{"bad open", withTimers(`open = "soon"`), "timers.open", `"soon" is not a duration like "5s"`},
		{"open zero", withTimers(`open = "0s"`), "timers.open", "0s is outside 1ms..24h"},
		{"open too short", withTimers(`open = "999us"`), "timers.open", "999µs is outside 1ms..24h"},
		{"open too long", withTimers(`open = "24h0m0.001s"`), "timers.open", "24h0m0.001s is outside 1ms..24h"},
		{"duration not a string", withTimers(`handshake = 5`), "timers.handshake", "line 10: incompatible types: TOML value has type int64; destination has type string"},
		{"open not a string", withTimers(`open = 5`), "timers.open", "line 10: incompatible types: TOML value has type int64; destination has type string"},

		{"pending_handshakes zero", with("[limits]\npending_handshakes = 0\n"), "limits.pending_handshakes", "0 is outside 1..65536"},
		{"pending_handshakes negative", with("[limits]\npending_handshakes = -5\n"), "limits.pending_handshakes", "-5 is outside 1..65536"},
		{"pending_handshakes too large", with("[limits]\npending_handshakes = 65537\n"), "limits.pending_handshakes", "65537 is outside 1..65536"},
		// Bounds of every limit: TestLimits.
		{"window not an integer", withLimits(`window = "big"`), "limits.window", "line 10: incompatible types: TOML value has type string; destination has type integer"},
		{"ring not a power of two", withLimits(`ring = 200000`), "limits.ring", "ring size 200000: want a power of two from 131072 to 4194304"},
		{"ring too small", withLimits(`ring = 65536`), "limits.ring", "65536 is outside 131072..4194304"},
		{"window a float", withLimits(`window = 65536.0`), "limits.window", "line 10: incompatible types: TOML value has type float64; destination has type integer"},
		{"window an array", withLimits(`window = [65536]`), "limits.window", "line 10: incompatible types"},
		// TOML integers are int64: a larger one is a syntax error, as the parser finds it.
		{"channels out of int64", withLimits(`channels = 99999999999999999999`), "", "line 10: 99999999999999999999 is out of range for int64"},
		{"limits not a table", "limits = 5\n" + minimalConfig, "limits", "line 1: incompatible types: TOML value has type int64; destination has type table"},

		{"no partitions", noPartitions, "partitions", "missing: at least one [partitions.NAME]"},
		{"partitions not a table", strings.Replace(noPartitions, "admin", "partitions = \"web\"\nadmin", 1), "partitions", "is of TOML type String"},
		{"bad partition name", with("[partitions.\"-web\"]\nsocket = \"/x.sock\"\n"), "partitions.-web", `name "-web" has '-' at 0`},
		{"partition name with slash", with("[partitions.\"a/b\"]\nsocket = \"/x.sock\"\n"), "partitions.a/b", `has '/'`},
		{"missing socket", with("[partitions.web]\n"), "partitions.web.socket", "missing: the partition's Unix socket path"},
		{"duplicate socket", with("[partitions.q]\nsocket = \"/run/p.sock\"\n"), "partitions.q.socket", "/run/p.sock is already the socket of partitions.p"},
		{"duplicate socket, relative and absolute", with("[partitions.q]\nsocket = \"../../run/p.sock\"\n"), "partitions.q.socket", "already the socket of partitions.p"},
		{"duplicate socket, unclean", with("[partitions.q]\nsocket = \"/run//./p.sock\"\n"), "partitions.q.socket", "already the socket of partitions.p"},
		{"partition socket is the admin socket", with("[partitions.q]\nsocket = \"/run/admin.sock\"\n"), "partitions.q.socket", "/run/admin.sock is already the socket of admin"},
		{"partition not a table", with("[partitions]\nweb = 5\n"), "partitions.web", "line 10: incompatible types: TOML value has type int64; destination has type table"},

		{"mode not octal", withPartition(`mode = "rw"`), "partitions.web.mode", `"rw" is not an octal file mode like "0660"`},
		{"mode with a 9", withPartition(`mode = "0999"`), "partitions.web.mode", `"0999" is not an octal file mode`},
		{"mode with sticky bit", withPartition(`mode = "01777"`), "partitions.web.mode", `"01777" is not an octal file mode`},
		{"mode too large", withPartition(`mode = "1000"`), "partitions.web.mode", `"1000" is not an octal file mode`},
		{"mode huge", withPartition(`mode = "7777777777777"`), "partitions.web.mode", `"7777777777777" is not an octal file mode`},
		{"mode negative", withPartition(`mode = "-600"`), "partitions.web.mode", `"-600" is not an octal file mode`},
		{"mode with 0o", withPartition(`mode = "0o660"`), "partitions.web.mode", `"0o660" is not an octal file mode`},
		{"mode with spaces", withPartition(`mode = " 0660"`), "partitions.web.mode", `" 0660" is not an octal file mode`},
		{"mode not a string", withPartition(`mode = 0o600`), "partitions.web.mode", "line 11: incompatible types: TOML value has type int64; destination has type string"},
		{"mode not a string, quoted name", with("[partitions.\"a.b\"]\nsocket = \"/ab.sock\"\nmode = 384\n"), `partitions."a.b".mode`, "line 11: incompatible types"},
		{"unknown owner", withPartition(`owner = "sinc-no-such-user"`), "partitions.web.owner", `"sinc-no-such-user": user: unknown user sinc-no-such-user`},
		{"unknown group", withPartition(`group = "sinc-no-such-group"`), "partitions.web.group", `"sinc-no-such-group": group: unknown group sinc-no-such-group`},
		{"negative uid", withPartition(`owner = "-1"`), "partitions.web.owner", "id -1 is out of range 0..2147483647"},
		{"negative gid", withPartition(`group = "-5"`), "partitions.web.group", "id -5 is out of range 0..2147483647"},
		{"uid too large", withPartition(`owner = "2147483648"`), "partitions.web.owner", "id 2147483648 is out of range 0..2147483647"},
		{"gid too large", withPartition(`group = "4294967296"`), "partitions.web.group", "id 4294967296 is out of range 0..2147483647"},
		{"uid out of int", withPartition(`owner = "99999999999999999999"`), "partitions.web.owner", "id 99999999999999999999 is out of range 0..2147483647"},
		{"owner not a string", withPartition(`owner = 0`), "partitions.web.owner", "line 11: incompatible types: TOML value has type int64; destination has type string"},
		{"group not a string", withPartition(`group = 0`), "partitions.web.group", "line 11: incompatible types: TOML value has type int64; destination has type string"},

		{"peers not a table", strings.Replace(minimalConfig, "admin", "peers = \"node-b\"\nadmin", 1), "peers", "is of TOML type String"},
		{"peers an array of tables", with("[[peers]]\naddress = \"h:1\"\n"), "peers", "is of TOML type ArrayHash"},
		{"bad peer name", with("[peers.\"node b\"]\naddress = \"h:1\"\n"), "peers.node b", `name "node b" has ' '`},
		{"peer is this node", with("[peers.n]\naddress = \"h:1\"\n"), "peers.n", "a node is not its own peer"},
		{"missing peer address", with("[peers.b]\n"), "peers.b.address", "missing: the peer's host:port"},
		{"bad peer address", with("[peers.b]\naddress = \"b\"\n"), "peers.b.address", `"b" is not host:port`},
		{"peer address without host", with("[peers.b]\naddress = \":1\"\n"), "peers.b.address", "has no host"},
		{"peer address with bad port", with("[peers.b]\naddress = \"b:99999\"\n"), "peers.b.address", "has a bad port"},
		{"peer address with port 0", with("[peers.b]\naddress = \"b:0\"\n"), "peers.b.address", `"b:0" has port 0`},
		{"peer address not a string", with("[peers.b]\naddress = 7702\n"), "peers.b.address", "line 10: incompatible types: TOML value has type int64; destination has type string"},

		{"rule without from", withRule(`to = "c/d/e"`), "allow[0]", "a rule needs from (node/partition) and to (node/partition/service)"},
		{"rule without to", withRule(`from = "a/b"`), "allow[0]", "a rule needs from"},
		{"empty rule", withRule(""), "allow[0]", "a rule needs from"},
		{"from with one segment", withRule("from = \"a\"\nto = \"c/d/e\""), "allow[0]", `from "a" is not node/partition`},
		{"from with three segments", withRule("from = \"a/b/c\"\nto = \"c/d/e\""), "allow[0]", `from "a/b/c" is not node/partition`},
		{"to with two segments", withRule("from = \"a/b\"\nto = \"c/d\""), "allow[0]", `to "c/d" is not node/partition/service`},
		{"to with four segments", withRule("from = \"a/b\"\nto = \"c/d/e/f\""), "allow[0]", `to "c/d/e/f" is not node/partition/service`},
		{"bad pattern in from", withRule("from = \"a/[\"\nto = \"c/d/e\""), "allow[0]", `bad pattern "["`},
		{"bad pattern in to", withRule("from = \"a/b\"\nto = \"[/d/e\""), "allow[0]", `bad pattern "["`},
		{"empty pattern", withRule("from = \"a/b\"\nto = \"c//e\""), "allow[0]", "empty pattern"},
		{"second rule bad", withRule(goodRule + "\n[[allow]]\nfrom = \"a\"\nto = \"c/d/e\""), "allow[1]", `from "a" is not node/partition`},
		{"third rule without to", withRule(goodRule + "\n[[allow]]\n" + goodRule + "\n[[allow]]\nfrom = \"a/b\""), "allow[2]", "a rule needs from"},
		{"uids not integers", withRule(goodRule + "\nuids = [\"x\"]"), "allow[0].uids", "incompatible types: TOML value has type string; destination has type integer"},
		{"uids of the second rule not integers", withRule(goodRule + "\nuids = [1]\n[[allow]]\n" + goodRule + "\nuids = [2, \"x\"]"), "allow[1].uids", "TOML value has type string; destination has type integer"},
		{"uid negative", withRule(goodRule + "\nuids = [-1]"), "allow[0].uids", "-1 is out of range for uint32"},
		{"uid too large", withRule(goodRule + "\nuids = [4294967296]"), "allow[0].uids", "4294967296 is out of range for uint32"},
		{"uids not an array", withRule(goodRule + "\nuids = 1000"), "allow[0].uids", "incompatible types: TOML value has type int64; destination has type slice"},
		{"from not a string", withRule("from = 1\nto = \"c/d/e\""), "allow[0].from", "incompatible types: TOML value has type int64; destination has type string"},
		{"rule not a table", "allow = [1]\n" + minimalConfig, "allow[0]", "incompatible types: TOML value has type int64; destination has type table"},
		{"allow not an array", "allow = 5\n" + minimalConfig, "allow", "line 1: incompatible types: TOML value has type int64; destination has type slice"},
		{"allow a table", with("[allow]\n" + goodRule + "\n"), "allow", "line 9: incompatible types: TOML value has type map[string]any; destination has type slice"},
		{"unknown rule field", withRule(goodRule + "\nfromm = \"x/y\""), "allow[0].fromm", "unknown field"},
		{"unknown field in the second rule", withRule(goodRule + "\n[[allow]]\n" + goodRule + "\nuid = [1]"), "allow[1].uid", "unknown field"},
		{"unknown rule field, quoted", withRule(goodRule + "\n\"a b\" = 1"), `allow[0]."a b"`, "unknown field"},
		{"unknown rule table", withRule(goodRule + "\n[allow.x]\ny = 1"), "allow[0].x", "unknown field"},

		{"unknown top-level field", minimalConfig + "", "", ""}, // replaced below
		{"unknown table", with("[policy]\nallow = true\n"), "policy", "unknown field"},
		{"unknown timer", withTimers(`keepalve = "1s"`), "timers.keepalve", "unknown field"},
		{"unknown limit", with("[limits]\nchanels = 5\n"), "limits.chanels", "unknown field"},
		{"unknown partition field", with("[partitions.web]\nsocket = \"/w.sock\"\nmod = \"0600\"\n"), "partitions.web.mod", "unknown field"},
		{"unknown peer field", with("[peers.b]\naddress = \"h:1\"\nadress = \"h:2\"\n"), "peers.b.adress", "unknown field"},

		{"syntax error", set("cert", `cert = "n.crt`), "", "line 2"},
		{"syntax error later", with("[peers.b c]\naddress = \"h:1\"\n"), "", "line 9"},
		{"duplicate key", set("key", "key = \"a\"\nkey = \"b\""), "", "line 4"},
		{"wrong type", set("node", "node = 5"), "node", "line 1: incompatible types: TOML value has type int64; destination has type string"},
		{"syntax error in a partition", withPartition("mode = "), "", "line 11: expected value"},
		{"table defined twice", withPartition("[partitions.web]"), "", "line 11: Key 'partitions.web' has already been defined."},
		{"too large", minimalConfig + "#" + strings.Repeat("x", config.MaxFileSize), "", "more than 1048576"},
	} {
		if tc.name == "unknown top-level field" {
			tc.data, tc.field, tc.want = "nod = \"x\"\n"+minimalConfig, "nod", "unknown field"
		}
		t.Run(tc.name, func(t *testing.T) {
			const path = "/etc/sinc/agent.toml"
			c, err := config.Parse(path, []byte(tc.data))
			if c != nil {
				t.Errorf("Parse returned a config with the error")
			}
			var ce *config.Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v (%T), want a *config.Error", err, err)
			}
			if ce.Field != tc.field {
				t.Errorf("Field = %q, want %q (error %q)", ce.Field, tc.field, err)
			}
			if ce.File != path {
				t.Errorf("File = %q", ce.File)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "config "+path+": ") {
				t.Errorf("error %q does not start with the file", err)
			}
			if tc.field != "" && !strings.Contains(err.Error(), "field "+strconv.Quote(tc.field)+": ") {
				t.Errorf("error %q does not name the field", err)
			}
		})
	}
}

// TestParseAtLimit: a file of exactly MaxFileSize bytes is read.
func TestParseAtLimit(t *testing.T) {
	data := minimalConfig + "#"
	data += strings.Repeat("x", config.MaxFileSize-len(data))
	if _, err := config.Parse("/a.toml", []byte(data)); err != nil {
		t.Fatal(err)
	}
}

func TestErrorFormat(t *testing.T) {
	inner := errors.New("boom")
	e := &config.Error{File: "/a.toml", Field: "timers.keepalive", Err: inner}
	if got := e.Error(); got != `config /a.toml: field "timers.keepalive": boom` {
		t.Errorf("Error() = %q", got)
	}
	if !errors.Is(e, inner) {
		t.Error("Error does not unwrap")
	}
	e.Field = ""
	if got := e.Error(); got != "config /a.toml: boom" {
		t.Errorf("Error() = %q", got)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	t.Run("missing file", func(t *testing.T) {
		path := filepath.Join(dir, "missing.toml")
		c, err := config.Load(path)
		if c != nil {
			t.Error("Load returned a config with the error")
		}
		var ce *config.Error
		if !errors.As(err, &ce) || ce.File != path {
			t.Fatalf("got %v, want a *config.Error for %s", err, path)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("error %v is not ErrNotExist", err)
		}
		if !strings.Contains(err.Error(), path) {
			t.Errorf("error %q does not name %s", err, path)
		}
	})
	t.Run("directory", func(t *testing.T) {
		_, err := config.Load(dir)
		var ce *config.Error
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), dir) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("too large", func(t *testing.T) {
		path := filepath.Join(dir, "big.toml")
		if err := os.WriteFile(path, []byte(minimalConfig+"#"+strings.Repeat("x", config.MaxFileSize)), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path)
		var ce *config.Error
		if !errors.As(err, &ce) || ce.File != path || !strings.Contains(err.Error(), "more than 1048576") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("bad content names the file", func(t *testing.T) {
		path := filepath.Join(dir, "bad.toml")
		if err := os.WriteFile(path, []byte(set("node", "")), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path)
		var ce *config.Error
		if !errors.As(err, &ce) || ce.File != path || ce.Field != "node" {
			t.Fatalf("got %v", err)
		}
	})
}

// TestLoadBoundsReading: a file with no size (a FIFO, a device) is read no
// further than the size bound.
func TestLoadBoundsReading(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fifo.toml")
	if err := mkfifo(path); err != nil {
		t.Skip("no FIFOs here:", err)
	}
	written := make(chan int64, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			written <- -1
			return
		}
		defer f.Close()
		chunk := make([]byte, 64<<10)
		for i := range chunk {
			chunk[i] = '#'
		}
		var n int64
		for n < 16*config.MaxFileSize {
			m, err := f.Write(chunk)
			n += int64(m)
			if err != nil {
				break
			}
		}
		written <- n
	}()
	_, err := config.Load(path)
	var ce *config.Error
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("got %v", err)
	}
	if n := <-written; n < 0 || n > 2*config.MaxFileSize {
		t.Fatalf("Load read %d bytes of a FIFO, bound %d", n, config.MaxFileSize)
	}
}

func mkfifo(path string) error { return syscall.Mkfifo(path, 0o600) }
