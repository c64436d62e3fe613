package sinc

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/local"
)

// fakeAgent plays an agent on a Unix socket by a script: serve gets each
// connection (numbered from 0) and does what the test needs, down to
// breaking the socket in ways a real agent only does when it dies.
type fakeAgent struct {
	path  string
	ln    *net.UnixListener
	conns atomic.Int32
	wg    sync.WaitGroup
}

func startFakeAgent(t *testing.T, serve func(i int, c *net.UnixConn)) *fakeAgent {
	t.Helper()
	dir, err := os.MkdirTemp("", "sinc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakeAgent{path: filepath.Join(dir, "p.sock")}
	f.ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: f.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := f.ln.AcceptUnix()
			if err != nil {
				return
			}
			i := int(f.conns.Add(1)) - 1
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				serve(i, c)
			}()
		}
	}()
	t.Cleanup(func() {
		f.ln.Close()
		f.wg.Wait()
	})
	return f
}

// readRequest reads the request line byte by byte (nothing after it).
func readRequest(c *net.UnixConn) (*local.Request, error) {
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			return nil, err
		}
		if b[0] == '\n' {
			return local.ParseRequest(line)
		}
		line = append(line, b[0])
	}
}

// reset closes c so that the other end reads ECONNRESET: data the other
// end sent is left unread, which makes the kernel report a reset.
func reset(c *net.UnixConn) {
	time.Sleep(20 * time.Millisecond) // let the other end's bytes arrive
	c.Close()
}

// recordBytes is a record as the agent writes it.
func recordBytes(typ byte, p []byte) []byte {
	b := make([]byte, local.RecordHeaderLen, local.RecordHeaderLen+len(p))
	local.PutRecordHeader(b, typ, len(p))
	return append(b, p...)
}

const okOpen = `{"ok":true,"conn":{"id":1,"kind":"stream","state":"open"}}` + "\n"

func dialFake(f *fakeAgent, kind Kind) (*Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return (&Dialer{Socket: f.path, Kind: kind}).DialContext(ctx, "n/p/s")
}

// TestNoAgent: nothing at the socket path, a socket nobody listens on
// (what a killed agent leaves), or no socket given: ErrNoAgent, naming
// the socket and what to check.
func TestNoAgent(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	for _, tc := range []struct {
		path  string
		errno syscall.Errno
	}{{missing, syscall.ENOENT}, {stale, syscall.ECONNREFUSED}} {
		_, derr := (&Dialer{Socket: tc.path}).DialContext(context.Background(), "n/p/s")
		_, lerr := (&ListenConfig{Socket: tc.path}).Listen(context.Background(), "s")
		_, cerr := Connections(context.Background(), tc.path)
		for _, err := range []error{derr, lerr, cerr} {
			if !errors.Is(err, ErrNoAgent) || !errors.Is(err, tc.errno) || !strings.Contains(err.Error(), tc.path) ||
				!strings.Contains(err.Error(), "check that the agent runs") {
				t.Errorf("%s: %v", filepath.Base(tc.path), err)
			}
		}
	}
	t.Setenv(SocketEnv, "")
	if _, err := Dial("n/p/s"); !errors.Is(err, ErrNoAgent) || !strings.Contains(err.Error(), SocketEnv) {
		t.Errorf("no socket given: %v", err)
	}
}

// TestConnectBacklogFull: a partition socket whose backlog is full
// (connect says EAGAIN) is busy, and retried as such.
func TestConnectBacklogFull(t *testing.T) {
	err := connectErr("/run/p.sock", &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EAGAIN)})
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "/run/p.sock") {
		t.Fatalf("EAGAIN: %v", err)
	}
	perm := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}
	if err := connectErr("/run/p.sock", perm); err != perm {
		t.Fatalf("EACCES: %v, want it as it is", err)
	}
}

// TestDialAgentDies: an agent that dies while a dial's request or answer
// is on the socket gives ErrAgentGone, never a raw broken pipe, reset or
// EOF.
func TestDialAgentDies(t *testing.T) {
	for name, serve := range map[string]func(int, *net.UnixConn){
		"before the request": func(_ int, c *net.UnixConn) {},
		"unread request":     func(_ int, c *net.UnixConn) { reset(c) },
		"no answer":          func(_ int, c *net.UnixConn) { readRequest(c) },
		"half an answer": func(_ int, c *net.UnixConn) {
			readRequest(c)
			c.Write([]byte(okOpen[:10]))
		},
	} {
		f := startFakeAgent(t, serve)
		_, err := dialFake(f, Stream)
		if !errors.Is(err, ErrAgentGone) || errors.Is(err, ErrNoAgent) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestListenerAgentDies: Accept on a listener whose agent died returns
// ErrAgentGone (and again after), not a bare EOF; after Close,
// net.ErrClosed.
func TestListenerAgentDies(t *testing.T) {
	f := startFakeAgent(t, func(_ int, c *net.UnixConn) {
		readRequest(c)
		c.Write([]byte(`{"ok":true,"addr":"n/p/s"}` + "\n"))
		time.Sleep(50 * time.Millisecond)
	})
	l, err := (&ListenConfig{Socket: f.path}).Listen(context.Background(), "s")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := l.Accept(); !errors.Is(err, ErrAgentGone) || errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "agent_gone") {
			t.Errorf("Accept %d: %v", i, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v", err)
	}
}

// answerBusy answers busy to the first n requests, then what ok says.
func answerBusy(n int, ok string) func(int, *net.UnixConn) {
	return func(i int, c *net.UnixConn) {
		if _, err := readRequest(c); err != nil {
			return
		}
		if i < n {
			c.Write([]byte(`{"ok":false,"error":{"code":"busy","message":"too many requests in progress","by":"n"}}` + "\n"))
			return
		}
		c.Write([]byte(ok))
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDialRetriesBusy: a busy agent is asked again with backoff, within
// the caller's context; other refusals are not retried.
func TestDialRetriesBusy(t *testing.T) {
	f := startFakeAgent(t, answerBusy(6, okOpen))
	start := time.Now()
	c, err := dialFake(f, Stream)
	if err != nil {
		t.Fatalf("dial after 6 busy answers: %v", err)
	}
	c.Close()
	// Waits are jittered in [b/2, 3b/2) for b = 2, 4, … 64 ms.
	if n, d := f.conns.Load(), time.Since(start); n != 7 || d < 60*time.Millisecond || d > 2*time.Second {
		t.Errorf("%d requests in %v; want 7, in about 126 ms", n, d)
	}

	denied := startFakeAgent(t, func(_ int, c *net.UnixConn) {
		readRequest(c)
		c.Write([]byte(`{"ok":false,"error":{"code":"denied","message":"no","by":"n"}}` + "\n"))
	})
	if _, err := dialFake(denied, Stream); !errors.Is(err, ErrDenied) || denied.conns.Load() != 1 {
		t.Errorf("denied: %v after %d requests; want one", err, denied.conns.Load())
	}

	// Always busy: the caller's deadline bounds the retries, and the
	// error is the agent's, not the deadline's.
	always := startFakeAgent(t, answerBusy(1<<30, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	start = time.Now()
	_, err = (&Dialer{Socket: always.path}).DialContext(ctx, "n/p/s")
	var oe *OpError
	if !errors.Is(err, ErrBusy) || !errors.As(err, &oe) || !oe.Temporary() || time.Since(start) > 300*time.Millisecond || always.conns.Load() < 3 {
		t.Errorf("always busy, 150 ms deadline: %v after %v and %d requests", err, time.Since(start), always.conns.Load())
	}
	// Cancelling ends the retries with the context's error.
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := (&Dialer{Socket: always.path}).DialContext(ctx, "n/p/s"); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled while busy: %v", err)
	}
	// Without a deadline, retries stop after busyGiveUp.
	defer func(d time.Duration) { busyGiveUp = d }(busyGiveUp)
	busyGiveUp = 200 * time.Millisecond
	start = time.Now()
	if _, err := (&Dialer{Socket: always.path}).DialContext(context.Background(), "n/p/s"); !errors.Is(err, ErrBusy) || time.Since(start) > time.Second {
		t.Errorf("always busy, no deadline: %v after %v", err, time.Since(start))
	}
}

// TestListenRetriesBusy: Listen and Connections retry busy as a dial does.
func TestListenRetriesBusy(t *testing.T) {
	f := startFakeAgent(t, answerBusy(3, `{"ok":true,"addr":"n/p/s"}`+"\n"))
	l, err := (&ListenConfig{Socket: f.path}).Listen(context.Background(), "s")
	if err != nil {
		t.Fatalf("listen after 3 busy answers: %v", err)
	}
	l.Close()
	g := startFakeAgent(t, answerBusy(3, `{"ok":true,"conns":[]}`+"\n"))
	if _, err := Connections(context.Background(), g.path); err != nil {
		t.Fatalf("conns after 3 busy answers: %v", err)
	}
}
