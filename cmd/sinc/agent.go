package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"syscall"

	"sinc.dev/sinc/internal/agent"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/logx"
)

func runAgent(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("agent", stderr)
	path := fs.String("config", "", "the agent's config file (required)")
	format := fs.String("log-format", "text", "log format: text or json")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the agent to this file until it stops")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *path == "" {
		return usagef("--config is required")
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		return usagef("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	var h slog.Handler
	switch *format {
	case "text":
		h = slog.NewTextHandler(stderr, opts)
	case "json":
		h = slog.NewJSONHandler(stderr, opts)
	default:
		return usagef("--log-format must be text or json, not %q", *format)
	}
	// Every line of the agent goes through the rate limit: a flood of bad
	// handshakes or bad requests writes a few lines per kind and a count,
	// not a line each (the counters in sinc stats count every one).
	limiter := logx.New(h, logx.Options{})
	log := slog.New(limiter)
	logCtx, stopLog := context.WithCancel(context.Background())
	logDone := make(chan struct{})
	go func() { limiter.Run(logCtx); close(logDone) }()
	defer func() { stopLog(); <-logDone }() // the last counts, at exit

	if err := agent.Confine(); err != nil {
		return err
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	a, err := agent.New(cfg, log)
	if err != nil {
		return err
	}
	// The runtime is told how much the agent means to use, so that memory
	// the channels give back goes back to the system promptly rather than
	// minutes later.
	debug.SetMemoryLimit(agent.MemoryLimit(cfg))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			a.Reload() // logs what it did
		}
	}()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	return a.Run(ctx)
}
