package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The etcd backend. Run starts three loops, each on its own goroutine, and
// waits for them:
//
//	publish   grant a lease, put this node's record and certificate under
//	          it, keep it alive; when the keepalive channel closes (an
//	          outage outlasted the TTL: the lease, and the record, are gone)
//	          or the record is found deleted, grant again and put again
//	          (publish.go)
//	nodes     list <prefix>/nodes/ in pages at one revision, then watch
//	          from the next; a compacted watch lists again (nodes.go)
//	documents read the revocation list and the policy, watch both keys,
//	          and read them again every docsEvery anyway (docs.go)
//
// Every request has the backend's own timeout (request_timeout, not the
// client's 7 s of a stalled leader) and is tried again with backoff. When
// etcd cannot be reached, the view stays as it was — the agent's links
// and channels are untouched — and Status says since when and why; the
// log says so once per change (connected, unreachable).
//
// Lock order: Etcd.mu guards the status and self; the view has its own
// lock; neither is held while calling the Sink or the network.
type Etcd struct {
	cli  *clientv3.Client
	cfg  EtcdConfig
	keys Layout
	log  *slog.Logger
	view *view

	mu      sync.Mutex
	self    Self
	selfGen uint64        // counts changes of self
	putGen  uint64        // the selfGen last put
	putDone chan struct{} // closed and replaced at every put
	status  Status
	changed chan struct{} // self changed: put again (cap 1)
	gone    chan struct{} // own record seen deleted (cap 1)
	putRev  int64         // the store's revision of the record's last put
	goneRev int64         // the revision of the last deletion of the record seen

	// docRevs is each document's revision when it was last handed to the
	// Sink: a read again of an unchanged one fetches and hands nothing.
	// Only followDocs's goroutine uses it.
	docRevs map[string]int64

	// abandon, set by tests, makes Run return without revoking the
	// lease: the record stays until its TTL runs out, as after a kill -9.
	abandon bool
}

// EtcdConfig is how the backend uses etcd.
type EtcdConfig struct {
	Prefix         string
	Endpoints      []string      // for Status only: the client has them
	RequestTimeout time.Duration // of each request; a failed one is tried again
	LeaseTTL       time.Duration // the record's lifetime after the last renewal
	// StartJitter delays the first requests by a random time up to it, so
	// that a cluster of agents started at once does not arrive at once.
	StartJitter time.Duration
	// MaxNodes bounds the records kept (0: no bound); more are refused.
	MaxNodes int
	// DocsEvery is how often the documents are read again whatever the
	// watch says (a watch on a rarely written key is the one compaction
	// breaks); 0 means 30 s.
	DocsEvery time.Duration
}

// Self is what this agent publishes: its record (name, advertised
// addresses, instance, fingerprint) and its certificate (PEM).
type Self struct {
	Node    Node
	CertPEM []byte
}

// listPage is how many records one request of a listing returns.
const listPage = 500

// NewEtcd returns the etcd backend on cli. It does nothing until Run.
func NewEtcd(cli *clientv3.Client, cfg EtcdConfig, self Self, log *slog.Logger) (*Etcd, error) {
	if cfg.DocsEvery <= 0 {
		cfg.DocsEvery = 30 * time.Second
	}
	keys, err := NewLayout(cfg.Prefix)
	if err != nil {
		return nil, err
	}
	v := newView()
	v.max = cfg.MaxNodes
	return &Etcd{
		cli: cli, cfg: cfg, keys: keys, log: log.With("registry", "etcd"), view: v,
		self:    self,
		status:  Status{Backend: "etcd", Endpoints: cfg.Endpoints, LeaseTTL: int64(cfg.LeaseTTL / time.Second), Since: time.Now()},
		changed: make(chan struct{}, 1),
		gone:    make(chan struct{}, 1),
		putDone: make(chan struct{}),
		docRevs: map[string]int64{},
	}, nil
}

// SetSelf changes what this agent publishes (its certificate was
// renewed): the record and certificate are put again under the lease. It
// returns once they are, or with ctx's error (they are put later).
func (e *Etcd) SetSelf(ctx context.Context, s Self) error {
	e.mu.Lock()
	e.self = s
	e.selfGen++
	gen := e.selfGen
	e.mu.Unlock()
	poke(e.changed)
	for {
		e.mu.Lock()
		done, wait := e.putGen >= gen, e.putDone
		e.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func poke(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (e *Etcd) Run(ctx context.Context, s Sink) {
	if j := e.cfg.StartJitter; j > 0 {
		select {
		case <-time.After(rand.N(j)):
		case <-ctx.Done():
			return
		}
	}
	var wg sync.WaitGroup
	for _, f := range []func(context.Context, Sink){e.publish, e.followNodes, e.followDocs} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(ctx, s)
		}()
	}
	wg.Wait()
}

func (e *Etcd) Lookup(name string) (Node, bool) { return e.view.get(name) }

func (e *Etcd) Nodes() []Node { return e.view.all() }

func (e *Etcd) OnDemand() bool { return true }

func (e *Etcd) Status() Status {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.status
	s.Nodes = e.view.len()
	return s
}

// Refresh reads the node's record now and puts what it finds in the
// view: a record that lags a renewal seen in a handshake is read again
// before the handshake is refused.
func (e *Etcd) Refresh(ctx context.Context, name string) (Node, bool, error) {
	var resp *clientv3.GetResponse
	err := e.retry(ctx, "read the record of "+name, func(ctx context.Context) (err error) {
		resp, err = e.cli.Get(ctx, e.keys.Node(name))
		return err
	})
	if err != nil {
		return Node{}, false, err
	}
	if len(resp.Kvs) == 0 {
		e.view.remove(name)
		return Node{}, false, nil
	}
	n, err := ParseRecord(name, resp.Kvs[0].Value)
	if err != nil {
		e.refused(name, err)
		return Node{}, false, err
	}
	if _, err := e.view.put(n); err != nil {
		e.refused(name, err)
		return Node{}, false, err
	}
	return n, true, nil
}

// Certificate reads <prefix>/certs/<name>.
func (e *Etcd) Certificate(ctx context.Context, name string) ([]byte, error) {
	var resp *clientv3.GetResponse
	err := e.retry(ctx, "read the certificate of "+name, func(ctx context.Context) (err error) {
		resp, err = e.cli.Get(ctx, e.keys.Cert(name))
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("%w: %s (%s)", ErrNoCertificate, name, e.keys.Cert(name))
	}
	v := resp.Kvs[0].Value
	if len(v) > MaxValueSize {
		return nil, fmt.Errorf("registry's certificate for %s is %d bytes, more than %d", name, len(v), MaxValueSize)
	}
	return v, nil
}

// retry runs op with the request timeout, up to three times with backoff
// between, as long as ctx lasts. Each failure marks the registry
// unreachable; a success marks it reachable.
func (e *Etcd) retry(ctx context.Context, what string, op func(context.Context) error) error {
	var err error
	wait := 100 * time.Millisecond
	timeout := e.cfg.RequestTimeout
	for try := 1; ; try++ {
		rctx, cancel := context.WithTimeout(ctx, timeout)
		err = op(clientv3.WithRequireLeader(rctx))
		cancel()
		if err == nil {
			e.reachable()
			return nil
		}
		if try == 3 || ctx.Err() != nil {
			break
		}
		select {
		case <-time.After(wait/2 + rand.N(wait/2+1)):
		case <-ctx.Done():
		}
		wait *= 2
		if errors.Is(err, context.DeadlineExceeded) {
			// Slow, not down (a member without a leader answers at once,
			// WithRequireLeader): sent again with the same time, the
			// request would do the same work and fail the same way, and
			// an overloaded etcd would do everything twice.
			timeout *= 2
		}
	}
	err = fmt.Errorf("%w: %s: %w", ErrUnreachable, what, err)
	if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
		e.unreachable(err) // not when the caller gave up (the agent stops)
	}
	return err
}

// unreachable records that a request failed; the first failure after a
// success is logged.
func (e *Etcd) unreachable(err error) {
	e.mu.Lock()
	was := e.status.Connected
	e.status.LastError = err.Error()
	if was {
		e.status.Connected = false
		e.status.Since = time.Now()
	}
	e.mu.Unlock()
	if was {
		e.log.Warn("registry unreachable; keeping the last view of the cluster, links and channels as they are", "err", err)
	}
}

// reachable records that a request succeeded.
func (e *Etcd) reachable() {
	e.mu.Lock()
	was, since := e.status.Connected, e.status.Since
	if !was {
		e.status.Connected = true
		e.status.Since = time.Now()
	}
	e.mu.Unlock()
	if !was {
		e.log.Info("registry reachable", "after", time.Since(since).Round(time.Millisecond))
	}
}

// refused logs a record that does not parse (name: of its key, as given).
func (e *Etcd) refused(name string, err error) {
	if len(name) > 80 {
		name = name[:80] + "…"
	}
	e.mu.Lock()
	e.status.Refused++
	e.mu.Unlock()
	e.log.Warn("registry record refused: the node is unknown until its record parses", "peer", name, "err", err)
}

// backoffWait waits d (jittered over its upper half) or until ctx is done, and
// returns the next wait, doubled up to max.
func backoffWait(ctx context.Context, d, max time.Duration) (time.Duration, bool) {
	select {
	case <-time.After(d/2 + rand.N(d/2+1)):
	case <-ctx.Done():
		return d, false
	}
	return min(2*d, max), true
}
