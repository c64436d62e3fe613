package agent

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/local"
)

// rawRequest sends raw bytes on a partition socket and returns the agent's
// answer line (empty if none) and whether the agent closed the socket after.
func rawRequest(t *testing.T, sock string, req []byte, wait time.Duration) (*local.Response, bool) {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(req)
	c.SetReadDeadline(time.Now().Add(wait))
	br := bufio.NewReader(c)
	line, err := br.ReadBytes('\n')
	if err != nil {
		return nil, false
	}
	var r local.Response
	if err := json.Unmarshal(line, &r); err != nil {
		t.Fatalf("answer %q is not JSON: %v", line, err)
	}
	_, err = br.ReadByte()
	// Closed: EOF, or a reset when the agent left some request unread.
	return &r, err == io.EOF || errors.Is(err, syscall.ECONNRESET)
}

// TestBadLocalRequests: malformed, oversized, unknown and slow requests get
// an error answer and a closed socket; an open channel next to them keeps
// flowing.
func TestBadLocalRequests(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, cluster.Timers{
		Handshake: "500ms", Keepalive: "100ms", DeadAfter: "500ms", DialMin: "20ms", DialMax: "200ms", Request: "300ms"})
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	live := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	sock := p.sock("node-a", "web")

	for _, tc := range []struct {
		name, req, code string
	}{
		{"not JSON", "hello agent\n", "bad_request"},
		{"unknown field", `{"v":2,"op":"open","to":"node-b/db/echo","key":"give"}` + "\n", "bad_request"},
		{"wrong version", `{"v":9,"op":"conns"}` + "\n", "bad_request"},
		{"unknown op", `{"v":2,"op":"keys"}` + "\n", "bad_request"},
		{"bad address", `{"v":2,"op":"open","to":"node-b/db"}` + "\n", "bad_request"},
		{"bad kind", `{"v":2,"op":"open","to":"node-b/db/echo","kind":"datagram"}` + "\n", "bad_request"},
		{"oversized", `{"v":2,"op":"open","to":"` + strings.Repeat("x", local.MaxRequest) + `"}` + "\n", "bad_request"},
		{"no newline then silence", `{"v":2,"op":"conns"}`, "timeout"},
	} {
		r, closed := rawRequest(t, sock, []byte(tc.req), 3*time.Second)
		if r == nil || r.OK || r.Error == nil || r.Error.Code != tc.code {
			t.Errorf("%s: answer %+v, want error %s", tc.name, r, tc.code)
			continue
		}
		if !closed {
			t.Errorf("%s: socket left open after the error", tc.name)
		}
	}

	// One byte a second: bounded by the request timeout, not by the sender.
	slow, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	start := time.Now()
	stop := make(chan struct{})
	done := make(chan struct{})
	defer func() { close(stop); <-done }()
	go func() {
		defer close(done)
		for _, b := range []byte(`{"v":2,"op":"conns"}`) {
			if _, err := slow.Write([]byte{b}); err != nil {
				return
			}
			select {
			case <-time.After(time.Second):
			case <-stop:
				return
			}
		}
	}()
	slow.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(slow).ReadString('\n')
	if !strings.Contains(line, `"timeout"`) || time.Since(start) > 2*time.Second {
		t.Fatalf("slow request: %q after %s", line, time.Since(start))
	}

	// The channel next to all this still works.
	if err := live.WriteMessage([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	if m, err := live.ReadMessage(); err != nil || string(m) != "still here" {
		t.Fatalf("live channel after bad requests: %q %v", m, err)
	}
}

// TestLimits reaches each bound: channels per process, per partition,
// in the agent, listeners per partition, requests in progress.
func TestLimits(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) {
		cfg.Limits.ChannelsPerProcess = 3
		cfg.Limits.ListenersPerPartition = 2
		cfg.Limits.PendingRequests = 2
		cfg.Limits.QueuedRequests = 1
	})
	p := &pair{c: c, a: a}
	echo(t, p.listen(t, "node-a", "batch", "echo"))
	// Only dialed channels count against a process: three dials go, the
	// fourth finds the limit (the listener, the same process here, is not
	// held to it for the channels it accepts).
	var open []*sinc.Conn
	var lastErr error
	for range 4 {
		cn, err := p.dial(t, "node-a", "web", "node-a/batch/echo", sinc.Stream)
		if err != nil {
			lastErr = err
			break
		}
		open = append(open, cn)
	}
	if !isOp(lastErr, "dial", sinc.ErrLimit) || len(open) != 3 {
		t.Fatalf("past the per-process limit: %v (opened %d, want 3)", lastErr, len(open))
	}
	if !strings.Contains(lastErr.Error(), "limit per process") {
		t.Fatalf("limit error does not say which limit: %v", lastErr)
	}
	for _, cn := range open {
		cn.Close()
	}
	eventually(t, 5*time.Second, "channels closed", func() bool { return a.tables.len() == 0 })
	// Freed: a dial works again.
	cn, err := p.dial(t, "node-a", "web", "node-a/batch/echo", sinc.Stream)
	if err != nil {
		t.Fatalf("after closing, a dial: %v", err)
	}
	cn.Close()

	// Listeners per partition (batch already has one).
	p.listen(t, "node-a", "batch", "two")
	if _, err := (&sinc.ListenConfig{Socket: p.sock("node-a", "batch")}).Listen(ctxT(t), "three"); !isOp(err, "listen", sinc.ErrLimit) {
		t.Fatalf("third listener: %v", err)
	}

	// Requests in progress: two silent connections fill the partition's
	// slots, a third its queue; the fourth gets "busy" at once (the bounds
	// per uid: TestAdmissionBounds).
	var silent []net.Conn
	for range 3 {
		s, err := net.Dial("unix", p.sock("node-a", "web"))
		if err != nil {
			t.Fatal(err)
		}
		silent = append(silent, s)
		defer s.Close()
	}
	time.Sleep(50 * time.Millisecond)
	r, _ := rawRequest(t, p.sock("node-a", "web"), []byte(`{"v":2,"op":"conns"}`+"\n"), time.Second)
	if r == nil || r.Error == nil || r.Error.Code != "busy" {
		t.Fatalf("fourth request while two are pending and one waits: %+v", r)
	}
	a.log.waitFor(t, time.Second, "partition request refused", "partition=web", "reason=request_queue_full")
	for _, s := range silent {
		s.Close()
	}
	eventually(t, 5*time.Second, "requests freed", func() bool {
		_, err := sinc.Connections(ctxT(t), p.sock("node-a", "web"))
		return err == nil
	})
}

// TestChannelTableLimit: the agent-wide channel table is bounded.
func TestChannelTableLimit(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) { cfg.Limits.Channels = 4 })
	p := &pair{c: c, a: a}
	echo(t, p.listen(t, "node-a", "batch", "echo"))
	var err2 error
	n := 0
	for range 4 {
		cn, err := p.dial(t, "node-a", "web", "node-a/batch/echo", sinc.Stream)
		if err != nil {
			err2 = err
			break
		}
		defer cn.Close()
		n++
	}
	// Each same-node channel takes two rows (one per end): the third dial
	// finds the table full.
	if n != 2 || !isOp(err2, "dial", sinc.ErrLimit) {
		t.Fatalf("opened %d, then %v; want 2 then a limit error", n, err2)
	}
	var se *sinc.Error
	if !errors.As(err2, &se) || !strings.Contains(se.Message, "channels open") {
		t.Fatalf("error does not say the channel table is full: %v", err2)
	}
}
