package cert_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
)

// TestRoundTrip makes a CA and a node on disk, reads them back and checks
// that every field is what was signed.
func TestRoundTrip(t *testing.T) {
	caDir := filepath.Join(t.TempDir(), "ca")
	outDir := filepath.Join(t.TempDir(), "nodes")
	ca, err := cert.InitCA(caDir, "cluster-ca", cert.DefaultCAValidity, t0)
	if err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	if ca.Kind != cert.KindCA || ca.Name != "cluster-ca" || len(ca.Partitions) != 0 || ca.Issuer != [32]byte{} {
		t.Fatalf("InitCA made %+v", ca)
	}
	if want := t0.Add(-5 * time.Minute); !ca.NotBefore.Equal(want) {
		t.Errorf("CA NotBefore = %v, want %v", ca.NotBefore, want)
	}
	if want := t0.Add(cert.DefaultCAValidity); !ca.NotAfter.Equal(want) {
		t.Errorf("CA NotAfter = %v, want %v", ca.NotAfter, want)
	}

	nb := t0.Add(-time.Hour)
	req := cert.NodeRequest{Node: "node-a", Partitions: []string{"web", "db", "batch.1"}, NotBefore: nb, ValidFor: 48 * time.Hour}
	issued, err := cert.SignNode(caDir, outDir, req, t0)
	if err != nil {
		t.Fatalf("SignNode: %v", err)
	}
	certPath, keyPath := cert.NodeFiles(outDir, "node-a")
	if certPath != filepath.Join(outDir, "node-a.crt") || keyPath != filepath.Join(outDir, "node-a.key") {
		t.Fatalf("NodeFiles = %s, %s", certPath, keyPath)
	}

	loadedCA, err := cert.LoadCertificate(filepath.Join(caDir, cert.CACertFile))
	if err != nil {
		t.Fatalf("LoadCertificate(ca): %v", err)
	}
	if !bytes.Equal(loadedCA.Raw(), ca.Raw()) {
		t.Fatal("CA certificate read back differs from the one InitCA returned")
	}
	c, err := cert.LoadCertificate(certPath)
	if err != nil {
		t.Fatalf("LoadCertificate(node): %v", err)
	}
	if !bytes.Equal(c.Raw(), issued.Raw()) {
		t.Fatal("node certificate read back differs from the one SignNode returned")
	}
	key, err := cert.LoadNodeKey(keyPath)
	if err != nil {
		t.Fatalf("LoadNodeKey: %v", err)
	}

	v, err := cert.NewVerifier(loadedCA, t0)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	if v.CA != loadedCA {
		t.Error("Verifier.CA is not the CA it was made with")
	}
	if err := v.Verify(c, t0); err != nil {
		t.Fatalf("Verify: %v", err)
	}

	if c.Kind != cert.KindNode {
		t.Errorf("Kind = %v, want node", c.Kind)
	}
	if c.Name != "node-a" {
		t.Errorf("Name = %q", c.Name)
	}
	if !slices.Equal(c.Partitions, req.Partitions) {
		t.Errorf("Partitions = %q, want %q", c.Partitions, req.Partitions)
	}
	for _, p := range req.Partitions {
		if !c.HasPartition(p) {
			t.Errorf("HasPartition(%q) = false", p)
		}
	}
	for _, p := range []string{"", "Web", "web2", "node-a", "batch"} {
		if c.HasPartition(p) {
			t.Errorf("HasPartition(%q) = true", p)
		}
	}
	if !bytes.Equal(c.PublicKey[:], key.PublicKey().Bytes()) {
		t.Error("certificate's public key is not the key file's public key")
	}
	if !c.NotBefore.Equal(nb) || !c.NotAfter.Equal(nb.Add(48*time.Hour)) {
		t.Errorf("validity %v..%v, want %v..%v", c.NotBefore, c.NotAfter, nb, nb.Add(48*time.Hour))
	}
	if c.Issuer != ca.Fingerprint() {
		t.Errorf("Issuer = %x, want the CA's fingerprint %s", c.Issuer, ca.Fingerprint())
	}

	// Fingerprints: the SHA-256 of the encoding, stable, different per cert.
	if c.Fingerprint() != sha256.Sum256(c.Raw()) {
		t.Error("Fingerprint is not the SHA-256 of the encoding")
	}
	again, err := cert.LoadCertificate(certPath)
	if err != nil {
		t.Fatal(err)
	}
	if again.Fingerprint() != c.Fingerprint() || c.Fingerprint() != issued.Fingerprint() {
		t.Error("Fingerprint of the same certificate changed")
	}
	if c.Fingerprint() == ca.Fingerprint() {
		t.Error("node and CA certificates have the same fingerprint")
	}
	if s := c.Fingerprint().String(); len(s) != 64 || strings.Trim(s, "0123456789abcdef") != "" {
		t.Errorf("Fingerprint().String() = %q, want 64 lower-case hex digits", s)
	}
	// The same request again (other key, same fields) gives another
	// certificate; so does a request that differs in one partition.
	other, err := cert.SignNode(caDir, t.TempDir(), req, t0)
	if err != nil {
		t.Fatal(err)
	}
	if other.Fingerprint() == c.Fingerprint() {
		t.Error("two node certificates for different keys have the same fingerprint")
	}
	_, caKey, err := cert.LoadCA(caDir, t0)
	if err != nil {
		t.Fatal(err)
	}
	third, err := cert.IssueNode(loadedCA, caKey, key.PublicKey(), cert.NodeRequest{Node: "node-a", Partitions: []string{"web"}, NotBefore: nb, ValidFor: 48 * time.Hour}, t0)
	if err != nil {
		t.Fatal(err)
	}
	if third.Fingerprint() == c.Fingerprint() {
		t.Error("different node certificates have the same fingerprint")
	}
}

// TestTestEncoder checks that the tests' own field-by-field encoder agrees
// with the package's, so the malformed encodings built with it differ from a
// valid one only where a test says.
func TestTestEncoder(t *testing.T) {
	ca := newCA(t, "ca")
	c, _ := ca.issue(t, cert.NodeRequest{Node: "n", Partitions: []string{"a", "b"}})
	if got := encOf(c).sign(ca.key); !bytes.Equal(got, c.Raw()) {
		t.Fatalf("test encoder: node\n got %x\nwant %x", got, c.Raw())
	}
	if got := encOf(ca.cert).sign(ca.key); !bytes.Equal(got, ca.cert.Raw()) {
		t.Fatalf("test encoder: CA\n got %x\nwant %x", got, ca.cert.Raw())
	}
}

func TestIssueNodeDefaults(t *testing.T) {
	ca := newCA(t, "ca")
	// No NotBefore: from now less five minutes, truncated to the second.
	now := t0.Add(1234567 * time.Microsecond)
	c, err := cert.IssueNode(ca.cert, ca.key, mustKey(t).PublicKey(), cert.NodeRequest{Node: "n", Partitions: []string{"p"}, ValidFor: time.Hour}, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := now.Add(-5 * time.Minute).Truncate(time.Second); !c.NotBefore.Equal(want) {
		t.Errorf("NotBefore = %v, want %v", c.NotBefore, want)
	}
	if want := now.Add(time.Hour).Truncate(time.Second); !c.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v, want %v", c.NotAfter, want)
	}
	// A node certificate never outlives its CA.
	long, err := cert.IssueNode(ca.cert, ca.key, mustKey(t).PublicKey(), cert.NodeRequest{Node: "n", Partitions: []string{"p"}, ValidFor: 2 * cert.DefaultCAValidity}, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !long.NotAfter.Equal(ca.cert.NotAfter) {
		t.Errorf("NotAfter = %v, want the CA's %v", long.NotAfter, ca.cert.NotAfter)
	}
	if err := ca.verifier(t).Verify(long, t0); err != nil {
		t.Errorf("Verify: %v", err)
	}
}

func TestIssueNodeRefuses(t *testing.T) {
	ca := newCA(t, "ca")
	pub := mustKey(t).PublicKey()
	long := strings.Repeat("p", cert.MaxNameLen+1)
	many := make([]string, cert.MaxPartitions+1)
	for i := range many {
		many[i] = "p" + string(rune('a'+i/26)) + string(rune('a'+i%26))
	}
	for _, tc := range []struct {
		name string
		req  cert.NodeRequest
		want string
	}{
		{"no node", cert.NodeRequest{Partitions: []string{"p"}, ValidFor: time.Hour}, "node: empty name"},
		{"bad node", cert.NodeRequest{Node: "a/b", Partitions: []string{"p"}, ValidFor: time.Hour}, `node: name "a/b" has '/'`},
		{"no partitions", cert.NodeRequest{Node: "n", ValidFor: time.Hour}, "at least one partition"},
		{"zero validity", cert.NodeRequest{Node: "n", Partitions: []string{"p"}}, "validity 0s is not positive"},
		{"negative validity", cert.NodeRequest{Node: "n", Partitions: []string{"p"}, ValidFor: -time.Hour}, "validity -1h0m0s is not positive"},
		{"bad partition", cert.NodeRequest{Node: "n", Partitions: []string{"ok", "-bad"}, ValidFor: time.Hour}, `partition: name "-bad"`},
		{"empty partition", cert.NodeRequest{Node: "n", Partitions: []string{""}, ValidFor: time.Hour}, "partition: empty name"},
		{"long partition", cert.NodeRequest{Node: "n", Partitions: []string{long}, ValidFor: time.Hour}, "longer than 63"},
		{"duplicate partition", cert.NodeRequest{Node: "n", Partitions: []string{"a", "b", "a"}, ValidFor: time.Hour}, `partition "a" listed twice`},
		{"too many partitions", cert.NodeRequest{Node: "n", Partitions: many, ValidFor: time.Hour}, "65 partitions, more than 64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := cert.IssueNode(ca.cert, ca.key, pub, tc.req, t0)
			if c != nil {
				t.Errorf("IssueNode returned a certificate with the error")
			}
			wantErr(t, err, tc.want)
		})
	}
}

// TestIssueNodeKeepsItsOwnPartitions checks that a certificate's Partitions
// do not change when the caller later changes the slice it passed in: the
// fields must keep saying what the signature covers.
func TestIssueNodeKeepsItsOwnPartitions(t *testing.T) {
	ca := newCA(t, "ca")
	parts := []string{"web", "db"}
	c, _ := ca.issue(t, cert.NodeRequest{Node: "n", Partitions: parts})
	parts[0] = "evil"
	if !c.HasPartition("web") || c.HasPartition("evil") {
		t.Fatalf("certificate's partitions follow the caller's slice: %q", c.Partitions)
	}
}

func TestMaxSizeCertificate(t *testing.T) {
	ca := newCA(t, "ca")
	parts := make([]string, cert.MaxPartitions)
	for i := range parts {
		parts[i] = strings.Repeat(string(rune('a'+i%26)), cert.MaxNameLen-2) + string(rune('a'+i/26)) + "x"
	}
	c, _ := ca.issue(t, cert.NodeRequest{Node: strings.Repeat("n", cert.MaxNameLen), Partitions: parts})
	if len(c.Raw()) != cert.MaxEncodedLen {
		t.Fatalf("largest certificate is %d bytes, MaxEncodedLen is %d", len(c.Raw()), cert.MaxEncodedLen)
	}
	d := decode(t, c.Raw())
	if err := ca.verifier(t).Verify(d, t0); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d.Partitions, parts) {
		t.Fatal("partitions differ after decoding")
	}
}

// TestUnknownCA: a node certificate of another cluster's CA is refused as
// such, whatever it says.
func TestUnknownCA(t *testing.T) {
	ca1, ca2 := newCA(t, "ca"), newCA(t, "ca") // same name, other key
	c, _ := ca2.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"web"}})
	err := ca1.verifier(t).Verify(c, t0)
	if !errors.Is(err, cert.ErrUnknownCA) {
		t.Fatalf("Verify = %v, want ErrUnknownCA", err)
	}
	wantErr(t, err, `node "node-a"`)
	// And the other way round the CA is known.
	if err := ca2.verifier(t).Verify(c, t0); err != nil {
		t.Fatal(err)
	}
}

// TestForgedIssuer: a certificate that names the cluster CA as issuer but
// is signed by another key is refused for its signature.
func TestForgedIssuer(t *testing.T) {
	ca1, ca2 := newCA(t, "ca"), newCA(t, "ca")
	// ca1's certificate (so the issuer is ca1's fingerprint), ca2's key.
	forged, err := cert.IssueNode(ca1.cert, ca2.key, mustKey(t).PublicKey(), cert.NodeRequest{Node: "node-a", Partitions: []string{"web"}, ValidFor: time.Hour}, t0)
	if err != nil {
		t.Fatal(err)
	}
	if forged.Issuer != ca1.cert.Fingerprint() {
		t.Fatal("forged certificate does not name ca1 as issuer")
	}
	err = ca1.verifier(t).Verify(forged, t0)
	wantErr(t, err, "signature does not verify with the cluster CA key")
	if errors.Is(err, cert.ErrUnknownCA) {
		t.Errorf("forged issuer reported as unknown CA: %v", err)
	}
	// Through the wire form too.
	if err := ca1.verifier(t).Verify(decode(t, forged.Raw()), t0); err == nil {
		t.Fatal("decoded forged certificate verifies")
	}
}

// TestVerifyRefusesCA: the CA's own certificate is not a node certificate,
// though the CA key signed it.
func TestVerifyRefusesCA(t *testing.T) {
	ca := newCA(t, "ca")
	wantErr(t, ca.verifier(t).Verify(ca.cert, t0), `certificate "ca" is a ca certificate, not a node certificate`)
	// Nor is the CA's own name and key signed again as a node certificate:
	// a node certificate with no issuer is from no known CA.
	e := encOf(ca.cert)
	e.kind = byte(cert.KindNode)
	e.parts = []string{"p"}
	wantErr(t, ca.verifier(t).Verify(decode(t, e.sign(ca.key)), t0), "unknown CA")
}

func TestValidity(t *testing.T) {
	ca := newCA(t, "ca")
	v := ca.verifier(t)
	nb := t0.Add(time.Hour)
	c, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"p"}, NotBefore: nb, ValidFor: 2 * time.Hour})
	na := nb.Add(2 * time.Hour)
	for _, tc := range []struct {
		now    time.Time
		ok     bool
		notYet bool
		at     time.Time
	}{
		{t0, false, true, nb},
		{nb.Add(-time.Second), false, true, nb},
		{nb.Add(-time.Nanosecond), false, true, nb},
		{nb, true, false, time.Time{}},
		{nb.Add(time.Hour), true, false, time.Time{}},
		{na.Add(-time.Nanosecond), true, false, time.Time{}},
		{na, false, false, na},
		{na.Add(time.Second), false, false, na},
		{na.Add(1000 * time.Hour), false, false, na},
	} {
		err := v.Verify(c, tc.now)
		if tc.ok {
			if err != nil {
				t.Errorf("at %v: %v", tc.now, err)
			}
			continue
		}
		var ve *cert.ValidityError
		if !errors.As(err, &ve) {
			t.Errorf("at %v: got %v, want a *ValidityError", tc.now, err)
			continue
		}
		if ve.NotYet != tc.notYet || !ve.At.Equal(tc.at) || ve.Name != "node-a" {
			t.Errorf("at %v: got %+v, want NotYet=%v At=%v", tc.now, ve, tc.notYet, tc.at)
		}
		want := "expired at " + na.Format(time.RFC3339)
		if tc.notYet {
			want = "not valid until " + nb.Format(time.RFC3339)
		}
		wantErr(t, err, want)
	}
}

func TestVerifyCA(t *testing.T) {
	ca := newCA(t, "ca")
	if err := ca.cert.VerifyCA(t0); err != nil {
		t.Fatal(err)
	}
	t.Run("node certificate", func(t *testing.T) {
		c, _ := ca.issue(t, cert.NodeRequest{Node: "node-a", Partitions: []string{"p"}})
		wantErr(t, c.VerifyCA(t0), `"node-a" is a node certificate, not a CA certificate`)
		_, err := cert.NewVerifier(c, t0)
		wantErr(t, err, "not a CA certificate")
	})
	t.Run("tampered", func(t *testing.T) {
		// Each field of the CA certificate changed in turn, not re-signed.
		for _, mod := range []func(*enc){
			func(e *enc) { e.name = "cb" },
			func(e *enc) { e.pub[0] ^= 1 },
			func(e *enc) { e.nb-- },
			func(e *enc) { e.na++ },
		} {
			e := encOf(ca.cert)
			mod(&e)
			b := append(e.tbs(), ca.cert.Signature[:]...)
			err := decode(t, b).VerifyCA(t0)
			wantErr(t, err, `CA certificate "`)
			wantErr(t, err, "bad self-signature")
			if _, err := cert.NewVerifier(decode(t, b), t0); err == nil {
				t.Error("NewVerifier accepts a tampered CA")
			}
		}
		// The signature changed.
		b := bytes.Clone(ca.cert.Raw())
		b[len(b)-1] ^= 0x80
		wantErr(t, decode(t, b).VerifyCA(t0), "bad self-signature")
	})
	t.Run("signed by another key", func(t *testing.T) {
		other := newCA(t, "other")
		b := encOf(ca.cert).sign(other.key) // ca's public key, other's signature
		wantErr(t, decode(t, b).VerifyCA(t0), "bad self-signature")
	})
	t.Run("not self-signed", func(t *testing.T) {
		e := encOf(ca.cert)
		e.issuer[31] = 1
		wantErr(t, decode(t, e.sign(ca.key)).VerifyCA(t0), `CA certificate "ca" is not self-signed`)
	})
	t.Run("validity", func(t *testing.T) {
		var ve *cert.ValidityError
		err := ca.cert.VerifyCA(ca.cert.NotBefore.Add(-time.Second))
		if !errors.As(err, &ve) || !ve.NotYet {
			t.Errorf("before NotBefore: %v", err)
		}
		err = ca.cert.VerifyCA(ca.cert.NotAfter)
		if !errors.As(err, &ve) || ve.NotYet {
			t.Errorf("at NotAfter: %v", err)
		}
		_, err = cert.NewVerifier(ca.cert, ca.cert.NotAfter.Add(time.Hour))
		if !errors.As(err, &ve) || ve.NotYet {
			t.Errorf("NewVerifier on an expired CA: %v", err)
		}
	})
}

func TestValidName(t *testing.T) {
	for _, tc := range []struct {
		name string
		want string // "" for valid
	}{
		{"a", ""},
		{"Z", ""},
		{"0", ""},
		{"node-a", ""},
		{"Node_B.2", ""},
		{"a-", ""},
		{"a.", ""},
		{"a..b", ""},
		{"9-lives", ""},
		{strings.Repeat("x", 63), ""},
		{"", "empty name"},
		{strings.Repeat("x", 64), "is 64 bytes, longer than 63"},
		{strings.Repeat("x", 300), "is 300 bytes, longer than 63"},
		{"-a", `has '-' at 0`},
		{"_a", `has '_' at 0`},
		{".a", `has '.' at 0`},
		{".", `has '.' at 0`},
		{"..", `has '.' at 0`},
		{"a/b", `has '/' at 1`},
		{"a b", `has ' ' at 1`},
		{"a:b", `has ':' at 1`},
		{"a@b", `has '@' at 1`},
		{"a\x00", `has '\x00' at 1`},
		{"a\n", `has '\n' at 1`},
		{"é", `has 'é' at 0`},
		{"café", `has 'é' at 3`},
		{"a\u200bb", `has '\u200b' at 1`},
		{"a\xffb", `has '�' at 1`},
	} {
		err := cert.ValidName(tc.name)
		if tc.want == "" {
			if err != nil {
				t.Errorf("ValidName(%q) = %v, want nil", tc.name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("ValidName(%q) = nil, want an error containing %q", tc.name, tc.want)
		} else if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ValidName(%q) = %q, want it to contain %q", tc.name, err, tc.want)
		}
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[cert.Kind]string{cert.KindCA: "ca", cert.KindNode: "node", 0: "kind(0)", 7: "kind(7)"} {
		if got := k.String(); got != want {
			t.Errorf("Kind(%d).String() = %q, want %q", uint8(k), got, want)
		}
	}
}
