package main

import (
	"context"
	"io"

	"sinc.dev/sinc/internal/admin"
)

// adminCommand is the start of every operator command that asks an agent
// one thing (peers, nodes, stats): it parses --admin and --json (described
// by jsonHelp), asks op, and returns the answer and whether JSON is wanted.
func adminCommand(name, op, jsonHelp string, args []string, stderr io.Writer) (resp *admin.Response, asJSON bool, err error) {
	fs := newFlags(name, stderr)
	path := fs.String("admin", "", "the agent's admin socket (required)")
	j := fs.Bool("json", false, jsonHelp)
	if _, err := parse(fs, args, 0); err != nil {
		return nil, false, err
	}
	if *path == "" {
		return nil, false, usagef("--admin is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), admin.RequestTimeout)
	defer cancel()
	resp, err = admin.Query(ctx, *path, admin.Request{Op: op})
	return resp, *j, err
}
