package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/registry"
)

// runNodes shows the registry as an agent sees it: its own state
// (connected, or unreachable since when and why; this node's record and
// lease) and each node it knows, with the node's record, certificate
// expiry when the agent has the certificate, and link state.
func runNodes(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("nodes", stderr)
	path := fs.String("admin", "", "the agent's admin socket (required)")
	asJSON := fs.Bool("json", false, "print JSON: {\"node\", \"registry\", \"nodes\"}")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *path == "" {
		return usagef("--admin is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), admin.RequestTimeout)
	defer cancel()
	resp, err := admin.Query(ctx, *path, admin.Request{Op: "nodes"})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Node     string           `json:"node"`
			Registry *registry.Status `json:"registry"`
			Nodes    []admin.NodeRow  `json:"nodes"`
		}{resp.Node, resp.Registry, resp.Nodes})
	}
	printNodes(stdout, resp.Node, resp.Registry, resp.Nodes, time.Now())
	return nil
}

func printNodes(w io.Writer, node string, st *registry.Status, rows []admin.NodeRow, now time.Time) {
	if st == nil {
		st = &registry.Status{Backend: "unknown"}
	}
	fmt.Fprintf(w, "registry of %s: %s", node, st.Backend)
	if len(st.Endpoints) > 0 {
		fmt.Fprintf(w, " (%s)", strings.Join(st.Endpoints, ", "))
	}
	fmt.Fprintln(w)
	state := "connected"
	if !st.Connected {
		state = "unreachable"
	}
	if !st.Since.IsZero() {
		state += fmt.Sprintf(" since %s (%s ago)", st.Since.Format(time.RFC3339), now.Sub(st.Since).Round(time.Second))
	}
	fmt.Fprintf(w, "  state: %s\n", state)
	if st.LastError != "" {
		fmt.Fprintf(w, "  last error: %s\n", st.LastError)
	}
	if st.Backend == "etcd" {
		rec := "not published"
		if st.Published {
			rec = fmt.Sprintf("published under lease %x (TTL %ds), put %s ago", st.LeaseID, st.LeaseTTL, now.Sub(st.PutAt).Round(time.Second))
		}
		fmt.Fprintf(w, "  this node's record: %s; leases granted again: %d\n", rec, st.Regrants)
		fmt.Fprintf(w, "  revision %d, %d nodes, %d records refused, %d listings again\n", st.Revision, st.Nodes, st.Refused, st.Relists)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESSES\tRECORD\tINSTANCE\tFINGERPRINT\tCERT EXPIRES\tLINK\tCHANNELS")
	for _, r := range rows {
		name, link := r.Node, r.Link
		if r.Self {
			name, link = r.Node+" (self)", "-"
		}
		exp := "-"
		if !r.CertExpiry.IsZero() {
			exp = r.CertExpiry.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", name, strings.Join(r.Addresses, ","), r.Record,
			short(r.Instance, 8), short(r.Fingerprint, 16), exp, link, r.Channels)
	}
	tw.Flush()
}

// short returns the first n characters of a hex id, or "-".
func short(s string, n int) string {
	if s == "" {
		return "-"
	}
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
