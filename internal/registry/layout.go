package registry

import (
	"errors"
	"fmt"
	"strings"

	"sinc.dev/sinc/internal/cert"
)

// The registry's keys in etcd, all under one prefix (default "/sinc"), so
// that several clusters, or sinc and other users, can share an etcd:
//
//	<prefix>/nodes/<name>   the node's small record (JSON, ≤ MaxRecordSize),
//	                        put by its own agent under a lease it keeps alive;
//	                        every agent watches <prefix>/nodes/
//	<prefix>/certs/<name>   the node's certificate (PEM, ≤ MaxValueSize), put by
//	                        its own agent under the same lease; read when a
//	                        link to the node is made, never watched
//	<prefix>/revocations    the CA-signed revocation list (cert.Revocations,
//	                        ≤ MaxRevocationsSize)
//	<prefix>/policy         the CA-signed cluster policy (cert.Policy)
//
// Readers refuse a value over its bound with a log line: the registry is
// trusted for availability, never for authenticity or sizes.

// DefaultPrefix is the prefix when the configuration names none.
const DefaultPrefix = "/sinc"

// Bounds of values read from the registry.
const (
	MaxRecordSize = 1 << 10  // a node record
	MaxValueSize  = 64 << 10 // a certificate, the policy
	// MaxRevocationsSize is the revocation list's bound, the same as its
	// file's (cert.MaxRevocationsFileSize): a list of some thousand
	// revoked certificates must still be publishable. Readers re-read it
	// only when its revision changed.
	MaxRevocationsSize = 1 << 20
	// MaxPrefixLen bounds the prefix, so keys stay short.
	MaxPrefixLen = 128
)

// Layout names the registry's keys under one prefix. Make it with
// NewLayout; the zero value is not valid.
type Layout struct {
	prefix string
}

// NewLayout checks prefix and returns its layout. An empty prefix is
// DefaultPrefix. A prefix starts with "/", does not end with one, has no
// empty segment and is printable ASCII of at most MaxPrefixLen bytes.
func NewLayout(prefix string) (Layout, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if err := checkPrefix(prefix); err != nil {
		return Layout{}, fmt.Errorf("registry prefix %q: %w", prefix, err)
	}
	return Layout{prefix: prefix}, nil
}

func checkPrefix(p string) error {
	switch {
	case len(p) > MaxPrefixLen:
		return fmt.Errorf("longer than %d bytes", MaxPrefixLen)
	case !strings.HasPrefix(p, "/"):
		return errors.New(`does not start with "/"`)
	case len(p) > 1 && strings.HasSuffix(p, "/"), p == "/":
		return errors.New(`ends with "/"`)
	case strings.Contains(p, "//"):
		return errors.New("has an empty segment")
	}
	for i := 0; i < len(p); i++ {
		if p[i] <= ' ' || p[i] > '~' {
			return fmt.Errorf("has byte %#02x: only printable ASCII, no spaces", p[i])
		}
	}
	return nil
}

// Prefix returns the prefix, without a trailing "/".
func (l Layout) Prefix() string { return l.prefix }

// Nodes is the prefix of every node record key (ends with "/").
func (l Layout) Nodes() string { return l.prefix + "/nodes/" }

// Node is the key of node name's record.
func (l Layout) Node(name string) string { return l.Nodes() + name }

// Certs is the prefix of every certificate key (ends with "/").
func (l Layout) Certs() string { return l.prefix + "/certs/" }

// Cert is the key of node name's certificate.
func (l Layout) Cert(name string) string { return l.Certs() + name }

// Revocations is the key of the revocation list.
func (l Layout) Revocations() string { return l.prefix + "/revocations" }

// Policy is the key of the cluster policy.
func (l Layout) Policy() string { return l.prefix + "/policy" }

// Bound is the largest value a reader takes at key.
func (l Layout) Bound(key string) int {
	switch {
	case key == l.Revocations():
		return MaxRevocationsSize
	case len(key) > len(l.Nodes()) && key[:len(l.Nodes())] == l.Nodes():
		return MaxRecordSize
	}
	return MaxValueSize
}

// NodeName returns the node name of a record key (one under Nodes()),
// refusing a key outside it or a name that is not a valid node name.
func (l Layout) NodeName(key string) (string, error) {
	return nameUnder(l.Nodes(), key)
}

// CertName returns the node name of a certificate key (one under Certs()).
func (l Layout) CertName(key string) (string, error) {
	return nameUnder(l.Certs(), key)
}

func nameUnder(dir, key string) (string, error) {
	name, ok := strings.CutPrefix(key, dir)
	if !ok {
		return "", fmt.Errorf("registry key %q is not under %s", clip(key), dir)
	}
	if err := cert.ValidName(name); err != nil {
		return "", fmt.Errorf("registry key %q: %w", clip(key), err)
	}
	return name, nil
}

// clip shortens a key from the registry for an error message.
func clip(s string) string {
	const max = 200
	if len(s) > max {
		return s[:max] + "…"
	}
	return s
}
