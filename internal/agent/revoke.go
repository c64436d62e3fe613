package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/link"
)

// The agent follows the CA's revocation list named in its config: it reads
// it at start, on SIGHUP and whenever the file changes (checked every
// revocationPoll), and at once closes every link whose peer certificate is
// on it — ending that peer's channels, telling their processes why — and
// refuses such certificates in every handshake after. A list that does not
// verify with the cluster CA is ignored, and the one in force stays.

// revocationPoll is how often the list's file is checked for a change.
const revocationPoll = 200 * time.Millisecond

// ErrRevoked is the reason a revoked certificate is refused.
var ErrRevoked = errors.New("certificate revoked by the cluster CA")

// checkRevoked is the links' certificate check.
func (a *Agent) checkRevoked(c *cert.Certificate) error {
	if a.revoked.Load().Revoked(c) {
		return fmt.Errorf("node %q: %w", c.Name, ErrRevoked)
	}
	return nil
}

// loadRevocations reads the list and, if it verifies, puts it in force.
func (a *Agent) loadRevocations() error {
	if a.cfg.Revocations == "" {
		return nil
	}
	r, err := cert.LoadRevocations(a.cfg.Revocations, a.linkConfig().Verifier)
	if errors.Is(err, os.ErrNotExist) {
		return nil // nothing revoked yet
	}
	if err != nil {
		a.log.Error("revocation list ignored; the list in force stays", "path", a.cfg.Revocations, "err", err)
		return err
	}
	if old := a.revoked.Load(); old == nil || !old.Issued.Equal(r.Issued) || old.Len() != r.Len() {
		a.log.Info("revocation list loaded", "path", a.cfg.Revocations, "entries", r.Len(), "issued", r.Issued)
	}
	a.revoked.Store(r)
	a.applyRevocations()
	return nil
}

// applyRevocations closes the links of revoked peers and ends their
// channels.
func (a *Agent) applyRevocations() {
	r := a.revoked.Load()
	a.mu.Lock()
	var hit []*peer
	var links []*link.Link
	for _, p := range a.peers {
		if p.link != nil && r.Revoked(p.link.Peer()) {
			hit = append(hit, p)
			links = append(links, p.link)
		}
	}
	a.mu.Unlock()
	for i, p := range hit {
		reason := fmt.Sprintf("the certificate of %s was revoked by the cluster CA", p.name)
		a.log.Warn("closing the link of a revoked peer", "peer", p.name, "fingerprint", links[i].Peer().Fingerprint())
		a.abortPeer(p, reason)
		links[i].Shutdown(reason)
	}
}

// watchRevocations reloads the list when its file changes.
func (a *Agent) watchRevocations(ctx context.Context) {
	if a.cfg.Revocations == "" {
		return
	}
	var last os.FileInfo
	t := time.NewTicker(revocationPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := os.Stat(a.cfg.Revocations)
		if err != nil {
			continue
		}
		if last != nil && st.ModTime().Equal(last.ModTime()) && st.Size() == last.Size() && os.SameFile(st, last) {
			continue
		}
		last = st
		a.loadRevocations()
	}
}
