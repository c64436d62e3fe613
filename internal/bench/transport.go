package bench

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/local"
)

// The transports, in the order of the report. sinc-stream and
// sinc-message keep a channel's data on its socket to the agent (Dialer
// and ListenConfig NoRing); sinc-ring is a stream channel whose data goes
// through the rings it shares with the agent on each side (ring.go of
// package sinc), the client library's default.
const (
	TCP         = "tcp"
	TLS         = "tls"
	SincStream  = "sinc-stream"
	SincRing    = "sinc-ring"
	SincMessage = "sinc-message"
)

// Transports lists every transport (Stunnel: stunnel.go).
var Transports = []string{TCP, TLS, SincStream, SincRing, SincMessage, Stunnel}

// sincTransports are the sinc transports, in the order of the report's
// ratio columns and targets.
var sincTransports = []string{SincStream, SincRing, SincMessage}

func isSinc(tr string) bool { return slices.Contains(sincTransports, tr) }

// usesRing: the transport's channels carry their data through rings, at
// the dialing and at the accepting end; every other sinc transport is on
// the socket path at both.
func usesRing(tr string) bool { return tr == SincRing }

// isMessage: the transport keeps message boundaries (one Write, one Read).
func isMessage(tr string) bool { return tr == SincMessage }

func validTransport(tr string) bool {
	for _, t := range Transports {
		if t == tr {
			return true
		}
	}
	return false
}

// The sinc layout of the benchmark: node-a's partition "app" dials the
// services of node-b's partition "svc", one service per sinc transport.
const (
	nodeA, nodeB = "node-a", "node-b"
	partA, partB = "app", "svc"
)

func serviceOf(tr string) string {
	return "bench-" + map[string]string{SincStream: "stream", SincRing: "ring", SincMessage: "message"}[tr]
}

// makeTLSCert writes a fresh self-signed ECDSA P-256 certificate for
// 127.0.0.1 and its key (0600) into dir.
func makeTLSCert(dir string) (certPath, keyPath string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return "", "", err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "sinc bench"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", err
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certPath, keyPath = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

// serverTLSConfig: TLS 1.3 only, Go's defaults otherwise (AES-GCM suites
// on a CPU with AES instructions), no session tickets: every setup is a
// full handshake.
func serverTLSConfig(certPath, keyPath string) (*tls.Config, error) {
	c, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{c}, MinVersion: tls.VersionTLS13, SessionTicketsDisabled: true}, nil
}

func clientTLSConfig(certPath string) (*tls.Config, error) {
	b, err := os.ReadFile(certPath)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("no certificate in %s", certPath)
	}
	return &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}, nil
}

// endpoint is how a client worker reaches its server.
type endpoint struct {
	transport string
	addr      string // host:port (tcp, tls) or node/partition/service (sinc)
	socket    string // sinc: the partition socket
	tlsConf   *tls.Config
}

// dial opens one connection (tcp: connect; tls: connect and handshake;
// sinc: a channel open through the agent).
func (e *endpoint) dial(ctx context.Context) (net.Conn, error) {
	switch e.transport {
	case TCP:
		var d net.Dialer
		return d.DialContext(ctx, "tcp", e.addr)
	case TLS:
		d := tls.Dialer{Config: e.tlsConf}
		return d.DialContext(ctx, "tcp", e.addr)
	case SincStream, SincRing:
		d := sinc.Dialer{Socket: e.socket, Kind: sinc.Stream, NoRing: !usesRing(e.transport)}
		return d.DialContext(ctx, e.addr)
	case SincMessage:
		d := sinc.Dialer{Socket: e.socket, Kind: sinc.Message, NoRing: true}
		return d.DialContext(ctx, e.addr)
	}
	return nil, fmt.Errorf("unknown transport %q", e.transport)
}

// rawOpen opens a message channel speaking the local protocol directly
// (docs/protocol.md), so that a sender can put many records in one
// write(2): the Go client's WriteMessage writes each message on its own.
// It asks for no ring: sinc-message's data stays on the socket path, as
// in its other rows. The returned connection carries records.
func rawOpen(ctx context.Context, socket, addr string) (*net.UnixConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, err
	}
	uc := c.(*net.UnixConn)
	if dl, ok := ctx.Deadline(); ok {
		uc.SetDeadline(dl)
	}
	req, _ := json.Marshal(local.Request{V: local.Version, Op: local.OpOpen, To: addr, Kind: local.KindMessage})
	if _, err := uc.Write(append(req, '\n')); err != nil {
		uc.Close()
		return nil, err
	}
	var line []byte
	var b [1]byte
	for {
		if _, err := uc.Read(b[:]); err != nil {
			uc.Close()
			return nil, fmt.Errorf("agent's answer: %w", err)
		}
		if b[0] == '\n' {
			break
		}
		if line = append(line, b[0]); len(line) > 1<<20 {
			uc.Close()
			return nil, errors.New("agent's answer too long")
		}
	}
	var resp local.Response
	if err := json.Unmarshal(line, &resp); err != nil {
		uc.Close()
		return nil, err
	}
	if !resp.OK {
		uc.Close()
		return nil, fmt.Errorf("open %s: %v", addr, resp.Error)
	}
	uc.SetDeadline(time.Time{})
	return uc, nil
}

// readRecord reads one data record of a raw channel into buf.
func readRecord(r *bufio.Reader, buf []byte) (int, error) {
	var h [local.RecordHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, err
	}
	typ, n, err := local.ParseRecordHeader(h[:])
	if err != nil {
		return 0, err
	}
	if typ != local.RecData {
		b := make([]byte, n)
		io.ReadFull(r, b)
		return 0, fmt.Errorf("record type %d from the agent: %s", typ, b)
	}
	if n > len(buf) {
		return 0, fmt.Errorf("record of %d bytes, buffer %d", n, len(buf))
	}
	return io.ReadFull(r, buf[:n])
}
