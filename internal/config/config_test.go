package config_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/config"
)

// goodConfig uses every field, with relative and absolute paths.
const goodConfig = `# agent of node-a
node = "node-a"
cert = "node-a.crt"
key  = "keys/node-a.key"
ca   = "/etc/sinc/../sinc/ca.crt"
listen = "127.0.0.1:7701"
admin  = "run/admin.sock"

[timers]
handshake = "2s"
keepalive = "1s"
dead_after = "3.5s"
dial_min = "50ms"
dial_max = "1m"

[limits]
pending_handshakes = 16

[partitions.web]
socket = "web.sock"

[partitions.db]
socket = "/run/sinc/node-a/db.sock"

[peers.node-b]
address = "127.0.0.1:7702"

[peers."node-c.example"]
address = "[::1]:7703"
`

// minimalConfig has only the fields that have no default.
const minimalConfig = `node = "n"
cert = "n.crt"
key = "n.key"
ca = "ca.crt"
listen = "localhost:1"
admin = "/run/admin.sock"
[partitions.p]
socket = "/run/p.sock"
`

func TestParseGood(t *testing.T) {
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct{ name, got, want string }{
		{"Path", c.Path, "/etc/sinc/agent.toml"},
		{"Node", c.Node, "node-a"},
		{"Cert", c.Cert, "/etc/sinc/node-a.crt"},
		{"Key", c.Key, "/etc/sinc/keys/node-a.key"},
		{"CA", c.CA, "/etc/sinc/ca.crt"},
		{"Listen", c.Listen, "127.0.0.1:7701"},
		{"Admin", c.Admin, "/etc/sinc/run/admin.sock"},
	} {
		if f.got != f.want {
			t.Errorf("%s = %q, want %q", f.name, f.got, f.want)
		}
	}
	wantTimers := config.Timers{Handshake: 2 * time.Second, Keepalive: time.Second, DeadAfter: 3500 * time.Millisecond,
		DialMin: 50 * time.Millisecond, DialMax: time.Minute}
	if c.Timers != wantTimers {
		t.Errorf("Timers = %+v, want %+v", c.Timers, wantTimers)
	}
	if c.Limits.PendingHandshakes != 16 {
		t.Errorf("PendingHandshakes = %d", c.Limits.PendingHandshakes)
	}
	wantParts := map[string]config.Partition{
		"web": {Name: "web", Socket: "/etc/sinc/web.sock"},
		"db":  {Name: "db", Socket: "/run/sinc/node-a/db.sock"},
	}
	if len(c.Partitions) != len(wantParts) {
		t.Errorf("Partitions = %+v", c.Partitions)
	}
	for k, v := range wantParts {
		if c.Partitions[k] != v {
			t.Errorf("Partitions[%q] = %+v, want %+v", k, c.Partitions[k], v)
		}
	}
	wantPeers := map[string]config.Peer{
		"node-b":         {Name: "node-b", Address: "127.0.0.1:7702"},
		"node-c.example": {Name: "node-c.example", Address: "[::1]:7703"},
	}
	if len(c.Peers) != len(wantPeers) {
		t.Errorf("Peers = %+v", c.Peers)
	}
	for k, v := range wantPeers {
		if c.Peers[k] != v {
			t.Errorf("Peers[%q] = %+v, want %+v", k, c.Peers[k], v)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	c, err := config.Parse("/etc/sinc/agent.toml", []byte(minimalConfig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Timers != config.DefaultTimers {
		t.Errorf("Timers = %+v, want the defaults %+v", c.Timers, config.DefaultTimers)
	}
	if c.Limits != config.DefaultLimits {
		t.Errorf("Limits = %+v, want the defaults %+v", c.Limits, config.DefaultLimits)
	}
	if c.Peers == nil || len(c.Peers) != 0 {
		t.Errorf("Peers = %#v, want an empty map", c.Peers)
	}
	// The defaults are what the package documents.
	want := config.Timers{Handshake: 5 * time.Second, Keepalive: 5 * time.Second, DeadAfter: 15 * time.Second,
		DialMin: 200 * time.Millisecond, DialMax: 30 * time.Second}
	if config.DefaultTimers != want || config.DefaultLimits.PendingHandshakes != 256 {
		t.Errorf("defaults changed: %+v %+v", config.DefaultTimers, config.DefaultLimits)
	}
	// Empty tables change nothing.
	c, err = config.Parse("/etc/sinc/agent.toml", []byte(strings.Replace(minimalConfig, "[partitions.p]", "[timers]\n[limits]\n[peers]\n[partitions.p]", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Timers != config.DefaultTimers || c.Limits != config.DefaultLimits {
		t.Errorf("empty tables: %+v %+v", c.Timers, c.Limits)
	}
}

// TestTimersOverride sets one timer at a time: the others keep their
// defaults.
func TestTimersOverride(t *testing.T) {
	for _, tc := range []struct {
		line string
		set  func(*config.Timers)
	}{
		{`handshake = "250ms"`, func(t *config.Timers) { t.Handshake = 250 * time.Millisecond }},
		{`keepalive = "10s"`, func(t *config.Timers) { t.Keepalive = 10 * time.Second }},
		{`dead_after = "1h"`, func(t *config.Timers) { t.DeadAfter = time.Hour }},
		{`dial_min = "1ms"`, func(t *config.Timers) { t.DialMin = time.Millisecond }},
		{`dial_max = "24h"`, func(t *config.Timers) { t.DialMax = 24 * time.Hour }},
		{`dial_max = "200ms"`, func(t *config.Timers) { t.DialMax = 200 * time.Millisecond }}, // equal to dial_min
	} {
		data := withTimers(tc.line)
		c, err := config.Parse("/etc/a.toml", []byte(data))
		if err != nil {
			t.Fatalf("%s: %v", tc.line, err)
		}
		want := config.DefaultTimers
		tc.set(&want)
		if want == config.DefaultTimers {
			t.Fatalf("%s: the test sets a default", tc.line)
		}
		if c.Timers != want {
			t.Errorf("%s: Timers = %+v, want %+v", tc.line, c.Timers, want)
		}
	}
	c, err := config.Parse("/etc/a.toml", []byte(with("[limits]\npending_handshakes = 65536\n")))
	if err != nil || c.Limits.PendingHandshakes != 65536 {
		t.Fatalf("pending_handshakes = 65536: %v", err)
	}
}

// TestRelativePaths: paths in the file are taken from the file's folder,
// whether the file is named by an absolute or a relative path.
func TestRelativePaths(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "conf", "agent.toml")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(goodConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "conf")
	if c.Cert != filepath.Join(conf, "node-a.crt") || c.Key != filepath.Join(conf, "keys/node-a.key") ||
		c.Admin != filepath.Join(conf, "run/admin.sock") || c.Partitions["web"].Socket != filepath.Join(conf, "web.sock") {
		t.Errorf("relative paths not from %s: %+v", conf, c)
	}
	if c.CA != "/etc/sinc/ca.crt" || c.Partitions["db"].Socket != "/run/sinc/node-a/db.sock" {
		t.Errorf("absolute paths changed: %s %s", c.CA, c.Partitions["db"].Socket)
	}

	// A relative config path: from the working folder.
	t.Chdir(dir)
	c, err = config.Load(filepath.Join("conf", "agent.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Path != filepath.Join("conf", "agent.toml") {
		t.Errorf("Path = %q", c.Path)
	}
	wd, _ := os.Getwd() // dir, with any symbolic links resolved as the OS does
	if want := filepath.Join(wd, "conf", "node-a.crt"); c.Cert != want {
		t.Errorf("Cert = %q, want %q", c.Cert, want)
	}
	// Paths that climb out of the folder are cleaned.
	data := strings.Replace(minimalConfig, `cert = "n.crt"`, `cert = "../x/./n.crt"`, 1)
	c, err = config.Parse("/etc/sinc/agent.toml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if c.Cert != "/etc/x/n.crt" {
		t.Errorf("Cert = %q", c.Cert)
	}
}

// set replaces the line that starts with key (followed by " =" or "=")
// in minimalConfig, or removes it when line is "".
func set(key, line string) string {
	lines := strings.Split(minimalConfig, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, key+" =") || strings.HasPrefix(l, key+"=") {
			lines[i] = line
			return strings.Join(lines, "\n")
		}
	}
	panic("no line " + key)
}

// with adds tables to minimalConfig.
func with(tables string) string { return minimalConfig + tables }

// withTimers puts a [timers] table with the given lines in minimalConfig.
func withTimers(lines string) string { return with("[timers]\n" + lines + "\n") }

func TestParseBad(t *testing.T) {
	noPartitions := strings.Replace(minimalConfig, "[partitions.p]\nsocket = \"/run/p.sock\"\n", "", 1)
	for _, tc := range []struct {
		name  string
		data  string
		field string
		want  string
	}{
		{"missing node", set("node", ""), "node", "missing: the name of this node"},
		{"empty node", set("node", `node = ""`), "node", "missing"},
		{"bad node name", set("node", `node = "node/a"`), "node", `name "node/a" has '/'`},
		{"node name too long", set("node", `node = "`+strings.Repeat("n", 64)+`"`), "node", "longer than 63"},
		{"missing cert", set("cert", ""), "cert", "missing: a file path"},
		{"missing key", set("key", ""), "key", "missing: a file path"},
		{"missing ca", set("ca", ""), "ca", "missing: a file path"},
		{"missing admin", set("admin", ""), "admin", "missing: a file path"},
		{"missing listen", set("listen", ""), "listen", "missing: the peer link address"},
		{"listen without port", set("listen", `listen = "127.0.0.1"`), "listen", `"127.0.0.1" is not host:port`},
		{"listen without host", set("listen", `listen = ":7701"`), "listen", `":7701" has no host`},
		{"listen with bad host", set("listen", `listen = "a b:7701"`), "listen", "has a bad host"},
		{"listen with a path", set("listen", `listen = "/run/x:7701"`), "listen", "has a bad host"},
		{"listen with bad port", set("listen", `listen = "h:http"`), "listen", "has a bad port"},
		{"listen with port too large", set("listen", `listen = "h:65536"`), "listen", "has a bad port"},
		{"listen with negative port", set("listen", `listen = "h:-1"`), "listen", "has a bad port"},
		{"listen with signed port", set("listen", `listen = "h:+80"`), "listen", "has a bad port"},
		{"listen with empty port", set("listen", `listen = "h:"`), "listen", "has a bad port"},

		{"bad duration", withTimers(`handshake = "5 seconds"`), "timers.handshake", `"5 seconds" is not a duration like "5s"`},
		{"duration without unit", withTimers(`keepalive = "5"`), "timers.keepalive", "is not a duration"},
		{"bad dead_after", withTimers(`dead_after = "x"`), "timers.dead_after", "is not a duration"},
		{"bad dial_min", withTimers(`dial_min = "1d"`), "timers.dial_min", "is not a duration"},
		{"bad dial_max", withTimers(`dial_max = "--1s"`), "timers.dial_max", "is not a duration"},
		{"zero duration", withTimers(`handshake = "0s"`), "timers.handshake", "0s is outside 1ms..24h"},
		{"negative duration", withTimers(`dial_min = "-1s"`), "timers.dial_min", "-1s is outside 1ms..24h"},
		{"duration too short", withTimers(`keepalive = "999us"`), "timers.keepalive", "999µs is outside 1ms..24h"},
		{"duration too long", withTimers(`dead_after = "24h0m0.001s"`), "timers.dead_after", "is outside 1ms..24h"},
		{"dial_max too long", withTimers(`dial_max = "100000h"`), "timers.dial_max", "is outside 1ms..24h"},
		{"dead_after equal to keepalive", withTimers(`dead_after = "5s"`), "timers.dead_after", "5s must be longer than timers.keepalive (5s)"},
		{"dead_after less than keepalive", withTimers("keepalive = \"20s\""), "timers.dead_after", "15s must be longer than timers.keepalive (20s)"},
		{"dial_max less than dial_min", withTimers(`dial_min = "1m"`), "timers.dial_max", "30s is less than timers.dial_min (1m0s)"},
		{"duration not a string", withTimers(`handshake = 5`), "", "line 10"},

		{"pending_handshakes zero", with("[limits]\npending_handshakes = 0\n"), "limits.pending_handshakes", "0 is outside 1..65536"},
		{"pending_handshakes negative", with("[limits]\npending_handshakes = -5\n"), "limits.pending_handshakes", "-5 is outside 1..65536"},
		{"pending_handshakes too large", with("[limits]\npending_handshakes = 65537\n"), "limits.pending_handshakes", "65537 is outside 1..65536"},

		{"no partitions", noPartitions, "partitions", "missing: at least one [partitions.NAME]"},
		{"partitions not a table", strings.Replace(noPartitions, "admin", "partitions = \"web\"\nadmin", 1), "partitions", "is of TOML type String"},
		{"bad partition name", with("[partitions.\"-web\"]\nsocket = \"/x.sock\"\n"), "partitions.-web", `name "-web" has '-' at 0`},
		{"partition name with slash", with("[partitions.\"a/b\"]\nsocket = \"/x.sock\"\n"), "partitions.a/b", `has '/'`},
		{"missing socket", with("[partitions.web]\n"), "partitions.web.socket", "missing: the partition's Unix socket path"},
		{"duplicate socket", with("[partitions.q]\nsocket = \"/run/p.sock\"\n"), "partitions.q.socket", "/run/p.sock is already the socket of partitions.p"},
		{"duplicate socket, relative and absolute", with("[partitions.q]\nsocket = \"../../run/p.sock\"\n"), "partitions.q.socket", "already the socket of partitions.p"},
		{"duplicate socket, unclean", with("[partitions.q]\nsocket = \"/run//./p.sock\"\n"), "partitions.q.socket", "already the socket of partitions.p"},
		{"partition socket is the admin socket", with("[partitions.q]\nsocket = \"/run/admin.sock\"\n"), "partitions.q.socket", "/run/admin.sock is already the socket of admin"},

		{"peers not a table", strings.Replace(minimalConfig, "admin", "peers = \"node-b\"\nadmin", 1), "peers", "is of TOML type String"},
		{"peers an array of tables", with("[[peers]]\naddress = \"h:1\"\n"), "peers", "is of TOML type ArrayHash"},
		{"bad peer name", with("[peers.\"node b\"]\naddress = \"h:1\"\n"), "peers.node b", `name "node b" has ' '`},
		{"peer is this node", with("[peers.n]\naddress = \"h:1\"\n"), "peers.n", "a node is not its own peer"},
		{"missing peer address", with("[peers.b]\n"), "peers.b.address", "missing: the peer's host:port"},
		{"bad peer address", with("[peers.b]\naddress = \"b\"\n"), "peers.b.address", `"b" is not host:port`},
		{"peer address without host", with("[peers.b]\naddress = \":1\"\n"), "peers.b.address", "has no host"},
		{"peer address with bad port", with("[peers.b]\naddress = \"b:99999\"\n"), "peers.b.address", "has a bad port"},
		{"peer address with port 0", with("[peers.b]\naddress = \"b:0\"\n"), "peers.b.address", `"b:0" has port 0`},

		{"unknown top-level field", minimalConfig + "", "", ""}, // replaced below
		{"unknown table", with("[policy]\nallow = true\n"), "policy", "unknown field"},
		{"unknown timer", withTimers(`keepalve = "1s"`), "timers.keepalve", "unknown field"},
		{"unknown limit", with("[limits]\nchannels = 5\n"), "limits.channels", "unknown field"},
		{"unknown partition field", with("[partitions.web]\nsocket = \"/w.sock\"\nmode = 0o600\n"), "partitions.web.mode", "unknown field"},
		{"unknown peer field", with("[peers.b]\naddress = \"h:1\"\nadress = \"h:2\"\n"), "peers.b.adress", "unknown field"},

		{"syntax error", set("cert", `cert = "n.crt`), "", "line 2"},
		{"syntax error later", with("[peers.b c]\naddress = \"h:1\"\n"), "", "line 9"},
		{"duplicate key", set("key", "key = \"a\"\nkey = \"b\""), "", "line 4"},
		{"wrong type", set("node", "node = 5"), "", "line 1"},
		{"too large", minimalConfig + "#" + strings.Repeat("x", config.MaxFileSize), "", "more than 1048576"},
	} {
		if tc.name == "unknown top-level field" {
			tc.data, tc.field, tc.want = "nod = \"x\"\n"+minimalConfig, "nod", "unknown field"
		}
		t.Run(tc.name, func(t *testing.T) {
			const path = "/etc/sinc/agent.toml"
			c, err := config.Parse(path, []byte(tc.data))
			if c != nil {
				t.Errorf("Parse returned a config with the error")
			}
			var ce *config.Error
			if !errors.As(err, &ce) {
				t.Fatalf("got %v (%T), want a *config.Error", err, err)
			}
			if ce.Field != tc.field {
				t.Errorf("Field = %q, want %q (error %q)", ce.Field, tc.field, err)
			}
			if ce.File != path {
				t.Errorf("File = %q", ce.File)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "config "+path+": ") {
				t.Errorf("error %q does not start with the file", err)
			}
			if tc.field != "" && !strings.Contains(err.Error(), `field "`+tc.field+`"`) {
				t.Errorf("error %q does not name the field", err)
			}
		})
	}
}

// TestParseAtLimit: a file of exactly MaxFileSize bytes is read.
func TestParseAtLimit(t *testing.T) {
	data := minimalConfig + "#"
	data += strings.Repeat("x", config.MaxFileSize-len(data))
	if _, err := config.Parse("/a.toml", []byte(data)); err != nil {
		t.Fatal(err)
	}
}

func TestErrorFormat(t *testing.T) {
	inner := errors.New("boom")
	e := &config.Error{File: "/a.toml", Field: "timers.keepalive", Err: inner}
	if got := e.Error(); got != `config /a.toml: field "timers.keepalive": boom` {
		t.Errorf("Error() = %q", got)
	}
	if !errors.Is(e, inner) {
		t.Error("Error does not unwrap")
	}
	e.Field = ""
	if got := e.Error(); got != "config /a.toml: boom" {
		t.Errorf("Error() = %q", got)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	t.Run("missing file", func(t *testing.T) {
		path := filepath.Join(dir, "missing.toml")
		c, err := config.Load(path)
		if c != nil {
			t.Error("Load returned a config with the error")
		}
		var ce *config.Error
		if !errors.As(err, &ce) || ce.File != path {
			t.Fatalf("got %v, want a *config.Error for %s", err, path)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("error %v is not ErrNotExist", err)
		}
		if !strings.Contains(err.Error(), path) {
			t.Errorf("error %q does not name %s", err, path)
		}
	})
	t.Run("directory", func(t *testing.T) {
		_, err := config.Load(dir)
		var ce *config.Error
		if !errors.As(err, &ce) || !strings.Contains(err.Error(), dir) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("too large", func(t *testing.T) {
		path := filepath.Join(dir, "big.toml")
		if err := os.WriteFile(path, []byte(minimalConfig+"#"+strings.Repeat("x", config.MaxFileSize)), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path)
		var ce *config.Error
		if !errors.As(err, &ce) || ce.File != path || !strings.Contains(err.Error(), "more than 1048576") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("bad content names the file", func(t *testing.T) {
		path := filepath.Join(dir, "bad.toml")
		if err := os.WriteFile(path, []byte(set("node", "")), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(path)
		var ce *config.Error
		if !errors.As(err, &ce) || ce.File != path || ce.Field != "node" {
			t.Fatalf("got %v", err)
		}
	})
}

// TestLoadBoundsReading: a file with no size (a FIFO, a device) is read no
// further than the size bound.
func TestLoadBoundsReading(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fifo.toml")
	if err := mkfifo(path); err != nil {
		t.Skip("no FIFOs here:", err)
	}
	written := make(chan int64, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			written <- -1
			return
		}
		defer f.Close()
		chunk := make([]byte, 64<<10)
		for i := range chunk {
			chunk[i] = '#'
		}
		var n int64
		for n < 16*config.MaxFileSize {
			m, err := f.Write(chunk)
			n += int64(m)
			if err != nil {
				break
			}
		}
		written <- n
	}()
	_, err := config.Load(path)
	var ce *config.Error
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("got %v", err)
	}
	if n := <-written; n < 0 || n > 2*config.MaxFileSize {
		t.Fatalf("Load read %d bytes of a FIFO, bound %d", n, config.MaxFileSize)
	}
}

func mkfifo(path string) error { return syscall.Mkfifo(path, 0o600) }
