package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"sinc.dev/sinc/internal/bench"
)

// runBench runs the side-by-side benchmark: raw TCP, direct TLS and sinc,
// each in its own processes, interleaved (internal/bench).
func runBench(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench", stderr)
	quick := fs.Bool("quick", false, "small sizes and fewer repetitions (about a minute), for development")
	reps := fs.Int("reps", 0, "repetitions (default 5; 3 with --quick)")
	only := fs.String("transports", "", "comma-separated subset of "+strings.Join(bench.Transports, ",")+" (default all; stunnel only where it is installed)")
	jsonOut := fs.Bool("json", false, "print the report as JSON instead of tables")
	quiet := fs.Bool("quiet", false, "no progress lines on stderr")
	profDir := fs.String("cpuprofile", "", "write a CPU profile of each worker and agent process into this folder")
	keep := fs.Bool("keep", false, "keep the temporary folders (configs, logs)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	bin, err := os.Executable()
	if err != nil {
		return err
	}
	opts := bench.DefaultOptions(*quick)
	opts.Bin = bin
	if *reps != 0 {
		opts.Reps = *reps
	}
	if *only != "" {
		opts.Transports = strings.Split(*only, ",")
	}
	if *profDir != "" {
		if err := os.MkdirAll(*profDir, 0o755); err != nil {
			return err
		}
	}
	opts.ProfileDir, opts.Keep = *profDir, *keep
	if !*quiet {
		opts.Log = stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	r, err := bench.Run(ctx, opts)
	if err != nil {
		return err
	}
	if *jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	fmt.Fprintln(stdout)
	r.Format(stdout)
	return nil
}

// runBenchWorker is a server or client process of the benchmark (hidden).
func runBenchWorker(args []string, stdout, stderr io.Writer) error {
	return bench.WorkerMain(args, os.Stdin, stdout, stderr)
}
