package config

import (
	"errors"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cert/certtest"
	"sinc.dev/sinc/internal/policy"
)

const goodPolicy = `
# the cluster's rules
[[allow]]
from = "node-a/web"
to   = "node-b/db/pg"
uids = [1000]

[[allow]]
from = "*/batch"
to   = "node-b/db/*"
`

func TestParsePolicy(t *testing.T) {
	p, err := ParsePolicy("policy.toml", []byte(goodPolicy))
	if err != nil {
		t.Fatal(err)
	}
	if p.Len() != 2 {
		t.Fatalf("%d rules, want 2", p.Len())
	}
	for _, c := range []struct {
		src  policy.Source
		dst  policy.Dest
		want bool
	}{
		{policy.Source{Node: "node-a", Partition: "web", UID: 1000}, policy.Dest{Node: "node-b", Partition: "db", Service: "pg"}, true},
		{policy.Source{Node: "node-a", Partition: "web", UID: 1001}, policy.Dest{Node: "node-b", Partition: "db", Service: "pg"}, false},
		{policy.Source{Node: "node-x", Partition: "batch", UID: 7}, policy.Dest{Node: "node-b", Partition: "db", Service: "any"}, true},
		{policy.Source{Node: "node-x", Partition: "web", UID: 1000}, policy.Dest{Node: "node-b", Partition: "db", Service: "pg"}, false},
	} {
		if got := p.Allows(c.src, c.dst); got != c.want {
			t.Errorf("Allows(%+v, %+v) = %v, want %v", c.src, c.dst, got, c.want)
		}
	}
	// No rules: a policy that allows nothing between partitions.
	p, err = ParsePolicy("empty.toml", []byte("# nothing\n"))
	if err != nil || p.Len() != 0 {
		t.Fatalf("empty policy: %v, %d rules", err, p.Len())
	}
}

// TestParsePolicyErrors: a bad policy text is refused with an error naming
// the text and the field, as a bad config is.
func TestParsePolicyErrors(t *testing.T) {
	rule := "[[allow]]\nfrom = \"a/b\"\nto = \"c/d/e\"\n"
	for _, c := range []struct {
		name, body, field, msg string
	}{
		{"second rule bad", rule + "[[allow]]\nfrom = \"a\"\nto = \"c/d/e\"\n", "allow[1]", `from "a" is not node/partition`},
		{"rule without to", "[[allow]]\nfrom = \"a/b\"\n", "allow[0]", "a rule needs from"},
		{"bad pattern", "[[allow]]\nfrom = \"a/[\"\nto = \"c/d/e\"\n", "allow[0]", `bad pattern "["`},
		{"unknown rule field", rule + "port = 5\n", "allow[0].port", "unknown field"},
		{"uids not numbers", rule + "uids = [\"root\"]\n", "allow[0].uids", "incompatible types"},
		{"uid out of range", rule + "uids = [-1]\n", "allow[0].uids", ""},
		{"agent config field", "node = \"node-a\"\n" + rule, "node", "a cluster policy holds [[allow]] rules only"},
		{"peers table", rule + "[peers.node-b]\naddress = \"x:1\"\n", "peers", "unknown field"},
		{"allow not a table array", "allow = 3\n", "allow", ""},
		{"syntax error", rule + "from = \n", "", "line 4"},
		{"too big", strings.Repeat("# padding line\n", cert.MaxPolicyBody/15+1), "", "more than"},
	} {
		_, err := ParsePolicy("p.toml", []byte(c.body))
		var ce *Error
		if !errors.As(err, &ce) {
			t.Errorf("%s: error %v, want a *config.Error", c.name, err)
			continue
		}
		if ce.File != "p.toml" || !strings.HasPrefix(ce.Field, c.field) || !strings.Contains(ce.Err.Error(), c.msg) {
			t.Errorf("%s: %v; want field %q and %q", c.name, err, c.field, c.msg)
		}
	}
}

// TestSignedPolicyBadRule: the CA's signature does not make a bad rule
// good: a signed document whose text has one is refused when its rules are
// read, naming the rule.
func TestSignedPolicyBadRule(t *testing.T) {
	ca := certtest.NewCA(t)
	body := []byte(goodPolicy + "[[allow]]\nfrom = \"node-a\"\nto = \"node-b/db/pg\"\n")
	doc, err := cert.SignPolicy(ca.Dir, body, 0, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	got, err := cert.ParsePolicy(doc.EncodePEM(), ca.Verifier(t))
	if err != nil {
		t.Fatal(err)
	}
	_, err = ParsePolicy("registry /sinc/policy", got.Body)
	var ce *Error
	if !errors.As(err, &ce) || ce.Field != "allow[2]" || ce.File != "registry /sinc/policy" {
		t.Fatalf("bad third rule: %v, want field allow[2] of registry /sinc/policy", err)
	}
}
