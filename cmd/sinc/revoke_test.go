package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
)

// TestCARevokeSerial: each `sinc ca revoke` signs the list under the next
// serial, read from the list it replaces, keeping what it revoked.
func TestCARevokeSerial(t *testing.T) {
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca")
	sinc := func(args ...string) string {
		t.Helper()
		var out, errs bytes.Buffer
		if code := run(args, &out, &errs); code != 0 {
			t.Fatalf("sinc %v: exit %d: %s", args, code, errs.String())
		}
		return out.String()
	}
	sinc("ca", "init", "--dir", ca)
	for i, node := range []string{"node-c", "node-d", "node-c"} {
		out := sinc("ca", "revoke", "--dir", ca, "--node", node)
		if want := []string{"serial 1,", "serial 2,", "serial 3,"}[i]; !strings.Contains(out, want) {
			t.Fatalf("revoke %d: %q lacks %q", i+1, out, want)
		}
	}
	c, err := cert.LoadCertificate(filepath.Join(ca, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	v, err := cert.NewVerifier(c, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	r, err := cert.LoadRevocations(filepath.Join(ca, cert.RevocationsFile), v)
	if err != nil {
		t.Fatal(err)
	}
	if r.Serial != 3 || strings.Join(r.Nodes, ",") != "node-c,node-d" {
		t.Fatalf("the list: serial %d, nodes %v; want 3, [node-c node-d]", r.Serial, r.Nodes)
	}
	// --out names another list, with a serial of its own.
	other := filepath.Join(dir, "other.crl")
	if out := sinc("ca", "revoke", "--dir", ca, "--node", "node-e", "--out", other); !strings.Contains(out, "serial 1,") {
		t.Fatalf("a new list at --out: %q, want serial 1", out)
	}
}
