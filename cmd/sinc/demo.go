package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/cluster"
)

func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("demo", stderr)
	keep := fs.Bool("keep", false, "keep the demo's folder (certificates, configs, logs) instead of removing it")
	if err := parse(fs, args, 0); err != nil {
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

	c, err := cluster.Make(dir, []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web", "batch"}},
		{Name: "node-b", Partitions: []string{"db", "cache"}},
	}, cluster.Timers{Keepalive: "1s", DeadAfter: "3s"})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "made a cluster CA and certificates for node-a, node-b in %s\n", dir)

	var procs []*cluster.Process
	defer func() {
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

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for _, pair := range [][2]string{{"node-a", "node-b"}, {"node-b", "node-a"}} {
		if _, err := cluster.WaitPeer(ctx, c.Nodes[pair[0]], pair[1], "up"); err != nil {
			return fmt.Errorf("link %s→%s did not come up: %w (logs in %s)", pair[0], pair[1], err, dir)
		}
	}
	fmt.Fprint(stdout, "the agents authenticated each other and their link is up\n\n")
	for _, name := range c.Names() {
		resp, err := admin.Query(ctx, c.Nodes[name].Admin, admin.Request{Op: "peers"})
		if err != nil {
			return err
		}
		printPeers(stdout, resp.Node, resp.Peers, time.Now())
		fmt.Fprintln(stdout)
	}
	for _, p := range procs {
		if err := p.Stop(5 * time.Second); err != nil {
			return fmt.Errorf("stopping %s: %w", p.Node.Name, err)
		}
	}
	procs = nil
	fmt.Fprintln(stdout, "agents stopped cleanly; demo done")
	return nil
}
