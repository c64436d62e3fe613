package cert

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Default validity periods.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultNodeValidity = 365 * 24 * time.Hour
)

// clockSkew is how far before "now" a new certificate's validity starts, so
// that nodes whose clocks lag the CA's a little accept it at once.
const clockSkew = 5 * time.Minute

// InitCA makes a new cluster CA in dir: ca.key (0600) and ca.crt. It refuses
// to overwrite an existing CA.
func InitCA(dir, name string, validFor time.Duration, now time.Time) (*Certificate, error) {
	if validFor <= 0 {
		return nil, fmt.Errorf("validity %s is not positive", validFor)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	keyPath, certPath := filepath.Join(dir, CAKeyFile), filepath.Join(dir, CACertFile)
	if _, err := os.Stat(keyPath); err == nil {
		return nil, fmt.Errorf("%s already exists: refusing to replace a CA key", keyPath)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	defer clear(priv)
	c := &Certificate{
		Kind:      KindCA,
		Name:      name,
		NotBefore: now.Add(-clockSkew).Truncate(time.Second),
		NotAfter:  now.Add(validFor).Truncate(time.Second),
	}
	copy(c.PublicKey[:], pub)
	if err := c.sign(priv); err != nil {
		return nil, err
	}
	if err := writeKeyFile(keyPath, pemCAKey, priv.Seed()); err != nil {
		return nil, err
	}
	if err := writeCertFile(certPath, c); err != nil {
		return nil, err
	}
	return c, nil
}

// LoadCA reads and checks the CA in dir.
func LoadCA(dir string, now time.Time) (*Certificate, ed25519.PrivateKey, error) {
	c, err := LoadCertificate(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, err
	}
	if err := c.VerifyCA(now); err != nil {
		return nil, nil, err
	}
	key, err := LoadCAKey(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, err
	}
	if !key.Public().(ed25519.PublicKey).Equal(ed25519.PublicKey(c.PublicKey[:])) {
		clear(key)
		return nil, nil, errors.New("CA key does not match CA certificate")
	}
	return c, key, nil
}

// NodeRequest describes a node certificate to issue.
type NodeRequest struct {
	Node       string
	Partitions []string
	NotBefore  time.Time // zero: now less a little clock skew
	ValidFor   time.Duration
}

// IssueNode signs a node certificate for pub with the CA (ca, caKey).
func IssueNode(ca *Certificate, caKey ed25519.PrivateKey, pub *ecdh.PublicKey, req NodeRequest, now time.Time) (*Certificate, error) {
	if err := ValidName(req.Node); err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	if len(req.Partitions) == 0 {
		return nil, errors.New("a node certificate needs at least one partition")
	}
	if req.ValidFor <= 0 {
		return nil, fmt.Errorf("validity %s is not positive", req.ValidFor)
	}
	// Valid for ValidFor from NotBefore, or from now when NotBefore is zero
	// (then starting a little earlier, for clocks that lag the CA's).
	nb, na := req.NotBefore, req.NotBefore.Add(req.ValidFor)
	if nb.IsZero() {
		nb, na = now.Add(-clockSkew), now.Add(req.ValidFor)
	}
	c := &Certificate{
		Kind:       KindNode,
		Name:       req.Node,
		NotBefore:  nb.Truncate(time.Second),
		NotAfter:   na.Truncate(time.Second),
		Issuer:     ca.Fingerprint(),
		Partitions: slices.Clone(req.Partitions), // not the caller's: it must stay what is signed
	}
	if c.NotAfter.After(ca.NotAfter) {
		c.NotAfter = ca.NotAfter
	}
	copy(c.PublicKey[:], pub.Bytes())
	if err := c.sign(caKey); err != nil {
		return nil, err
	}
	return c, nil
}

// SignNode makes a node's key pair and certificate with the CA in caDir and
// writes them to outDir as NODE.key (0600) and NODE.crt. It refuses to
// replace an existing key.
func SignNode(caDir, outDir string, req NodeRequest, now time.Time) (*Certificate, error) {
	ca, caKey, err := LoadCA(caDir, now)
	if err != nil {
		return nil, err
	}
	defer clear(caKey)
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	c, err := IssueNode(ca, caKey, priv.PublicKey(), req, now)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return nil, err
	}
	certPath, keyPath := NodeFiles(outDir, req.Node)
	if err := writeKeyFile(keyPath, pemNodeKey, priv.Bytes()); err != nil {
		return nil, err
	}
	if err := writeCertFile(certPath, c); err != nil {
		return nil, err
	}
	return c, nil
}
