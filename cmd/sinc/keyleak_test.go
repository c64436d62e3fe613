package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
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
	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"},
			Extra: "[[allow]]\nfrom = \"node-a/web\"\nto = \"*/*/*\"\n"},
		{Name: "node-b", Partitions: []string{"db"},
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
