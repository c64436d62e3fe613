package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/buildinfo"
)

func runPeers(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("peers", stderr)
	path := fs.String("admin", "", "the agent's admin socket (required)")
	asJSON := fs.Bool("json", false, "print JSON")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *path == "" {
		return usagef("--admin is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), admin.RequestTimeout)
	defer cancel()
	resp, err := admin.Query(ctx, *path, admin.Request{Op: "peers"})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(resp.Peers)
	}
	printPeers(stdout, resp.Node, resp.Build, resp.Peers, time.Now())
	return nil
}

// printPeers prints the peer table under a line naming the agent's build.
// Only the agent's own: the link handshake does not carry a peer's (each
// agent's own is in its sinc peers, its log and its metrics).
func printPeers(w io.Writer, node string, build *buildinfo.Info, rows []admin.PeerRow, now time.Time) {
	fmt.Fprintf(w, "peers of %s", node)
	if build != nil {
		fmt.Fprintf(w, " (sinc %s, %s)", build.Short(), build.GoVersion)
	}
	fmt.Fprintln(w, ":")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tADDRESS\tSTATE\tLINK\tSINCE\tCERT EXPIRES\tNEXT REKEY\tFRAMES OUT/IN\tBYTES OUT/IN\tLAST ERROR")
	for _, r := range rows {
		exp := "-"
		if !r.CertExpiry.IsZero() {
			exp = r.CertExpiry.Format(time.RFC3339)
		}
		if r.CertWarning != "" {
			exp += " (" + r.CertWarning + ")"
		}
		last := r.LastError
		if last == "" {
			last = "-"
		}
		rekey := "-" // the other side dialed: it rekeys
		if !r.NextRekey.IsZero() {
			rekey = "in " + r.NextRekey.Sub(now).Round(time.Second).String()
		}
		since := "-" // known to the registry only
		if !r.Since.IsZero() {
			since = now.Sub(r.Since).Round(time.Millisecond).String() + " ago"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%s\n", r.Peer, r.Address, r.State, r.Link,
			since, exp, rekey, r.FramesOut, r.FramesIn, r.BytesOut, r.BytesIn, last)
	}
	tw.Flush()
}
