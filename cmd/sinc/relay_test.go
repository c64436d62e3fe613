package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The relay alone, between plain Go TCP peers: program a ⇄ relay ⇄ program
// b, where relay.go's two sides are both local TCP connections.

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// relayed is a relay between programs a and b, running.
type relayed struct {
	a, b *net.TCPConn
	done chan relayResult
}

func startRelay(t *testing.T, ctx context.Context) *relayed {
	t.Helper()
	a, ra := tcpPair(t)
	rb, b := tcpPair(t)
	la, err := newLocalSide(ra)
	if err != nil {
		t.Fatal(err)
	}
	lb, _ := newLocalSide(rb)
	r := &relayed{a: a, b: b, done: make(chan relayResult, 1)}
	go func() { r.done <- relay(ctx, la, lb) }()
	return r
}

func (r *relayed) result(t *testing.T) relayResult {
	t.Helper()
	select {
	case res := <-r.done:
		return res
	case <-time.After(5 * time.Second):
		t.Fatal("the relay did not end")
		return relayResult{}
	}
}

// readAll reads c to its end, within 5 s.
func readAll(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	return io.ReadAll(c)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestRelayHalfClose: each side's half-close passes on alone, and the
// other direction goes on after it, in both orders; the bytes arrive
// exact; the relay ends cleanly with both counts right.
func TestRelayHalfClose(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	for _, first := range []string{"a", "b"} {
		r := startRelay(t, context.Background())
		ab, ba := randomBytes(3<<20), randomBytes(2<<20)
		one, two, oneData, twoData := r.a, r.b, ab, ba
		if first == "b" {
			one, two, oneData, twoData = r.b, r.a, ba, ab
		}
		// one sends all and half-closes; two reads to the end and only
		// then answers: the answer crosses after one's fin.
		go func() { one.Write(oneData); one.CloseWrite() }()
		got, err := readAll(two)
		if err != nil || !bytes.Equal(got, oneData) {
			t.Fatalf("%s first: the other read %d bytes, %v; want %d and a clean end", first, len(got), err, len(oneData))
		}
		go func() { two.Write(twoData); two.CloseWrite() }()
		got, err = readAll(one)
		if err != nil || !bytes.Equal(got, twoData) {
			t.Fatalf("%s first: the answer after the half-close: %d bytes, %v; want %d", first, len(got), err, len(twoData))
		}
		res := r.result(t)
		if res.err != nil || res.up != int64(len(ab)) || res.down != int64(len(ba)) {
			t.Fatalf("%s first: relay ended with %+v; want clean, up %d, down %d", first, res, len(ab), len(ba))
		}
	}
}

// TestRelayResetPasses: a reset on either side reaches the other side as
// a reset (ECONNRESET), not as an end of stream, even with data in flight;
// so does the relay's context ending.
func TestRelayResetPasses(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	reset := func(c *net.TCPConn) { c.SetLinger(0); c.Close() }
	readsReset := func(c *net.TCPConn) error {
		if _, err := readAll(c); !errors.Is(err, syscall.ECONNRESET) {
			return fmt.Errorf("read %v; want ECONNRESET", err)
		}
		return nil
	}
	for _, tc := range []struct {
		name string
		do   func(r *relayed, cancel context.CancelFunc)
		sees func(r *relayed) error // the other side learns it
	}{
		{"a resets", func(r *relayed, _ context.CancelFunc) { reset(r.a) }, func(r *relayed) error { return readsReset(r.b) }},
		{"b resets", func(r *relayed, _ context.CancelFunc) { reset(r.b) }, func(r *relayed) error { return readsReset(r.a) }},
		// After a's fin nobody reads a's socket: its reset is seen when b
		// next writes, and b, having read a's fin, then meets a broken
		// pipe, as it would over one TCP connection.
		{"a resets after its fin", func(r *relayed, _ context.CancelFunc) {
			r.a.CloseWrite()
			readAll(r.b) // the fin came through
			reset(r.a)
			time.Sleep(10 * time.Millisecond)
			r.b.Write([]byte("late"))
		}, func(r *relayed) error {
			var err error
			for i := 0; i < 100 && err == nil; i++ {
				_, err = r.b.Write([]byte("later"))
				time.Sleep(time.Millisecond)
			}
			if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
				return fmt.Errorf("wrote on: %v; want EPIPE or ECONNRESET", err)
			}
			return nil
		}},
		{"the relay stops", func(r *relayed, cancel context.CancelFunc) { cancel() }, func(r *relayed) error {
			return errors.Join(readsReset(r.a), readsReset(r.b))
		}},
	} {
		ctx, cancel := context.WithCancel(context.Background())
		r := startRelay(t, ctx)
		// Data in flight both ways, then the reset.
		r.a.Write([]byte("from a"))
		r.b.Write([]byte("from b"))
		buf := make([]byte, 6)
		io.ReadFull(r.b, buf)
		io.ReadFull(r.a, buf)
		tc.do(r, cancel)
		// The relay ends with the failure, and the other side learns it.
		if res := r.result(t); res.err == nil {
			t.Errorf("%s: the relay ended cleanly; want the failure", tc.name)
		} else {
			t.Logf("%s: %v", tc.name, res.err)
		}
		if err := tc.sees(r); err != nil {
			t.Errorf("%s: the other side %v", tc.name, err)
		}
		cancel()
	}
}

// TestParseLocalAddr: which LISTEN and TARGET forms mean what, and the
// loopback rule of sinc forward.
func TestParseLocalAddr(t *testing.T) {
	for in, want := range map[string]localAddr{
		"unix:pg.sock":          {"unix", "pg.sock"},
		"/run/pg/.s.PGSQL.5432": {"unix", "/run/pg/.s.PGSQL.5432"},
		"./pg.sock":             {"unix", "./pg.sock"},
		"127.0.0.1:5432":        {"tcp", "127.0.0.1:5432"},
		"[::1]:5432":            {"tcp", "[::1]:5432"},
		"localhost:5432":        {"tcp", "localhost:5432"},
	} {
		if got, err := parseLocalAddr(in); err != nil || got != want {
			t.Errorf("parseLocalAddr(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "unix:", "pg.sock", "5432", "host"} {
		if got, err := parseLocalAddr(bad); err == nil {
			t.Errorf("parseLocalAddr(%q) = %v; want an error", bad, got)
		}
	}
	for in, want := range map[string]string{"127.0.0.1:1": "127.0.0.1:1", "127.1.2.3:1": "127.1.2.3:1",
		"[::1]:1": "[::1]:1", "localhost:1": "127.0.0.1:1"} {
		if got, err := loopbackOnly(in); err != nil || got != want {
			t.Errorf("loopbackOnly(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{":5432", "0.0.0.0:5432", "[::]:5432", "10.0.0.1:5432", "example.com:5432"} {
		if _, err := loopbackOnly(bad); err == nil {
			t.Errorf("loopbackOnly(%q) accepted a non-loopback address", bad)
		}
	}
}
