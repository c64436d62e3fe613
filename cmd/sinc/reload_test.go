package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
)

// rewrite replaces old by new in the file at path, in one step.
func rewrite(t *testing.T, path, old, new string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s has no %q", path, old)
	}
	s := strings.Replace(string(b), old, new, 1)
	if err := os.WriteFile(path+".new", []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
}

// echoOn serves an echo of messages on node/partition/service until the
// test ends.
func echoOn(t *testing.T, sock, service string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := (&sinc.ListenConfig{Socket: sock}).Listen(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				for {
					m, err := c.ReadMessage()
					if err != nil || c.WriteMessage(m) != nil {
						return
					}
				}
			}()
		}
	}()
}

func dialMsg(t *testing.T, sock, addr string) *sinc.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := (&sinc.Dialer{Socket: sock, Kind: sinc.Message}).DialContext(ctx, addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func echoOnce(c *sinc.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.WriteMessage([]byte(msg)); err != nil {
		return err
	}
	m, err := c.ReadMessage()
	if err == nil && string(m) != msg {
		err = fmt.Errorf("echo %q, want %q", m, msg)
	}
	return err
}

// TestSighupReloadsPeersAndPolicy runs three agent processes; node-a starts
// without node-c among its peers. SIGHUP after adding node-c to its config
// links them; SIGHUP to node-c after removing the rule that admitted
// node-a's channel ends that channel at both ends with denied; SIGHUP
// after removing node-c from node-a's config takes it out of node-a's
// peer table. A channel to node-b flows throughout.
func TestSighupReloadsPeersAndPolicy(t *testing.T) {
	rule := func(node string) string {
		return fmt.Sprintf("[[allow]]\nfrom = \"node-a/web\"\nto = \"%s/db/*\"\n", node)
	}
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{
		{Name: "node-a", Partitions: []string{"web"}, Extra: rule("node-b") + "\n" + rule("node-c")},
		{Name: "node-b", Partitions: []string{"db"}, Extra: rule("node-b")},
		{Name: "node-c", Partitions: []string{"db"}, Extra: rule("node-c")},
	}, cluster.Timers{Keepalive: "200ms", DeadAfter: "1s", DialMin: "50ms", DialMax: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	na, nb, nc := c.Nodes["node-a"], c.Nodes["node-b"], c.Nodes["node-c"]
	block := fmt.Sprintf("\n[peers.node-c]\naddress = %q\n", nc.Listen)
	rewrite(t, na.Config, block, "")
	var procs []*cluster.Process
	for _, n := range []*cluster.Node{na, nb, nc} {
		p, err := cluster.Start(bin, n)
		if err != nil {
			t.Fatal(err)
		}
		procs = append(procs, p)
	}
	defer func() {
		for _, p := range procs {
			if err := p.Stop(5 * time.Second); err != nil {
				t.Errorf("%s: %v", p.Node.Name, err)
			}
			if t.Failed() {
				b, _ := os.ReadFile(p.Log)
				t.Logf("%s:\n%s", p.Log, b)
			}
		}
	}()
	pa, pc := procs[0], procs[2]
	waitState(t, na, "node-b", "up", 10*time.Second)
	echoOn(t, nb.Partitions["db"], "echo")
	echoOn(t, nc.Partitions["db"], "echo")

	steady := dialMsg(t, na.Partitions["web"], "node-b/db/echo")
	stop := make(chan struct{})
	flowed := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				flowed <- nil
				return
			default:
			}
			if err := echoOnce(steady, fmt.Sprintf("steady %d", i)); err != nil {
				flowed <- err
				return
			}
		}
	}()

	// A new peer, on SIGHUP.
	rewrite(t, na.Config, "\n[[allow]]", block+"\n[[allow]]")
	pa.Cmd.Process.Signal(syscall.SIGHUP)
	waitState(t, na, "node-c", "up", 10*time.Second)
	toC := dialMsg(t, na.Partitions["web"], "node-c/db/echo")
	if err := echoOnce(toC, "hello node-c"); err != nil {
		t.Fatal(err)
	}

	// A rule gone, on SIGHUP of the accepting agent: the channel it
	// admitted ends at both ends.
	held := dialHeld(t, na.Partitions["web"], nc.Partitions["db"], "node-c/db/held")
	rewrite(t, nc.Config, rule("node-c"), "")
	start := time.Now()
	pc.Cmd.Process.Signal(syscall.SIGHUP)
	for _, end := range held {
		end.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := end.Read(make([]byte, 1))
		var se *sinc.Error
		if !errors.Is(err, sinc.ErrDenied) || !errors.As(err, &se) || se.By != "node-c" {
			t.Fatalf("after node-c's rule went: %v", err)
		}
	}
	t.Logf("both ends of the denied channel told %s after SIGHUP", time.Since(start).Round(time.Millisecond))

	// The peer gone, on SIGHUP.
	rewrite(t, na.Config, block, "")
	pa.Cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(5 * time.Second)
	for strings.Contains(mustSinc(t, "peers", "--admin", na.Admin), "node-c") {
		if time.Now().After(deadline) {
			t.Fatal("node-c still in node-a's peer table 5s after SIGHUP")
		}
		time.Sleep(50 * time.Millisecond)
	}

	close(stop)
	if err := <-flowed; err != nil {
		t.Fatalf("the channel to node-b broke: %v", err)
	}
}

// dialHeld opens a stream channel from the partition socket from to addr,
// accepted on the partition socket to, and returns both ends.
func dialHeld(t *testing.T, from, to, addr string) []*sinc.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	service := addr[strings.LastIndex(addr, "/")+1:]
	l, err := (&sinc.ListenConfig{Socket: to}).Listen(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan *sinc.Conn, 1)
	go func() {
		c, err := l.AcceptSinc()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	d, err := (&sinc.Dialer{Socket: from}).DialContext(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	srv, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { srv.Close() })
	return []*sinc.Conn{d, srv}
}
