package link

import (
	"io"
	"sync/atomic"

	"github.com/flynn/noise"

	"sinc.dev/sinc/internal/x25519"
)

// dh is the Diffie-Hellman function of one handshake, handed to
// flynn/noise as its DHFunc. It computes X25519 with package x25519, which
// reads a private key where it lies — the node's key stays in its
// protected slot, with no copy made per handshake (noise.DH25519 goes
// through crypto/ecdh, which copies the key into a new heap object on
// every call). It also keeps every secret it hands to noise, the ephemeral
// private key and each DH result, so that wipe can zero them when the
// handshake is over, whatever its outcome.
//
// A dh belongs to one handshake, run by one goroutine: it is not safe for
// concurrent use.
type dh struct {
	secrets [][]byte
}

// dhCalls counts the Diffie-Hellman computations of every handshake of
// this process, the ephemeral key's included: tests use it to show that a
// refused message 1 costs none.
var dhCalls atomic.Uint64

func (d *dh) GenerateKeypair(r io.Reader) (noise.DHKey, error) {
	priv := make([]byte, x25519.Size)
	d.secrets = append(d.secrets, priv)
	if _, err := io.ReadFull(r, priv); err != nil {
		return noise.DHKey{}, err
	}
	pub := make([]byte, x25519.Size)
	dhCalls.Add(1)
	if err := x25519.PublicKey(pub, priv); err != nil {
		return noise.DHKey{}, err
	}
	return noise.DHKey{Private: priv, Public: pub}, nil
}

func (d *dh) DH(priv, pub []byte) ([]byte, error) {
	out := make([]byte, x25519.Size)
	d.secrets = append(d.secrets, out)
	dhCalls.Add(1)
	if err := x25519.ScalarMult(out, priv, pub); err != nil {
		return nil, err
	}
	return out, nil
}

func (d *dh) DHLen() int     { return x25519.Size }
func (d *dh) DHName() string { return "25519" }

// wipe zeroes every secret the handshake's DH made.
func (d *dh) wipe() {
	for _, s := range d.secrets {
		clear(s)
	}
	d.secrets = nil
}

// suite returns the handshake's cipher suite around d:
// Noise_XX_25519_AESGCM_SHA256, as noise.DH25519 would name it.
func (d *dh) suite() noise.CipherSuite {
	return noise.NewCipherSuite(d, noise.CipherAESGCM, noise.HashSHA256)
}
