package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/registry"
)

// A fleet is many agents of one cluster running in this process, each as a
// real agent would run: its own peer listener on loopback, partition and
// admin sockets, state folder and etcd client, its config read from a
// file. The scale test (scale_test.go) runs one or two fleets against a
// real etcd.
//
// Each node listens on a loopback address of its own, 127.1.X.Y (all of
// 127/8 is loopback on Linux). Connections to those addresses leave from
// 127.0.0.1, so a free port picked on 127.1.X.Y cannot be taken in the
// meantime by one of the thousands of outgoing connections the fleet and
// its etcd clients make, as a port picked on 127.0.0.1 could.
//
// Every agent logs at Warn and above into one bounded ring (fleetLog),
// shown when the test fails: a thousand agents at Debug would log
// hundreds of megabytes.

// fleet is the agents of one cluster.
type fleet struct {
	dir   string
	caDir string
	nodes []*fleetNode
	log   *fleetLog
	level slog.Level // of the agents' logs
}

// fleetNode is one node of a fleet: its files, and its agent once started.
type fleetNode struct {
	name   string
	config string
	socket string // partition p1
	a      *Agent
	cancel context.CancelFunc
	done   chan error // Run's result
}

// scaleLimits keep an agent small enough for a thousand in one process:
// 32 channels take one page of locked memory for keys (secret.Arena), and
// the whole process may lock RLIMIT_MEMLOCK (8 MiB here: about 2,000
// agents).
const scaleChannels = 32

// layoutFleet makes a CA and n nodes in dir, each with a config naming
// the etcd endpoints and key prefix as its registry, and the limits above;
// extra is added to the [registry] table.
func layoutFleet(dir string, n int, endpoints []string, prefix, extra string) (*fleet, error) {
	now := time.Now()
	f := &fleet{dir: dir, caDir: filepath.Join(dir, "ca"), log: newFleetLog(200), level: slog.LevelWarn}
	if _, err := cert.InitCA(f.caDir, "scale-ca", cert.DefaultCAValidity, now); err != nil {
		return nil, err
	}
	eps := make([]string, len(endpoints))
	for i, e := range endpoints {
		eps[i] = fmt.Sprintf("%q", e)
	}
	for i := range n {
		name := fmt.Sprintf("n%04d", i)
		ndir := filepath.Join(dir, name)
		if _, err := cert.SignNode(f.caDir, ndir, cert.NodeRequest{Node: name, Partitions: []string{"p1"}, ValidFor: 24 * time.Hour}, now); err != nil {
			return nil, err
		}
		listen, err := fleetAddress(i)
		if err != nil {
			return nil, err
		}
		certPath, keyPath := cert.NodeFiles(ndir, name)
		fn := &fleetNode{name: name, config: filepath.Join(ndir, "agent.toml"), socket: filepath.Join(ndir, "p1.sock")}
		body := fmt.Sprintf(`node = %q
cert = %q
key = %q
ca = %q
listen = %q
admin = %q

[limits]
channels = %d

[partitions.p1]
socket = %q

[registry]
etcd = [%s]
prefix = %q
%s
`, name, certPath, keyPath, filepath.Join(f.caDir, cert.CACertFile), listen, filepath.Join(ndir, "admin", "admin.sock"),
			scaleChannels, fn.socket, strings.Join(eps, ", "), prefix, extra)
		if err := os.WriteFile(fn.config, []byte(body), 0o600); err != nil {
			return nil, err
		}
		f.nodes = append(f.nodes, fn)
	}
	return f, nil
}

// fleetAddress is node i's peer address: a port free a moment ago on a
// loopback address of its own.
func fleetAddress(i int) (string, error) {
	ip := fmt.Sprintf("127.1.%d.%d", i/250, i%250+1)
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// start starts the agents of every node, workers at a time, and returns
// when Run was called for each. The agents find each other through the
// registry, each after its own start jitter (registryJitter).
func (f *fleet) start(workers int) error {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	next := make(chan *fleetNode)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range next {
				if err := f.startNode(n); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}()
	}
	for _, n := range f.nodes {
		next <- n
	}
	close(next)
	wg.Wait()
	if len(errs) > 0 {
		return fmt.Errorf("%d agents did not start, the first: %w", len(errs), errs[0])
	}
	return nil
}

func (f *fleet) startNode(n *fleetNode) error {
	cfg, err := config.Load(n.config)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(f.log, &slog.HandlerOptions{Level: f.level}))
	a, err := New(cfg, log)
	if err != nil {
		return fmt.Errorf("agent %s: %w", n.name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.a, n.cancel, n.done = a, cancel, make(chan error, 1)
	go func() { n.done <- a.Run(ctx) }()
	return nil
}

// allowEverything signs a cluster policy that allows every channel with
// f's CA, and puts it in etcd under prefix, as `sinc ca policy` would.
func (f *fleet) allowEverything(cli *clientv3.Client, prefix string) error {
	doc, err := cert.SignPolicy(f.caDir, []byte("[[allow]]\nfrom = \"*/*\"\nto = \"*/*/*\"\n"), 0, time.Now())
	if err != nil {
		return err
	}
	keys, err := registry.NewLayout(prefix)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = cli.Put(ctx, keys.Policy(), string(doc.EncodePEM()))
	return err
}

// hasPolicy reports whether n's agent has a cluster policy in force.
func (n *fleetNode) hasPolicy() bool {
	n.a.pol.mu.Lock()
	defer n.a.pol.mu.Unlock()
	return n.a.pol.doc != nil
}

// stop stops every agent at once and waits for them (each revokes its
// lease on the way out).
func (f *fleet) stop(t testing.TB) {
	for _, n := range f.nodes {
		if n.cancel != nil {
			n.cancel()
		}
	}
	deadline := time.After(60 * time.Second)
	for _, n := range f.nodes {
		if n.done == nil {
			continue
		}
		select {
		case err := <-n.done:
			if err != nil {
				t.Errorf("agent %s: %v", n.name, err)
			}
			n.cancel, n.done = nil, nil
		case <-deadline:
			t.Errorf("agent %s did not stop within a minute of the fleet's stop", n.name)
			return
		}
	}
}

// sees returns how many nodes n's registry holds.
func (n *fleetNode) sees() int { return n.a.reg.Status().Nodes }

// revocationSerial is the serial of the revocation list in force in n.
func (n *fleetNode) revocationSerial() uint64 {
	if r := n.a.revoked.Load(); r != nil {
		return r.Serial
	}
	return 0
}

// linked reports whether n's agent has a peer entry (a link, or one being
// made) for node.
func (n *fleetNode) linked(node string) bool {
	n.a.mu.Lock()
	defer n.a.mu.Unlock()
	return n.a.peers[node] != nil
}

// fleetLog keeps the last lines the fleet's agents logged, and counts
// them all.
type fleetLog struct {
	mu    sync.Mutex
	lines []string
	next  int
	total int
}

func newFleetLog(keep int) *fleetLog { return &fleetLog{lines: make([]string, 0, keep)} }

func (l *fleetLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	line := strings.TrimRight(string(p), "\n")
	if len(l.lines) < cap(l.lines) {
		l.lines = append(l.lines, line)
	} else {
		l.lines[l.next] = line
		l.next = (l.next + 1) % len(l.lines)
	}
	l.total++
	return len(p), nil
}

// String returns the lines kept, oldest first.
func (l *fleetLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append(append([]string(nil), l.lines[l.next:]...), l.lines[:l.next]...)
	return fmt.Sprintf("%d lines logged at Warn or above, the last %d:\n%s", l.total, len(out), strings.Join(out, "\n"))
}

func (l *fleetLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}

// checkRunning fails the test if an agent of f has stopped.
func (f *fleet) checkRunning(t *testing.T) {
	for _, nd := range f.nodes {
		select {
		case err := <-nd.done:
			nd.done <- err
			t.Fatalf("agent %s stopped: %v\n%s", nd.name, err, f.log)
		default:
		}
	}
}
