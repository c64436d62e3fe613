package registry

import (
	"errors"
	"sync"
)

// view is a backend's copy of the node records: one Node per known node,
// nothing else — no goroutine, no timer, no connection (a node becomes
// more only when the agent links to it) — and at most max of them (0: no
// bound), so a registry that floods costs a bounded amount of memory.
// Safe for concurrent use.
type view struct {
	mu    sync.RWMutex
	nodes map[string]Node
	max   int
}

func newView() *view { return &view{nodes: map[string]Node{}} }

// errFull is put's error for a new node when the view holds max.
var errFull = errors.New("the view holds registry.max_nodes records: refused")

func (v *view) get(name string) (Node, bool) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	n, ok := v.nodes[name]
	return n, ok
}

// put enters n and reports whether it changed the view; a new node is
// refused (errFull) when the view is full.
func (v *view) put(n Node) (bool, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	old, ok := v.nodes[n.Name]
	if !ok && v.max > 0 && len(v.nodes) >= v.max {
		return false, errFull
	}
	v.nodes[n.Name] = n
	return !ok || !sameNode(old, n), nil
}

// remove takes a node out and reports whether it was in.
func (v *view) remove(name string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	_, ok := v.nodes[name]
	delete(v.nodes, name)
	return ok
}

func (v *view) all() []Node {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]Node, 0, len(v.nodes))
	for _, n := range v.nodes {
		out = append(out, n)
	}
	return out
}

func (v *view) len() int {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return len(v.nodes)
}

// names returns the names in the view.
func (v *view) names() map[string]bool {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make(map[string]bool, len(v.nodes))
	for name := range v.nodes {
		out[name] = true
	}
	return out
}

func sameNode(a, b Node) bool {
	if a.Name != b.Name || a.Instance != b.Instance || a.Fingerprint != b.Fingerprint || len(a.Addresses) != len(b.Addresses) {
		return false
	}
	for i := range a.Addresses {
		if a.Addresses[i] != b.Addresses[i] {
			return false
		}
	}
	return true
}
