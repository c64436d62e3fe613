package config_test

import (
	"errors"
	"strings"
	"testing"

	"sinc.dev/sinc/internal/config"
)

// TestShares: a limit that is a share of another (accepted of channels,
// the per-uid shares of requests) follows its whole when not given, and is
// refused, naming both fields, when given larger than its whole.
func TestShares(t *testing.T) {
	for _, tc := range []struct {
		lines string
		check func(config.Limits) bool
	}{
		{"channels = 100", func(l config.Limits) bool { return l.Accepted == 75 }},
		{"channels = 100\naccepted = 100", func(l config.Limits) bool { return l.Accepted == 100 }}, // no reserve: allowed
		{"channels = 100\naccepted = 10", func(l config.Limits) bool { return l.Accepted == 10 }},
		{"pending_requests = 8", func(l config.Limits) bool { return l.PendingRequestsPerUID == 2 }},
		{"pending_requests = 8\npending_requests_per_uid = 8", func(l config.Limits) bool { return l.PendingRequestsPerUID == 8 }},
		{"queued_requests = 3", func(l config.Limits) bool { return l.QueuedRequestsPerUID == 1 }},
		{"queued_requests = 100\nqueued_requests_per_uid = 7", func(l config.Limits) bool { return l.QueuedRequestsPerUID == 7 }},
	} {
		c, err := config.Parse("/etc/a.toml", []byte(withLimits(tc.lines)))
		if err != nil || !tc.check(c.Limits) {
			t.Errorf("%q: %v %+v", tc.lines, err, c)
		}
	}
	for _, tc := range []struct {
		lines, field, want string
	}{
		{"accepted = 16385", "limits.accepted", "16385 is more than limits.channels (16384): accepted channels are a share of the channel table"},
		{"channels = 10\naccepted = 11", "limits.accepted", "11 is more than limits.channels (10)"},
		{"pending_requests = 8\npending_requests_per_uid = 9", "limits.pending_requests_per_uid", "9 is more than limits.pending_requests (8): it is one uid's share of them"},
		{"queued_requests_per_uid = 5000", "limits.queued_requests_per_uid", "5000 is more than limits.queued_requests (4096)"},
	} {
		c, err := config.Parse("/etc/a.toml", []byte(withLimits(tc.lines)))
		var ce *config.Error
		if c != nil || !errors.As(err, &ce) || ce.Field != tc.field || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v; want an error for %s saying %q", tc.lines, err, tc.field, tc.want)
		}
	}
}

// TestListenRules: [[partitions.NAME.listen]] tables become the policy's
// listen rules for that partition; a bad one is refused naming it.
func TestListenRules(t *testing.T) {
	c, err := config.Parse("/etc/a.toml", []byte(withPartition(
		"[[partitions.web.listen]]\nservice = \"pg\"\nuids = [1001]\n"+
			"[[partitions.web.listen]]\nservice = \"admin-*\"\nuids = [0, 7]\n")))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		part, svc string
		uid       uint32
		ok        bool
	}{
		{"web", "pg", 1001, true},
		{"web", "pg", 1002, false},
		{"web", "admin-x", 7, true},
		{"web", "admin-x", 1001, false},
		{"web", "other", 1002, true}, // no rule: open to the partition
		{"p", "pg", 1002, true},      // rules are per partition
	} {
		if ok, _ := c.Policy.MayListen(tc.part, tc.svc, tc.uid); ok != tc.ok {
			t.Errorf("MayListen(%s, %s, %d) = %v, want %v", tc.part, tc.svc, tc.uid, ok, tc.ok)
		}
	}
	if c.Policy.ListenLen() != 2 {
		t.Errorf("%d listen rules, want 2", c.Policy.ListenLen())
	}

	for _, tc := range []struct {
		name, lines, field, want string
	}{
		{"no uids", "[[partitions.web.listen]]\nservice = \"pg\"\n", "partitions.web.listen[0]", `uids: missing: the uids that may listen on "pg"`},
		{"no service", "[[partitions.web.listen]]\nuids = [1]\n", "partitions.web.listen[0]", "service: missing"},
		{"bad glob", "[[partitions.web.listen]]\nservice = \"pg\"\nuids = [1]\n[[partitions.web.listen]]\nservice = \"[\"\nuids = [1]\n",
			"partitions.web.listen[1]", `bad pattern "["`},
		{"negative uid", "[[partitions.web.listen]]\nservice = \"pg\"\nuids = [-1]\n", "partitions.web.listen.uids", ""},
		{"unknown field", "[[partitions.web.listen]]\nservice = \"pg\"\nuids = [1]\ngids = [1]\n", "partitions.web.listen.gids", "unknown field"},
	} {
		c, err := config.Parse("/etc/a.toml", []byte(withPartition(tc.lines)))
		var ce *config.Error
		if c != nil || !errors.As(err, &ce) || ce.Field != tc.field || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v; want an error for %s saying %q", tc.name, err, tc.field, tc.want)
		}
	}
}
