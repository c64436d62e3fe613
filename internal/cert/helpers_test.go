package cert_test

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
)

// t0 is the fixed "now" of these tests: certificates are made and checked
// against it, so no test depends on the wall clock.
var t0 = time.Date(2031, 3, 14, 15, 9, 26, 0, time.UTC)

// testCA is a CA made by InitCA in a temporary folder.
type testCA struct {
	dir  string
	cert *cert.Certificate
	key  ed25519.PrivateKey
}

// newCA makes a CA named name, valid from t0 for ten years.
func newCA(t testing.TB, name string) *testCA {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if _, err := cert.InitCA(dir, name, cert.DefaultCAValidity, t0); err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	c, key, err := cert.LoadCA(dir, t0)
	if err != nil {
		t.Fatalf("LoadCA: %v", err)
	}
	return &testCA{dir: dir, cert: c, key: key}
}

func (ca *testCA) verifier(t testing.TB) *cert.Verifier {
	t.Helper()
	v, err := cert.NewVerifier(ca.cert, t0)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	return v
}

// issue signs a node certificate for a fresh key.
func (ca *testCA) issue(t testing.TB, req cert.NodeRequest) (*cert.Certificate, *ecdh.PrivateKey) {
	t.Helper()
	if req.ValidFor == 0 {
		req.ValidFor = 24 * time.Hour
	}
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cert.IssueNode(ca.cert, ca.key, k.PublicKey(), req, t0)
	if err != nil {
		t.Fatalf("IssueNode: %v", err)
	}
	return c, k
}

// enc lays a certificate out field by field, following the layout drawn in
// cert.go, independently of the package's own encoder. Tests use it to build
// encodings that the package would never produce.
type enc struct {
	magic   string
	kind    byte
	nameLen int // -1: len(name)
	name    string
	pub     [32]byte
	nb, na  uint64
	issuer  [32]byte
	count   int // -1: len(parts)
	parts   []string
}

// encOf lays out c's fields.
func encOf(c *cert.Certificate) enc {
	return enc{
		magic:   "SINCCRT1",
		kind:    byte(c.Kind),
		nameLen: -1,
		name:    c.Name,
		pub:     c.PublicKey,
		nb:      uint64(c.NotBefore.Unix()),
		na:      uint64(c.NotAfter.Unix()),
		issuer:  c.Issuer,
		count:   -1,
		parts:   append([]string(nil), c.Partitions...),
	}
}

func (e enc) tbs() []byte {
	var b []byte
	b = append(b, e.magic...)
	b = append(b, e.kind)
	if e.nameLen < 0 {
		b = append(b, byte(len(e.name)))
	} else {
		b = append(b, byte(e.nameLen))
	}
	b = append(b, e.name...)
	b = append(b, e.pub[:]...)
	b = binary.BigEndian.AppendUint64(b, e.nb)
	b = binary.BigEndian.AppendUint64(b, e.na)
	b = append(b, e.issuer[:]...)
	if e.count < 0 {
		b = append(b, byte(len(e.parts)))
	} else {
		b = append(b, byte(e.count))
	}
	for _, p := range e.parts {
		b = append(b, byte(len(p)))
		b = append(b, p...)
	}
	return b
}

// sign returns the full encoding, signed with key.
func (e enc) sign(key ed25519.PrivateKey) []byte {
	b := e.tbs()
	return append(b, ed25519.Sign(key, b)...)
}

// decode decodes b and fails the test on error.
func decode(t testing.TB, b []byte) *cert.Certificate {
	t.Helper()
	c, err := cert.Decode(b)
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	return c
}

// wantErr fails the test unless err is non-nil and its message contains sub.
func wantErr(t testing.TB, err error, sub string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", sub)
	}
	if !strings.Contains(err.Error(), sub) {
		t.Fatalf("got error %q, want one containing %q", err, sub)
	}
}

// mustKey returns a fresh X25519 key.
func mustKey(t testing.TB) *ecdh.PrivateKey {
	t.Helper()
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
