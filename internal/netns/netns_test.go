package netns

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"sinc.dev/sinc/internal/faultproxy"
)

// With SINC_NETNS_ECHO set, the test binary is an echo server on that
// address (run inside a namespace by TestCommand); it prints "ready" and
// serves until its stdin closes.
func TestMain(m *testing.M) {
	if addr := os.Getenv("SINC_NETNS_ECHO"); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// echo serves an echo on ln until the test ends.
func echo(t *testing.T, ln net.Listener) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); io.Copy(c, c); c.Close() }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

func listenEcho(t *testing.T, n *Net, name string, port int) string {
	t.Helper()
	addr := n.HostPort(name, port)
	ln, err := n.Listen(name, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, ln)
	return addr
}

func dial(t *testing.T, n *Net, from, addr string) net.Conn {
	t.Helper()
	c, err := n.Dial(from, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, from, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes msg and reads it back within timeout.
func roundTrip(c net.Conn, msg []byte, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	werr := make(chan error, 1)
	go func() { _, err := c.Write(msg); werr <- err }()
	got := make([]byte, len(msg))
	_, err := io.ReadFull(c, got)
	if werr := <-werr; err == nil {
		err = werr
	}
	if err == nil && !bytes.Equal(got, msg) {
		err = errors.New("echo changed the data")
	}
	return err
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestReach(t *testing.T) {
	t.Parallel()
	n := New(t, "a", "b", "c")
	for i, name := range n.Names() {
		if want := n.subnet + strconv.Itoa(i+1); n.Addr(name) != want {
			t.Fatalf("Addr(%s) = %s, want %s", name, n.Addr(name), want)
		}
	}
	addr := listenEcho(t, n, "a", 7000)
	for _, from := range []string{"b", "c"} {
		c := dial(t, n, from, addr)
		if err := roundTrip(c, random(t, 256<<10), 5*time.Second); err != nil {
			t.Fatalf("%s → a: %v", from, err)
		}
		if got := c.LocalAddr().(*net.TCPAddr).IP.String(); got != n.Addr(from) {
			t.Fatalf("connection from %s has source %s, want %s", from, got, n.Addr(from))
		}
	}
	// b and c reach each other too, and a node reaches itself.
	if err := roundTrip(dial(t, n, "c", listenEcho(t, n, "b", 7000)), []byte("c→b"), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(dial(t, n, "a", addr), []byte("a→a"), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Dial("nobody", "tcp", addr); err == nil {
		t.Fatal("dial from an unknown node worked")
	}
}

// TestCommand runs a separate process (this test binary as an echo
// server) inside a namespace and reaches it from another.
func TestCommand(t *testing.T) {
	t.Parallel()
	n := New(t, "a", "b")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	addr := n.HostPort("a", 7001)
	cmd := n.Command("a", exe)
	cmd.Env = append(os.Environ(), "SINC_NETNS_ECHO="+addr)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "ready\n" {
		stdin.Close()
		cmd.Wait()
		t.Fatalf("helper: %q %v", line, err)
	}
	c := dial(t, n, "b", addr)
	if err := roundTrip(c, random(t, 64<<10), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// The helper runs in a's namespace: its view of the network is a's.
	out, err := n.Command("a", "ip", "-o", "-4", "addr", "show", "dev", "lo").CombinedOutput()
	if err != nil || !strings.Contains(string(out), n.Addr("a")+"/32") {
		t.Fatalf("ip addr inside a: %v: %s", err, out)
	}
	c.Close()
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
}

func TestCut(t *testing.T) {
	t.Parallel()
	n := New(t, "a", "b", "c")
	addr := listenEcho(t, n, "a", 7000)
	cb := dial(t, n, "b", addr)
	cc := dial(t, n, "c", addr)
	for _, c := range []net.Conn{cb, cc} {
		if err := roundTrip(c, []byte("before"), 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	if err := n.Cut("a", "b", true); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(cb, []byte("during"), 500*time.Millisecond); !isTimeout(err) {
		t.Fatalf("b → a across a cut link: %v, want a timeout (silence, not an error)", err)
	}
	if err := roundTrip(cc, []byte("c is not cut"), 2*time.Second); err != nil {
		t.Fatalf("c → a while a–b is cut: %v", err)
	}
	if _, err := n.DialContext("b")(ctxTimeout(t, 300*time.Millisecond), "tcp", addr); !isTimeout(err) {
		t.Fatalf("new dial across a cut link: %v, want a timeout", err)
	}

	if err := n.Cut("a", "b", false); err != nil {
		t.Fatal(err)
	}
	// The bytes written during the cut arrive (TCP retransmits them).
	cb.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len("during"))
	if _, err := io.ReadFull(cb, got); err != nil || string(got) != "during" {
		t.Fatalf("after the cut healed: %q %v", got, err)
	}
	if err := roundTrip(cb, []byte("after"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(dial(t, n, "b", addr), []byte("new"), 5*time.Second); err != nil {
		t.Fatal(err)
	}

	// Isolate cuts every link of a node.
	if err := n.Isolate("a", true); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(cc, []byte("isolated"), 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("c → isolated a: %v, want a timeout", err)
	}
	if err := n.Isolate("a", false); err != nil {
		t.Fatal(err)
	}
	cc.SetReadDeadline(time.Now().Add(5 * time.Second))
	got = make([]byte, len("isolated"))
	if _, err := io.ReadFull(cc, got); err != nil {
		t.Fatal(err)
	}
	if err := n.Cut("a", "a", true); err == nil {
		t.Fatal("cut a node from itself")
	}
}

func TestNoRouteOut(t *testing.T) {
	t.Parallel()
	rootLinks := ipOut(t, "-o", "link", "show")
	rootRoutes := ipOut(t, "-4", "route", "show", "table", "all")
	n := New(t, "a", "b")
	for _, ns := range append([]string{n.mid}, n.nsNames()...) {
		if out := ipOut(t, "-n", ns, "route", "show", "default"); out != "" {
			t.Errorf("%s has a default route: %s", ns, out)
		}
		if out := ipOut(t, "-n", ns, "-6", "route", "show", "default"); out != "" {
			t.Errorf("%s has an IPv6 default route: %s", ns, out)
		}
		// A route lookup sends nothing; it must find no way out.
		if out, err := exec.Command("ip", "-n", ns, "route", "get", "192.0.2.1").CombinedOutput(); err == nil {
			t.Errorf("%s has a route to 192.0.2.1: %s", ns, out)
		}
		for _, line := range strings.Split(ipOut(t, "-n", ns, "-4", "route", "show"), "\n") {
			if line != "" && !strings.HasPrefix(line, n.subnet) {
				t.Errorf("%s has a route outside %s0/24: %s", ns, n.subnet, line)
			}
		}
	}
	// The wiring namespace has no IPv4 address but loopback's.
	for _, line := range strings.Split(ipOut(t, "-n", n.mid, "-o", "-4", "addr", "show"), "\n") {
		if line != "" && !strings.Contains(line, " lo ") {
			t.Errorf("%s has an address: %s", n.mid, line)
		}
	}
	// The root namespace is untouched.
	if got := ipOut(t, "-o", "link", "show"); linkNames(got) != linkNames(rootLinks) {
		t.Errorf("root namespace links changed:\nbefore %s\nafter  %s", linkNames(rootLinks), linkNames(got))
	}
	if got := ipOut(t, "-4", "route", "show", "table", "all"); got != rootRoutes {
		t.Errorf("root namespace routes changed:\nbefore %s\nafter  %s", rootRoutes, got)
	}
	if strings.Contains(ipOut(t, "-4", "addr", "show"), n.subnet) {
		t.Error("root namespace has an address in the test subnet")
	}
}

func linkNames(out string) string {
	var names []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}

func ipOut(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

func TestCleanup(t *testing.T) {
	t.Parallel()
	if err := Available(); err != nil {
		t.Skip(err)
	}
	// A namespace left by a test process that died is swept by New.
	pidMax, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatal(err)
	}
	pidMaxN, _ := strconv.Atoi(strings.TrimSpace(string(pidMax)))
	stale := fmt.Sprintf("%s%d-dead-x", Prefix, pidMaxN+1)
	if err := ip("netns", "add", stale); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ip("netns", "del", stale) })

	var tag string
	t.Run("skipped-halfway", func(t *testing.T) {
		n := New(t, "x", "y", "z")
		tag = n.tag
		if got := countTag(tag); got != 4 {
			t.Fatalf("%d namespaces of %s, want 4", got, tag)
		}
		// Cleanup runs however the test ends (SkipNow and FailNow both
		// leave through runtime.Goexit).
		t.SkipNow()
	})
	if got := countTag(tag); got != 0 {
		t.Fatalf("%d namespaces of %s left after the test: %v", got, tag, List())
	}
	for _, ns := range List() {
		if ns == stale {
			t.Fatalf("stale namespace %s not swept", stale)
		}
	}
}

func countTag(tag string) int {
	k := 0
	for _, ns := range List() {
		if strings.HasPrefix(ns, tag+"-") {
			k++
		}
	}
	return k
}

func TestBadNames(t *testing.T) {
	for _, names := range [][]string{nil, {"a", "a"}, {"a/b"}, {"mid"}, {strings.Repeat("x", 21)}, {"-a"}} {
		if _, err := plan(names); err == nil {
			t.Errorf("plan(%q) accepted", names)
		}
	}
}

func testDrop(t *testing.T, n *Net) {
	addr := listenEcho(t, n, "a", 7000)
	c := dial(t, n, "b", addr)
	if err := roundTrip(c, []byte("before"), 2*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := n.Drop("b", 1); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c, []byte("dropped"), 500*time.Millisecond); !isTimeout(err) {
		t.Fatalf("echo with every packet dropped at b: %v, want a timeout", err)
	}
	if d, err := n.Dropped("b"); err != nil || d == 0 {
		t.Fatalf("Dropped(b) = %d, %v; want > 0", d, err)
	}
	if err := n.Drop("b", 0); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len("dropped"))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "dropped" {
		t.Fatalf("after the drops stopped: %q %v", got, err)
	}
	if d, _ := n.Dropped("b"); d != 0 {
		t.Fatalf("Dropped(b) = %d with no rule", d)
	}

	// Random loss both ways: TCP still delivers everything, intact.
	for _, name := range []string{"a", "b"} {
		if err := n.Drop(name, 0.1); err != nil {
			t.Fatal(err)
		}
	}
	if err := roundTrip(c, random(t, 128<<10), 15*time.Second); err != nil {
		t.Fatalf("echo under 10%% loss: %v", err)
	}
	da, _ := n.Dropped("a")
	db, _ := n.Dropped("b")
	if da+db == 0 {
		t.Fatal("10% loss dropped nothing")
	}
	t.Logf("packets dropped under 10%% loss: a %d, b %d", da, db)
	if err := n.Drop("a", 1.5); err == nil {
		t.Fatal("drop probability 1.5 accepted")
	}
}

func TestDrop(t *testing.T) {
	t.Parallel()
	n := New(t, "a", "b")
	if _, err := n.firewall(); errors.Is(err, ErrNoFirewall) {
		t.Skip("skipping: nft and iptables not installed (.ci/run: apt-get install --no-install-recommends nftables)")
	}
	t.Logf("dropping with %s", n.fw)
	testDrop(t, n)
}

func TestDropIptables(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("skipping: iptables not installed")
	}
	n := New(t, "a", "b")
	n.fw = "iptables"
	testDrop(t, n)
}

// TestProxyAcrossNamespaces puts a faultproxy in node a between a client
// in c and a server in b: the set-up for agents on separate nodes with
// faults on the path.
func TestProxyAcrossNamespaces(t *testing.T) {
	t.Parallel()
	n := New(t, "a", "b", "c")
	target := listenEcho(t, n, "b", 7000)
	ln, err := n.Listen("a", "tcp", n.HostPort("a", 7100))
	if err != nil {
		t.Fatal(err)
	}
	p := faultproxy.Serve(ln, target, faultproxy.WithDialer(n.DialContext("a")))
	t.Cleanup(func() { p.Close() })

	c := dial(t, n, "c", p.Addr())
	if err := roundTrip(c, random(t, 64<<10), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p.ResetAll()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after ResetAll: %v, want ECONNRESET", err)
	}
	if st := p.Stats(); st.BytesUp != 64<<10 || st.Resets != 1 {
		t.Fatalf("stats %+v", st)
	}
}
