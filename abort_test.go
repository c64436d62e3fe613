package sinc_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// readToEnd reads c until an error and returns what it read and the error.
func readToEnd(c *sinc.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got bytes.Buffer
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			return got.Bytes(), err
		}
	}
}

// TestAbort: Abort ends a channel as a failure the other process can tell
// from a clean end, with the message given; Close ends it cleanly. Across
// nodes and across partitions of one node.
func TestAbort(t *testing.T) {
	for _, tp := range []func(*testing.T) topology{onePartitionPair, twoNodes} {
		tp := tp(t)
		t.Run(tp.name, func(t *testing.T) {
			// Close: the other side reads what was written, then io.EOF.
			c, s := mustPair(t, tp, "closed", sinc.Stream)
			c.Write([]byte("all of it"))
			c.Close()
			if got, err := readToEnd(s); err != io.EOF || string(got) != "all of it" {
				t.Fatalf("after Close the other side read %q, %v; want the bytes and io.EOF", got, err)
			}

			// Abort: an error matching ErrAborted, with the message.
			c, s = mustPair(t, tp, "aborted", sinc.Stream)
			c.Write([]byte("some"))
			if err := c.Abort("connect 127.0.0.1:5432: connection refused"); err != nil {
				t.Fatalf("abort: %v", err)
			}
			_, err := readToEnd(s)
			if !errors.Is(err, sinc.ErrAborted) || !strings.Contains(err.Error(), "connect 127.0.0.1:5432: connection refused") {
				t.Fatalf("after Abort the other side read %v; want aborted with the message", err)
			}
			if _, err := s.Write([]byte("x")); err == nil {
				t.Errorf("write on the aborted channel succeeded")
			}
			if err := c.Abort("again"); !errors.Is(err, net.ErrClosed) {
				t.Errorf("second abort: %v, want net.ErrClosed", err)
			}
			if err := c.Close(); !errors.Is(err, net.ErrClosed) {
				t.Errorf("close after abort: %v, want net.ErrClosed", err)
			}

			// Abort after this side's fin still ends the channel as failed:
			// the other side, still writing, learns it.
			c, s = mustPair(t, tp, "finned", sinc.Stream)
			c.CloseWrite()
			if _, err := readToEnd(s); err != io.EOF {
				t.Fatalf("after the fin: %v, want io.EOF", err)
			}
			c.Abort("gave up")
			var werr error
			for deadline := time.Now().Add(5 * time.Second); werr == nil && time.Now().Before(deadline); {
				_, werr = s.Write([]byte("still talking"))
				time.Sleep(5 * time.Millisecond)
			}
			if !errors.Is(werr, sinc.ErrAborted) && !errors.Is(werr, sinc.ErrReset) {
				t.Errorf("writing after the other side's fin and abort: %v, want aborted", werr)
			}

			// Abort wakes a Write blocked on a peer that does not read.
			c, s = mustPair(t, tp, "blocked", sinc.Stream)
			werrs := make(chan error, 1)
			go func() {
				big := make([]byte, 1<<20)
				for {
					if _, err := c.Write(big); err != nil {
						werrs <- err
						return
					}
				}
			}()
			time.Sleep(100 * time.Millisecond)
			c.Abort("stuck")
			select {
			case err := <-werrs:
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("blocked write after Abort: %v, want net.ErrClosed", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Abort did not wake the blocked Write")
			}
			// The close record may not fit behind the blocked write (the
			// other side reads nothing): then the end is a reset. Either
			// way a failure, never a clean end.
			if _, err := readToEnd(s); !errors.Is(err, sinc.ErrAborted) && !errors.Is(err, sinc.ErrReset) {
				t.Errorf("the other side of the blocked write read %v, want aborted or reset", err)
			}
		})
	}
}
