// Package etcdtest runs a real etcd cluster for tests: N members of Debian's
// /usr/bin/etcd (package etcd-server, 3.4) on loopback, each on free ports
// with its own data directory, all of it torn down by t.Cleanup.
//
// A test can kill, stop and restart members (same data directory, same
// ports), stop and start the whole cluster, force a compaction, and run the
// cluster with TLS client-certificate authentication.
//
// When /usr/bin/etcd is missing the test is skipped with a message saying how
// to install it, unless the CI environment variable is set: then it fails.
//
// Member lifecycle (one goroutine per running process, which only waits for it
// to exit; all other state is under Cluster.mu):
//
//	state     event                   next
//	stopped   Start/Restart/StartAll  running
//	running   Kill (SIGKILL)          stopped
//	running   Stop/StopAll (SIGTERM)  stopped
//	running   Freeze (SIGSTOP)        frozen: connections open, no answers
//	frozen    Thaw (SIGCONT)          running
//	frozen    Kill/Stop               stopped
//	running   exits on its own        exited: WaitHealthy reports it
//
// Processes are started with Pdeathsig so that a test binary that dies
// without running its cleanups takes its etcd members with it. (Linux sends
// it when the thread that started the process ends; Go's threads outlive
// the test unless one locked to a goroutine exits, so in practice it is the
// process.) Each member runs in its own process group, so a terminal's ^C
// reaches the test, whose cleanups stop the members in order.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// Binary is the etcd server the tests run.
const Binary = "/usr/bin/etcd"

// Timings of the test cluster: fast elections so that a killed leader is
// replaced in about a second, and bounded waits so a broken cluster fails
// the test rather than hangs it.
const (
	heartbeatMillis = 50
	electionMillis  = 500
	startTimeout    = 30 * time.Second // a fresh cluster must be healthy within this
	stopTimeout     = 10 * time.Second // SIGTERM, then SIGKILL
	startAttempts   = 3                // fresh ports each time another process took one
)

// Options says what cluster Start runs.
type Options struct {
	Members int  // number of members, at least 1 (tests use 1 or 3)
	TLS     bool // clients must present a certificate of the test CA (https)
}

// Cluster is a running etcd cluster. Its methods may be called from any
// goroutine; failures call t.Fatal and so belong on the test's goroutine.
type Cluster struct {
	t       testing.TB
	binary  string
	token   string
	dir     string // logs and TLS files; data directories are under dir/data
	tls     *TLSFiles
	server  serverFiles
	mu      sync.Mutex
	members []*member
}

// member is one etcd process slot: its name, ports and directories stay the
// same across restarts.
type member struct {
	name       string
	dataDir    string
	logPath    string
	clientPort int
	peerPort   int
	proc       *process // nil when stopped
}

// process is one run of a member.
type process struct {
	cmd       *exec.Cmd
	done      chan struct{} // closed when the process has exited
	err       error         // Wait's result, set before done closes
	logOffset int64         // size of the log when this run began
}

// Start runs an n-member cluster without TLS and waits until it is healthy.
func Start(t testing.TB, n int) *Cluster {
	t.Helper()
	return StartWith(t, Options{Members: n})
}

// StartTLS runs an n-member cluster whose clients must present a certificate
// of the test CA; TLS() gives the files a client uses.
func StartTLS(t testing.TB, n int) *Cluster {
	t.Helper()
	return StartWith(t, Options{Members: n, TLS: true})
}

// StartWith runs the cluster o describes and waits until it is healthy.
func StartWith(t testing.TB, o Options) *Cluster {
	t.Helper()
	if o.Members < 1 {
		t.Fatalf("etcdtest: %d members: need at least 1", o.Members)
	}
	c := &Cluster{t: t, binary: binary(t), dir: t.TempDir()}
	// Registered after TempDir, so it runs before the directory is removed.
	t.Cleanup(c.cleanup)
	if o.TLS {
		c.tls, c.server = writeTLS(t, filepath.Join(c.dir, "tls"))
	}
	for attempt := 1; ; attempt++ {
		err := c.bootstrap(o.Members)
		if err == nil {
			return c
		}
		clash := c.portClash()
		c.killAll()
		if !clash || attempt == startAttempts {
			t.Fatalf("etcdtest: starting %d members: %v%s", o.Members, err, c.logTails())
		}
		t.Logf("etcdtest: a port was taken by another process; retrying with fresh ports")
	}
}

// bootstrap starts a new cluster on fresh ports and data directories.
func (c *Cluster) bootstrap(n int) error {
	ports, err := freePorts(2 * n)
	if err != nil {
		return err
	}
	c.token = "etcdtest-" + randomHex(8)
	dataRoot := filepath.Join(c.dir, "data", c.token)
	c.mu.Lock()
	c.members = make([]*member, n)
	for i := range c.members {
		name := "m" + strconv.Itoa(i)
		c.members[i] = &member{
			name:       name,
			dataDir:    filepath.Join(dataRoot, name),
			logPath:    filepath.Join(c.dir, name+".log"),
			clientPort: ports[2*i],
			peerPort:   ports[2*i+1],
		}
	}
	for i := range c.members {
		if err := c.startLocked(i); err != nil {
			c.mu.Unlock()
			return err
		}
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	return c.WaitHealthy(ctx)
}

// binary returns the etcd server, skipping the test (failing it under CI)
// when it is not installed.
func binary(t testing.TB) string {
	t.Helper()
	if _, err := os.Stat(Binary); err == nil {
		return Binary
	}
	msg := "etcdtest: " + Binary + " not found (apt-get install --no-install-recommends etcd-server; .ci/run installs it)"
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip("skipping: " + msg)
	return ""
}

// freePorts returns n distinct loopback ports that were free a moment ago.
// All listeners stay open until all are chosen, so the ports differ; another
// process may still take one before etcd binds it, which Start notices
// (portClash) and retries.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("etcdtest: finding a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// scheme is the client URLs' scheme.
func (c *Cluster) scheme() string {
	if c.tls != nil {
		return "https"
	}
	return "http"
}

func (m *member) clientURL(scheme string) string {
	return scheme + "://127.0.0.1:" + strconv.Itoa(m.clientPort)
}

func (m *member) peerURL() string {
	return "http://127.0.0.1:" + strconv.Itoa(m.peerPort)
}

// args are the member's command line; the same on every run, since etcd
// ignores the initial-cluster flags once its data directory holds a WAL.
func (c *Cluster) args(m *member) []string {
	initial := make([]string, len(c.members))
	for i, o := range c.members {
		initial[i] = o.name + "=" + o.peerURL()
	}
	client := m.clientURL(c.scheme())
	a := []string{
		"--name", m.name,
		"--data-dir", m.dataDir,
		"--listen-client-urls", client,
		"--advertise-client-urls", client,
		"--listen-peer-urls", m.peerURL(),
		"--initial-advertise-peer-urls", m.peerURL(),
		"--initial-cluster", strings.Join(initial, ","),
		"--initial-cluster-state", "new",
		"--initial-cluster-token", c.token,
		"--heartbeat-interval", strconv.Itoa(heartbeatMillis),
		"--election-timeout", strconv.Itoa(electionMillis),
		"--auto-compaction-retention", "0", // Compact is the only compaction
		"--logger", "zap",
		"--log-outputs", "stderr",
	}
	if c.tls != nil {
		a = append(a,
			"--cert-file", c.server.cert,
			"--key-file", c.server.key,
			"--client-cert-auth",
			"--trusted-ca-file", c.tls.CA,
		)
	}
	return a
}

// startLocked starts member i, which must be stopped. c.mu is held.
func (c *Cluster) startLocked(i int) error {
	m := c.members[i]
	if m.proc != nil {
		return fmt.Errorf("etcdtest: member %s is already running", m.name)
	}
	if err := os.MkdirAll(filepath.Dir(m.dataDir), 0o700); err != nil {
		return err
	}
	log, err := os.OpenFile(m.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close() // the child holds its own copy
	st, err := log.Stat()
	if err != nil {
		return err
	}
	fmt.Fprintf(log, "==== etcdtest: starting %s at %s\n", m.name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(c.binary, c.args(m)...)
	cmd.Stdout = log
	cmd.Stderr = log
	// A clean environment: etcd reads ETCD_* variables as flags.
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	if arch := os.Getenv("ETCD_UNSUPPORTED_ARCH"); arch != "" {
		cmd.Env = append(cmd.Env, "ETCD_UNSUPPORTED_ARCH="+arch)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("etcdtest: starting member %s: %w", m.name, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{}), logOffset: st.Size()}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	m.proc = p
	return nil
}

// stop ends member i with sig (escalating to SIGKILL after stopTimeout) and
// waits for it to exit. Stopping a stopped member does nothing.
func (c *Cluster) stop(i int, sig syscall.Signal) {
	c.mu.Lock()
	m := c.member(i)
	p := m.proc
	m.proc = nil
	c.mu.Unlock()
	if p == nil {
		return
	}
	p.cmd.Process.Signal(sig)
	p.cmd.Process.Signal(syscall.SIGCONT) // a frozen member must see it
	select {
	case <-p.done:
	case <-time.After(stopTimeout):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (c *Cluster) member(i int) *member {
	if i < 0 || i >= len(c.members) {
		c.t.Fatalf("etcdtest: no member %d in a cluster of %d", i, len(c.members))
	}
	return c.members[i]
}

// Kill ends member i with SIGKILL, as a crash would, and waits for it to exit.
func (c *Cluster) Kill(i int) { c.stop(i, syscall.SIGKILL) }

// Stop ends member i with SIGTERM, as a clean shutdown would, and waits for it
// to exit.
func (c *Cluster) Stop(i int) { c.stop(i, syscall.SIGTERM) }

// Freeze stops member i's process with SIGSTOP: it keeps its connections
// open but answers nothing, as a hung machine would. Thaw resumes it; Kill,
// Stop and the cleanup end a frozen member too.
//
// It returns once every thread of the member is stopped: SIGSTOP is only
// queued by kill(2), and a thread running on another core can still answer
// a request meanwhile.
func (c *Cluster) Freeze(i int) {
	c.signal(i, syscall.SIGSTOP)
	c.mu.Lock()
	p := c.member(i).proc
	c.mu.Unlock()
	if p == nil {
		return
	}
	deadline := time.Now().Add(5 * time.Second)
	for !allStopped(p.cmd.Process.Pid) {
		if time.Now().After(deadline) {
			c.t.Fatalf("etcdtest: member %d did not stop within 5s of SIGSTOP", i)
		}
		time.Sleep(time.Millisecond)
	}
}

// allStopped reports whether every thread of pid is in the stopped state
// ('T' in /proc/PID/task/TID/stat).
func allStopped(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return false
	}
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, t.Name()))
		if err != nil {
			return false
		}
		// The state follows the command, which is in parentheses and may
		// hold anything: take it after the last ')'.
		j := bytes.LastIndexByte(b, ')')
		if j < 0 || j+2 >= len(b) || b[j+2] != 'T' {
			return false
		}
	}
	return true
}

// Thaw resumes a frozen member with SIGCONT.
func (c *Cluster) Thaw(i int) { c.signal(i, syscall.SIGCONT) }

func (c *Cluster) signal(i int, sig syscall.Signal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.member(i).proc; p != nil {
		p.cmd.Process.Signal(sig)
	}
}

// Restart starts member i again with its data directory and ports (stopping
// it first if it runs). It does not wait for health: see WaitHealthy.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	c.Stop(i)
	c.mu.Lock()
	err := c.startLocked(i)
	c.mu.Unlock()
	if err != nil {
		c.t.Fatal(err)
	}
}

// StopAll stops every member (SIGTERM) and waits for them. One at a time:
// stopped all at once, a leader spends seconds handing its leadership to a
// member that is stopping too.
func (c *Cluster) StopAll() {
	for i := range c.N() {
		c.Stop(i)
	}
}

// StartAll starts every stopped member. It does not wait for health.
func (c *Cluster) StartAll() {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, m := range c.members {
		if m.proc == nil {
			if err := c.startLocked(i); err != nil {
				c.t.Fatal(err)
			}
		}
	}
}

// killAll kills every member and waits for them.
func (c *Cluster) killAll() {
	for i := range c.N() {
		c.Kill(i)
	}
}

// cleanup kills every member and, when the test failed, shows their logs.
func (c *Cluster) cleanup() {
	c.killAll()
	if c.t.Failed() {
		c.t.Logf("etcdtest: member logs (in %s):%s", c.dir, c.logTails())
	}
}

// N is the number of members, running or not.
func (c *Cluster) N() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.members)
}

// Endpoints are the client URLs of all members, running or not
// ("http://127.0.0.1:PORT", https with TLS).
func (c *Cluster) Endpoints() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	eps := make([]string, len(c.members))
	for i, m := range c.members {
		eps[i] = m.clientURL(c.scheme())
	}
	return eps
}

// Endpoint is member i's client URL.
func (c *Cluster) Endpoint(i int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.member(i).clientURL(c.scheme())
}

// Running reports whether member i's process is running (started and not
// stopped; a process that exited on its own still counts until WaitHealthy
// reports it).
func (c *Cluster) Running(i int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.member(i).proc != nil
}

// PID is the process id of member i, or 0 when it is not running: for a
// test that reads the member's memory and CPU time in /proc.
func (c *Cluster) PID(i int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.member(i).proc; p != nil {
		return p.cmd.Process.Pid
	}
	return 0
}

// TLS returns the client's certificate files, or nil when the cluster runs
// without TLS.
func (c *Cluster) TLS() *TLSFiles { return c.tls }

// Client returns a client of all members, closed when the test ends. Its
// logging is off.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := c.newClient(c.Endpoints())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func (c *Cluster) newClient(endpoints []string) (*clientv3.Client, error) {
	cfg := clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		// gRPC's default reconnect backoff grows to two minutes: a probe
		// made before a member listens would wait long after it does.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
			MinConnectTimeout: 2 * time.Second,
		})},
	}
	if c.tls != nil {
		tc, err := c.tls.Config()
		if err != nil {
			return nil, err
		}
		cfg.TLS = tc
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: client of %v: %w", endpoints, err)
	}
	return cli, nil
}

// WaitHealthy waits until every running member answers a linearizable read
// (so the cluster has a leader and a quorum). It fails at once when a member
// the test did not stop has exited, and otherwise when ctx ends.
func (c *Cluster) WaitHealthy(ctx context.Context) error {
	c.mu.Lock()
	type probe struct {
		m *member
		p *process
	}
	var probes []probe
	for _, m := range c.members {
		if m.proc != nil {
			probes = append(probes, probe{m, m.proc})
		}
	}
	scheme := c.scheme()
	c.mu.Unlock()
	for _, pr := range probes {
		cli, err := c.newClient([]string{pr.m.clientURL(scheme)})
		if err != nil {
			return err
		}
		err = waitMember(ctx, cli, pr.m.name, pr.p)
		cli.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// waitMember polls one member until a linearizable read succeeds.
func waitMember(ctx context.Context, cli *clientv3.Client, name string, p *process) error {
	var last error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("etcdtest: member %s exited: %v", name, p.err)
		default:
		}
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := cli.Get(rctx, "/etcdtest/health")
		cancel()
		if err == nil {
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcdtest: member %s not healthy: %w (last error: %v)", name, ctx.Err(), last)
		case <-p.done:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Compact compacts the keyspace up to its current revision (physically, so
// the old revisions are gone when it returns) and returns that revision. A
// watch from an earlier revision then fails with ErrCompacted.
func (c *Cluster) Compact(t testing.TB) int64 {
	t.Helper()
	cli, err := c.newClient(c.Endpoints())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/etcdtest/compact")
	if err != nil {
		t.Fatalf("etcdtest: reading the revision to compact to: %v", err)
	}
	rev := resp.Header.Revision
	if _, err := cli.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		t.Fatalf("etcdtest: compacting to revision %d: %v", rev, err)
	}
	return rev
}

// portClash reports whether a member that exited during this run could not
// bind its port.
func (c *Cluster) portClash() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range c.members {
		p := m.proc
		if p == nil {
			continue
		}
		select {
		case <-p.done:
		default:
			continue
		}
		if strings.Contains(readFrom(m.logPath, p.logOffset, 1<<20), "address already in use") {
			return true
		}
	}
	return false
}

// logTails returns the end of each member's log, for a failure message.
func (c *Cluster) logTails() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for _, m := range c.members {
		const tail = 6 << 10
		st, err := os.Stat(m.logPath)
		if err != nil {
			continue
		}
		off := max(st.Size()-tail, 0)
		text := readFrom(m.logPath, off, tail)
		if off > 0 { // from the first whole line
			if nl := strings.IndexByte(text, '\n'); nl >= 0 {
				text = text[nl+1:]
			}
		}
		fmt.Fprintf(&b, "\n---- %s (%s), its end:\n%s", m.name, m.logPath, text)
	}
	return b.String()
}

// readFrom reads at most limit bytes of path from offset.
func readFrom(path string, offset, limit int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b := make([]byte, limit)
	n, err := f.ReadAt(b, offset)
	if err != nil && !errors.Is(err, io.EOF) {
		return ""
	}
	return string(b[:n])
}
