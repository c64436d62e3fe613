package cert_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cert/certtest"
)

func TestRevocations(t *testing.T) {
	ca := certtest.NewCA(t)
	v := ca.Verifier(t)
	a := ca.Node(t, cert.NodeRequest{Node: "node-a"})
	b := ca.Node(t, cert.NodeRequest{Node: "node-b"})
	b2 := ca.Node(t, cert.NodeRequest{Node: "node-b"})
	path := filepath.Join(t.TempDir(), "revoked.crl")
	r, err := cert.Revoke(ca.Dir, path, []string{"node-a"}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !r.Revoked(a.Cert) || r.Revoked(b.Cert) {
		t.Fatal("node-a revoked, node-b not: wrong")
	}
	// Adding keeps what was there; a fingerprint names one certificate.
	if _, err := cert.Revoke(ca.Dir, path, nil, []cert.Fingerprint{b.Cert.Fingerprint()}, time.Now()); err != nil {
		t.Fatal(err)
	}
	r, err = cert.LoadRevocations(path, v)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Revoked(a.Cert) || !r.Revoked(b.Cert) || r.Revoked(b2.Cert) || r.Len() != 2 {
		t.Fatalf("after adding a fingerprint: %+v", r)
	}
	var nilList *cert.Revocations
	if nilList.Revoked(a.Cert) {
		t.Fatal("a nil list revoked something")
	}

	// Forgeries are refused: another CA's list, a tampered one.
	other := certtest.NewCA(t)
	otherPath := filepath.Join(t.TempDir(), "other.crl")
	if _, err := cert.Revoke(other.Dir, otherPath, []string{"node-b"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := cert.LoadRevocations(otherPath, v); err == nil || !strings.Contains(err.Error(), "unknown CA") {
		t.Fatalf("another CA's list: %v", err)
	}
	data, _ := os.ReadFile(path)
	blk := strings.Split(string(data), "\n")
	mid := blk[1]
	blk[1] = string(rune(mid[0]^1)) + mid[1:] // a flipped bit in the body
	if _, err := cert.ParseRevocations([]byte(strings.Join(blk, "\n")), v); err == nil {
		t.Fatal("a tampered list was accepted")
	}
	if _, err := cert.ParseFingerprint("xyz"); err == nil {
		t.Fatal("a bad fingerprint parsed")
	}
}

// FuzzParseRevocations: the decoder never panics, and accepts nothing it
// cannot verify (there is no CA key in the fuzzer's hands).
func FuzzParseRevocations(f *testing.F) {
	ca := certtest.NewCA(f)
	v := ca.Verifier(f)
	path := filepath.Join(f.TempDir(), "r.crl")
	if _, err := cert.Revoke(ca.Dir, path, []string{"n"}, nil, time.Now()); err != nil {
		f.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	f.Add(good)
	f.Add([]byte("-----BEGIN SINC REVOCATION LIST-----\nAAAA\n-----END SINC REVOCATION LIST-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := cert.ParseRevocations(b, v)
		if err == nil && (r.Len() != 1 || len(r.Nodes) != 1 || r.Nodes[0] != "n") {
			t.Fatalf("accepted a list that is not the signed one: %+v", r)
		}
	})
}
