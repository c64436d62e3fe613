package sinc

import (
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/local"
)

// TestChannelAgentDies: an agent that dies with a channel open (its socket
// closes without a close record, mid-record, or with a reset) gives
// ErrAgentGone to Read, and then to Write.
func TestChannelAgentDies(t *testing.T) {
	for _, tc := range []struct {
		name string
		kind Kind
		then func(c *net.UnixConn)
	}{
		{"without a word", Stream, func(c *net.UnixConn) {}},
		{"mid-header", Stream, func(c *net.UnixConn) { c.Write([]byte{0, 0}) }},
		{"mid-message", Message, func(c *net.UnixConn) { c.Write(recordBytes(local.RecData, []byte("0123456789"))[:8]) }},
		{"reset", Stream, reset},
		{"reset, message", Message, reset},
	} {
		f := startFakeAgent(t, func(_ int, c *net.UnixConn) {
			readRequest(c)
			c.Write([]byte(okOpen))
			tc.then(c)
		})
		c, err := dialFake(f, tc.kind)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		c.Write([]byte("unread by the agent"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 64))
		if !errors.Is(err, ErrAgentGone) || errors.Is(err, syscall.ECONNRESET) && !strings.Contains(err.Error(), "agent_gone") {
			t.Errorf("%s: read: %v", tc.name, err)
		}
		if _, err2 := c.Read(make([]byte, 64)); err2 != err {
			t.Errorf("%s: read again: %v, want the same end", tc.name, err2)
		}
		var werr error
		for range 10 { // the first writes may still fit in the socket
			if _, werr = c.Write(make([]byte, 1024)); werr != nil {
				break
			}
		}
		if !errors.Is(werr, ErrAgentGone) {
			t.Errorf("%s: write: %v", tc.name, werr)
		}
		if err := c.Close(); err != nil {
			t.Errorf("%s: close: %v", tc.name, err)
		}
	}
}
