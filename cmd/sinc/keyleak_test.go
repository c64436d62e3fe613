package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/link"
)

// TestNoKeyInAnyOutput runs agents built with the test-only key hook
// through a busy end-to-end session — channels of both kinds, across nodes
// and partitions, refusals, every CLI view — collects everything the agents
// and the CLI print, and searches it for every key the agents held, in every
// common encoding.
func TestNoKeyInAnyOutput(t *testing.T) {
	hookBin := filepath.Join(filepath.Dir(bin), "sinc-keyhook")
	if out, err := exec.Command("go", "build", "-tags", "sinctest", "-o", hookBin, ".").CombinedOutput(); err != nil {
		t.Fatalf("building the test binary: %v\n%s", err, out)
	}
	dir := shortTemp(t)
	var metricsAddrs []string // the metrics of each agent are searched too
	for range 2 {
		port, err := cluster.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		metricsAddrs = append(metricsAddrs, fmt.Sprintf("127.0.0.1:%d", port))
	}
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"}, Top: fmt.Sprintf("metrics = %q", metricsAddrs[0]),
			Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"*/*/*\"\n"},
		{Name: "node-b", Partitions: []string{"db"}, Top: fmt.Sprintf("metrics = %q", metricsAddrs[1]),
			Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/*\"\n"},
	}, cluster.Timers{Keepalive: "200ms", DeadAfter: "1s", DialMin: "50ms", DialMax: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	keylog := filepath.Join(dir, "keys.log")
	var logs []string
	var procs []*cluster.Process
	for _, name := range c.Names() {
		p, err := cluster.StartWith(hookBin, c.Nodes[name], []string{"SINC_TEST_KEYLOG=" + keylog}, "--log-level", "debug")
		if err != nil {
			t.Fatal(err)
		}
		defer p.Kill()
		procs = append(procs, p)
		logs = append(logs, p.Log)
	}
	a, b := c.Nodes["node-a"], c.Nodes["node-b"]
	waitState(t, a, "node-b", "up", 10*time.Second)

	var emitted bytes.Buffer
	emit := &syncWriter{w: &emitted}
	run := func(stdin string, args ...string) {
		cmd := exec.Command(hookBin, args...)
		cmd.Stdin = strings.NewReader(stdin)
		cmd.Stdout, cmd.Stderr = emit, emit
		cmd.Run()
	}
	var listeners []*exec.Cmd
	for _, sock := range []string{b.Partitions["db"], a.Partitions["batch"]} {
		l := exec.Command(hookBin, "listen", "echo", "--socket", sock, "--exec", "cat")
		l.Stdout, l.Stderr = emit, emit
		if err := l.Start(); err != nil {
			t.Fatal(err)
		}
		defer l.Process.Kill()
		listeners = append(listeners, l)
	}
	time.Sleep(300 * time.Millisecond) // the listeners register
	var big strings.Builder
	for i := range 2000 {
		big.WriteString(strings.Repeat(string(rune('a'+i%26)), 50) + "\n")
	}
	for range 3 {
		run(big.String(), "dial", "node-b/db/echo", "--socket", a.Partitions["web"])
		run(big.String(), "dial", "node-b/db/echo", "--message", "--socket", a.Partitions["web"])
		run("same node\n", "dial", "node-a/batch/echo", "--socket", a.Partitions["web"])
	}
	run("x", "dial", "node-b/db/echo", "--socket", a.Partitions["batch"]) // denied
	run("x", "dial", "node-b/db/none", "--socket", a.Partitions["web"])   // no such service
	run("x", "dial", "node-z/db/echo", "--socket", a.Partitions["web"])   // no such node
	for _, n := range []*cluster.Node{a, b} {
		run("", "peers", "--admin", n.Admin)
		run("", "peers", "--admin", n.Admin, "--json")
		run("", "conns", "--admin", n.Admin, "--json")
		run("", "stats", "--admin", n.Admin, "--json")
		run("", "cert", "show", filepath.Join(n.Dir, n.Name+".crt"))
	}
	run("", "conns", "--socket", a.Partitions["web"], "--json")
	for _, addr := range metricsAddrs {
		emit.Write([]byte(scrapeMetrics(t, addr).raw))
	}
	for _, l := range listeners {
		l.Process.Signal(os.Interrupt)
		l.Wait()
	}
	for _, p := range procs {
		if err := p.Stop(5 * time.Second); err != nil {
			t.Errorf("agent %s: %v", p.Node.Name, err)
		}
	}

	// Every key the agents held, and the private keys on disk.
	keys := map[string][]byte{}
	f, err := os.Open(keylog)
	if err != nil {
		t.Fatalf("the key hook wrote nothing: %v", err)
	}
	sc := bufio.NewScanner(f)
	channelKeys := 0
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		what, hx := line[:max(i, 0)], line[i+1:]
		k, err := hex.DecodeString(hx)
		if err != nil || len(k) != 32 {
			t.Fatalf("key log line %q", line)
		}
		keys[what+" "+hx[:8]] = k
		if strings.HasPrefix(what, "channel") {
			channelKeys++
		}
	}
	f.Close()
	for _, p := range []string{filepath.Join(c.CADir, "ca.key"), filepath.Join(a.Dir, "node-a.key"), filepath.Join(b.Dir, "node-b.key")} {
		data, _ := os.ReadFile(p)
		blk, _ := pem.Decode(data)
		keys[p] = blk.Bytes
	}
	if channelKeys < 20 {
		t.Fatalf("only %d channel keys seen: the session did not exercise the key path", channelKeys)
	}

	var all bytes.Buffer
	all.Write(emitted.Bytes())
	for _, p := range logs {
		b, _ := os.ReadFile(p)
		all.Write(b)
	}
	if all.Len() < 10000 || !strings.Contains(all.String(), "denied") || !strings.Contains(all.String(), "level=DEBUG") {
		t.Fatalf("collected output looks incomplete (%d bytes)", all.Len())
	}
	hay := all.Bytes()
	lower := bytes.ToLower(hay)
	for name, k := range keys {
		for enc, needle := range map[string][]byte{
			"raw":       k,
			"hex":       []byte(hex.EncodeToString(k)),
			"hex half":  []byte(hex.EncodeToString(k[:12])),
			"base64":    []byte(base64.StdEncoding.EncodeToString(k)[:40]),
			"base64url": []byte(base64.RawURLEncoding.EncodeToString(k)[:40]),
		} {
			h := hay
			if strings.HasPrefix(enc, "hex") {
				h = lower
			}
			if bytes.Contains(h, needle) {
				t.Errorf("key %q appears (%s) in what the agents or the CLI printed", name, enc)
			}
		}
	}
	t.Logf("searched %d bytes of output for %d keys (%d channel keys)", all.Len(), len(keys), channelKeys)
}

// syncWriter serializes writes from several processes' pipes.
type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// holdKeyMain runs as the control process of TestNodeKeyNotInAgentMemory:
// it loads a node key the ordinary way, into a crypto/ecdh key on its
// heap, says so, and waits for its stdin to close.
func holdKeyMain(path string) {
	k, err := cert.LoadNodeKey(path)
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	fmt.Println("holding")
	io.Copy(io.Discard, os.Stdin)
	runtime.KeepAlive(k)
}

func init() {
	// The test binary doubles as the control process (before TestMain,
	// which is another file's).
	if p := os.Getenv("SINC_TEST_HOLDKEY"); p != "" {
		holdKeyMain(p)
		os.Exit(0)
	}
}

// scanMemory counts the occurrences of each needle in every readable
// private mapping of process pid (/proc/PID/maps and /proc/PID/mem: root,
// or CAP_SYS_PTRACE, reads a non-dumpable process too). Shared mappings
// — memfd_secret memory among them, which the kernel will not read for
// anyone — are not scanned. It returns the counts and the bytes scanned.
func scanMemory(t *testing.T, pid int, needles ...[]byte) (counts []int, scanned int64) {
	t.Helper()
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	counts = make([]int, len(needles))
	const chunk = 1 << 20
	buf := make([]byte, chunk+64)
	for _, line := range strings.Split(strings.TrimSpace(string(maps)), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[1][0] != 'r' || f[1][3] != 'p' || (len(f) >= 6 && strings.HasPrefix(f[5], "[v")) {
			continue // unreadable, shared, or the vDSO's kernel pages
		}
		lo, hi, _ := strings.Cut(f[0], "-")
		start, _ := strconv.ParseUint(lo, 16, 64)
		end, _ := strconv.ParseUint(hi, 16, 64)
		// Chunks overlap by 63 bytes, so a needle across a boundary is
		// seen once: a match is counted only if it starts in the chunk.
		for off := start; off < end; off += chunk {
			n := min(chunk+63, int(end-off))
			got, err := mem.ReadAt(buf[:n], int64(off))
			if err != nil && got == 0 {
				continue // a hole the kernel will not read (guard pages)
			}
			scanned += int64(min(got, chunk))
			for i, nd := range needles {
				b := buf[:got]
				for {
					j := bytes.Index(b, nd)
					if j < 0 || int64(got-len(b)+j) >= chunk {
						break
					}
					counts[i]++
					b = b[j+1:]
				}
			}
		}
	}
	return counts, scanned
}

// cutAfterWrite is a connection that fails every read: a handshake dialed
// on it sends message 1 and gives up.
type cutAfterWrite struct{ net.Conn }

func (cutAfterWrite) Read([]byte) (int, error) { return 0, errors.New("test: message 1 only") }

// TestNodeKeyNotInAgentMemory makes some 300 handshakes with a real agent
// — full ones with the agent dialing and with it accepting, message 1s
// with a valid mac1 and nothing after (the agent answers with message 2,
// its own key at work), message 1s with a bad one — and then searches all
// of the agent's readable private memory, as root, for its X25519 private
// key: raw and in its file's base64. The key's one copy is in memfd_secret
// memory, which no one reads, so none may be found. A control process
// holding the same key in a crypto/ecdh key shows the scan finds a key on
// a heap.
func TestNodeKeyNotInAgentMemory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("reading another process's memory needs root (CAP_SYS_PTRACE): run as root, as CI does")
	}
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}},
		{Name: "node-b", Partitions: []string{"db"}},
	}, cluster.Timers{Handshake: "2s", Keepalive: "200ms", DeadAfter: "1s", DialMin: "5ms", DialMax: "20ms"})
	if err != nil {
		t.Fatal(err)
	}
	a, b := c.Nodes["node-a"], c.Nodes["node-b"]
	agentBin := bin
	if p := os.Getenv("SINC_TEST_AGENT_BIN"); p != "" {
		agentBin = p // another build's agent, to measure it
	}
	proc, err := cluster.Start(agentBin, a)
	if err != nil {
		t.Fatal(err)
	}
	defer proc.Kill()
	if err := waitAgent(a); err != nil {
		t.Fatal(err)
	}
	_, aKeyPath := cert.NodeFiles(a.Dir, a.Name)
	key := keyBytes(t, aKeyPath)
	b64 := []byte(base64.StdEncoding.EncodeToString(key))

	// The test plays node-b, with node-b's real identity.
	caCert, err := cert.LoadCertificate(filepath.Join(c.CADir, cert.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	verifier, err := cert.NewVerifier(caCert, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	bCertPath, bKeyPath := cert.NodeFiles(b.Dir, b.Name)
	bCert, err := cert.LoadCertificate(bCertPath)
	if err != nil {
		t.Fatal(err)
	}
	bKey, err := cert.LoadNodeKey(bKeyPath)
	if err != nil {
		t.Fatal(err)
	}
	priv, pub := link.KeyPair(bKey)
	asB := &link.Config{Private: priv, Public: pub, Cert: bCert, Verifier: verifier,
		Instance: link.NewInstance(), HandshakeTimeout: 2 * time.Second}

	// 1. node-a dials node-b (here) and links; the link is closed at once
	// and node-a dials again.
	const rounds = 60
	ln, err := net.Listen("tcp", b.Listen)
	if err != nil {
		t.Fatal(err)
	}
	dialed := 0
	for dialed < rounds {
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		conn, err := ln.Accept()
		if err != nil {
			t.Fatalf("node-a dialed %d times, then: %v", dialed, err)
		}
		if l, err := link.Accept(conn, asB); err == nil {
			if l.Confirm() == nil {
				dialed++
			}
			l.Shutdown("test: next")
		}
	}
	ln.Close()
	// 2. node-b dials node-a and links.
	accepted := 0
	for range rounds {
		conn, err := net.Dial("tcp", a.Listen)
		if err != nil {
			t.Fatal(err)
		}
		if l, err := link.Dial(conn, asB, "node-a"); err == nil {
			accepted++
			l.Shutdown("test: next")
		}
	}
	// 3. message 1 with a valid mac1, and nothing after: node-a answers
	// with message 2 (its static key at work) and waits in vain.
	for range 100 {
		conn, err := net.Dial("tcp", a.Listen)
		if err != nil {
			t.Fatal(err)
		}
		link.Dial(cutAfterWrite{conn}, asB, "node-a")
	}
	// 4. message 1 with a made-up mac1.
	for range 50 {
		conn, err := net.Dial("tcp", a.Listen)
		if err != nil {
			t.Fatal(err)
		}
		m := make([]byte, 2+48)
		m[1] = 48
		rand.Read(m[2:])
		conn.Write(m)
		conn.Close()
	}
	if accepted < rounds/2 {
		t.Fatalf("only %d of %d handshakes dialed to node-a linked", accepted, rounds)
	}
	time.Sleep(300 * time.Millisecond) // the last handshakes end

	// The scan, with the agent stopped so that it holds still.
	pid := proc.Cmd.Process.Pid
	syscall.Kill(pid, syscall.SIGSTOP)
	counts, scanned := scanMemory(t, pid, key, b64)
	syscall.Kill(pid, syscall.SIGCONT)
	logText, _ := os.ReadFile(proc.Log)
	t.Logf("agent: %d full handshakes dialed, %d accepted, 100 with message 1 only, 50 with a bad mac1; "+
		"scanned %d MiB: the private key %d times raw, %d times in base64",
		dialed, accepted, scanned>>20, counts[0], counts[1])
	switch {
	case bytes.Contains(logText, []byte("key_memory=memfd_secret")):
		if counts[0] != 0 || counts[1] != 0 {
			t.Errorf("the node's private key is in the agent's memory outside memfd_secret: %d copies raw, %d in base64", counts[0], counts[1])
		}
	case bytes.Contains(logText, []byte("key_memory=mlock+dontdump")):
		// The key's slot is a private mapping here, scanned with the rest.
		if counts[0] > 1 || counts[1] != 0 {
			t.Errorf("the node's private key is in the agent's memory %d times raw (its locked slot is one), %d in base64", counts[0], counts[1])
		}
	default:
		t.Fatalf("the agent's log does not say how it keeps keys:\n%s", logText)
	}

	// The control: the scan finds the key in a process that holds it on
	// its heap.
	ctl := exec.Command(testBin(t), "-test.run=^$")
	ctl.Env = append(os.Environ(), "SINC_TEST_HOLDKEY="+aKeyPath)
	in, _ := ctl.StdinPipe()
	out, _ := ctl.StdoutPipe()
	if err := ctl.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); ctl.Wait() }()
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "holding\n" {
		t.Fatalf("control process: %q", line)
	}
	ctlCounts, _ := scanMemory(t, ctl.Process.Pid, key, b64)
	t.Logf("control: the private key %d times raw, %d times in base64", ctlCounts[0], ctlCounts[1])
	if ctlCounts[0] == 0 {
		t.Fatal("the scan did not find the key in a process holding it on its heap: it proves nothing")
	}
}
