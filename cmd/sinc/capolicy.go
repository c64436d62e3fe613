package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
)

// runCAPolicy signs a cluster policy (a policy.toml of [[allow]] rules)
// under the next serial, writes it to the CA folder and, with --etcd,
// publishes it to the registry. The serial is one above the newest known:
// the --out file's or the registry's, whichever is higher.
func runCAPolicy(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("ca policy", stderr)
	dir := fs.String("dir", "", "the CA's folder (required)")
	file := fs.String("file", "", "the policy: a TOML file of [[allow]] rules (required)")
	out := fs.String("out", "", "the signed policy to write, its serial the one to follow (default DIR/"+cert.PolicyFile+")")
	ef := addEtcdFlags(fs)
	if _, err := parse(fs, args, 0); err != nil {
		return err
	}
	switch {
	case *dir == "":
		return usagef("--dir is required")
	case *file == "":
		return usagef("--file is required")
	}
	if _, _, err := ef.check(); err != nil {
		return err
	}
	path := *out
	if path == "" {
		path = filepath.Join(*dir, cert.PolicyFile)
	}
	body, err := readPolicyText(*file)
	if err != nil {
		return err
	}
	rules, err := config.ParsePolicy(*file, body)
	if err != nil {
		return err
	}
	now := time.Now()
	v, err := caVerifier(*dir, now)
	if err != nil {
		return err
	}
	// sign signs body under the serial after the file's and prev's.
	sign := func(prev uint64) (*cert.Policy, error) {
		if _, err := os.Stat(path); err == nil {
			old, err := cert.LoadPolicy(path, v)
			if err != nil {
				return nil, fmt.Errorf("the existing policy: %w", err)
			}
			prev = max(prev, old.Serial)
		}
		if prev == math.MaxUint64 {
			return nil, fmt.Errorf("the newest policy has the last serial, %d", prev)
		}
		return cert.SignPolicy(*dir, body, prev, now)
	}
	var doc *cert.Policy
	if ef.set() {
		pub, err := openPublisher(ef, stderr)
		if err != nil {
			return err
		}
		defer pub.Close()
		key := pub.layout.Policy()
		_, err = pub.publish(key, func(cur []byte) ([]byte, func() error, error) {
			var prev uint64
			if cur != nil {
				got, err := cert.ParsePolicy(cur, v)
				switch {
				case errors.Is(err, cert.ErrUnknownCA):
					return nil, nil, fmt.Errorf("etcd key %s %w", key, errOtherCA)
				case err != nil:
					fmt.Fprintf(stderr, "sinc: etcd key %s holds no valid cluster policy (%v): replacing it\n", key, err)
				default:
					prev = got.Serial
				}
			}
			next, err := sign(prev)
			if err != nil {
				return nil, nil, err
			}
			doc = next
			return next.EncodePEM(), func() error { return next.WriteFile(path, 0o644) }, nil
		})
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "published to etcd at %s as %s\n", pub.endpoints, key)
	} else {
		if doc, err = sign(0); err != nil {
			return err
		}
		if err := doc.WriteFile(path, 0o644); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "cluster policy %s: serial %d, %d rule(s), issued %s\n",
		path, doc.Serial, rules.Len(), doc.Issued.Format(time.RFC3339))
	return nil
}

// readPolicyText reads a policy.toml, refusing more than a document holds.
func readPolicyText(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0) // a FIFO must not hang it
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%s)", path, st.Mode().Type())
	}
	if st.Size() > cert.MaxPolicyBody {
		return nil, fmt.Errorf("%s: %d bytes, more than a cluster policy holds (%d)", path, st.Size(), cert.MaxPolicyBody)
	}
	return io.ReadAll(io.LimitReader(f, cert.MaxPolicyBody+1)) // ParsePolicy refuses the extra byte
}
