package agent

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
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

// putFile replaces path with data whole (a new file renamed over it), as a
// deployment tool or an attacker putting back a saved file would.
func putFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// refusedRevoked counts node-a's handshakes refused for a revoked peer.
func refusedRevoked(a *testAgent) int {
	n := 0
	for _, line := range strings.Split(a.log.String(), "\n") {
		if strings.Contains(line, "peer handshake failed") && strings.Contains(line, "certificate revoked") {
			n++
		}
	}
	return n
}

// revokedWatch is how long a test watches node-b stay out: node-b retries
// every 200ms at most (fastTimers), and a list put in force is read within
// revocationPoll, so without the defence node-b is back well within it.
const revokedWatch = 700 * time.Millisecond

// staysRevoked checks for d that node-a does not link with node-b, and
// that node-b tried meanwhile (node-a refused it at least once): a link
// kept down by anything else than the revocation proves nothing.
func staysRevoked(t *testing.T, a *testAgent, d time.Duration) {
	t.Helper()
	before := refusedRevoked(a)
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if a.link("node-b") != nil {
			t.Fatalf("node-a linked with the revoked node-b again; log:\n%s", a.log)
		}
	}
	if refusedRevoked(a) == before {
		t.Fatalf("node-b did not try to link within %s: the test proves nothing; log:\n%s", d, a.log)
	}
}

// TestRevocationCannotBeRolledBack: list 1 revokes node-x, list 2 also
// node-b. Putting list 1 back — while node-a runs, or while it is stopped
// — does not re-admit node-b, and neither does another list signed under
// serial 2 that leaves node-b out; each refusal names both serials.
func TestRevocationCannotBeRolledBack(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	crl := filepath.Join(c.Dir, "revoked.crl")
	if _, err := cert.Revoke(c.CADir, crl, []string{"node-x"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	list1, err := os.ReadFile(crl)
	if err != nil {
		t.Fatal(err)
	}
	withList := func(cfg *config.Config) { cfg.Revocations = crl }
	a := startAgent(t, c.Nodes["node-a"], withList)
	startAgent(t, c.Nodes["node-b"], nil)
	waitUp(t, a, "node-b")

	r2, err := cert.Revoke(c.CADir, crl, []string{"node-b"}, nil, time.Now())
	if err != nil || r2.Serial != 2 {
		t.Fatalf("list 2: serial %d, %v", r2.Serial, err)
	}
	list2, _ := os.ReadFile(crl)
	eventually(t, 2*time.Second, "node-b's link closed", func() bool { return a.link("node-b") == nil })
	staysRevoked(t, a, revokedWatch)

	// Live: list 1 put back while node-a runs.
	putFile(t, crl, list1)
	staysRevoked(t, a, revokedWatch)
	a.log.waitFor(t, 2*time.Second, "revocation list refused: older", " serial=1 ", "in_force_serial=2")
	if got := a.revoked.Load().Serial; got != 2 {
		t.Fatalf("list in force has serial %d after list 1 was put back, want 2", got)
	}
	// And on SIGHUP.
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(a.log.String(), "revocation list refused: older"); n < 2 {
		t.Fatalf("SIGHUP with list 1 in place: %d refusals logged, want 2", n)
	}

	// Another list under serial 2 that leaves node-b out: from a copy of
	// the CA folder's list 1, as a second CA operator would make it.
	fork := filepath.Join(t.TempDir(), "fork.crl")
	putFile(t, fork, list1)
	if r, err := cert.Revoke(c.CADir, fork, []string{"node-y"}, nil, time.Now()); err != nil || r.Serial != 2 {
		t.Fatalf("forked list: serial %d, %v", r.Serial, err)
	}
	forked, _ := os.ReadFile(fork)
	putFile(t, crl, forked)
	staysRevoked(t, a, revokedWatch)
	a.log.waitFor(t, 2*time.Second, "revocation list refused: other content under the serial in force", " serial=2 ", "in_force_serial=2")

	// Across a restart: node-a stopped, list 1 put in place, node-a
	// started again: its stored copy of list 2 wins.
	a.stop(t)
	putFile(t, crl, list1)
	a = startAgent(t, c.Nodes["node-a"], withList)
	staysRevoked(t, a, revokedWatch)
	a.log.waitFor(t, time.Second, "revocation list restored from the state folder", " serial=2 ")
	a.log.waitFor(t, time.Second, "revocation list refused: older", " serial=1 ", "in_force_serial=2")

	// A newer list still goes in force, and is the stored copy now.
	putFile(t, crl, list2)
	if _, err := cert.Revoke(c.CADir, crl, []string{"node-z"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	a.log.waitFor(t, 2*time.Second, "revocation list loaded", " serial=3 ")
	stored, err := cert.LoadRevocations(a.storedRevocations(), a.linkConfig().Verifier)
	if err != nil {
		t.Fatal(err)
	}
	if stored.Serial != 3 || !slices.Equal(stored.Nodes, []string{"node-x", "node-b", "node-z"}) {
		t.Fatalf("stored copy: serial %d, nodes %v; want 3, [node-x node-b node-z]", stored.Serial, stored.Nodes)
	}
	staysRevoked(t, a, revokedWatch)
}

// TestRevocationStateDir: the state folder (by default "state" beside the
// config) is made 0700; one that others could write to, or that is not the
// agent's own folder, stops the agent with an error naming it and why, as
// does a stored copy that does not verify. With the list's file gone, the
// stored copy still keeps node-b revoked.
func TestRevocationStateDir(t *testing.T) {
	c := testCluster(t, "node-a", "node-b")
	crl := filepath.Join(c.Dir, "revoked.crl")
	node := c.Nodes["node-a"]
	newAgent := func(stateDir string) (*Agent, error) {
		t.Helper()
		cfg, err := config.Load(node.Config)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Revocations = crl
		if stateDir != "" {
			cfg.StateDir = stateDir
		}
		a, err := New(cfg, slog.New(slog.DiscardHandler))
		if err == nil {
			a.arena.Close()
		}
		return a, err
	}
	state := filepath.Join(node.Dir, "state")
	if _, err := newAgent(""); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(state); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("default state folder %s: %v, %v; want a folder of mode 0700", state, st, err)
	}

	// The list in force outlives its file.
	if _, err := cert.Revoke(c.CADir, crl, []string{"node-b"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := newAgent(""); err != nil {
		t.Fatal(err)
	}
	os.Remove(crl)
	a, err := newAgent("")
	if err != nil {
		t.Fatal(err)
	}
	certB, _ := cert.NodeFiles(c.Nodes["node-b"].Dir, "node-b")
	b, err := cert.LoadCertificate(certB)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.checkRevoked(b); !errors.Is(err, ErrRevoked) {
		t.Fatalf("node-b with the list's file removed: %v, want it revoked by the stored copy", err)
	}

	// Bad state folders.
	loose := filepath.Join(c.Dir, "loose")
	os.Mkdir(loose, 0o700)
	os.Chmod(loose, 0o770)
	file := filepath.Join(c.Dir, "file")
	os.WriteFile(file, nil, 0o600)
	link := filepath.Join(c.Dir, "link")
	os.Symlink(state, link)
	cases := []struct{ dir, want string }{
		{loose, "has mode 0770: it must not be writable by group or others"},
		{file, "is not a directory"},
		{link, "is a symbolic link"},
	}
	if os.Geteuid() == 0 {
		other := filepath.Join(c.Dir, "other")
		os.Mkdir(other, 0o700)
		if err := os.Chown(other, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		cases = append(cases, struct{ dir, want string }{other, "belongs to uid 65534, not the agent's uid 0"})
	} else {
		t.Log("not root: the folder of another uid is not tried")
	}
	for _, tc := range cases {
		_, err := newAgent(tc.dir)
		if err == nil || !strings.Contains(err.Error(), "state_dir") || !strings.Contains(err.Error(), tc.dir) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("state folder %s: %v; want an error naming state_dir, the folder and %q", tc.dir, err, tc.want)
		}
	}

	// A stored copy that does not verify: another CA's list.
	rogue := t.TempDir()
	if _, err := cert.InitCA(rogue, "rogue", time.Hour, time.Now()); err != nil {
		t.Fatal(err)
	}
	os.Remove(a.storedRevocations())
	if _, err := cert.Revoke(rogue, a.storedRevocations(), []string{"node-c"}, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := newAgent(""); err == nil || !strings.Contains(err.Error(), "stored copy") || !strings.Contains(err.Error(), "unknown CA") {
		t.Fatalf("a stored copy of another CA: %v; want refused", err)
	}
}
