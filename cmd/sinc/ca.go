package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"sinc.dev/sinc/internal/cert"
)

func runCA(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("want a subcommand: init, sign, revoke or policy")
	}
	switch args[0] {
	case "init":
		return runCAInit(args[1:], stdout, stderr)
	case "sign":
		return runCASign(args[1:], stdout, stderr)
	case "revoke":
		return runCARevoke(args[1:], stdout, stderr)
	case "policy":
		return runCAPolicy(args[1:], stdout, stderr)
	}
	return usagef("unknown subcommand %q: want init, sign, revoke or policy", args[0])
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
	ef := addEtcdFlags(fs)
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	if *dir == "" {
		return usagef("--dir is required")
	}
	if len(nodes)+len(fps) == 0 {
		return usagef("give --node or --fingerprint")
	}
	if _, _, err := ef.check(); err != nil {
		return err
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
	var r *cert.Revocations
	var err error
	if ef.set() {
		r, err = revokeAndPublish(*dir, path, ef, nodes, fpv, stdout, stderr)
	} else {
		r, err = cert.Revoke(*dir, path, nodes, fpv, time.Now())
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "revocation list %s: serial %d, %d node(s), %d certificate(s), issued %s\n",
		path, r.Serial, len(r.Nodes), len(r.Fingerprints), r.Issued.Format(time.RFC3339))
	return nil
}

// revokeAndPublish signs the next revocation list and puts it in the
// registry as well as at path. The list it signs holds every entry of the
// list at path, of the registry's list, and the new ones (revocations only
// ever grow, so two operators' lists merge without loss), under a serial one
// above the higher of the two: the registry never goes back, even when
// another operator published a list this CA folder has not seen.
func revokeAndPublish(caDir, path string, ef *etcdFlags, nodes []string, fps []cert.Fingerprint, stdout, stderr io.Writer) (*cert.Revocations, error) {
	now := time.Now()
	v, err := caVerifier(caDir, now)
	if err != nil {
		return nil, err
	}
	pub, err := openPublisher(ef, stderr)
	if err != nil {
		return nil, err
	}
	defer pub.Close()
	key := pub.layout.Revocations()
	var r *cert.Revocations
	_, err = pub.publish(key, func(cur []byte) ([]byte, func() error, error) {
		file := &cert.Revocations{}
		if _, err := os.Stat(path); err == nil {
			if file, err = cert.LoadRevocations(path, v); err != nil {
				return nil, nil, fmt.Errorf("the existing list: %w", err)
			}
		}
		reg := &cert.Revocations{}
		if cur != nil {
			got, err := cert.ParseRevocations(cur, v)
			switch {
			case errors.Is(err, cert.ErrUnknownCA):
				return nil, nil, fmt.Errorf("etcd key %s %w", key, errOtherCA)
			case err != nil:
				fmt.Fprintf(stderr, "sinc: etcd key %s holds no valid revocation list (%v): replacing it\n", key, err)
			default:
				reg = got
			}
		}
		serial := max(file.Serial, reg.Serial)
		if serial == math.MaxUint64 {
			return nil, nil, fmt.Errorf("the newest list has the last serial, %d", serial)
		}
		all := slices.Concat(file.Nodes, reg.Nodes, nodes)
		allFPs := slices.Concat(file.Fingerprints, reg.Fingerprints, fps)
		next, err := cert.SignRevocations(caDir, serial+1, all, allFPs, now)
		if err != nil {
			return nil, nil, err
		}
		r = next
		return next.EncodePEM(), func() error { return next.WriteFile(path, 0o644) }, nil
	})
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(stdout, "published to etcd at %s as %s\n", pub.endpoints, key)
	return r, nil
}

// caVerifier returns a verifier for the CA certificate in caDir.
func caVerifier(caDir string, now time.Time) (*cert.Verifier, error) {
	ca, err := cert.LoadCertificate(filepath.Join(caDir, cert.CACertFile))
	if err != nil {
		return nil, err
	}
	return cert.NewVerifier(ca, now)
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
