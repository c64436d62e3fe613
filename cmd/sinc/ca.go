package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"sinc.dev/sinc/internal/cert"
)

func runCA(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("want a subcommand: init, sign or revoke")
	}
	switch args[0] {
	case "init":
		return runCAInit(args[1:], stdout, stderr)
	case "sign":
		return runCASign(args[1:], stdout, stderr)
	case "revoke":
		return runCARevoke(args[1:], stdout, stderr)
	}
	return usagef("unknown subcommand %q: want init, sign or revoke", args[0])
}

func runCAInit(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca init", stderr)
	dir := fs.String("dir", "", "folder for ca.key and ca.crt (required)")
	name := fs.String("name", "sinc-cluster-ca", "the CA's name")
	valid := fs.Duration("valid-for", cert.DefaultCAValidity, "validity period")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *dir == "" {
		return usagef("--dir is required")
	}
	c, err := cert.InitCA(*dir, *name, *valid, time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "CA %q made in %s (valid until %s)\nfingerprint %s\n",
		c.Name, *dir, c.NotAfter.Format(time.RFC3339), c.Fingerprint())
	return nil
}

func runCASign(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca sign", stderr)
	dir := fs.String("dir", "", "the CA's folder (required)")
	node := fs.String("node", "", "the node's name (required)")
	var parts multiFlag
	fs.Var(&parts, "partition", "a partition the node may host (repeat; at least one)")
	valid := fs.Duration("valid-for", cert.DefaultNodeValidity, "validity period")
	out := fs.String("out", "", "folder for NODE.key and NODE.crt (required)")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	switch {
	case *dir == "":
		return usagef("--dir is required")
	case *node == "":
		return usagef("--node is required")
	case len(parts) == 0:
		return usagef("--partition is required (at least one)")
	case *out == "":
		return usagef("--out is required")
	}
	c, err := cert.SignNode(*dir, *out, cert.NodeRequest{Node: *node, Partitions: parts, ValidFor: *valid}, time.Now())
	if err != nil {
		return err
	}
	certPath, keyPath := cert.NodeFiles(*out, *node)
	fmt.Fprintf(stdout, "node %q: certificate %s, key %s (0600)\npartitions %s, valid until %s\nfingerprint %s\n",
		c.Name, certPath, keyPath, strings.Join(c.Partitions, ","), c.NotAfter.Format(time.RFC3339), c.Fingerprint())
	return nil
}

func runCARevoke(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca revoke", stderr)
	dir := fs.String("dir", "", "the CA's folder (required)")
	var nodes, fps multiFlag
	fs.Var(&nodes, "node", "revoke every certificate of this node (repeat)")
	fs.Var(&fps, "fingerprint", "revoke the certificate with this fingerprint (repeat)")
	out := fs.String("out", "", "the revocation list to add to, under its serial + 1 (default DIR/"+cert.RevocationsFile+")")
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *dir == "" {
		return usagef("--dir is required")
	}
	if len(nodes)+len(fps) == 0 {
		return usagef("give --node or --fingerprint")
	}
	var fpv []cert.Fingerprint
	for _, s := range fps {
		f, err := cert.ParseFingerprint(s)
		if err != nil {
			return usagef("--fingerprint: %v", err)
		}
		fpv = append(fpv, f)
	}
	path := *out
	if path == "" {
		path = filepath.Join(*dir, cert.RevocationsFile)
	}
	r, err := cert.Revoke(*dir, path, nodes, fpv, time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "revocation list %s: serial %d, %d node(s), %d certificate(s), issued %s\n",
		path, r.Serial, len(r.Nodes), len(r.Fingerprints), r.Issued.Format(time.RFC3339))
	return nil
}

func runCert(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "show" {
		return usagef("want: cert show FILE")
	}
	fs := newFlags("cert show", stderr)
	pos, err := parse(fs, args[1:], 1)
	if err != nil {
		return err
	}
	c, err := cert.LoadCertificate(pos[0])
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "kind:        %s\n", c.Kind)
	fmt.Fprintf(stdout, "name:        %s\n", c.Name)
	if c.Kind == cert.KindNode {
		fmt.Fprintf(stdout, "partitions:  %s\n", strings.Join(c.Partitions, ", "))
		fmt.Fprintf(stdout, "public key:  %x (X25519, key exchange)\n", c.PublicKey)
		fmt.Fprintf(stdout, "issuer:      %x\n", c.Issuer)
	} else {
		fmt.Fprintf(stdout, "public key:  %x (Ed25519, signing)\n", c.PublicKey)
	}
	fmt.Fprintf(stdout, "not before:  %s\n", c.NotBefore.Format(time.RFC3339))
	fmt.Fprintf(stdout, "not after:   %s\n", c.NotAfter.Format(time.RFC3339))
	fmt.Fprintf(stdout, "fingerprint: %s\n", c.Fingerprint())
	return nil
}
