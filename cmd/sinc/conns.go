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
	if *adminPath != "" {
		resp, err := admin.Query(ctx, *adminPath, admin.Request{Op: "conns"})
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(stdout, resp.Conns)
		}
		printConns(stdout, resp.Node, resp.Conns, time.Now())
		return nil
	}
	rows, err := sinc.Connections(ctx, *socket)
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(stdout, rows)
	}
	view := make([]admin.ConnRow, len(rows))
	for i, r := range rows {
		view[i].Conn = r
	}
	printConns(stdout, "", view, time.Now())
	return nil
}

// printJSON prints rows as an indented JSON array, [] when empty.
func printJSON[T any](w io.Writer, rows []T) error {
	if rows == nil {
		rows = []T{}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rows)
}

// printConns prints connection table rows; with node (the admin view) it
// adds each channel's key epochs, which a process never sees.
func printConns(w io.Writer, node string, rows []admin.ConnRow, now time.Time) {
	if node != "" {
		fmt.Fprintf(w, "connections of %s:\n", node)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	head := "ID\tPARTITION\tPROCESS\tSERVICE\tREMOTE\tREMOTE PROCESS\tKIND\tSTATE\tAGE\tBYTES OUT/IN"
	if node != "" {
		head += "\tKEY EPOCH OUT/IN\tROTATE IN"
	}
	fmt.Fprintln(tw, head)
	for _, r := range rows {
		svc := r.Service
		remote := r.RemoteNode + "/" + r.RemotePartition
		if r.Dialed {
			svc = "-"
			remote += "/" + r.RemoteService
		}
		fmt.Fprintf(tw, "%d\t%s\tpid %d uid %d\t%s\t%s\tpid %d uid %d\t%s\t%s\t%s\t%d/%d", r.ID, r.Partition,
			r.Process.PID, r.Process.UID, svc, remote, r.RemoteProcess.PID, r.RemoteProcess.UID, r.Kind, r.State,
			now.Sub(r.Created).Round(time.Millisecond), r.BytesOut, r.BytesIn)
		if node != "" {
			fmt.Fprintf(tw, "\t%d/%d\t%d frames", r.KeyEpochOut, r.KeyEpochIn, r.RotateInFrames)
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
}

func runStats(args []string, stdout, stderr io.Writer) error {
	resp, asJSON, err := adminCommand("stats", "stats", "print JSON", args, stderr)
	if err != nil {
		return err
	}
	if asJSON {
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
