package cert

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
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

// maxKeyFile bounds what is read of a private key file.
const maxKeyFile = 4096

// readKeyFile reads the private key in the one PEM block of type typ of the
// file at path into dst, after checking the file's mode. The key's bytes go
// from the file's base64 straight into dst: no other buffer ever holds
// them, and the buffers that held the file's text (and so the key, in
// base64) are zeroed before it returns. dst must have room for
// keyBuffer(size) bytes (the base64 decoder writes whole quanta); the key
// is left in dst[:size] and the rest of dst is zero. On error dst is zero.
func readKeyFile(path, typ string, size int, dst []byte) error {
	if len(dst) < keyBuffer(size) {
		return fmt.Errorf("private key file %s: a buffer of %d bytes is too small for a %d-byte key", path, len(dst), size)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat() // the file we read, not whatever the path names later
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("private key file %s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return &KeyModeError{Path: path, Mode: st.Mode()}
	}
	// One buffer, read into once and zeroed after: io.ReadAll would leave
	// the copies of its growing buffer behind.
	data := make([]byte, maxKeyFile+1)
	defer clear(data)
	n, err := io.ReadFull(f, data)
	switch {
	case err == nil:
		return fmt.Errorf("private key file %s: no %q PEM block in its first %d bytes", path, typ, maxKeyFile)
	case err != io.EOF && err != io.ErrUnexpectedEOF:
		return fmt.Errorf("private key file %s: %w", path, err)
	}
	body := pemBody(data[:n], typ)
	if body == nil {
		return fmt.Errorf("private key file %s: no %q PEM block", path, typ)
	}
	return decodeKey(path, body, size, dst)
}

// keyBuffer is the room readKeyFile needs to decode a key of size bytes.
func keyBuffer(size int) int {
	return base64.StdEncoding.DecodedLen(base64.StdEncoding.EncodedLen(size))
}

// pemBody returns the base64 body of the one PEM block of type typ in
// data (aliasing data), or nil if there is none, it has headers, or data
// holds more than white space around it.
func pemBody(data []byte, typ string) []byte {
	begin, end := []byte("-----BEGIN "+typ+"-----"), []byte("-----END "+typ+"-----")
	data = bytes.TrimSpace(data)
	if !bytes.HasPrefix(data, begin) || !bytes.HasSuffix(data, end) || len(data) < len(begin)+len(end) {
		return nil
	}
	body := data[len(begin) : len(data)-len(end)]
	if bytes.ContainsAny(body, ":-") { // headers, or a second block
		return nil
	}
	return body
}

// decodeKey decodes the base64 body of a key of size bytes into dst.
func decodeKey(path string, body []byte, size int, dst []byte) error {
	// The body's base64 characters without line breaks, in a scratch
	// buffer zeroed after.
	scratch := make([]byte, 0, len(body))
	defer func() { clear(scratch[:cap(scratch)]) }()
	pad := 0
	for _, c := range body {
		switch {
		case c == '\n' || c == '\r':
			continue
		case c == '=':
			pad++
		case pad > 0:
			return fmt.Errorf("private key file %s: the PEM block is not base64", path)
		}
		scratch = append(scratch, c)
	}
	if len(scratch)%4 != 0 || pad > 2 {
		return fmt.Errorf("private key file %s: the PEM block is not base64", path)
	}
	if n := len(scratch)/4*3 - pad; n != size {
		return fmt.Errorf("private key file %s: key is %d bytes, want %d", path, n, size)
	}
	n, err := base64.StdEncoding.Strict().Decode(dst, scratch)
	if err != nil || n != size {
		clear(dst)
		return fmt.Errorf("private key file %s: the PEM block is not base64", path)
	}
	clear(dst[size:])
	return nil
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
	seed := make([]byte, keyBuffer(ed25519.SeedSize))
	defer clear(seed)
	if err := readKeyFile(path, pemCAKey, ed25519.SeedSize, seed); err != nil {
		return nil, err
	}
	return ed25519.NewKeyFromSeed(seed[:ed25519.SeedSize]), nil
}

// NodeKeyBuffer is the room ReadNodeKey needs in its destination: the
// key and what the base64 decoder's last quantum writes past it
// (keyBuffer(KeySize)).
const NodeKeyBuffer = 33

// ReadNodeKey reads a node's X25519 private key from the file at path
// into dst[:KeySize], which is meant to be protected memory (package
// secret): the key's bytes are decoded from the file's text straight into
// dst and nowhere else, and every buffer that held the file's text is
// zeroed. dst must hold at least NodeKeyBuffer bytes; the bytes past the
// key are left zero.
func ReadNodeKey(path string, dst []byte) error {
	return readKeyFile(path, pemNodeKey, KeySize, dst)
}

// LoadNodeKey reads a node's X25519 private key into a crypto/ecdh key:
// for tools and tests. The key it returns is a heap copy that nobody
// zeroes; an agent reads its key with ReadNodeKey.
func LoadNodeKey(path string) (*ecdh.PrivateKey, error) {
	b := make([]byte, NodeKeyBuffer)
	defer clear(b)
	if err := ReadNodeKey(path, b); err != nil {
		return nil, err
	}
	k, err := ecdh.X25519().NewPrivateKey(b[:KeySize])
	if err != nil {
		return nil, fmt.Errorf("private key file %s: %w", path, err)
	}
	return k, nil
}

// NodeFiles names a node's certificate and key in dir.
func NodeFiles(dir, node string) (certPath, keyPath string) {
	return filepath.Join(dir, node+".crt"), filepath.Join(dir, node+".key")
}

// writeFileAtomic writes data to path whole, with mode perm: a reader sees
// the file before or after, never a part, and once it returns the new file
// survives a crash (a temporary file in the same folder, synced, renamed
// over path, then the folder synced).
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// readRegularFile reads path, which must be a regular file of at most limit
// bytes (a FIFO put in its place must not hang the reader, nor a huge file
// fill memory).
func readRegularFile(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
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
	if st.Size() > limit {
		return nil, fmt.Errorf("%s: %d bytes, more than %d", path, st.Size(), limit)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit { // it grew since Stat
		return nil, fmt.Errorf("%s: more than %d bytes", path, limit)
	}
	return data, nil
}
