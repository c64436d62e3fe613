package cert_test

import (
	"bytes"
	"encoding/pem"
	"errors"
	"strings"
	"testing"

	"sinc.dev/sinc/internal/cert"
)

// TestDecodeTruncated: every prefix of a valid encoding is refused.
func TestDecodeTruncated(t *testing.T) {
	ca := newCA(t, "ca")
	node, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"web", "db"}})
	for _, c := range []*cert.Certificate{ca.cert, node} {
		full := c.Raw()
		for n := range len(full) {
			_, err := cert.Decode(full[:n])
			switch {
			case n < 8:
				wantErr(t, err, "bad magic")
			case n == 8:
				wantErr(t, err, "unknown certificate kind 0")
			default:
				wantErr(t, err, "certificate is truncated")
			}
		}
	}
}

// TestDecodeTrailing: bytes after the signature are refused.
func TestDecodeTrailing(t *testing.T) {
	ca := newCA(t, "ca")
	node, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"web"}})
	for _, c := range []*cert.Certificate{ca.cert, node} {
		for _, extra := range []string{"\x00", "x", "\n", strings.Repeat("\x00", 64)} {
			_, err := cert.Decode(append(bytes.Clone(c.Raw()), extra...))
			wantErr(t, err, "trailing bytes")
		}
	}
}

// TestDecodeBitFlips flips each bit of a node certificate in turn: no
// flipped certificate both decodes and verifies, and flips in the fixed-size
// fields decode (the form is fine) but fail verification for the right
// reason.
func TestDecodeBitFlips(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	c, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"web", "db"}})
	raw := c.Raw()
	// Offsets, from the layout in cert.go.
	pubAt := 8 + 1 + 1 + len("node-a")
	nbAt := pubAt + 32
	issuerAt := nbAt + 16
	sigAt := len(raw) - 64
	decoded := 0
	for i := range raw {
		for bit := range 8 {
			b := bytes.Clone(raw)
			b[i] ^= 1 << bit
			d, err := cert.Decode(b)
			if err != nil {
				if i >= pubAt && i < issuerAt+32 || i >= sigAt {
					t.Fatalf("flip at %d.%d: fixed-size field does not decode: %v", i, bit, err)
				}
				continue
			}
			decoded++
			err = v.Verify(d, t0)
			switch {
			case err == nil:
				t.Fatalf("flip at %d.%d: certificate still verifies", i, bit)
			case i >= issuerAt && i < issuerAt+32:
				if !errors.Is(err, cert.ErrUnknownCA) {
					t.Fatalf("flip at %d.%d in the issuer: %v", i, bit, err)
				}
			default:
				wantErr(t, err, "signature does not verify")
			}
		}
	}
	if decoded < 8*(32+16+32+64) {
		t.Fatalf("only %d flipped certificates decoded", decoded)
	}
	// The original still verifies: nothing above changed it.
	if err := v.Verify(c, t0); err != nil {
		t.Fatal(err)
	}
}

// TestDecodeMalformed builds encodings that break one rule of the form
// each. Every case names the message of the check that must catch it, so
// removing a check fails the test.
func TestDecodeMalformed(t *testing.T) {
	ca := newCA(t, "ca")
	node, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"web", "db"}})
	long := strings.Repeat("x", 64)
	for _, tc := range []struct {
		name string
		base *cert.Certificate
		mod  func(*enc)
		want string
	}{
		{"bad magic", node, func(e *enc) { e.magic = "SINCCRT2" }, "bad magic"},
		{"bad magic case", node, func(e *enc) { e.magic = "sinccrt1" }, "bad magic"},
		{"kind 0", node, func(e *enc) { e.kind = 0 }, "unknown certificate kind 0"},
		{"kind 3", node, func(e *enc) { e.kind = 3 }, "unknown certificate kind 3"},
		{"kind 255", node, func(e *enc) { e.kind = 255 }, "unknown certificate kind 255"},
		{"empty name", node, func(e *enc) { e.name = "" }, "certificate name: empty name"},
		{"name with slash", node, func(e *enc) { e.name = "node/a" }, `certificate name: name "node/a" has '/'`},
		{"name with NUL", node, func(e *enc) { e.name = "node\x00" }, `certificate name: name "node\x00" has '\x00'`},
		{"name starting with dot", node, func(e *enc) { e.name = ".." }, `has '.' at 0`},
		{"name too long", node, func(e *enc) { e.name = long }, "is 64 bytes, longer than 63"},
		{"name length 255", node, func(e *enc) { e.name = strings.Repeat("x", 255) }, "is 255 bytes, longer than 63"},
		{"too many partitions", node, func(e *enc) {
			e.parts = nil
			for i := range 65 {
				e.parts = append(e.parts, string(rune('A'+i)))
			}
		}, "certificate lists 65 partitions, more than 64"},
		{"partition count 255", node, func(e *enc) { e.count = 255 }, "certificate lists 255 partitions, more than 64"},
		{"empty partition", node, func(e *enc) { e.parts = []string{"web", ""} }, "partition: empty name"},
		{"bad partition", node, func(e *enc) { e.parts = []string{"web", "d b"} }, `partition: name "d b" has ' '`},
		{"partition too long", node, func(e *enc) { e.parts = []string{long} }, "partition: name"},
		{"duplicate partition", node, func(e *enc) { e.parts = []string{"web", "db", "web"} }, `partition "web" listed twice`},
		{"CA with partitions", ca.cert, func(e *enc) { e.parts = []string{"web"} }, "a CA certificate lists no partitions"},
		// Length fields that disagree with the data after them.
		{"partition count short", node, func(e *enc) { e.count = 1 }, "trailing bytes"},
		{"partition count long", node, func(e *enc) { e.count = 3 }, "truncated"},
		{"name length short", node, func(e *enc) {
			// Every field after the name moves one byte left: the last
			// byte of the issuer, 0, becomes the partition count.
			e.nameLen = len(e.name) - 1
			e.issuer[31] = 0
		}, "8 trailing bytes"},
		{"name length long", node, func(e *enc) {
			// Every field after the name moves one byte right: the
			// signature is one byte short.
			e.nameLen = len(e.name) + 1
		}, "certificate is truncated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := encOf(tc.base)
			tc.mod(&e)
			c, err := cert.Decode(e.sign(ca.key)) // well signed: only the form is wrong
			if c != nil {
				t.Error("Decode returned a certificate with the error")
			}
			wantErr(t, err, tc.want)
		})
	}
}

func TestDecodeTooLong(t *testing.T) {
	_, err := cert.Decode(make([]byte, cert.MaxEncodedLen+1))
	wantErr(t, err, "more than")
	_, err = cert.Decode(make([]byte, 1<<20))
	wantErr(t, err, "more than")
	_, err = cert.Decode(nil)
	wantErr(t, err, "bad magic")
}

// TestDecodeCopies: a decoded certificate does not share the caller's buffer.
func TestDecodeCopies(t *testing.T) {
	ca := newCA(t, "ca")
	c, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"web"}})
	b := bytes.Clone(c.Raw())
	d := decode(t, b)
	fp := d.Fingerprint()
	clear(b)
	if d.Fingerprint() != fp || !bytes.Equal(d.Raw(), c.Raw()) {
		t.Fatal("decoded certificate changed with the buffer it was decoded from")
	}
	if err := ca.verifier(t).Verify(d, t0); err != nil {
		t.Fatal(err)
	}
}

// TestVerifyUnsigned: a certificate made in memory, never signed nor
// decoded, is refused rather than crashing the verifier.
func TestVerifyUnsigned(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	node := &cert.Certificate{Kind: cert.KindNode, Name: "n", Issuer: ca.cert.Fingerprint(), Partitions: []string{"p"},
		NotBefore: t0.Add(-1), NotAfter: t0.Add(1e12)}
	wantErr(t, v.Verify(node, t0), "not signed")
	wantErr(t, (&cert.Certificate{Kind: cert.KindCA, Name: "ca"}).VerifyCA(t0), "not signed")
	_, err := cert.NewVerifier(&cert.Certificate{Kind: cert.KindCA, Name: "ca"}, t0)
	wantErr(t, err, "not signed")
}

func TestParsePEM(t *testing.T) {
	ca := newCA(t, "ca")
	good := ca.cert.EncodePEM()
	if !bytes.HasPrefix(good, []byte("-----BEGIN SINC CERTIFICATE-----\n")) {
		t.Fatalf("EncodePEM:\n%s", good)
	}
	for _, ok := range [][]byte{
		good,
		append(bytes.Clone(good), "\n\n  \t\r\n"...),
		append([]byte("\n  \r\n"), good...),
		bytes.ReplaceAll(good, []byte("\n"), []byte("\r\n")),
	} {
		c, err := cert.ParsePEM(ok)
		if err != nil {
			t.Fatalf("ParsePEM(%q): %v", ok, err)
		}
		if !bytes.Equal(c.Raw(), ca.cert.Raw()) {
			t.Fatal("ParsePEM gives another certificate")
		}
	}
	key := []byte("-----BEGIN SINC CA PRIVATE KEY-----\nAAAA\n-----END SINC CA PRIVATE KEY-----\n")
	withHeader := bytes.Replace(good, []byte("-----\n"), []byte("-----\nProc-Type: 4,ENCRYPTED\n\n"), 1)
	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "no PEM block found"},
		{"not PEM", []byte("hello"), "no PEM block found"},
		{"raw encoding", ca.cert.Raw(), "no PEM block found"},
		{"key", key, `PEM block is "SINC CA PRIVATE KEY", want "SINC CERTIFICATE"`},
		{"key then cert", append(bytes.Clone(key), good...), `PEM block is "SINC CA PRIVATE KEY"`},
		{"headers", withHeader, "PEM block has headers"},
		{"two certs", append(bytes.Clone(good), good...), "data after the certificate's PEM block"},
		{"trailing text", append(bytes.Clone(good), "x"...), "data after the certificate's PEM block"},
		{"leading text", append([]byte("x\n"), good...), "data before the certificate's PEM block"},
		{"leading broken block", append([]byte("-----BEGIN SINC CERTIFICATE-----\n!!\n-----END SINC CERTIFICATE-----\n"), good...), "data before the certificate's PEM block"},
		{"bad encoding", pemOf(append(bytes.Clone(ca.cert.Raw()), 0)), "trailing bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := cert.ParsePEM(tc.data)
			if c != nil {
				t.Error("ParsePEM returned a certificate with the error")
			}
			wantErr(t, err, tc.want)
		})
	}
}

func pemOf(b []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "SINC CERTIFICATE", Bytes: b})
}
