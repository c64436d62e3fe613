package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
)

// The partition socket under pressure from its own users (issue 11.7,
// 11.11, 13.6): real agent processes, clients under real uids.

// The test binary doubles as the helper processes of these tests.
func init() {
	if arg := os.Getenv("SINC_TEST_HALFOPEN"); arg != "" {
		halfOpenMain(arg)
		os.Exit(0)
	}
	if arg := os.Getenv("SINC_TEST_BURST"); arg != "" {
		burstMain(arg)
		os.Exit(0)
	}
}

// halfOpenMain ("SOCKET,N") opens N connections to a partition socket and
// sends nothing on them; it prints how many it opened and how many the
// agent answered at once with busy, then holds the rest until its stdin
// closes.
func halfOpenMain(arg string) {
	sock, ns, _ := strings.Cut(arg, ",")
	n, _ := strconv.Atoi(ns)
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("unix", sock)
		if err != nil {
			fmt.Printf("dial %d: %v\n", len(conns), err)
			break
		}
		conns = append(conns, c)
	}
	var busy, other atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(time.Now().Add(time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			switch {
			case err != nil:
			case strings.Contains(line, `"code":"busy"`):
				busy.Add(1)
				c.Close()
			default:
				other.Add(1)
			}
		}()
	}
	wg.Wait()
	fmt.Printf("opened %d busy %d other %d\n", len(conns), busy.Load(), other.Load())
	io.Copy(io.Discard, os.Stdin)
}

// burstMain ("MODE,DIAL_SOCKET,LISTEN_SOCKET,ADDR_NODE,N") makes N
// requests at once through DIAL_SOCKET and prints how many worked and how
// each failure was answered. MODE "open": it listens on service "burst"
// through LISTEN_SOCKET and opens N channels to it, each held until all are
// open and checked; MODE "conns": N conns requests.
func burstMain(arg string) {
	f := strings.Split(arg, ",")
	mode, dialSock, listenSock, node := f[0], f[1], f[2], f[3]
	n, _ := strconv.Atoi(f[4])
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l, err := (&sinc.ListenConfig{Socket: listenSock}).Listen(ctx, "burst")
	if err != nil {
		fmt.Printf("listen: %v\n", err)
		return
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	var ok, busy atomic.Int64
	var mu sync.Mutex
	failures := map[string]int{}
	var opened, all sync.WaitGroup
	start := make(chan struct{})
	release := make(chan struct{})
	for range n {
		opened.Add(1)
		all.Add(1)
		go func() {
			defer all.Done()
			<-start
			if mode == "conns" {
				_, err := sinc.Connections(ctx, dialSock)
				opened.Done()
				if err == nil {
					ok.Add(1)
				} else {
					if errors.Is(err, sinc.ErrBusy) {
						busy.Add(1)
					}
					mu.Lock()
					failures[err.Error()]++
					mu.Unlock()
				}
				return
			}
			c, err := (&sinc.Dialer{Socket: dialSock}).DialContext(ctx, node+"/db/burst")
			if err == nil {
				var b [1]byte
				if _, err = c.Write([]byte{'x'}); err == nil {
					_, err = io.ReadFull(c, b[:])
				}
				defer c.Close()
			}
			opened.Done()
			if err != nil {
				if errors.Is(err, sinc.ErrBusy) {
					busy.Add(1)
				}
				mu.Lock()
				failures[err.Error()]++
				mu.Unlock()
				return
			}
			ok.Add(1)
			<-release // all open at once
		}()
	}
	t0 := time.Now()
	close(start)
	opened.Wait()
	took := time.Since(t0)
	close(release)
	all.Wait()
	fmt.Printf("ok %d busy %d failed %d in %s\n", ok.Load(), busy.Load(), int64(n)-ok.Load(), took.Round(time.Millisecond))
	for msg, k := range failures {
		fmt.Printf("  %d× %s\n", k, msg)
	}
}

// startNode lays out and starts one agent with partitions web and db, web
// allowed to reach db, each partition socket open to every uid.
func startNode(t *testing.T, extra string, partExtra map[string]string, timers cluster.Timers) (*cluster.Node, *cluster.Process) {
	t.Helper()
	pe := map[string]string{"web": "mode = \"0666\"\n", "db": "mode = \"0666\"\n"}
	for k, v := range partExtra {
		pe[k] += v
	}
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web", "db"},
		Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-a/db/*\"\n" + extra, PartitionExtra: pe}}, timers)
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	p, err := cluster.Start(bin, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop(5 * time.Second)
		if t.Failed() {
			b, _ := os.ReadFile(p.Log)
			t.Logf("agent log:\n%s", b)
		}
	})
	if err := waitAgent(n); err != nil {
		t.Fatal(err)
	}
	return n, p
}

// startListener runs `sinc listen SERVICE --exec COMMAND` in partition db
// as uid/gid (-1: this process's) and waits until it listens.
func startListener(t *testing.T, n *cluster.Node, uid, gid int, service, command string) *exec.Cmd {
	t.Helper()
	args := []string{"listen", service, "--socket", n.Partitions["db"], "--exec", command}
	cmd := exec.Command(bin, args...)
	if uid >= 0 {
		cmd = as(uid, gid, args...)
	}
	errs := &syncBuffer{}
	cmd.Stderr = errs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(errs.String(), "listening on"); {
		if time.Now().After(deadline) {
			t.Fatalf("listener %s as uid %d did not start: %s", service, uid, errs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return cmd
}

// tryListen runs `sinc listen SERVICE` in partition db as uid/gid and
// returns its error output once it exits, or "" if it got to listen (it is
// stopped then).
func tryListen(t *testing.T, n *cluster.Node, uid, gid int, service string) string {
	t.Helper()
	cmd := as(uid, gid, "listen", service, "--socket", n.Partitions["db"], "--exec", "true")
	errs := &syncBuffer{}
	cmd.Stderr = errs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		select {
		case <-done:
			return errs.String()
		default:
		}
		if strings.Contains(errs.String(), "listening on") || time.Now().After(deadline) {
			cmd.Process.Kill()
			<-done
			return ""
		}
	}
}

func agentStats(t *testing.T, n *cluster.Node) map[string]uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := admin.Query(ctx, n.Admin, admin.Request{Op: "stats"})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Counters
}

// TestPartitionFloodByOneUID (issue 11.7): uid A opens 3,000 connections
// to partition web and sends nothing. It fills its own share of the
// requests being read and of the queue, and the rest of its connections
// are answered busy at once, counted; meanwhile uid B's opens through the
// same socket and uid C's conns are all served at once. Before the
// per-uid bounds, A's connections took all 64 slots and B and C got busy.
func TestPartitionFloodByOneUID(t *testing.T) {
	ua, ga := testUser(t, "sinc-e2e-a")
	ub, gb := testUser(t, "sinc-e2e-b")
	uc, gc := testUser(t, "sinc-e2e-c")
	// A's held connections must outlast the test's other clients.
	n, _ := startNode(t, "", nil, cluster.Timers{Request: "15s"})
	startListener(t, n, -1, -1, "echo", "cat")
	before := agentStats(t, n)

	const flood = 3000
	fl := exec.Command(testBin(t), "-test.run=^$")
	fl.Env = append(os.Environ(), fmt.Sprintf("SINC_TEST_HALFOPEN=%s,%d", n.Partitions["web"], flood))
	fl.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(ua), Gid: uint32(ga)},
		Pdeathsig: syscall.SIGKILL}
	hold, _ := fl.StdinPipe()
	out, _ := fl.StdoutPipe()
	if err := fl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { hold.Close(); fl.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("flooder: %v", err)
	}
	var opened, busy, other int
	if _, err := fmt.Sscanf(line, "opened %d busy %d other %d", &opened, &busy, &other); err != nil || opened != flood || other != 0 {
		t.Fatalf("flooder: %q", line)
	}
	// Defaults: 16 being read and 1,024 waiting are uid A's share.
	if held := opened - busy; held != 16+1024 {
		t.Errorf("uid A holds %d connections, want its share 16+1024", held)
	}

	// While A holds its share, B opens and C lists, each at once.
	var worst time.Duration
	for i := range 10 {
		cmd := as(ub, gb, "dial", "node-a/db/echo", "--socket", n.Partitions["web"])
		msg := fmt.Sprintf("from B %d\n", i)
		cmd.Stdin = strings.NewReader(msg)
		t0 := time.Now()
		got, errs, code := runCmd(t, cmd)
		d := time.Since(t0)
		worst = max(worst, d)
		if code != 0 || string(got) != msg {
			t.Fatalf("uid B's open %d during the flood: exit %d, %q: %s", i, code, got, errs)
		}
	}
	for i := range 5 {
		t0 := time.Now()
		_, errs, code := runCmd(t, as(uc, gc, "conns", "--socket", n.Partitions["web"], "--json"))
		worst = max(worst, time.Since(t0))
		if code != 0 {
			t.Fatalf("uid C's conns %d during the flood: exit %d: %s", i, code, errs)
		}
	}
	if worst > 2*time.Second {
		t.Errorf("the slowest of B's and C's requests took %s during the flood", worst)
	}
	t.Logf("uid A: %d connections, %d answered busy at once; uids B and C served, slowest %s", opened, busy, worst)

	after := agentStats(t, n)
	if got := after["refused_request_queue_full_uid"] - before["refused_request_queue_full_uid"]; got != uint64(busy) {
		t.Errorf("refused_request_queue_full_uid counted %d, the flooder got %d busy answers", got, busy)
	}
	if got := after["refused_request_queue_full"] - before["refused_request_queue_full"]; got != 0 {
		t.Errorf("refused_request_queue_full counted %d: one uid filled the whole queue", got)
	}
}

// burst runs burstMain in a process of its own and returns what it
// counted.
func burst(t *testing.T, n *cluster.Node, mode string, count int) (ok, busy int, failures []string) {
	t.Helper()
	cmd := exec.Command(testBin(t), "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("SINC_TEST_BURST=%s,%s,%s,node-a,%d", mode, n.Partitions["web"], n.Partitions["db"], count))
	res, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("burst: %v\n%s", err, res)
	}
	var failed int
	var took string
	if _, err := fmt.Sscanf(string(res), "ok %d busy %d failed %d in %s", &ok, &busy, &failed, &took); err != nil {
		t.Fatalf("burst: %q", res)
	}
	t.Logf("%d %s requests at once: %s", count, mode, strings.TrimSpace(string(res)))
	lines := strings.Split(strings.TrimSpace(string(res)), "\n")
	return ok, busy, lines[1:]
}

// TestOpenBurst (issue 13.6): one process makes 1,000 requests at once
// through one partition socket: those past the ones being read wait their
// turn, and none is refused there. 1,000 conns requests are all served;
// of 1,000 channel opens, none is refused, neither by the partition
// socket nor by the accepting side.
func TestOpenBurst(t *testing.T) {
	n, _ := startNode(t, "", nil, cluster.Timers{})
	before := agentStats(t, n)
	const count = 1000
	if ok, busy, fails := burst(t, n, "conns", count); ok != count || busy != 0 {
		t.Errorf("%d of %d conns requests served, %d answered busy: %v", ok, count, busy, fails)
	}
	// The opens wait their turn at the accepting side too (up to
	// maxAccepting per peer), rather than being refused.
	if ok, busy, fails := burst(t, n, "open", count); ok != count || busy != 0 {
		t.Errorf("%d of %d opens served, %d answered busy: %v", ok, count, busy, fails)
	}
	after := agentStats(t, n)
	for _, k := range []string{"refused_request_queue_full_uid", "refused_request_queue_full", "refused_request_timeout_queued"} {
		if after[k] != before[k] {
			t.Errorf("%s: %d → %d during the bursts", k, before[k], after[k])
		}
	}
}

// TestListenRulesAcrossUIDs (issue 11.11): partition db reserves service
// pg for uid A. uid B, first, tries to take pg: refused with denied,
// counted; B may take a service no rule names. A takes pg and gets the
// channels to it. A rule reloaded (SIGHUP) that reserves B's service for A
// drops B's listener: the next channel to it does not reach B.
func TestListenRulesAcrossUIDs(t *testing.T) {
	ua, ga := testUser(t, "sinc-e2e-a")
	ub, gb := testUser(t, "sinc-e2e-b")
	rule := func(svc string) string {
		return fmt.Sprintf("\n[[partitions.db.listen]]\nservice = %q\nuids = [%d]\n", svc, ua)
	}
	n, p := startNode(t, "", map[string]string{"db": rule("pg")}, cluster.Timers{})
	before := agentStats(t, n)

	// B tries to take pg first.
	if errs := tryListen(t, n, ub, gb, "pg"); !strings.Contains(errs, "denied") || !strings.Contains(errs, "listen rules of partition db") {
		t.Fatalf("uid B listening on a service reserved for uid A: %q", errs)
	}
	startListener(t, n, ub, gb, "other", "id -u") // no rule names it
	startListener(t, n, ua, ga, "pg", "id -u")
	who := func(svc string) (string, string) {
		out, errs, _ := runCmd(t, exec.Command(bin, "dial", "node-a/db/"+svc, "--socket", n.Partitions["web"]))
		return strings.TrimSpace(string(out)), errs
	}
	if got, errs := who("pg"); got != strconv.Itoa(ua) {
		t.Fatalf("a channel to pg reached uid %q (%s), want uid A %d", got, errs, ua)
	}
	if got, errs := who("other"); got != strconv.Itoa(ub) {
		t.Fatalf("a channel to other reached uid %q (%s), want uid B %d", got, errs, ub)
	}
	if d := agentStats(t, n)["refused_listen_denied"] - before["refused_listen_denied"]; d != 1 {
		t.Errorf("refused_listen_denied: %d more, want 1", d)
	}

	// The rules change: "other" is A's now. B's listener gets nothing more.
	cfg, err := os.ReadFile(n.Config)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.Config, append(cfg, rule("oth*")...), 0o600); err != nil {
		t.Fatal(err)
	}
	p.Cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, errs := who("other")
		if strings.Contains(errs, "no_such_service") {
			break
		}
		if got == strconv.Itoa(ub) && time.Now().After(deadline) {
			t.Fatalf("after the reload a channel to other still reaches uid B")
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the reload, a channel to other: %q %s", got, errs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if errs := tryListen(t, n, ub, gb, "other"); !strings.Contains(errs, "denied") {
		t.Fatalf("uid B listening again on other after the reload: %q", errs)
	}
}
