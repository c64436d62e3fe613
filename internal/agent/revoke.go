package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/link"
)

// The agent follows the CA's revocation list named in its config (or, with
// a registry, the one in the registry: registry.go): it reads
// it at start, on SIGHUP and whenever the file changes (checked every
// revocationPoll), and at once closes every link whose peer certificate is
// on it — ending that peer's channels, telling their processes why — and
// refuses such certificates in every handshake after. A list that does not
// verify with the cluster CA is ignored, and the one in force stays.
//
// A revocation is never undone by an older list. Each list carries a
// serial (cert.Revocations); the agent keeps the newest list it has
// verified in force, and a copy of it in its state folder (config
// state_dir), so a restart does not forget it:
//
//	at start   the stored copy is put in force, then the configured file
//	           replaces it if newer; a missing file leaves it in force
//	on change  (SIGHUP, or the file changed) the file replaces the list in
//	           force if newer, and the copy is rewritten (atomically)
//	older      refused, with a log line naming both serials; the list in
//	           force stays
//	same       serial and the same bytes: nothing to do; other bytes under
//	           the serial in force: refused, logged as suspicious
//
// So putting back an old file — while the agent runs, or while it is
// stopped — never re-admits a node revoked since. The state folder is made
// 0700 if missing; one that is not the agent's own, or that group or
// others may write (they could put back an old copy), stops the start.

// revocationPoll is how often the list's file is checked for a change.
const revocationPoll = 200 * time.Millisecond

// ErrRevoked is the reason a revoked certificate is refused.
var ErrRevoked = errors.New("certificate revoked by the cluster CA")

// revocationState is what the agent knows of lists beside the one in force
// (Agent.revoked). Its lock serializes loads: the watcher's and SIGHUP's.
type revocationState struct {
	mu       sync.Mutex
	restored bool        // the stored copy was read (at the first load)
	seen     os.FileInfo // the configured file as last read; nil if none
}

// storedRevocations is the copy's file in the state folder; named for the
// node, so agents that share a folder do not share a copy.
func (a *Agent) storedRevocations() string {
	return filepath.Join(a.cfg.StateDir, a.cfg.Node+".revoked.crl")
}

// checkRevoked is the links' certificate check.
func (a *Agent) checkRevoked(c *cert.Certificate) error {
	if a.revoked.Load().Revoked(c) {
		return fmt.Errorf("node %q: %w", c.Name, ErrRevoked)
	}
	return nil
}

// loadRevocations reads the configured list and puts it in force if it
// verifies and is newer than the list in force. It returns an error only
// for what stops the agent from starting: a list that does not verify, a
// bad state folder or stored copy. A refused older list is logged, not
// returned: the agent runs on with the newer list.
func (a *Agent) loadRevocations() error {
	if a.cfg.Revocations == "" && a.cfg.Registry == nil {
		return nil
	}
	s := &a.rev
	s.mu.Lock()
	defer s.mu.Unlock()
	v := a.linkConfig().Verifier
	if !s.restored {
		if err := a.restoreRevocations(v); err != nil {
			return err
		}
		s.restored = true
	}
	path := a.cfg.Revocations
	if path == "" {
		return nil // the registry's list comes through registrySink
	}
	if st, err := os.Stat(path); err == nil {
		s.seen = st // before reading: a change after this is seen again
	}
	r, err := cert.LoadRevocations(path, v)
	if errors.Is(err, os.ErrNotExist) {
		return nil // nothing revoked yet, or only what the stored copy holds
	}
	if err != nil {
		a.log.Error("revocation list ignored; the list in force stays", "path", path, "err", err)
		return err
	}
	a.putRevocations(r, path)
	return nil
}

// putRevocations puts r, a list that verified, in force if it is newer
// than the list in force (newerDoc), stores a copy in the state folder
// and applies it. source names where r came from (a file's path, an etcd
// key). Every source — the configured file, the registry — goes through
// here, so none can take a list back. Called with a.rev.mu held.
func (a *Agent) putRevocations(r *cert.Revocations, source string) {
	in := a.revoked.Load()
	c, err := r.Compare(in)
	var was docVersion
	if in != nil {
		was = docVersion{in.Serial, in.Issued}
	}
	if !a.newerDoc("revocation list", source, c, err, docVersion{r.Serial, r.Issued}, was) {
		return
	}
	a.revoked.Store(r)
	if err := r.WriteFile(a.storedRevocations(), 0o600); err != nil {
		// The list is in force; only a restart with an older file in
		// place could forget it.
		a.log.Error("could not store the revocation list in the state folder", "path", a.storedRevocations(), "err", err)
	}
	a.log.Info("revocation list loaded", "source", source, "serial", r.Serial, "entries", r.Len(), "issued", r.Issued)
	a.applyRevocations()
}

// restoreRevocations checks the state folder and puts the stored copy, if
// any, in force.
func (a *Agent) restoreRevocations(v *cert.Verifier) error {
	if err := checkStateDir(a.cfg.StateDir); err != nil {
		return fmt.Errorf("state_dir: %w", err)
	}
	path := a.storedRevocations()
	r, err := cert.LoadRevocations(path, v)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("the stored copy of the newest revocation list seen: %w (if the cluster CA was replaced, remove the copy)", err)
	}
	a.revoked.Store(r)
	a.log.Info("revocation list restored from the state folder", "path", path, "serial", r.Serial, "entries", r.Len(), "issued", r.Issued)
	return nil
}

// checkStateDir makes dir (0700) if missing, and checks that it is a
// folder, not a symlink, of the agent's user that no one else may write.
func checkStateDir(dir string) error {
	if dir == "" {
		return errors.New("not set: a folder for the agent's state")
	}
	st, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		if err := os.Chmod(dir, 0o700); err != nil { // whatever the umask made of it
			return err
		}
		st, err = os.Lstat(dir)
	}
	if err != nil {
		return err
	}
	if st.Mode().Type() == os.ModeSymlink {
		return fmt.Errorf("%s is a symbolic link: give the folder itself", dir)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
		return fmt.Errorf("directory %s belongs to uid %d, not the agent's uid %d", dir, sys.Uid, os.Geteuid())
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("directory %s has mode %04o: it must not be writable by group or others", dir, uint32(st.Mode().Perm()))
	}
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
		a.rev.mu.Lock()
		last := a.rev.seen
		a.rev.mu.Unlock()
		if last != nil && st.ModTime().Equal(last.ModTime()) && st.Size() == last.Size() && os.SameFile(st, last) {
			continue
		}
		a.loadRevocations()
	}
}
