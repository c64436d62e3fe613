// Package registry is where an agent learns its cluster (docs/design.md,
// section 12): the other nodes — their addresses, the fingerprint of their
// certificate, the instance of their agent — the CA's revocation list and
// the cluster policy, and how changes to them arrive.
//
// Two backends implement Registry:
//
//   - Static: the agent's config file is the cluster. Its [peers] are the
//     nodes; the agent itself follows the revocation list's file and takes
//     [[allow]] on reload, as it always has, and links to every peer at
//     start (eager links, for small clusters).
//   - Etcd: each agent publishes its own record under a lease it keeps
//     alive, and watches everyone else's; the revocation list and the
//     policy are CA-signed documents the agent reads and watches. Links are
//     made on demand (OnDemand).
//
// The registry is trusted for availability, never for authenticity: a
// record says where a node may be reached and which certificate it
// claims, and the agent checks that certificate against the CA before it
// dials, and the Noise handshake checks it again. Documents reach the
// agent as the bytes stored; the agent verifies their signature and
// serial (internal/agent). What a poisoned registry can do is make nodes
// unreachable; it cannot make an agent accept an identity the CA did not
// sign.
package registry

import (
	"context"
	"errors"
	"time"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/link"
)

// Node is one node as the registry records it: what an agent needs to link
// to it, and nothing more. An agent keeps one per known node, linked or
// not, so it stays small (a few hundred bytes: see TestNodeMemory).
type Node struct {
	Name      string
	Addresses []string // host:port, in the order to try
	// Instance is the id of the node's running agent (link.InstanceSize
	// bytes); zero when the backend does not know it (Static).
	Instance [link.InstanceSize]byte
	// Fingerprint is that of the certificate the node's agent presents;
	// zero when the backend does not know it (Static).
	Fingerprint cert.Fingerprint
}

// Registry is an agent's view of its cluster.
//
// Methods other than Run are safe for concurrent use and do not wait on
// the network, except Refresh and Certificate, which wait at most the
// backend's request timeout (or ctx).
type Registry interface {
	// Run keeps the view current, telling s of each change, until ctx
	// is done. It returns when everything it started has stopped.
	Run(ctx context.Context, s Sink)
	// Lookup returns the node's record as last seen.
	Lookup(name string) (Node, bool)
	// Nodes returns every record in the view, in no order.
	Nodes() []Node
	// Refresh reads one node's record from the store now, past the
	// view, and puts what it read in the view (telling no Sink).
	Refresh(ctx context.Context, name string) (Node, bool, error)
	// Certificate returns the node's certificate as the store holds it
	// (PEM): unchecked, the caller checks it.
	Certificate(ctx context.Context, name string) ([]byte, error)
	// Status says how the backend is doing.
	Status() Status
	// OnDemand reports whether links are made when a channel needs one
	// (and closed when idle) rather than to every node at start.
	OnDemand() bool
}

// Sink receives a registry's changes. Its methods are called from one
// goroutine at a time (per kind) and should not block for long.
type Sink interface {
	// NodeChanged says a node's record appeared or changed.
	NodeChanged(n Node)
	// NodeGone says a node's record is gone (its lease expired, or it
	// was deleted), or was replaced by one that does not parse.
	NodeGone(name string)
	// Revocations hands over the revocation list as stored (PEM), at
	// start and each time it changes (a backend may hand over the same
	// list again): the agent verifies it and keeps the newest.
	Revocations(data []byte, source string)
	// Policy hands over the cluster policy document as stored, at start
	// and each time it changes.
	Policy(data []byte, source string)
}

// Status is a backend's state, as `sinc nodes` shows it.
type Status struct {
	Backend   string    `json:"backend"` // "static" or "etcd"
	Endpoints []string  `json:"endpoints,omitempty"`
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"` // when Connected last changed
	LastError string    `json:"last_error,omitempty"`
	// Of this agent's own record (etcd).
	Published  bool      `json:"published,omitempty"` // the record is in the store, under a live lease
	LeaseID    int64     `json:"lease_id,omitempty"`
	LeaseTTL   int64     `json:"lease_ttl,omitempty"` // seconds
	PutAt      time.Time `json:"put_at,omitzero"`     // the record's last put
	Regrants   uint64    `json:"regrants,omitempty"`  // leases granted again after one was lost
	Refused    uint64    `json:"refused,omitempty"`   // records that did not parse
	Relists    uint64    `json:"relists,omitempty"`   // full reads of the nodes, past the first
	Nodes      int       `json:"nodes"`
	Revision   int64     `json:"revision,omitempty"` // of the store, as last seen
	DocsReadAt time.Time `json:"docs_read_at,omitzero"`
}

// ErrUnreachable is wrapped by the errors of requests that found no etcd
// to answer them (after their retries): the registry was not asked, as
// opposed to answering that something is missing or wrong.
var ErrUnreachable = errors.New("registry unreachable")

// ErrNoCertificate is Certificate's error for a node the registry holds
// no certificate of.
var ErrNoCertificate = errors.New("no certificate in the registry")

// ErrNoCertificates is Certificate's error for a backend that stores no
// certificates (Static).
var ErrNoCertificates = errors.New("this registry stores no certificates")
