package etcdtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TLSFiles are the PEM files a client of a TLS test cluster uses: the CA that
// signed the server's certificate (and the client's), and a client
// certificate and key the cluster accepts. ForeignCert and ForeignKey are a
// client certificate of another CA, which the cluster refuses.
type TLSFiles struct {
	CA          string
	Cert        string
	Key         string
	ForeignCert string
	ForeignKey  string
}

// serverFiles are the members' certificate and key (all members share one,
// valid for 127.0.0.1 and localhost).
type serverFiles struct {
	cert, key string
}

// Config returns a client TLS configuration from the files.
func (f *TLSFiles) Config() (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: client certificate %s: %w", f.Cert, err)
	}
	ca, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("etcdtest: %s holds no certificate", f.CA)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// writeTLS makes a throwaway CA, a server certificate, a client certificate
// and a client certificate of another CA, as PEM files in dir.
func writeTLS(t testing.TB, dir string) (*TLSFiles, serverFiles) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ca := newIssuer(t, "etcdtest CA")
	foreign := newIssuer(t, "etcdtest foreign CA")
	f := &TLSFiles{
		CA:          filepath.Join(dir, "ca.crt"),
		Cert:        filepath.Join(dir, "client.crt"),
		Key:         filepath.Join(dir, "client.key"),
		ForeignCert: filepath.Join(dir, "foreign-client.crt"),
		ForeignKey:  filepath.Join(dir, "foreign-client.key"),
	}
	s := serverFiles{cert: filepath.Join(dir, "server.crt"), key: filepath.Join(dir, "server.key")}
	writePEM(t, f.CA, "CERTIFICATE", ca.der)
	// etcd's gateway dials its own server with the server certificate, so
	// that one is good for both ends.
	ca.issue(t, s.cert, s.key, "etcdtest server", []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth})
	ca.issue(t, f.Cert, f.Key, "etcdtest client", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	foreign.issue(t, f.ForeignCert, f.ForeignKey, "etcdtest foreign client", []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	return f, s
}

type issuer struct {
	cert *x509.Certificate
	der  []byte
	key  *ecdsa.PrivateKey
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func template(cn string) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
	}
}

func newIssuer(t testing.TB, cn string) *issuer {
	t.Helper()
	key := newKey(t)
	tmpl := template(cn)
	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &issuer{cert: c, der: der, key: key}
}

// issue writes a leaf certificate for loopback and its key.
func (is *issuer) issue(t testing.TB, certPath, keyPath, cn string, usage []x509.ExtKeyUsage) {
	t.Helper()
	key := newKey(t)
	tmpl := template(cn)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = usage
	tmpl.DNSNames = []string{"localhost"}
	tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, is.cert, &key.PublicKey, is.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, certPath, "CERTIFICATE", der)
	writePEM(t, keyPath, "PRIVATE KEY", kb)
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
