package cert

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// A revocation list, signed by the cluster CA, names node certificates no
// agent may accept any more: by node name (every certificate of that node)
// or by fingerprint (one certificate). Its encoding:
//
//	offset  size  field
//	0       8     magic "SINCCRL1"
//	8       32    issuer: fingerprint of the CA certificate
//	40      8     issued, Unix seconds, big endian
//	48      2     entry count e (0..MaxRevocations)
//	50      e×    entry: 1 byte kind (1 node name, 2 fingerprint),
//	              1 byte length, bytes (a name, or 32 bytes)
//	.       64    Ed25519 signature of the CA over every byte before it
type Revocations struct {
	Issued       time.Time
	Nodes        []string
	Fingerprints []Fingerprint
	raw          []byte
}

const (
	crlMagic = "SINCCRL1"
	pemCRL   = "SINC REVOCATION LIST"

	// MaxRevocations bounds the entries of one list.
	MaxRevocations = 10000
	// RevocationsFile is the list's default name in a CA folder.
	RevocationsFile = "revoked.crl"

	revokeNode        = 1
	revokeFingerprint = 2
)

// Revoked reports whether c is on the list. A nil list revokes nothing.
func (r *Revocations) Revoked(c *Certificate) bool {
	if r == nil {
		return false
	}
	return slices.Contains(r.Nodes, c.Name) || slices.Contains(r.Fingerprints, c.Fingerprint())
}

// Len returns the number of entries.
func (r *Revocations) Len() int {
	if r == nil {
		return 0
	}
	return len(r.Nodes) + len(r.Fingerprints)
}

func (r *Revocations) tbs(issuer Fingerprint) []byte {
	b := append([]byte(crlMagic), issuer[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Issued.Unix()))
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Nodes)+len(r.Fingerprints)))
	for _, n := range r.Nodes {
		b = append(append(b, revokeNode, byte(len(n))), n...)
	}
	for _, f := range r.Fingerprints {
		b = append(append(b, revokeFingerprint, byte(len(f))), f[:]...)
	}
	return b
}

// ParseRevocations decodes a PEM revocation list and checks that the CA of
// v signed it.
func ParseRevocations(data []byte, v *Verifier) (*Revocations, error) {
	blk, rest := pem.Decode(data)
	if blk == nil || blk.Type != pemCRL {
		return nil, fmt.Errorf("no %q PEM block", pemCRL)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("data after the revocation list")
	}
	b := blk.Bytes
	if len(b) < len(crlMagic)+32+8+2+ed25519.SignatureSize || string(b[:len(crlMagic)]) != crlMagic {
		return nil, errors.New("not a sinc revocation list")
	}
	body, sig := b[:len(b)-ed25519.SignatureSize], b[len(b)-ed25519.SignatureSize:]
	if Fingerprint(b[8:40]) != v.fp {
		return nil, fmt.Errorf("revocation list: %w", ErrUnknownCA)
	}
	if !ed25519.Verify(v.key, body, sig) {
		return nil, errors.New("revocation list: signature does not verify with the cluster CA key")
	}
	r := &Revocations{Issued: time.Unix(int64(binary.BigEndian.Uint64(b[40:48])), 0).UTC()}
	n := int(binary.BigEndian.Uint16(b[48:50]))
	if n > MaxRevocations {
		return nil, fmt.Errorf("revocation list has %d entries, more than %d", n, MaxRevocations)
	}
	p := body[50:]
	for range n {
		if len(p) < 2 || len(p) < 2+int(p[1]) {
			return nil, errors.New("revocation list is truncated")
		}
		kind, val := p[0], p[2:2+int(p[1])]
		p = p[2+int(p[1]):]
		switch {
		case kind == revokeNode && ValidName(string(val)) == nil:
			r.Nodes = append(r.Nodes, string(val))
		case kind == revokeFingerprint && len(val) == sha256.Size:
			r.Fingerprints = append(r.Fingerprints, Fingerprint(val))
		default:
			return nil, fmt.Errorf("revocation list has a bad entry (kind %d, %d bytes)", kind, len(val))
		}
	}
	if len(p) != 0 {
		return nil, errors.New("revocation list has trailing bytes")
	}
	r.raw = slices.Clone(b)
	return r, nil
}

// LoadRevocations reads and checks the revocation list at path.
func LoadRevocations(path string, v *Verifier) (*Revocations, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r, err := ParseRevocations(data, v)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// ParseFingerprint reads a hex fingerprint.
func ParseFingerprint(s string) (Fingerprint, error) {
	var f Fingerprint
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(f) {
		return f, fmt.Errorf("%q is not a certificate fingerprint (64 hex digits)", s)
	}
	copy(f[:], b)
	return f, nil
}

// Revoke adds nodes and fingerprints to the revocation list at path (made
// if missing; an existing one must verify) and signs it anew with the CA in
// caDir.
func Revoke(caDir, path string, nodes []string, fps []Fingerprint, now time.Time) (*Revocations, error) {
	ca, key, err := LoadCA(caDir, now)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	v, err := NewVerifier(ca, now)
	if err != nil {
		return nil, err
	}
	r := &Revocations{}
	if _, err := os.Stat(path); err == nil {
		if r, err = LoadRevocations(path, v); err != nil {
			return nil, fmt.Errorf("the existing list: %w", err)
		}
	}
	for _, n := range nodes {
		if err := ValidName(n); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
		if !slices.Contains(r.Nodes, n) {
			r.Nodes = append(r.Nodes, n)
		}
	}
	for _, f := range fps {
		if !slices.Contains(r.Fingerprints, f) {
			r.Fingerprints = append(r.Fingerprints, f)
		}
	}
	if r.Len() > MaxRevocations {
		return nil, fmt.Errorf("the list would have %d entries, more than %d", r.Len(), MaxRevocations)
	}
	r.Issued = now.Truncate(time.Second)
	body := r.tbs(ca.Fingerprint())
	r.raw = append(body, ed25519.Sign(key, body)...)
	data := pem.EncodeToMemory(&pem.Block{Type: pemCRL, Bytes: r.raw})
	// Replace the file whole, so an agent never reads half a list.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".revoked-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return nil, err
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	return r, os.Rename(tmp.Name(), path)
}
