package registry

import (
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"sinc.dev/sinc/internal/etcdtest"
)

// TestEtcdStaleDeletion: a deletion of this node's record that the watch
// shows after the record was put again — the revoke of a lease whose put
// timed out here but was done in etcd — costs no new lease; a deletion
// after the put does. Under load (1,000 agents in TestRegistryScale) each
// stale deletion taken for a loss cost a lease, a put and an event to
// every agent, which made more timeouts and more such deletions.
func TestEtcdStaleDeletion(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	cli := ec.Client(t)
	a := startBackend(t, testClient(t, ec.Endpoints()...), "/stale", "node-a")
	within(t, 3*time.Second, "node-a published", func() bool { return a.Status().Published })
	a.mu.Lock()
	put := a.putRev
	a.mu.Unlock()
	lease := a.Status().LeaseID

	// As the watch delivers it: the revoke's deletion, older than the put.
	a.apply(a.sink, &clientv3.Event{Type: mvccpb.DELETE, Kv: &mvccpb.KeyValue{Key: []byte("/stale/nodes/node-a"), ModRevision: put - 1}})
	time.Sleep(500 * time.Millisecond)
	if st := a.Status(); st.Regrants != 0 || st.LeaseID != lease || !st.Published {
		t.Fatalf("after a deletion older than the put: %d regrants, lease %x (was %x), published %v", st.Regrants, st.LeaseID, lease, st.Published)
	}

	// A deletion after the put is a loss: a new lease, the record back.
	delKey(t, cli, "/stale/nodes/node-a")
	within(t, 3*time.Second, "node-a's record put again", func() bool {
		return a.Status().Regrants == 1 && getKey(t, cli, "/stale/nodes/node-a") != nil
	})
}
