package agent

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"time"

	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/policy"
	"sinc.dev/sinc/internal/registry"
	"sinc.dev/sinc/internal/wire"
)

// Reload. On SIGHUP (Reload) and when the config file changes (checked
// every lifecyclePoll, as the certificate files are), the agent rereads its
// config and takes, without a restart:
//
//   - the policy, which every open channel is checked against again: a
//     channel the new policy denies ends at once, code denied, both
//     processes told;
//   - the peers: new peers link, removed peers' channels and links end
//     with a reason both processes see, a changed address is used from the
//     next dial on;
//   - the certificate, key and revocation list (renew.go, revoke.go).
//
// With a registry, the peers, the revocation list and the policy are the
// registry's (registry.go); a reload takes the partitions' listen rules,
// combined with the registry's policy, and the certificate, which is
// published again. Adding or removing [registry] needs a restart.
//
// A file that does not load keeps everything in force and says why in the
// log. Other changes (timers, limits, partitions, addresses of this agent)
// need a restart, and the log says so.

// Reload rereads the config file and takes what it can of it.
func (a *Agent) Reload() error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	cfg, err := config.Load(a.cfg.Path)
	if err != nil {
		a.log.Error("reload failed; keeping the policy in force", "err", err)
		return err
	}
	if cfg.Node != a.cfg.Node {
		err := fmt.Errorf("config %s: node is %q, but this agent is %q: a new node needs a new agent", a.cfg.Path, cfg.Node, a.cfg.Node)
		a.log.Error("reload failed; keeping the policy in force", "err", err)
		return err
	}
	if (cfg.Registry == nil) != (a.cfg.Registry == nil) {
		err := fmt.Errorf("config %s: [registry] was added or removed: the agent needs a restart to change where its cluster comes from", a.cfg.Path)
		a.log.Error("reload failed; keeping the policy in force", "err", err)
		return err
	}
	if a.cfg.Registry != nil {
		// The policy is the registry's; only the partitions' listen
		// rules come from the file.
		a.setListenRules(cfg.ListenRules)
	} else {
		a.policy.Store(cfg.Policy)
		a.log.Info("policy reloaded", "rules", cfg.Policy.Len())
		a.enforcePolicy()
		a.reloadPeers(cfg.Peers)
		a.reg.(*registry.Static).Set(cfg.Peers)
	}
	if fields := restartOnly(a.cfg, cfg); len(fields) > 0 {
		a.log.Warn("config changes that need a restart were not taken", "fields", fields)
	}
	if err := a.reloadIdentity(); err != nil {
		a.log.Error("certificate reload failed; keeping the one in force", "err", err)
		return err
	}
	return a.loadRevocations()
}

// enforcePolicy checks every channel against the policy in force and ends
// those it denies: code denied, by this agent, the peer agent told, so that
// both processes learn it. An open checked under the old policy that
// enters the tables after the sweep is checked again once it is in them
// (dial, accept): one way or the other, no channel the new policy denies
// stays.
func (a *Agent) enforcePolicy() {
	n := 0
	for _, ch := range a.tables.all() {
		if why, ok := a.allows(ch.row()); !ok {
			a.counters.refuse("denied_on_reload")
			ch.end(&local.Error{Code: wire.CodeDenied.String(), Message: why, By: a.cfg.Node}, true)
			n++
		}
	}
	if n > 0 {
		a.log.Info("channels ended: the reloaded policy denies them", "count", n)
	}
}

// allows checks a channel's row against the policy in force, as its open
// was: one this agent dialed as its local process reaching the remote
// service, one it accepted as the remote process reaching the local
// service (a channel between two partitions of this node has a row for
// each end). If it is denied it says why.
func (a *Agent) allows(r local.Conn) (string, bool) {
	src := policy.Source{Node: a.cfg.Node, Partition: r.Partition, UID: r.Process.UID}
	dst := policy.Dest{Node: r.RemoteNode, Partition: r.RemotePartition, Service: r.RemoteService}
	if !r.Dialed {
		src = policy.Source{Node: r.RemoteNode, Partition: r.RemotePartition, UID: r.RemoteProcess.UID}
		dst = policy.Dest{Node: a.cfg.Node, Partition: r.Partition, Service: r.Service}
	}
	if a.policy.Load().Allows(src, dst) {
		return "", true
	}
	return fmt.Sprintf("policy of %s no longer allows %s/%s (uid %d) to reach %s/%s/%s",
		a.cfg.Node, src.Node, src.Partition, src.UID, dst.Node, dst.Partition, dst.Service), false
}

// restartOnly names the settings that differ between the config in force
// and cfg and that only a restart takes.
func restartOnly(cur, cfg *config.Config) []string {
	var fields []string
	for _, f := range []struct {
		name string
		same bool
	}{
		{"cert", cur.Cert == cfg.Cert},
		{"key", cur.Key == cfg.Key},
		{"ca", cur.CA == cfg.CA},
		{"listen", cur.Listen == cfg.Listen},
		{"admin", cur.Admin == cfg.Admin},
		{"revocations", cur.Revocations == cfg.Revocations},
		{"metrics", cur.Metrics == cfg.Metrics},
		{"log_format", cur.LogFormat == cfg.LogFormat},
		{"log_level", cur.LogLevel == cfg.LogLevel},
		{"timers", cur.Timers == cfg.Timers},
		{"limits", cur.Limits == cfg.Limits},
		{"partitions", maps.Equal(cur.Partitions, cfg.Partitions)},
		{"registry", sameRegistry(cur.Registry, cfg.Registry)},
		{"advertise", slices.Equal(cur.Advertise, cfg.Advertise)},
	} {
		if !f.same {
			fields = append(fields, f.name)
		}
	}
	return fields
}

func sameRegistry(a, b *config.Registry) bool {
	if a == nil || b == nil {
		return a == b
	}
	return slices.Equal(a.Etcd, b.Etcd) && a.Prefix == b.Prefix && a.CA == b.CA && a.Cert == b.Cert && a.Key == b.Key &&
		a.DialTimeout == b.DialTimeout && a.RequestTimeout == b.RequestTimeout && a.LeaseTTL == b.LeaseTTL && a.MaxNodes == b.MaxNodes
}

// watchConfig reloads the config when its file changes.
func (a *Agent) watchConfig(ctx context.Context) {
	t := time.NewTicker(lifecyclePoll)
	defer t.Stop()
	last, _ := os.Stat(a.cfg.Path)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := os.Stat(a.cfg.Path)
		if err != nil {
			continue // being replaced, say: the next tick sees the new one
		}
		if last != nil && st.ModTime().Equal(last.ModTime()) && st.Size() == last.Size() && os.SameFile(st, last) {
			continue
		}
		last = st
		a.log.Info("config file changed; reloading", "path", a.cfg.Path)
		a.Reload()
	}
}
