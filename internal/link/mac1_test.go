package link

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cert/certtest"
)

// TestMessage1WithoutMAC sends message 1s an outsider could make — TCP
// garbage, random bytes of the right length, a well-formed message 1 with
// a random MAC, one whose MAC is keyed by another cluster's CA, a real
// one with a bit flipped — and checks each is refused at once, named
// (malformed or bad_mac), with no Diffie-Hellman computed and nothing sent
// back. A real initiator on the same responder then links.
func TestMessage1WithoutMAC(t *testing.T) {
	s := newSetup(t)
	s.bc.HandshakeTimeout = 3 * time.Second
	other := certtest.NewCA(t)
	otherCfg := side(t, other, other.Node(t, cert.NodeRequest{Node: "node-a"}))

	withMAC := func(c *Config) []byte {
		e := make([]byte, 32)
		rand.Read(e)
		return append(binary.BigEndian.AppendUint16(nil, msg1Len), c.appendMAC1(e)...)
	}
	flipped := withMAC(s.ac)
	flipped[2+msg1Len-1] ^= 1
	random := binary.BigEndian.AppendUint16(nil, msg1Len)
	random = append(random, make([]byte, msg1Len)...)
	rand.Read(random[2:])
	for _, tc := range []struct {
		name, reason string
		msg          []byte
	}{
		{"HTTP request", "malformed", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
		{"old protocol's message 1 (no mac1)", "malformed", append([]byte{0, 32}, make([]byte, 32)...)},
		{"empty message", "malformed", []byte{0, 0}},
		{"random bytes of the right length", "bad_mac", random},
		{"another cluster's mac1", "bad_mac", withMAC(otherCfg)},
		{"a real message 1, one bit flipped", "bad_mac", flipped},
	} {
		ln := listen(t)
		acc := serveOne(ln, s.bc)
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		before := dhCalls.Load()
		start := time.Now()
		conn.Write(tc.msg)
		r := <-acc
		took := time.Since(start)
		var he *HandshakeError
		if !errors.As(r.err, &he) || he.Reason() != tc.reason {
			t.Fatalf("%s: err %v, want reason %s", tc.name, r.err, tc.reason)
		}
		if took > time.Second {
			t.Errorf("%s: refused after %s, not at once", tc.name, took)
		}
		if n := dhCalls.Load() - before; n != 0 {
			t.Errorf("%s: the responder computed %d Diffie-Hellman(s) for it", tc.name, n)
		}
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		// A close with unread bytes left is a reset: either way, no
		// byte comes back.
		if got, err := io.ReadAll(conn); (err != nil && !errors.Is(err, syscall.ECONNRESET)) || len(got) != 0 {
			t.Errorf("%s: the responder answered %d bytes (%v), want a close and nothing", tc.name, len(got), err)
		}
		conn.Close()
	}

	// The control: a message 1 with the cluster's mac1 gets its
	// Diffie-Hellmans and a link.
	before := dhCalls.Load()
	a, _ := s.up(t)
	if a == nil || dhCalls.Load()-before < 6 {
		t.Fatalf("a real handshake computed %d Diffie-Hellmans", dhCalls.Load()-before)
	}
}

// TestMAC1Key: the key depends on the cluster CA's public key and nothing
// of the node.
func TestMAC1Key(t *testing.T) {
	s := newSetup(t)
	other := certtest.NewCA(t)
	if mac1Key(s.ac.Verifier.CA) != mac1Key(s.bc.Verifier.CA) {
		t.Fatal("two nodes of one cluster derive different mac1 keys")
	}
	if mac1Key(s.ac.Verifier.CA) == mac1Key(other.Cert) {
		t.Fatal("two clusters derive the same mac1 key")
	}
	m := s.ac.appendMAC1([]byte("e"))
	if !s.bc.checkMAC1(m) || s.bc.checkMAC1(m[:len(m)-1]) || s.bc.checkMAC1(nil) {
		t.Fatal("checkMAC1")
	}
}
