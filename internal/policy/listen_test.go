package policy

import (
	"strings"
	"testing"
)

func TestMayListen(t *testing.T) {
	allow, err := ParseRule("node-a/web", "node-b/db/pg", nil)
	if err != nil {
		t.Fatal(err)
	}
	base, err := New([]Rule{allow})
	if err != nil {
		t.Fatal(err)
	}
	p, err := base.WithListenRules([]ListenRule{
		{Partition: "db", Service: "pg", UIDs: []uint32{1001}},
		{Partition: "db", Service: "pg*", UIDs: []uint32{1002}}, // rules add up
		{Partition: "db", Service: "admin-[0-9]", UIDs: []uint32{0}},
		{Partition: "web", Service: "*", UIDs: []uint32{33}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		part, svc     string
		uid           uint32
		ok, wantRuled bool
	}{
		{"db", "pg", 1001, true, true},
		{"db", "pg", 1002, true, true}, // the glob rule names 1002 too
		{"db", "pg", 1003, false, true},
		{"db", "pgbouncer", 1001, false, true}, // only "pg*" matches
		{"db", "pgbouncer", 1002, true, true},
		{"db", "admin-7", 0, true, true},
		{"db", "admin-7", 1001, false, true},
		{"db", "admin-x", 1001, true, false}, // no rule: open to all
		{"db", "redis", 4242, true, false},
		{"web", "anything", 33, true, true},
		{"web", "anything", 34, false, true},
		{"cache", "pg", 4242, true, false}, // rules of other partitions do not apply
	} {
		ok, ruled := p.MayListen(tc.part, tc.svc, tc.uid)
		if ok != tc.ok || ruled != tc.wantRuled {
			t.Errorf("MayListen(%s, %s, %d) = %v, %v; want %v, %v", tc.part, tc.svc, tc.uid, ok, ruled, tc.ok, tc.wantRuled)
		}
	}
	// The allow rules are kept; the base policy is unchanged.
	if !p.Allows(Source{"node-a", "web", 1}, Dest{"node-b", "db", "pg"}) || p.Len() != 1 || p.ListenLen() != 4 {
		t.Error("WithListenRules lost the allow rules")
	}
	if ok, ruled := base.MayListen("db", "pg", 4242); !ok || ruled || base.ListenLen() != 0 {
		t.Error("WithListenRules changed the policy it was called on")
	}
	var none *Policy
	if ok, ruled := none.MayListen("db", "pg", 1); !ok || ruled {
		t.Error("a nil policy reserves a service")
	}
}

func TestListenRuleErrors(t *testing.T) {
	for _, tc := range []struct {
		rule ListenRule
		want string
	}{
		{ListenRule{Partition: "db", UIDs: []uint32{1}}, "service: missing"},
		{ListenRule{Partition: "db", Service: "pg[", UIDs: []uint32{1}}, `bad pattern "pg["`},
		{ListenRule{Partition: "db", Service: "pg"}, `uids: missing: the uids that may listen on "pg"`},
		{ListenRule{Service: "pg", UIDs: []uint32{1}}, "no partition"},
	} {
		_, err := (*Policy)(nil).WithListenRules([]ListenRule{{Partition: "ok", Service: "x", UIDs: []uint32{1}}, tc.rule})
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "listen rule 2") {
			t.Errorf("%+v: %v, want an error naming rule 2 and saying %q", tc.rule, err, tc.want)
		}
	}
}
