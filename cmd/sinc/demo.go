package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
)

// The demo cluster: two nodes, two partitions each. node-a's policy lets
// node-a/web reach the echo services of node-b/db and of node-a/batch (a
// channel between two partitions of one node), and lets node-a/batch try
// node-b/db; node-b's policy admits only node-a/web, so node-b refuses
// node-a/batch. Nothing allows node-a/batch → node-b/cache: node-a itself
// refuses it.
var demoNodes = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"web", "batch"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/echo"

[[allow]]
from = "node-a/web"
to = "node-a/batch/echo"

[[allow]]
from = "node-a/batch"
to = "node-b/db/echo"
`},
	{Name: "node-b", Partitions: []string{"db", "cache"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/echo"
`},
}

func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", stderr)
	keep := fs.Bool("keep", false, "keep the demo's folder (certificates, configs, logs) instead of removing it")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "sinc-demo-")
	if err != nil {
		return err
	}
	if *keep {
		fmt.Fprintf(stdout, "demo folder: %s (kept)\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	say := func(format string, a ...any) { fmt.Fprintf(stdout, "\n== "+format+"\n", a...) }

	c, err := cluster.Make(dir, demoNodes, cluster.Timers{Keepalive: "1s", DeadAfter: "3s"})
	if err != nil {
		return err
	}
	say("made a cluster CA and node certificates: node-a (web, batch), node-b (db, cache)")

	var procs []*cluster.Process
	var helpers []*exec.Cmd
	defer func() {
		for _, h := range helpers {
			h.Process.Kill()
			h.Wait()
		}
		for _, p := range procs {
			p.Stop(5 * time.Second)
		}
	}()
	for _, name := range c.Names() {
		p, err := cluster.Start(bin, c.Nodes[name])
		if err != nil {
			return err
		}
		procs = append(procs, p)
		fmt.Fprintf(stdout, "started agent %s (pid %d) on %s\n", name, p.Cmd.Process.Pid, c.Nodes[name].Listen)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, pair := range [][2]string{{"node-a", "node-b"}, {"node-b", "node-a"}} {
		if _, err := cluster.WaitPeer(ctx, c.Nodes[pair[0]], pair[1], "up"); err != nil {
			return fmt.Errorf("link %s→%s did not come up: %w (run with --keep for the logs)", pair[0], pair[1], err)
		}
	}
	say("the agents authenticated each other (Noise_XX, CA-signed certificates); their link is up")
	if err := printAdmin(ctx, stdout, c.Nodes["node-a"].Admin, "peers"); err != nil {
		return err
	}

	a, b := c.Nodes["node-a"], c.Nodes["node-b"]
	for _, sock := range []string{b.Partitions["db"], a.Partitions["batch"]} {
		h := exec.Command(bin, "listen", "echo", "--socket", sock, "--exec", "cat")
		h.Stderr = io.Discard
		if err := h.Start(); err != nil {
			return err
		}
		helpers = append(helpers, h)
	}
	for _, addr := range []string{"node-b/db/echo", "node-a/batch/echo"} {
		if err := waitService(ctx, bin, a.Partitions["web"], addr); err != nil {
			return err
		}
	}
	say("echo services listen on node-b/db/echo and node-a/batch/echo (sinc listen echo --exec cat)")

	// Hold one channel open across nodes while the tables are printed.
	held := exec.Command(bin, "dial", "node-b/db/echo", "--socket", a.Partitions["web"])
	in, _ := held.StdinPipe()
	out, _ := held.StdoutPipe()
	held.Stderr = stderr
	if err := held.Start(); err != nil {
		return err
	}
	helpers = append(helpers, held)
	fmt.Fprintln(in, "hello from node-a/web to node-b/db")
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		return fmt.Errorf("echo across nodes: %w", err)
	}
	say("across nodes: node-a/web → node-b/db/echo")
	fmt.Fprintf(stdout, "sent: hello from node-a/web to node-b/db\necho: %s", line)

	cmd := exec.Command(bin, "dial", "node-a/batch/echo", "--socket", a.Partitions["web"])
	cmd.Stdin = strings.NewReader("hello from node-a/web to node-a/batch\n")
	got, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("echo across partitions: %w", err)
	}
	say("across partitions of one node: node-a/web → node-a/batch/echo (same checks, no network)")
	fmt.Fprintf(stdout, "sent: hello from node-a/web to node-a/batch\necho: %s", got)

	say("connection tables while the node-a/web → node-b/db channel is open (sinc conns --admin)")
	for _, n := range []*cluster.Node{a, b} {
		if err := printAdmin(ctx, stdout, n.Admin, "conns"); err != nil {
			return err
		}
		fmt.Fprintln(stdout)
	}
	fmt.Fprintln(stdout, "(the key table and the channel state table have no reader outside the agents)")
	in.Close()
	held.Wait()
	helpers = helpers[:len(helpers)-1]

	for _, addr := range []string{"node-b/db/echo", "node-b/cache/echo"} {
		say("a dial that policy denies: node-a/batch → %s", addr)
		var errOut strings.Builder
		denied := exec.Command(bin, "dial", addr, "--socket", a.Partitions["batch"])
		denied.Stdin = strings.NewReader("should never arrive\n")
		denied.Stderr = &errOut
		if err := denied.Run(); err == nil {
			return fmt.Errorf("the denied dial to %s succeeded", addr)
		}
		fmt.Fprint(stdout, errOut.String())
	}

	for _, h := range helpers {
		h.Process.Signal(os.Interrupt)
		h.Wait()
	}
	helpers = nil
	for _, p := range procs {
		if err := p.Stop(5 * time.Second); err != nil {
			return fmt.Errorf("stopping %s: %w", p.Node.Name, err)
		}
	}
	procs = nil
	say("agents stopped cleanly; demo done")
	return nil
}

// waitService waits until addr has a listener, by listing: a dial would
// open a channel.
func waitService(ctx context.Context, bin, socket, addr string) error {
	for {
		cmd := exec.CommandContext(ctx, bin, "dial", addr, "--socket", socket)
		cmd.Stdin = strings.NewReader("")
		out, err := cmd.CombinedOutput()
		if err == nil {
			return nil
		}
		if !strings.Contains(string(out), "no_such_service") {
			return fmt.Errorf("dial %s: %s", addr, out)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s did not start listening: %s", addr, out)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func printAdmin(ctx context.Context, w io.Writer, path, op string) error {
	resp, err := admin.Query(ctx, path, admin.Request{Op: op})
	if err != nil {
		return err
	}
	switch op {
	case "peers":
		printPeers(w, resp.Node, resp.Build, resp.Peers, time.Now())
	case "conns":
		printConns(w, resp.Node, resp.Conns, time.Now())
	}
	return nil
}
