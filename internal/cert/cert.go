// Package cert holds sinc's trust model: the cluster CA and the node
// certificates it signs (docs/design.md, "Trust").
//
// A node certificate binds a node name to the node's static X25519
// key-exchange public key and to the partitions the node may host, for a
// validity period, under an Ed25519 signature of the cluster CA. The CA
// certificate is self-signed and carries the CA's Ed25519 public key.
//
// Certificates use a small strict binary encoding (below), wrapped in PEM
// on disk. The decoder accepts exactly one encoding per certificate: no
// trailing bytes, no unknown versions, every length bounded.
//
//	offset  size  field
//	0       8     magic "SINCCRT1"
//	8       1     kind: 1 = CA, 2 = node
//	9       1     name length n (1..63)
//	10      n     name
//	.       32    public key (Ed25519 for a CA, X25519 for a node)
//	.       8     not before, Unix seconds, big endian
//	.       8     not after, Unix seconds, big endian
//	.       32    issuer: fingerprint of the signing CA certificate
//	              (all zero in a self-signed CA certificate)
//	.       1     partition count p (0..MaxPartitions; 0 for a CA)
//	.       p×    partition: 1 byte length (1..63), name
//	.       64    Ed25519 signature over every byte before it
package cert

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"
	"unicode/utf8"
)

// Kind says what a certificate certifies.
type Kind uint8

const (
	KindCA   Kind = 1
	KindNode Kind = 2
)

func (k Kind) String() string {
	switch k {
	case KindCA:
		return "ca"
	case KindNode:
		return "node"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

const (
	magic = "SINCCRT1"

	// MaxNameLen bounds node, partition and service names.
	MaxNameLen = 63
	// MaxPartitions bounds the partitions one certificate may list.
	MaxPartitions = 64
	// MaxEncodedLen bounds an encoded certificate; decoders refuse more.
	MaxEncodedLen = len(magic) + 1 + 1 + MaxNameLen + 32 + 8 + 8 + 32 + 1 +
		MaxPartitions*(1+MaxNameLen) + ed25519.SignatureSize

	KeySize = 32
)

// Certificate is a decoded CA or node certificate.
type Certificate struct {
	Kind       Kind
	Name       string
	PublicKey  [KeySize]byte
	NotBefore  time.Time
	NotAfter   time.Time
	Issuer     [sha256.Size]byte // fingerprint of the signing CA; zero for a CA
	Partitions []string
	Signature  [ed25519.SignatureSize]byte

	raw []byte // the exact encoding it was decoded from or signed into
}

// Fingerprint is the SHA-256 of a certificate's full encoding.
type Fingerprint [sha256.Size]byte

func (f Fingerprint) String() string { return hex.EncodeToString(f[:]) }

// Fingerprint returns the SHA-256 of the certificate's encoding.
func (c *Certificate) Fingerprint() Fingerprint { return sha256.Sum256(c.raw) }

// Raw returns the certificate's encoding. The caller must not modify it.
func (c *Certificate) Raw() []byte { return c.raw }

// HasPartition reports whether the certificate lists partition p.
func (c *Certificate) HasPartition(p string) bool { return slices.Contains(c.Partitions, p) }

// ValidName checks a node, partition or service name: 1 to 63 characters of
// ASCII letters, digits, '-', '_' and '.', starting with a letter or digit.
func ValidName(s string) error {
	if s == "" {
		return errors.New("empty name")
	}
	if len(s) > MaxNameLen {
		return fmt.Errorf("name %.20q… is %d bytes, longer than %d", s, len(s), MaxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case (c == '-' || c == '_' || c == '.') && i > 0:
		default:
			r, _ := utf8.DecodeRuneInString(s[i:]) // name the character, not its first byte
			return fmt.Errorf("name %q has %q at %d: use letters, digits, '-', '_' and '.', starting with a letter or digit", s, r, i)
		}
	}
	return nil
}

// tbs encodes the to-be-signed part of c.
func (c *Certificate) tbs() ([]byte, error) {
	if c.Kind != KindCA && c.Kind != KindNode {
		return nil, fmt.Errorf("unknown certificate kind %d", c.Kind)
	}
	if err := ValidName(c.Name); err != nil {
		return nil, fmt.Errorf("certificate name: %w", err)
	}
	if len(c.Partitions) > MaxPartitions {
		return nil, fmt.Errorf("certificate lists %d partitions, more than %d", len(c.Partitions), MaxPartitions)
	}
	if c.Kind == KindCA && len(c.Partitions) > 0 {
		return nil, errors.New("a CA certificate lists no partitions")
	}
	b := make([]byte, 0, MaxEncodedLen)
	b = append(b, magic...)
	b = append(b, byte(c.Kind), byte(len(c.Name)))
	b = append(b, c.Name...)
	b = append(b, c.PublicKey[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(c.NotBefore.Unix()))
	b = binary.BigEndian.AppendUint64(b, uint64(c.NotAfter.Unix()))
	b = append(b, c.Issuer[:]...)
	b = append(b, byte(len(c.Partitions)))
	seen := make(map[string]bool, len(c.Partitions))
	for _, p := range c.Partitions {
		if err := ValidName(p); err != nil {
			return nil, fmt.Errorf("partition: %w", err)
		}
		if seen[p] {
			return nil, fmt.Errorf("partition %q listed twice", p)
		}
		seen[p] = true
		b = append(b, byte(len(p)))
		b = append(b, p...)
	}
	return b, nil
}

// sign fills in c's signature and encoding with key.
func (c *Certificate) sign(key ed25519.PrivateKey) error {
	b, err := c.tbs()
	if err != nil {
		return err
	}
	copy(c.Signature[:], ed25519.Sign(key, b))
	c.raw = append(b, c.Signature[:]...)
	return nil
}

// Decode parses one certificate encoding. It checks the form only: call
// [Certificate.VerifyCA] or [Pool.Verify] to check signature and validity.
func Decode(b []byte) (*Certificate, error) {
	if len(b) > MaxEncodedLen {
		return nil, fmt.Errorf("certificate is %d bytes, more than %d", len(b), MaxEncodedLen)
	}
	r := reader{b: b}
	if string(r.next(len(magic))) != magic {
		return nil, errors.New("not a sinc certificate (bad magic)")
	}
	c := &Certificate{Kind: Kind(r.byte())}
	if c.Kind != KindCA && c.Kind != KindNode {
		return nil, fmt.Errorf("unknown certificate kind %d", c.Kind)
	}
	c.Name = string(r.next(int(r.byte())))
	copy(c.PublicKey[:], r.next(KeySize))
	c.NotBefore = time.Unix(int64(binary.BigEndian.Uint64(r.next(8))), 0).UTC()
	c.NotAfter = time.Unix(int64(binary.BigEndian.Uint64(r.next(8))), 0).UTC()
	copy(c.Issuer[:], r.next(sha256.Size))
	n := int(r.byte())
	if n > MaxPartitions {
		return nil, fmt.Errorf("certificate lists %d partitions, more than %d", n, MaxPartitions)
	}
	for range n {
		if r.err != nil {
			break
		}
		c.Partitions = append(c.Partitions, string(r.next(int(r.byte()))))
	}
	copy(c.Signature[:], r.next(ed25519.SignatureSize))
	if r.err != nil {
		return nil, errors.New("certificate is truncated")
	}
	if len(r.b) != 0 {
		return nil, fmt.Errorf("certificate has %d trailing bytes", len(r.b))
	}
	// Re-encode to check names and that this is the one canonical form.
	tbs, err := c.tbs()
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(tbs, b[:len(b)-ed25519.SignatureSize]) {
		return nil, errors.New("certificate is not in canonical form")
	}
	c.raw = slices.Clone(b)
	return c, nil
}

// reader consumes b; after the first short read it returns zeros and
// remembers the error.
type reader struct {
	b   []byte
	err error
}

func (r *reader) next(n int) []byte {
	if r.err != nil || n > len(r.b) {
		r.err = errors.New("short")
		return make([]byte, n)
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) byte() byte { return r.next(1)[0] }

// VerifyCA checks that c is a well-formed self-signed CA certificate that is
// valid at now.
func (c *Certificate) VerifyCA(now time.Time) error {
	if c.Kind != KindCA {
		return fmt.Errorf("certificate %q is a %s certificate, not a CA certificate", c.Name, c.Kind)
	}
	if c.Issuer != ([sha256.Size]byte{}) {
		return fmt.Errorf("CA certificate %q is not self-signed", c.Name)
	}
	if len(c.raw) < ed25519.SignatureSize {
		return fmt.Errorf("CA certificate %q is not signed", c.Name)
	}
	if !ed25519.Verify(c.PublicKey[:], c.raw[:len(c.raw)-ed25519.SignatureSize], c.Signature[:]) {
		return fmt.Errorf("CA certificate %q: bad self-signature", c.Name)
	}
	return c.checkTime(now)
}

func (c *Certificate) checkTime(now time.Time) error {
	if now.Before(c.NotBefore) {
		return &ValidityError{Name: c.Name, NotYet: true, At: c.NotBefore}
	}
	if !now.Before(c.NotAfter) {
		return &ValidityError{Name: c.Name, At: c.NotAfter}
	}
	return nil
}

// ValidityError reports a certificate used outside its validity period.
type ValidityError struct {
	Name   string
	NotYet bool      // true: not valid before At; false: expired at At
	At     time.Time // the bound that was crossed
}

func (e *ValidityError) Error() string {
	if e.NotYet {
		return fmt.Sprintf("certificate of %q is not valid until %s", e.Name, e.At.Format(time.RFC3339))
	}
	return fmt.Sprintf("certificate of %q expired at %s", e.Name, e.At.Format(time.RFC3339))
}

// ErrUnknownCA is wrapped by errors for certificates another CA issued.
var ErrUnknownCA = errors.New("certificate issued by an unknown CA")

// Verifier checks node certificates against one cluster CA.
type Verifier struct {
	CA  *Certificate
	fp  Fingerprint
	key ed25519.PublicKey
}

// NewVerifier returns a verifier for node certificates issued by ca. The CA
// certificate itself must be valid at now.
func NewVerifier(ca *Certificate, now time.Time) (*Verifier, error) {
	if err := ca.VerifyCA(now); err != nil {
		return nil, err
	}
	return &Verifier{CA: ca, fp: ca.Fingerprint(), key: ed25519.PublicKey(ca.PublicKey[:])}, nil
}

// Verify checks that c is a node certificate signed by the verifier's CA and
// valid at now. It does not check which node c names.
func (v *Verifier) Verify(c *Certificate, now time.Time) error {
	if c.Kind != KindNode {
		return fmt.Errorf("certificate %q is a %s certificate, not a node certificate", c.Name, c.Kind)
	}
	if Fingerprint(c.Issuer) != v.fp {
		return fmt.Errorf("node %q: %w (issuer %.16s…, cluster CA %.16s…)", c.Name, ErrUnknownCA, Fingerprint(c.Issuer), v.fp)
	}
	if len(c.raw) < ed25519.SignatureSize {
		return fmt.Errorf("node %q: certificate is not signed", c.Name)
	}
	if !ed25519.Verify(v.key, c.raw[:len(c.raw)-ed25519.SignatureSize], c.Signature[:]) {
		return fmt.Errorf("node %q: certificate signature does not verify with the cluster CA key", c.Name)
	}
	return c.checkTime(now)
}
