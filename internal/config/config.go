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
//	revocations = "revoked.crl"      # optional: the CA's revocation list, followed as it changes
//	state_dir = "state"              # default; the newest revocation list seen, kept across restarts
//	metrics = "127.0.0.1:9464"       # optional: Prometheus metrics at http://ADDR/metrics; off when absent
//	log_format = "text"              # default; or "json"
//	log_level = "info"               # default; or "debug", "warn", "error"
//
//	advertise = ["10.0.0.1:7701"]    # with [registry]: the addresses published; default: listen
//
//	[registry]                       # optional: the cluster registry on etcd (registry.go)
//	etcd = ["https://10.0.0.9:2379"]
//
//	[timers]                         # optional; these are the defaults
//	handshake = "5s"
//	keepalive = "5s"
//	dead_after = "15s"
//	dial_min = "200ms"
//	dial_max = "30s"
//	open = "5s"                      # a channel open not answered by then fails
//	request = "5s"                   # a process must send its request within this
//	grace = "30s"                    # channels of a broken link end this long after the last frame heard
//	rekey = "2m"                     # links make fresh session keys this often
//	rotate = "10m"                   # channel keys are replaced this often
//	link_idle = "3m"                 # with [registry]: a link without channels this long is closed
//
//	[limits]
//	pending_handshakes = 256
//	pending_handshakes_per_source = 8  # from one IPv4 address or IPv6 /64
//	channels = 16384                 # per agent
//	accepted = 12288                 # of them accepted ones; default 3/4 of channels
//	channels_per_partition = 8192    # dialed by its processes
//	accepted_per_partition = 8192    # accepted for it (not counting its own channels)
//	accepted_per_node = 4096         # accepted from one node
//	channels_per_process = 1024
//	listeners_per_partition = 256
//	pending_requests = 64            # requests being read, per partition socket
//	pending_requests_per_uid = 16    # of them from one uid; default 1/4 of pending_requests
//	queued_requests = 4096           # connections waiting their turn, per partition socket
//	queued_requests_per_uid = 1024   # of them from one uid; default 1/4 of queued_requests
//	window = 524288                  # bytes in flight per channel direction
//	ring = 262144                    # bytes of each ring of a ring channel (a power of two)
//
//	[partitions.web]
//	socket = "/run/sinc/node-a/web.sock"
//	mode = "0660"                    # default "0600"
//	owner = "web"                    # user name or uid; default: the agent's
//	group = "web"                    # group name or gid; default: the agent's
//
//	[[partitions.web.listen]]        # optional: who may listen on which service
//	service = "pg"                   # pattern; see package policy
//	uids = [1001]
//
//	[peers.node-b]
//	address = "127.0.0.1:7702"
//
//	[[allow]]                        # policy: see package policy
//	from = "node-a/web"
//	to = "node-b/db/pg"
//	uids = [1000]
package config

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/policy"
	"sinc.dev/sinc/internal/ring"
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
	// Revocations is the CA-signed revocation list to follow; "" for none.
	Revocations string
	// StateDir is the agent's own folder for what it must remember across
	// restarts (the newest revocation list it has seen).
	StateDir string
	// Metrics is the host:port the agent serves Prometheus metrics on,
	// at /metrics; "" for none.
	Metrics string
	// LogFormat is "text" or "json"; LogLevel the least level logged.
	// The agent's --log-format and --log-level, when given, win.
	LogFormat string
	LogLevel  slog.Level

	Timers Timers
	Limits Limits

	// Registry is the cluster registry (registry.go); nil: the static
	// file — [peers], revocations and [[allow]] — is the cluster.
	Registry *Registry
	// Advertise is the addresses of this agent's peer port that it
	// publishes in the registry (nil without one).
	Advertise []string

	Partitions map[string]Partition
	Peers      map[string]Peer
	Policy     *policy.Policy
	// ListenRules are the partitions' listen rules, also in Policy: a
	// policy from the registry is combined with them.
	ListenRules []policy.ListenRule
}

// Timers are the agent's timeouts and intervals.
type Timers struct {
	Handshake time.Duration
	Keepalive time.Duration
	DeadAfter time.Duration
	DialMin   time.Duration
	DialMax   time.Duration
	Open      time.Duration
	Request   time.Duration
	Grace     time.Duration
	Rekey     time.Duration // a link older than this is replaced by a fresh handshake
	Rotate    time.Duration // a channel key older than this is replaced
	LinkIdle  time.Duration // with a registry: a link without channels this long is closed
}

// Limits bound the agent's tables and queues.
type Limits struct {
	PendingHandshakes     int
	Channels              int
	Accepted              int // of Channels, the ones peers (and other partitions) opened
	ChannelsPerPartition  int // dialed by its processes
	AcceptedPerPartition  int // accepted for it from other partitions
	AcceptedPerNode       int // accepted from one node
	ChannelsPerProcess    int
	ListenersPerPartition int
	PendingRequests       int // requests being read, per partition socket
	PendingRequestsPerUID int
	QueuedRequests        int // connections waiting to be read, per partition socket
	QueuedRequestsPerUID  int
	Window                int
	Ring                  int // bytes of each of a ring channel's two rings
	RekeyFrames           int // frames a link carries before a fresh handshake
	RotateFrames          int // frames under one channel key before a new one
	RotateBytes           int // bytes under one channel key before a new one
	Memory                int // bytes the agent buffers for all channels at most

	PendingHandshakesPerSource int // from one IPv4 address or IPv6 /64
}

// Partition is one partition this node hosts.
type Partition struct {
	Name   string
	Socket string
	Mode   os.FileMode
	UID    int // -1: the agent's
	GID    int // -1: the agent's
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
		Open:      5 * time.Second,
		Request:   5 * time.Second,
		Grace:     30 * time.Second,
		Rekey:     2 * time.Minute,
		Rotate:    10 * time.Minute,
		LinkIdle:  3 * time.Minute,
	}
	DefaultLimits = Limits{
		PendingHandshakes:     256,
		Channels:              16384,
		Accepted:              12288,
		ChannelsPerPartition:  8192,
		AcceptedPerPartition:  8192,
		AcceptedPerNode:       4096,
		ChannelsPerProcess:    1024,
		ListenersPerPartition: 256,
		PendingRequests:       64,
		PendingRequestsPerUID: 16,
		QueuedRequests:        4096,
		QueuedRequestsPerUID:  1024,
		Window:                512 << 10,
		Ring:                  ring.DefaultSize,
		RekeyFrames:           1 << 30,
		RotateFrames:          1 << 24,
		RotateBytes:           1 << 34,
		Memory:                256 << 20,

		PendingHandshakesPerSource: 8,
	}
)

// file mirrors the TOML layout.
type file struct {
	Node        string        `toml:"node"`
	Cert        string        `toml:"cert"`
	Key         string        `toml:"key"`
	CA          string        `toml:"ca"`
	Listen      string        `toml:"listen"`
	Admin       string        `toml:"admin"`
	Revocations string        `toml:"revocations"`
	StateDir    string        `toml:"state_dir"`
	Metrics     string        `toml:"metrics"`
	LogFormat   string        `toml:"log_format"`
	LogLevel    string        `toml:"log_level"`
	Advertise   []string      `toml:"advertise"`
	Registry    *registryFile `toml:"registry"`
	Timers      struct {
		Handshake string `toml:"handshake"`
		Keepalive string `toml:"keepalive"`
		DeadAfter string `toml:"dead_after"`
		DialMin   string `toml:"dial_min"`
		DialMax   string `toml:"dial_max"`
		Open      string `toml:"open"`
		Request   string `toml:"request"`
		Grace     string `toml:"grace"`
		Rekey     string `toml:"rekey"`
		Rotate    string `toml:"rotate"`
		LinkIdle  string `toml:"link_idle"`
	} `toml:"timers"`
	Limits struct {
		PendingHandshakes     *int `toml:"pending_handshakes"`
		Channels              *int `toml:"channels"`
		Accepted              *int `toml:"accepted"`
		ChannelsPerPartition  *int `toml:"channels_per_partition"`
		AcceptedPerPartition  *int `toml:"accepted_per_partition"`
		AcceptedPerNode       *int `toml:"accepted_per_node"`
		ChannelsPerProcess    *int `toml:"channels_per_process"`
		ListenersPerPartition *int `toml:"listeners_per_partition"`
		PendingRequests       *int `toml:"pending_requests"`
		PendingRequestsPerUID *int `toml:"pending_requests_per_uid"`
		QueuedRequests        *int `toml:"queued_requests"`
		QueuedRequestsPerUID  *int `toml:"queued_requests_per_uid"`
		Window                *int `toml:"window"`
		Ring                  *int `toml:"ring"`
		RekeyFrames           *int `toml:"rekey_frames"`
		RotateFrames          *int `toml:"rotate_frames"`
		RotateBytes           *int `toml:"rotate_bytes"`
		Memory                *int `toml:"memory"`

		PendingHandshakesPerSource *int `toml:"pending_handshakes_per_source"`
	} `toml:"limits"`
	Partitions map[string]struct {
		Socket string `toml:"socket"`
		Mode   string `toml:"mode"`
		Owner  string `toml:"owner"`
		Group  string `toml:"group"`
		Listen []struct {
			Service string   `toml:"service"`
			UIDs    []uint32 `toml:"uids"`
		} `toml:"listen"`
	} `toml:"partitions"`
	// Each rule is decoded on its own, to name it by its index in errors.
	Allow []toml.Primitive `toml:"allow"`
	Peers map[string]struct {
		Address string `toml:"address"`
	} `toml:"peers"`
}

// allowRule mirrors one [[allow]] table.
type allowRule struct {
	From string   `toml:"from"`
	To   string   `toml:"to"`
	UIDs []uint32 `toml:"uids"`
}

var allowFields = map[string]bool{"from": true, "to": true, "uids": true}

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
	md, top, err := parseTOML(path, data)
	if err != nil {
		return nil, err
	}
	var f file
	if err := md.PrimitiveDecode(top, &f); err != nil {
		return nil, decodeError(path, err, nil)
	}
	allow, err := decodeAllow(path, md, f.Allow)
	if err != nil {
		return nil, err
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
	if f.Revocations != "" {
		c.Revocations = absPath(base, f.Revocations)
	}
	c.StateDir = absPath(base, cmp.Or(f.StateDir, "state"))
	if f.Listen == "" {
		return nil, fail("listen", errors.New("missing: the peer link address, host:port"))
	}
	if _, err := checkHostPort(f.Listen); err != nil {
		return nil, fail("listen", err)
	}
	c.Listen = f.Listen
	if f.Metrics != "" {
		if _, err := checkHostPort(f.Metrics); err != nil {
			return nil, fail("metrics", err)
		}
		c.Metrics = f.Metrics
	}
	if c.LogFormat, err = ParseLogFormat(cmp.Or(f.LogFormat, "text")); err != nil {
		return nil, fail("log_format", err)
	}
	if c.LogLevel, err = ParseLogLevel(cmp.Or(f.LogLevel, "info")); err != nil {
		return nil, fail("log_level", err)
	}

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
		{"timers.open", f.Timers.Open, &c.Timers.Open},
		{"timers.request", f.Timers.Request, &c.Timers.Request},
		{"timers.grace", f.Timers.Grace, &c.Timers.Grace},
		{"timers.rekey", f.Timers.Rekey, &c.Timers.Rekey},
		{"timers.rotate", f.Timers.Rotate, &c.Timers.Rotate},
		{"timers.link_idle", f.Timers.LinkIdle, &c.Timers.LinkIdle},
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
	for _, l := range []struct {
		field    string
		val      *int
		dst      *int
		min, max int
	}{
		{"limits.pending_handshakes", f.Limits.PendingHandshakes, &c.Limits.PendingHandshakes, 1, 65536},
		{"limits.pending_handshakes_per_source", f.Limits.PendingHandshakesPerSource, &c.Limits.PendingHandshakesPerSource, 1, 65536},
		{"limits.channels", f.Limits.Channels, &c.Limits.Channels, 1, 1 << 20},
		{"limits.accepted", f.Limits.Accepted, &c.Limits.Accepted, 1, 1 << 20},
		{"limits.channels_per_partition", f.Limits.ChannelsPerPartition, &c.Limits.ChannelsPerPartition, 1, 1 << 20},
		{"limits.accepted_per_partition", f.Limits.AcceptedPerPartition, &c.Limits.AcceptedPerPartition, 1, 1 << 20},
		{"limits.accepted_per_node", f.Limits.AcceptedPerNode, &c.Limits.AcceptedPerNode, 1, 1 << 20},
		{"limits.channels_per_process", f.Limits.ChannelsPerProcess, &c.Limits.ChannelsPerProcess, 1, 1 << 20},
		{"limits.listeners_per_partition", f.Limits.ListenersPerPartition, &c.Limits.ListenersPerPartition, 1, 65536},
		{"limits.pending_requests", f.Limits.PendingRequests, &c.Limits.PendingRequests, 1, 65536},
		{"limits.pending_requests_per_uid", f.Limits.PendingRequestsPerUID, &c.Limits.PendingRequestsPerUID, 1, 65536},
		{"limits.queued_requests", f.Limits.QueuedRequests, &c.Limits.QueuedRequests, 1, 1 << 20},
		{"limits.queued_requests_per_uid", f.Limits.QueuedRequestsPerUID, &c.Limits.QueuedRequestsPerUID, 1, 1 << 20},
		{"limits.window", f.Limits.Window, &c.Limits.Window, MinWindow, MaxWindow},
		{"limits.ring", f.Limits.Ring, &c.Limits.Ring, ring.MinSize, ring.MaxSize},
		{"limits.rekey_frames", f.Limits.RekeyFrames, &c.Limits.RekeyFrames, 16, 1 << 40},
		{"limits.rotate_frames", f.Limits.RotateFrames, &c.Limits.RotateFrames, 4, 1 << 40},
		{"limits.rotate_bytes", f.Limits.RotateBytes, &c.Limits.RotateBytes, MinWindow, 1 << 50},
		{"limits.memory", f.Limits.Memory, &c.Limits.Memory, MinMemory, 1 << 40},
	} {
		if l.val == nil {
			continue
		}
		if *l.val < l.min || *l.val > l.max {
			return nil, fail(l.field, fmt.Errorf("%d is outside %d..%d", *l.val, l.min, l.max))
		}
		*l.dst = *l.val
	}
	if err := ring.CheckSize(c.Limits.Ring); err != nil {
		return nil, fail("limits.ring", err)
	}
	if err := shares(&c.Limits, f.Limits.Accepted, f.Limits.PendingRequestsPerUID, f.Limits.QueuedRequestsPerUID); err != nil {
		return nil, &Error{File: path, Field: err.field, Err: err.err}
	}

	if len(f.Partitions) == 0 {
		return nil, fail("partitions", errors.New("missing: at least one [partitions.NAME] with a socket"))
	}
	sockets := map[string]string{c.Admin: "admin"}
	var listen []policy.ListenRule
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
		part := Partition{Name: name, Socket: sock, Mode: 0o600, UID: -1, GID: -1}
		if p.Mode != "" {
			m, err := strconv.ParseUint(p.Mode, 8, 32)
			if err != nil || m > 0o777 {
				return nil, fail(field+".mode", fmt.Errorf("%q is not an octal file mode like \"0660\"", p.Mode))
			}
			part.Mode = os.FileMode(m)
		}
		if p.Owner != "" {
			if part.UID, err = lookupID(p.Owner, user.Lookup, func(u *user.User) string { return u.Uid }); err != nil {
				return nil, fail(field+".owner", err)
			}
		}
		if p.Group != "" {
			if part.GID, err = lookupID(p.Group, user.LookupGroup, func(g *user.Group) string { return g.Gid }); err != nil {
				return nil, fail(field+".group", err)
			}
		}
		c.Partitions[name] = part
		for i, r := range p.Listen {
			lr := policy.ListenRule{Partition: name, Service: r.Service, UIDs: r.UIDs}
			if _, err := (*policy.Policy)(nil).WithListenRules([]policy.ListenRule{lr}); err != nil {
				_, msg, _ := strings.Cut(err.Error(), ": ") // drop "listen rule 1"
				return nil, fail(fmt.Sprintf("%s.listen[%d]", field, i), errors.New(msg))
			}
			listen = append(listen, lr)
		}
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
	if c.Policy, err = allowPolicy(path, allow); err != nil {
		return nil, err
	}
	if c.Policy, err = c.Policy.WithListenRules(listen); err != nil {
		return nil, fail("partitions", err)
	}
	c.ListenRules = listen
	if err := parseRegistry(c, &f); err != nil {
		return nil, &Error{File: path, Field: err.field, Err: err.err}
	}
	return c, nil
}

// parseTOML parses data first, to decode it after: a syntax error is the
// file's (the parser's last key may be a table or a key before the error), a
// value that does not fit its Go field is that field's.
func parseTOML(path string, data []byte) (toml.MetaData, toml.Primitive, error) {
	var top toml.Primitive
	md, err := toml.Decode(string(data), &top)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return md, top, &Error{File: path, Err: fmt.Errorf("line %d: %s", pe.Position.Line, pe.Message)}
		}
		return md, top, &Error{File: path, Err: err}
	}
	return md, top, nil
}

// decodeAllow decodes the [[allow]] tables of a file, one at a time, to
// name a bad one by its index.
func decodeAllow(path string, md toml.MetaData, prims []toml.Primitive) ([]allowRule, error) {
	allow := make([]allowRule, len(prims))
	for i, p := range prims {
		field := fmt.Sprintf("allow[%d]", i)
		// The library keeps one position per key path, that of the last
		// [[allow]] to have the key: a line number would point at the
		// wrong rule, so the index alone names it.
		rename := func(key string) string { return field + strings.TrimPrefix(key, "allow") }
		if err := md.PrimitiveDecode(p, &allow[i]); err != nil {
			return nil, decodeError(path, err, rename)
		}
		var keys map[string]any
		if err := md.PrimitiveDecode(p, &keys); err != nil {
			return nil, decodeError(path, err, rename)
		}
		for _, k := range sortedKeys(keys) {
			if !allowFields[k] {
				return nil, &Error{File: path, Field: field + "." + toml.Key{k}.String(), Err: errors.New("unknown field")}
			}
		}
	}
	return allow, nil
}

// allowPolicy checks the decoded [[allow]] rules and makes their policy.
func allowPolicy(path string, allow []allowRule) (*policy.Policy, error) {
	fail := func(field string, err error) error { return &Error{File: path, Field: field, Err: err} }
	var rules []policy.Rule
	for i, a := range allow {
		field := fmt.Sprintf("allow[%d]", i)
		if a.From == "" || a.To == "" {
			return nil, fail(field, errors.New("a rule needs from (node/partition) and to (node/partition/service)"))
		}
		r, err := policy.ParseRule(a.From, a.To, a.UIDs)
		if err != nil {
			return nil, fail(field, err)
		}
		rules = append(rules, r)
	}
	p, err := policy.New(rules)
	if err != nil {
		return nil, fail("allow", err)
	}
	return p, nil
}

// shareError is a limit that is a share of another and exceeds it.
type shareError struct {
	field string
	err   error
}

// shares settles the limits that are a share of another: one not given is
// its default share of the whole (so a smaller whole keeps a reserve), one
// given may not exceed its whole.
func shares(l *Limits, accepted, pendingPerUID, queuedPerUID *int) *shareError {
	for _, s := range []struct {
		field, whole string
		given        *int
		part         *int
		of           int
		num, den     int
		why          string
	}{
		{"limits.accepted", "limits.channels", accepted, &l.Accepted, l.Channels, 3, 4,
			"accepted channels are a share of the channel table, the rest is kept for the channels this agent's processes dial"},
		{"limits.pending_requests_per_uid", "limits.pending_requests", pendingPerUID, &l.PendingRequestsPerUID, l.PendingRequests, 1, 4,
			"it is one uid's share of them"},
		{"limits.queued_requests_per_uid", "limits.queued_requests", queuedPerUID, &l.QueuedRequestsPerUID, l.QueuedRequests, 1, 4,
			"it is one uid's share of them"},
	} {
		if s.given == nil {
			*s.part = max(1, s.of*s.num/s.den)
			continue
		}
		if *s.given > s.of {
			return &shareError{s.field, fmt.Errorf("%d is more than %s (%d): %s", *s.given, s.whole, s.of, s.why)}
		}
	}
	return nil
}

// Bounds of limits.window: a window holds at least one largest frame (a
// frame's payload: 64 KiB of a stream, or the largest message with its
// 4-byte length, and room to spare); at most what the channel protocol
// allows (wire.MaxWindow).
const (
	MinWindow = 64<<10 + 64
	MaxWindow = 64 << 20
)

// MinMemory is the least limits.memory: room for a largest window and the
// budget's reserve.
const MinMemory = 4 << 20

// decodeMsg is the form of the TOML library's errors for a value of the
// wrong type for its Go field: "toml: line 4 (last key "a.b"): incompatible
// types: TOML value has type int64; destination has type string". Unlike its
// errors for a value out of range, these are no ParseError.
var (
	decodeMsg   = regexp.MustCompile(`(?s)^toml: (?:line (\d+) )?\(last key ("(?:[^"\\]|\\.)*")\): (.*)$`)
	mismatchMsg = regexp.MustCompile(`(?s)^type mismatch for .*: expected (\w+) but found (.*)$`)
)

// decodeError turns an error from decoding TOML values into Go fields into
// an Error for the field of the value (its last key, renamed by rename
// when given, which also drops the line number).
func decodeError(path string, err error, rename func(string) string) error {
	var key, line, msg string
	var pe toml.ParseError
	if errors.As(err, &pe) {
		key, line, msg = pe.LastKey, strconv.Itoa(pe.Position.Line), pe.Message
	} else if m := decodeMsg.FindStringSubmatch(err.Error()); m != nil {
		k, uerr := strconv.Unquote(m[2])
		if uerr != nil {
			return &Error{File: path, Err: err}
		}
		key, line, msg = k, m[1], m[3]
		if mm := mismatchMsg.FindStringSubmatch(msg); mm != nil { // names a Go type of this package
			msg = fmt.Sprintf("incompatible types: TOML value has type %s; destination has type %s", mm[2], mm[1])
		}
	} else {
		return &Error{File: path, Err: err}
	}
	if rename != nil {
		key, line = rename(key), ""
	}
	if line != "" && line != "0" {
		msg = "line " + line + ": " + msg
	}
	return &Error{File: path, Field: key, Err: errors.New(msg)}
}

// lookupID resolves a user or group given by name or number.
func lookupID[T any](s string, lookup func(string) (T, error), id func(T) string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil || errors.Is(err, strconv.ErrRange) {
		if err != nil || n < 0 || n > 1<<31-1 {
			return 0, fmt.Errorf("id %s is out of range 0..%d", s, 1<<31-1)
		}
		return n, nil
	}
	v, err := lookup(s)
	if err != nil {
		return 0, fmt.Errorf("%q: %v", s, err)
	}
	return strconv.Atoi(id(v))
}

func absPath(base, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(base, p)
}

// checkHostPort checks a host:port address and returns its port.
// ParseLogFormat checks a log format: "text" or "json".
func ParseLogFormat(s string) (string, error) {
	if s != "text" && s != "json" {
		return "", fmt.Errorf("%.40q is not a log format: text or json", s)
	}
	return s, nil
}

// ParseLogLevel reads a log level: debug, info, warn or error.
func ParseLogLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%.40q is not a log level: debug, info, warn or error", s)
}

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
