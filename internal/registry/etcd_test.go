package registry

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"sinc.dev/sinc/internal/etcdtest"
	"sinc.dev/sinc/internal/link"
)

// sink records what a backend tells it.
type sink struct {
	mu    sync.Mutex
	nodes map[string]Node
	gone  []string
	revs  [][]byte
	pols  [][]byte
}

func newSink() *sink { return &sink{nodes: map[string]Node{}} }

func (s *sink) NodeChanged(n Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes[n.Name] = n
}

func (s *sink) NodeGone(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.nodes, name)
	s.gone = append(s.gone, name)
}

func (s *sink) Revocations(data []byte, _ string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.revs = append(s.revs, bytes.Clone(data))
}

func (s *sink) Policy(data []byte, _ string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pols = append(s.pols, bytes.Clone(data))
}

func (s *sink) has(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.nodes[name]
	return ok
}

func (s *sink) get(name string) Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nodes[name]
}

func (s *sink) names() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ns []string
	for n := range s.nodes {
		ns = append(ns, n)
	}
	return strings.Join(ns, ",")
}

// testClient is a client of endpoints as an agent makes it.
func testClient(t testing.TB, endpoints ...string) *clientv3.Client {
	t.Helper()
	cli, err := NewClient(ClientConfig{Endpoints: endpoints, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// running is a backend running in a test.
type running struct {
	*Etcd
	sink   *sink
	cancel context.CancelFunc
	done   chan struct{}
	log    *syncBuffer
}

// stop stops it and waits.
func (r *running) stop() {
	r.cancel()
	<-r.done
}

var testTTL = 3 * time.Second

func selfOf(name, addr string) Self {
	n := Node{Name: name, Addresses: []string{addr}, Instance: link.NewInstance()}
	n.Fingerprint[0] = name[len(name)-1]
	return Self{Node: n, CertPEM: []byte("certificate of " + name)}
}

// startBackend runs a backend for node name under prefix on cli.
func startBackend(t *testing.T, cli *clientv3.Client, prefix, name string, edit ...func(*EtcdConfig)) *running {
	t.Helper()
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name)
	cfg := EtcdConfig{Prefix: prefix, RequestTimeout: 500 * time.Millisecond, LeaseTTL: testTTL, DocsEvery: time.Second}
	for _, f := range edit {
		f(&cfg)
	}
	e, err := NewEtcd(cli, cfg, selfOf(name, "127.0.0.1:7701"), log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Etcd: e, sink: newSink(), cancel: cancel, done: make(chan struct{}), log: &logs}
	go func() {
		defer close(r.done)
		e.Run(ctx, r.sink)
	}()
	t.Cleanup(func() {
		r.stop()
		if t.Failed() {
			t.Logf("log of %s:\n%s", name, logs.String())
		}
	})
	return r
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// within polls cond until it holds, failing the test after d; it returns
// how long it took.
func within(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func getKey(t *testing.T, cli *clientv3.Client, key string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	return resp.Kvs[0].Value
}

func putKey(t *testing.T, cli *clientv3.Client, key, value string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, value); err != nil {
		t.Fatal(err)
	}
}

func delKey(t *testing.T, cli *clientv3.Client, key string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
}

// TestEtcdPublishAndExpire: an agent's record and certificate are in the
// registry while it runs; a clean stop removes them at once (the lease is
// revoked); a stop without cleanup (kill -9) removes them within the
// lease's TTL; the others see both.
func TestEtcdPublishAndExpire(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	cli := ec.Client(t)
	a := startBackend(t, testClient(t, ec.Endpoints()...), "/t1", "node-a")
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t1", "node-b")
	within(t, 3*time.Second, "each sees the other", func() bool { return a.sink.has("node-b") && b.sink.has("node-a") })
	if got := b.sink.get("node-a"); !sameNode(got, a.self.Node) {
		t.Errorf("node-b sees node-a as %+v, want %+v", got, a.self.Node)
	}
	if got := getKey(t, cli, "/t1/certs/node-a"); string(got) != "certificate of node-a" {
		t.Errorf("certificate stored: %q", got)
	}
	if pem, err := b.Certificate(context.Background(), "node-a"); err != nil || string(pem) != "certificate of node-a" {
		t.Errorf("Certificate = %q, %v", pem, err)
	}
	if st := a.Status(); !st.Connected || !st.Published || st.LeaseID == 0 || st.LeaseTTL != 3 || st.Nodes != 2 {
		t.Errorf("status %+v", st)
	}

	// A clean stop: gone at once.
	a.stop()
	d := within(t, time.Second, "node-a gone after a clean stop", func() bool { return !b.sink.has("node-a") })
	t.Logf("gone %s after a clean stop", d)
	if getKey(t, cli, "/t1/certs/node-a") != nil {
		t.Error("the certificate outlived the record")
	}

	// A stop without cleanup: gone within the TTL, not before the lease
	// ran out.
	a = startBackend(t, testClient(t, ec.Endpoints()...), "/t1", "node-a")
	within(t, 3*time.Second, "node-a back", func() bool { return b.sink.has("node-a") })
	a.abandon = true
	stopped := time.Now()
	a.stop()
	within(t, testTTL+2*time.Second, "node-a gone within its TTL after a kill", func() bool { return !b.sink.has("node-a") })
	d = time.Since(stopped)
	t.Logf("gone %s after a stop without cleanup (TTL %s)", d, testTTL)
	if d < testTTL/3 {
		t.Errorf("gone after %s: the lease was revoked, not let expire", d)
	}
}

// TestEtcdPoisonedRecords: records that do not parse — garbage, too large,
// unknown fields, a bad name — are refused, each with a log line, and the
// good records beside them are taken; a good record replaced by a bad one
// makes its node gone until it is good again.
func TestEtcdPoisonedRecords(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	cli := ec.Client(t)
	good, err := EncodeRecord(selfOf("node-c", "127.0.0.1:7703").Node)
	if err != nil {
		t.Fatal(err)
	}
	bad := map[string]string{
		"/t2/nodes/garbage":  "\x00\x01 not json",
		"/t2/nodes/huge":     `{"v":1,"addresses":["h:1"],"pad":"` + strings.Repeat("x", 2000) + `"}`,
		"/t2/nodes/unknown":  strings.Replace(string(good), `"v":1`, `"v":1,"partitions":["p"]`, 1),
		"/t2/nodes/bad/name": string(good),
	}
	for k, v := range bad {
		putKey(t, cli, k, v)
	}
	putKey(t, cli, "/t2/nodes/node-c", string(good))
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t2", "node-b")
	within(t, 3*time.Second, "node-c listed", func() bool { return b.sink.has("node-c") && b.sink.has("node-b") })
	if got := b.sink.names(); got != "node-b,node-c" && got != "node-c,node-b" {
		t.Errorf("nodes %s, want node-b and node-c", got)
	}
	if st := b.Status(); st.Refused != uint64(len(bad)) {
		t.Errorf("refused %d records, want %d", st.Refused, len(bad))
	}
	for _, want := range []string{"peer=garbage", "peer=huge", "peer=unknown", "peer=bad/name"} {
		if !strings.Contains(b.log.String(), want) {
			t.Errorf("no log line for %s", want)
		}
	}
	// Through the watch: a bad put after the listing is refused too.
	putKey(t, cli, "/t2/nodes/later", "[]")
	putKey(t, cli, "/t2/nodes/node-c", strings.Replace(string(good), "127.0.0.1:7703", "0.0.0.0:7703", 1))
	within(t, 2*time.Second, "node-c gone when its record went bad", func() bool { return !b.sink.has("node-c") })
	if !b.sink.has("node-b") {
		t.Error("a bad record took another node with it")
	}
	putKey(t, cli, "/t2/nodes/node-c", string(good))
	within(t, 2*time.Second, "node-c back", func() bool { return b.sink.has("node-c") })
	if st := b.Status(); st.Refused != uint64(len(bad))+2 {
		t.Errorf("refused %d records, want %d", st.Refused, len(bad)+2)
	}
}

// TestEtcdPagedList: a listing larger than a page is read whole, in
// pages at one revision.
func TestEtcdPagedList(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	cli := ec.Client(t)
	const n = 2*listPage + 7
	ctx := context.Background()
	for i := range n {
		rec, _ := EncodeRecord(selfOf("node-"+itoa3(i), "127.0.0.1:1").Node)
		if _, err := cli.Put(ctx, "/t3/nodes/node-"+itoa3(i), string(rec)); err != nil {
			t.Fatal(err)
		}
	}
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t3", "node-b")
	within(t, 5*time.Second, "every node listed", func() bool { return b.Status().Nodes == n+1 })
	for i := range n {
		if !b.sink.has("node-" + itoa3(i)) {
			t.Fatalf("node-%s missing", itoa3(i))
		}
	}
}

func itoa3(i int) string {
	return string([]byte{byte('0' + i/1000%10), byte('0' + i/100%10), byte('0' + i/10%10), byte('0' + i%10)})
}

// TestEtcdCompactedWatch: a watch that fell behind a compaction (its
// member was down while records changed and the store was compacted) lists
// again: nodes added meanwhile appear, nodes removed meanwhile go.
func TestEtcdCompactedWatch(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	cli := testClient(t, ec.Endpoint(1), ec.Endpoint(2))
	rec := func(name string) string {
		b, _ := EncodeRecord(selfOf(name, "127.0.0.1:1").Node)
		return string(b)
	}
	putKey(t, cli, "/t4/nodes/node-old", rec("node-old"))
	b := startBackend(t, testClient(t, ec.Endpoint(0)), "/t4", "node-b")
	within(t, 3*time.Second, "node-old listed", func() bool { return b.sink.has("node-old") })

	ec.Stop(0)
	delKey(t, cli, "/t4/nodes/node-old")
	putKey(t, cli, "/t4/nodes/node-new", rec("node-new"))
	for i := range 5 {
		putKey(t, cli, "/t4/other", itoa3(i))
	}
	ec.Compact(t)
	ec.Restart(0)
	within(t, 10*time.Second, "the view caught up after the compaction", func() bool {
		return b.sink.has("node-new") && !b.sink.has("node-old")
	})
	if st := b.Status(); st.Relists == 0 {
		t.Errorf("no listing again after the compaction: %+v", st)
	}
}

// TestEtcdDocuments: the revocation list and the policy reach the Sink at
// start, on each change (through the watch, well within a second), and
// again every DocsEvery whatever the watch says; a deleted document is
// not a change.
func TestEtcdDocuments(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	cli := ec.Client(t)
	putKey(t, cli, "/t5/revocations", "list 1")
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t5", "node-b")
	count := func() (int, int, string, string) {
		b.sink.mu.Lock()
		defer b.sink.mu.Unlock()
		var lr, lp string
		if len(b.sink.revs) > 0 {
			lr = string(b.sink.revs[len(b.sink.revs)-1])
		}
		if len(b.sink.pols) > 0 {
			lp = string(b.sink.pols[len(b.sink.pols)-1])
		}
		return len(b.sink.revs), len(b.sink.pols), lr, lp
	}
	within(t, 3*time.Second, "the list read at start", func() bool { _, _, r, _ := count(); return r == "list 1" })
	start := time.Now()
	putKey(t, cli, "/t5/policy", "policy 1")
	within(t, time.Second, "the policy through the watch", func() bool { _, _, _, p := count(); return p == "policy 1" })
	putKey(t, cli, "/t5/revocations", "list 2")
	within(t, time.Second, "the new list through the watch", func() bool { _, _, r, _ := count(); return r == "list 2" })
	t.Logf("both changes delivered %s after the first put", time.Since(start))
	delKey(t, cli, "/t5/revocations")
	// Read again every DocsEvery (1 s, jittered), though nothing changed:
	// an unchanged policy is not fetched or handed over again, a deleted
	// list is not handed over.
	nr, np, _, _ := count()
	readAt := b.Status().DocsReadAt
	within(t, 3*time.Second, "a read again", func() bool { return b.Status().DocsReadAt.After(readAt) })
	if r, p, _, _ := count(); r != nr || p != np {
		t.Errorf("a read again handed over %d lists and %d policies (before: %d, %d): want no change", r, p, nr, np)
	}
	// Too large: refused with a log line.
	putKey(t, cli, "/t5/policy", strings.Repeat("x", MaxValueSize+1))
	within(t, 3*time.Second, "the log says the policy is too large", func() bool {
		return strings.Contains(b.log.String(), "registry document refused: too large")
	})
	if _, _, _, p := count(); p != "policy 1" {
		t.Error("a document over the bound was delivered")
	}
}

// TestEtcdOutageOutlastsTTL: etcd down for longer than the lease TTL and
// back. While it is down the view stays as it was and the status says
// unreachable, with the error; once it is back each agent's record is put
// again (the keepalive channel had closed: the trap of issue 14) and the
// agents see each other again within a few seconds, for good.
func TestEtcdOutageOutlastsTTL(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	a := startBackend(t, testClient(t, ec.Endpoints()...), "/t6", "node-a")
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t6", "node-b")
	within(t, 3*time.Second, "each sees the other", func() bool { return a.sink.has("node-b") && b.sink.has("node-a") })

	ec.StopAll()
	within(t, 3*time.Second, "the status says unreachable", func() bool { return !a.Status().Connected })
	time.Sleep(testTTL + time.Second)
	st := a.Status()
	if st.Connected || st.LastError == "" || time.Since(st.Since) < testTTL {
		t.Errorf("status during the outage: %+v", st)
	}
	if !a.sink.has("node-b") || !b.sink.has("node-a") {
		t.Error("the view changed while etcd was down")
	}
	if !strings.Contains(a.log.String(), "registry unreachable; keeping the last view") {
		t.Error("the log does not say the registry is unreachable")
	}

	ec.StartAll()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ec.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	cli := ec.Client(t)
	within(t, 5*time.Second, "both records in etcd again", func() bool {
		return getKey(t, cli, "/t6/nodes/node-a") != nil && getKey(t, cli, "/t6/nodes/node-b") != nil
	})
	t.Logf("records back %s after etcd was healthy", time.Since(back))
	// Past another TTL: the records live under leases that are renewed,
	// not under the old ones etcd revived for one more TTL at its start.
	time.Sleep(testTTL + time.Second)
	if getKey(t, cli, "/t6/nodes/node-a") == nil || getKey(t, cli, "/t6/nodes/node-b") == nil {
		t.Fatal("a record expired after the outage: its lease was not granted again")
	}
	if !a.sink.has("node-b") || !b.sink.has("node-a") {
		t.Errorf("after the outage node-a sees %s, node-b sees %s", a.sink.names(), b.sink.names())
	}
	if st := a.Status(); !st.Connected || !st.Published || st.Regrants == 0 {
		t.Errorf("status after the outage: %+v", st)
	}
}

// TestEtcdMemberKilled: one member of three killed (SIGKILL) changes
// nothing: the records stay, and a node that starts after the kill is seen
// by the others within a couple of seconds.
func TestEtcdMemberKilled(t *testing.T) {
	ec := etcdtest.Start(t, 3)
	a := startBackend(t, testClient(t, ec.Endpoints()...), "/t7", "node-a")
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t7", "node-b")
	within(t, 3*time.Second, "each sees the other", func() bool { return a.sink.has("node-b") && b.sink.has("node-a") })
	ec.Kill(0)
	c := startBackend(t, testClient(t, ec.Endpoints()...), "/t7", "node-c")
	d := within(t, 5*time.Second, "node-c seen by both", func() bool { return a.sink.has("node-c") && b.sink.has("node-c") && c.sink.has("node-a") })
	t.Logf("a node started after a member was killed was seen in %s", d)
	time.Sleep(testTTL + time.Second)
	for _, r := range []*running{a, b, c} {
		if got := r.sink.names(); len(strings.Split(got, ",")) != 3 {
			t.Errorf("%s sees %s", r.self.Node.Name, got)
		}
	}
	if len(a.sink.gone)+len(b.sink.gone) != 0 {
		t.Errorf("nodes went: %v %v", a.sink.gone, b.sink.gone)
	}
}

// TestEtcdMaxNodes: the view keeps at most MaxNodes records: more are
// refused with a log line, and one that goes makes room for the next.
func TestEtcdMaxNodes(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	cli := ec.Client(t)
	rec := func(name string) string {
		b, _ := EncodeRecord(selfOf(name, "127.0.0.1:1").Node)
		return string(b)
	}
	for i := range 5 {
		putKey(t, cli, "/t8/nodes/node-"+itoa3(i), rec("node-"+itoa3(i)))
	}
	b := startBackend(t, testClient(t, ec.Endpoints()...), "/t8", "node-b", func(c *EtcdConfig) { c.MaxNodes = 3 })
	within(t, 3*time.Second, "the view full", func() bool { return b.Status().Nodes == 3 })
	within(t, 3*time.Second, "the rest refused", func() bool { return b.Status().Refused == 3 }) // node-0003, node-0004, node-b
	if !b.sink.has("node-0000") || !b.sink.has("node-0002") || b.sink.has("node-0003") {
		t.Errorf("nodes taken: %s", b.sink.names())
	}
	if !strings.Contains(b.log.String(), "max_nodes") {
		t.Error("no log line says the view is full")
	}
	delKey(t, cli, "/t8/nodes/node-0000")
	putKey(t, cli, "/t8/nodes/node-0009", rec("node-0009"))
	within(t, 2*time.Second, "a new node in the room one left", func() bool { return b.sink.has("node-0009") && !b.sink.has("node-0000") })
	if n := b.Status().Nodes; n != 3 {
		t.Errorf("%d nodes in a view of 3", n)
	}
}
