package policy

import "testing"

func TestAllows(t *testing.T) {
	mustRule := func(from, to string, uids ...uint32) Rule {
		r, err := ParseRule(from, to, uids)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	p, err := New([]Rule{
		mustRule("node-a/web", "node-b/db/pg"),
		mustRule("*/batch", "node-b/db/*", 1000, 1001),
		mustRule("node-[ab]/ops", "*/*/metrics"),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		src  Source
		dst  Dest
		want bool
	}{
		{Source{"node-a", "web", 5}, Dest{"node-b", "db", "pg"}, true},
		{Source{"node-a", "web", 5}, Dest{"node-b", "db", "redis"}, false},   // service not allowed
		{Source{"node-c", "web", 5}, Dest{"node-b", "db", "pg"}, false},      // node not allowed
		{Source{"node-a", "cache", 5}, Dest{"node-b", "db", "pg"}, false},    // partition not allowed
		{Source{"node-a", "batch", 1000}, Dest{"node-b", "db", "any"}, true}, // glob + uid
		{Source{"node-z", "batch", 1001}, Dest{"node-b", "db", "pg"}, true},
		{Source{"node-a", "batch", 999}, Dest{"node-b", "db", "pg"}, false}, // uid not listed
		{Source{"node-b", "ops", 0}, Dest{"node-q", "x", "metrics"}, true},
		{Source{"node-c", "ops", 0}, Dest{"node-q", "x", "metrics"}, false},
		{Source{"node-q", "x", 7}, Dest{"node-q", "x", "anything"}, true},  // same partition
		{Source{"node-q", "x", 7}, Dest{"node-q", "y", "anything"}, false}, // other partition, same node
		{Source{"node-q", "x", 7}, Dest{"node-r", "x", "anything"}, false}, // same name, other node
	} {
		if got := p.Allows(tc.src, tc.dst); got != tc.want {
			t.Errorf("Allows(%+v, %+v) = %v, want %v", tc.src, tc.dst, got, tc.want)
		}
	}
	var none *Policy
	if none.Allows(Source{"a", "b", 0}, Dest{"a", "c", "s"}) {
		t.Error("nil policy allowed a channel across partitions")
	}
	if !none.Allows(Source{"a", "b", 0}, Dest{"a", "b", "s"}) {
		t.Error("nil policy denied a channel within a partition")
	}
}

func TestParseRuleErrors(t *testing.T) {
	for _, tc := range [][2]string{
		{"node-a", "node-b/db/pg"},
		{"node-a/web", "node-b/db"},
		{"node-a/web/x", "node-b/db/pg"},
		{"node-a/[", "node-b/db/pg"},
		{"node-a/", "node-b/db/pg"},
	} {
		if _, err := ParseRule(tc[0], tc[1], nil); err == nil {
			t.Errorf("ParseRule(%q, %q) succeeded", tc[0], tc[1])
		}
	}
}
