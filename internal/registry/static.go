package registry

import (
	"context"
	"sync"

	"sinc.dev/sinc/internal/config"
)

// Static is the registry of a cluster written by hand: the config file's
// [peers]. It knows addresses only (no instance, no fingerprint: the
// handshake checks the certificate against the CA, as it always has), and
// links are eager. The revocation list's file and the [[allow]] rules are
// the agent's to follow (internal/agent: revoke.go, reload.go), exactly as
// before there was a registry: Run delivers nothing.
type Static struct {
	mu    sync.Mutex
	nodes map[string]Node
}

// NewStatic returns the registry of the configured peers.
func NewStatic(peers map[string]config.Peer) *Static {
	s := &Static{}
	s.Set(peers)
	return s
}

// Set replaces the nodes with peers (the config was reloaded).
func (s *Static) Set(peers map[string]config.Peer) {
	nodes := make(map[string]Node, len(peers))
	for name, p := range peers {
		nodes[name] = Node{Name: name, Addresses: []string{p.Address}}
	}
	s.mu.Lock()
	s.nodes = nodes
	s.mu.Unlock()
}

// Run returns when ctx is done: the agent follows the file itself.
func (s *Static) Run(ctx context.Context, _ Sink) { <-ctx.Done() }

func (s *Static) Lookup(name string) (Node, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nodes[name]
	return n, ok
}

func (s *Static) Nodes() []Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Node, 0, len(s.nodes))
	for _, n := range s.nodes {
		out = append(out, n)
	}
	return out
}

// Refresh is Lookup: the file was read when the config was.
func (s *Static) Refresh(_ context.Context, name string) (Node, bool, error) {
	n, ok := s.Lookup(name)
	return n, ok, nil
}

func (s *Static) Certificate(context.Context, string) ([]byte, error) {
	return nil, ErrNoCertificates
}

func (s *Static) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Status{Backend: "static", Connected: true, Nodes: len(s.nodes)}
}

func (s *Static) OnDemand() bool { return false }
