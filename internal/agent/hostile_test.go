package agent

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/config"
	"sinc.dev/sinc/internal/link"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// Adversarial tests in which the test plays a hostile peer node. node-c has
// a real certificate and key (a compromised node): the test links to node-a
// with node-c's identity and speaks the channel protocol by hand, sealing
// and mutating data frames itself. node-a is a real agent; a Go client
// listens on node-a/db/sink and is what must receive nothing but the
// frames that pass every check of the receive path (docs/design.md).

// hostileWindow is node-a's channel window in these tests (config minimum).
const hostileWindow = 64<<10 + 64

// hostileSpecs: node-a hosts db and other; node-b (a real agent, where a
// test needs one) hosts x; node-c, played by the test, hosts app and app2.
// node-a's policy lets every partition of node-c and of node-b reach
// node-a/db/*, and nothing else: the source and certificate checks are the
// only thing between node-c and a channel in node-b's name. node-a/db may
// open channels to node-c/app, for the tests of node-a's opens.
var hostileSpecs = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"db", "other"}, Extra: fmt.Sprintf(`
[[allow]]
from = "node-c/*"
to = "node-a/db/*"

[[allow]]
from = "node-b/*"
to = "node-a/db/*"

[[allow]]
from = "node-a/db"
to = "node-c/app/*"

[limits]
window = %d
`, hostileWindow)},
	{Name: "node-b", Partitions: []string{"x"}, Extra: `
[[allow]]
from = "node-b/x"
to = "node-a/db/*"
`},
	{Name: "node-c", Partitions: []string{"app", "app2"}},
}

// hostile is the test speaking as node-c on one link to node-a.
type hostile struct {
	l      *link.Link
	done   chan struct{} // closed when Serve returned
	served error

	block chan struct{} // if set, reading waits until it is closed

	mu   sync.Mutex
	ctl  [][]byte // every control message node-a sent, in order
	data [][]byte // every data frame node-a sent, in order
	sig  chan struct{}
}

func (h *hostile) HandleControl(_ *link.Link, msg []byte) {
	if h.block != nil {
		<-h.block
	}
	h.mu.Lock()
	h.ctl = append(h.ctl, bytes.Clone(msg))
	h.mu.Unlock()
	signal(h.sig)
}

func (h *hostile) HandleData(_ *link.Link, frame []byte) {
	h.mu.Lock()
	h.data = append(h.data, bytes.Clone(frame))
	h.mu.Unlock()
	signal(h.sig)
}

// hostileIdentity returns node-c's side of a link: its real certificate
// and key, as its agent would load them.
func hostileIdentity(t *testing.T, c *cluster.Cluster) *link.Config {
	t.Helper()
	cfg, err := config.Load(c.Nodes["node-c"].Config)
	if err != nil {
		t.Fatal(err)
	}
	id, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return id.linkCfg
}

// hostileIDs hands out the hostile's channel indexes and connection ids,
// never the same twice in a test binary.
var hostileIDs atomic.Uint32

// dialHostile links to a as node-c.
func dialHostile(t *testing.T, id *link.Config, a *testAgent) *hostile {
	t.Helper()
	conn, err := net.DialTimeout("tcp", a.node.Listen, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	l, err := link.Dial(conn, id, a.node.Name)
	if err != nil {
		t.Fatalf("hostile handshake: %v", err)
	}
	h := &hostile{l: l, done: make(chan struct{}), sig: make(chan struct{}, 1)}
	go func() {
		h.served = l.Serve(h)
		close(h.done)
	}()
	t.Cleanup(func() {
		l.Close(errors.New("test over"))
		select {
		case <-h.done:
		case <-time.After(5 * time.Second):
			t.Error("the hostile link's Serve did not return")
		}
		// Let node-a end the link and its channels before it stops: they
		// end on the link's own goroutine then, not under the agent's
		// shutdown (see the race on keyEntry.recv in the report of these
		// tests).
		eventually(t, 5*time.Second, "node-a dropped node-c's link and channels", func() bool {
			a.mu.Lock()
			up := a.peers["node-c"].link != nil
			a.mu.Unlock()
			if up {
				return false
			}
			for _, ch := range a.tables.all() {
				ch.mu.Lock()
				peer := ch.state.peer
				ch.mu.Unlock()
				if peer == "node-c" {
					return false
				}
			}
			return true
		})
	})
	waitUp(t, a, "node-c")
	return h
}

// waitCtl waits for a control message from node-a that match accepts.
func (h *hostile) waitCtl(t *testing.T, what string, match func([]byte) bool) []byte {
	t.Helper()
	return h.waitCtlFrom(t, 0, what, match)
}

// mark returns how many control messages node-a has sent so far.
func (h *hostile) mark() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ctl)
}

// waitCtlFrom is waitCtl among the messages from the start-th on.
func (h *hostile) waitCtlFrom(t *testing.T, start int, what string, match func([]byte) bool) []byte {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for i := start; ; {
		h.mu.Lock()
		msgs := h.ctl
		h.mu.Unlock()
		for ; i < len(msgs); i++ {
			if match(msgs[i]) {
				return msgs[i]
			}
		}
		select {
		case <-h.sig:
		case <-time.After(20 * time.Millisecond): // another waiter may have taken the signal
		case <-deadline:
			t.Fatalf("node-a did not send %s within 5s", what)
		}
	}
}

// ctlCount counts the control messages from node-a that match accepts.
func (h *hostile) ctlCount(match func([]byte) bool) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range h.ctl {
		if match(m) {
			n++
		}
	}
	return n
}

// newOpen returns an Open from node-c/app to node-a/db/sink with fresh
// ids and a fresh key for traffic to node-c.
func (h *hostile) newOpen() *wire.Open {
	n := 100 + hostileIDs.Add(1)
	return &wire.Open{Kind: wire.Message, Index: n, Conn: uint64(n) << 8, Window: 1 << 20,
		Key: testKey(), SrcNode: "node-c", SrcPart: "app", SrcProc: wire.Proc{PID: 4242, UID: 1000, GID: 1000},
		DstNode: "node-a", DstPart: "db", DstSvc: "sink"}
}

func (h *hostile) sendCtl(t *testing.T, msg []byte) {
	t.Helper()
	if err := h.l.Send(msg); err != nil {
		t.Fatalf("hostile send: %v", err)
	}
}

// answer sends m and returns node-a's Accept or Refuse of it.
func (h *hostile) answer(t *testing.T, m *wire.Open) (*wire.Accept, *wire.Refuse) {
	t.Helper()
	start := h.mark()
	h.sendCtl(t, m.Marshal())
	msg := h.waitCtlFrom(t, start, fmt.Sprintf("an answer to open %d/%d", m.Index, m.Conn), func(b []byte) bool {
		return isAnswerTo(b, m)
	})
	if msg[0] == wire.OpAccept {
		acc, err := wire.ParseAccept(msg)
		if err != nil {
			t.Fatalf("node-a sent a bad Accept: %v", err)
		}
		return acc, nil
	}
	r, err := wire.ParseRefuse(msg)
	if err != nil {
		t.Fatalf("node-a sent a bad Refuse: %v", err)
	}
	return nil, r
}

func isAnswerTo(b []byte, m *wire.Open) bool {
	if acc, err := wire.ParseAccept(b); err == nil {
		return acc.InitIndex == m.Index && acc.InitConn == m.Conn
	}
	if r, err := wire.ParseRefuse(b); err == nil {
		return r.InitIndex == m.Index && r.InitConn == m.Conn
	}
	return false
}

// refused sends m and checks that node-a refuses it with code, by itself,
// with a reason containing want.
func (h *hostile) refused(t *testing.T, m *wire.Open, code wire.Code, want string) *wire.Refuse {
	t.Helper()
	acc, r := h.answer(t, m)
	if acc != nil {
		t.Fatalf("node-a accepted open %+v; want %s", *m, code)
	}
	if r.Code != code || r.By != "node-a" || !strings.Contains(r.Reason, want) {
		t.Fatalf("refusal %s by %q (%q); want %s by node-a, reason with %q", r.Code, r.By, r.Reason, code, want)
	}
	return r
}

// hchan is a channel the hostile opened, as the hostile sees it.
type hchan struct {
	h    *hostile
	open *wire.Open
	acc  *wire.Accept
	toA  cipher.AEAD // seals frames to node-a: node-a's key kA
	toC  cipher.AEAD // opens frames from node-a: our key kC
	ctr  uint64      // next counter
}

// openChan opens a channel to node-a/db/sink, which must be accepted.
func (h *hostile) openChan(t *testing.T) *hchan {
	t.Helper()
	m := h.newOpen()
	key := m.Key
	acc, r := h.answer(t, m)
	if acc == nil {
		t.Fatalf("node-a refused a good open: %s by %s: %s", r.Code, r.By, r.Reason)
	}
	if acc.Window != hostileWindow || acc.Key == key || acc.Key == [wire.KeyLen]byte{} {
		t.Fatalf("accept: window %d (want %d), or the key is ours or empty", acc.Window, hostileWindow)
	}
	return &hchan{h: h, open: m, acc: acc, toA: testGCM(acc.Key[:]), toC: testGCM(key[:])}
}

// hdr returns the correct header of this channel's next frame.
func (c *hchan) hdr() wire.DataHeader {
	return wire.DataHeader{Index: c.acc.Index, Counter: c.ctr, SrcConn: c.open.Conn, DstConn: c.acc.Conn}
}

// testKey returns a fresh random channel key.
func testKey() (k [wire.KeyLen]byte) {
	rand.Read(k[:])
	return k
}

// testGCM returns AES-256-GCM with key k, the channel AEAD.
func testGCM(k []byte) cipher.AEAD {
	b, err := aes.NewCipher(k)
	if err != nil {
		panic(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

// sealFrame lays out and seals a data frame as an agent does.
func sealFrame(aead cipher.AEAD, h wire.DataHeader, payload []byte) []byte {
	if payload != nil {
		payload = asMessage(payload)
	}
	return sealRaw(aead, h, payload)
}

// asMessage is payload as one message of a message channel's frame: its
// length, then its bytes.
func asMessage(payload []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}

// sealRaw seals a frame payload as it is.
func sealRaw(aead cipher.AEAD, h wire.DataHeader, payload []byte) []byte {
	f := make([]byte, wire.DataHeaderLen+len(payload)+wire.TagLen)
	h.Put(f, len(payload))
	nonce := wire.Nonce(h.Counter)
	aead.Seal(f[wire.DataHeaderLen:wire.DataHeaderLen], nonce[:], payload, f[:wire.DataHeaderLen])
	return f
}

// frame returns a correctly sealed frame with the next counter.
func (c *hchan) frame(payload []byte) []byte {
	f := sealRaw(c.toA, c.hdr(), asMessage(payload))
	c.ctr++
	return f
}

func (c *hchan) send(t *testing.T, frame []byte) {
	t.Helper()
	if err := c.h.l.SendData(frame); err != nil {
		t.Fatalf("hostile send data: %v", err)
	}
}

// closeMsg is a Close of this channel from the hostile.
func (c *hchan) closeMsg(code wire.Code) []byte {
	return (&wire.Close{Index: c.acc.Index, DstConn: c.acc.Conn, SrcConn: c.open.Conn, Code: code, Reason: "bye"}).Marshal()
}

// isCloseOf reports whether b is node-a's Close of c.
func (c *hchan) isCloseOf(b []byte) bool {
	m, err := wire.ParseClose(b)
	return err == nil && m.Index == c.open.Index && m.DstConn == c.open.Conn && m.SrcConn == c.acc.Conn
}

// credits returns the credit node-a granted on c beyond the window of its
// Accept (a Credit carries the total granted).
func (c *hchan) credits(t *testing.T) uint64 {
	t.Helper()
	var most uint64
	c.h.mu.Lock()
	defer c.h.mu.Unlock()
	for _, b := range c.h.ctl {
		if b[0] != wire.OpCredit {
			continue
		}
		m, err := wire.ParseCredit(b)
		if err != nil {
			t.Errorf("node-a sent a bad Credit: %v", err)
			continue
		}
		if m.Index == c.open.Index && m.DstConn == c.open.Conn {
			if m.SrcConn != c.acc.Conn {
				t.Errorf("credit names source conn %d, not node-a's %d", m.SrcConn, c.acc.Conn)
			}
			most = max(most, m.Granted)
		}
	}
	if most < uint64(c.acc.Window) {
		return 0
	}
	return most - uint64(c.acc.Window)
}

// sink is a process listening on a service of node-a, recording every
// channel it is handed.
type sink struct {
	l     *sinc.Listener
	conns chan *sinc.Conn

	mu   sync.Mutex
	kept []*sinc.Conn // see keep
}

func listenSink(t *testing.T, socket, service string) *sink {
	t.Helper()
	l, err := (&sinc.ListenConfig{Socket: socket}).Listen(ctxT(t), service)
	if err != nil {
		t.Fatal(err)
	}
	s := &sink{l: l, conns: make(chan *sinc.Conn, 64)}
	var mu sync.Mutex
	var all []*sinc.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			mu.Lock()
			all = append(all, c)
			mu.Unlock()
			s.conns <- c
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
		mu.Lock()
		for _, c := range all {
			c.Close()
		}
		mu.Unlock()
	})
	return s
}

// next returns the next channel the listener was handed.
func (s *sink) next(t *testing.T) *sinc.Conn {
	t.Helper()
	select {
	case c := <-s.conns:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("the listener was handed no channel within 5s")
		return nil
	}
}

// none checks that the listener was handed nothing so far.
func (s *sink) none(t *testing.T) {
	t.Helper()
	select {
	case c := <-s.conns:
		t.Fatalf("the listener was handed a channel %+v", c.Info())
	default:
	}
}

// readMsg reads one message with a bound.
func readMsg(t *testing.T, c *sinc.Conn) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := c.ReadMessage()
	if err != nil {
		t.Fatalf("listener read: %v", err)
	}
	return m
}

// hostileEnv is node-a (and, if asked, node-b) running, the hostile linked
// as node-c, and a sink listening on node-a/db/sink.
type hostileEnv struct {
	c    *cluster.Cluster
	a, b *testAgent
	id   *link.Config // node-c's identity
	h    *hostile
	sink *sink
}

func startHostileEnv(t *testing.T, withB bool) *hostileEnv {
	t.Helper()
	c, err := cluster.Make(shortTempDir(t), hostileSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	e := &hostileEnv{c: c, a: startAgent(t, c.Nodes["node-a"], nil)}
	if withB {
		e.b = startAgent(t, c.Nodes["node-b"], nil)
		waitUp(t, e.a, "node-b")
		waitUp(t, e.b, "node-a")
	}
	e.sink = listenSink(t, c.Nodes["node-a"].Partitions["db"], "sink")
	e.id = hostileIdentity(t, c)
	e.h = dialHostile(t, e.id, e.a)
	return e
}

// accepted opens a channel from the hostile and returns it with the
// listener's end, which must be the next the listener was handed: nothing
// reached the listener before it.
func (e *hostileEnv) accepted(t *testing.T) (*hchan, *sinc.Conn) {
	t.Helper()
	ch := e.h.openChan(t)
	conn := e.sink.next(t)
	if info := conn.Info(); info.ID != ch.acc.Conn || info.RemoteNode != "node-c" || info.RemotePartition != "app" ||
		info.Service != "sink" || info.RemoteProcess.PID != 4242 {
		t.Fatalf("the listener's next channel is %+v, not the one node-a accepted (conn %d)", info, ch.acc.Conn)
	}
	return ch, conn
}

// deliver sends a correctly sealed frame on ch and checks the listener
// reads exactly it next.
func (e *hostileEnv) deliver(t *testing.T, ch *hchan, conn *sinc.Conn, payload []byte) {
	t.Helper()
	ch.send(t, ch.frame(payload))
	if got := readMsg(t, conn); !bytes.Equal(got, payload) {
		t.Fatalf("the listener read %q, want %q", trunc(got), trunc(payload))
	}
}

// goodChannel checks that a new channel from the hostile still opens and
// carries a frame.
func (e *hostileEnv) goodChannel(t *testing.T) {
	t.Helper()
	ch, conn := e.accepted(t)
	e.deliver(t, ch, conn, []byte("still working"))
}

func trunc(b []byte) []byte {
	if len(b) > 40 {
		return b[:40]
	}
	return b
}

// rejectKeys are the counters of the data path's rejections.
var rejectKeys = []string{"rejected_unknown_index", "rejected_wrong_ids", "rejected_bad_epoch", "rejected_auth",
	"rejected_replay", "rejected_credit", "rejected_malformed", "data_frames_in"}

// checkDelta checks that each rejection counter and data_frames_in of a
// moved by exactly want since before (0 where want does not say).
func checkDelta(t *testing.T, a *testAgent, what string, before map[string]uint64, want map[string]uint64) map[string]uint64 {
	t.Helper()
	after := stats(t, a)
	for _, k := range rejectKeys {
		if d := after[k] - before[k]; d != want[k] {
			t.Errorf("%s: %s moved by %d, want %d", what, k, d, want[k])
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return after
}

// TestHostileOpenInAnotherNodesName: node-c opens a channel naming node-b
// as its source (node-a's policy would admit node-b/x): node-a refuses,
// logs it, makes no row, and the listener is handed nothing.
func TestHostileOpenInAnotherNodesName(t *testing.T) {
	e := startHostileEnv(t, false)
	before := stats(t, e.a)
	m := e.h.newOpen()
	m.SrcNode, m.SrcPart = "node-b", "x"
	e.h.refused(t, m, wire.CodeDenied, `source node "node-b" is not the link's node "node-c"`)
	e.a.log.waitFor(t, time.Second, "another node's name", "peer=node-c", "claimed=node-b")
	if rows := conns(t, e.a); len(rows) != 0 {
		t.Fatalf("a refused open left rows: %+v", rows)
	}
	after := stats(t, e.a)
	if after["opens_refused"] != before["opens_refused"]+1 || after["opens_accepted"] != before["opens_accepted"] {
		t.Fatalf("opens counters: before %v after %v", before, after)
	}
	e.sink.none(t)
	e.goodChannel(t) // and the listener's first channel is this good one
}

// TestHostileOpenPartitionNotInCert: node-c opens for partitions its
// certificate does not list (one of node-b's among them).
func TestHostileOpenPartitionNotInCert(t *testing.T) {
	e := startHostileEnv(t, false)
	for _, part := range []string{"x", "rogue", "db"} {
		m := e.h.newOpen()
		m.SrcPart = part
		e.h.refused(t, m, wire.CodeDenied, fmt.Sprintf("partition %q is not in the certificate of node-c", part))
		e.a.log.waitFor(t, time.Second, "certificate does not list", "partition="+part)
	}
	if rows := conns(t, e.a); len(rows) != 0 {
		t.Fatalf("a refused open left rows: %+v", rows)
	}
	e.sink.none(t)
	e.goodChannel(t)
	// Both of node-c's own partitions may open.
	m := e.h.newOpen()
	m.SrcPart = "app2"
	if acc, r := e.h.answer(t, m); acc == nil {
		t.Fatalf("open from node-c/app2 refused: %+v", r)
	}
	if c := e.sink.next(t); c.Info().RemotePartition != "app2" {
		t.Fatalf("channel from app2 handed over as %+v", c.Info())
	}
}

// TestHostileOpenRefusals: destinations that do not exist, and one node-a's
// policy does not allow although a process listens there.
func TestHostileOpenRefusals(t *testing.T) {
	e := startHostileEnv(t, false)
	other := listenSink(t, e.c.Nodes["node-a"].Partitions["other"], "svc")
	for _, tc := range []struct {
		node, part, svc string
		code            wire.Code
		want            string
	}{
		// Policy comes before the partition's existence (TestLeaksOfDeniedOpens).
		{"node-a", "nope", "sink", wire.CodeDenied, "policy of node-a does not allow node-c/app (uid 1000) to reach node-a/nope/sink"},
		{"node-a", "db", "nope", wire.CodeNoSuchService, "no process listens on node-a/db/nope"},
		{"node-a", "other", "svc", wire.CodeDenied, "policy of node-a does not allow node-c/app (uid 1000) to reach node-a/other/svc"},
		{"node-z", "db", "sink", wire.CodeNoSuchNode, "this is node-a, not node-z"},
		{"node-b", "x", "sink", wire.CodeNoSuchNode, "this is node-a, not node-b"},
	} {
		before := stats(t, e.a)
		m := e.h.newOpen()
		m.DstNode, m.DstPart, m.DstSvc = tc.node, tc.part, tc.svc
		e.h.refused(t, m, tc.code, tc.want)
		if s := stats(t, e.a); s["opens_refused"] != before["opens_refused"]+1 {
			t.Fatalf("%s/%s/%s: opens_refused %d → %d", tc.node, tc.part, tc.svc, before["opens_refused"], s["opens_refused"])
		}
	}
	e.a.log.waitFor(t, time.Second, "channel open refused", "to=node-a/other/svc", "code=denied")
	if rows := conns(t, e.a); len(rows) != 0 {
		t.Fatalf("a refused open left rows: %+v", rows)
	}
	e.sink.none(t)
	other.none(t)
	e.goodChannel(t)
}

// TestHostileDuplicateOpen: an Open with the ids of a channel already open
// is refused, whether sent after the first was accepted or right behind it.
func TestHostileDuplicateOpen(t *testing.T) {
	e := startHostileEnv(t, false)
	ch, conn := e.accepted(t)
	dup := *ch.open
	dup.Key = testKey()
	e.h.refused(t, &dup, wire.CodeExists, fmt.Sprintf("channel %d of node-c is already open", dup.Conn))
	dup2 := dup
	dup2.Index++ // another index does not make it another channel
	e.h.refused(t, &dup2, wire.CodeExists, "already open")
	// The first channel is untouched and still carries frames.
	e.deliver(t, ch, conn, []byte("first channel"))

	// Two identical Opens back to back: one channel, one refusal.
	m := e.h.newOpen()
	msg := m.Marshal()
	e.h.sendCtl(t, msg)
	e.h.sendCtl(t, msg)
	isAns := func(b []byte) bool { return isAnswerTo(b, m) }
	e.h.waitCtl(t, "the answer to the first open", isAns)
	eventually(t, 5*time.Second, "both opens answered", func() bool { return e.h.ctlCount(isAns) == 2 })
	var accepts, refusals int
	e.h.mu.Lock()
	for _, b := range e.h.ctl {
		if !isAnswerTo(b, m) {
			continue
		}
		if b[0] == wire.OpAccept {
			accepts++
		} else if r, _ := wire.ParseRefuse(b); r != nil && r.Code == wire.CodeExists {
			refusals++
		}
	}
	e.h.mu.Unlock()
	if accepts != 1 || refusals != 1 {
		t.Fatalf("two identical opens: %d accepts, %d refusals with code exists; want 1 and 1", accepts, refusals)
	}
	if c := e.sink.next(t); c.Info().RemoteNode != "node-c" {
		t.Fatalf("unexpected channel %+v", c.Info())
	}
	e.sink.none(t)
	if rows := conns(t, e.a); len(rows) != 2 {
		t.Fatalf("%d rows, want 2", len(rows))
	}
	e.goodChannel(t)
}

// expectMsgs checks that the listener reads exactly want next, in order.
func expectMsgs(t *testing.T, conn *sinc.Conn, want ...[]byte) {
	t.Helper()
	for i, w := range want {
		if got := readMsg(t, conn); !bytes.Equal(got, w) {
			t.Fatalf("message %d: the listener read %q, want %q", i, trunc(got), trunc(w))
		}
	}
}

// unknownIndex returns a receiving index node-a does not have.
func unknownIndex(t *testing.T, a *testAgent, near uint32) uint32 {
	t.Helper()
	for bit := 31; bit >= 0; bit-- {
		if idx := near ^ 1<<bit; idx != 0 && a.tables.lookupIndex(idx) == nil {
			return idx
		}
	}
	t.Fatal("no unknown index found")
	return 0
}

// TestHostileDataFrames: on channels the hostile opened properly, every
// forged, replayed, misaddressed or mangled frame is rejected and counted
// by its reason, nothing of it reaches the listener, and the channel keeps
// working after each.
func TestHostileDataFrames(t *testing.T) {
	e := startHostileEnv(t, false)
	ch, conn := e.accepted(t)
	s := stats(t, e.a)

	// a. Correct frames are delivered byte-exact, in order.
	e.deliver(t, ch, conn, []byte("hello node-a"))
	big := random(t, hostileWindow/2) // within the window, with the rest
	e.deliver(t, ch, conn, big)
	e.deliver(t, ch, conn, nil) // an empty message is a message
	s = checkDelta(t, e.a, "good frames", s, map[string]uint64{"data_frames_in": 3})

	// node-a seals its direction with the key node-c chose (kC), under a
	// header naming node-c's index and both connection ids.
	if _, err := conn.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	var f []byte
	eventually(t, 5*time.Second, "node-a's data frame", func() bool {
		e.h.mu.Lock()
		defer e.h.mu.Unlock()
		if len(e.h.data) > 0 {
			f = e.h.data[0]
		}
		return f != nil
	})
	hd, sealed, err := wire.ParseDataHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	if hd.Index != ch.open.Index || hd.SrcConn != ch.acc.Conn || hd.DstConn != ch.open.Conn || hd.Counter != 0 || hd.Epoch != 0 {
		t.Fatalf("node-a's frame header %+v", hd)
	}
	nonce := wire.Nonce(hd.Counter)
	if pt, err := ch.toC.Open(nil, nonce[:], sealed, f[:wire.DataHeaderLen]); err != nil || string(pt) != string(asMessage([]byte("pong"))) {
		t.Fatalf("node-a's frame does not open with node-c's key: %q %v", pt, err)
	}
	if _, err := ch.toA.Open(nil, nonce[:], bytes.Clone(sealed), f[:wire.DataHeaderLen]); err == nil {
		t.Fatal("node-a sealed its frame with the key for traffic to itself")
	}

	// b. Replays: at once, after other frames, reordered within the window,
	// and too old for it.
	once := ch.frame([]byte("once"))
	ch.send(t, once)
	ch.send(t, once)
	ch.send(t, ch.frame([]byte("after a replay")))
	expectMsgs(t, conn, []byte("once"), []byte("after a replay"))
	s = checkDelta(t, e.a, "replay at once", s, map[string]uint64{"data_frames_in": 2, "rejected_replay": 1})

	// Frames are taken strictly in counter order: one ahead of the next
	// expected is dropped and node-a asks for a resend from the gap; copies
	// of frames it has are dropped: a copy of a frame it asked for again
	// as a duplicate (what a sender resends on request), a copy of an
	// older one as a replay.
	fa, fb := ch.frame([]byte("a")), ch.frame([]byte("b"))
	ch.send(t, fb) // ahead of a: dropped, resend asked
	ch.send(t, fa)
	ch.send(t, fb) // sent again, as node-a asked
	ch.send(t, fa)
	ch.send(t, once)
	ch.send(t, ch.frame([]byte("after replays")))
	expectMsgs(t, conn, []byte("a"), []byte("b"), []byte("after replays"))
	s = checkDelta(t, e.a, "reordered and replayed", s,
		map[string]uint64{"data_frames_in": 3, "rejected_replay": 1, "duplicate_frames": 1, "rejected_out_of_order": 1})
	eventually(t, 5*time.Second, "node-a asked for a resend from the gap", func() bool {
		e.h.mu.Lock()
		defer e.h.mu.Unlock()
		for _, b := range e.h.ctl {
			if m, err := wire.ParseCredit(b); err == nil && m.Flags&wire.FlagResend != 0 && m.Ack >= ch.ctr-3 {
				return true
			}
		}
		return false
	})

	// A sender may not skip counters: the frame after a gap waits for the
	// frames of the gap, which a forger cannot make.
	old := ch.ctr
	ch.ctr = 5000
	ch.send(t, ch.frame([]byte("jump")))
	ch.ctr = old
	ch.send(t, ch.frame([]byte("no jump")))
	expectMsgs(t, conn, []byte("no jump"))
	s = checkDelta(t, e.a, "a skipped counter", s, map[string]uint64{"data_frames_in": 1, "rejected_out_of_order": 1})

	// c. Forged and mangled frames. Each is made for the next counter and
	// sent before a good frame with that same counter: a frame that fails
	// its checks must not use up the counter.
	payload := []byte("the attacker's payload, never to be delivered")
	good := func() []byte { return sealFrame(ch.toA, ch.hdr(), payload) }
	flip := func(off int, bits byte) func() []byte {
		return func() []byte { f := good(); f[off] ^= bits; return f }
	}
	for _, tc := range []struct {
		name   string
		reason string
		frame  func() []byte
	}{
		{"random key", "rejected_auth", func() []byte { k := testKey(); return sealFrame(testGCM(k[:]), ch.hdr(), payload) }},
		{"node-c's own key (the other direction's)", "rejected_auth", func() []byte { return sealFrame(ch.toC, ch.hdr(), payload) }},
		{"payload bit", "rejected_auth", flip(wire.DataHeaderLen+3, 0x10)},
		{"last payload bit", "rejected_auth", flip(wire.DataHeaderLen+len(payload)-1, 0x80)},
		{"tag bit", "rejected_auth", flip(wire.DataHeaderLen+len(payload)+wire.TagLen-1, 0x01)},
		{"first tag bit", "rejected_auth", flip(wire.DataHeaderLen+len(payload), 0x80)},
		{"counter low bit", "rejected_auth", flip(19, 0x01)},
		{"counter high bit", "rejected_auth", flip(12, 0x80)},
		{"payload cut by a byte", "rejected_auth", func() []byte {
			f := good()
			f = f[:len(f)-1]
			binary.BigEndian.PutUint32(f[0:4], uint32(len(f)-4))
			return f
		}},
		{"FIN flag on an empty frame", "rejected_auth", func() []byte {
			f := sealFrame(ch.toA, ch.hdr(), nil)
			f[5] |= wire.FlagFin
			return f
		}},
		{"epoch bit", "rejected_bad_epoch", flip(7, 0x01)},
		{"epoch, correctly sealed", "rejected_bad_epoch", func() []byte {
			h := ch.hdr()
			h.Epoch = 1
			return sealFrame(ch.toA, h, payload)
		}},
		{"reserved byte", "rejected_malformed", flip(36, 0x01)},
		{"last reserved byte", "rejected_malformed", flip(37, 0x80)},
		{"unknown flag", "rejected_malformed", flip(5, 0x80)},
		{"FIN flag on a frame with payload", "rejected_malformed", flip(5, wire.FlagFin)},
		{"source conn bit", "rejected_wrong_ids", flip(27, 0x01)},
		{"destination conn bit", "rejected_wrong_ids", flip(35, 0x01)},
		{"index", "rejected_unknown_index", func() []byte {
			f := good()
			binary.BigEndian.PutUint32(f[8:12], unknownIndex(t, e.a, ch.acc.Index))
			return f
		}},
	} {
		bad := tc.frame()
		ch.send(t, bad)
		ch.send(t, bad) // twice: still the same reason, not a replay
		next := []byte("good after: " + tc.name)
		ch.send(t, ch.frame(next))
		expectMsgs(t, conn, next)
		s = checkDelta(t, e.a, tc.name, s, map[string]uint64{"data_frames_in": 1, tc.reason: 2})
	}

	// d. Frames addressed to another channel, or to none.
	ch2, conn2 := e.accepted(t)
	s = stats(t, e.a)
	for _, tc := range []struct {
		name   string
		reason string
		frame  func() []byte
	}{
		{"channel 1's frame with channel 2's index", "rejected_wrong_ids", func() []byte {
			f := good()
			binary.BigEndian.PutUint32(f[8:12], ch2.acc.Index)
			return f
		}},
		{"channel 1's key, channel 2's index, resealed", "rejected_wrong_ids", func() []byte {
			h := ch.hdr()
			h.Index = ch2.acc.Index
			return sealFrame(ch.toA, h, payload)
		}},
		{"channel 2's ids, channel 1's key", "rejected_auth", func() []byte {
			return sealFrame(ch.toA, ch2.hdr(), payload)
		}},
		{"channel 2's source conn", "rejected_wrong_ids", func() []byte {
			h := ch.hdr()
			h.SrcConn = ch2.open.Conn
			return sealFrame(ch.toA, h, payload)
		}},
		{"channel 2's destination conn", "rejected_wrong_ids", func() []byte {
			h := ch.hdr()
			h.DstConn = ch2.acc.Conn
			return sealFrame(ch.toA, h, payload)
		}},
		{"node-a's ids swapped", "rejected_wrong_ids", func() []byte {
			h := ch.hdr()
			h.SrcConn, h.DstConn = h.DstConn, h.SrcConn
			return sealFrame(ch.toA, h, payload)
		}},
		{"unknown index, resealed", "rejected_unknown_index", func() []byte {
			h := ch.hdr()
			h.Index = unknownIndex(t, e.a, ch2.acc.Index)
			return sealFrame(ch.toA, h, payload)
		}},
		{"index 0", "rejected_unknown_index", func() []byte {
			h := ch.hdr()
			h.Index = 0
			return sealFrame(ch.toA, h, payload)
		}},
		{"node-c's own index", "rejected_unknown_index", func() []byte {
			h := ch.hdr()
			h.Index = ch.open.Index
			if e.a.tables.lookupIndex(h.Index) != nil {
				h.Index = unknownIndex(t, e.a, h.Index)
			}
			return sealFrame(ch.toA, h, payload)
		}},
	} {
		ch.send(t, tc.frame())
		n1, n2 := []byte("ch1 after: "+tc.name), []byte("ch2 after: "+tc.name)
		ch.send(t, ch.frame(n1))
		ch2.send(t, ch2.frame(n2))
		expectMsgs(t, conn, n1)
		expectMsgs(t, conn2, n2)
		s = checkDelta(t, e.a, tc.name, s, map[string]uint64{"data_frames_in": 2, tc.reason: 1})
	}

	// e. Frames for channels that have ended: closed by the hostile…
	e.h.sendCtl(t, ch2.closeMsg(wire.CodeClosed))
	stale := ch2.frame([]byte("after close"))
	ch2.send(t, stale)
	conn2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := conn2.ReadMessage(); !errors.Is(err, sinc.ErrClosed) {
		t.Fatalf("listener after the peer's Close: %q, %v; want ErrClosed", m, err)
	}
	e.deliver(t, ch, conn, []byte("ch1 after ch2 closed"))
	s = checkDelta(t, e.a, "frame after Close", s, map[string]uint64{"data_frames_in": 1, "rejected_unknown_index": 1})
	// …closed again, or credited: no effect and nothing counted against
	// a channel that is gone.
	e.h.sendCtl(t, ch2.closeMsg(wire.CodeClosed))
	e.h.sendCtl(t, (&wire.Credit{Index: ch2.acc.Index, DstConn: ch2.acc.Conn, SrcConn: ch2.open.Conn, Granted: 1 << 40}).Marshal())
	e.deliver(t, ch, conn, []byte("ch1 after stale control"))
	s = checkDelta(t, e.a, "stale control", s, map[string]uint64{"data_frames_in": 1})

	// …and closed by the listener: node-a sends its FIN, the hostile's next
	// frame finds the process gone and resets the channel, and later frames
	// find no channel.
	ch3, conn3 := e.accepted(t)
	s = stats(t, e.a)
	conn3.Close()
	var fin wire.DataHeader
	eventually(t, 5*time.Second, "node-a's FIN", func() bool {
		e.h.mu.Lock()
		defer e.h.mu.Unlock()
		for _, f := range e.h.data {
			h, sealed, err := wire.ParseDataHeader(f)
			if err == nil && h.Index == ch3.open.Index && h.Flags&wire.FlagFin != 0 {
				nonce := wire.Nonce(h.Counter)
				if _, err := ch3.toC.Open(nil, nonce[:], sealed, f[:wire.DataHeaderLen]); err == nil {
					fin = h
					return true
				}
			}
		}
		return false
	})
	if fin.SrcConn != ch3.acc.Conn || fin.DstConn != ch3.open.Conn {
		t.Fatalf("FIN header %+v", fin)
	}
	ch3.send(t, ch3.frame([]byte("to a closed process")))
	cm := e.h.waitCtl(t, "node-a's Close of channel 3", ch3.isCloseOf)
	if m, _ := wire.ParseClose(cm); m.Code != wire.CodeReset {
		t.Fatalf("node-a closed channel 3 with %s (%q), want reset", m.Code, m.Reason)
	}
	ch3.send(t, ch3.frame([]byte("after the reset")))
	e.deliver(t, ch, conn, []byte("ch1 after ch3 reset"))
	s = checkDelta(t, e.a, "listener closed", s, map[string]uint64{"data_frames_in": 2, "rejected_unknown_index": 1})

	// A FIN from the hostile ends its direction; a frame after it is
	// malformed and not delivered.
	ch4, conn4 := e.accepted(t)
	s = stats(t, e.a)
	ch4.send(t, sealFrame(ch4.toA, func() wire.DataHeader { h := ch4.hdr(); h.Flags = wire.FlagFin; return h }(), nil))
	ch4.ctr++
	conn4.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := conn4.ReadMessage(); err != io.EOF {
		t.Fatalf("listener after the hostile's FIN: %q, %v; want io.EOF", m, err)
	}
	ch4.send(t, ch4.frame([]byte("after FIN")))
	e.deliver(t, ch, conn, []byte("ch1 after ch4 FIN"))
	s = checkDelta(t, e.a, "data after FIN", s, map[string]uint64{"data_frames_in": 2, "rejected_malformed": 1})

	// g. The first channel worked throughout; a new one opens and works.
	if rows := conns(t, e.a); len(rows) != 2 { // channels 1 and 4 (half-closed)
		t.Fatalf("%d rows, want 2: %+v", len(rows), rows)
	}
	e.goodChannel(t)
}

// TestHostileCreditOverrun: node-a grants Window bytes in its Accept and
// more as its process reads; a peer that keeps to that is never refused,
// and one that sends past it has its channel closed with a protocol error
// that the listening process reads, and no byte of the excess delivered.
func TestHostileCreditOverrun(t *testing.T) {
	e := startHostileEnv(t, false)
	const chunk = 16 << 10

	// Within the window, without waiting: all taken.
	ch, conn := e.accepted(t)
	s := stats(t, e.a)
	var sent []([]byte)
	for range hostileWindow / chunk {
		p := random(t, chunk-wire.MessageLenSize)
		sent = append(sent, p)
		ch.send(t, ch.frame(p))
	}
	expectMsgs(t, conn, sent...)
	s = checkDelta(t, e.a, "a window's worth", s, map[string]uint64{"data_frames_in": hostileWindow / chunk})
	// What the process read is granted back, never more.
	eventually(t, 5*time.Second, "credit for what was read", func() bool {
		return ch.credits(t) >= hostileWindow/2 // credit goes back by half windows
	})
	granted := ch.credits(t)
	if granted > hostileWindow {
		t.Fatalf("node-a granted %d bytes for %d read", granted, hostileWindow)
	}
	// The peer may now send the credit it has: a window beyond what it sent.
	sent = sent[:0]
	for n := uint64(0); n+chunk <= granted; n += chunk {
		p := random(t, chunk-wire.MessageLenSize)
		sent = append(sent, p)
		ch.send(t, ch.frame(p))
	}
	expectMsgs(t, conn, sent...)
	s = checkDelta(t, e.a, "the granted credit", s, map[string]uint64{"data_frames_in": uint64(len(sent))})

	// Past the credit. The listener takes the channel but does not read:
	// node-a's writes to it stall once its socket is full, so node-a grants
	// no more, and the hostile keeps to its credit until then.
	ch2, conn2 := e.accepted(t)
	allowed, total := uint64(hostileWindow), uint64(0)
	sent = sent[:0]
	deadline := time.Now().Add(8 * time.Second)
	for {
		for total+chunk <= allowed {
			p := random(t, chunk-wire.MessageLenSize)
			sent = append(sent, p)
			ch2.send(t, ch2.frame(p))
			total += chunk
		}
		moved := false
		for range 30 { // 300ms without new credit: node-a is stalled
			time.Sleep(10 * time.Millisecond)
			if a := hostileWindow + ch2.credits(t); a != allowed {
				allowed, moved = a, true
				break
			}
		}
		if !moved {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node-a kept granting credit to a process that does not read (%d bytes sent)", total)
		}
	}
	// Check node-a's own books: all received, granted what the hostile was
	// told, and holding data the process has not taken.
	nch := e.a.tables.lookupIndex(ch2.acc.Index)
	if nch == nil {
		t.Fatal("channel 2 is gone")
	}
	eventually(t, 5*time.Second, "node-a received all sent", func() bool {
		nch.rmu.Lock()
		defer nch.rmu.Unlock()
		return nch.received == total
	})
	nch.rmu.Lock()
	received, grantedA, delivered := nch.received, nch.granted, nch.deliveredB
	nch.rmu.Unlock()
	if grantedA != allowed || delivered >= received {
		t.Fatalf("node-a: granted %d (hostile told %d), delivered %d of %d received: not stalled", grantedA, allowed, delivered, received)
	}
	t.Logf("stalled after %d bytes, granted %d, delivered %d to the socket", total, allowed, delivered)

	s = stats(t, e.a)
	over := random(t, int(allowed-total)+1) // one byte past the credit
	ch2.send(t, ch2.frame(over))
	cm := e.h.waitCtl(t, "node-a's Close of the overrun channel", ch2.isCloseOf)
	if m, _ := wire.ParseClose(cm); m.Code != wire.CodeProtocol || !strings.Contains(m.Reason, "credit") {
		t.Fatalf("node-a closed the overrun channel with %s (%q), want protocol, naming the credit", m.Code, m.Reason)
	}
	// The listener now reads everything it is given: a prefix of what was
	// sent within the credit, then an error, never a clean end.
	//
	// Known limitation (reported, not fixed here): node-a gives the close
	// record 100ms to enter the process's socket (channel.go, closeSocket).
	// This socket is full, so the reason arrives only because the listener
	// starts reading at once; a process that comes back later reads
	// "agent_gone: the agent closed the channel without a word" instead.
	closed := time.Now()
	conn2.SetReadDeadline(time.Now().Add(8 * time.Second))
	var got [][]byte
	var first time.Time
	for {
		m, err := conn2.ReadMessage()
		if first.IsZero() {
			first = time.Now()
		}
		if err == nil {
			got = append(got, m)
			continue
		}
		t.Logf("the listener read %d of %d messages sent within credit, then: %v", len(got), len(sent), err)
		if err == io.EOF || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the listener of the overrun channel read %v: the channel ended as if cleanly", err)
		}
		if !errors.Is(err, sinc.ErrProtocol) || !strings.Contains(err.Error(), "credit") {
			if late := first.Sub(closed); errors.Is(err, sinc.ErrAgentGone) && late > 50*time.Millisecond {
				t.Logf("the listener came back %s after the Close: the reason was lost (the known limitation above)", late)
			} else {
				t.Errorf("the listener of the overrun channel read %v; want a protocol error naming the credit", err)
			}
		}
		break
	}
	if len(got) > len(sent) {
		t.Fatalf("the listener read %d messages, %d were within credit", len(got), len(sent))
	}
	for i, m := range got {
		if !bytes.Equal(m, sent[i]) {
			t.Fatalf("message %d after the overrun differs from what was sent", i)
		}
	}
	e.a.log.waitFor(t, time.Second, "peer sent past its credit", "peer=node-c")
	ch2.send(t, ch2.frame([]byte("after the overrun")))
	e.deliver(t, ch, conn, []byte("channel 1 after channel 2's overrun"))
	checkDelta(t, e.a, "overrun", s, map[string]uint64{"data_frames_in": 1, "rejected_credit": 1, "rejected_unknown_index": 1})
	if e.a.tables.lookupIndex(ch2.acc.Index) != nil {
		t.Fatal("the overrun channel is still in the tables")
	}
	e.goodChannel(t)
}

// bystander opens a message channel from node-b (a real agent) to an echo
// on node-a, and returns it with a check that it still echoes.
func (e *hostileEnv) bystander(t *testing.T) (*sinc.Conn, func(string)) {
	t.Helper()
	ln, err := (&sinc.ListenConfig{Socket: e.c.Nodes["node-a"].Partitions["db"]}).Listen(ctxT(t), "echo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	echo(t, ln)
	bc, err := (&sinc.Dialer{Socket: e.c.Nodes["node-b"].Partitions["x"], Kind: sinc.Message}).DialContext(ctxT(t), "node-a/db/echo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bc.Close() })
	return bc, func(m string) {
		t.Helper()
		bc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := bc.WriteMessage([]byte(m)); err != nil {
			t.Fatal(err)
		}
		if got, err := bc.ReadMessage(); err != nil || string(got) != m {
			t.Fatalf("node-b's channel: %q, %v", got, err)
		}
	}
}

// TestHostileFramesForAnotherLinksChannel: node-c knows (here: the test
// reads from node-a's tables) everything about a channel between node-b
// and node-a, its key included, and sends its frames and control messages
// over its own link. A channel takes frames only from the link it opened
// on: all are rejected, and the channel carries on.
func TestHostileFramesForAnotherLinksChannel(t *testing.T) {
	e := startHostileEnv(t, true)
	bc, echoOnce := e.bystander(t)
	echoOnce("before")

	var target *channel
	for _, x := range e.a.tables.all() {
		x.mu.Lock()
		if x.state.peer == "node-b" {
			target = x
		}
		x.mu.Unlock()
	}
	if target == nil {
		t.Fatal("node-a has no channel with node-b")
	}
	target.mu.Lock()
	st := target.state
	target.mu.Unlock()
	// node-a's own AEAD for frames to it on that channel: a frame sealed
	// with it is as good as one node-b sealed.
	target.keys.mu.Lock()
	recv := newGCM(target.keys.recvKey())
	target.keys.mu.Unlock()
	ch, conn := e.accepted(t)
	s := stats(t, e.a)

	hd := wire.DataHeader{Index: st.index, Counter: 1 << 40, SrcConn: st.remoteConn, DstConn: target.id}
	if err := e.h.l.SendData(sealFrame(recv, hd, []byte("in node-b's name"))); err != nil {
		t.Fatal(err)
	}
	e.h.sendCtl(t, (&wire.Credit{Index: st.index, DstConn: target.id, SrcConn: st.remoteConn, Granted: 1 << 40}).Marshal())
	e.h.sendCtl(t, (&wire.Close{Index: st.index, DstConn: target.id, SrcConn: st.remoteConn, Code: wire.CodeReset, Reason: "forged"}).Marshal())
	e.h.sendCtl(t, (&wire.Accept{InitIndex: st.index, InitConn: target.id, Index: 7, Conn: 7, Window: 1, Key: testKey()}).Marshal())
	e.h.sendCtl(t, (&wire.Refuse{InitIndex: st.index, InitConn: target.id, Code: wire.CodeDenied, By: "node-b", Reason: "forged"}).Marshal())
	e.deliver(t, ch, conn, []byte("node-c's own channel still works"))
	checkDelta(t, e.a, "another link's channel", s, map[string]uint64{"data_frames_in": 1, "rejected_wrong_ids": 5})
	if e.a.tables.lookupIndex(st.index) != target {
		t.Fatal("node-b's channel was ended by node-c's messages")
	}
	echoOnce("after node-c's forgeries")
	endChannels(t, bc, e.a, "node-b")
}

// endChannels closes c and waits until a has no channel with peer left: a
// channel ends on its own goroutines, not under the agent's shutdown (see
// the race on keyEntry.recv in the report of these tests).
func endChannels(t *testing.T, c *sinc.Conn, a *testAgent, peer string) {
	t.Helper()
	c.Close()
	eventually(t, 5*time.Second, "node-a's channels with "+peer+" ended", func() bool {
		for _, ch := range a.tables.all() {
			ch.mu.Lock()
			p := ch.state.peer
			ch.mu.Unlock()
			if p == peer {
				return false
			}
		}
		return true
	})
}

// TestHostileBadControlMessage: a control message that does not parse
// closes the link it came on, and only that: node-a logs it, ends the
// channels of that link, keeps its link and channels with node-b, and
// node-c can link again.
func TestHostileBadControlMessage(t *testing.T) {
	e := startHostileEnv(t, true)
	bc, echoOnce := e.bystander(t)
	echoOnce("before")
	lb := e.a.link("node-b")

	open := e.h.newOpen().Marshal()
	kind9 := bytes.Clone(open)
	kind9[1] = 9
	for i, tc := range []struct {
		name, want string
		msg        []byte
	}{
		{"truncated Open", "message truncated", open[:len(open)-3]},
		{"Open with trailing bytes", "trailing bytes", append(bytes.Clone(open), 0)},
		{"Open of an unknown kind", "unknown channel kind", kind9},
		{"Open with a bad name", "source node", func() []byte {
			m := e.h.newOpen()
			m.SrcNode = "node/c"
			return m.Marshal()
		}()},
		{"truncated Credit", "message truncated", (&wire.Credit{Index: 1, DstConn: 1, SrcConn: 1, Granted: 1}).Marshal()[:10]},
		{"unknown op", "unknown control op 99", []byte{99, 1, 2, 3}},
	} {
		h := e.h
		if i > 0 {
			h = dialHostile(t, e.id, e.a)
			e.h = h
		}
		ch, conn := e.accepted(t)
		e.deliver(t, ch, conn, []byte("before: "+tc.name))
		s := stats(t, e.a)
		bad, down := logCount(e.a, "peer sent a bad control message", "peer=node-c", tc.want),
			logCount(e.a, "peer link down", "peer=node-c", "bad control message", tc.want)
		h.sendCtl(t, tc.msg)
		select {
		case <-h.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: node-a did not close the link", tc.name)
		}
		eventually(t, 2*time.Second, "node-a logs the bad message and the link's end", func() bool {
			return logCount(e.a, "peer sent a bad control message", "peer=node-c", tc.want) == bad+1 &&
				logCount(e.a, "peer link down", "peer=node-c", "bad control message", tc.want) == down+1
		})
		// The link's channel ends, and its process is told why.
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if m, err := conn.ReadMessage(); !errors.Is(err, sinc.ErrReset) || !strings.Contains(err.Error(), "the link to node-c was lost") {
			t.Fatalf("%s: the listener of node-c's channel read %q, %v; want a reset naming node-c", tc.name, m, err)
		}
		checkDelta(t, e.a, tc.name, s, map[string]uint64{"rejected_malformed": 1})
		if e.a.link("node-b") != lb {
			t.Fatalf("%s: node-a's link to node-b changed", tc.name)
		}
		echoOnce("after: " + tc.name)
	}
	// node-c links again and its channels work.
	e.h = dialHostile(t, e.id, e.a)
	e.goodChannel(t)
	if rows := conns(t, e.a); len(rows) != 2 { // node-b's and the good one
		t.Fatalf("%d rows, want 2: %+v", len(rows), rows)
	}
	endChannels(t, bc, e.a, "node-b")
}

// logCount counts the lines of a's log that contain every one of parts.
func logCount(a *testAgent, parts ...string) int {
	n := 0
	for _, line := range strings.Split(a.log.String(), "\n") {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			n++
		}
	}
	return n
}

// TestOpenSurvivesLinkReplacement: a channel still opening when its peer's
// link is replaced (a rekey, or the peer dialing anew) is not resumed on
// the new link, as nothing of it was sent or received: node-a sends no
// Credit for it (one would name no channel of the peer, whose answer, a
// Close, ended the open), and the Accept that comes on the new link
// completes the open.
func TestOpenSurvivesLinkReplacement(t *testing.T) {
	e := startHostileEnv(t, false)
	start := e.h.mark()
	type result struct {
		c   *sinc.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := (&sinc.Dialer{Socket: e.c.Nodes["node-a"].Partitions["db"], Kind: sinc.Message}).DialContext(ctxT(t), "node-c/app/svc")
		done <- result{c, err}
	}()
	open, err := wire.ParseOpen(e.h.waitCtlFrom(t, start, "node-a's open", func(b []byte) bool { return b[0] == wire.OpOpen }))
	if err != nil {
		t.Fatal(err)
	}
	h2 := dialHostile(t, e.id, e.a)
	eventually(t, 5*time.Second, "node-a took the new link", func() bool {
		l := e.a.link("node-c")
		return l != nil && l.RemoteAddr().String() == h2.l.LocalAddr().String()
	})
	acc := &wire.Accept{InitIndex: open.Index, InitConn: open.Conn, Index: 0x51c0 + hostileIDs.Add(1), Conn: 1 << 40,
		Window: hostileWindow, Key: testKey(), DstProc: wire.Proc{PID: 1, UID: 1000, GID: 1000}}
	h2.sendCtl(t, acc.Marshal())
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the open did not complete")
	}
	if r.err != nil {
		t.Fatalf("open across the link replacement: %v", r.err)
	}
	defer r.c.Close()
	for i, h := range []*hostile{e.h, h2} {
		if n := h.ctlCount(func(b []byte) bool {
			m, err := wire.ParseCredit(b)
			return b[0] == wire.OpCredit && err == nil && m.DstConn == 0
		}); n > 0 {
			t.Fatalf("node-a sent %d Credit messages naming no channel on link %d", n, i+1)
		}
	}
}

// TestHostileMessagesCannotForgeRecords: node-a writes a message frame's
// payload to the process as it is, since a message (its 4-byte length,
// then its bytes) is byte for byte a data record. A peer that puts a
// record type in a length's top byte, to slip a close or FIN record of its
// own making into the process's stream, has the whole frame refused as
// malformed: nothing of it reaches the process, and the channel goes on.
func TestHostileMessagesCannotForgeRecords(t *testing.T) {
	e := startHostileEnv(t, false)
	ch, conn := e.accepted(t)
	forged, _ := json.Marshal(local.Error{Code: "closed", Message: "forged by the peer"})
	record := func(typ byte, b []byte) []byte {
		h := make([]byte, local.RecordHeaderLen)
		local.PutRecordHeader(h, typ, len(b))
		return append(h, b...)
	}
	for _, tc := range []struct {
		name    string
		payload []byte
	}{
		{"a close record alone", record(local.RecClose, forged)},
		{"a FIN record alone", record(local.RecFin, nil)},
		{"a good message, then a close record", slices.Concat(asMessage([]byte("looks fine")), record(local.RecClose, forged))},
		{"a good message, then a FIN record", slices.Concat(asMessage([]byte("looks fine")), record(local.RecFin, nil))},
	} {
		s := stats(t, e.a)
		ch.send(t, sealRaw(ch.toA, ch.hdr(), tc.payload)) // correctly sealed: only the payload is wrong
		next := []byte("after " + tc.name)
		ch.send(t, ch.frame(next))
		expectMsgs(t, conn, next) // not "looks fine", no end, no close
		checkDelta(t, e.a, tc.name, s, map[string]uint64{"data_frames_in": 1, "rejected_malformed": 1})
	}
}
