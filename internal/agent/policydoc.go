package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/policy"
)

// The cluster policy, with a registry. It comes from the registry as a
// CA-signed document (cert.Policy: the [[allow]] rules' text, a serial),
// goes through the same order as the revocation list (newerDoc), is kept
// in the state folder (<node>.policy) and restored from it at start, and
// is combined with the partitions' listen rules from the config file. A
// new policy is checked against every open channel at once: a channel it
// denies ends, code denied, both processes told (enforcePolicy), as a
// reloaded [[allow]] does in static mode.
//
// Until a policy document has been seen — in the registry or in the state
// folder — the policy allows nothing across partitions.

// policyState is the registry's policy in force and the file's listen
// rules it is combined with. Its lock serializes changes of either.
type policyState struct {
	mu     sync.Mutex
	doc    *cert.Policy   // in force; nil: none seen yet
	rules  *policy.Policy // doc's rules; nil: none, which allows nothing across partitions
	listen []policy.ListenRule
}

// storedPolicy is the copy's file in the state folder.
func (a *Agent) storedPolicy() string {
	return filepath.Join(a.cfg.StateDir, a.cfg.Node+".policy")
}

// takePolicyDoc applies a cluster policy document from the registry if it
// verifies, its rules parse, and it is newer than the one in force.
func (a *Agent) takePolicyDoc(data []byte, source string) {
	doc, rules, err := a.parsePolicyDoc(data, source)
	if err != nil {
		a.counters.refuse("registry_policy")
		a.log.Error("cluster policy from the registry refused; the policy in force stays", "source", source, "err", err)
		return
	}
	a.pol.mu.Lock()
	defer a.pol.mu.Unlock()
	a.putPolicy(doc, rules, source)
}

// parsePolicyDoc verifies a policy document with the CA and parses its
// rules.
func (a *Agent) parsePolicyDoc(data []byte, source string) (*cert.Policy, *policy.Policy, error) {
	doc, err := cert.ParsePolicy(data, a.linkConfig().Verifier)
	if err != nil {
		return nil, nil, err
	}
	rules, err := config.ParsePolicy(source, doc.Body)
	if err != nil {
		return nil, nil, fmt.Errorf("serial %d signed by the CA: %w", doc.Serial, err)
	}
	return doc, rules, nil
}

// putPolicy puts doc in force if it is newer than the one in force,
// stores a copy and ends the channels it denies. Called with a.pol.mu
// held.
func (a *Agent) putPolicy(doc *cert.Policy, rules *policy.Policy, source string) {
	in := a.pol.doc
	c, err := doc.Compare(in)
	var was docVersion
	if in != nil {
		was = docVersion{in.Serial, in.Issued}
	}
	if !a.newerDoc("cluster policy", source, c, err, docVersion{doc.Serial, doc.Issued}, was) {
		return
	}
	a.pol.doc, a.pol.rules = doc, rules
	if err := doc.WriteFile(a.storedPolicy(), 0o600); err != nil {
		a.log.Error("could not store the cluster policy in the state folder", "path", a.storedPolicy(), "err", err)
	}
	a.log.Info("cluster policy in force", "source", source, "serial", doc.Serial, "rules", rules.Len(), "issued", doc.Issued)
	a.installPolicy()
}

// restorePolicy puts the stored copy of the newest policy seen in force,
// if there is one. The state folder was checked (restoreRevocations).
func (a *Agent) restorePolicy() error {
	path := a.storedPolicy()
	doc, err := cert.LoadPolicy(path, a.linkConfig().Verifier)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	var rules *policy.Policy
	if err == nil {
		rules, err = config.ParsePolicy(path, doc.Body)
	}
	if err != nil {
		return fmt.Errorf("the stored copy of the newest cluster policy seen, %s: %w (if the cluster CA was replaced, remove the copy)", path, err)
	}
	a.pol.mu.Lock()
	defer a.pol.mu.Unlock()
	a.pol.doc, a.pol.rules = doc, rules
	a.installPolicy()
	a.log.Info("cluster policy restored from the state folder", "path", path, "serial", doc.Serial, "rules", rules.Len())
	return nil
}

// setListenRules makes listen the partitions' listen rules (a reload).
func (a *Agent) setListenRules(listen []policy.ListenRule) {
	a.pol.mu.Lock()
	defer a.pol.mu.Unlock()
	a.pol.listen = listen
	a.installPolicy()
}

// installPolicy puts the registry's rules with the listen rules in force,
// and ends the channels they deny. Called with a.pol.mu held.
func (a *Agent) installPolicy() {
	rules := a.pol.rules
	if rules == nil {
		rules, _ = policy.New(nil)
	}
	p, err := rules.WithListenRules(a.pol.listen)
	if err != nil { // checked when the config was read
		a.log.Error("listen rules refused; the policy in force stays", "err", err)
		return
	}
	a.policy.Store(p)
	a.enforcePolicy()
}
