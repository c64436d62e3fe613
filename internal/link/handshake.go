package link

import (
	"crypto/ecdh"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/flynn/noise"

	"sinc.dev/sinc/internal/cert"
)

// The handshake: Noise_XX, with a mac1 on message 1 and a hello payload
// in messages 2 and 3.
//
//	initiator                                   responder
//	    -> e, mac1                                  (msg 1)
//	                                            check mac1 (mac1.go): a
//	                                            message 1 without a valid
//	                                            mac1 is refused here, with no
//	                                            DH, no Noise state, no reply
//	    <- e, ee, s, es, {hello: instance, cert}    (msg 2)
//	    -> s, se, {hello: instance, cert}           (msg 3)
//	    <- control frame: accept | reject(reason)
//
// Message 1 is exactly this (msg1Len bytes after the length):
//
//	 0       2                                    34                50
//	 +-------+------------------------------------+-----------------+
//	 |  48   |  e: the initiator's ephemeral      |  mac1 = HMAC(   |
//	 |       |  X25519 public key (32)            |  CA key, e)[:16]|
//	 +-------+------------------------------------+-----------------+
//
// Messages 2 and 3 travel as a 2-byte big-endian length and the message.
// Each side checks the other's certificate (cluster CA, validity now,
// certificate key = Noise static key) and its name: the initiator wants
// the node it meant to dial, the responder's caller decides whether the
// node is a configured peer (Accept returns the link pending, to Confirm
// or Refuse). The last step lets the responder
// refuse with a reason the initiator can log, and lets the agent keep one
// link per peer pair. A responder behind a Gate (gate.go) also tells it
// when message 1's mac1 held, so that a flood's handshakes are the ones it
// evicts.
//
// Keys: every Diffie-Hellman goes through dh (dh.go), which reads the
// node's private key in place — it stays in the agent's protected memory,
// copied nowhere — and zeroes the ephemeral private key and each DH result
// when the handshake ends, whatever its outcome. What flynn/noise keeps of
// its own (chaining key, handshake hash, the session keys' cipher states)
// stays in the heap until reused: docs/threat-model.md says what remains.

// msg1Len is message 1's length: e and mac1.
const msg1Len = 32 + mac1Len

// Config is one agent's side of its links.
type Config struct {
	// The node's static X25519 key pair. Private should live in protected
	// memory (package secret): every handshake reads it there, in place
	// (package x25519), and copies it nowhere.
	Private, Public []byte
	Cert            *cert.Certificate // node's certificate, for Public
	Verifier        *cert.Verifier    // the cluster CA
	Instance        [InstanceSize]byte

	HandshakeTimeout time.Duration // whole handshake, accept frame included
	Keepalive        time.Duration // send a keepalive when idle this long
	DeadAfter        time.Duration // drop the link when nothing arrived this long

	Now func() time.Time // clock for certificate validity; nil: time.Now

	// Check, if set, is asked about every peer certificate that verified
	// (revocation): an error refuses the handshake.
	Check func(*cert.Certificate) error
}

func (c *Config) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *Config) handshakeTimeout() time.Duration {
	if c.HandshakeTimeout > 0 {
		return c.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// KeyPair returns the raw private and public key of k, for Config: for
// tests. The private bytes are a heap copy; an agent reads its key into
// protected memory (cert.ReadNodeKey) and derives the public key from it
// (x25519.PublicKey).
func KeyPair(k *ecdh.PrivateKey) (private, public []byte) {
	return k.Bytes(), k.PublicKey().Bytes()
}

// NewInstance returns a fresh random instance id.
func NewInstance() (id [InstanceSize]byte) {
	rand.Read(id[:])
	return id
}

// HandshakeError is a handshake that failed, with the step and the reason.
type HandshakeError struct {
	Peer string // the remote address
	Step string
	Err  error
}

func (e *HandshakeError) Error() string {
	return fmt.Sprintf("handshake with %s: %s: %v", e.Peer, e.Step, e.Err)
}

func (e *HandshakeError) Unwrap() error { return e.Err }

// Reason names why the handshake failed, from a fixed set of constants,
// for counters and log lines: evicted, per_source, closing (the gate
// closed), bad_mac, malformed, timeout, closed, auth (a certificate, name or key that did not check, or
// a message that failed to open), refused (by the peer) or failed.
func (e *HandshakeError) Reason() string {
	var ne net.Error
	switch {
	case errors.Is(e.Err, ErrEvictedPerSource):
		return "per_source"
	case errors.Is(e.Err, ErrEvicted):
		return "evicted"
	case errors.Is(e.Err, ErrGateClosed):
		return "closing"
	case errors.Is(e.Err, ErrBadMAC):
		return "bad_mac"
	case errors.Is(e.Err, ErrMalformed):
		return "malformed"
	case errors.As(e.Err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(e.Err, ErrRefused):
		return "refused"
	case errors.Is(e.Err, io.EOF), errors.Is(e.Err, io.ErrUnexpectedEOF), errors.Is(e.Err, syscall.ECONNRESET),
		errors.Is(e.Err, syscall.EPIPE), errors.Is(e.Err, net.ErrClosed):
		return "closed"
	}
	switch e.Step {
	case "open message 2", "open message 3", "check responder", "check initiator", "read verdict":
		return "auth"
	}
	return "failed"
}

// Handshake errors a caller can test for.
var (
	ErrStaticKeyMismatch = errors.New("certificate key does not match the handshake's static key")
	ErrWrongNode         = errors.New("certificate names a different node")
	ErrRefused           = errors.New("refused by peer")
)

func (c *Config) noiseConfig(initiator bool, d *dh) noise.Config {
	return noise.Config{
		CipherSuite:   d.suite(),
		Random:        rand.Reader,
		Pattern:       noise.HandshakeXX,
		Initiator:     initiator,
		Prologue:      []byte(prologue),
		StaticKeypair: noise.DHKey{Private: c.Private, Public: c.Public},
	}
}

// checkPeer verifies the hello a peer sent in the handshake hs.
func (c *Config) checkPeer(hs *noise.HandshakeState, payload []byte) (*hello, error) {
	h, err := parseHello(payload)
	if err != nil {
		return nil, err
	}
	if err := c.Verifier.Verify(h.cert, c.now()); err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(hs.PeerStatic(), h.cert.PublicKey[:]) != 1 {
		return nil, fmt.Errorf("node %q: %w", h.cert.Name, ErrStaticKeyMismatch)
	}
	if c.Check != nil {
		if err := c.Check(h.cert); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// Dial runs the initiator's handshake on conn with a node expected to be
// named peer. On success the link is up; on failure conn is closed.
func Dial(conn net.Conn, c *Config, peer string) (*Link, error) {
	l, err := dial(conn, c, peer)
	if err != nil {
		conn.Close()
		return nil, &HandshakeError{Peer: conn.RemoteAddr().String(), Step: err.step, Err: err.err}
	}
	return l, nil
}

type stepError struct {
	step string
	err  error
}

func dial(conn net.Conn, c *Config, peer string) (*Link, *stepError) {
	conn.SetDeadline(time.Now().Add(c.handshakeTimeout()))
	d := &dh{}
	defer d.wipe()
	hs, err := noise.NewHandshakeState(c.noiseConfig(true, d))
	if err != nil {
		return nil, &stepError{"setup", err}
	}
	msg, _, _, err := hs.WriteMessage(nil, nil)
	if err != nil {
		return nil, &stepError{"message 1", err}
	}
	if err := writeHandshake(conn, c.appendMAC1(msg)); err != nil {
		return nil, &stepError{"send message 1", err}
	}
	msg, err = readHandshake(conn)
	if err != nil {
		return nil, &stepError{"read message 2", err}
	}
	payload, _, _, err := hs.ReadMessage(nil, msg)
	if err != nil {
		return nil, &stepError{"open message 2", err}
	}
	h, err := c.checkPeer(hs, payload)
	if err != nil {
		return nil, &stepError{"check responder", err}
	}
	if h.cert.Name != peer {
		return nil, &stepError{"check responder", fmt.Errorf("%w: dialed %q, certificate is for %q", ErrWrongNode, peer, h.cert.Name)}
	}
	msg, send, recv, err := hs.WriteMessage(nil, (&hello{c.Instance, c.Cert}).marshal())
	if err != nil {
		return nil, &stepError{"message 3", err}
	}
	if err := writeHandshake(conn, msg); err != nil {
		return nil, &stepError{"send message 3", err}
	}
	l, err := newLink(conn, c, h, true, send, recv)
	if err != nil {
		return nil, &stepError{"keys", err}
	}
	// The responder's verdict is the first control frame.
	m, err := l.readControl()
	if err != nil {
		l.zero()
		return nil, &stepError{"read verdict", err}
	}
	switch op, body := m[0], m[1:]; op {
	case opAccept:
	case opReject:
		l.zero()
		return nil, &stepError{"verdict", fmt.Errorf("%w: %s", ErrRefused, body)}
	default:
		l.zero()
		return nil, &stepError{"verdict", fmt.Errorf("unexpected control op %d", op)}
	}
	conn.SetDeadline(time.Time{})
	return l, nil
}

// Accept runs the responder's handshake on conn. On success the link is
// authenticated but pending: the caller must Confirm or Refuse it. On failure
// conn is closed.
func Accept(conn net.Conn, c *Config) (*Link, error) {
	return acceptOn(conn, c, nil)
}

// Accept runs the responder's handshake on the ticket's connection, as
// Accept does, and takes the ticket out of its gate when it ends. If the
// gate evicted the handshake, the error wraps why (ErrEvicted,
// ErrEvictedPerSource).
func (t *Ticket) Accept(c *Config) (*Link, error) {
	return acceptOn(t.conn, c, t)
}

func acceptOn(conn net.Conn, c *Config, t *Ticket) (*Link, error) {
	l, serr := accept(conn, c, t)
	if ev := t.release(); ev != nil {
		if l != nil {
			l.Close(ev)
			l = nil
		}
		step := "handshake"
		if serr != nil {
			step = serr.step
		}
		serr = &stepError{step, ev}
	}
	if serr != nil {
		conn.Close()
		return nil, &HandshakeError{Peer: conn.RemoteAddr().String(), Step: serr.step, Err: serr.err}
	}
	return l, nil
}

func accept(conn net.Conn, c *Config, t *Ticket) (*Link, *stepError) {
	conn.SetDeadline(time.Now().Add(c.handshakeTimeout()))
	// Message 1, checked before anything is spent on it: its length, then
	// its mac1.
	var m1 [2 + msg1Len]byte
	if _, err := io.ReadFull(conn, m1[:2]); err != nil {
		return nil, &stepError{"read message 1", err}
	}
	if n := binary.BigEndian.Uint16(m1[:2]); n != msg1Len {
		return nil, &stepError{"read message 1", fmt.Errorf("%w (length %d, want %d)", ErrMalformed, n, msg1Len)}
	}
	if _, err := io.ReadFull(conn, m1[2:]); err != nil {
		return nil, &stepError{"read message 1", err}
	}
	if !c.checkMAC1(m1[2:]) {
		return nil, &stepError{"check message 1", ErrBadMAC}
	}
	t.markKnown()

	d := &dh{}
	defer d.wipe()
	hs, err := noise.NewHandshakeState(c.noiseConfig(false, d))
	if err != nil {
		return nil, &stepError{"setup", err}
	}
	if _, _, _, err := hs.ReadMessage(nil, m1[2:2+32]); err != nil {
		return nil, &stepError{"open message 1", err}
	}
	msg, _, _, err := hs.WriteMessage(nil, (&hello{c.Instance, c.Cert}).marshal())
	if err != nil {
		return nil, &stepError{"message 2", err}
	}
	if err := writeHandshake(conn, msg); err != nil {
		return nil, &stepError{"send message 2", err}
	}
	msg, err = readHandshake(conn)
	if err != nil {
		return nil, &stepError{"read message 3", err}
	}
	payload, recv, send, err := hs.ReadMessage(nil, msg)
	if err != nil {
		return nil, &stepError{"open message 3", err}
	}
	h, err := c.checkPeer(hs, payload)
	if err != nil {
		return nil, &stepError{"check initiator", err}
	}
	l, err := newLink(conn, c, h, false, send, recv)
	if err != nil {
		return nil, &stepError{"keys", err}
	}
	return l, nil
}

// Confirm sends the accept verdict on a link from Accept; the link is up.
func (l *Link) Confirm() error {
	if err := l.sendControl([]byte{opAccept}); err != nil {
		l.Close(err)
		return err
	}
	l.conn.SetDeadline(time.Time{})
	return nil
}

// Refuse sends a reject verdict with reason and closes the link.
func (l *Link) Refuse(reason string) {
	l.sendControl(append([]byte{opReject}, truncate(reason, 200)...))
	l.Close(fmt.Errorf("refused: %s", reason))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

func writeHandshake(w io.Writer, msg []byte) error {
	b := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	copy(b[2:], msg)
	_, err := w.Write(b)
	return err
}

func readHandshake(r io.Reader) ([]byte, error) {
	var n [2]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(n[:]))
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, err
	}
	return msg, nil
}
