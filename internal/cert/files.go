package cert

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ed25519"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// PEM block types of sinc's files.
const (
	pemCert    = "SINC CERTIFICATE"
	pemCAKey   = "SINC CA PRIVATE KEY"
	pemNodeKey = "SINC NODE PRIVATE KEY"
)

// File names inside a CA directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// EncodePEM returns c's encoding wrapped in PEM.
func (c *Certificate) EncodePEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemCert, Bytes: c.raw})
}

// ParsePEM decodes one PEM-wrapped certificate.
func ParsePEM(data []byte) (*Certificate, error) {
	b, rest := pem.Decode(data)
	if b == nil {
		return nil, errors.New("no PEM block found")
	}
	// pem.Decode skips whatever comes before a block it can decode; sinc
	// takes nothing but the one block (and white space) as a certificate.
	block := data[:len(data)-len(rest)]
	if !bytes.HasPrefix(trimSpace(block), []byte("-----BEGIN ")) || bytes.Count(block, []byte("-----BEGIN ")) != 1 {
		return nil, errors.New("data before the certificate's PEM block")
	}
	if b.Type != pemCert {
		return nil, fmt.Errorf("PEM block is %q, want %q", b.Type, pemCert)
	}
	if len(b.Headers) != 0 {
		return nil, errors.New("PEM block has headers; sinc certificates have none")
	}
	if len(rest) != 0 && len(trimSpace(rest)) != 0 {
		return nil, errors.New("data after the certificate's PEM block")
	}
	return Decode(b.Bytes)
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\n' || b[0] == '\r' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

// LoadCertificate reads a PEM certificate file.
func LoadCertificate(path string) (*Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	c, err := ParsePEM(data)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", path, err)
	}
	return c, nil
}

// KeyModeError reports a private key file that others may read.
type KeyModeError struct {
	Path string
	Mode fs.FileMode
}

func (e *KeyModeError) Error() string {
	return fmt.Sprintf("private key file %s has mode %04o: it must not be readable or writable by group or others (chmod 600 %s)",
		e.Path, uint32(e.Mode.Perm()), e.Path)
}

// readKeyFile reads a private key file after checking its mode, and returns
// the key bytes of the one PEM block of type typ.
func readKeyFile(path, typ string, size int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat() // the file we read, not whatever the path names later
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("private key file %s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, &KeyModeError{Path: path, Mode: st.Mode()}
	}
	data, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("private key file %s: %w", path, err)
	}
	defer clear(data)
	b, _ := pem.Decode(data)
	if b == nil || b.Type != typ {
		return nil, fmt.Errorf("private key file %s: no %q PEM block", path, typ)
	}
	defer clear(b.Bytes)
	if len(b.Bytes) != size {
		return nil, fmt.Errorf("private key file %s: key is %d bytes, want %d", path, len(b.Bytes), size)
	}
	return append([]byte(nil), b.Bytes...), nil
}

// writeKeyFile writes a private key as PEM, mode 0600, refusing to replace
// an existing file.
func writeKeyFile(path, typ string, key []byte) error {
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: key})
	defer clear(data)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

func writeCertFile(path string, c *Certificate) error {
	return os.WriteFile(path, c.EncodePEM(), 0o644)
}

// LoadCAKey reads the CA's Ed25519 private key.
func LoadCAKey(path string) (ed25519.PrivateKey, error) {
	seed, err := readKeyFile(path, pemCAKey, ed25519.SeedSize)
	if err != nil {
		return nil, err
	}
	defer clear(seed)
	return ed25519.NewKeyFromSeed(seed), nil
}

// LoadNodeKey reads a node's X25519 private key.
func LoadNodeKey(path string) (*ecdh.PrivateKey, error) {
	b, err := readKeyFile(path, pemNodeKey, KeySize)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	k, err := ecdh.X25519().NewPrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("private key file %s: %w", path, err)
	}
	return k, nil
}

// NodeFiles names a node's certificate and key in dir.
func NodeFiles(dir, node string) (certPath, keyPath string) {
	return filepath.Join(dir, node+".crt"), filepath.Join(dir, node+".key")
}
