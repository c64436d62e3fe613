package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/link"
)

// Certificate lifecycle. The agent reloads its certificate and key on
// SIGHUP and when either file changes, without touching its links or
// channels: new handshakes (every link rekey, every new link) present the
// new certificate, so peers check it at the next rekey. It warns — in its
// log and in the peer table — when its own or a peer's certificate nears
// its end (the last quarter of its validity, at most a week), and when a
// peer's certificate expires it closes that link with the reason; its own
// expiring closes all of them.

// linkConfig returns the identity new handshakes present.
func (a *Agent) linkConfig() *link.Config { return a.ident.Load() }

// reloadIdentity loads the certificate and key files again and, if they
// are good, makes them the identity of new handshakes.
func (a *Agent) reloadIdentity() error {
	cur := a.linkConfig()
	now := time.Now()
	c, err := cert.LoadCertificate(a.cfg.Cert)
	if err != nil {
		return err
	}
	if c.Fingerprint() == cur.Cert.Fingerprint() {
		return nil // unchanged
	}
	if err := cur.Verifier.Verify(c, now); err != nil {
		return fmt.Errorf("cert %s: %w", a.cfg.Cert, err)
	}
	if c.Name != a.cfg.Node {
		return fmt.Errorf("cert %s is for node %q, not %q", a.cfg.Cert, c.Name, a.cfg.Node)
	}
	for p := range a.cfg.Partitions {
		if !c.HasPartition(p) {
			return fmt.Errorf("cert %s does not list partition %q", a.cfg.Cert, p)
		}
	}
	// The new key goes from its file straight into a slot of its own.
	slot, err := a.arena.Alloc()
	if err != nil {
		return fmt.Errorf("no protected memory for the new key: %w", err)
	}
	pub, err := loadNodeKey(a.cfg.Key, a.cfg.Cert, c, slot)
	if err != nil {
		a.arena.Free(slot)
		return err
	}
	tellKey("node", slot[:32])
	if a.etcd != nil {
		// The record names the new certificate before handshakes present
		// it, and a peer whose view lags reads the record again
		// (checkRecord). If the registry does not answer in time, the
		// record follows when it does; until then peers refuse the new
		// certificate and dials are tried again.
		ctx, cancel := context.WithTimeout(context.Background(), 2*a.cfg.Registry.RequestTimeout)
		err := a.etcd.SetSelf(ctx, a.selfRecord(c))
		cancel()
		if err != nil {
			a.log.Warn("the registry record does not name the renewed certificate yet; using it anyway", "err", err)
		}
	}
	next := *cur
	next.Private, next.Public, next.Cert = slot[:32], pub, c
	a.ident.Store(&next)
	// Handshakes under way may still use the old key: drop it after them.
	old := a.identSlot
	a.identSlot = slot
	time.AfterFunc(2*a.cfg.Timers.Handshake, func() { a.arena.Free(old) })
	a.log.Info("certificate renewed", "fingerprint", c.Fingerprint(), "expires", c.NotAfter)
	return nil
}

// expiryWarning says whether c is near its end, and how near.
func expiryWarning(c *cert.Certificate, now time.Time) string {
	left := c.NotAfter.Sub(now)
	window := min(c.NotAfter.Sub(c.NotBefore)/4, 7*24*time.Hour)
	if left > window {
		return ""
	}
	if left <= 0 {
		return "expired at " + c.NotAfter.Format(time.RFC3339)
	}
	return fmt.Sprintf("expires in %s", left.Round(time.Second))
}

// watchLifecycle reloads the identity when its files change, warns of
// certificates near their end, and closes links whose certificates have
// expired.
func (a *Agent) watchLifecycle(ctx context.Context) {
	t := time.NewTicker(lifecyclePoll)
	defer t.Stop()
	modTimes := func() (mt [2]time.Time) {
		for i, p := range []string{a.cfg.Cert, a.cfg.Key} {
			if st, err := os.Stat(p); err == nil {
				mt[i] = st.ModTime()
			}
		}
		return mt
	}
	// The files as they were at start: a renewal before the first tick is
	// a change too.
	last := modTimes()
	warned := map[cert.Fingerprint]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if mt := modTimes(); mt != last {
			if err := a.reloadIdentity(); err != nil {
				a.log.Error("certificate reload failed; keeping the one in force", "err", err)
			}
			last = mt
		}
		now := time.Now()
		own := a.linkConfig().Cert
		if w := expiryWarning(own, now); w != "" && !warned[own.Fingerprint()] {
			warned[own.Fingerprint()] = true
			a.log.Warn("this node's certificate "+w, "expires", own.NotAfter)
		}
		ownExpired := !now.Before(own.NotAfter)
		a.mu.Lock()
		var expired []*peer
		for _, p := range a.peers {
			l := p.link
			if l == nil {
				continue
			}
			pc := l.Peer()
			if w := expiryWarning(pc, now); w != "" && !warned[pc.Fingerprint()] {
				warned[pc.Fingerprint()] = true
				a.log.Warn("peer certificate "+w, "peer", p.name, "expires", pc.NotAfter)
			}
			if ownExpired || !now.Before(pc.NotAfter) {
				expired = append(expired, p)
			}
		}
		a.mu.Unlock()
		for _, p := range expired {
			reason := fmt.Sprintf("the certificate of %s expired", p.name)
			if ownExpired {
				reason = fmt.Sprintf("the certificate of %s expired", a.cfg.Node)
			}
			a.mu.Lock()
			l := p.link
			a.mu.Unlock()
			if l != nil {
				a.log.Warn("closing a link: certificate expired", "peer", p.name, "reason", reason)
				a.abortPeer(p, reason)
				l.Shutdown(reason)
			}
		}
	}
}

// lifecyclePoll is how often certificates and their files are checked.
const lifecyclePoll = 250 * time.Millisecond
