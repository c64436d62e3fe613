// Package netns gives tests separate network nodes on one machine: one
// Linux network namespace per node, every pair of nodes joined by its own
// link, all made and removed by the test itself.
//
// Layout. A Net of nodes a, b, c makes the namespaces
// "sinc-<pid>-<rand>-a" (…-b, …-c) and one more, "sinc-<pid>-<rand>-mid",
// that holds the wiring: for every pair of nodes a bridge with two ports,
// each port the far end of a veth whose near end lives in one of the two
// nodes. Node i has the address 10.199.R.(i+1) (R random per Net) on its
// loopback and on each of its links, with a /32 route to each peer over the
// link to that peer. There is no default route anywhere, nothing is added
// to the root namespace (no interface, no address, no route), and no
// traffic can leave the namespaces of the Net.
//
// Faults. Cut(a, b, true) takes the pair's two bridge ports down: both
// nodes lose carrier on their link to each other and every packet between
// them is dropped silently (their routes stay, so sockets see no error,
// only silence, as with a cable pulled somewhere in the middle); the other
// pairs are untouched. Drop(name, p) drops packets arriving at a node at
// random, with nftables (or iptables) inside the node's namespace, when
// either tool is installed (Debian: `apt-get install
// --no-install-recommends nftables`).
//
// Everything here needs root and iproute2's `ip netns`; New skips the test
// with a message when they are missing.
package netns

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every namespace this package makes.
const Prefix = "sinc-"

// ErrNoFirewall is returned by Drop when neither nft nor iptables is
// installed.
var ErrNoFirewall = errors.New("netns: neither nft nor iptables is installed (apt-get install --no-install-recommends nftables)")

var validName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_-]{0,19}$`)

// Net is a set of nodes, each in its own network namespace, all pairwise
// linked.
type Net struct {
	tag    string // "sinc-<pid>-<rand>"
	mid    string // namespace holding the bridges
	subnet string // "10.199.R."
	nodes  map[string]*node
	order  []string

	mu      sync.Mutex
	made    []string // namespaces created, in order
	cmds    []*exec.Cmd
	fw      string // "nft" or "iptables", chosen at the first Drop
	cleaned bool
}

type node struct {
	name string
	ns   string
	idx  int
	addr string
}

// Available reports why namespaces cannot be made here, or nil.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("netns: needs root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("netns: iproute2's ip is not installed")
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		return fmt.Errorf("netns: ip netns list: %v: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// New makes one namespace per name (names: letters, digits, _ and -, at
// most 20), links every pair, and removes it all in t.Cleanup, even when
// the test fails. It skips t when namespaces are unavailable and fails it
// on any other error.
func New(t testing.TB, names ...string) *Net {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("skipping: %v", err)
	}
	n, err := plan(names)
	if err != nil {
		t.Fatal(err)
	}
	// Registered before anything is made: a failure halfway leaves nothing.
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("netns cleanup: %v", err)
		}
	})
	if err := n.build(); err != nil {
		if errors.Is(err, errUnavailable) {
			t.Skipf("skipping: %v", err)
		}
		t.Fatal(err)
	}
	return n
}

var errUnavailable = errors.New("network namespaces unavailable")

// plan checks the names and picks the Net's names and addresses.
func plan(names []string) (*Net, error) {
	if len(names) == 0 {
		return nil, errors.New("netns: no node names")
	}
	if len(names) > 200 {
		return nil, errors.New("netns: at most 200 nodes")
	}
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	n := &Net{nodes: map[string]*node{}}
	n.tag = fmt.Sprintf("%s%d-%s", Prefix, os.Getpid(), hex.EncodeToString(rnd[:3]))
	n.mid = n.tag + "-mid"
	n.subnet = fmt.Sprintf("10.199.%d.", rnd[3])
	for i, name := range names {
		if !validName.MatchString(name) || name == "mid" {
			return nil, fmt.Errorf("netns: bad node name %q", name)
		}
		if n.nodes[name] != nil {
			return nil, fmt.Errorf("netns: node %q named twice", name)
		}
		n.nodes[name] = &node{name: name, ns: n.tag + "-" + name, idx: i, addr: n.subnet + strconv.Itoa(i+1)}
		n.order = append(n.order, name)
	}
	return n, nil
}

// build makes the namespaces and the wiring; Close undoes whatever part
// of it was made.
func (n *Net) build() error {
	sweep()
	// The namespaces.
	for _, ns := range append([]string{n.mid}, n.nsNames()...) {
		if err := ip("netns", "add", ns); err != nil {
			if len(n.made) == 0 {
				return fmt.Errorf("%w: %v", errUnavailable, err)
			}
			return err
		}
		n.mu.Lock()
		n.made = append(n.made, ns)
		n.mu.Unlock()
	}

	// The wiring, all inside mid: a bridge per pair, a veth per node and
	// pair with its near end moved straight into the node.
	var mid strings.Builder
	mid.WriteString("link set lo up\n")
	for i := range n.order {
		for j := i + 1; j < len(n.order); j++ {
			a, b := n.nodes[n.order[i]], n.nodes[n.order[j]]
			br := bridgeName(i, j)
			fmt.Fprintf(&mid, "link add %s type bridge\nlink set %s up\n", br, br)
			for _, e := range [][2]*node{{a, b}, {b, a}} {
				port := portName(e[0].idx, e[1].idx)
				fmt.Fprintf(&mid, "link add %s type veth peer name %s netns %s\n", port, ifName(e[1].idx), e[0].ns)
				fmt.Fprintf(&mid, "link set %s master %s up\n", port, br)
			}
		}
	}
	if err := ipBatch(n.mid, mid.String()); err != nil {
		return err
	}
	// Each node: its address, a /32 route to each peer over that peer's link.
	for _, name := range n.order {
		a := n.nodes[name]
		var b strings.Builder
		fmt.Fprintf(&b, "link set lo up\naddress add %s/32 dev lo\n", a.addr)
		for _, other := range n.order {
			if other == name {
				continue
			}
			p := n.nodes[other]
			// One MTU-sized segment per packet (no 64 KiB GSO packets), so
			// that Drop's probability is per wire packet, as on a real
			// network.
			fmt.Fprintf(&b, "address add %s peer %s/32 dev %s\nlink set %s gso_max_segs 1 up\n", a.addr, p.addr, ifName(p.idx), ifName(p.idx))
		}
		if err := ipBatch(a.ns, b.String()); err != nil {
			return err
		}
	}
	return nil
}

func bridgeName(i, j int) string { return fmt.Sprintf("br%d_%d", min(i, j), max(i, j)) }
func portName(i, j int) string   { return fmt.Sprintf("p%d_%d", i, j) } // i's side of pair i–j
func ifName(peer int) string     { return fmt.Sprintf("sinc%d", peer) } // a node's link to peer

func (n *Net) nsNames() []string {
	out := make([]string, len(n.order))
	for i, name := range n.order {
		out[i] = n.nodes[name].ns
	}
	return out
}

func (n *Net) node(name string) (*node, error) {
	nd := n.nodes[name]
	if nd == nil {
		return nil, fmt.Errorf("netns: no node %q", name)
	}
	return nd, nil
}

// Names returns the node names in the order given to New.
func (n *Net) Names() []string { return append([]string(nil), n.order...) }

// Addr returns a node's IPv4 address ("10.199.R.x"); "" for an unknown
// name.
func (n *Net) Addr(name string) string {
	if nd := n.nodes[name]; nd != nil {
		return nd.addr
	}
	return ""
}

// HostPort returns "addr:port" for a node.
func (n *Net) HostPort(name string, port int) string {
	return net.JoinHostPort(n.Addr(name), strconv.Itoa(port))
}

// Namespace returns the name of a node's namespace (as `ip netns` knows
// it); its path is /run/netns/<name>.
func (n *Net) Namespace(name string) string {
	if nd := n.nodes[name]; nd != nil {
		return nd.ns
	}
	return ""
}

// Command returns a command that runs prog inside a node's namespace (via
// `ip netns exec`, which execs prog in place: the Cmd's process is prog
// itself, so signals reach it). The filesystem is shared, Unix sockets in
// files included. Cleanup kills it if it still runs.
func (n *Net) Command(name, prog string, args ...string) *exec.Cmd {
	ns := n.Namespace(name)
	if ns == "" {
		ns = "sinc-no-such-node-" + name // fails at Start
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, prog}, args...)...)
	n.mu.Lock()
	n.cmds = append(n.cmds, cmd)
	n.mu.Unlock()
	return cmd
}

// Do runs fn on an OS thread that has entered a node's namespace, and
// waits for it. Sockets that fn creates (net.Listen, net.Dial with an IP
// address) belong to that namespace and can be used from any goroutine
// afterwards; goroutines that fn starts do not run in the namespace. The
// thread is thrown away after fn, never reused.
func (n *Net) Do(name string, fn func() error) error {
	nd, err := n.node(name)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		// No UnlockOSThread: the runtime ends the thread with the goroutine.
		runtime.LockOSThread()
		f, err := os.Open("/run/netns/" + nd.ns)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("netns: setns %s: %w", nd.ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Listen listens inside a node's namespace (address with an IP, e.g.
// n.HostPort("a", 7000) or "127.0.0.1:0").
func (n *Net) Listen(name, network, address string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(name, func() (err error) {
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// Dial dials from inside a node's namespace (address with an IP).
func (n *Net) Dial(name, network, address string) (net.Conn, error) {
	return n.DialContext(name)(context.Background(), network, address)
}

// DialContext returns a dial function (the shape of
// net.Dialer.DialContext and faultproxy.DialFunc) that dials from inside
// a node's namespace.
func (n *Net) DialContext(name string) func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		var c net.Conn
		err := n.Do(name, func() (err error) {
			c, err = (&net.Dialer{}).DialContext(ctx, network, address)
			return err
		})
		return c, err
	}
}

// Cut takes the link between nodes a and b down (on) or up again (!on).
// While it is down, every packet between them is dropped silently; links
// to other nodes are untouched.
func (n *Net) Cut(a, b string, on bool) error {
	na, err := n.node(a)
	if err != nil {
		return err
	}
	nb, err := n.node(b)
	if err != nil {
		return err
	}
	if na == nb {
		return fmt.Errorf("netns: cut %s from itself", a)
	}
	state := "up"
	if on {
		state = "down"
	}
	return ipBatch(n.mid, fmt.Sprintf("link set %s %s\nlink set %s %s\n",
		portName(na.idx, nb.idx), state, portName(nb.idx, na.idx), state))
}

// Isolate cuts (on) or restores (!on) every link of a node.
func (n *Net) Isolate(name string, on bool) error {
	if _, err := n.node(name); err != nil {
		return err
	}
	var errs []error
	for _, other := range n.order {
		if other != name {
			errs = append(errs, n.Cut(name, other, on))
		}
	}
	return errors.Join(errs...)
}

// Drop makes a node drop each packet it receives from its links with
// probability p (0 removes the rule, 1 drops everything); its loopback is
// spared. Call it for both nodes for loss in both directions. It uses nft
// inside the namespace, or iptables when only that is installed, and
// returns ErrNoFirewall when neither is.
func (n *Net) Drop(name string, p float64) error {
	nd, err := n.node(name)
	if err != nil {
		return err
	}
	if math.IsNaN(p) || p < 0 || p > 1 {
		return fmt.Errorf("netns: drop probability %v not in [0, 1]", p)
	}
	fw, err := n.firewall()
	if err != nil {
		return err
	}
	if fw == "nft" {
		script := "add table inet sinc_drop\ndelete table inet sinc_drop\n"
		if p > 0 {
			match := "" // p == 1: every packet
			if k := int(math.Round(p * 1e6)); k < 1e6 {
				match = fmt.Sprintf(" numgen random mod 1000000 < %d", k)
			}
			script += "add table inet sinc_drop\n" +
				"add chain inet sinc_drop input { type filter hook input priority -300; policy accept; }\n" +
				"add rule inet sinc_drop input iifname != \"lo\"" + match + " counter drop\n"
		}
		return n.inNS(nd.ns, script, "nft", "-f", "-")
	}
	n.inNS(nd.ns, "", "iptables", "-w", "-N", "SINC_DROP") // exists already: fine
	if err := n.inNS(nd.ns, "", "iptables", "-w", "-F", "SINC_DROP"); err != nil {
		return err
	}
	if n.inNS(nd.ns, "", "iptables", "-w", "-C", "INPUT", "-j", "SINC_DROP") != nil {
		if err := n.inNS(nd.ns, "", "iptables", "-w", "-I", "INPUT", "-j", "SINC_DROP"); err != nil {
			return err
		}
	}
	if p == 0 {
		return nil
	}
	return n.inNS(nd.ns, "", "iptables", "-w", "-A", "SINC_DROP", "!", "-i", "lo",
		"-m", "statistic", "--mode", "random", "--probability", strconv.FormatFloat(p, 'f', 6, 64), "-j", "DROP")
}

var counterRE = regexp.MustCompile(`counter packets (\d+)`)

// Dropped returns how many packets Drop's rule has dropped at a node since
// the rule was last set (0 when there is none).
func (n *Net) Dropped(name string) (int64, error) {
	nd, err := n.node(name)
	if err != nil {
		return 0, err
	}
	fw, err := n.firewall()
	if err != nil {
		return 0, err
	}
	var out []byte
	if fw == "nft" {
		out, err = exec.Command("ip", "netns", "exec", nd.ns, "nft", "list", "table", "inet", "sinc_drop").CombinedOutput()
		if err != nil {
			return 0, nil // no table: nothing dropped
		}
		m := counterRE.FindSubmatch(out)
		if m == nil {
			return 0, nil
		}
		return strconv.ParseInt(string(m[1]), 10, 64)
	}
	out, err = exec.Command("ip", "netns", "exec", nd.ns, "iptables", "-w", "-L", "SINC_DROP", "-v", "-x", "-n").CombinedOutput()
	if err != nil {
		return 0, nil
	}
	var total int64
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && f[2] == "DROP" {
			v, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, err
			}
			total += v
		}
	}
	return total, nil
}

// firewall picks nft, else iptables, once.
func (n *Net) firewall() (string, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.fw == "" {
		for _, tool := range []string{"nft", "iptables"} {
			if _, err := exec.LookPath(tool); err == nil {
				n.fw = tool
				break
			}
		}
	}
	if n.fw == "" {
		return "", ErrNoFirewall
	}
	return n.fw, nil
}

// inNS runs prog inside namespace ns with stdin.
func (n *Net) inNS(ns, stdin, prog string, args ...string) error {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, prog}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("netns: %s %s in %s: %v: %s", prog, strings.Join(args, " "), ns, err, bytes.TrimSpace(out))
	}
	return nil
}

// Close kills the processes made by Command that still run and deletes
// every namespace of the Net, and with them every interface and bridge it
// made. (The kernel frees a namespace when its last user is gone: a socket
// the test leaked keeps it, unnamed and unreachable, until that socket is
// closed.) New registers it with t.Cleanup; calling it again does nothing.
func (n *Net) Close() error {
	n.mu.Lock()
	if n.cleaned {
		n.mu.Unlock()
		return nil
	}
	n.cleaned = true
	cmds, made := n.cmds, n.made
	n.mu.Unlock()
	for _, c := range cmds {
		if c.Process != nil {
			c.Process.Kill() // already ended: harmless
		}
	}
	var errs []error
	for i := len(made) - 1; i >= 0; i-- {
		if err := ip("netns", "del", made[i]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// sweep deletes namespaces left behind by test processes that died before
// their cleanup ran ("sinc-<pid>-…" whose pid no longer exists).
func sweep() {
	for _, ns := range List() {
		rest := strings.TrimPrefix(ns, Prefix)
		pidStr, _, ok := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
			ip("netns", "del", ns)
		}
	}
}

// List returns the names of the namespaces of this package that exist.
func List() []string {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return nil
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], Prefix) {
			names = append(names, f[0])
		}
	}
	return names
}

func ip(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("netns: ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

func ipBatch(ns, script string) error {
	cmd := exec.Command("ip", "-n", ns, "-batch", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("netns: ip -n %s -batch: %v: %s", ns, err, bytes.TrimSpace(out))
	}
	return nil
}
