// Command sinc is the one binary of sinc: the agent, the cluster CA tools,
// the admin CLI and the demo.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

const usage = `sinc — secure inter-node channels

usage: sinc COMMAND [flags]

commands:
  ca init --dir DIR [--name NAME] [--valid-for DURATION]
                       make the cluster CA (Ed25519) in DIR
  ca sign --dir DIR --node NAME --partition P [--partition P2 ...]
          [--valid-for DURATION] --out OUTDIR
                       make a node's key pair and certificate
  ca revoke --dir DIR (--node NAME | --fingerprint FP)... [--out FILE]
            [--etcd ENDPOINTS [--prefix P] [--etcd-ca F --etcd-cert F --etcd-key F]]
                       add to the CA's signed revocation list (and publish it)
  ca policy --dir DIR --file POLICY.toml [--out FILE] [--etcd ENDPOINTS ...]
                       sign the cluster policy ([[allow]] rules) (and publish it)
  cert show FILE       print a certificate's fields and fingerprint
  agent --config FILE  run a node's agent
  peers --admin PATH [--json]
                       list an agent's peer links (linked / idle / unlinked)
  nodes --admin PATH [--json]
                       the registry as an agent sees it: nodes, records,
                       links, and the registry's own state
  dial ADDR [--socket PATH] [--message]
                       open a channel to node/partition/service; stdin and
                       stdout are its two directions (netcat-like)
  listen SERVICE [--socket PATH] [--exec CMD]
                       accept a channel (or, with --exec, run CMD for each)
  forward LISTEN ADDR [--socket PATH] [--mode M --owner U --group G]
                       relay each connection to a Unix socket or a loopback
                       TCP port (any local user can use a TCP port) to a
                       channel to ADDR (node/partition/service)
  expose SERVICE TARGET [--socket PATH]
                       relay each channel to SERVICE to a TCP address or a
                       Unix socket
  conns [--socket PATH | --admin PATH] [--json]
                       the connection table: a partition's rows, or all
  stats --admin PATH [--json]
                       an agent's data path counters (rejections by reason)
  demo                 run a local two-node cluster and show it working
  bench [--quick] [--reps N] [--json]
                       compare sinc with raw TCP and direct TLS on loopback
  version [--json]     print this build's version, revision and Go release
                       (also: sinc --version)

Run "sinc COMMAND -h" for a command's flags.
`

// command is one subcommand: it parses args and runs.
type command func(args []string, stdout, stderr io.Writer) error

var commands = map[string]command{
	"ca":      runCA,
	"cert":    runCert,
	"agent":   runAgent,
	"peers":   runPeers,
	"nodes":   runNodes,
	"dial":    runDial,
	"listen":  runListen,
	"conns":   runConns,
	"stats":   runStats,
	"demo":    runDemo,
	"bench":   runBench,
	"version": runVersion,
	// bench-worker is the benchmark's server and client processes.
	"bench-worker": runBenchWorker,

	// Unmodified programs: relays between local sockets and channels.
	"forward": runForward,
	"expose":  runExpose,
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "--version" || args[0] == "-version" {
		args = append([]string{"version"}, args[1:]...)
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "sinc: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err := cmd(args[1:], stdout, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "sinc %s: %v\n", args[0], err)
			return 2
		}
		fmt.Fprintf(stderr, "sinc %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// usageError is a mistake in the command line.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// newFlags returns a flag set that reports errors instead of exiting.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("sinc "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parse parses args into fs, flags before or after the positional
// arguments, and returns exactly want positional arguments.
func parse(fs *flag.FlagSet, args []string, want int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usageError{err.Error()}
		}
		if args = fs.Args(); len(args) == 0 {
			break
		}
		pos, args = append(pos, args[0]), args[1:]
	}
	if len(pos) != want {
		return nil, usagef("want %d argument(s), got %d: %q", want, len(pos), pos)
	}
	return pos, nil
}

// multiFlag collects a repeated string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return fmt.Sprint(*m) }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
