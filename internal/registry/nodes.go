package registry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Following the nodes: list, then watch from the list's revision on.
//
//	list   every key under <prefix>/nodes/, listPage at a time, all pages
//	       at the revision of the first (a consistent snapshot however
//	       long the listing takes); the view becomes the listing: nodes
//	       new or changed are told to the Sink, nodes missing are gone
//	watch  from the listing's revision + 1; each put is parsed (a record
//	       that does not parse is refused and its node, if known, is
//	       gone), each delete is a node gone
//	       a watch that fails because its revision was compacted lists
//	       again; one that fails otherwise (a member lost its leader,
//	       say) watches again from the last revision seen
//
// Nothing is kept per node but its Node in the view. The listing is
// paged so that a thousand records never make one large response, which
// with a thousand agents starting at once timed out in the prototype.

const (
	followBackoffMin = 100 * time.Millisecond
	followBackoffMax = 2 * time.Second
)

func (e *Etcd) followNodes(ctx context.Context, s Sink) {
	wait := followBackoffMin
	var rev int64 // the revision the view is at; 0: list first
	for ctx.Err() == nil {
		if rev == 0 {
			r, err := e.list(ctx, s)
			if err != nil {
				var ok bool
				if wait, ok = backoffWait(ctx, wait, followBackoffMax); !ok {
					return
				}
				continue
			}
			rev = r
			wait = followBackoffMin
		}
		var err error
		rev, err = e.watch(ctx, s, rev)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, rpctypes.ErrCompacted) {
			e.mu.Lock()
			e.status.Relists++
			e.mu.Unlock()
			e.log.Info("registry: the nodes' watch fell behind a compaction; listing again", "revision", rev)
			rev = 0
			continue
		}
		e.log.Debug("registry: the nodes' watch ended; watching again", "revision", rev, "err", err)
		var ok bool
		if wait, ok = backoffWait(ctx, wait, followBackoffMax); !ok {
			return
		}
	}
}

// list reads every record and makes the view that listing, telling s of
// each change. It returns the listing's revision.
func (e *Etcd) list(ctx context.Context, s Sink) (int64, error) {
	prefix := e.keys.Nodes()
	end := clientv3.GetPrefixRangeEnd(prefix)
	from, rev := prefix, int64(0)
	seen := map[string]bool{}
	var found []Node
	for {
		var resp *clientv3.GetResponse
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(listPage)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		err := e.retry(ctx, "list the nodes", func(ctx context.Context) (err error) {
			resp, err = e.cli.Get(ctx, from, opts...)
			return err
		})
		if err != nil {
			return 0, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			name := nameOf(e.keys, kv.Key)
			n, err := ParseRecord(name, kv.Value)
			if err != nil {
				e.refused(name, err)
				continue
			}
			seen[name] = true
			found = append(found, n)
		}
		if !resp.More || len(resp.Kvs) == 0 {
			break
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
	for name := range e.view.names() {
		if !seen[name] && e.view.remove(name) {
			s.NodeGone(name)
		}
	}
	for _, n := range found {
		e.take(s, n)
	}
	e.mu.Lock()
	e.status.Revision = rev
	e.mu.Unlock()
	e.log.Debug("registry: nodes listed", "nodes", len(found), "revision", rev)
	return rev, nil
}

// watch applies the changes after revision rev until the watch fails or
// ctx is done; it returns the last revision applied and why it stopped.
func (e *Etcd) watch(ctx context.Context, s Sink, rev int64) (int64, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wc := e.cli.Watch(wctx, e.keys.Nodes(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wc {
		if err := resp.Err(); err != nil {
			return rev, err
		}
		e.reachable()
		for _, ev := range resp.Events {
			e.apply(s, ev)
		}
		if r := resp.Header.Revision; r > rev {
			rev = r
			e.mu.Lock()
			e.status.Revision = rev
			e.mu.Unlock()
		}
	}
	return rev, fmt.Errorf("watch closed: %w", ctx.Err())
}

// apply takes one event of the nodes' watch into the view.
func (e *Etcd) apply(s Sink, ev *clientv3.Event) {
	name := nameOf(e.keys, ev.Kv.Key)
	if ev.Type == mvccpb.DELETE {
		if name == e.selfName() {
			e.mu.Lock()
			e.goneRev = max(e.goneRev, ev.Kv.ModRevision)
			e.mu.Unlock()
			poke(e.gone)
		}
		if e.view.remove(name) {
			s.NodeGone(name)
		}
		return
	}
	n, err := ParseRecord(name, ev.Kv.Value)
	if err != nil {
		e.refused(name, err)
		if e.view.remove(name) {
			s.NodeGone(name)
		}
		return
	}
	e.take(s, n)
}

// take puts n, a record that parsed, in the view and tells s if it
// changed; a new node that does not fit is refused.
func (e *Etcd) take(s Sink, n Node) {
	changed, err := e.view.put(n)
	if err != nil {
		e.refused(n.Name, err)
		return
	}
	if changed {
		s.NodeChanged(n)
	}
}

func (e *Etcd) selfName() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.self.Node.Name
}

// nameOf returns the name in a record's key as given, for ParseRecord to
// check (and the log to show).
func nameOf(l Layout, key []byte) string { return strings.TrimPrefix(string(key), l.Nodes()) }
