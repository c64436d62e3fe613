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
  cert show FILE       print a certificate's fields and fingerprint
  agent --config FILE  run a node's agent
  peers --admin PATH [--json]
                       list an agent's peer links
  demo                 run a local two-node cluster and show it working

Run "sinc COMMAND -h" for a command's flags.
`

// command is one subcommand: it parses args and runs.
type command func(args []string, stdout, stderr io.Writer) error

var commands = map[string]command{
	"ca":    runCA,
	"cert":  runCert,
	"agent": runAgent,
	"peers": runPeers,
	"demo":  runDemo,
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

// parse parses args into fs, refusing stray positional arguments beyond
// want.
func parse(fs *flag.FlagSet, args []string, want int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err.Error()}
	}
	if fs.NArg() != want {
		return usagef("want %d argument(s), got %d: %q", want, fs.NArg(), fs.Args())
	}
	return nil
}

// multiFlag collects a repeated string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return fmt.Sprint(*m) }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
