package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

// needStunnel skips a test of the stunnel transport where stunnel is not
// installed. That includes CI: the benchmark is not a CI test, so .ci/run
// does not install stunnel4.
func needStunnel(t *testing.T) {
	t.Helper()
	if _, err := StunnelPath(); err != nil {
		t.Skipf("%v: the stunnel transport of the benchmark is not tested (.ci/run does not install stunnel4: the benchmark is no CI test)", err)
	}
}

// The stunnel relays carry bytes unchanged, process → stunnel → TLS 1.3 →
// stunnel → process, and the hop between them is TLS 1.3 with the
// certificate made for the run.
func TestStunnelRelays(t *testing.T) {
	needStunnel(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // echo
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	dir := t.TempDir()
	certPath, keyPath, err := makeTLSCert(dir)
	if err != nil {
		t.Fatal(err)
	}
	client, server, err := startRelays(ctx, dir, ln.Addr().String(), certPath, keyPath)
	if err != nil {
		t.Fatal(err)
	}
	defer server.stop()
	defer client.stop()

	c, err := net.Dial("tcp", client.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	data := make([]byte, 1<<20)
	rand.Read(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		c.(*net.TCPConn).CloseWrite()
		werr <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading the echo through stunnel: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("writing through stunnel: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echo through stunnel: %d bytes back of %d sent, or different", len(got), len(data))
	}

	conf, err := clientTLSConfig(certPath)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := tls.Dial("tcp", server.addr, conf)
	if err != nil {
		t.Fatalf("TLS to stunnel's server side: %v", err)
	}
	defer tc.Close()
	if v := tc.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Errorf("stunnel's server side speaks TLS version %#x, want 1.3", v)
	}
}

// A run with the stunnel column measures it on the rows where a relay
// compares like for like, and leaves the others empty.
func TestStunnelRun(t *testing.T) {
	needStunnel(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	opts := tinyOptions()
	opts.Transports, opts.Reps, opts.IdleCounts = []string{TCP, SincStream, Stunnel}, 1, nil
	opts.BulkBytes = 64 << 20 // stunnel's CPU is counted in 10 ms ticks: enough of them
	r, err := Run(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	measured := []string{mBulk, mCPU, mRTT50, mRTT99, rateKey(64, true), rateKey(1024, true)}
	for _, m := range r.Metrics {
		s, ok := m.Summary[Stunnel]
		if want := slices.Contains(measured, m.Key); ok != want || ok && s.Median <= 0 {
			t.Errorf("%s: stunnel %+v (measured %v), want measured %v", m.Key, s, ok, want)
		}
		if _, ok := m.Ratios[SincStream+"/"+Stunnel]; ok != slices.Contains(measured, m.Key) {
			t.Errorf("%s: ratio to stunnel present %v", m.Key, ok)
		}
	}
	// Each stunnel process encrypts or decrypts every byte: no less than
	// 0.1 ns a byte. (Its thread for the connection ends with it, and its
	// time with it unless it is read where the process keeps it.)
	split := r.CPUSplit[Stunnel]
	if len(split) != 4 {
		t.Errorf("CPU split of stunnel: %v, want client, server and both stunnel processes", split)
	}
	for _, p := range []string{"agent-a", "agent-b"} {
		if s := split[p]; s.Median < 0.1 {
			t.Errorf("stunnel process %s: %v ns of CPU per byte, want at least 0.1", p, s.Median)
		}
	}
	var table bytes.Buffer
	r.Format(&table)
	for _, s := range []string{"stream/stunnel", "stunnel (client side)"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
}

// Without stunnel a run leaves its column out with a note; asked for by
// name, it is an error that names the package.
func TestStunnelMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	o := tinyOptions()
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	for _, tr := range o.Transports {
		if tr == Stunnel {
			t.Errorf("transports %v include stunnel, which is not installed", o.Transports)
		}
	}
	if len(o.Notes) != 1 || !strings.Contains(o.Notes[0], "stunnel4") {
		t.Errorf("notes %q, want one naming stunnel4", o.Notes)
	}
	o = tinyOptions()
	o.Transports = []string{TCP, Stunnel}
	if err := o.check(); err == nil || !strings.Contains(err.Error(), "stunnel4") {
		t.Errorf("stunnel asked for, not installed: %v", err)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatal(err) // the binary is found by path, not PATH
	}
}
