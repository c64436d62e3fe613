package etcdtest

import (
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// leader returns the index of the member that leads the cluster.
func leader(t *testing.T, c *Cluster, cli *clientv3.Client) int {
	t.Helper()
	for i, ep := range c.Endpoints() {
		if !c.Running(i) {
			continue
		}
		st, err := cli.Status(ctxT(t, 5*time.Second), ep)
		if err != nil {
			t.Fatalf("status of %s: %v", ep, err)
		}
		if st.Leader == st.Header.MemberId {
			return i
		}
	}
	t.Fatal("no member leads")
	return -1
}

// getFrom reads key from member i alone (serializable: what that member
// holds, without asking the leader).
func getFrom(t *testing.T, c *Cluster, i int, key string) string {
	t.Helper()
	cli, err := c.newClient([]string{c.Endpoint(i)})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	resp, err := cli.Get(ctxT(t, 5*time.Second), key, clientv3.WithSerializable())
	if err != nil {
		t.Fatalf("get %s from member %d: %v", key, i, err)
	}
	if len(resp.Kvs) != 1 {
		return ""
	}
	return string(resp.Kvs[0].Value)
}

// TestThreeMembers: a 3-member cluster serves reads and writes, keeps doing so
// with its leader killed, and the killed member comes back with the data
// written while it was down.
func TestThreeMembers(t *testing.T) {
	c := Start(t, 3)
	if got := len(c.Endpoints()); got != 3 {
		t.Fatalf("%d endpoints, want 3", got)
	}
	cli := c.Client(t)
	if _, err := cli.Put(ctxT(t, 5*time.Second), "/k", "v1"); err != nil {
		t.Fatal(err)
	}

	dead := leader(t, c, cli)
	c.Kill(dead)
	if c.Running(dead) {
		t.Fatal("killed member still counted as running")
	}
	// A new leader within a few election timeouts. A write that reached a
	// member while it had no leader waits out etcd's own request timeout
	// (seconds), so writes use a short timeout and retry, as a publisher must.
	start := time.Now()
	for {
		_, err := cli.Put(ctxT(t, time.Second), "/k", "v2")
		if err == nil {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("put with the leader killed: %v", err)
		}
	}
	t.Logf("write accepted %v after the leader was killed", time.Since(start))
	resp, err := cli.Get(ctxT(t, 5*time.Second), "/k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v2" {
		t.Fatalf("get with the leader killed: %v %v", resp, err)
	}

	c.Restart(dead)
	if err := c.WaitHealthy(ctxT(t, 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	// The restarted member catches up from the others.
	deadline := time.Now().Add(10 * time.Second)
	for getFrom(t, c, dead, "/k") != "v2" {
		if time.Now().After(deadline) {
			t.Fatalf("restarted member %d never saw the write made while it was down", dead)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStopAllStartAll: the whole cluster down, then up, keeps its data, and
// WaitHealthy fails (rather than hangs) while it is down.
func TestStopAllStartAll(t *testing.T) {
	c := Start(t, 3)
	cli := c.Client(t)
	if _, err := cli.Put(ctxT(t, 5*time.Second), "/k", "kept"); err != nil {
		t.Fatal(err)
	}
	c.StopAll()
	for i := range c.N() {
		if c.Running(i) {
			t.Fatalf("member %d running after StopAll", i)
		}
	}
	if _, err := cli.Get(ctxT(t, 500*time.Millisecond), "/k"); err == nil {
		t.Fatal("read succeeded with every member stopped")
	}
	c.StartAll()
	if err := c.WaitHealthy(ctxT(t, 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctxT(t, 10*time.Second), "/k")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "kept" {
		t.Fatalf("after restart: %v %v", resp, err)
	}
}

// TestWaitHealthyNoticesExit: a member that exits without the test stopping
// it is reported at once by WaitHealthy, with its name.
func TestWaitHealthyNoticesExit(t *testing.T) {
	c := Start(t, 1)
	c.mu.Lock()
	p := c.members[0].proc
	c.mu.Unlock()
	p.cmd.Process.Signal(syscall.SIGKILL) // behind the cluster's back
	<-p.done
	start := time.Now()
	err := c.WaitHealthy(ctxT(t, 10*time.Second))
	if err == nil || !strings.Contains(err.Error(), "member m0 exited") {
		t.Fatalf("WaitHealthy = %v, want member m0 exited", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("WaitHealthy took %v to notice", time.Since(start))
	}
}

// TestCompact: after Compact, a watch from an older revision fails with
// ErrCompacted (the trap a registry's watcher must handle).
func TestCompact(t *testing.T) {
	c := Start(t, 1)
	cli := c.Client(t)
	first, err := cli.Put(ctxT(t, 5*time.Second), "/k", "1")
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"2", "3"} {
		if _, err := cli.Put(ctxT(t, 5*time.Second), "/k", v); err != nil {
			t.Fatal(err)
		}
	}
	rev := c.Compact(t)
	if rev <= first.Header.Revision {
		t.Fatalf("compacted to %d, not past the first put's revision %d", rev, first.Header.Revision)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	wr, ok := <-cli.Watch(ctx, "/k", clientv3.WithRev(first.Header.Revision))
	if !ok {
		t.Fatal("watch channel closed without a response")
	}
	if !errors.Is(wr.Err(), rpctypes.ErrCompacted) || wr.CompactRevision != rev {
		t.Fatalf("watch from revision %d: err %v, compact revision %d; want ErrCompacted at %d",
			first.Header.Revision, wr.Err(), wr.CompactRevision, rev)
	}
}

// TestTLS: a TLS cluster serves a client with the test CA's certificate and
// refuses one without a certificate and one with another CA's.
func TestTLS(t *testing.T) {
	c := StartTLS(t, 1)
	f := c.TLS()
	if f == nil || !strings.HasPrefix(c.Endpoint(0), "https://") {
		t.Fatalf("TLS cluster: files %v, endpoint %s", f, c.Endpoint(0))
	}
	cli := c.Client(t)
	if _, err := cli.Put(ctxT(t, 5*time.Second), "/k", "v"); err != nil {
		t.Fatalf("put with the client certificate: %v", err)
	}

	good, err := f.Config()
	if err != nil {
		t.Fatal(err)
	}
	noCert := good.Clone()
	noCert.Certificates = nil
	noRoots := good.Clone()
	noRoots.RootCAs = nil // the system's roots do not know the test CA
	foreign := *f
	foreign.Cert, foreign.Key = f.ForeignCert, f.ForeignKey
	foreignCfg, err := foreign.Config()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for name, tc := range map[string]*clientv3.Config{
		"no client certificate":   {TLS: noCert},
		"another CA's client":     {TLS: foreignCfg},
		"no TLS (plain http)":     {},
		"server of an unknown CA": {TLS: noRoots},
	} {
		tc.Endpoints = c.Endpoints()
		if tc.TLS == nil {
			tc.Endpoints = []string{strings.Replace(c.Endpoint(0), "https://", "http://", 1)}
		}
		tc.Logger = zap.NewNop()
		wg.Go(func() {
			bad, err := clientv3.New(*tc)
			if err != nil {
				t.Error(err)
				return
			}
			defer bad.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			if _, err := bad.Get(ctx, "/k"); err == nil {
				t.Errorf("%s: read succeeded", name)
			}
		})
	}
	wg.Wait()
}

// TestCleanupLeavesNoProcess: when a test ends, its members are gone.
func TestCleanupLeavesNoProcess(t *testing.T) {
	var pids []int
	t.Run("cluster", func(t *testing.T) {
		c := Start(t, 3)
		c.mu.Lock()
		for _, m := range c.members {
			pids = append(pids, m.proc.cmd.Process.Pid)
		}
		c.mu.Unlock()
	})
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("etcd pid %d still exists after the test ended (kill 0: %v)", pid, err)
		}
	}
}

// TestFreeze: a frozen member answers nothing; thawed, it answers again; a
// frozen member is still stopped by Kill.
func TestFreeze(t *testing.T) {
	c := Start(t, 1)
	cli := c.Client(t)
	c.Freeze(0)
	if _, err := cli.Get(ctxT(t, 300*time.Millisecond), "/k"); err == nil {
		t.Fatal("a frozen member answered")
	}
	c.Thaw(0)
	if _, err := cli.Get(ctxT(t, 5*time.Second), "/k"); err != nil {
		t.Fatalf("thawed member: %v", err)
	}
	c.Freeze(0)
	start := time.Now()
	c.Stop(0)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("stopping a frozen member took %v", d)
	}
}
