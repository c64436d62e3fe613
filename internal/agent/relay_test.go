package agent

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
)

// relay sits between node-a and node-b: it forwards TCP bytes both ways and
// keeps a copy of everything, as a wire tap or a man in the middle would.
type relay struct {
	ln     net.Listener
	to     string
	mu     sync.Mutex
	fromA  bytes.Buffer // what node-a sent, first connection
	conns  []net.Conn
	toB    []net.Conn // the relay's connections to node-b
	wg     sync.WaitGroup
	closed bool
}

func startRelay(t *testing.T, to string) *relay {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, to: to}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		for {
			a, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", to)
			if err != nil {
				a.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, a, b)
			r.toB = append(r.toB, b)
			first := len(r.toB) == 1
			r.mu.Unlock()
			r.wg.Add(2)
			go func() { defer r.wg.Done(); r.copy(b, a, first); b.(*net.TCPConn).CloseWrite() }()
			go func() { defer r.wg.Done(); io.Copy(a, b); a.(*net.TCPConn).CloseWrite() }()
		}
	}()
	t.Cleanup(r.close)
	return r
}

func (r *relay) copy(dst, src net.Conn, record bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if record {
				r.mu.Lock()
				r.fromA.Write(buf[:n])
				r.mu.Unlock()
			}
			r.mu.Lock()
			_, werr := dst.Write(buf[:n])
			r.mu.Unlock()
			if werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// inject writes raw bytes to node-b on the first relayed connection, as
// if node-a had sent them.
func (r *relay) inject(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.toB[0].Write(b)
}

func (r *relay) captured() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.fromA.Bytes())
}

func (r *relay) close() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed = true
	r.ln.Close()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// relayPair starts node-a and node-b with node-a reaching node-b only
// through a relay (node-b cannot dial node-a: its address for it is a
// closed port).
func relayPair(t *testing.T) (*pair, *relay) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	r := startRelay(t, c.Nodes["node-b"].Listen)
	return pairThrough(t, c, r.ln.Addr().String()), r
}

// TestWireTapSeesNoPlaintext: a known payload crosses a channel through a
// tap; the tap's copy of the link holds none of it, nor the names of the
// services and partitions inside the channel open.
func TestWireTapSeesNoPlaintext(t *testing.T) {
	p, r := relayPair(t)
	echo(t, p.listen(t, "node-b", "db", "secret-service"))
	c := p.mustDial(t, "node-a", "web", "node-b/db/secret-service", sinc.Stream)
	payload := bytes.Repeat([]byte("KNOWN-PLAINTEXT-0123456789/"), 4000)
	mustEqual(t, "through the relay", roundTrip(t, c, payload), payload)
	tap := r.captured()
	if len(tap) < len(payload) {
		t.Fatalf("the tap saw %d bytes, less than the payload: traffic did not pass it", len(tap))
	}
	for _, known := range []string{"KNOWN-PLAINTEXT", "0123456789/", "secret-service", "sinc-local-ca"} {
		if bytes.Contains(tap, []byte(known)) {
			t.Errorf("the tap's copy holds %q", known)
		}
	}
}

// TestRelayCannotTakeOverTheLink: a man in the middle who forwarded the
// handshake still cannot speak on the session: injected bytes fail
// authentication, node-b drops that link, and the agents link again.
func TestRelayCannotTakeOverTheLink(t *testing.T) {
	p, r := relayPair(t)
	first := p.b.link("node-a")
	r.inject(append([]byte{0, 0, 0, 40, 1}, bytes.Repeat([]byte{0x5a}, 39)...))
	p.b.log.waitFor(t, 5*time.Second, "peer link down", "frame failed authentication")
	eventually(t, 10*time.Second, "link back", func() bool {
		l := p.b.link("node-a")
		return l != nil && l != first
	})
}

// TestReplayedHandshakeGetsNoSession: the bytes node-a sent to open its
// link, replayed to node-b on a new connection, do not make a session:
// node-b answers with a fresh ephemeral key, so the replayed third message
// does not open.
func TestReplayedHandshakeGetsNoSession(t *testing.T) {
	p, r := relayPair(t)
	recorded := r.captured()
	conn, err := net.Dial("tcp", p.c.Nodes["node-b"].Listen)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Message 1 as node-a sent it; then, after node-b's message 2, node-a's
	// message 3 and everything after.
	n1 := 2 + int(recorded[0])<<8 + int(recorded[1])
	conn.Write(recorded[:n1])
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 2)
	if _, err := io.ReadFull(conn, hdr); err != nil {
		t.Fatalf("no message 2: %v", err)
	}
	io.ReadFull(conn, make([]byte, int(hdr[0])<<8+int(hdr[1])))
	conn.Write(recorded[n1:])
	p.b.log.waitFor(t, 5*time.Second, "peer handshake failed", "open message 3")
	// node-b never confirmed it: the connection ends without a session.
	_, err = io.ReadAll(conn)
	if err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("reading after the replay: %v", err)
	}
	if l := p.b.link("node-a"); l == nil {
		t.Fatal("the real link went down")
	}
}
