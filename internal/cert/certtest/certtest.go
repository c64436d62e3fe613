// Package certtest makes cluster CAs and node identities for tests,
// including the bad ones an attacker would present.
package certtest

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"path/filepath"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
)

// CA is a cluster CA held in memory.
type CA struct {
	Cert *cert.Certificate
	Key  ed25519.PrivateKey
	Dir  string // where ca.crt and ca.key are
}

// NewCA makes a CA in a fresh temporary folder.
func NewCA(t testing.TB) *CA {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := cert.InitCA(dir, "test-ca", cert.DefaultCAValidity, time.Now()); err != nil {
		t.Fatal(err)
	}
	c, key, err := cert.LoadCA(dir, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &CA{Cert: c, Key: key, Dir: dir}
}

// Verifier returns a verifier for the CA.
func (ca *CA) Verifier(t testing.TB) *cert.Verifier {
	t.Helper()
	v, err := cert.NewVerifier(ca.Cert, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Node is a node's key and certificate.
type Node struct {
	Key  *ecdh.PrivateKey
	Cert *cert.Certificate
}

// NewKey returns a fresh X25519 key.
func NewKey(t testing.TB) *ecdh.PrivateKey {
	t.Helper()
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Node issues a certificate for a new key, valid from an hour ago for a day,
// unless req says otherwise.
func (ca *CA) Node(t testing.TB, req cert.NodeRequest) *Node {
	t.Helper()
	if req.ValidFor == 0 {
		req.ValidFor = 24 * time.Hour
	}
	if req.NotBefore.IsZero() {
		req.NotBefore = time.Now().Add(-time.Hour)
	}
	if len(req.Partitions) == 0 {
		req.Partitions = []string{"p1"}
	}
	k := NewKey(t)
	c, err := cert.IssueNode(ca.Cert, ca.Key, k.PublicKey(), req, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &Node{Key: k, Cert: c}
}
