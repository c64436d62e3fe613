package registry

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
)

// TestRetryTimeout: a request that ran out of time is tried again with
// twice the time (an overloaded etcd would otherwise do the same work
// again and fail again: with 1,000 agents starting, every listing timed
// out that way); one that failed for another reason keeps its time.
func TestRetryTimeout(t *testing.T) {
	e, err := NewEtcd(nil, EtcdConfig{RequestTimeout: 40 * time.Millisecond, LeaseTTL: 3 * time.Second}, Self{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		fail func(ctx context.Context) error
		want []time.Duration
	}{
		{"slow", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() },
			[]time.Duration{40 * time.Millisecond, 80 * time.Millisecond, 160 * time.Millisecond}},
		{"no leader", func(context.Context) error { return rpctypes.ErrNoLeader },
			[]time.Duration{40 * time.Millisecond, 40 * time.Millisecond, 40 * time.Millisecond}},
	} {
		var got []time.Duration
		err := e.retry(context.Background(), tc.name, func(ctx context.Context) error {
			dl, _ := ctx.Deadline()
			got = append(got, time.Until(dl))
			return tc.fail(ctx)
		})
		if !errors.Is(err, ErrUnreachable) || len(got) != len(tc.want) {
			t.Fatalf("%s: %d tries, %v", tc.name, len(got), err)
		}
		for i, d := range got {
			if d > tc.want[i] || d < tc.want[i]-20*time.Millisecond {
				t.Errorf("%s: try %d had %s, want %s", tc.name, i+1, d, tc.want[i])
			}
		}
	}
}
