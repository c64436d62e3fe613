package config_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/policy"
)

// withRegistry gives minimalConfig a [registry] table with the given
// lines, and top lines before it (top-level keys).
func withRegistry(top, lines string) string {
	return top + minimalConfig + "[registry]\n" + lines + "\n"
}

func TestRegistryGood(t *testing.T) {
	data := `advertise = ["10.0.0.1:7701", "[fd00::1]:7701"]
` + strings.Replace(minimalConfig, "listen = \"localhost:1\"", "listen = \"0.0.0.0:7701\"", 1) + `
[[partitions.p.listen]]
service = "pg"
uids = [7]

[registry]
etcd = ["https://10.0.0.9:2379", "etcd-2.example:2379", "http://127.0.0.1:2379/"]
prefix = "/cluster/one"
dial_timeout = "1s"
request_timeout = "500ms"
lease_ttl = "5s"
max_nodes = 100

[timers]
link_idle = "10s"
`
	data = strings.Replace(data, `"http://127.0.0.1:2379/"`, `"https://127.0.0.1:2379/"`, 1)
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	want := config.Registry{Etcd: []string{"https://10.0.0.9:2379", "etcd-2.example:2379", "https://127.0.0.1:2379/"},
		Prefix: "/cluster/one", DialTimeout: time.Second, RequestTimeout: 500 * time.Millisecond, LeaseTTL: 5 * time.Second, MaxNodes: 100}
	if c.Registry == nil || !equalRegistry(*c.Registry, want) {
		t.Errorf("Registry = %+v, want %+v", c.Registry, want)
	}
	if got := strings.Join(c.Advertise, " "); got != "10.0.0.1:7701 [fd00::1]:7701" {
		t.Errorf("Advertise = %q", got)
	}
	if c.Timers.LinkIdle != 10*time.Second {
		t.Errorf("LinkIdle = %s", c.Timers.LinkIdle)
	}
	// The listen rules are kept apart, to go with the registry's policy.
	if len(c.ListenRules) != 1 || c.ListenRules[0].Service != "pg" {
		t.Errorf("ListenRules = %+v", c.ListenRules)
	}
	if ok, ruled := c.Policy.MayListen("p", "pg", 8); ok || !ruled {
		t.Error("the listen rule is not in the policy")
	}
}

func equalRegistry(a, b config.Registry) bool {
	return strings.Join(a.Etcd, ",") == strings.Join(b.Etcd, ",") && a.Prefix == b.Prefix && a.CA == b.CA &&
		a.Cert == b.Cert && a.Key == b.Key && a.DialTimeout == b.DialTimeout &&
		a.RequestTimeout == b.RequestTimeout && a.LeaseTTL == b.LeaseTTL && a.MaxNodes == b.MaxNodes
}

func TestRegistryDefaults(t *testing.T) {
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(withRegistry("", `etcd = ["127.0.0.1:2379"]
ca = "tls/ca.pem"
cert = "/etc/etcd/client.pem"
key = "tls/client.key"`)))
	if err != nil {
		t.Fatal(err)
	}
	want := config.Registry{Etcd: []string{"127.0.0.1:2379"}, Prefix: "/sinc", CA: "/etc/sinc/tls/ca.pem",
		Cert: "/etc/etcd/client.pem", Key: "/etc/sinc/tls/client.key",
		DialTimeout: 5 * time.Second, RequestTimeout: 2 * time.Second, LeaseTTL: 20 * time.Second, MaxNodes: 65536}
	if !equalRegistry(*c.Registry, want) {
		t.Errorf("Registry = %+v, want %+v", c.Registry, want)
	}
	// advertise defaults to listen.
	if len(c.Advertise) != 1 || c.Advertise[0] != "localhost:1" {
		t.Errorf("Advertise = %q, want listen", c.Advertise)
	}
	if c.Timers.LinkIdle != 3*time.Minute {
		t.Errorf("LinkIdle = %s, want 3m", c.Timers.LinkIdle)
	}
	// Without [[allow]], only channels within a partition until the
	// registry's policy comes.
	if c.Policy.Allows(policy.Source{Node: "n", Partition: "p"}, policy.Dest{Node: "m", Partition: "p", Service: "s"}) {
		t.Error("a registry config starts with a policy that allows across nodes")
	}
	// Without [registry]: nothing of it.
	c, err = config.Parse("/etc/sinc/agent.toml", []byte(minimalConfig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Registry != nil || c.Advertise != nil {
		t.Errorf("static config has Registry %+v, Advertise %q", c.Registry, c.Advertise)
	}
}

func TestRegistryBad(t *testing.T) {
	const etcd = `etcd = ["127.0.0.1:2379"]`
	anyListen := strings.Replace(minimalConfig, `listen = "localhost:1"`, `listen = "0.0.0.0:7701"`, 1)
	for _, tc := range []struct {
		name, data, field, want string
	}{
		{"no endpoints", withRegistry("", ""), "registry.etcd", "missing: the etcd endpoints"},
		{"empty endpoints", withRegistry("", "etcd = []"), "registry.etcd", "missing"},
		{"too many endpoints", withRegistry("", "etcd = ["+strings.Repeat(`"h:1",`, 17)+"]"), "registry.etcd", "17 endpoints, more than 16"},
		{"endpoint not host:port", withRegistry("", `etcd = ["h:1", "etcd"]`), "registry.etcd[1]", `"etcd" is not host:port`},
		{"endpoint port 0", withRegistry("", `etcd = ["h:0"]`), "registry.etcd[0]", "has port 0"},
		{"endpoint scheme", withRegistry("", `etcd = ["unix://h:1"]`), "registry.etcd[0]", "is not host:port or an http(s)://host:port URL"},
		{"endpoint path", withRegistry("", `etcd = ["http://h:1/v3"]`), "registry.etcd[0]", "is not host:port or an http(s)"},
		{"endpoint user", withRegistry("", `etcd = ["http://u@h:1"]`), "registry.etcd[0]", "is not host:port or an http(s)"},
		{"http with TLS", withRegistry("", `etcd = ["http://h:1"]`+"\nca = \"ca.pem\""), "registry.etcd[0]", "plain http, and registry.ca or registry.cert asks for TLS"},
		{"endpoint not a string", withRegistry("", `etcd = [1]`), "registry.etcd", "incompatible types"},
		{"etcd not a list", withRegistry("", `etcd = "h:1"`), "registry.etcd", "incompatible types"},
		{"prefix without slash", withRegistry("", etcd+"\nprefix = \"sinc\""), "registry.prefix", `"sinc" is not a key prefix`},
		{"prefix slash only", withRegistry("", etcd+"\nprefix = \"/\""), "registry.prefix", "is not a key prefix"},
		{"prefix trailing slash", withRegistry("", etcd+"\nprefix = \"/sinc/\""), "registry.prefix", "is not a key prefix"},
		{"prefix empty segment", withRegistry("", etcd+"\nprefix = \"/a//b\""), "registry.prefix", "is not a key prefix"},
		{"prefix space", withRegistry("", etcd+"\nprefix = \"/a b\""), "registry.prefix", "has a byte 0x20 at 2"},
		{"prefix too long", withRegistry("", etcd+"\nprefix = \"/"+strings.Repeat("a", 128)+"\""), "registry.prefix", "more than 128"},
		{"cert without key", withRegistry("", etcd+"\ncert = \"c.pem\""), "registry.key", "missing: registry.cert is set"},
		{"key without cert", withRegistry("", etcd+"\nkey = \"c.key\""), "registry.cert", "missing: registry.key is set"},
		{"bad dial_timeout", withRegistry("", etcd+"\ndial_timeout = \"soon\""), "registry.dial_timeout", `"soon" is not a duration`},
		{"dial_timeout too long", withRegistry("", etcd+"\ndial_timeout = \"2m\""), "registry.dial_timeout", "2m0s is outside 10ms..1m0s"},
		{"request_timeout zero", withRegistry("", etcd+"\nrequest_timeout = \"0s\""), "registry.request_timeout", "0s is outside 10ms..1m0s"},
		{"lease_ttl too short", withRegistry("", etcd+"\nlease_ttl = \"1s\""), "registry.lease_ttl", "1s is outside 2s..1h0m0s"},
		{"lease_ttl fraction", withRegistry("", etcd+"\nlease_ttl = \"2500ms\""), "registry.lease_ttl", "not a whole number of seconds"},
		{"request_timeout past the ttl", withRegistry("", etcd+"\nlease_ttl = \"5s\"\nrequest_timeout = \"3s\""), "registry.request_timeout", "more than half of registry.lease_ttl (5s)"},
		{"max_nodes zero", withRegistry("", etcd+"\nmax_nodes = 0"), "registry.max_nodes", "0 is outside 1..1048576"},
		{"max_nodes a string", withRegistry("", etcd+"\nmax_nodes = \"many\""), "registry.max_nodes", "incompatible types"},
		{"unknown registry field", withRegistry("", etcd+"\nendpoints = [\"h:1\"]"), "registry.endpoints", "unknown field"},
		{"registry not a table", "registry = 1\n" + minimalConfig, "registry", "incompatible types"},

		{"peers with a registry", withRegistry("", etcd) + "[peers.b]\naddress = \"h:1\"\n", "peers", "the nodes come from the registry"},
		{"allow with a registry", withRegistry("", etcd) + "[[allow]]\nfrom = \"a/b\"\nto = \"c/d/e\"\n", "allow", "the cluster policy comes from the registry"},
		{"revocations with a registry", withRegistry(`revocations = "r.crl"`+"\n", etcd), "revocations", "the revocation list comes from the registry"},

		{"unspecified listen, no advertise", anyListen + "[registry]\n" + etcd + "\n", "advertise", `listen "0.0.0.0:7701" names no address another node can dial`},
		{"unspecified v6 listen", strings.Replace(minimalConfig, `"localhost:1"`, `"[::]:1"`, 1) + "[registry]\n" + etcd + "\n", "advertise", "names no address"},
		{"listen port 0", strings.Replace(minimalConfig, `"localhost:1"`, `"localhost:0"`, 1) + "[registry]\n" + etcd + "\n", "advertise", "names no address"},
		{"advertise unspecified", withRegistry(`advertise = ["0.0.0.0:1"]`+"\n", etcd), "advertise[0]", "is the unspecified address"},
		{"advertise port 0", withRegistry(`advertise = ["h:1", "h:0"]`+"\n", etcd), "advertise[1]", `"h:0" has port 0`},
		{"advertise not host:port", withRegistry(`advertise = ["h"]`+"\n", etcd), "advertise[0]", `"h" is not host:port`},
		{"advertise twice", withRegistry(`advertise = ["h:1", "h:1"]`+"\n", etcd), "advertise[1]", "is listed twice"},
		{"advertise too many", withRegistry(`advertise = [`+strings.Repeat(`"h:1",`, 9)+"]\n", etcd), "advertise", "9 addresses, more than 8"},
		{"advertise without a registry", `advertise = ["h:1"]` + "\n" + minimalConfig, "advertise", "there is no [registry]"},

		{"bad link_idle", withTimers(`link_idle = "idle"`), "timers.link_idle", `"idle" is not a duration`},
		{"link_idle zero", withTimers(`link_idle = "0s"`), "timers.link_idle", "0s is outside 1ms..24h"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const path = "/etc/sinc/agent.toml"
			c, err := config.Parse(path, []byte(tc.data))
			if c != nil {
				t.Fatalf("Parse accepted it: %+v", c.Registry)
			}
			var ce *config.Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v (%T), want a *config.Error", err, err)
			}
			if ce.Field != tc.field || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got field %q, error %q; want field %q, error containing %q", ce.Field, err, tc.field, tc.want)
			}
		})
	}
}

func TestCheckAdvertised(t *testing.T) {
	for _, a := range []string{"10.0.0.1:7701", "[::1]:1", "node-b.example:65535"} {
		if err := config.CheckAdvertised(a); err != nil {
			t.Errorf("%q: %v", a, err)
		}
	}
	for _, a := range []string{"", "h", "h:0", ":1", "0.0.0.0:1", "[::]:1", "h:65536", "a b:1", "h:-1"} {
		if err := config.CheckAdvertised(a); err == nil {
			t.Errorf("%q accepted", a)
		}
	}
}
