package main

import (
	"cmp"
	"context"
	"flag"
	"fmt"
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
	"sinc.dev/sinc/internal/sdnotify"
)

func runAgent(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("agent", stderr)
	path := fs.String("config", "", "the agent's config file (required)")
	format := fs.String("log-format", "text", "log format: text or json; given here, it wins over the config's log_format")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error; given here, it wins over the config's log_level")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the agent to this file until it stops")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *path == "" {
		return usagef("--config is required")
	}
	// Flags checked before anything else, so a mistake in them is told as
	// one whatever the config says.
	flagFormat, err := config.ParseLogFormat(*format)
	if err != nil {
		return usagef("--log-format: %v", err)
	}
	flagLevel, err := config.ParseLogLevel(*level)
	if err != nil {
		return usagef("--log-level: %v", err)
	}
	if err := agent.Confine(); err != nil {
		return err
	}
	cfg, err := config.Load(*path)
	if err != nil {
		return err
	}
	// A flag given on the command line wins over the config; a flag left
	// out leaves the config's setting (whose own default is text, info).
	logFormat, logLevel := cfg.LogFormat, cfg.LogLevel
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "log-format":
			logFormat = flagFormat
		case "log-level":
			logLevel = flagLevel
		}
	})
	opts := &slog.HandlerOptions{Level: logLevel}
	var h slog.Handler = slog.NewTextHandler(stderr, opts)
	if logFormat == "json" {
		h = slog.NewJSONHandler(stderr, opts)
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

	a, err := agent.New(cfg, log)
	if err != nil {
		return err
	}
	// The runtime is told how much the agent means to use, so that memory
	// the channels give back goes back to the system promptly rather than
	// minutes later.
	debug.SetMemoryLimit(agent.MemoryLimit(cfg))
	notify, err := sdnotify.FromEnv()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	told := make(chan struct{})
	go func() { tellManager(ctx, a, cfg, notify, hup, log); close(told) }()
	// STOPPING=1 goes before the process exits.
	defer func() { stop(); <-told }()
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

// tellManager tells the service manager (sd_notify, when systemd runs the
// agent as Type=notify) that the agent is ready once Run has every socket
// listening, and serves SIGHUP: RELOADING=1, the reload, READY=1 again.
// A SIGHUP before the agent is ready waits for it. When ctx ends the agent
// is stopping: STOPPING=1.
func tellManager(ctx context.Context, a *agent.Agent, cfg *config.Config, n *sdnotify.Notifier, hup <-chan os.Signal, log *slog.Logger) {
	send := func(state []string) {
		if err := n.Send(state...); err != nil {
			log.Warn("service manager notification failed", "err", err)
		}
	}
	select {
	case <-a.Ready():
	case <-ctx.Done():
		return // it did not start, or stopped before it was ready
	}
	status := fmt.Sprintf("serving: node %s, %d partitions, %d peers, peer port %s, metrics %s",
		cfg.Node, len(cfg.Partitions), len(cfg.Peers), cfg.Listen, cmp.Or(cfg.Metrics, "off"))
	send(sdnotify.Ready(status))
	for {
		select {
		case <-ctx.Done():
			send(sdnotify.Stopping())
			return
		case <-hup:
			send(sdnotify.Reloading())
			a.Reload() // logs what it did
			send(sdnotify.Ready(status))
		}
	}
}
