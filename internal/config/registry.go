package config

import (
	"cmp"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"time"
)

// The cluster registry (docs/design.md, section 12). Without a [registry] table the config
// file is the cluster: [peers] lists the other agents, revocations names
// the CA's revocation list, [[allow]] is the policy. With one, all three
// come from etcd instead, and giving any of them here is an error rather
// than a second source that could disagree with the first:
//
//	advertise = ["10.0.0.1:7701"]    # the addresses other agents dial;
//	                                 # default: listen (refused when its
//	                                 # host is 0.0.0.0 or ::)
//	[registry]
//	etcd = ["https://10.0.0.9:2379", "10.0.0.10:2379"]  # endpoints
//	prefix = "/sinc"                 # default; every key is under it
//	ca = "etcd-ca.pem"               # TLS to etcd: the CA of its servers
//	cert = "etcd-client.pem"         # the client certificate and key
//	key = "etcd-client.key"          # (both or neither)
//	dial_timeout = "5s"              # default
//	request_timeout = "2s"           # default: one request, then a retry
//	lease_ttl = "20s"                # default: the record's lifetime
//	                                 # after the agent stops renewing it
//	max_nodes = 65536                # default: records kept; more are
//	                                 # refused (a registry that floods)
//
// The partitions' listen rules ([[partitions.NAME.listen]]) stay in the
// file: they are the node's own.

// Registry is the [registry] table, checked. Paths are absolute.
type Registry struct {
	Etcd           []string // endpoints: host:port, or http(s)://host:port
	Prefix         string
	CA, Cert, Key  string // TLS to etcd; all "" for plain connections
	DialTimeout    time.Duration
	RequestTimeout time.Duration
	LeaseTTL       time.Duration // whole seconds
	MaxNodes       int           // node records kept at most
}

// Defaults of the [registry] table.
const (
	DefaultPrefix         = "/sinc"
	DefaultDialTimeout    = 5 * time.Second
	DefaultRequestTimeout = 2 * time.Second
	DefaultLeaseTTL       = 20 * time.Second
	DefaultMaxNodes       = 65536
)

// MaxEndpoints bounds registry.etcd.
const MaxEndpoints = 16

// registryFile mirrors the [registry] table.
type registryFile struct {
	Etcd           []string `toml:"etcd"`
	Prefix         string   `toml:"prefix"`
	CA             string   `toml:"ca"`
	Cert           string   `toml:"cert"`
	Key            string   `toml:"key"`
	DialTimeout    string   `toml:"dial_timeout"`
	RequestTimeout string   `toml:"request_timeout"`
	LeaseTTL       string   `toml:"lease_ttl"`
	MaxNodes       *int     `toml:"max_nodes"`
}

// fieldError is a problem with one field, for Parse to wrap in an Error.
type fieldError struct {
	field string
	err   error
}

// parseRegistry checks [registry] and advertise, and the fields a
// registry replaces.
func parseRegistry(c *Config, f *file) *fieldError {
	fail := func(field string, format string, args ...any) *fieldError {
		return &fieldError{field, fmt.Errorf(format, args...)}
	}
	if f.Registry == nil {
		if len(f.Advertise) > 0 {
			return fail("advertise", "is published in the registry, and there is no [registry]: with the static file, the other nodes name this one's address in their [peers]")
		}
		return nil
	}
	r := f.Registry
	switch {
	case len(f.Peers) > 0:
		return fail("peers", "with [registry] the nodes come from the registry: remove the [peers] tables")
	case len(f.Allow) > 0:
		return fail("allow", "with [registry] the cluster policy comes from the registry (sinc ca policy): remove the [[allow]] rules")
	case f.Revocations != "":
		return fail("revocations", "with [registry] the revocation list comes from the registry (sinc ca revoke --etcd): remove it")
	}
	base := filepath.Dir(c.Path)
	if abs, err := filepath.Abs(base); err == nil {
		base = abs
	}
	reg := &Registry{Prefix: cmp.Or(r.Prefix, DefaultPrefix), DialTimeout: DefaultDialTimeout,
		RequestTimeout: DefaultRequestTimeout, LeaseTTL: DefaultLeaseTTL, MaxNodes: DefaultMaxNodes}
	if len(r.Etcd) == 0 {
		return fail("registry.etcd", "missing: the etcd endpoints, like [\"10.0.0.9:2379\"]")
	}
	if len(r.Etcd) > MaxEndpoints {
		return fail("registry.etcd", "%d endpoints, more than %d", len(r.Etcd), MaxEndpoints)
	}
	tls := r.CA != "" || r.Cert != ""
	for i, e := range r.Etcd {
		if err := checkEndpoint(e, tls); err != nil {
			return &fieldError{fmt.Sprintf("registry.etcd[%d]", i), err}
		}
	}
	reg.Etcd = append([]string(nil), r.Etcd...)
	if err := checkPrefix(reg.Prefix); err != nil {
		return &fieldError{"registry.prefix", err}
	}
	if (r.Cert == "") != (r.Key == "") {
		if r.Cert == "" {
			return fail("registry.cert", "missing: registry.key is set, and the client certificate goes with it")
		}
		return fail("registry.key", "missing: registry.cert is set, and its private key goes with it")
	}
	for _, p := range []struct {
		val string
		dst *string
	}{{r.CA, &reg.CA}, {r.Cert, &reg.Cert}, {r.Key, &reg.Key}} {
		if p.val != "" {
			*p.dst = absPath(base, p.val)
		}
	}
	for _, d := range []struct {
		field    string
		val      string
		dst      *time.Duration
		min, max time.Duration
	}{
		{"registry.dial_timeout", r.DialTimeout, &reg.DialTimeout, 10 * time.Millisecond, time.Minute},
		{"registry.request_timeout", r.RequestTimeout, &reg.RequestTimeout, 10 * time.Millisecond, time.Minute},
		{"registry.lease_ttl", r.LeaseTTL, &reg.LeaseTTL, 2 * time.Second, time.Hour},
	} {
		if d.val == "" {
			continue
		}
		v, err := time.ParseDuration(d.val)
		if err != nil {
			return fail(d.field, "%q is not a duration like \"5s\"", d.val)
		}
		if v < d.min || v > d.max {
			return fail(d.field, "%s is outside %s..%s", v, d.min, d.max)
		}
		*d.dst = v
	}
	if m := r.MaxNodes; m != nil {
		if *m < 1 || *m > 1<<20 {
			return fail("registry.max_nodes", "%d is outside 1..%d", *m, 1<<20)
		}
		reg.MaxNodes = *m
	}
	if reg.LeaseTTL%time.Second != 0 {
		return fail("registry.lease_ttl", "%s is not a whole number of seconds (etcd leases count seconds)", reg.LeaseTTL)
	}
	if reg.RequestTimeout*2 > reg.LeaseTTL {
		return fail("registry.request_timeout", "%s is more than half of registry.lease_ttl (%s): a record could expire while its renewal waits", reg.RequestTimeout, reg.LeaseTTL)
	}
	c.Registry = reg

	if len(f.Advertise) == 0 {
		host, port, _ := net.SplitHostPort(c.Listen)
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() || port == "0" {
			return fail("advertise", "missing: listen %q names no address another node can dial; give the addresses to publish, like [\"10.0.0.1:7701\"]", c.Listen)
		}
		c.Advertise = []string{c.Listen}
		return nil
	}
	if len(f.Advertise) > MaxAdvertise {
		return fail("advertise", "%d addresses, more than %d", len(f.Advertise), MaxAdvertise)
	}
	seen := map[string]bool{}
	for i, a := range f.Advertise {
		field := fmt.Sprintf("advertise[%d]", i)
		if err := CheckAdvertised(a); err != nil {
			return &fieldError{field, err}
		}
		if seen[a] {
			return fail(field, "%q is listed twice", a)
		}
		seen[a] = true
	}
	c.Advertise = append([]string(nil), f.Advertise...)
	return nil
}

// MaxAdvertise bounds advertise: a node record holds them all in 1 KiB.
const MaxAdvertise = 8

// CheckAdvertised checks an address a node publishes for others to dial:
// host:port, with a port, and a host that names somewhere (not 0.0.0.0 or
// ::). Readers of the registry check records with it too.
func CheckAdvertised(a string) error {
	port, err := checkHostPort(a)
	if err != nil {
		return err
	}
	if port == 0 {
		return fmt.Errorf("%q has port 0: give the port the agent listens on", a)
	}
	host, _, _ := net.SplitHostPort(a)
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return fmt.Errorf("%q is the unspecified address: give one another node can dial", a)
	}
	return nil
}

// checkEndpoint checks an etcd endpoint: host:port, or a URL of scheme
// http or https with a host:port and nothing else. A plain http URL is
// refused when TLS is configured: the client would not use it.
func checkEndpoint(e string, tls bool) error {
	hostport := e
	if scheme, rest, ok := strings.Cut(e, "://"); ok {
		u, err := url.Parse(e)
		if err != nil || (scheme != "http" && scheme != "https") || u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.User != nil {
			return fmt.Errorf("%q is not host:port or an http(s)://host:port URL", e)
		}
		if scheme == "http" && tls {
			return fmt.Errorf("%q is plain http, and registry.ca or registry.cert asks for TLS: use https://", e)
		}
		hostport = strings.TrimSuffix(rest, "/")
	}
	port, err := checkHostPort(hostport)
	if err != nil {
		return err
	}
	if port == 0 {
		return fmt.Errorf("%q has port 0", e)
	}
	return nil
}

// checkPrefix checks a key prefix: "/" and path segments of printable
// ASCII, no empty segment, no trailing "/".
func checkPrefix(p string) error {
	if !strings.HasPrefix(p, "/") || p == "/" || strings.HasSuffix(p, "/") || strings.Contains(p, "//") {
		return fmt.Errorf("%q is not a key prefix like \"/sinc\" (a leading /, no trailing /, no empty segment)", p)
	}
	if len(p) > 128 {
		return fmt.Errorf("%.20q… is %d bytes, more than 128", p, len(p))
	}
	for i := 0; i < len(p); i++ {
		if p[i] <= ' ' || p[i] >= 0x7f {
			return fmt.Errorf("%q has a byte 0x%02x at %d: use printable ASCII", p, p[i], i)
		}
	}
	return nil
}
