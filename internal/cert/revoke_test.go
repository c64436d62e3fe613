package cert_test

import (
	"crypto/ed25519"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
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
	f.Add(signList(ca, nil, time.Now(), "n")) // version 1
	f.Add([]byte("-----BEGIN SINC REVOCATION LIST-----\nAAAA\n-----END SINC REVOCATION LIST-----\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := cert.ParseRevocations(b, v)
		if err == nil && (r.Len() != 1 || len(r.Nodes) != 1 || r.Nodes[0] != "n") {
			t.Fatalf("accepted a list that is not the signed one: %+v", r)
		}
	})
}

// signList encodes and signs a list by hand, as the format comment draws
// it: version 1 (magic "SINCCRL1", no serial) when serial is nil.
func signList(ca *certtest.CA, serial *uint64, issued time.Time, nodes ...string) []byte {
	b := []byte("SINCCRL2")
	if serial == nil {
		b = []byte("SINCCRL1")
	}
	fp := ca.Cert.Fingerprint()
	b = append(b, fp[:]...)
	if serial != nil {
		b = binary.BigEndian.AppendUint64(b, *serial)
	}
	b = binary.BigEndian.AppendUint64(b, uint64(issued.Unix()))
	b = binary.BigEndian.AppendUint16(b, uint16(len(nodes)))
	for _, n := range nodes {
		b = append(append(b, 1, byte(len(n))), n...)
	}
	b = append(b, ed25519.Sign(ca.Key, b)...)
	return pem.EncodeToMemory(&pem.Block{Type: "SINC REVOCATION LIST", Bytes: b})
}

func mustParse(t *testing.T, data []byte, v *cert.Verifier) *cert.Revocations {
	t.Helper()
	r, err := cert.ParseRevocations(data, v)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestRevocationSerials: each Revoke signs under the next serial; lists
// are ordered by it; two different lists under one serial are an error.
func TestRevocationSerials(t *testing.T) {
	ca := certtest.NewCA(t)
	v := ca.Verifier(t)
	path := filepath.Join(t.TempDir(), "revoked.crl")
	var lists []*cert.Revocations
	for i, n := range []string{"node-a", "node-b", "node-a"} {
		r, err := cert.Revoke(ca.Dir, path, []string{n}, nil, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		if r.Serial != uint64(i+1) {
			t.Fatalf("revoke %d: serial %d, want %d", i+1, r.Serial, i+1)
		}
		lists = append(lists, r)
	}
	r3, err := cert.LoadRevocations(path, v)
	if err != nil {
		t.Fatal(err)
	}
	if r3.Serial != 3 || r3.Len() != 2 {
		t.Fatalf("loaded: serial %d, %d entries; want 3, 2", r3.Serial, r3.Len())
	}
	var none *cert.Revocations
	for _, tc := range []struct {
		name string
		r, o *cert.Revocations
		want int
	}{
		{"newer", lists[1], lists[0], +1},
		{"older", lists[0], lists[2], -1},
		{"same list, read back", r3, lists[2], 0},
		{"against none", lists[0], none, +1},
		{"none against one", none, lists[0], -1},
	} {
		if got, err := tc.r.Compare(tc.o); got != tc.want || err != nil {
			t.Errorf("%s: Compare = %d, %v; want %d", tc.name, got, err, tc.want)
		}
	}

	// A fork: serial 2 made again from a copy of list 1, revoking another
	// node. Neither list may replace the other.
	fork := filepath.Join(t.TempDir(), "fork.crl")
	if err := lists[0].WriteFile(fork, 0o644); err != nil {
		t.Fatal(err)
	}
	f2, err := cert.Revoke(ca.Dir, fork, []string{"node-c"}, nil, time.Now())
	if err != nil || f2.Serial != 2 {
		t.Fatalf("fork: serial %d, %v", f2.Serial, err)
	}
	for _, pair := range [][2]*cert.Revocations{{f2, lists[1]}, {lists[1], f2}} {
		if _, err := pair[0].Compare(pair[1]); !errors.Is(err, cert.ErrSerialReused) {
			t.Fatalf("two different lists under serial 2: %v, want ErrSerialReused", err)
		}
	}
}

// TestRevocationsVersion1: a list of the first version reads as serial 0,
// comes before every version 2 list, and among its kind by issue time; the
// next Revoke turns it into serial 1 and keeps its entries. A version 2
// list may not claim serial 0.
func TestRevocationsVersion1(t *testing.T) {
	ca := certtest.NewCA(t)
	v := ca.Verifier(t)
	now := time.Now().Truncate(time.Second)
	old := mustParse(t, signList(ca, nil, now.Add(-time.Hour), "node-a"), v)
	if old.Serial != 0 || !old.Issued.Equal(now.Add(-time.Hour)) || len(old.Nodes) != 1 || old.Nodes[0] != "node-a" {
		t.Fatalf("version 1 list: %+v", old)
	}
	later := mustParse(t, signList(ca, nil, now, "node-b"), v)
	if c, err := later.Compare(old); c != +1 || err != nil {
		t.Fatalf("the later version 1 list: Compare = %d, %v; want +1", c, err)
	}
	twin := mustParse(t, signList(ca, nil, now.Add(-time.Hour), "node-c"), v)
	if _, err := twin.Compare(old); !errors.Is(err, cert.ErrSerialReused) {
		t.Fatalf("two version 1 lists of one second: %v, want ErrSerialReused", err)
	}
	path := filepath.Join(t.TempDir(), "revoked.crl")
	if err := later.WriteFile(path, 0o644); err != nil {
		t.Fatal(err)
	}
	next, err := cert.Revoke(ca.Dir, path, []string{"node-d"}, nil, now)
	if err != nil {
		t.Fatal(err)
	}
	if next.Serial != 1 || strings.Join(next.Nodes, ",") != "node-b,node-d" {
		t.Fatalf("after a version 1 list: serial %d, nodes %v; want 1, [node-b node-d]", next.Serial, next.Nodes)
	}
	if c, err := later.Compare(next); c != -1 || err != nil {
		t.Fatalf("version 1 against serial 1: Compare = %d, %v; want -1", c, err)
	}
	// The same bytes with the version 2 magic would not verify; a list
	// signed as version 2 with serial 0 is refused.
	zero := uint64(0)
	if _, err := cert.ParseRevocations(signList(ca, &zero, now, "node-a"), v); err == nil || !strings.Contains(err.Error(), "serial 0") {
		t.Fatalf("version 2 with serial 0: %v", err)
	}
	one := uint64(1)
	if r := mustParse(t, signList(ca, &one, now, "node-a"), v); r.Serial != 1 {
		t.Fatalf("hand-made version 2 list: serial %d", r.Serial)
	}
}

// TestRevocationsFileBounds: the largest list fits the file bound and
// loads; a larger file, or one that is not a regular file (a FIFO would
// block a reader), is refused with its name and reason.
func TestRevocationsFileBounds(t *testing.T) {
	ca := certtest.NewCA(t)
	v := ca.Verifier(t)
	dir := t.TempDir()
	big := filepath.Join(dir, "big.crl")
	nodes := make([]string, cert.MaxRevocations)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("%063d", i)
	}
	if _, err := cert.Revoke(ca.Dir, big, nodes, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(big)
	if st.Size() > cert.MaxRevocationsFileSize {
		t.Fatalf("the largest list is %d bytes, more than the bound %d", st.Size(), cert.MaxRevocationsFileSize)
	}
	if r, err := cert.LoadRevocations(big, v); err != nil || r.Len() != cert.MaxRevocations {
		t.Fatalf("the largest list: %v", err)
	}
	if _, err := cert.Revoke(ca.Dir, big, []string{"one-more"}, nil, time.Now()); err == nil {
		t.Fatal("a list over MaxRevocations was signed")
	}
	huge := filepath.Join(dir, "huge.crl")
	os.WriteFile(huge, make([]byte, cert.MaxRevocationsFileSize+1), 0o644)
	if _, err := cert.LoadRevocations(huge, v); err == nil || !strings.Contains(err.Error(), huge) || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("an oversized file: %v", err)
	}
	fifo := filepath.Join(dir, "fifo.crl")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := cert.LoadRevocations(fifo, v); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("a FIFO: %v", err)
		}
	case <-time.After(5 * time.Second):
		os.WriteFile(fifo, nil, 0) // unblock the reader
		t.Fatal("reading a FIFO as the list blocked")
	}
}

// TestRevocationsWriteFile: the file is replaced whole, with the mode
// asked, and no temporary file is left.
func TestRevocationsWriteFile(t *testing.T) {
	ca := certtest.NewCA(t)
	v := ca.Verifier(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "revoked.crl")
	r, err := cert.Revoke(ca.Dir, path, []string{"node-a"}, nil, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	copyPath := filepath.Join(dir, "copy.crl")
	os.WriteFile(copyPath, []byte("an older file"), 0o644)
	if err := r.WriteFile(copyPath, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(copyPath)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("the copy: %v, %v; want mode 0600", st, err)
	}
	back, err := cert.LoadRevocations(copyPath, v)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := back.Compare(r); c != 0 || err != nil {
		t.Fatalf("the copy read back: Compare = %d, %v; want the same list", c, err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Fatalf("files left in the folder: %v", ents)
	}
}
