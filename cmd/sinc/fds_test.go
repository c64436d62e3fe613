package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
)

// TestAgentOutOfFDs: an agent that runs out of file descriptors answers
// the processes that ask for a channel `limit: the agent is out of file
// descriptors` — not a hang, not an internal error — logs it once, and
// serves again once channels close.
func TestAgentOutOfFDs(t *testing.T) {
	n, p := startNode(t, "", nil, cluster.Timers{})
	pid := p.Cmd.Process.Pid
	l, err := (&sinc.ListenConfig{Socket: n.Partitions["db"]}).Listen(context.Background(), "sink")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1000)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	defer func() {
		for len(accepted) > 0 {
			(<-accepted).Close()
		}
	}()
	open := func() int {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		return len(ents)
	}
	lim := uint64(open() + 40)
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: lim, Max: lim}, nil); err != nil {
		t.Skipf("cannot lower the agent's RLIMIT_NOFILE: %v", err)
	}
	var held []*sinc.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var refused error
	for range 200 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := (&sinc.Dialer{Socket: n.Partitions["web"]}).DialContext(ctx, "node-a/db/sink")
		cancel()
		if err != nil {
			refused = err
			break
		}
		held = append(held, c)
	}
	if refused == nil {
		t.Fatalf("%d channels opened with the agent's descriptors limited to %d", len(held), lim)
	}
	if !errors.Is(refused, sinc.ErrLimit) || !strings.Contains(refused.Error(), "out of file descriptors") {
		t.Fatalf("after %d channels the dial failed with %v; want limit: the agent is out of file descriptors", len(held), refused)
	}
	// More tries meet the same clear answer, and the log says it once.
	for range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := (&sinc.Dialer{Socket: n.Partitions["web"]}).DialContext(ctx, "node-a/db/sink")
		cancel()
		if err == nil || !errors.Is(err, sinc.ErrLimit) {
			t.Fatalf("a dial while out of descriptors: %v", err)
		}
	}
	b, _ := os.ReadFile(p.Log)
	if c := strings.Count(string(b), "the agent is out of file descriptors: raise"); c != 1 {
		t.Fatalf("the agent logged running out of descriptors %d times:\n%s", c, b)
	}
	// Channels close, at both ends: the agent serves again. (A ring
	// channel takes more descriptors than a socket one: how many were
	// held depends on the path.)
	if len(held) < 2 {
		t.Fatalf("only %d channels opened before the agent ran out of descriptors", len(held))
	}
	k := len(held) / 2
	for _, c := range held[:k] {
		c.Close()
		(<-accepted).Close()
	}
	held = held[k:]
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := (&sinc.Dialer{Socket: n.Partitions["web"]}).DialContext(ctx, "node-a/db/sink")
		cancel()
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not serve again once channels closed: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
