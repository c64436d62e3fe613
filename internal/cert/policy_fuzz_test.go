package cert_test

import (
	"bytes"
	"encoding/pem"
	"testing"
	"unicode/utf8"

	"sinc.dev/sinc/internal/cert"
)

// FuzzParsePolicy: ParsePolicy never panics, and accepts only the document
// the CA signed (no one else can sign), in any white space around its one
// PEM block; what it accepts survives EncodePEM and ParsePolicy unchanged.
func FuzzParsePolicy(f *testing.F) {
	ca := newCA(f, "fuzz-ca")
	v := ca.verifier(f)
	p, err := cert.SignPolicy(ca.dir, []byte(policyBody), 41, t0)
	if err != nil {
		f.Fatal(err)
	}
	good := p.EncodePEM()
	blk, _ := pem.Decode(good)
	f.Add(bytes.Clone(good)) // the fuzz function clears its input
	f.Add(append([]byte("\r\n"), good...))
	f.Add(good[:len(good)-10])
	f.Add(append(bytes.Clone(good), good...))
	f.Add(append(bytes.Clone(good), 'x'))
	f.Add(bytes.Replace(good, []byte("-----\n"), []byte("-----\nA: b\n\n"), 1))
	f.Add(polPEM(blk.Bytes[:len(blk.Bytes)-1]))
	f.Add(polPEM(append(bytes.Clone(blk.Bytes), 0)))
	f.Add(polPEM([]byte("SINCPOL1")))
	f.Add([]byte{})

	f.Fuzz(func(t *testing.T, data []byte) {
		in := bytes.Clone(data)
		q, err := cert.ParsePolicy(data, v)
		if !bytes.Equal(in, data) {
			t.Fatal("ParsePolicy changed its input")
		}
		if err != nil {
			if q != nil {
				t.Fatal("ParsePolicy returned a document and an error")
			}
			return
		}
		// Only the signed document: same serial, same text, same bytes.
		if c, err := q.Compare(p); c != 0 || err != nil {
			t.Fatalf("accepted another document: Compare = %d, %v", c, err)
		}
		if q.Serial != p.Serial || !bytes.Equal(q.Body, p.Body) || !q.Issued.Equal(p.Issued) {
			t.Fatalf("accepted document differs: serial %d, body %q", q.Serial, q.Body)
		}
		if len(q.Body) > cert.MaxPolicyBody || !utf8.Valid(q.Body) || bytes.IndexByte(q.Body, 0) >= 0 {
			t.Fatalf("accepted a bad body %q", q.Body)
		}
		if !bytes.HasPrefix(bytes.TrimLeft(data, " \t\r\n"), []byte("-----BEGIN SINC CLUSTER POLICY-----")) {
			t.Fatalf("accepted data before the block: %q", data)
		}
		// Round trip, and the document owns its buffers.
		r, err := cert.ParsePolicy(q.EncodePEM(), v)
		if err != nil || !bytes.Equal(r.EncodePEM(), good) {
			t.Fatalf("round trip: %v", err)
		}
		clear(data)
		if !bytes.Equal(q.EncodePEM(), good) || string(q.Body) != policyBody {
			t.Fatal("document shares the caller's buffer")
		}
	})
}
