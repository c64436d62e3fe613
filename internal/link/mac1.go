package link

import (
	"crypto/hmac"
	"crypto/sha256"
	"errors"

	"sinc.dev/sinc/internal/cert"
)

// mac1 is the responder's first, cheap check, in the spirit of WireGuard's
// mac1 (the WireGuard paper, "Cookie MACs"): the initiator's
// message 1 ends with a MAC of the message under a key every node of the
// cluster can derive from the cluster CA's public key, and nobody else can
// guess. A responder checks it — one HMAC, no Diffie-Hellman, no handshake
// state — before it does anything else; a message 1 without the right MAC
// is refused at once. So a flood from outside the cluster costs each
// agent a TCP accept and an HMAC per connection, and never a Diffie-Hellman
// or a Noise state.
//
// The CA's public key is not secret inside the cluster (every node's
// config names the CA certificate), so mac1 is no authentication: it keeps
// out whoever does not know which cluster they are talking to. A copy of a
// real message 1 (a tap on the path) passes it again; such a replay costs
// the responder one handshake's work up to message 2 and holds a slot the
// gate (gate.go) can evict.
//
//	mac1 key = SHA-256(mac1Label ‖ CA public key)
//	mac1     = HMAC-SHA-256(mac1 key, e)[:mac1Len]
const (
	mac1Label = "sinc peer link v2 mac1"
	mac1Len   = 16
)

// Message 1 errors.
var (
	ErrMalformed = errors.New("message 1 is not a sinc handshake message")
	ErrBadMAC    = errors.New("message 1 carries no valid mac1 (not from this cluster)")
)

// mac1Key derives the mac1 key from the cluster CA.
func mac1Key(ca *cert.Certificate) [sha256.Size]byte {
	h := sha256.New()
	h.Write([]byte(mac1Label))
	h.Write(ca.PublicKey[:])
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// appendMAC1 appends the mac1 of msg to msg.
func (c *Config) appendMAC1(msg []byte) []byte {
	k := mac1Key(c.Verifier.CA)
	m := hmac.New(sha256.New, k[:])
	m.Write(msg)
	return append(msg, m.Sum(nil)[:mac1Len]...)
}

// checkMAC1 reports whether msg ends with a valid mac1 of the rest, in
// constant time.
func (c *Config) checkMAC1(msg []byte) bool {
	if len(msg) < mac1Len {
		return false
	}
	body, tag := msg[:len(msg)-mac1Len], msg[len(msg)-mac1Len:]
	k := mac1Key(c.Verifier.CA)
	m := hmac.New(sha256.New, k[:])
	m.Write(body)
	return hmac.Equal(m.Sum(nil)[:mac1Len], tag)
}
