package cert_test

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
)

const policyBody = "[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/pg\"\nuids = [1000]\n"

// polEnc lays a policy document out field by field, following the layout
// drawn in policy.go, independently of the package's encoder, to build
// documents the package would never sign.
type polEnc struct {
	magic  string
	issuer [32]byte
	serial uint64
	issued uint64
	n      int // -1: len(body)
	body   []byte
}

func (e polEnc) sign(key ed25519.PrivateKey) []byte {
	b := append([]byte(e.magic), e.issuer[:]...)
	b = binary.BigEndian.AppendUint64(b, e.serial)
	b = binary.BigEndian.AppendUint64(b, e.issued)
	n := e.n
	if n < 0 {
		n = len(e.body)
	}
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = append(b, e.body...)
	return append(b, ed25519.Sign(key, b)...)
}

func polPEM(raw []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "SINC CLUSTER POLICY", Bytes: raw})
}

// TestPolicyRoundTrip: a signed document reads back as signed, through PEM
// and through a file; the next serial orders after it.
func TestPolicyRoundTrip(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	p, err := cert.SignPolicy(ca.dir, []byte(policyBody), 0, t0)
	if err != nil {
		t.Fatal(err)
	}
	if p.Serial != 1 || string(p.Body) != policyBody || !p.Issued.Equal(t0) {
		t.Fatalf("signed: serial %d, issued %v, body %q", p.Serial, p.Issued, p.Body)
	}
	q, err := cert.ParsePolicy(p.EncodePEM(), v)
	if err != nil {
		t.Fatal(err)
	}
	if q.Serial != 1 || string(q.Body) != policyBody || !q.Issued.Equal(t0) {
		t.Fatalf("parsed: serial %d, issued %v, body %q", q.Serial, q.Issued, q.Body)
	}
	if c, err := q.Compare(p); c != 0 || err != nil {
		t.Fatalf("Compare with itself = %d, %v", c, err)
	}
	path := filepath.Join(t.TempDir(), cert.PolicyFile)
	if err := p.WriteFile(path, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := cert.LoadPolicy(path, v)
	if err != nil || !bytes.Equal(f.EncodePEM(), p.EncodePEM()) {
		t.Fatalf("LoadPolicy: %v", err)
	}

	next, err := cert.SignPolicy(ca.dir, []byte(""), p.Serial, t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if next.Serial != 2 {
		t.Fatalf("next serial %d, want 2", next.Serial)
	}
	if c, err := next.Compare(p); c != +1 || err != nil {
		t.Fatalf("newer.Compare(older) = %d, %v", c, err)
	}
	if c, err := p.Compare(next); c != -1 || err != nil {
		t.Fatalf("older.Compare(newer) = %d, %v", c, err)
	}
	var none *cert.Policy
	if c, _ := none.Compare(p); c != -1 {
		t.Fatalf("nil.Compare = %d", c)
	}
	// Two documents under one serial (two copies of a CA folder): an error.
	twin, err := cert.SignPolicy(ca.dir, []byte("# other\n"), 0, t0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := twin.Compare(p); !errors.Is(err, cert.ErrPolicySerialReused) {
		t.Fatalf("same serial, other text: %v", err)
	}
	if _, err := cert.SignPolicy(ca.dir, nil, math.MaxUint64, t0); err == nil {
		t.Fatal("signed past the last serial")
	}
}

// TestPolicyForgeries: a document not signed by the cluster CA, or changed
// after signing, is refused.
func TestPolicyForgeries(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	other := newCA(t, "other")
	p, err := cert.SignPolicy(ca.dir, []byte(policyBody), 0, t0)
	if err != nil {
		t.Fatal(err)
	}

	// Another CA's document.
	o, err := cert.SignPolicy(other.dir, []byte(policyBody), 0, t0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.ParsePolicy(o.EncodePEM(), v); !errors.Is(err, cert.ErrUnknownCA) {
		t.Fatalf("another CA's document: %v", err)
	}
	// Another CA's signature over a document naming our CA as issuer.
	forged := polEnc{magic: "SINCPOL1", issuer: ca.cert.Fingerprint(), serial: 9, issued: uint64(t0.Unix()), n: -1, body: []byte(policyBody)}
	if _, err := cert.ParsePolicy(polPEM(forged.sign(other.key)), v); err == nil || !strings.Contains(err.Error(), "signature") {
		t.Fatalf("another CA's signature: %v", err)
	}

	// Every single flipped bit of the encoding.
	blk, _ := pem.Decode(p.EncodePEM())
	for i := range blk.Bytes {
		for _, bit := range []byte{0x01, 0x80} {
			b := bytes.Clone(blk.Bytes)
			b[i] ^= bit
			if _, err := cert.ParsePolicy(polPEM(b), v); err == nil {
				t.Fatalf("byte %d flipped (%#x): accepted", i, bit)
			}
		}
	}
	// Cut short, or grown by a byte.
	for _, b := range [][]byte{blk.Bytes[:len(blk.Bytes)-1], append(bytes.Clone(blk.Bytes), 0), blk.Bytes[:10], nil} {
		if _, err := cert.ParsePolicy(polPEM(b), v); err == nil {
			t.Fatalf("%d bytes: accepted", len(b))
		}
	}
	good := p.EncodePEM()
	for name, data := range map[string][]byte{
		"trailing garbage":   append(bytes.Clone(good), "x"...),
		"a second block":     append(bytes.Clone(good), good...),
		"PEM headers":        bytes.Replace(good, []byte("-----\n"), []byte("-----\nProc-Type: 4,ENCRYPTED\n\n"), 1),
		"another PEM type":   bytes.ReplaceAll(good, []byte("SINC CLUSTER POLICY"), []byte("SINC REVOCATION LIST")),
		"not PEM":            []byte(policyBody),
		"empty":              nil,
		"over the file size": append(bytes.Clone(good), bytes.Repeat([]byte(" "), cert.MaxPolicyFileSize)...),
	} {
		if _, err := cert.ParsePolicy(data, v); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// White space around the block is fine.
	if _, err := cert.ParsePolicy(append(append([]byte("\n \n"), good...), "\n\n"...), v); err != nil {
		t.Fatalf("white space around the block: %v", err)
	}
}

// TestPolicyStructure: documents signed by the CA key itself but laid out
// wrongly are refused, each with its reason: the checks behind the
// signature hold even if the signer (a bug, an old tool) errs.
func TestPolicyStructure(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	base := polEnc{magic: "SINCPOL1", issuer: ca.cert.Fingerprint(), serial: 1, issued: uint64(t0.Unix()), n: -1, body: []byte(policyBody)}
	if _, err := cert.ParsePolicy(polPEM(base.sign(ca.key)), v); err != nil {
		t.Fatalf("the test's own encoding is refused: %v", err)
	}
	for _, c := range []struct {
		name string
		edit func(*polEnc)
		want string
	}{
		{"serial 0", func(e *polEnc) { e.serial = 0 }, "serial 0"},
		{"length short", func(e *polEnc) { e.n = len(e.body) - 1 }, "holds"},
		{"length long", func(e *polEnc) { e.n = len(e.body) + 1 }, "holds"},
		{"length huge", func(e *polEnc) { e.n = math.MaxUint32 }, "more than"},
		{"body over the bound", func(e *polEnc) { e.body = bytes.Repeat([]byte("#"), cert.MaxPolicyBody+1) }, "more than"},
		{"body not UTF-8", func(e *polEnc) { e.body = []byte("from = \"\xff\"") }, "UTF-8"},
		{"body with NUL", func(e *polEnc) { e.body = []byte("a\x00b") }, "NUL"},
		{"other magic", func(e *polEnc) { e.magic = "SINCCRL2" }, "not a sinc cluster policy"},
	} {
		e := base
		c.edit(&e)
		_, err := cert.ParsePolicy(polPEM(e.sign(ca.key)), v)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.want)
		}
	}
	// The signer refuses what readers would.
	for name, body := range map[string][]byte{
		"huge":    bytes.Repeat([]byte("#"), cert.MaxPolicyBody+1),
		"binary":  {0xff, 0xfe},
		"has NUL": []byte("a\x00"),
	} {
		if _, err := cert.SignPolicy(ca.dir, body, 0, t0); err == nil {
			t.Errorf("SignPolicy of a %s body: signed", name)
		}
	}
	// The longest body signs, and its PEM is within the file bound.
	p, err := cert.SignPolicy(ca.dir, bytes.Repeat([]byte("#"), cert.MaxPolicyBody), 0, t0)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(p.EncodePEM()); n > cert.MaxPolicyFileSize {
		t.Fatalf("longest document is %d bytes of PEM, more than %d", n, cert.MaxPolicyFileSize)
	}
	if _, err := cert.ParsePolicy(p.EncodePEM(), v); err != nil {
		t.Fatalf("longest document: %v", err)
	}
}

// TestLoadPolicyFileBounds: LoadPolicy refuses a file over the bound, and a
// FIFO in the document's place, without hanging.
func TestLoadPolicyFileBounds(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	dir := t.TempDir()
	big := filepath.Join(dir, "big.pol")
	if err := os.WriteFile(big, bytes.Repeat([]byte(" "), cert.MaxPolicyFileSize+1), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := cert.LoadPolicy(big, v); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("big file: %v", err)
	}
	fifo := filepath.Join(dir, "fifo.pol")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := cert.LoadPolicy(fifo, v); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("a FIFO: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("LoadPolicy hung on a FIFO")
	}
}
