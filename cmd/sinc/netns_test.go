package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/netns"
)

// TestChannelsAcrossNamespaces runs each agent in its own network namespace
// (veth through a bridge, no route out), and, while 20 channels carry
// numbered messages, cuts the path between the nodes silently for longer
// than the dead-peer bound and then drops 5% of packets: every message
// arrives exactly once and in order.
func TestChannelsAcrossNamespaces(t *testing.T) {
	net := netns.New(t, "a", "b") // skips when not root
	rule := "[[allow]]\nfrom = \"*/*\"\nto = \"*/*/*\"\n"
	ns := func(name string) []string { return []string{"ip", "netns", "exec", net.Namespace(name)} }
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"p"}, Extra: rule, Listen: net.HostPort("a", 7701), Exec: ns("a")},
		{Name: "node-b", Partitions: []string{"p"}, Extra: rule, Listen: net.HostPort("b", 7701), Exec: ns("b")},
	}, cluster.Timers{Keepalive: "200ms", DeadAfter: "1s", DialMin: "50ms", DialMax: "500ms", Grace: "30s"})
	if err != nil {
		t.Fatal(err)
	}
	startAgents(t, c)
	waitState(t, c.Nodes["node-a"], "node-b", "up", 15*time.Second)
	waitState(t, c.Nodes["node-b"], "node-a", "up", 15*time.Second)

	load := filepath.Join(filepath.Dir(bin), "loadclient")
	if out, err := exec.Command("go", "build", "-o", load, "../../internal/loadclient").CombinedOutput(); err != nil {
		t.Fatalf("building the load client: %v\n%s", err, out)
	}
	// The clients reach their agents through the partition sockets, which
	// are files: no network namespace stands in the way.
	cmd := exec.Command(load, "-channels", "20", "-messages", "10000", "-busy", "20",
		"-node", "node-a="+c.Nodes["node-a"].Partitions["p"], "-node", "node-b="+c.Nodes["node-b"].Partitions["p"])
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()

	time.Sleep(500 * time.Millisecond)
	if err := net.Cut("a", "b", true); err != nil {
		t.Fatal(err)
	}
	waitState(t, c.Nodes["node-a"], "node-b", "down", 10*time.Second) // found dead by keepalives
	if err := net.Cut("a", "b", false); err != nil {
		t.Fatal(err)
	}
	waitState(t, c.Nodes["node-a"], "node-b", "up", 15*time.Second)
	dropped := int64(-1) // no firewall tool: not tried
	if err := net.Drop("b", 0.05); err == nil {
		time.Sleep(2 * time.Second)
		dropped, _ = net.Dropped("b")
		net.Drop("b", 0)
	} else if !errors.Is(err, netns.ErrNoFirewall) {
		t.Fatal(err)
	}
	var werr error
	select {
	case werr = <-done:
	case <-time.After(3 * time.Minute):
		cmd.Process.Kill()
		t.Fatal("the load did not finish within 3 minutes")
	}
	var res struct {
		Channels, Messages, Delivered int
		Seconds                       float64
		Error                         string
	}
	if err := json.Unmarshal(out.Bytes(), &res); err != nil || werr != nil || res.Error != "" {
		t.Fatalf("load: %v %v %+v\n%s", werr, err, res, errb.String())
	}
	if res.Delivered != 20*10000 {
		t.Fatalf("delivered %d of %d", res.Delivered, 20*10000)
	}
	t.Logf("20 channels × 10000 messages each way across namespaces through a silent cut and 5%% loss (%d packets dropped; -1: no firewall tool): all exactly once, in order, in %.1fs",
		dropped, res.Seconds)
}
