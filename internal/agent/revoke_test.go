package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
)

// TestRevocation: revoking node-b closes its link and channels on node-a
// within a second of the list's writing, the process is told why, node-b's
// reconnections are refused; a forged list is ignored.
func TestRevocation(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	crl := filepath.Join(c.Dir, "revoked.crl")
	p := &pair{c: c}
	p.a = startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) { cfg.Revocations = crl; cfg.Timers.Open = 500 * time.Millisecond })
	p.b = startAgent(t, c.Nodes["node-b"], nil)
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	ch := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	ch.WriteMessage([]byte("before"))
	if m, err := ch.ReadMessage(); err != nil || string(m) != "before" {
		t.Fatalf("%q %v", m, err)
	}

	// A list from another CA naming node-b changes nothing.
	other := t.TempDir()
	if _, err := cert.InitCA(other, "rogue", time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Revoke(other, crl, []string{"node-b"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	p.a.log.waitFor(t, 2*time.Second, "revocation list ignored", "unknown CA")
	if p.a.link("node-b") == nil {
		t.Fatal("a forged revocation list cut the link")
	}
	os.Remove(crl)

	start := time.Now()
	if _, err := cert.Revoke(c.CADir, crl, []string{"node-b"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	ch.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = ch.ReadMessage()
	took := time.Since(start)
	if !errors.Is(err, sinc.ErrReset) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("the channel after node-b's revocation: %v", err)
	}
	if took > time.Second {
		t.Fatalf("the channel ended %s after the list was written, more than 1s", took)
	}
	p.a.log.waitFor(t, 2*time.Second, "closing the link of a revoked peer", "peer=node-b")
	// node-b keeps trying; node-a refuses it.
	p.a.log.waitFor(t, 5*time.Second, "peer handshake failed", "certificate revoked")
	if p.a.link("node-b") != nil {
		t.Fatal("a revoked peer linked again")
	}
	if _, err := p.dial(t, "node-a", "web", "node-b/db/echo", sinc.Stream); !errors.Is(err, sinc.ErrUnreachable) {
		t.Fatalf("a dial to a revoked node: %v", err)
	}
	t.Logf("the channel ended %s after the revocation list was written", took)
}
