package registry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Publishing this node. The record and the certificate are put together
// (one transaction) under a lease of cfg.LeaseTTL, which the client keeps
// alive (a renewal every TTL/3). The lease is the record's life: when the
// agent dies the renewals stop and etcd deletes both keys within the TTL;
// when it stops cleanly it revokes the lease and they go at once.
//
//	grant ──► put ──► keep alive ──► (lease lost) ──► grant again …
//	  ▲  failed: backoff   │ self changed, or the record seen deleted:
//	  └────────────────────┘ put again under the same lease
//
// The trap this is built around: the client's keepalive channel simply
// closes when an outage outlasts the TTL (the client gives up on a lease
// it has not heard renewed for a TTL), and by then etcd has deleted the
// record. Without a new grant and put the node stays unregistered for
// good. So a closed channel means: grant again, put again. And rather
// than wait for the client to notice, a keepalive that is late (no
// renewal for half a TTL) has the lease's time to live asked directly, so
// that when etcd comes back after a long outage the record is put again
// within a second or so, not a TTL.

// publishBackoff bounds the wait between failed attempts to publish.
const (
	publishBackoffMin = 200 * time.Millisecond
	publishBackoffMax = 2 * time.Second
)

func (e *Etcd) publish(ctx context.Context, _ Sink) {
	wait := publishBackoffMin
	for ctx.Err() == nil {
		id, err := e.grant(ctx)
		if err == nil {
			if err = e.put(ctx, id); err != nil {
				e.revoke(id) // it would expire anyway; a best effort
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			e.log.Info("registry: publishing this node failed; trying again", "err", err, "retry_in", wait)
			var ok bool
			if wait, ok = backoffWait(ctx, wait, publishBackoffMax); !ok {
				return
			}
			continue
		}
		wait = publishBackoffMin
		why := e.keep(ctx, id)
		e.mu.Lock()
		e.status.Published = false
		e.mu.Unlock()
		if ctx.Err() != nil {
			if !e.abandon {
				e.revoke(id)
			}
			return
		}
		e.mu.Lock()
		e.status.Regrants++
		e.mu.Unlock()
		e.log.Warn("registry: this node's lease was lost; granting a new one and putting the record again", "lease", int64(id), "reason", why)
	}
}

// grant asks for a lease of the configured TTL.
func (e *Etcd) grant(ctx context.Context) (clientv3.LeaseID, error) {
	var resp *clientv3.LeaseGrantResponse
	err := e.retry(ctx, "grant a lease", func(ctx context.Context) (err error) {
		resp, err = e.cli.Grant(ctx, int64(e.cfg.LeaseTTL/time.Second))
		return err
	})
	if err != nil {
		return 0, err
	}
	e.mu.Lock()
	e.status.LeaseID = int64(resp.ID)
	e.mu.Unlock()
	return resp.ID, nil
}

// put writes the record and the certificate under lease id.
func (e *Etcd) put(ctx context.Context, id clientv3.LeaseID) error {
	e.mu.Lock()
	self, gen := e.self, e.selfGen
	e.mu.Unlock()
	rec, err := EncodeRecord(self.Node)
	if err != nil {
		return err
	}
	name := self.Node.Name
	var resp *clientv3.TxnResponse
	err = e.retry(ctx, "put the record of "+name, func(ctx context.Context) (err error) {
		resp, err = e.cli.Txn(ctx).Then(
			clientv3.OpPut(e.keys.Cert(name), string(self.CertPEM), clientv3.WithLease(id)),
			clientv3.OpPut(e.keys.Node(name), string(rec), clientv3.WithLease(id)),
		).Commit()
		return err
	})
	if err != nil {
		return err
	}
	e.mu.Lock()
	e.putRev = resp.Header.Revision
	e.status.Published, e.status.PutAt = true, time.Now()
	e.putGen = max(e.putGen, gen)
	close(e.putDone)
	e.putDone = make(chan struct{})
	e.mu.Unlock()
	e.log.Debug("registry: record put", "node", name, "lease", int64(id), "addresses", self.Node.Addresses)
	return nil
}

// keep keeps lease id alive until it is lost or ctx is done, putting the
// record again when it changes or is deleted. It returns why it stopped.
func (e *Etcd) keep(ctx context.Context, id clientv3.LeaseID) string {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ka, err := e.cli.KeepAlive(kctx, id)
	if err != nil {
		return "keepalive: " + err.Error()
	}
	ttl := e.cfg.LeaseTTL
	late := ttl / 2 // renewals come every TTL/3
	tick := time.NewTicker(min(time.Second, ttl/6))
	defer tick.Stop()
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return "stopping"
		case r, ok := <-ka:
			if !ok {
				return "the keepalive channel closed: the lease was not renewed for its TTL, and etcd has let it expire"
			}
			if r != nil {
				last = time.Now()
				e.reachable()
			}
		case <-e.changed:
			if err := e.put(ctx, id); err != nil {
				return "put again: " + err.Error()
			}
		case <-e.gone:
			// Deleted while the lease lives (by hand, say), or the lease
			// is gone and the keepalive has not said so yet: either way,
			// a new grant and put. Unless the deletion came before the
			// put: the revoke of a lease whose put timed out here but
			// was done in etcd, seen late through the watch. (Taken for
			// a loss, under load, each such deletion cost a new lease,
			// a put and an event to every agent, and more timeouts.)
			e.mu.Lock()
			stale := e.goneRev < e.putRev
			e.mu.Unlock()
			if !stale {
				return "the record was deleted from the registry"
			}
		case <-tick.C:
			if time.Since(last) < late {
				continue
			}
			alive, err := e.leaseAlive(ctx, id)
			switch {
			case err != nil:
				e.unreachable(fmt.Errorf("%w: ask the lease's time to live: %w", ErrUnreachable, err))
			case !alive:
				return "the lease expired while the keepalive was late"
			default:
				e.reachable()
			}
		}
	}
}

// leaseAlive asks etcd whether lease id still lives (one request, with the
// request timeout).
func (e *Etcd) leaseAlive(ctx context.Context, id clientv3.LeaseID) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, e.cfg.RequestTimeout)
	defer cancel()
	resp, err := e.cli.TimeToLive(clientv3.WithRequireLeader(rctx), id)
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return resp.TTL > 0, nil
}

// revoke ends lease id, deleting the record (a clean stop, or a lease
// that carries nothing): one request, on its own context.
func (e *Etcd) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), e.cfg.RequestTimeout)
	defer cancel()
	if _, err := e.cli.Revoke(ctx, id); err != nil {
		e.log.Debug("registry: revoking the lease failed; it expires on its own", "lease", int64(id), "err", err)
	}
}
