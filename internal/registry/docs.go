package registry

import (
	"context"
	"math/rand/v2"
	"strconv"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Following the documents: the revocation list and the cluster policy.
// Each is one key, written seldom (by `sinc ca revoke --etcd`, `sinc ca
// policy`), which is what makes a watch alone unsafe: compaction drops the
// revision it waits from, and the watch fails. So the documents are read
// at start, watched from the revision read, and read again every
// cfg.DocsEvery (jittered) whatever the watch says; a failed watch reads
// again and watches anew. A read hands the bytes of a document to the
// Sink only if the document changed since it was last handed over (its
// revision in etcd); the Sink verifies them and keeps the newest
// (internal/agent).
//
// A document deleted from the registry changes nothing: the agent keeps
// the newest it verified (and a copy in its state folder), since a
// revocation must not be undone by whoever can delete a key.

func (e *Etcd) followDocs(ctx context.Context, s Sink) {
	wait := followBackoffMin
	for ctx.Err() == nil {
		rev, err := e.readDocs(ctx, s)
		if err != nil {
			var ok bool
			if wait, ok = backoffWait(ctx, wait, followBackoffMax); !ok {
				return
			}
			continue
		}
		wait = followBackoffMin
		e.watchDocs(ctx, s, rev)
	}
}

// readDocs reads both documents at one revision and hands to s each
// present one that changed since it was last handed over. It returns the
// revision. Only the keys' revisions are read first: the revocation list
// may be a megabyte, and a thousand agents reading it whole every 30 s
// would keep etcd sending it for nothing.
func (e *Etcd) readDocs(ctx context.Context, s Sink) (int64, error) {
	var resp *clientv3.TxnResponse
	err := e.retry(ctx, "read the revocation list and the policy", func(ctx context.Context) (err error) {
		resp, err = e.cli.Txn(ctx).Then(clientv3.OpGet(e.keys.Revocations(), clientv3.WithKeysOnly()),
			clientv3.OpGet(e.keys.Policy(), clientv3.WithKeysOnly())).Commit()
		return err
	})
	if err != nil {
		return 0, err
	}
	rev := resp.Header.Revision
	var gets []clientv3.Op
	for _, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			if kv.ModRevision != e.docRevs[string(kv.Key)] {
				gets = append(gets, clientv3.OpGet(string(kv.Key), clientv3.WithRev(rev)))
			}
		}
	}
	if len(gets) > 0 {
		err := e.retry(ctx, "read the revocation list and the policy", func(ctx context.Context) (err error) {
			resp, err = e.cli.Txn(ctx).Then(gets...).Commit()
			return err
		})
		if err != nil {
			return 0, err
		}
		for _, r := range resp.Responses {
			for _, kv := range r.GetResponseRange().Kvs {
				e.deliver(s, kv)
			}
		}
	}
	e.mu.Lock()
	e.status.DocsReadAt = time.Now()
	e.mu.Unlock()
	return rev, nil
}

// deliver hands one document to s, unless it is too large, and notes its
// revision (docRevs).
func (e *Etcd) deliver(s Sink, kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	e.docRevs[key] = kv.ModRevision
	if max := e.keys.Bound(key); len(kv.Value) > max {
		e.log.Warn("registry document refused: too large", "key", key, "bytes", len(kv.Value), "limit", max)
		return
	}
	source := "etcd " + key + " (revision " + strconv.FormatInt(kv.ModRevision, 10) + ")"
	switch key {
	case e.keys.Revocations():
		s.Revocations(kv.Value, source)
	case e.keys.Policy():
		s.Policy(kv.Value, source)
	}
}

// watchDocs delivers each change of the two documents after rev until
// the watch fails, the time to read them again comes, or ctx is done.
func (e *Etcd) watchDocs(ctx context.Context, s Sink, rev int64) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	revs := e.cli.Watch(wctx, e.keys.Revocations(), clientv3.WithRev(rev+1))
	pols := e.cli.Watch(wctx, e.keys.Policy(), clientv3.WithRev(rev+1))
	every := e.cfg.DocsEvery
	again := time.NewTimer(every*3/4 + rand.N(every/2+1))
	defer again.Stop()
	for {
		var resp clientv3.WatchResponse
		var ok bool
		select {
		case <-ctx.Done():
			return
		case <-again.C:
			return
		case resp, ok = <-revs:
		case resp, ok = <-pols:
		}
		if !ok || resp.Err() != nil {
			if ok {
				e.log.Debug("registry: a document's watch failed; reading again", "err", resp.Err())
			}
			return
		}
		for _, ev := range resp.Events {
			if ev.Type == mvccpb.DELETE {
				e.log.Warn("registry document deleted; the newest one verified stays in force", "key", string(ev.Kv.Key))
				continue
			}
			e.deliver(s, ev.Kv)
		}
	}
}
