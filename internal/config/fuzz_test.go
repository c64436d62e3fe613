package config_test

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
)

// FuzzParse: Parse never panics, fails only with a *config.Error for the
// file, and what it accepts keeps every promise of Config.
func FuzzParse(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte(minimalConfig))
	f.Add([]byte(""))
	f.Add([]byte(set("node", "")))
	f.Add([]byte(withTimers(`keepalive = "15s"`)))
	f.Add([]byte(with("[partitions.q]\nsocket = \"/run/admin.sock\"\n")))
	f.Add([]byte(with("[peers.n]\naddress = \"h:1\"\n")))
	f.Add([]byte(with("[peers.b\naddress = \"h:1\"\n")))
	f.Add([]byte("peers = 3\n" + minimalConfig))
	f.Add([]byte("node = \"a\"\n[partitions]\nweb = { socket = \"w\" }\n[[peers]]\n"))
	f.Add([]byte(withLimits("window = 65535\nchannels = 1048576")))
	f.Add([]byte(withLimits(`window = "big"`)))
	f.Add([]byte(withPartition("mode = \"0660\"\nowner = \"0\"\ngroup = \"root\"")))
	f.Add([]byte(withPartition(`mode = "01777"`)))
	f.Add([]byte(withPartition(`mode = 0o600`)))
	f.Add([]byte(withRule(goodRule + "\nuids = [1, 2]\n[[allow]]\nfrom = \"*/[a-z]\"\nto = \"n/p/*\"")))
	f.Add([]byte(withRule("from = \"a/[\"\nto = \"b/c/d\"")))
	f.Add([]byte(withRule(goodRule + "\nuids = [\"x\"]")))
	f.Add([]byte("allow = [{ from = \"a/b\", to = \"c/d/e\" }, 1]\n" + minimalConfig))

	f.Fuzz(func(t *testing.T, data []byte) {
		const path = "/etc/sinc/agent.toml"
		c, err := config.Parse(path, data)
		if err != nil {
			var ce *config.Error
			if !errors.As(err, &ce) || ce.File != path {
				t.Fatalf("error %v (%T) is not a *config.Error for %s", err, err, path)
			}
			if c != nil {
				t.Fatal("Parse returned a config and an error")
			}
			return
		}
		if c.Path != path {
			t.Errorf("Path = %q", c.Path)
		}
		if c.Node == "" || cert.ValidName(c.Node) != nil {
			t.Errorf("Node = %q", c.Node)
		}
		if c.Listen == "" {
			t.Error("no Listen")
		}
		if len(c.Partitions) == 0 {
			t.Error("no partitions")
		}
		tm := c.Timers
		if tm.DeadAfter <= tm.Keepalive {
			t.Errorf("DeadAfter %v <= Keepalive %v", tm.DeadAfter, tm.Keepalive)
		}
		if tm.DialMax < tm.DialMin {
			t.Errorf("DialMax %v < DialMin %v", tm.DialMax, tm.DialMin)
		}
		for _, d := range []time.Duration{tm.Handshake, tm.Keepalive, tm.DeadAfter, tm.DialMin, tm.DialMax, tm.Open} {
			if d < time.Millisecond || d > 24*time.Hour {
				t.Errorf("timer %v out of range", d)
			}
		}
		l := c.Limits
		for _, b := range []struct {
			name     string
			v        int
			min, max int
		}{
			{"PendingHandshakes", l.PendingHandshakes, 1, 65536},
			{"Channels", l.Channels, 1, 1 << 20},
			{"ChannelsPerPartition", l.ChannelsPerPartition, 1, 1 << 20},
			{"ChannelsPerProcess", l.ChannelsPerProcess, 1, 1 << 20},
			{"ListenersPerPartition", l.ListenersPerPartition, 1, 65536},
			{"PendingRequests", l.PendingRequests, 1, 65536},
			{"Window", l.Window, config.MinWindow, config.MaxWindow},
		} {
			if b.v < b.min || b.v > b.max {
				t.Errorf("%s = %d, outside %d..%d", b.name, b.v, b.min, b.max)
			}
		}
		if c.Policy == nil {
			t.Fatal("no Policy")
		}
		// One policy rule per [[allow]] table.
		var raw map[string]any
		if _, err := toml.Decode(string(data), &raw); err != nil {
			t.Fatalf("Parse accepted what the TOML decoder refuses: %v", err)
		}
		rules := 0
		switch a := raw["allow"].(type) {
		case []map[string]any:
			rules = len(a)
		case []any:
			rules = len(a)
		case nil:
		default:
			t.Errorf("Parse accepted allow of type %T", a)
		}
		if c.Policy.Len() != rules {
			t.Errorf("Policy has %d rules for %d [[allow]] tables", c.Policy.Len(), rules)
		}
		paths := map[string]string{"cert": c.Cert, "key": c.Key, "ca": c.CA, "admin": c.Admin}
		for name, p := range c.Partitions {
			if p.Name != name || cert.ValidName(name) != nil {
				t.Errorf("partition %q: %+v", name, p)
			}
			if p.Mode > 0o777 || p.UID < -1 || p.GID < -1 {
				t.Errorf("partition %q: mode %o, uid %d, gid %d", name, p.Mode, p.UID, p.GID)
			}
			paths["partitions."+name+".socket"] = p.Socket
		}
		for what, p := range paths {
			if !filepath.IsAbs(p) || filepath.Clean(p) != p {
				t.Errorf("%s = %q is not a clean absolute path", what, p)
			}
		}
		sockets := map[string]bool{c.Admin: true}
		for _, p := range c.Partitions {
			if sockets[p.Socket] {
				t.Errorf("socket %s twice", p.Socket)
			}
			sockets[p.Socket] = true
		}
		for name, p := range c.Peers {
			if p.Name != name || name == c.Node || cert.ValidName(name) != nil || p.Address == "" {
				t.Errorf("peer %q: %+v", name, p)
			}
		}
	})
}
