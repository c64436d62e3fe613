package sinc_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/agent"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// node runs one agent in this process with partitions a and b, a→b allowed.
type node struct {
	c      *cluster.Cluster
	n      *cluster.Node
	cancel context.CancelFunc
	done   chan error
}

func startNode(t *testing.T) *node {
	t.Helper()
	dir, err := os.MkdirTemp("", "sinc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "n1", Partitions: []string{"a", "b"},
		Extra: "[[allow]]\nfrom = \"n1/a\"\nto = \"n1/b/*\"\n"}}, cluster.Timers{Open: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(c.Nodes["n1"].Config)
	if err != nil {
		t.Fatal(err)
	}
	ag, err := agent.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	nd := &node{c: c, n: c.Nodes["n1"], cancel: cancel, done: make(chan error, 1)}
	go func() { nd.done <- ag.Run(ctx) }()
	t.Cleanup(nd.stop)
	for i := 0; ; i++ {
		if conn, err := net.Dial("unix", nd.n.Partitions["b"]); err == nil {
			conn.Close()
			break
		}
		if i > 300 {
			t.Fatal("agent did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nd
}

func (n *node) stop() {
	n.cancel()
	if n.done != nil {
		<-n.done
		n.done = nil
	}
}

func (n *node) echo(t *testing.T, service string) *sinc.Listener {
	t.Helper()
	l, err := (&sinc.ListenConfig{Socket: n.n.Partitions["b"]}).Listen(context.Background(), service)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, sinc.MaxMessage)
				for {
					k, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:k]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return l
}

func TestSocketFromEnvironment(t *testing.T) {
	n := startNode(t)
	n.echo(t, "e")
	t.Setenv(sinc.SocketEnv, n.n.Partitions["a"])
	c, err := sinc.Dial("n1/b/e")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("%q %v", buf, err)
	}
	if c.RemoteAddr().String() != "n1/b/e" || c.RemoteAddr().Network() != "sinc" {
		t.Fatalf("remote addr %v", c.RemoteAddr())
	}
	rows, err := sinc.Connections(context.Background(), "")
	if err != nil || len(rows) != 1 || rows[0].RemoteService != "e" {
		t.Fatalf("rows %+v %v", rows, err)
	}
	t.Setenv(sinc.SocketEnv, "")
	if _, err := sinc.Dial("n1/b/e"); err == nil {
		t.Fatal("dial without a socket succeeded")
	}
}

func TestDeadlines(t *testing.T) {
	n := startNode(t)
	l, err := (&sinc.ListenConfig{Socket: n.n.Partitions["b"]}).Listen(context.Background(), "quiet")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	held := make(chan *sinc.Conn, 1)
	go func() {
		if c, err := l.AcceptSinc(); err == nil {
			held <- c
		}
	}()
	c, err := (&sinc.Dialer{Socket: n.n.Partitions["a"]}).DialContext(context.Background(), "n1/b/quiet")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv := <-held
	defer srv.Close()
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: %v", err)
	}
	// A deadline is not the end: the channel still works.
	c.SetReadDeadline(time.Time{})
	srv.Write([]byte("late"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "late" {
		t.Fatalf("after a deadline: %q %v", buf, err)
	}
}

func TestDialContextCancel(t *testing.T) {
	n := startNode(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := (&sinc.Dialer{Socket: n.n.Partitions["a"]}).DialContext(ctx, "n1/b/x"); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled dial: %v", err)
	}
	// A deadline that passes during the exchange ends it with the
	// context's error, not the agent's answer.
	ctx, cancel = context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	if _, err := (&sinc.Dialer{Socket: n.n.Partitions["a"]}).DialContext(ctx, "n1/b/x"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial past its deadline: %v", err)
	}
}

func TestTypedErrors(t *testing.T) {
	n := startNode(t)
	_, err := (&sinc.Dialer{Socket: n.n.Partitions["b"]}).DialContext(context.Background(), "n1/a/x")
	var oe *sinc.OpError
	var se *sinc.Error
	if !errors.As(err, &oe) || oe.Op != "dial" || oe.Addr != "n1/a/x" || !errors.As(err, &se) || se.By != "n1" ||
		!errors.Is(err, sinc.ErrDenied) || errors.Is(err, sinc.ErrNoSuchService) {
		t.Fatalf("denied dial: %#v", err)
	}
	if got := err.Error(); got != "sinc: dial n1/a/x: denied (by n1): "+se.Message {
		t.Fatalf("message %q", got)
	}
	_, err = (&sinc.Dialer{Socket: n.n.Partitions["a"]}).DialContext(context.Background(), "n1/b/none")
	if !errors.Is(err, sinc.ErrNoSuchService) {
		t.Fatalf("no listener: %v", err)
	}
}

func TestMessageReadShortBuffer(t *testing.T) {
	n := startNode(t)
	n.echo(t, "m")
	c, err := (&sinc.Dialer{Socket: n.n.Partitions["a"], Kind: sinc.Message}).DialContext(context.Background(), "n1/b/m")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.WriteMessage([]byte("0123456789"))
	c.WriteMessage([]byte("ok"))
	if _, err := c.Read(make([]byte, 4)); !errors.Is(err, sinc.ErrMessageTooLong) {
		t.Fatalf("short buffer: %v", err)
	}
	m, err := c.ReadMessage()
	if err != nil || string(m) != "ok" {
		t.Fatalf("the next message: %q %v", m, err)
	}
}

// TestAgentGone: when the agent stops, a channel's reads end with
// ErrAgentGone at once rather than hanging.
func TestAgentGone(t *testing.T) {
	n := startNode(t)
	n.echo(t, "g")
	c, err := (&sinc.Dialer{Socket: n.n.Partitions["a"]}).DialContext(context.Background(), "n1/b/g")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	n.stop()
	if err := <-done; !errors.Is(err, sinc.ErrAgentGone) {
		t.Fatalf("read when the agent stopped: %v", err)
	}
}
