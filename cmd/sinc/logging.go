package main

import (
	"context"
	"io"
	"log/slog"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/logx"
)

// startLog makes the log of a long-running command (the agent, a
// forwarder, an exposer): slog to stderr in format ("text" or "json") at
// level, every line through the rate limit, so that a flood of bad
// handshakes, requests or refused connections writes a few lines per kind
// and a count, not a line each. stop writes the last counts.
func startLog(stderr io.Writer, format string, level slog.Level) (log *slog.Logger, stop func()) {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(stderr, opts)
	if format == "json" {
		h = slog.NewJSONHandler(stderr, opts)
	}
	lim := logx.New(h, logx.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { lim.Run(ctx); close(done) }()
	return slog.New(lim), func() { cancel(); <-done }
}

// logFlags checks --log-format and --log-level.
func logFlags(format, level string) (string, slog.Level, error) {
	f, err := config.ParseLogFormat(format)
	if err != nil {
		return "", 0, usagef("--log-format: %v", err)
	}
	l, err := config.ParseLogLevel(level)
	if err != nil {
		return "", 0, usagef("--log-level: %v", err)
	}
	return f, l, nil
}
