package registry

import (
	"strings"
	"testing"

	"sinc.dev/sinc/internal/cert"
)

func TestLayoutKeys(t *testing.T) {
	l, err := NewLayout("")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		l.Prefix():       "/sinc",
		l.Nodes():        "/sinc/nodes/",
		l.Node("node-a"): "/sinc/nodes/node-a",
		l.Certs():        "/sinc/certs/",
		l.Cert("node-a"): "/sinc/certs/node-a",
		l.Revocations():  "/sinc/revocations",
		l.Policy():       "/sinc/policy",
	}
	for got, w := range want {
		if got != w {
			t.Errorf("key %q, want %q", got, w)
		}
	}
	l2, err := NewLayout("/prod/sinc")
	if err != nil || l2.Node("b") != "/prod/sinc/nodes/b" {
		t.Fatalf("prefix /prod/sinc: %v %q", err, l2.Node("b"))
	}
}

func TestLayoutBadPrefix(t *testing.T) {
	for _, p := range []string{
		"sinc", "/", "/sinc/", "/a//b", "/sin c", "/sinc\x00", "/sinc\n", "/" + strings.Repeat("x", MaxPrefixLen),
	} {
		if _, err := NewLayout(p); err == nil || !strings.Contains(err.Error(), "registry prefix") {
			t.Errorf("NewLayout(%q) = %v, want an error naming the prefix", p, err)
		}
	}
}

// TestNodeName: a key from the registry yields a node name only when it is
// under the right folder and names a valid node; anything else is refused.
func TestNodeName(t *testing.T) {
	l, _ := NewLayout("/sinc")
	if n, err := l.NodeName("/sinc/nodes/node-a"); err != nil || n != "node-a" {
		t.Fatalf("NodeName = %q, %v", n, err)
	}
	if n, err := l.CertName("/sinc/certs/node-a"); err != nil || n != "node-a" {
		t.Fatalf("CertName = %q, %v", n, err)
	}
	for _, k := range []string{
		"/sinc/nodes/", "/sinc/nodes/a/b", "/sinc/nodes/../x", "/sinc/nodes/-a",
		"/sinc/certs/node-a", "/other/nodes/a", "/sinc/nodes/" + strings.Repeat("a", 64),
		"/sinc/nodes/" + strings.Repeat("é", 5000),
	} {
		_, err := l.NodeName(k)
		if err == nil {
			t.Errorf("NodeName(%.40q) accepted", k)
			continue
		}
		if len(err.Error()) > 400 {
			t.Errorf("NodeName(%.40q): error of %d bytes", k, len(err.Error()))
		}
	}
}

func TestLayoutBounds(t *testing.T) {
	l, err := NewLayout("/sinc")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		key  string
		want int
	}{
		{l.Node("node-a"), MaxRecordSize},
		{l.Cert("node-a"), MaxValueSize},
		{l.Policy(), MaxValueSize},
		{l.Revocations(), cert.MaxRevocationsFileSize}, // every list the CA can write
	} {
		if got := l.Bound(c.key); got != c.want {
			t.Errorf("Bound(%q) = %d, want %d", c.key, got, c.want)
		}
	}
}
