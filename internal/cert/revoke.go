package cert

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// A revocation list, signed by the cluster CA, names node certificates no
// agent may accept any more: by node name (every certificate of that node)
// or by fingerprint (one certificate). Each list carries a serial, one more
// than the list it replaces, so an agent can tell a newer list from an
// older one and refuse to go back (a list put back from a backup would
// otherwise re-admit the nodes revoked since). Its encoding:
//
//	offset  size  field
//	0       8     magic "SINCCRL2"
//	8       32    issuer: fingerprint of the CA certificate
//	40      8     serial, big endian, 1 or more
//	48      8     issued, Unix seconds, big endian
//	56      2     entry count e (0..MaxRevocations)
//	58      e×    entry: 1 byte kind (1 node name, 2 fingerprint),
//	              1 byte length, bytes (a name, or 32 bytes)
//	.       64    Ed25519 signature of the CA over every byte before it
//
// Lists of the first version (magic "SINCCRL1", the same layout without
// the serial) are still read, as serial 0: an agent upgraded with such a
// list in place keeps it in force, and the next `sinc ca revoke` replaces
// it with serial 1. A list of either version is written only as version 2.
type Revocations struct {
	Serial       uint64 // 0 for a list of the first version
	Issued       time.Time
	Nodes        []string
	Fingerprints []Fingerprint
	raw          []byte // the signed encoding, signature included
}

const (
	crlMagic   = "SINCCRL2"
	crlMagicV1 = "SINCCRL1"
	pemCRL     = "SINC REVOCATION LIST"

	// MaxRevocations bounds the entries of one list.
	MaxRevocations = 10000
	// MaxRevocationsFileSize bounds a list's PEM file; readers refuse more.
	MaxRevocationsFileSize = 1 << 20
	// RevocationsFile is the list's default name in a CA folder.
	RevocationsFile = "revoked.crl"

	revokeNode        = 1
	revokeFingerprint = 2

	// maxCRLLen is the longest encoding: every entry a longest name.
	maxCRLLen = len(crlMagic) + 32 + 8 + 8 + 2 + MaxRevocations*(2+MaxNameLen) + ed25519.SignatureSize
)

// The file bound holds the longest list in PEM (base64 in 64-character
// lines, and the two armour lines): this fails to build if it does not.
const _ = uint(MaxRevocationsFileSize - ((maxCRLLen+2)/3*4*65/64 + 2*len("-----BEGIN "+pemCRL+"-----\n")))

// ErrSerialReused is wrapped by Compare's error for two different lists
// that claim the same place in the order.
var ErrSerialReused = errors.New("two different revocation lists with the same serial")

// Revoked reports whether c is on the list. A nil list revokes nothing.
func (r *Revocations) Revoked(c *Certificate) bool {
	if r == nil {
		return false
	}
	return slices.Contains(r.Nodes, c.Name) || slices.Contains(r.Fingerprints, c.Fingerprint())
}

// Len returns the number of entries.
func (r *Revocations) Len() int {
	if r == nil {
		return 0
	}
	return len(r.Nodes) + len(r.Fingerprints)
}

// Compare orders r against o, two lists of one CA: -1 if r is older, 0 if
// they are the same list (the same signed bytes), +1 if r is newer. Lists
// are ordered by serial, and lists of the first version (serial 0) among
// themselves by issue time. Two different lists in the same place of that
// order are an error wrapping ErrSerialReused: the CA signed two lists
// under one serial (two copies of its folder, each used to revoke), or
// someone else holds its key. A nil list comes before every other.
func (r *Revocations) Compare(o *Revocations) (int, error) {
	switch {
	case r == nil && o == nil:
		return 0, nil
	case r == nil:
		return -1, nil
	case o == nil:
		return +1, nil
	}
	if c := cmpUint(r.Serial, o.Serial); c != 0 {
		return c, nil
	}
	if r.Serial == 0 {
		if c := r.Issued.Compare(o.Issued); c != 0 {
			return c, nil
		}
	}
	if !bytes.Equal(r.raw, o.raw) {
		return 0, fmt.Errorf("serial %d, issued %s and %s: %w", r.Serial,
			r.Issued.Format(time.RFC3339), o.Issued.Format(time.RFC3339), ErrSerialReused)
	}
	return 0, nil
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return +1
	}
	return 0
}

// encode returns the signed part of a version 2 list.
func (r *Revocations) encode(issuer Fingerprint) []byte {
	b := append([]byte(crlMagic), issuer[:]...)
	b = binary.BigEndian.AppendUint64(b, r.Serial)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Issued.Unix()))
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Nodes)+len(r.Fingerprints)))
	for _, n := range r.Nodes {
		b = append(append(b, revokeNode, byte(len(n))), n...)
	}
	for _, f := range r.Fingerprints {
		b = append(append(b, revokeFingerprint, byte(len(f))), f[:]...)
	}
	return b
}

// EncodePEM returns the signed list as PEM, the form of its file.
func (r *Revocations) EncodePEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemCRL, Bytes: r.raw})
}

// ParseRevocations decodes a PEM revocation list and checks that the CA of
// v signed it.
func ParseRevocations(data []byte, v *Verifier) (*Revocations, error) {
	blk, rest := pem.Decode(data)
	if blk == nil || blk.Type != pemCRL {
		return nil, fmt.Errorf("no %q PEM block", pemCRL)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("data after the revocation list")
	}
	b := blk.Bytes
	var head int // bytes before the entry count
	switch {
	case len(b) < len(crlMagic):
	case string(b[:len(crlMagic)]) == crlMagic:
		head = len(crlMagic) + 32 + 8 + 8
	case string(b[:len(crlMagicV1)]) == crlMagicV1:
		head = len(crlMagicV1) + 32 + 8
	}
	if head == 0 || len(b) < head+2+ed25519.SignatureSize {
		return nil, errors.New("not a sinc revocation list")
	}
	body, sig := b[:len(b)-ed25519.SignatureSize], b[len(b)-ed25519.SignatureSize:]
	if Fingerprint(b[8:40]) != v.fp {
		return nil, fmt.Errorf("revocation list: %w", ErrUnknownCA)
	}
	if !ed25519.Verify(v.key, body, sig) {
		return nil, errors.New("revocation list: signature does not verify with the cluster CA key")
	}
	r := &Revocations{Issued: time.Unix(int64(binary.BigEndian.Uint64(b[head-8:head])), 0).UTC()}
	if head > len(crlMagicV1)+32+8 {
		if r.Serial = binary.BigEndian.Uint64(b[40:48]); r.Serial == 0 {
			return nil, errors.New("revocation list has serial 0: serials start at 1")
		}
	}
	n := int(binary.BigEndian.Uint16(b[head : head+2]))
	if n > MaxRevocations {
		return nil, fmt.Errorf("revocation list has %d entries, more than %d", n, MaxRevocations)
	}
	p := body[head+2:]
	for range n {
		if len(p) < 2 || len(p) < 2+int(p[1]) {
			return nil, errors.New("revocation list is truncated")
		}
		kind, val := p[0], p[2:2+int(p[1])]
		p = p[2+int(p[1]):]
		switch {
		case kind == revokeNode && ValidName(string(val)) == nil:
			r.Nodes = append(r.Nodes, string(val))
		case kind == revokeFingerprint && len(val) == sha256.Size:
			r.Fingerprints = append(r.Fingerprints, Fingerprint(val))
		default:
			return nil, fmt.Errorf("revocation list has a bad entry (kind %d, %d bytes)", kind, len(val))
		}
	}
	if len(p) != 0 {
		return nil, errors.New("revocation list has trailing bytes")
	}
	r.raw = slices.Clone(b)
	return r, nil
}

// LoadRevocations reads and checks the revocation list at path. The file
// must be a regular file of at most MaxRevocationsFileSize bytes (a FIFO
// put in its place must not hang the reader).
func LoadRevocations(path string, v *Verifier) (*Revocations, error) {
	data, err := readRegularFile(path, MaxRevocationsFileSize)
	if err != nil {
		return nil, err
	}
	r, err := ParseRevocations(data, v)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// WriteFile writes the list to path whole, with mode perm: a reader sees
// the file before or after, never a part, and once WriteFile returns the
// new file survives a crash (a temporary file in the same folder, synced,
// renamed over path, then the folder synced).
func (r *Revocations) WriteFile(path string, perm os.FileMode) error {
	return writeFileAtomic(path, r.EncodePEM(), perm)
}

// ParseFingerprint reads a hex fingerprint.
func ParseFingerprint(s string) (Fingerprint, error) {
	var f Fingerprint
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(f) {
		return f, fmt.Errorf("%q is not a certificate fingerprint (64 hex digits)", s)
	}
	copy(f[:], b)
	return f, nil
}

// Revoke adds nodes and fingerprints to the revocation list at path (made
// if missing; an existing one must verify) and signs it anew with the CA in
// caDir, under the next serial: one more than the existing list's (1 for
// the first list).
//
// The serial comes from the list at path alone. A CA folder that lost its
// list would start again at 1, which agents that saw a later list refuse:
// copy the newest list back first (each agent keeps one in its state
// folder).
func Revoke(caDir, path string, nodes []string, fps []Fingerprint, now time.Time) (*Revocations, error) {
	ca, err := LoadCertificate(filepath.Join(caDir, CACertFile))
	if err != nil {
		return nil, err
	}
	v, err := NewVerifier(ca, now)
	if err != nil {
		return nil, err
	}
	old := &Revocations{}
	if _, err := os.Stat(path); err == nil {
		if old, err = LoadRevocations(path, v); err != nil {
			return nil, fmt.Errorf("the existing list: %w", err)
		}
	}
	if old.Serial == math.MaxUint64 {
		return nil, fmt.Errorf("the existing list %s has the last serial, %d", path, old.Serial)
	}
	r, err := SignRevocations(caDir, old.Serial+1, append(slices.Clone(old.Nodes), nodes...),
		append(slices.Clone(old.Fingerprints), fps...), now)
	if err != nil {
		return nil, err
	}
	// Replace the file whole, so an agent never reads half a list.
	return r, r.WriteFile(path, 0o644)
}

// SignRevocations signs a list of nodes and fingerprints (each kept once,
// in the order given) with the CA in caDir under serial. The caller chooses
// the serial: one more than the newest list it knows of.
func SignRevocations(caDir string, serial uint64, nodes []string, fps []Fingerprint, now time.Time) (*Revocations, error) {
	if serial == 0 {
		return nil, errors.New("revocation list serial 0: serials start at 1")
	}
	ca, key, err := LoadCA(caDir, now)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	r := &Revocations{Serial: serial, Issued: now.Truncate(time.Second)}
	for _, n := range nodes {
		if err := ValidName(n); err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
		if !slices.Contains(r.Nodes, n) {
			r.Nodes = append(r.Nodes, n)
		}
	}
	for _, f := range fps {
		if !slices.Contains(r.Fingerprints, f) {
			r.Fingerprints = append(r.Fingerprints, f)
		}
	}
	if r.Len() > MaxRevocations {
		return nil, fmt.Errorf("the list would have %d entries, more than %d", r.Len(), MaxRevocations)
	}
	body := r.encode(ca.Fingerprint())
	r.raw = append(body, ed25519.Sign(key, body)...)
	return r, nil
}
