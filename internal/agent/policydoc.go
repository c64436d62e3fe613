package agent

import (
	"sync"

	"sinc.dev/sinc/internal/policy"
)

// policyState is the cluster policy from the registry and the file's
// listen rules it is combined with. Its lock serializes changes of either.
type policyState struct {
	mu     sync.Mutex
	rules  *policy.Policy // the registry's rules in force; nil: none yet, which allows nothing across partitions
	listen []policy.ListenRule
}

// takePolicyDoc applies a cluster policy document from the registry.
func (a *Agent) takePolicyDoc(data []byte, source string) {
	a.log.Warn("cluster policy documents are not read yet", "source", source)
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
