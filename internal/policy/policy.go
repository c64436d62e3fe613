// Package policy decides which process may open a channel to which service.
//
// A policy is a list of allow rules; anything no rule allows is denied,
// except a channel within one partition (same node, same partition), which
// is always allowed: a partition is one trust domain. Each agent checks its
// own policy, the dialing agent before it asks and the accepting agent
// before it accepts, so either can deny.
//
//	[[allow]]
//	from = "node-a/web"      # node/partition of the dialing process
//	to   = "node-b/db/pg"    # node/partition/service
//	uids = [1000, 1001]      # optional: the dialing process's uid
//
// Each segment is a pattern in the syntax of path.Match ("*", "?",
// "[a-z]"); "*" alone matches any name.
//
// A policy also holds the listen rules of the node's partitions: who may
// listen on which service name (see listen.go).
package policy

import (
	"fmt"
	"path"
	"slices"
	"strings"
)

// Rule allows channels from processes matching From (and UIDs, when set) to
// services matching To.
type Rule struct {
	From [2]string // node, partition patterns
	To   [3]string // node, partition, service patterns
	UIDs []uint32  // empty: any uid
}

// Source is the dialing process.
type Source struct {
	Node, Partition string
	UID             uint32
}

// Dest is the service dialed.
type Dest struct {
	Node, Partition, Service string
}

// Policy is a checked list of rules. The zero Policy allows only channels
// within a partition.
type Policy struct {
	rules  []Rule
	listen []ListenRule
}

// New checks rules and returns a Policy.
func New(rules []Rule) (*Policy, error) {
	for i, r := range rules {
		for _, p := range append(r.From[:], r.To[:]...) {
			if p == "" {
				return nil, fmt.Errorf("rule %d: empty pattern", i+1)
			}
			if _, err := path.Match(p, ""); err != nil {
				return nil, fmt.Errorf("rule %d: bad pattern %q", i+1, p)
			}
		}
	}
	return &Policy{rules: slices.Clone(rules)}, nil
}

// ParseRule parses the from and to of a rule: "node/partition" and
// "node/partition/service".
func ParseRule(from, to string, uids []uint32) (Rule, error) {
	f := strings.Split(from, "/")
	if len(f) != 2 {
		return Rule{}, fmt.Errorf("from %q is not node/partition", from)
	}
	t := strings.Split(to, "/")
	if len(t) != 3 {
		return Rule{}, fmt.Errorf("to %q is not node/partition/service", to)
	}
	r := Rule{From: [2]string{f[0], f[1]}, To: [3]string{t[0], t[1], t[2]}, UIDs: uids}
	if _, err := New([]Rule{r}); err != nil {
		return Rule{}, fmt.Errorf("%s → %s: %w", from, to, err)
	}
	return r, nil
}

// Allows reports whether src may open a channel to dst.
func (p *Policy) Allows(src Source, dst Dest) bool {
	if src.Node == dst.Node && src.Partition == dst.Partition {
		return true
	}
	if p == nil {
		return false
	}
	for _, r := range p.rules {
		if r.matches(src, dst) {
			return true
		}
	}
	return false
}

func (r *Rule) matches(src Source, dst Dest) bool {
	if len(r.UIDs) > 0 && !slices.Contains(r.UIDs, src.UID) {
		return false
	}
	return match(r.From[0], src.Node) && match(r.From[1], src.Partition) &&
		match(r.To[0], dst.Node) && match(r.To[1], dst.Partition) && match(r.To[2], dst.Service)
}

func match(pattern, name string) bool {
	ok, _ := path.Match(pattern, name) // patterns were checked in New
	return ok
}

// Len returns the number of rules.
func (p *Policy) Len() int {
	if p == nil {
		return 0
	}
	return len(p.rules)
}
