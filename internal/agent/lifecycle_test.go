package agent

import (
	"bytes"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/wire"
)

// TestRotationAndRekeyUnderTraffic: 10,000 messages on 20 channels with
// limits forcing a key rotation every 8 frames (a frame packs the messages
// written together: every 25-100 messages here) and a link rekey every
// ~second: all delivered in order, none lost; the counters show the
// rotations and rekeys; afterwards no retired key is left in the key table.
func TestRotationAndRekeyUnderTraffic(t *testing.T) {
	timers := fastTimers
	timers.Rekey = "1s"
	c, err := cluster.Make(shortTempDir(t), channelSpecs, timers)
	if err != nil {
		t.Fatal(err)
	}
	rot := func(cfg *config.Config) { cfg.Limits.RotateFrames = 8 }
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], rot), b: startAgent(t, c.Nodes["node-b"], rot)}
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	const channels, perChannel = 20, 500
	var wg sync.WaitGroup
	errs := make(chan error, channels)
	cs := make([]*sinc.Conn, channels)
	for i := range cs {
		cs[i] = p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	}
	for i, cn := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			go func() {
				for j := range perChannel {
					cn.WriteMessage([]byte(fmt.Sprintf("%d/%d", i, j)))
					if j%25 == 0 {
						time.Sleep(60 * time.Millisecond) // spread over ~1.2s: links rekey meanwhile
					}
				}
			}()
			for j := range perChannel {
				cn.SetReadDeadline(time.Now().Add(20 * time.Second))
				m, err := cn.ReadMessage()
				if want := fmt.Sprintf("%d/%d", i, j); err != nil || string(m) != want {
					errs <- fmt.Errorf("channel %d: message %q, want %q (%v)", i, m, want, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // one more rekey with the channels idle
	sa, sb := stats(t, p.a), stats(t, p.b)
	rotations := sa["key_rotations"] + sb["key_rotations"]
	rekeys := sa["link_rekeys"] + sb["link_rekeys"]
	// Every 8 frames under one key, each way: about frames/8 rotations.
	frames := sa["data_frames_in"] + sb["data_frames_in"]
	if rotations < frames/8/2 {
		t.Fatalf("only %d key rotations for %d frames with a rotation every 8", rotations, frames)
	}
	if rekeys < 1 {
		t.Fatal("no link rekey in over 2s with timers.rekey = 1s")
	}
	if sa["sends_stalled_for_key"]+sb["sends_stalled_for_key"] > 0 {
		t.Logf("note: sends waited for a new key %d times", sa["sends_stalled_for_key"]+sb["sends_stalled_for_key"])
	}
	// No retired key is left: a channel holds an old receiving key only
	// while the sender may still use it (it has not sent under the new).
	for _, ag := range []*testAgent{p.a, p.b} {
		for _, ch := range ag.tables.all() {
			ch.rmu.Lock()
			k := &ch.keys
			k.mu.Lock()
			old := k.old != nil
			oldBytes := bytes.Clone(k.oldKey())
			k.mu.Unlock()
			ch.rmu.Unlock()
			if !old && !bytes.Equal(oldBytes, make([]byte, wire.KeyLen)) {
				t.Fatalf("%s: a retired key is still in the key table", ag.node.Name)
			}
		}
	}
	rows := conns(t, p.a)
	if len(rows) == 0 || rows[0].KeyEpochOut == 0 || rows[0].KeyEpochIn == 0 {
		t.Fatalf("rows do not show the epochs: %+v", rows)
	}
	t.Logf("%d messages each way on %d channels, in order, in %d frames; %d key rotations, %d link rekeys",
		channels*perChannel, channels, frames, rotations, rekeys)
}

// TestRetiredEpochRejected: once the sender has moved to the new key, a
// frame sealed with the retired one is refused, even correctly sealed.
func TestRetiredEpochRejected(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), hostileSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	e := &hostileEnv{c: c, a: startAgent(t, c.Nodes["node-a"], func(cfg *config.Config) { cfg.Limits.RotateFrames = 8 })}
	e.sink = listenSink(t, c.Nodes["node-a"].Partitions["db"], "sink")
	e.id = hostileIdentity(t, c)
	e.h = dialHostile(t, e.id, e.a)
	ch, conn := e.accepted(t)
	for i := range 8 { // the 8th frame makes node-a rotate
		ch.send(t, ch.frame([]byte(fmt.Sprintf("m%d", i))))
	}
	for i := range 8 {
		if got := readMsg(t, conn); string(got) != fmt.Sprintf("m%d", i) {
			t.Fatalf("message %d: %q", i, got)
		}
	}
	// node-a sends a Rekey with the next epoch and its new key.
	var rk *wire.Rekey
	eventually(t, 5*time.Second, "node-a's Rekey", func() bool {
		e.h.mu.Lock()
		defer e.h.mu.Unlock()
		for _, b := range e.h.ctl {
			if m, err := wire.ParseRekey(b); err == nil && m.Index == ch.open.Index {
				rk = m
			}
		}
		return rk != nil
	})
	if rk.Epoch != 1 {
		t.Fatalf("rekey epoch %d, want 1", rk.Epoch)
	}
	// Still before any frame of the new epoch: the old key is accepted.
	ch.send(t, ch.frame([]byte("old key, in the overlap")))
	if got := readMsg(t, conn); string(got) != "old key, in the overlap" {
		t.Fatalf("%q", got)
	}
	// Switch: a frame under the new key retires the old one.
	newKey := testGCM(rk.Key[:])
	h := ch.hdr()
	h.Epoch = 1
	ch.send(t, sealFrame(newKey, h, []byte("new key")))
	ch.ctr++
	if got := readMsg(t, conn); string(got) != "new key" {
		t.Fatalf("%q", got)
	}
	s := stats(t, e.a)
	ch.send(t, ch.frame([]byte("old key, after the overlap"))) // epoch 0, the next counter
	ch.ctr--
	h = ch.hdr()
	h.Epoch = 1
	ch.send(t, sealFrame(newKey, h, []byte("after")))
	if got := readMsg(t, conn); string(got) != "after" {
		t.Fatalf("the frame after a refused one: %q", got)
	}
	checkDelta(t, e.a, "a retired epoch", s, map[string]uint64{"rejected_bad_epoch": 1, "data_frames_in": 1, "key_rotations": 0})
}

// renewCert replaces a node's certificate and key files with new ones.
func renewCert(t *testing.T, c *cluster.Cluster, node string, validFor time.Duration) *cert.Certificate {
	t.Helper()
	n := c.Nodes[node]
	certPath, keyPath := cert.NodeFiles(n.Dir, node)
	tmp := t.TempDir()
	nc, err := cert.SignNode(c.CADir, tmp, cert.NodeRequest{Node: node, Partitions: n.Spec.Partitions, ValidFor: validFor}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	newCert, newKey := cert.NodeFiles(tmp, node)
	// The key first: a certificate that does not match its key is refused,
	// and the watcher retries when the certificate follows.
	for _, mv := range [][2]string{{newKey, keyPath}, {newCert, certPath}} {
		if err := os.Rename(mv[0], mv[1]); err != nil {
			t.Fatal(err)
		}
	}
	return nc
}

// TestCertificateRenewalUnderTraffic: node-a's certificate and key are
// replaced while a channel carries messages: nothing is dropped, and node-b
// sees the new certificate at the next link rekey.
func TestCertificateRenewalUnderTraffic(t *testing.T) {
	timers := fastTimers
	timers.Rekey = "500ms"
	c, err := cluster.Make(shortTempDir(t), channelSpecs, timers)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	cn := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	const n = 3000
	errc := make(chan error, 1)
	go func() {
		for j := range n {
			m, err := cn.ReadMessage()
			if want := fmt.Sprintf("m%d", j); err != nil || string(m) != want {
				errc <- fmt.Errorf("message %q, want %q (%v)", m, want, err)
				return
			}
		}
		errc <- nil
	}()
	var nc *cert.Certificate
	for j := range n {
		if err := cn.WriteMessage([]byte(fmt.Sprintf("m%d", j))); err != nil {
			t.Fatal(err)
		}
		if j == n/3 {
			nc = renewCert(t, c, "node-a", 24*time.Hour)
		}
		if j%100 == 0 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	p.a.log.waitFor(t, 5*time.Second, "certificate renewed", "fingerprint="+nc.Fingerprint().String())
	eventually(t, 10*time.Second, "node-b sees node-a's new certificate", func() bool {
		l := p.b.link("node-a")
		return l != nil && l.Peer().Fingerprint() == nc.Fingerprint()
	})
}

// TestCertificateExpiry: a peer certificate about to expire is warned of,
// and at expiry its link closes with that reason and stays closed.
func TestCertificateExpiry(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	short := renewCert(t, c, "node-b", 4*time.Second)
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], nil), b: startAgent(t, c.Nodes["node-b"], nil)}
	row := waitUp(t, p.a, "node-b")
	if row.CertWarning == "" || !row.CertExpiry.Equal(short.NotAfter) {
		t.Fatalf("the peer table does not warn of node-b's certificate: %+v", row)
	}
	p.a.log.waitFor(t, 2*time.Second, "peer certificate expires in", "peer=node-b")
	p.a.log.waitFor(t, 8*time.Second, "peer=node-b", "the certificate of node-b expired") // closed by either side
	p.a.log.waitFor(t, 5*time.Second, "peer handshake failed", "expired")
	if p.a.link("node-b") != nil {
		t.Fatal("a link with an expired certificate is up")
	}
}
