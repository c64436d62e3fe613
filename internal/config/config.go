// Package config reads and checks an agent's configuration file (TOML).
//
// Every problem is reported before the agent starts anything, as an error
// that names the file, the field and what is wrong with it. Unknown fields
// are errors too: a misspelt field must not silently fall back to a default.
//
//	node = "node-a"
//	cert = "node-a.crt"              # relative paths: from the config's folder
//	key  = "node-a.key"
//	ca   = "ca.crt"
//	listen = "127.0.0.1:7701"        # peer link address
//	admin  = "/run/sinc/node-a/admin.sock"
//
//	[timers]                         # optional; these are the defaults
//	handshake = "5s"
//	keepalive = "5s"
//	dead_after = "15s"
//	dial_min = "200ms"
//	dial_max = "30s"
//
//	[limits]
//	pending_handshakes = 256
//
//	[partitions.web]
//	socket = "/run/sinc/node-a/web.sock"
//
//	[peers.node-b]
//	address = "127.0.0.1:7702"
package config

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"sinc.dev/sinc/internal/cert"
)

// MaxFileSize bounds a config file.
const MaxFileSize = 1 << 20

// Config is a checked agent configuration. Paths are absolute.
type Config struct {
	Path string // the file it was read from

	Node   string
	Cert   string
	Key    string
	CA     string
	Listen string
	Admin  string

	Timers Timers
	Limits Limits

	Partitions map[string]Partition
	Peers      map[string]Peer
}

// Timers are the agent's timeouts and intervals.
type Timers struct {
	Handshake time.Duration
	Keepalive time.Duration
	DeadAfter time.Duration
	DialMin   time.Duration
	DialMax   time.Duration
}

// Limits bound the agent's tables and queues.
type Limits struct {
	PendingHandshakes int
}

// Partition is one partition this node hosts.
type Partition struct {
	Name   string
	Socket string
}

// Peer is another node's agent.
type Peer struct {
	Name    string
	Address string
}

// Default timers and limits.
var (
	DefaultTimers = Timers{
		Handshake: 5 * time.Second,
		Keepalive: 5 * time.Second,
		DeadAfter: 15 * time.Second,
		DialMin:   200 * time.Millisecond,
		DialMax:   30 * time.Second,
	}
	DefaultLimits = Limits{PendingHandshakes: 256}
)

// file mirrors the TOML layout.
type file struct {
	Node   string `toml:"node"`
	Cert   string `toml:"cert"`
	Key    string `toml:"key"`
	CA     string `toml:"ca"`
	Listen string `toml:"listen"`
	Admin  string `toml:"admin"`
	Timers struct {
		Handshake string `toml:"handshake"`
		Keepalive string `toml:"keepalive"`
		DeadAfter string `toml:"dead_after"`
		DialMin   string `toml:"dial_min"`
		DialMax   string `toml:"dial_max"`
	} `toml:"timers"`
	Limits struct {
		PendingHandshakes *int `toml:"pending_handshakes"`
	} `toml:"limits"`
	Partitions map[string]struct {
		Socket string `toml:"socket"`
	} `toml:"partitions"`
	Peers map[string]struct {
		Address string `toml:"address"`
	} `toml:"peers"`
}

// Error is a problem with one field of a config file.
type Error struct {
	File  string
	Field string // dotted TOML path; empty for the file as a whole
	Err   error
}

func (e *Error) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("config %s: %v", e.File, e.Err)
	}
	return fmt.Sprintf("config %s: field %q: %v", e.File, e.Field, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Load reads and checks the config file at path.
func Load(path string) (*Config, error) {
	data, err := readBounded(path)
	if err != nil {
		return nil, &Error{File: path, Err: err}
	}
	return Parse(path, data)
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > MaxFileSize {
		return nil, fmt.Errorf("file is %d bytes, more than %d", st.Size(), MaxFileSize)
	}
	// Read no more than the bound plus one byte (for Parse to refuse) from
	// the file that was checked: its size may have grown since, and a
	// device or FIFO has none.
	return io.ReadAll(io.LimitReader(f, MaxFileSize+1))
}

// Parse checks config data as if read from path (relative paths in it are
// taken from path's folder).
func Parse(path string, data []byte) (*Config, error) {
	if len(data) > MaxFileSize {
		return nil, &Error{File: path, Err: fmt.Errorf("file is %d bytes, more than %d", len(data), MaxFileSize)}
	}
	var f file
	md, err := toml.Decode(string(data), &f)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, &Error{File: path, Err: fmt.Errorf("line %d: %s", pe.Position.Line, pe.Message)}
		}
		return nil, &Error{File: path, Err: err}
	}
	// The TOML decoder leaves a map empty, without an error, when the file
	// gives it a value that is not a table ("peers = 3"): refuse that here.
	for _, k := range []string{"partitions", "peers"} {
		if t := md.Type(k); t != "" && t != "Hash" {
			return nil, &Error{File: path, Field: k, Err: fmt.Errorf("is of TOML type %s: want one table per name, [%s.NAME]", t, k)}
		}
	}
	if und := md.Undecoded(); len(und) > 0 {
		return nil, &Error{File: path, Field: und[0].String(), Err: errors.New("unknown field")}
	}
	base := filepath.Dir(path)
	if abs, err := filepath.Abs(base); err == nil {
		base = abs
	}
	c := &Config{Path: path, Timers: DefaultTimers, Limits: DefaultLimits,
		Partitions: map[string]Partition{}, Peers: map[string]Peer{}}
	fail := func(field string, err error) error { return &Error{File: path, Field: field, Err: err} }

	if f.Node == "" {
		return nil, fail("node", errors.New("missing: the name of this node"))
	}
	if err := cert.ValidName(f.Node); err != nil {
		return nil, fail("node", err)
	}
	c.Node = f.Node
	for _, p := range []struct {
		field string
		val   string
		dst   *string
	}{{"cert", f.Cert, &c.Cert}, {"key", f.Key, &c.Key}, {"ca", f.CA, &c.CA}, {"admin", f.Admin, &c.Admin}} {
		if p.val == "" {
			return nil, fail(p.field, errors.New("missing: a file path"))
		}
		*p.dst = absPath(base, p.val)
	}
	if f.Listen == "" {
		return nil, fail("listen", errors.New("missing: the peer link address, host:port"))
	}
	if _, err := checkHostPort(f.Listen); err != nil {
		return nil, fail("listen", err)
	}
	c.Listen = f.Listen

	for _, d := range []struct {
		field string
		val   string
		dst   *time.Duration
	}{
		{"timers.handshake", f.Timers.Handshake, &c.Timers.Handshake},
		{"timers.keepalive", f.Timers.Keepalive, &c.Timers.Keepalive},
		{"timers.dead_after", f.Timers.DeadAfter, &c.Timers.DeadAfter},
		{"timers.dial_min", f.Timers.DialMin, &c.Timers.DialMin},
		{"timers.dial_max", f.Timers.DialMax, &c.Timers.DialMax},
	} {
		if d.val == "" {
			continue
		}
		v, err := time.ParseDuration(d.val)
		if err != nil {
			return nil, fail(d.field, fmt.Errorf("%q is not a duration like \"5s\"", d.val))
		}
		if v < time.Millisecond || v > 24*time.Hour {
			return nil, fail(d.field, fmt.Errorf("%s is outside 1ms..24h", v))
		}
		*d.dst = v
	}
	if c.Timers.DeadAfter <= c.Timers.Keepalive {
		return nil, fail("timers.dead_after", fmt.Errorf("%s must be longer than timers.keepalive (%s)", c.Timers.DeadAfter, c.Timers.Keepalive))
	}
	if c.Timers.DialMax < c.Timers.DialMin {
		return nil, fail("timers.dial_max", fmt.Errorf("%s is less than timers.dial_min (%s)", c.Timers.DialMax, c.Timers.DialMin))
	}
	if v := f.Limits.PendingHandshakes; v != nil {
		if *v < 1 || *v > 65536 {
			return nil, fail("limits.pending_handshakes", fmt.Errorf("%d is outside 1..65536", *v))
		}
		c.Limits.PendingHandshakes = *v
	}

	if len(f.Partitions) == 0 {
		return nil, fail("partitions", errors.New("missing: at least one [partitions.NAME] with a socket"))
	}
	sockets := map[string]string{c.Admin: "admin"}
	for _, name := range sortedKeys(f.Partitions) {
		field := "partitions." + name
		if err := cert.ValidName(name); err != nil {
			return nil, fail(field, err)
		}
		p := f.Partitions[name]
		if p.Socket == "" {
			return nil, fail(field+".socket", errors.New("missing: the partition's Unix socket path"))
		}
		sock := absPath(base, p.Socket)
		if other, dup := sockets[sock]; dup {
			return nil, fail(field+".socket", fmt.Errorf("%s is already the socket of %s", sock, other))
		}
		sockets[sock] = field
		c.Partitions[name] = Partition{Name: name, Socket: sock}
	}
	for _, name := range sortedKeys(f.Peers) {
		field := "peers." + name
		if err := cert.ValidName(name); err != nil {
			return nil, fail(field, err)
		}
		if name == c.Node {
			return nil, fail(field, errors.New("a node is not its own peer"))
		}
		p := f.Peers[name]
		if p.Address == "" {
			return nil, fail(field+".address", errors.New("missing: the peer's host:port"))
		}
		port, err := checkHostPort(p.Address)
		if err != nil {
			return nil, fail(field+".address", err)
		}
		if port == 0 {
			return nil, fail(field+".address", fmt.Errorf("%q has port 0: give the port the peer listens on", p.Address))
		}
		c.Peers[name] = Peer{Name: name, Address: p.Address}
	}
	return c, nil
}

func absPath(base, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(base, p)
}

// checkHostPort checks a host:port address and returns its port.
func checkHostPort(s string) (int, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not host:port", s)
	}
	if host == "" {
		return 0, fmt.Errorf("%q has no host", s)
	}
	if strings.ContainsAny(host, " /") {
		return 0, fmt.Errorf("%q has a bad host", s)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 || port[0] < '0' || port[0] > '9' { // no sign
		return 0, fmt.Errorf("%q has a bad port", s)
	}
	return n, nil
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
