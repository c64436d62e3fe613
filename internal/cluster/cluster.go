// Package cluster lays out and runs a local sinc cluster on loopback: a CA,
// node certificates, agent configs and agent processes. `sinc demo` and the
// end-to-end tests are built on it.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cert"
)

// NodeSpec describes one node of a local cluster.
type NodeSpec struct {
	Name       string
	Partitions []string
	// Extra is TOML appended to the node's config: policy rules, limits,
	// partition socket modes.
	Extra string
	// Top is TOML put before the config's first table: keys of the top
	// level, such as metrics or log_format.
	Top string
	// PartitionExtra is TOML added to a partition's table (mode, owner…).
	PartitionExtra map[string]string
	// Listen, if set, is the node's peer address (host:port) instead of a
	// free loopback port: an address inside a network namespace, say.
	Listen string
	// Exec, if set, prefixes the agent's command line, e.g.
	// ip netns exec NAME (which replaces itself with the agent).
	Exec []string
	// NoPeers leaves [peers] out of the config: the nodes come from a
	// registry (a [registry] table in Extra).
	NoPeers bool
}

// Timers overrides the agents' timers (empty fields keep the defaults).
type Timers struct {
	Handshake, Keepalive, DeadAfter, DialMin, DialMax, Open, Request, Grace, Rekey, Rotate, LinkIdle string
}

// Cluster is a laid-out local cluster.
type Cluster struct {
	Dir   string
	CADir string
	Nodes map[string]*Node
	order []string
}

// Node is one node's files and addresses.
type Node struct {
	Spec       NodeSpec
	Name       string
	Dir        string
	Config     string
	Admin      string
	Listen     string
	Partitions map[string]string // name → socket path
}

// Make lays out a cluster in dir (which must exist): a CA, and for each
// node a certificate, a key and an agent config naming every other node as
// a peer on a free loopback port.
func Make(dir string, specs []NodeSpec, timers Timers) (*Cluster, error) {
	now := time.Now()
	c := &Cluster{Dir: dir, CADir: filepath.Join(dir, "ca"), Nodes: map[string]*Node{}}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	if _, err := cert.InitCA(c.CADir, "sinc-local-ca", cert.DefaultCAValidity, now); err != nil {
		return nil, err
	}
	for _, s := range specs {
		n := &Node{Spec: s, Name: s.Name, Dir: filepath.Join(dir, s.Name), Partitions: map[string]string{}}
		if _, err := cert.SignNode(c.CADir, n.Dir, cert.NodeRequest{Node: s.Name, Partitions: s.Partitions, ValidFor: 24 * time.Hour}, now); err != nil {
			return nil, err
		}
		if n.Listen = s.Listen; n.Listen == "" {
			port, err := FreePort()
			if err != nil {
				return nil, err
			}
			n.Listen = fmt.Sprintf("127.0.0.1:%d", port)
		}
		n.Admin = filepath.Join(n.Dir, "run", "admin.sock")
		for _, p := range s.Partitions {
			n.Partitions[p] = filepath.Join(n.Dir, "part", p+".sock")
		}
		// Processes of other users must reach the partition sockets: the
		// folders on the way are searchable (the keys in them stay 0600).
		if err := os.Chmod(n.Dir, 0o755); err != nil {
			return nil, err
		}
		n.Config = filepath.Join(n.Dir, "agent.toml")
		c.Nodes[s.Name] = n
		c.order = append(c.order, s.Name)
	}
	for _, name := range c.order {
		if err := c.writeConfig(c.Nodes[name], timers); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *Cluster) writeConfig(n *Node, t Timers) error {
	var b strings.Builder
	certPath, keyPath := cert.NodeFiles(n.Dir, n.Name)
	fmt.Fprintf(&b, "node = %q\ncert = %q\nkey = %q\nca = %q\nlisten = %q\nadmin = %q\n",
		n.Name, certPath, keyPath, filepath.Join(c.CADir, cert.CACertFile), n.Listen, n.Admin)
	b.WriteString(n.Spec.Top + "\n")
	b.WriteString("\n[timers]\n")
	for _, kv := range [][2]string{{"handshake", t.Handshake}, {"keepalive", t.Keepalive},
		{"dead_after", t.DeadAfter}, {"dial_min", t.DialMin}, {"dial_max", t.DialMax},
		{"open", t.Open}, {"request", t.Request}, {"grace", t.Grace},
		{"rekey", t.Rekey}, {"rotate", t.Rotate}, {"link_idle", t.LinkIdle}} {
		if kv[1] != "" {
			fmt.Fprintf(&b, "%s = %q\n", kv[0], kv[1])
		}
	}
	for _, p := range n.Spec.Partitions {
		fmt.Fprintf(&b, "\n[partitions.%s]\nsocket = %q\n%s\n", p, n.Partitions[p], n.Spec.PartitionExtra[p])
	}
	for _, other := range c.order {
		if other != n.Name && !n.Spec.NoPeers {
			fmt.Fprintf(&b, "\n[peers.%s]\naddress = %q\n", other, c.Nodes[other].Listen)
		}
	}
	b.WriteString("\n" + n.Spec.Extra + "\n")
	return os.WriteFile(n.Config, []byte(b.String()), 0o600)
}

// Names returns the node names in the order they were given.
func (c *Cluster) Names() []string { return append([]string(nil), c.order...) }

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Process is an agent running as a child process.
type Process struct {
	Node *Node
	Cmd  *exec.Cmd
	Log  string // path of the agent's log file
	done chan struct{}
	err  error
}

// Start runs `bin agent --config` for node n, logging to a file in its dir.
func Start(bin string, n *Node) (*Process, error) { return StartWith(bin, n, nil) }

// StartWith is Start with extra environment variables and agent flags.
func StartWith(bin string, n *Node, env []string, args ...string) (*Process, error) {
	logPath := filepath.Join(n.Dir, "agent.log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	argv := append(append(append([]string{}, n.Spec.Exec...), bin, "agent", "--config", n.Config), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Process{Node: n, Cmd: cmd, Log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Stop sends SIGTERM and waits up to timeout for a clean exit, then kills.
// It returns the exit error (nil for a clean exit).
func (p *Process) Stop(timeout time.Duration) error {
	p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.Cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("agent %s did not stop within %s after SIGTERM", p.Node.Name, timeout)
	}
}

// Kill kills the process with SIGKILL and waits for it.
func (p *Process) Kill() {
	p.Cmd.Process.Kill()
	<-p.done
}

// WaitPeer polls the admin socket of n until its row for peer is in state,
// or ctx ends.
func WaitPeer(ctx context.Context, n *Node, peer, state string) (*admin.PeerRow, error) {
	var last error
	for {
		resp, err := admin.Query(ctx, n.Admin, admin.Request{Op: "peers"})
		if err == nil {
			last = fmt.Errorf("peer %s of %s not listed", peer, n.Name)
			for _, r := range resp.Peers {
				if r.Peer == peer {
					if r.State == state {
						return &r, nil
					}
					last = fmt.Errorf("peer %s of %s is %s (last error: %s)", peer, n.Name, r.State, r.LastError)
				}
			}
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, errors.Join(ctx.Err(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
