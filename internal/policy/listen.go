package policy

import (
	"errors"
	"fmt"
	"path"
	"slices"
)

// Listen rules say who may listen on a service name within a partition.
// Without them any process of the partition may take any free service
// name, and with it the channels other nodes open to that name. A rule
// reserves the services its pattern matches for the uids it names:
//
//	[[partitions.db.listen]]
//	service = "pg"          # a pattern in the syntax of path.Match
//	uids    = [1001]        # who may listen on it
//
// A service matched by one or more rules of its partition may be listened on
// only by a uid one of those rules names; a service no rule matches stays
// open to every process of the partition.

// ListenRule reserves the services of Partition matching Service for UIDs.
type ListenRule struct {
	Partition string
	Service   string // path.Match pattern
	UIDs      []uint32
}

// checkListen checks one listen rule.
func checkListen(r ListenRule) error {
	if r.Partition == "" {
		return errors.New("no partition")
	}
	if r.Service == "" {
		return errors.New("service: missing: the service name (or pattern) the rule reserves")
	}
	if _, err := path.Match(r.Service, ""); err != nil {
		return fmt.Errorf("service: bad pattern %q", r.Service)
	}
	if len(r.UIDs) == 0 {
		return fmt.Errorf("uids: missing: the uids that may listen on %q", r.Service)
	}
	return nil
}

// WithListenRules returns a copy of p that also holds rules, checked. The
// allow rules of p are kept as they are.
func (p *Policy) WithListenRules(rules []ListenRule) (*Policy, error) {
	for i, r := range rules {
		if err := checkListen(r); err != nil {
			return nil, fmt.Errorf("listen rule %d: %w", i+1, err)
		}
	}
	q := &Policy{listen: slices.Clone(rules)}
	if p != nil {
		q.rules = p.rules
	}
	return q, nil
}

// MayListen reports whether a process of uid may listen on service in
// partition, and whether any rule reserves that service (ruled: false means
// no rule matched and the service is open to every process of the
// partition).
func (p *Policy) MayListen(partition, service string, uid uint32) (ok, ruled bool) {
	if p == nil {
		return true, false
	}
	for _, r := range p.listen {
		if r.Partition != partition || !match(r.Service, service) {
			continue
		}
		ruled = true
		if slices.Contains(r.UIDs, uid) {
			return true, true
		}
	}
	return !ruled, ruled
}

// ListenLen returns the number of listen rules.
func (p *Policy) ListenLen() int {
	if p == nil {
		return 0
	}
	return len(p.listen)
}
