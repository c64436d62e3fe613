package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/local"
)

func runConns(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("conns", stderr)
	socket := fs.String("socket", "", "a partition socket: list that partition's connections (default $SINC_SOCKET)")
	adminPath := fs.String("admin", "", "the agent's admin socket: list every connection")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *socket != "" && *adminPath != "" {
		return usagef("give --socket or --admin, not both")
	}
	ctx, cancel := context.WithTimeout(context.Background(), admin.RequestTimeout)
	defer cancel()
	var rows []local.Conn
	node := ""
	if *adminPath != "" {
		resp, err := admin.Query(ctx, *adminPath, admin.Request{Op: "conns"})
		if err != nil {
			return err
		}
		rows, node = resp.Conns, resp.Node
	} else {
		var err error
		if rows, err = sinc.Connections(ctx, *socket); err != nil {
			return err
		}
	}
	if *asJSON {
		if rows == nil {
			rows = []local.Conn{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	printConns(stdout, node, rows, time.Now())
	return nil
}

func printConns(w io.Writer, node string, rows []local.Conn, now time.Time) {
	if node != "" {
		fmt.Fprintf(w, "connections of %s:\n", node)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tPARTITION\tPROCESS\tSERVICE\tREMOTE\tREMOTE PROCESS\tKIND\tSTATE\tAGE\tBYTES OUT/IN\tKEY EPOCH OUT/IN\tROTATE IN")
	for _, r := range rows {
		svc := r.Service
		remote := r.RemoteNode + "/" + r.RemotePartition
		if r.Dialed {
			svc = "-"
			remote += "/" + r.RemoteService
		}
		fmt.Fprintf(tw, "%d\t%s\tpid %d uid %d\t%s\t%s\tpid %d uid %d\t%s\t%s\t%s\t%d/%d\t%d/%d\t%d frames\n", r.ID, r.Partition,
			r.Process.PID, r.Process.UID, svc, remote, r.RemoteProcess.PID, r.RemoteProcess.UID, r.Kind, r.State,
			now.Sub(r.Created).Round(time.Millisecond), r.BytesOut, r.BytesIn, r.KeyEpochOut, r.KeyEpochIn, r.RotateInFrames)
	}
	tw.Flush()
}

func runStats(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("stats", stderr)
	adminPath := fs.String("admin", "", "the agent's admin socket (required)")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *adminPath == "" {
		return usagef("--admin is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), admin.RequestTimeout)
	defer cancel()
	resp, err := admin.Query(ctx, *adminPath, admin.Request{Op: "stats"})
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(resp.Counters)
	}
	names := make([]string, 0, len(resp.Counters))
	for k := range resp.Counters {
		names = append(names, k)
	}
	sort.Strings(names)
	fmt.Fprintf(stdout, "counters of %s:\n", resp.Node)
	for _, k := range names {
		fmt.Fprintf(stdout, "  %-24s %d\n", k, resp.Counters[k])
	}
	return nil
}
