package cert_test

import (
	"bytes"
	"crypto/ed25519"
	"slices"
	"testing"

	"sinc.dev/sinc/internal/cert"
)

// fuzzSeeds returns a valid CA certificate, a valid node certificate of it,
// and a verifier for the CA.
func fuzzSeeds(f *testing.F) (ca, node *cert.Certificate, v *cert.Verifier) {
	f.Helper()
	c := newCA(f, "fuzz-ca")
	n, _ := c.issue(f, cert.NodeRequest{Node: "node-a", Partitions: []string{"web", "db", "x.y_z-1"}})
	return c.cert, n, c.verifier(f)
}

// FuzzDecode: Decode never panics, and accepts only the canonical encoding
// of a well-formed certificate.
func FuzzDecode(f *testing.F) {
	ca, node, v := fuzzSeeds(f)
	for _, c := range []*cert.Certificate{ca, node} {
		raw := c.Raw()
		f.Add(bytes.Clone(raw))
		f.Add(bytes.Clone(raw[:len(raw)-1]))             // truncated
		f.Add(append(bytes.Clone(raw), 0))               // trailing byte
		f.Add(append(bytes.Clone(raw[:9]), raw[10:]...)) // no name length
		flipped := bytes.Clone(raw)
		flipped[9] ^= 0x40 // name length
		f.Add(flipped)
	}
	f.Add([]byte{})
	f.Add([]byte("SINCCRT1"))
	f.Add([]byte("SINCCRT1\x02\x01a"))

	f.Fuzz(func(t *testing.T, b []byte) {
		in := bytes.Clone(b)
		c, err := cert.Decode(b)
		if !bytes.Equal(in, b) {
			t.Fatal("Decode changed its input")
		}
		if err != nil {
			if c != nil {
				t.Fatal("Decode returned a certificate and an error")
			}
			return
		}
		// Canonical: the one encoding of these fields is the input.
		if !bytes.Equal(c.Raw(), b) {
			t.Fatalf("Raw() = %x, input %x", c.Raw(), b)
		}
		if len(b) > cert.MaxEncodedLen {
			t.Fatalf("accepted %d bytes, more than MaxEncodedLen", len(b))
		}
		if !bytes.Equal(c.Signature[:], b[len(b)-ed25519.SignatureSize:]) {
			t.Fatal("signature is not the last 64 bytes")
		}
		// The fields are well-formed.
		if c.Kind != cert.KindCA && c.Kind != cert.KindNode {
			t.Fatalf("kind %v", c.Kind)
		}
		if err := cert.ValidName(c.Name); err != nil {
			t.Fatalf("name: %v", err)
		}
		if len(c.Partitions) > cert.MaxPartitions || c.Kind == cert.KindCA && len(c.Partitions) > 0 {
			t.Fatalf("partitions %q", c.Partitions)
		}
		for i, p := range c.Partitions {
			if err := cert.ValidName(p); err != nil {
				t.Fatalf("partition: %v", err)
			}
			if slices.Contains(c.Partitions[:i], p) {
				t.Fatalf("partition %q twice", p)
			}
		}
		// Decoding again gives the same certificate.
		d, err := cert.Decode(c.Raw())
		if err != nil {
			t.Fatalf("re-decoding: %v", err)
		}
		if d.Fingerprint() != c.Fingerprint() || d.Name != c.Name || !slices.Equal(d.Partitions, c.Partitions) ||
			!d.NotBefore.Equal(c.NotBefore) || !d.NotAfter.Equal(c.NotAfter) || d.PublicKey != c.PublicKey || d.Issuer != c.Issuer {
			t.Fatal("re-decoding gives another certificate")
		}
		// Through PEM and back.
		p, err := cert.ParsePEM(c.EncodePEM())
		if err != nil || !bytes.Equal(p.Raw(), b) {
			t.Fatalf("PEM round trip: %v", err)
		}
		// The decoded buffer is the certificate's own.
		clear(b)
		if !bytes.Equal(c.Raw(), in) {
			t.Fatal("certificate shares the caller's buffer")
		}
		// Checking it must not panic; the seed CA verifies, and of node
		// certificates only the seed one.
		caErr := c.VerifyCA(t0)
		nodeErr := v.Verify(c, t0)
		if caErr != nil && bytes.Equal(in, ca.Raw()) {
			t.Fatalf("VerifyCA = %v for %x", caErr, in)
		}
		if (nodeErr == nil) != bytes.Equal(in, node.Raw()) {
			t.Fatalf("Verify = %v for %x", nodeErr, in)
		}
	})
}

// FuzzParsePEM: ParsePEM never panics, and what it accepts is a certificate
// that survives EncodePEM and ParsePEM unchanged.
func FuzzParsePEM(f *testing.F) {
	ca, node, _ := fuzzSeeds(f)
	for _, c := range []*cert.Certificate{ca, node} {
		p := c.EncodePEM()
		f.Add(p)
		f.Add(append([]byte("\r\n"), p...))
		f.Add(p[:len(p)-10])
		f.Add(bytes.Replace(p, []byte("CERTIFICATE"), []byte("PRIVATE KEY"), 2))
		f.Add(append(bytes.Clone(p), p...))
		f.Add(bytes.Replace(p, []byte("-----\n"), []byte("-----\nA: b\n\n"), 1))
	}
	f.Add([]byte(""))
	f.Add([]byte("-----BEGIN SINC CERTIFICATE-----\n-----END SINC CERTIFICATE-----\n"))

	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := cert.ParsePEM(data)
		if err != nil {
			if c != nil {
				t.Fatal("ParsePEM returned a certificate and an error")
			}
			return
		}
		d, err := cert.Decode(c.Raw())
		if err != nil {
			t.Fatalf("ParsePEM accepted what Decode refuses: %v", err)
		}
		e, err := cert.ParsePEM(c.EncodePEM())
		if err != nil {
			t.Fatalf("ParsePEM refuses EncodePEM's output: %v", err)
		}
		if !bytes.Equal(d.Raw(), c.Raw()) || !bytes.Equal(e.Raw(), c.Raw()) {
			t.Fatal("certificate changed on a round trip")
		}
		// Only white space around the one block.
		if !bytes.HasPrefix(bytes.TrimLeft(data, " \t\r\n"), []byte("-----BEGIN SINC CERTIFICATE-----")) {
			t.Fatalf("accepted data before the block: %q", data)
		}
	})
}
