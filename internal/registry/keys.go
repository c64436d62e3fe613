package registry

import "strings"

// keys names the backend's keys under its prefix (REGISTRY.md):
//
//	<prefix>/nodes/<name>  the node's record (record.go), under its lease
//	<prefix>/certs/<name>  the node's certificate, PEM, under the same lease
//	<prefix>/revocations   the CA-signed revocation list
//	<prefix>/policy        the CA-signed cluster policy
type keys struct{ prefix string }

func newKeys(prefix string) keys { return keys{prefix: strings.TrimSuffix(prefix, "/")} }

func (k keys) nodes() string           { return k.prefix + "/nodes/" }
func (k keys) node(name string) string { return k.nodes() + name }
func (k keys) certs() string           { return k.prefix + "/certs/" }
func (k keys) cert(name string) string { return k.certs() + name }
func (k keys) revocations() string     { return k.prefix + "/revocations" }
func (k keys) policy() string          { return k.prefix + "/policy" }

// nodeName returns the name in a key under nodes(), as given (ParseRecord
// checks it).
func (k keys) nodeName(key []byte) string { return strings.TrimPrefix(string(key), k.nodes()) }
