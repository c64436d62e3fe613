package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/etcdtest"
	"sinc.dev/sinc/internal/registry"
)

const testPolicy = `[[allow]]
from = "node-a/web"
to   = "node-b/db/pg"
uids = [1000]

[[allow]]
from = "*/batch"
to   = "node-b/db/*"
`

// runIn runs the command in process and returns stdout, stderr and the
// exit code.
func runIn(args ...string) (string, string, int) {
	var out, errs bytes.Buffer
	code := run(args, &out, &errs)
	return out.String(), errs.String(), code
}

// mustRun runs the command and fails the test unless it succeeds.
func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, errs, code := runIn(args...)
	if code != 0 {
		t.Fatalf("sinc %s: exit %d: %s", strings.Join(args, " "), code, errs)
	}
	return out
}

// testCADir makes a CA and returns its folder and a verifier.
func testCADir(t *testing.T) (string, *cert.Verifier) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	mustRun(t, "ca", "init", "--dir", dir)
	v, err := caVerifier(dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return dir, v
}

// copyCA copies a CA folder's key and certificate (a second operator's copy).
func copyCA(t *testing.T, dir string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ca-copy")
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{cert.CAKeyFile, cert.CACertFile} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func writeFile(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// etcdGet reads key, nil when absent.
func etcdGet(t *testing.T, cli *clientv3.Client, key string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	return resp.Kvs[0].Value
}

func etcdPut(t *testing.T, cli *clientv3.Client, key string, val []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, string(val)); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

// registryPolicy reads and verifies the policy in etcd.
func registryPolicy(t *testing.T, cli *clientv3.Client, v *cert.Verifier, key string) *cert.Policy {
	t.Helper()
	val := etcdGet(t, cli, key)
	if val == nil {
		t.Fatalf("%s is absent", key)
	}
	p, err := cert.ParsePolicy(val, v)
	if err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	return p
}

// TestCAPolicyPublish: `sinc ca policy --etcd` signs the rules, writes the
// CA folder's copy and publishes the same document; it reads back, verifies
// with the CA, and its rules parse. Each run takes the next serial.
func TestCAPolicyPublish(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := c.Client(t)
	ca, v := testCADir(t)
	file := writeFile(t, "policy.toml", testPolicy)
	ep := strings.Join(c.Endpoints(), ",")

	out := mustRun(t, "ca", "policy", "--dir", ca, "--file", file, "--etcd", ep)
	if !strings.Contains(out, "serial 1,") || !strings.Contains(out, "2 rule(s)") || !strings.Contains(out, "/sinc/policy") {
		t.Fatalf("output %q: want serial 1, 2 rules, /sinc/policy", out)
	}
	p := registryPolicy(t, cli, v, "/sinc/policy")
	if p.Serial != 1 || string(p.Body) != testPolicy {
		t.Fatalf("published: serial %d, body %q", p.Serial, p.Body)
	}
	rules, err := config.ParsePolicy("registry", p.Body)
	if err != nil || rules.Len() != 2 {
		t.Fatalf("published rules: %v, %d", err, rules.Len())
	}
	local, err := cert.LoadPolicy(filepath.Join(ca, cert.PolicyFile), v)
	if err != nil || !bytes.Equal(local.EncodePEM(), p.EncodePEM()) {
		t.Fatalf("the CA folder's copy differs from the registry's: %v", err)
	}

	mustRun(t, "ca", "policy", "--dir", ca, "--file", file, "--etcd", ep, "--prefix", "/other")
	if p := registryPolicy(t, cli, v, "/other/policy"); p.Serial != 2 {
		t.Fatalf("under /other: serial %d, want 2 (after the folder's 1)", p.Serial)
	}
	// Without --etcd: the file alone, next serial.
	if out := mustRun(t, "ca", "policy", "--dir", ca, "--file", file); !strings.Contains(out, "serial 3,") {
		t.Fatalf("file only: %q", out)
	}
	if p := registryPolicy(t, cli, v, "/sinc/policy"); p.Serial != 1 {
		t.Fatalf("a file-only run changed the registry: serial %d", p.Serial)
	}
}

// TestCAPolicyNeverBackwards: the registry's serial only grows. An operator
// whose CA folder is behind the registry (another operator published since)
// signs above the registry's serial; one whose registry lost the key signs
// above its own file's.
func TestCAPolicyNeverBackwards(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := c.Client(t)
	a, v := testCADir(t)
	b := copyCA(t, a)
	file := writeFile(t, "policy.toml", testPolicy)
	ep := c.Endpoint(0)

	mustRun(t, "ca", "policy", "--dir", a, "--file", file, "--etcd", ep) // 1
	for range 3 {
		mustRun(t, "ca", "policy", "--dir", b, "--file", file, "--etcd", ep) // 2, 3, 4
	}
	mustRun(t, "ca", "policy", "--dir", a, "--file", file, "--etcd", ep)
	if p := registryPolicy(t, cli, v, "/sinc/policy"); p.Serial != 5 {
		t.Fatalf("operator a, folder at 1, registry at 4: published serial %d, want 5", p.Serial)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, "/sinc/policy"); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "ca", "policy", "--dir", a, "--file", file, "--etcd", ep)
	if p := registryPolicy(t, cli, v, "/sinc/policy"); p.Serial != 6 {
		t.Fatalf("registry emptied, folder at 5: published serial %d, want 6", p.Serial)
	}
}

// TestCAPolicyConcurrentOperators: two operators publishing at once never
// put a serial that is not above the one before it: every change a watcher
// sees has a higher serial than the last.
func TestCAPolicyConcurrentOperators(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := c.Client(t)
	a, v := testCADir(t)
	b := copyCA(t, a)
	// Different texts: two operators signing one text under one serial in
	// one second make the same document (Ed25519 is deterministic), and
	// finding it in place is success, not a put of its own.
	files := map[string]string{
		a: writeFile(t, "a.toml", "# operator a\n"+testPolicy),
		b: writeFile(t, "b.toml", "# operator b\n"+testPolicy),
	}
	ep := c.Endpoint(0)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch := cli.Watch(ctx, "/sinc/policy")
	const each = 6
	var wg sync.WaitGroup
	for _, dir := range []string{a, b} {
		wg.Go(func() {
			for range each {
				if _, errs, code := runIn("ca", "policy", "--dir", dir, "--file", files[dir], "--etcd", ep); code != 0 {
					t.Errorf("exit %d: %s", code, errs)
				}
			}
		})
	}
	wg.Wait()
	final := registryPolicy(t, cli, v, "/sinc/policy").Serial
	var last uint64
	var puts int
	for last < final {
		select {
		case wr := <-watch:
			if err := wr.Err(); err != nil {
				t.Fatal(err)
			}
			for _, ev := range wr.Events {
				p, err := cert.ParsePolicy(ev.Kv.Value, v)
				if err != nil {
					t.Fatal(err)
				}
				if p.Serial <= last {
					t.Fatalf("serial %d published after %d", p.Serial, last)
				}
				last = p.Serial
				puts++
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("watch saw serial %d, registry holds %d", last, final)
		}
	}
	if puts != 2*each {
		t.Fatalf("%d puts seen, want %d (one per run)", puts, 2*each)
	}
}

// TestCAPolicyRefusals: a bad rule publishes nothing and names the field;
// another CA's policy in the registry (a wrong --prefix?) is not replaced;
// garbage in the registry is replaced, with a warning.
func TestCAPolicyRefusals(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := c.Client(t)
	ca, v := testCADir(t)
	ep := c.Endpoint(0)

	bad := writeFile(t, "bad.toml", testPolicy+"[[allow]]\nfrom = \"node-a\"\nto = \"x/y/z\"\n")
	_, errs, code := runIn("ca", "policy", "--dir", ca, "--file", bad, "--etcd", ep)
	if code != 1 || !strings.Contains(errs, `field "allow[2]"`) || !strings.Contains(errs, bad) {
		t.Fatalf("bad rule: exit %d, %q; want 1 naming %s and allow[2]", code, errs, bad)
	}
	if etcdGet(t, cli, "/sinc/policy") != nil {
		t.Fatal("a policy with a bad rule was published")
	}
	if _, err := os.Stat(filepath.Join(ca, cert.PolicyFile)); err == nil {
		t.Fatal("a policy with a bad rule was written")
	}

	other, _ := testCADir(t)
	file := writeFile(t, "policy.toml", testPolicy)
	mustRun(t, "ca", "policy", "--dir", other, "--file", file, "--etcd", ep)
	theirs := etcdGet(t, cli, "/sinc/policy")
	_, errs, code = runIn("ca", "policy", "--dir", ca, "--file", file, "--etcd", ep)
	if code != 1 || !strings.Contains(errs, "another CA") || !strings.Contains(errs, "/sinc/policy") {
		t.Fatalf("another CA's policy in the registry: exit %d, %q", code, errs)
	}
	if !bytes.Equal(etcdGet(t, cli, "/sinc/policy"), theirs) {
		t.Fatal("another CA's policy was replaced")
	}

	etcdPut(t, cli, "/sinc/policy", []byte("garbage"))
	_, errs, code = runIn("ca", "policy", "--dir", ca, "--file", file, "--etcd", ep)
	if code != 0 || !strings.Contains(errs, "holds no valid cluster policy") {
		t.Fatalf("garbage in the registry: exit %d, %q; want success with a warning", code, errs)
	}
	if p := registryPolicy(t, cli, v, "/sinc/policy"); p.Serial != 1 {
		t.Fatalf("after garbage: serial %d", p.Serial)
	}
}

// TestCARevokePublish: `sinc ca revoke --etcd` publishes the list; an
// operator whose folder is behind the registry merges the registry's entries
// and signs above its serial, so nothing revoked is lost and the serial
// never goes back.
func TestCARevokePublish(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli := c.Client(t)
	a, v := testCADir(t)
	b := copyCA(t, a)
	ep := c.Endpoint(0)

	out := mustRun(t, "ca", "revoke", "--dir", a, "--node", "node-x", "--etcd", ep)
	if !strings.Contains(out, "serial 1,") || !strings.Contains(out, "/sinc/revocations") {
		t.Fatalf("output %q", out)
	}
	mustRun(t, "ca", "revoke", "--dir", b, "--node", "node-y", "--etcd", ep) // b's folder: none; registry: 1
	mustRun(t, "ca", "revoke", "--dir", b, "--node", "node-z", "--etcd", ep)
	out = mustRun(t, "ca", "revoke", "--dir", a, "--node", "node-w", "--etcd", ep) // a's folder at 1, registry at 3
	if !strings.Contains(out, "serial 4,") {
		t.Fatalf("a behind the registry: %q, want serial 4", out)
	}
	r, err := cert.ParseRevocations(etcdGet(t, cli, "/sinc/revocations"), v)
	if err != nil {
		t.Fatal(err)
	}
	if r.Serial != 4 || strings.Join(r.Nodes, ",") != "node-x,node-y,node-z,node-w" {
		t.Fatalf("registry: serial %d, nodes %v; want 4, node-x,y,z,w", r.Serial, r.Nodes)
	}
	local, err := cert.LoadRevocations(filepath.Join(a, cert.RevocationsFile), v)
	if err != nil || !bytes.Equal(local.EncodePEM(), r.EncodePEM()) {
		t.Fatalf("a's folder differs from the registry: %v", err)
	}
	// Without --etcd, as before: the folder's list alone.
	if out := mustRun(t, "ca", "revoke", "--dir", b, "--node", "node-v"); !strings.Contains(out, "serial 4,") {
		t.Fatalf("b, file only, folder at 3: %q", out)
	}
}

// TestPublishEtcdDown: with etcd unreachable the command fails, non-zero,
// naming the endpoints, within its bounded retries.
func TestPublishEtcdDown(t *testing.T) {
	c := etcdtest.Start(t, 1)
	ep := c.Endpoint(0)
	c.Stop(0)
	defer func(d time.Duration, n int) { etcdRequestTimeout, etcdAttempts = d, n }(etcdRequestTimeout, etcdAttempts)
	etcdRequestTimeout, etcdAttempts = 300*time.Millisecond, 2
	ca, _ := testCADir(t)
	file := writeFile(t, "policy.toml", testPolicy)
	for _, args := range [][]string{
		{"ca", "policy", "--dir", ca, "--file", file, "--etcd", ep},
		{"ca", "revoke", "--dir", ca, "--node", "node-x", "--etcd", ep},
	} {
		start := time.Now()
		_, errs, code := runIn(args...)
		if code != 1 || !strings.Contains(errs, "etcd at "+ep) || !strings.Contains(errs, "2 attempts") {
			t.Fatalf("%s with etcd down: exit %d, %q", args[1], code, errs)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("%s took %v to give up", args[1], d)
		}
	}
}

// TestPublishLeaderLoss: the leader of a three-member etcd lost between
// the publisher's read and its write, killed or hung (frozen: connections
// open, no answers, as a machine that stalls), costs the publish a retry,
// not etcd's own request timeout (about 7 s) nor a hang: a request that
// went to the lost leader is given up after etcdRequestTimeout and tried
// again, on the new leader.
func TestPublishLeaderLoss(t *testing.T) {
	c := etcdtest.Start(t, 3)
	ca, v := testCADir(t)
	file := writeFile(t, "policy.toml", testPolicy)
	ep := strings.Join(c.Endpoints(), ",")
	mustRun(t, "ca", "policy", "--dir", ca, "--file", file, "--etcd", ep)
	// Shorter than the default, so that the bound below is well under the
	// 6 s a request waits in this cluster (5 s + two election timeouts) when
	// the member it reached loses its leader.
	defer func(d time.Duration) { etcdRequestTimeout = d }(etcdRequestTimeout)
	etcdRequestTimeout = time.Second
	// leader asks each running member; it answers the leader and a client
	// of the members other than that one, for the test's own reads.
	leader := func() (int, *clientv3.Client) {
		for i := range c.N() {
			if !c.Running(i) {
				continue
			}
			cli, err := registry.NewClient(registry.ClientConfig{Endpoints: []string{c.Endpoint(i)}})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			st, err := cli.Status(ctx, c.Endpoint(i))
			cancel()
			cli.Close()
			if err == nil && st.Leader == st.Header.MemberId {
				var others []string
				for j, e := range c.Endpoints() {
					if j != i && c.Running(j) {
						others = append(others, e)
					}
				}
				other, err := registry.NewClient(registry.ClientConfig{Endpoints: others})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { other.Close() })
				return i, other
			}
		}
		t.Fatal("no leader")
		return -1, nil
	}
	serial := uint64(1)
	publishLosing := func(what string, lose func()) {
		t.Helper()
		var once sync.Once
		testHookBeforeSwap = func() { once.Do(lose) }
		defer func() { testHookBeforeSwap = nil }()
		start := time.Now()
		mustRun(t, "ca", "policy", "--dir", ca, "--file", file, "--etcd", ep)
		d := time.Since(start)
		t.Logf("%s: published in %v", what, d)
		// A new leader within an election or two: a few attempts at most.
		if limit := 3*etcdRequestTimeout + time.Second; d > limit {
			t.Fatalf("%s: publishing took %v, more than %v", what, d, limit)
		}
	}
	check := func(cli *clientv3.Client) {
		t.Helper()
		serial++
		if p := registryPolicy(t, cli, v, "/sinc/policy"); p.Serial != serial {
			t.Fatalf("serial %d, want %d", p.Serial, serial)
		}
	}

	dead, others := leader()
	publishLosing("leader killed", func() { c.Kill(dead) })
	check(others)
	c.Restart(dead)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	hung, others := leader()
	publishLosing("leader hung", func() { c.Freeze(hung) })
	check(others)
}

// TestPublishTLS: against etcd with client-certificate authentication the
// --etcd-ca, --etcd-cert and --etcd-key flags work; without them publishing
// fails; TLS flags without --etcd are a usage error.
func TestPublishTLS(t *testing.T) {
	c := etcdtest.StartTLS(t, 1)
	f := c.TLS()
	cli := c.Client(t)
	ca, v := testCADir(t)
	file := writeFile(t, "policy.toml", testPolicy)
	ep := c.Endpoint(0)
	mustRun(t, "ca", "policy", "--dir", ca, "--file", file, "--etcd", ep,
		"--etcd-ca", f.CA, "--etcd-cert", f.Cert, "--etcd-key", f.Key)
	if p := registryPolicy(t, cli, v, "/sinc/policy"); p.Serial != 1 {
		t.Fatalf("serial %d", p.Serial)
	}
	defer func(d time.Duration, n int) { etcdRequestTimeout, etcdAttempts = d, n }(etcdRequestTimeout, etcdAttempts)
	etcdRequestTimeout, etcdAttempts = 500*time.Millisecond, 1
	if _, errs, code := runIn("ca", "policy", "--dir", ca, "--file", file, "--etcd", ep, "--etcd-ca", f.CA); code != 1 {
		t.Fatalf("without a client certificate: exit %d, %q", code, errs)
	}
	_, errs, code := runIn("ca", "policy", "--dir", ca, "--file", file, "--etcd-cert", f.Cert, "--etcd-key", f.Key)
	if code != 2 || !strings.Contains(errs, "need --etcd") {
		t.Fatalf("TLS flags without --etcd: exit %d, %q", code, errs)
	}
	_, errs, code = runIn("ca", "policy", "--dir", ca, "--file", file, "--etcd", ep, "--etcd-cert", f.Cert)
	if code != 2 || !strings.Contains(errs, "without its key") {
		t.Fatalf("--etcd-cert without --etcd-key: exit %d, %q", code, errs)
	}
}
