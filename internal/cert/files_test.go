package cert_test

import (
	"bytes"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cert"
)

// signNode makes a node key and certificate in a fresh folder.
func signNode(t *testing.T, ca *testCA, node string) (certPath, keyPath string) {
	t.Helper()
	dir := t.TempDir()
	if _, err := cert.SignNode(ca.dir, dir, cert.NodeRequest{Node: node, Partitions: []string{"web"}, ValidFor: time.Hour}, t0); err != nil {
		t.Fatalf("SignNode: %v", err)
	}
	return cert.NodeFiles(dir, node)
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode()
}

// pemBytes returns the bytes of the one PEM block in the file at path.
func pemBytes(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		t.Fatalf("%s: no PEM block", path)
	}
	return b.Bytes
}

func TestFileModes(t *testing.T) {
	ca := newCA(t, "ca")
	if m := mode(t, filepath.Join(ca.dir, cert.CAKeyFile)); m != 0o600 {
		t.Errorf("CA key mode %v, want 0600", m)
	}
	if m := mode(t, ca.dir); m.Perm() != 0o700 {
		t.Errorf("CA folder mode %v, want 0700", m)
	}
	if m := mode(t, filepath.Join(ca.dir, cert.CACertFile)); m.Perm()&0o022 != 0 {
		t.Errorf("CA certificate mode %v is writable by others", m)
	}
	certPath, keyPath := signNode(t, ca, "node-a")
	if m := mode(t, keyPath); m != 0o600 {
		t.Errorf("node key mode %v, want 0600", m)
	}
	if m := mode(t, certPath); m.Perm()&0o022 != 0 {
		t.Errorf("node certificate mode %v is writable by others", m)
	}
	// Key files hold one PEM block of the key's exact size.
	if n := len(pemBytes(t, filepath.Join(ca.dir, cert.CAKeyFile))); n != 32 {
		t.Errorf("CA key file holds %d bytes", n)
	}
	if n := len(pemBytes(t, keyPath)); n != 32 {
		t.Errorf("node key file holds %d bytes", n)
	}
}

// TestKeyFileLooseModes: a key file that group or others may read or write
// is refused, with an error that says which file, which mode and what to do.
func TestKeyFileLooseModes(t *testing.T) {
	ca := newCA(t, "ca")
	_, nodeKey := signNode(t, ca, "node-a")
	caKey := filepath.Join(ca.dir, cert.CAKeyFile)
	load := map[string]func(string) error{
		"node": func(p string) error { _, err := cert.LoadNodeKey(p); return err },
		"ca":   func(p string) error { _, err := cert.LoadCAKey(p); return err },
	}
	paths := map[string]string{"node": nodeKey, "ca": caKey}
	for kind, path := range paths {
		for _, m := range []fs.FileMode{0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o601, 0o610, 0o666, 0o777} {
			t.Run(fmt.Sprintf("%s/%04o", kind, m), func(t *testing.T) {
				if err := os.Chmod(path, m); err != nil {
					t.Fatal(err)
				}
				defer os.Chmod(path, 0o600)
				err := load[kind](path)
				var me *cert.KeyModeError
				if !errors.As(err, &me) {
					t.Fatalf("got %v, want a *KeyModeError", err)
				}
				if me.Path != path || me.Mode.Perm() != m {
					t.Errorf("got %+v", me)
				}
				wantErr(t, err, path)
				wantErr(t, err, fmt.Sprintf("mode %04o", m))
				wantErr(t, err, "chmod 600 "+path)
			})
		}
		// Tighter than 0600 is fine.
		for _, m := range []fs.FileMode{0o400, 0o700} {
			if err := os.Chmod(path, m); err != nil {
				t.Fatal(err)
			}
			if err := load[kind](path); err != nil {
				t.Errorf("%s key mode %04o: %v", kind, m, err)
			}
			os.Chmod(path, 0o600)
		}
	}
	// The mode checked is the file's, not a symbolic link's.
	if err := os.Chmod(nodeKey, 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link.key")
	if err := os.Symlink(nodeKey, link); err != nil {
		t.Fatal(err)
	}
	var me *cert.KeyModeError
	if _, err := cert.LoadNodeKey(link); !errors.As(err, &me) {
		t.Fatalf("key through a symbolic link: got %v, want a *KeyModeError", err)
	}
}

func TestKeyFileRefused(t *testing.T) {
	ca := newCA(t, "ca")
	_, nodeKey := signNode(t, ca, "node-a")
	caKey := filepath.Join(ca.dir, cert.CAKeyFile)
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	keyPEM := func(typ string, n int) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: bytes.Repeat([]byte{7}, n)}))
	}
	t.Run("directory", func(t *testing.T) {
		d := filepath.Join(dir, "d")
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		_, err := cert.LoadNodeKey(d)
		wantErr(t, err, d+" is not a regular file")
		_, err = cert.LoadCAKey(d)
		wantErr(t, err, "is not a regular file")
	})
	t.Run("missing", func(t *testing.T) {
		_, err := cert.LoadNodeKey(filepath.Join(dir, "nope"))
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("got %v, want ErrNotExist", err)
		}
	})
	t.Run("CA key as node key", func(t *testing.T) {
		_, err := cert.LoadNodeKey(caKey)
		wantErr(t, err, caKey+`: no "SINC NODE PRIVATE KEY" PEM block`)
	})
	t.Run("node key as CA key", func(t *testing.T) {
		_, err := cert.LoadCAKey(nodeKey)
		wantErr(t, err, `no "SINC CA PRIVATE KEY" PEM block`)
	})
	t.Run("certificate as key", func(t *testing.T) {
		p := write("crt.key", string(ca.cert.EncodePEM()))
		_, err := cert.LoadCAKey(p)
		wantErr(t, err, `no "SINC CA PRIVATE KEY" PEM block`)
	})
	t.Run("empty", func(t *testing.T) {
		_, err := cert.LoadNodeKey(write("empty.key", ""))
		wantErr(t, err, "PEM block")
	})
	t.Run("short", func(t *testing.T) {
		_, err := cert.LoadNodeKey(write("short.key", keyPEM("SINC NODE PRIVATE KEY", 31)))
		wantErr(t, err, "key is 31 bytes, want 32")
		_, err = cert.LoadCAKey(write("short-ca.key", keyPEM("SINC CA PRIVATE KEY", 64)))
		wantErr(t, err, "key is 64 bytes, want 32")
	})
	t.Run("large", func(t *testing.T) {
		big := "-----BEGIN SINC NODE PRIVATE KEY-----\n" + strings.Repeat("A", 10000) + "\n-----END SINC NODE PRIVATE KEY-----\n"
		_, err := cert.LoadNodeKey(write("big.key", big))
		wantErr(t, err, "PEM block")
	})
	t.Run("good key of the right size", func(t *testing.T) {
		k, err := cert.LoadNodeKey(write("ok.key", keyPEM("SINC NODE PRIVATE KEY", 32)))
		if err != nil || !bytes.Equal(k.Bytes(), bytes.Repeat([]byte{7}, 32)) {
			t.Fatalf("LoadNodeKey: %v", err)
		}
	})
}

// TestNoOverwrite: neither InitCA nor SignNode replaces a key, and a
// refused SignNode leaves the certificate that goes with the key alone.
func TestNoOverwrite(t *testing.T) {
	ca := newCA(t, "ca")
	caKeyPath := filepath.Join(ca.dir, cert.CAKeyFile)
	caKey := pemBytes(t, caKeyPath)
	caCert, err := os.ReadFile(filepath.Join(ca.dir, cert.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	_, err = cert.InitCA(ca.dir, "ca", cert.DefaultCAValidity, t0)
	wantErr(t, err, caKeyPath+" already exists")
	if !bytes.Equal(pemBytes(t, caKeyPath), caKey) {
		t.Fatal("InitCA replaced the CA key")
	}
	if b, _ := os.ReadFile(filepath.Join(ca.dir, cert.CACertFile)); !bytes.Equal(b, caCert) {
		t.Fatal("InitCA replaced the CA certificate")
	}

	dir := t.TempDir()
	req := cert.NodeRequest{Node: "node-a", Partitions: []string{"web"}, ValidFor: time.Hour}
	if _, err := cert.SignNode(ca.dir, dir, req, t0); err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := cert.NodeFiles(dir, "node-a")
	key := pemBytes(t, keyPath)
	crt, _ := os.ReadFile(certPath)
	req.Partitions = []string{"web", "db"}
	_, err = cert.SignNode(ca.dir, dir, req, t0)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second SignNode: got %v, want ErrExist", err)
	}
	wantErr(t, err, keyPath)
	if !bytes.Equal(pemBytes(t, keyPath), key) {
		t.Fatal("SignNode replaced the node key")
	}
	if b, _ := os.ReadFile(certPath); !bytes.Equal(b, crt) {
		t.Fatal("SignNode replaced the certificate of the key it kept")
	}
	// Bad requests write nothing.
	empty := t.TempDir()
	if _, err := cert.SignNode(ca.dir, empty, cert.NodeRequest{Node: "bad/name", Partitions: []string{"p"}, ValidFor: time.Hour}, t0); err == nil {
		t.Fatal("SignNode with a bad name")
	}
	if _, err := cert.InitCA(filepath.Join(empty, "ca"), "bad name", time.Hour, t0); err == nil {
		t.Fatal("InitCA with a bad name")
	}
	if _, err := cert.InitCA(filepath.Join(empty, "ca2"), "ca", 0, t0); err == nil {
		t.Fatal("InitCA with no validity")
	}
	ents, _ := os.ReadDir(empty)
	for _, e := range ents {
		sub, _ := os.ReadDir(filepath.Join(empty, e.Name()))
		if len(sub) > 0 || !e.IsDir() {
			t.Errorf("refused requests left %s", e.Name())
		}
	}
}

func TestLoadCA(t *testing.T) {
	ca1, ca2 := newCA(t, "ca"), newCA(t, "ca")
	t.Run("key of another CA", func(t *testing.T) {
		dir := t.TempDir()
		copyFile(t, filepath.Join(ca1.dir, cert.CACertFile), filepath.Join(dir, cert.CACertFile))
		copyFile(t, filepath.Join(ca2.dir, cert.CAKeyFile), filepath.Join(dir, cert.CAKeyFile))
		c, k, err := cert.LoadCA(dir, t0)
		wantErr(t, err, "CA key does not match CA certificate")
		if c != nil || k != nil {
			t.Error("LoadCA returned a CA with the error")
		}
		// And SignNode with it signs nothing.
		out := t.TempDir()
		_, err = cert.SignNode(dir, out, cert.NodeRequest{Node: "n", Partitions: []string{"p"}, ValidFor: time.Hour}, t0)
		wantErr(t, err, "does not match")
		if ents, _ := os.ReadDir(out); len(ents) != 0 {
			t.Errorf("SignNode with a mismatched CA wrote %v", ents)
		}
	})
	t.Run("expired", func(t *testing.T) {
		_, _, err := cert.LoadCA(ca1.dir, ca1.cert.NotAfter)
		var ve *cert.ValidityError
		if !errors.As(err, &ve) || ve.NotYet {
			t.Fatalf("got %v, want an expiry", err)
		}
	})
	t.Run("tampered certificate", func(t *testing.T) {
		dir := t.TempDir()
		e := encOf(ca1.cert)
		e.name = "other"
		b := append(e.tbs(), ca1.cert.Signature[:]...)
		if err := os.WriteFile(filepath.Join(dir, cert.CACertFile), pemOf(b), 0o644); err != nil {
			t.Fatal(err)
		}
		copyFile(t, filepath.Join(ca1.dir, cert.CAKeyFile), filepath.Join(dir, cert.CAKeyFile))
		_, _, err := cert.LoadCA(dir, t0)
		wantErr(t, err, "bad self-signature")
	})
	t.Run("node certificate as CA", func(t *testing.T) {
		certPath, _ := signNode(t, ca1, "node-a")
		dir := t.TempDir()
		copyFile(t, certPath, filepath.Join(dir, cert.CACertFile))
		copyFile(t, filepath.Join(ca1.dir, cert.CAKeyFile), filepath.Join(dir, cert.CAKeyFile))
		_, _, err := cert.LoadCA(dir, t0)
		wantErr(t, err, "not a CA certificate")
	})
	t.Run("loose key", func(t *testing.T) {
		p := filepath.Join(ca1.dir, cert.CAKeyFile)
		os.Chmod(p, 0o640)
		defer os.Chmod(p, 0o600)
		_, _, err := cert.LoadCA(ca1.dir, t0)
		var me *cert.KeyModeError
		if !errors.As(err, &me) {
			t.Fatalf("got %v, want a *KeyModeError", err)
		}
	})
	t.Run("missing", func(t *testing.T) {
		_, _, err := cert.LoadCA(t.TempDir(), t0)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("got %v, want ErrNotExist", err)
		}
	})
}

func TestLoadCertificateErrors(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bad.crt")
	if err := os.WriteFile(p, []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := cert.LoadCertificate(p)
	wantErr(t, err, "certificate "+p+": no PEM block found")
	_, err = cert.LoadCertificate(filepath.Join(dir, "missing.crt"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("got %v, want ErrNotExist", err)
	}
}

// TestCertificateCarriesNoKey: what `sinc cert show` prints of a certificate,
// and the errors about key files, never carry private key bytes.
func TestCertificateCarriesNoKey(t *testing.T) {
	ca := newCA(t, "ca")
	certPath, keyPath := signNode(t, ca, "node-a")
	nodeKey := pemBytes(t, keyPath)
	caSeed := pemBytes(t, filepath.Join(ca.dir, cert.CAKeyFile))
	c, err := cert.LoadCertificate(certPath)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string][]byte{"node key": nodeKey, "CA seed": caSeed, "CA private key": ca.key}
	for _, shown := range []*cert.Certificate{c, ca.cert} {
		out := shown.EncodePEM()
		b, _ := pem.Decode(out)
		for what, k := range secrets {
			if bytes.Contains(shown.Raw(), k) || bytes.Contains(b.Bytes, k) || bytes.Contains(out, k) ||
				bytes.Contains(out, []byte(base64.StdEncoding.EncodeToString(k)[:40])) {
				t.Errorf("certificate %q carries the %s", shown.Name, what)
			}
			if strings.Contains(fmt.Sprintf("%+v", *shown), fmt.Sprint(k)) {
				t.Errorf("formatted certificate %q carries the %s", shown.Name, what)
			}
		}
	}
	// Errors about key files name the file, not its contents.
	os.Chmod(keyPath, 0o644)
	_, err1 := cert.LoadNodeKey(keyPath)
	os.Chmod(keyPath, 0o600)
	_, err2 := cert.LoadCAKey(keyPath)
	_, err3 := cert.LoadCertificate(keyPath) // `sinc cert show` given a key file
	wantErr(t, err3, `PEM block is "SINC NODE PRIVATE KEY"`)
	for _, err := range []error{err1, err2, err3} {
		if err == nil {
			t.Fatal("no error")
		}
		for _, enc := range []string{base64.StdEncoding.EncodeToString(nodeKey), fmt.Sprintf("%x", nodeKey), string(nodeKey)} {
			if strings.Contains(err.Error(), enc) {
				t.Errorf("error %q carries the key", err)
			}
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, st.Mode().Perm()); err != nil {
		t.Fatal(err)
	}
}
