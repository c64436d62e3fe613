package sinc_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// isNetError asserts err the way the standard library does, err.(net.Error),
// not with errors.As.
func isNetError(err error) (net.Error, bool) {
	ne, ok := err.(net.Error)
	return ne, ok
}

// TestErrorsAreNetErrors: every error a Conn or Listener returns is a
// net.Error by plain type assertion; deadlines say Timeout and match
// os.ErrDeadlineExceeded, use after Close matches net.ErrClosed.
func TestErrorsAreNetErrors(t *testing.T) {
	tp := onePartitionPair(t)
	past := time.Unix(1, 0)
	for _, kind := range []sinc.Kind{sinc.Stream, sinc.Message} {
		c, _ := mustPair(t, tp, "errs-"+kind.String(), kind)
		deadline := map[string]func() error{
			"Read":       func() error { _, err := c.Read(make([]byte, 8)); return err },
			"Write":      func() error { _, err := c.Write([]byte("x")); return err },
			"CloseWrite": func() error { return c.CloseWrite() },
		}
		if kind == sinc.Message {
			deadline["ReadMessage"] = func() error { _, err := c.ReadMessage(); return err }
			deadline["WriteMessage"] = func() error { return c.WriteMessage([]byte("x")) }
		}
		c.SetDeadline(past)
		for name, op := range deadline {
			err := op()
			ne, ok := isNetError(err)
			if !ok || !ne.Timeout() || !errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed) {
				t.Errorf("%s %s past its deadline: %T %v", kind, name, err, err)
			}
			if ok && !ne.Temporary() { //nolint:staticcheck // the deprecated method is part of the contract
				t.Errorf("%s %s past its deadline: not Temporary", kind, name)
			}
		}
		c.SetDeadline(time.Time{})

		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		closed := map[string]func() error{
			"Read":             func() error { _, err := c.Read(make([]byte, 8)); return err },
			"Write":            func() error { _, err := c.Write([]byte("x")); return err },
			"CloseWrite":       func() error { return c.CloseWrite() },
			"ReadMessage":      func() error { _, err := c.ReadMessage(); return err },
			"WriteMessage":     func() error { return c.WriteMessage([]byte("x")) },
			"SetDeadline":      func() error { return c.SetDeadline(time.Now()) },
			"SetReadDeadline":  func() error { return c.SetReadDeadline(time.Now()) },
			"SetWriteDeadline": func() error { return c.SetWriteDeadline(time.Now()) },
			"Close":            func() error { return c.Close() },
		}
		if kind == sinc.Stream {
			delete(closed, "ReadMessage") // a stream has none to read: its error says so
		}
		for name, op := range closed {
			err := op()
			ne, ok := isNetError(err)
			if !ok || ne.Timeout() || !errors.Is(err, net.ErrClosed) {
				t.Errorf("%s %s after Close: %T %v", kind, name, err, err)
			}
		}
	}

	l, err := (&sinc.ListenConfig{Socket: tp.listen}).Listen(context.Background(), "errs-l")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan error, 1)
	go func() {
		_, err := l.Accept()
		accepted <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := l.Close(); err != nil {
		t.Fatalf("listener Close: %v", err)
	}
	for name, err := range map[string]error{"pending Accept": <-accepted, "Accept": second(l.Accept()), "Close": l.Close()} {
		if _, ok := isNetError(err); !ok || !errors.Is(err, net.ErrClosed) {
			t.Errorf("listener %s after Close: %T %v", name, err, err)
		}
	}

	_, err = (&sinc.Dialer{Socket: tp.dial}).DialContext(context.Background(), tp.addr("none"))
	if _, ok := isNetError(err); !ok || !errors.Is(err, sinc.ErrNoSuchService) {
		t.Errorf("dial refused: %T %v", err, err)
	}
}

func second[T any](_ T, err error) error { return err }

// TestCloseUnblocks: Close returns at once while a Write is blocked (the
// peer does not read) and a Read waits; both then return net.ErrClosed.
func TestCloseUnblocks(t *testing.T) {
	tp := onePartitionPair(t)
	for _, kind := range []sinc.Kind{sinc.Stream, sinc.Message} {
		c, s := mustPair(t, tp, "close-"+kind.String(), kind)
		wrote := make(chan error, 1)
		go func() {
			buf := make([]byte, sinc.MaxMessage)
			for {
				if _, err := c.Write(buf); err != nil {
					wrote <- err
					return
				}
			}
		}()
		read := make(chan error, 1)
		go func() {
			_, err := c.Read(make([]byte, 8))
			read <- err
		}()
		time.Sleep(300 * time.Millisecond) // the window fills: the writer blocks
		select {
		case err := <-wrote:
			t.Fatalf("%s: the writer did not block: %v", kind, err)
		default:
		}
		start := time.Now()
		closed := make(chan error, 1)
		go func() { closed <- c.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Errorf("%s: Close: %v", kind, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: Close blocked behind a Write for 5 s", kind)
		}
		if d := time.Since(start); d > 300*time.Millisecond {
			t.Errorf("%s: Close took %v", kind, d)
		}
		for what, ch := range map[string]chan error{"Write": wrote, "Read": read} {
			select {
			case err := <-ch:
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("%s: pending %s after Close: %v", kind, what, err)
				}
			case <-time.After(time.Second):
				t.Fatalf("%s: pending %s still blocked a second after Close", kind, what)
			}
		}
		// The other end learns the channel ended, and does not hang.
		s.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			if _, err := s.Read(make([]byte, sinc.MaxMessage)); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("%s: the peer still reads 10 s after Close", kind)
				}
				break
			}
		}
	}
}

// TestAgentStops: when the process's own agent stops, every call says so
// with a sinc error: reads ErrAgentGone, Accept ErrAgentGone, and a new
// dial ErrNoAgent naming the socket.
func TestAgentStops(t *testing.T) {
	n := startNode(t)
	tp := topology{name: "partitions", dial: n.n.Partitions["a"], listen: n.n.Partitions["b"], node: "n1", part: "b"}
	c, _ := mustPair(t, tp, "stop", sinc.Stream)
	l, err := (&sinc.ListenConfig{Socket: tp.listen}).Listen(context.Background(), "stop-l")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan error, 1)
	go func() {
		_, err := l.Accept()
		accepted <- err
	}()
	time.Sleep(20 * time.Millisecond)
	n.stop()

	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); !errors.Is(err, sinc.ErrAgentGone) {
		t.Errorf("read after the agent stopped: %v", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, sinc.ErrAgentGone) {
		t.Errorf("write after the agent stopped (and a read said so): %v", err)
	}
	select {
	case err := <-accepted:
		if !errors.Is(err, sinc.ErrAgentGone) {
			t.Errorf("Accept when the agent stopped: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept still waits 5 s after the agent stopped")
	}
	if _, err := l.Accept(); !errors.Is(err, sinc.ErrAgentGone) {
		t.Errorf("Accept again: %v", err)
	}
	_, err = (&sinc.Dialer{Socket: tp.dial}).DialContext(context.Background(), tp.addr("stop"))
	if !errors.Is(err, sinc.ErrNoAgent) || !strings.Contains(err.Error(), tp.dial) || !strings.Contains(err.Error(), "check that the agent runs") {
		t.Errorf("dial with the agent stopped: %v", err)
	}
}
