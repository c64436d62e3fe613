package registry

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/etcdtest"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// TestNewClientDoesNotBlock: with etcd down, NewClient returns at once (an
// agent must start while etcd is down) and requests fail by their context.
func TestNewClientDoesNotBlock(t *testing.T) {
	start := time.Now()
	cli, err := NewClient(ClientConfig{Endpoints: []string{closedPort(t), "http://" + closedPort(t)}})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("NewClient took %v with etcd down", d)
	}
	if _, err := cli.Get(ctxFor(t, 300*time.Millisecond), "/k"); err == nil {
		t.Fatal("Get succeeded with etcd down")
	}
}

// TestReconnectAfterOutage: after etcd has been down for a while, the client
// is back within about ReconnectMaxDelay of its return, not after gRPC's
// default backoff (which reaches several seconds after a few failures, and
// two minutes at most).
func TestReconnectAfterOutage(t *testing.T) {
	c := etcdtest.Start(t, 1)
	cli, err := NewClient(ClientConfig{Endpoints: c.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(ctxFor(t, 5*time.Second), "/k", "v"); err != nil {
		t.Fatal(err)
	}
	c.Stop(0)
	// Long enough for gRPC's default backoff to reach 4 s between attempts.
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end); {
		if _, err := cli.Get(ctxFor(t, 200*time.Millisecond), "/k"); err == nil {
			t.Fatal("Get succeeded with etcd stopped")
		}
		time.Sleep(100 * time.Millisecond)
	}
	back := time.Now()
	c.Restart(0) // a single member is ready in a few hundred milliseconds
	for {
		if _, err := cli.Get(ctxFor(t, 200*time.Millisecond), "/k"); err == nil {
			break
		}
		if time.Since(back) > 15*time.Second {
			t.Fatal("client not back 15 s after etcd was restarted")
		}
	}
	d := time.Since(back)
	t.Logf("client back %v after etcd was restarted", d)
	if limit := ReconnectMaxDelay + 1500*time.Millisecond; d > limit {
		t.Fatalf("client back %v after etcd was restarted, want within %v", d, limit)
	}
}

// TestNewClientTLS: against etcd with --client-cert-auth, the configured CA,
// certificate and key work; another CA's client certificate, no client
// certificate, and no CA (the system's roots) do not.
func TestNewClientTLS(t *testing.T) {
	c := etcdtest.StartTLS(t, 1)
	f := c.TLS()
	good := ClientConfig{Endpoints: c.Endpoints(), CA: f.CA, Cert: f.Cert, Key: f.Key}
	cli, err := NewClient(good)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(ctxFor(t, 5*time.Second), "/k", "v"); err != nil {
		t.Fatalf("put over TLS: %v", err)
	}
	// A bare host:port endpoint uses TLS when TLS files are given.
	bare := good
	bare.Endpoints = []string{strings.TrimPrefix(c.Endpoint(0), "https://")}
	cli2, err := NewClient(bare)
	if err != nil {
		t.Fatal(err)
	}
	defer cli2.Close()
	if _, err := cli2.Get(ctxFor(t, 5*time.Second), "/k"); err != nil {
		t.Fatalf("get over TLS with a bare endpoint: %v", err)
	}

	foreign := good
	foreign.Cert, foreign.Key = f.ForeignCert, f.ForeignKey
	noClientCert := good
	noClientCert.Cert, noClientCert.Key = "", ""
	noCA := good
	noCA.CA = ""
	for name, cfg := range map[string]ClientConfig{
		"another CA's client certificate": foreign,
		"no client certificate":           noClientCert,
		"no CA (system roots)":            noCA,
	} {
		bad, err := NewClient(cfg)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		_, err = bad.Get(ctxFor(t, time.Second), "/k")
		bad.Close()
		if err == nil {
			t.Errorf("%s: read succeeded", name)
		}
	}
}

// TestNewClientConfigErrors: a bad configuration is refused with an error
// naming the endpoint or the file.
func TestNewClientConfigErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	ep := []string{"https://127.0.0.1:2379"}
	for _, tc := range []struct {
		cfg  ClientConfig
		want string
	}{
		{ClientConfig{}, "no etcd endpoints"},
		{ClientConfig{Endpoints: make([]string, MaxEndpoints+1)}, "more than"},
		{ClientConfig{Endpoints: []string{"ftp://127.0.0.1:2379"}}, `"ftp://127.0.0.1:2379"`},
		{ClientConfig{Endpoints: []string{"http://127.0.0.1:2379/v3"}}, `"http://127.0.0.1:2379/v3"`},
		{ClientConfig{Endpoints: []string{"127.0.0.1"}}, `"127.0.0.1": want host:port`},
		{ClientConfig{Endpoints: []string{"http://127.0.0.1:2379"}, CA: garbage}, "plain http but TLS files"},
		{ClientConfig{Endpoints: ep, CA: missing}, missing},
		{ClientConfig{Endpoints: ep, CA: garbage}, garbage},
		{ClientConfig{Endpoints: ep, Cert: garbage}, "without its key"},
		{ClientConfig{Endpoints: ep, Key: garbage}, "without its certificate"},
		{ClientConfig{Endpoints: ep, Cert: missing, Key: garbage}, missing},
		{ClientConfig{Endpoints: ep, Cert: garbage, Key: garbage}, garbage},
		{ClientConfig{Endpoints: ep, DialTimeout: -time.Second}, "negative"},
	} {
		cli, err := NewClient(tc.cfg)
		if err == nil {
			cli.Close()
			t.Errorf("%+v: accepted", tc.cfg)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %q does not say %q", tc.cfg, err, tc.want)
		}
	}
}
