package cert

import (
	"bytes"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"time"
	"unicode/utf8"
)

// A cluster policy document, signed by the cluster CA, carries the policy
// every agent of the cluster applies: the text of `[[allow]]` rules, exactly
// as an agent's config file writes them (config.ParsePolicy reads it). The
// registry only stores it; the signature makes it the CA's word. Each
// document carries a serial, one more than the one it replaces, so an agent
// can tell a newer policy from an older one and refuse to go back (an old
// policy put back would re-allow what was since denied). Its encoding:
//
//	offset  size  field
//	0       8     magic "SINCPOL1"
//	8       32    issuer: fingerprint of the CA certificate
//	40      8     serial, big endian, 1 or more
//	48      8     issued, Unix seconds, big endian
//	56      4     body length n, big endian (0..MaxPolicyBody)
//	60      n     body: the rules' TOML text, UTF-8 without NUL
//	.       64    Ed25519 signature of the CA over every byte before it
//
// In a file or in the registry it is one PEM block of type
// "SINC CLUSTER POLICY", with nothing but white space around it.
type Policy struct {
	Serial uint64
	Issued time.Time
	Body   []byte // the rules' TOML text
	raw    []byte // the signed encoding, signature included
}

const (
	policyMagic = "SINCPOL1"
	pemPolicy   = "SINC CLUSTER POLICY"
	policyHead  = len(policyMagic) + 32 + 8 + 8 + 4

	// MaxPolicyBody bounds the rules' text of one document (a few hundred
	// rules): its PEM fits the registry's 64 KiB bound on a value.
	MaxPolicyBody = 46 << 10
	// MaxPolicyFileSize bounds a document's PEM; readers refuse more.
	MaxPolicyFileSize = 64 << 10
	// PolicyFile is the document's default name.
	PolicyFile = "policy.pol"

	maxPolicyLen = policyHead + MaxPolicyBody + ed25519.SignatureSize
)

// The PEM of the longest document (base64 in 64-character lines, and the
// two armour lines) fits MaxPolicyFileSize: this fails to build if not.
const _ = uint(MaxPolicyFileSize - ((maxPolicyLen+2)/3*4*65/64 + 2*len("-----BEGIN "+pemPolicy+"-----\n")))

// ErrPolicySerialReused is wrapped by Compare's error for two different
// documents that claim the same serial.
var ErrPolicySerialReused = errors.New("two different cluster policies with the same serial")

// Compare orders p against o, two documents of one CA: -1 if p is older, 0
// if they are the same document (the same signed bytes), +1 if p is newer.
// Two different documents with one serial are an error wrapping
// ErrPolicySerialReused: the CA signed both (two copies of its folder), or
// someone else holds its key. A nil document comes before every other.
func (p *Policy) Compare(o *Policy) (int, error) {
	switch {
	case p == nil && o == nil:
		return 0, nil
	case p == nil:
		return -1, nil
	case o == nil:
		return +1, nil
	}
	if c := cmpUint(p.Serial, o.Serial); c != 0 {
		return c, nil
	}
	if !bytes.Equal(p.raw, o.raw) {
		return 0, fmt.Errorf("serial %d, issued %s and %s: %w", p.Serial,
			p.Issued.Format(time.RFC3339), o.Issued.Format(time.RFC3339), ErrPolicySerialReused)
	}
	return 0, nil
}

// EncodePEM returns the signed document as PEM, the form of its file and of
// its value in the registry.
func (p *Policy) EncodePEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemPolicy, Bytes: p.raw})
}

// checkPolicyBody refuses a body that is too long or not text.
func checkPolicyBody(b []byte) error {
	switch {
	case len(b) > MaxPolicyBody:
		return fmt.Errorf("policy text is %d bytes, more than %d", len(b), MaxPolicyBody)
	case !utf8.Valid(b):
		return errors.New("policy text is not UTF-8")
	case bytes.IndexByte(b, 0) >= 0:
		return errors.New("policy text has a NUL byte")
	}
	return nil
}

// ParsePolicy decodes a PEM cluster policy document and checks that the CA
// of v signed it. It does not parse the rules: see config.ParsePolicy.
func ParsePolicy(data []byte, v *Verifier) (*Policy, error) {
	if len(data) > MaxPolicyFileSize {
		return nil, fmt.Errorf("cluster policy: %d bytes, more than %d", len(data), MaxPolicyFileSize)
	}
	blk, rest := pem.Decode(data)
	if blk == nil || blk.Type != pemPolicy {
		return nil, fmt.Errorf("no %q PEM block", pemPolicy)
	}
	if len(blk.Headers) != 0 {
		return nil, errors.New("cluster policy: PEM headers are not allowed")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("data after the cluster policy")
	}
	b := blk.Bytes
	if len(b) < policyHead+ed25519.SignatureSize || string(b[:len(policyMagic)]) != policyMagic {
		return nil, errors.New("not a sinc cluster policy")
	}
	signed, sig := b[:len(b)-ed25519.SignatureSize], b[len(b)-ed25519.SignatureSize:]
	if Fingerprint(b[8:40]) != v.fp {
		return nil, fmt.Errorf("cluster policy: %w", ErrUnknownCA)
	}
	if !ed25519.Verify(v.key, signed, sig) {
		return nil, errors.New("cluster policy: signature does not verify with the cluster CA key")
	}
	p := &Policy{
		Serial: binary.BigEndian.Uint64(b[40:48]),
		Issued: time.Unix(int64(binary.BigEndian.Uint64(b[48:56])), 0).UTC(),
	}
	if p.Serial == 0 {
		return nil, errors.New("cluster policy has serial 0: serials start at 1")
	}
	n := binary.BigEndian.Uint32(b[56:60])
	if n > MaxPolicyBody {
		return nil, fmt.Errorf("cluster policy text is %d bytes, more than %d", n, MaxPolicyBody)
	}
	if uint64(len(signed)) != uint64(policyHead)+uint64(n) {
		return nil, fmt.Errorf("cluster policy says its text is %d bytes but holds %d", n, len(signed)-policyHead)
	}
	p.Body = slices.Clone(signed[policyHead:])
	if err := checkPolicyBody(p.Body); err != nil {
		return nil, fmt.Errorf("cluster policy: %w", err)
	}
	p.raw = slices.Clone(b)
	return p, nil
}

// LoadPolicy reads and checks the cluster policy document at path (a
// regular file of at most MaxPolicyFileSize bytes).
func LoadPolicy(path string, v *Verifier) (*Policy, error) {
	data, err := readRegularFile(path, MaxPolicyFileSize)
	if err != nil {
		return nil, err
	}
	p, err := ParsePolicy(data, v)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// WriteFile writes the document to path whole (see writeFileAtomic).
func (p *Policy) WriteFile(path string, perm os.FileMode) error {
	return writeFileAtomic(path, p.EncodePEM(), perm)
}

// SignPolicy signs body, the rules' TOML text, with the CA in caDir under
// serial prev+1. The caller checks the rules first (config.ParsePolicy) and
// gives as prev the newest serial it knows of: the previous document's in
// its file, in the registry, whichever is higher. Agents refuse a document
// whose serial is not above the one they hold.
func SignPolicy(caDir string, body []byte, prev uint64, now time.Time) (*Policy, error) {
	if err := checkPolicyBody(body); err != nil {
		return nil, err
	}
	if prev == math.MaxUint64 {
		return nil, fmt.Errorf("the previous policy has the last serial, %d", prev)
	}
	ca, key, err := LoadCA(caDir, now)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	p := &Policy{Serial: prev + 1, Issued: now.Truncate(time.Second).UTC(), Body: slices.Clone(body)}
	fp := ca.Fingerprint()
	b := append([]byte(policyMagic), fp[:]...)
	b = binary.BigEndian.AppendUint64(b, p.Serial)
	b = binary.BigEndian.AppendUint64(b, uint64(p.Issued.Unix()))
	b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
	b = append(b, body...)
	p.raw = append(b, ed25519.Sign(key, b)...)
	return p, nil
}
