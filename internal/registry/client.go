package registry

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// The etcd client's connection behaviour, chosen for an agent that must
// start while etcd is down and come back quickly when it returns:
//
//   - no blocking dial: NewClient returns at once; requests fail (or wait,
//     up to their context) until a member answers;
//   - reconnect backoff from 100 ms, capped at ReconnectMaxDelay: gRPC's
//     default grows to two minutes, which left agents offline up to 29 s
//     after etcd came back;
//   - each connection attempt bounded by the dial timeout (gRPC's default is
//     20 s), so an endpoint that drops packets is given up on and the next
//     one tried;
//   - keepalive pings every KeepaliveTime on a connection with streams open,
//     closed after KeepaliveTimeout without an answer, so a member that hangs
//     or vanishes without a reset is noticed (gRPC allows no less than 10 s;
//     etcd refuses pings more often than every 5 s);
//   - the client's own logging off: it would flood the agent's log while
//     etcd is down.
const (
	DefaultDialTimeout = 5 * time.Second
	ReconnectBaseDelay = 100 * time.Millisecond
	ReconnectMaxDelay  = time.Second
	KeepaliveTime      = 10 * time.Second
	KeepaliveTimeout   = 3 * time.Second
	// MaxEndpoints bounds the endpoint list.
	MaxEndpoints = 32
)

// ClientConfig says how to reach etcd.
type ClientConfig struct {
	// Endpoints are the members' client URLs: "https://host:port",
	// "http://host:port", or "host:port" (TLS when TLS files are given).
	Endpoints []string
	// CA, Cert and Key are PEM file paths, all optional: CA verifies the
	// members' certificates (the system's roots without it); Cert and Key,
	// given together, are the client certificate for etcd's
	// --client-cert-auth. Any of them turns TLS on.
	CA, Cert, Key string
	// DialTimeout bounds one connection attempt and the client's first
	// requests; zero is DefaultDialTimeout.
	DialTimeout time.Duration
}

// TLS reports whether the configuration asks for TLS.
func (c ClientConfig) TLS() bool { return c.CA != "" || c.Cert != "" || c.Key != "" }

// NewClient returns an etcd client for cfg without waiting for a
// connection. Errors name the endpoint or file that is wrong.
func NewClient(cfg ClientConfig) (*clientv3.Client, error) {
	if err := checkEndpoints(cfg); err != nil {
		return nil, err
	}
	dial := cfg.DialTimeout
	if dial < 0 {
		return nil, fmt.Errorf("etcd dial timeout %v is negative", dial)
	}
	if dial == 0 {
		dial = DefaultDialTimeout
	}
	c := clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          dial,
		DialKeepAliveTime:    KeepaliveTime,
		DialKeepAliveTimeout: KeepaliveTimeout,
		Logger:               zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  ReconnectBaseDelay,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   ReconnectMaxDelay,
			},
			MinConnectTimeout: dial,
		})},
	}
	if cfg.TLS() {
		tc, err := tlsConfig(cfg)
		if err != nil {
			return nil, err
		}
		c.TLS = tc
	}
	cli, err := clientv3.New(c)
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	return cli, nil
}

// checkEndpoints refuses an empty or overlong list, an endpoint that is not
// host:port or an http(s) URL of one, and a plain http endpoint when TLS
// files are given (the client would silently not use them).
func checkEndpoints(cfg ClientConfig) error {
	if len(cfg.Endpoints) == 0 {
		return errors.New("no etcd endpoints")
	}
	if len(cfg.Endpoints) > MaxEndpoints {
		return fmt.Errorf("%d etcd endpoints, more than %d", len(cfg.Endpoints), MaxEndpoints)
	}
	for _, ep := range cfg.Endpoints {
		hostport := ep
		if strings.Contains(ep, "://") {
			u, err := url.Parse(ep)
			if err != nil {
				return fmt.Errorf("etcd endpoint %q: %w", ep, err)
			}
			if u.Scheme != "http" && u.Scheme != "https" {
				return fmt.Errorf("etcd endpoint %q: scheme %q, want http or https", ep, u.Scheme)
			}
			if u.Path != "" || u.RawQuery != "" || u.User != nil || u.Fragment != "" {
				return fmt.Errorf("etcd endpoint %q: want scheme://host:port and nothing more", ep)
			}
			if u.Scheme == "http" && cfg.TLS() {
				return fmt.Errorf("etcd endpoint %q is plain http but TLS files are given: use https://", ep)
			}
			hostport = u.Host
		}
		host, port, err := net.SplitHostPort(hostport)
		if err != nil || host == "" || port == "" {
			return fmt.Errorf("etcd endpoint %q: want host:port", ep)
		}
	}
	return nil
}

// tlsConfig loads the TLS files of cfg.
func tlsConfig(cfg ClientConfig) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CA != "" {
		pem, err := os.ReadFile(cfg.CA)
		if err != nil {
			return nil, fmt.Errorf("etcd CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd CA file %s: no PEM certificate in it", cfg.CA)
		}
		tc.RootCAs = pool
	}
	switch {
	case cfg.Cert == "" && cfg.Key == "":
	case cfg.Cert == "":
		return nil, fmt.Errorf("etcd client key %s given without its certificate", cfg.Key)
	case cfg.Key == "":
		return nil, fmt.Errorf("etcd client certificate %s given without its key", cfg.Cert)
	default:
		pair, err := tls.LoadX509KeyPair(cfg.Cert, cfg.Key)
		if err != nil {
			return nil, fmt.Errorf("etcd client certificate %s and key %s: %w", cfg.Cert, cfg.Key, err)
		}
		tc.Certificates = []tls.Certificate{pair}
	}
	return tc, nil
}
