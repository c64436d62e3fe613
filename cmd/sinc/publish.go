package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"sinc.dev/sinc/internal/registry"
)

// Publishing a CA-signed document (revocation list, cluster policy) to the
// registry. Agents take a document only when its serial is above the one
// they hold, so the publisher must never put a lower or equal serial, even
// with another operator publishing at the same time. Each round:
//
//	read the key (value, mod revision) ──> sign the next document from it
//	     ^                                  (serial above both the file's
//	     |                                   and the registry's), write the file
//	     |                                            |
//	     +──── another put came first <── put only if the key's mod revision
//	                                       is still the one read (a txn)
//
// Every request has its own short timeout and is retried a few times: while
// etcd elects a new leader a write stalls for etcd's own request timeout
// (about 7 s), and a fresh attempt reaches the new leader sooner. A put that
// timed out may still have been applied: the next round reads the key back,
// and finding its own document there, is done.
var (
	etcdRequestTimeout = 2 * time.Second
	etcdAttempts       = 4                      // per request
	etcdRetryPause     = 250 * time.Millisecond // between attempts
	publishRounds      = 8                      // lost races before giving up
	publishBackoff     = 10 * time.Millisecond  // after a lost race, a random wait up to this, doubling

	// testHookBeforeSwap, when set, runs between reading the key and
	// putting the new document: tests lose the leader there.
	testHookBeforeSwap func()
)

// etcdFlags are the flags of a command that can publish to the registry.
type etcdFlags struct {
	endpoints, prefix, ca, cert, key *string
}

func addEtcdFlags(fs *flag.FlagSet) *etcdFlags {
	return &etcdFlags{
		endpoints: fs.String("etcd", "", "publish to the registry in etcd at these endpoints (comma-separated URLs or host:port)"),
		prefix:    fs.String("prefix", registry.DefaultPrefix, "the registry's key prefix in etcd"),
		ca:        fs.String("etcd-ca", "", "CA file (PEM) that verifies etcd's certificate"),
		cert:      fs.String("etcd-cert", "", "client certificate file (PEM) for etcd"),
		key:       fs.String("etcd-key", "", "client key file (PEM) for etcd"),
	}
}

// set reports whether the command is to publish.
func (f *etcdFlags) set() bool { return *f.endpoints != "" }

// check validates the flags before anything is signed.
func (f *etcdFlags) check() (registry.ClientConfig, registry.Layout, error) {
	var eps []string
	for e := range strings.SplitSeq(*f.endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	cfg := registry.ClientConfig{Endpoints: eps, CA: *f.ca, Cert: *f.cert, Key: *f.key}
	if !f.set() && cfg.TLS() {
		return cfg, registry.Layout{}, usagef("--etcd-ca, --etcd-cert and --etcd-key need --etcd")
	}
	l, err := registry.NewLayout(*f.prefix)
	if err != nil {
		return cfg, l, usagef("--prefix: %v", err)
	}
	return cfg, l, nil
}

// publisher puts signed documents into the registry.
type publisher struct {
	cli       *clientv3.Client
	endpoints string // for errors
	layout    registry.Layout
	warn      io.Writer
}

// openPublisher makes the etcd client; it does not wait for etcd.
func openPublisher(f *etcdFlags, warn io.Writer) (*publisher, error) {
	cfg, l, err := f.check()
	if err != nil {
		return nil, err
	}
	cli, err := registry.NewClient(cfg)
	if err != nil {
		return nil, usagef("--etcd: %v", err)
	}
	return &publisher{cli: cli, endpoints: strings.Join(cfg.Endpoints, ","), layout: l, warn: warn}, nil
}

func (p *publisher) Close() error { return p.cli.Close() }

// retry runs op with a fresh timeout up to etcdAttempts times.
func (p *publisher) retry(what, key string, op func(ctx context.Context) error) error {
	var err error
	for i := range etcdAttempts {
		if i > 0 {
			time.Sleep(etcdRetryPause)
		}
		ctx, cancel := context.WithTimeout(context.Background(), etcdRequestTimeout)
		err = op(ctx)
		cancel()
		if err == nil {
			return nil
		}
	}
	return fmt.Errorf("etcd at %s: %s %s: %w (%d attempts of %v)", p.endpoints, what, key, err, etcdAttempts, etcdRequestTimeout)
}

// get reads key: its value (nil when absent) and mod revision (0 when absent).
func (p *publisher) get(key string) ([]byte, int64, error) {
	var val []byte
	var rev int64
	err := p.retry("reading", key, func(ctx context.Context) error {
		resp, err := p.cli.Get(ctx, key)
		if err != nil {
			return err
		}
		val, rev = nil, 0
		if len(resp.Kvs) > 0 {
			val, rev = resp.Kvs[0].Value, resp.Kvs[0].ModRevision
		}
		return nil
	})
	return val, rev, err
}

// swap puts val at key if the key's mod revision is still rev (0: absent),
// and reports whether it did.
func (p *publisher) swap(key string, rev int64, val []byte) (bool, error) {
	var ok bool
	err := p.retry("writing", key, func(ctx context.Context) error {
		resp, err := p.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
			Then(clientv3.OpPut(key, string(val))).
			Commit()
		if err != nil {
			return err
		}
		ok = resp.Succeeded
		return nil
	})
	return ok, err
}

// publish puts at key the document next makes from the key's current value
// (nil when absent), in rounds until its put is the one that lands. next
// signs the document and returns its PEM and a save function that writes
// the CA folder's copy; save runs before the put, so the folder never lags
// the registry.
func (p *publisher) publish(key string, next func(current []byte) (doc []byte, save func() error, err error)) ([]byte, error) {
	var last []byte // the document of the previous round
	backoff := publishBackoff
	for round := range publishRounds {
		if round > 0 {
			// Two operators that lost to each other try again at
			// different times, not in step round after round.
			time.Sleep(rand.N(backoff))
			backoff *= 2
		}
		cur, rev, err := p.get(key)
		if err != nil {
			return nil, err
		}
		if last != nil && bytes.Equal(cur, last) {
			return last, nil // the previous round's put landed after all
		}
		doc, save, err := next(cur)
		if err != nil {
			return nil, err
		}
		if bound := p.layout.Bound(key); len(doc) > bound {
			return nil, fmt.Errorf("the signed document is %d bytes, more than the registry's bound of %d: agents would refuse it", len(doc), bound)
		}
		if err := save(); err != nil {
			return nil, err
		}
		if testHookBeforeSwap != nil {
			testHookBeforeSwap()
		}
		ok, err := p.swap(key, rev, doc)
		if err != nil {
			return nil, err
		}
		if ok {
			return doc, nil
		}
		last = doc
		fmt.Fprintf(p.warn, "sinc: %s changed while publishing (another operator?): reading it again\n", key)
	}
	return nil, fmt.Errorf("etcd at %s: %s kept changing: gave up after %d rounds", p.endpoints, key, publishRounds)
}

// errOtherCA is returned when the registry holds another CA's document: the
// prefix is probably another cluster's.
var errOtherCA = errors.New("is signed by another CA: is --prefix this cluster's? refusing to replace it")
