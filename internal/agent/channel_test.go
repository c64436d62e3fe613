package agent

import (
	"bufio"
	"bytes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/wire"
)

// TestStreamAcrossNodes: 1 MiB of random data crosses a stream channel
// between two nodes and comes back byte-exact; both agents record the
// channel in their connection tables with the ids of both processes.
func TestStreamAcrossNodes(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	c := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Stream)

	// While open: one row on each side, naming each other.
	ra, rb := conns(t, p.a), conns(t, p.b)
	if len(ra) != 1 || len(rb) != 1 {
		t.Fatalf("rows: node-a %d, node-b %d; want 1 each", len(ra), len(rb))
	}
	me := uint32(os.Getpid())
	if r := ra[0]; r.Partition != "web" || r.RemoteNode != "node-b" || r.RemotePartition != "db" ||
		r.RemoteService != "echo" || !r.Dialed || r.Process.PID != me || r.RemoteProcess.PID != me ||
		r.Kind != "stream" || r.State != "open" {
		t.Fatalf("node-a row %+v", r)
	}
	if r := rb[0]; r.Partition != "db" || r.Service != "echo" || r.RemoteNode != "node-a" ||
		r.RemotePartition != "web" || r.Dialed || r.Process.UID != uint32(os.Getuid()) {
		t.Fatalf("node-b row %+v", r)
	}
	if info := c.Info(); info.ID != ra[0].ID {
		t.Fatalf("the dialer's Info id %d is not its row's %d", info.ID, ra[0].ID)
	}

	data := random(t, 1<<20)
	got := roundTrip(t, c, data)
	mustEqual(t, "1 MiB echo", got, data)

	// Both FINs crossed: the channel ends on both sides, rows go.
	c.Close()
	eventually(t, 5*time.Second, "rows removed", func() bool {
		return len(conns(t, p.a)) == 0 && len(conns(t, p.b)) == 0
	})
	if p.a.tables.len() != 0 || p.b.tables.len() != 0 {
		t.Fatal("tables not empty after close")
	}
}

// TestMessagesAcrossNodes: 10,000 messages of varied sizes keep their
// boundaries and content both ways.
func TestMessagesAcrossNodes(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	c := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	const n = 10000
	msgs := make([][]byte, n)
	for i := range msgs {
		size := 1 + i%700
		switch i % 1000 {
		case 0:
			size = sinc.MaxMessage // the largest
		case 1:
			size = 0 // an empty message is a message too
		}
		msgs[i] = random(t, size)
	}
	if err := c.WriteMessage(make([]byte, sinc.MaxMessage+1)); !errors.Is(err, sinc.ErrMessageTooLong) {
		t.Fatalf("oversized message: %v", err)
	}
	errc := make(chan error, 1)
	go func() {
		for _, m := range msgs {
			if err := c.WriteMessage(m); err != nil {
				errc <- err
				return
			}
		}
		errc <- c.CloseWrite()
	}()
	for i := range n {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !bytes.Equal(m, msgs[i]) {
			t.Fatalf("message %d: got %d bytes, want %d", i, len(m), len(msgs[i]))
		}
	}
	if _, err := c.ReadMessage(); err != io.EOF {
		t.Fatalf("after the last message: %v, want io.EOF", err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestSameNodeChannel: two partitions of one agent, through the same
// checks, no network.
func TestSameNodeChannel(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-a", "batch", "echo"))
	c := p.mustDial(t, "node-a", "web", "node-a/batch/echo", sinc.Stream)
	data := random(t, 256<<10)
	mustEqual(t, "same-node echo", roundTrip(t, c, data), data)
	s := stats(t, p.a)
	if s["data_frames_in"] == 0 || s["data_frames_out"] == 0 {
		t.Fatalf("same-node frames did not pass the data path: %v", s)
	}
	// Without a rule, another partition of the same node is denied.
	echo(t, p.listen(t, "node-a", "web", "echo"))
	if _, err := p.dial(t, "node-a", "batch", "node-a/web/echo", sinc.Stream); !isOp(err, "dial", sinc.ErrDenied) {
		t.Fatalf("batch → web without a rule: %v", err)
	}
	// Within a partition, no rule is needed.
	c2 := p.mustDial(t, "node-a", "web", "node-a/web/echo", sinc.Stream)
	mustEqual(t, "within a partition", roundTrip(t, c2, []byte("x")), []byte("x"))
}

// TestOpenRefusals: each refusal reaches the dialing process as its own
// error, naming the agent that refused where one did.
func TestOpenRefusals(t *testing.T) {
	specs := append([]cluster.NodeSpec(nil), channelSpecs...)
	specs = append(specs, cluster.NodeSpec{Name: "node-c", Partitions: []string{"x"}})
	// Policy comes first (TestLeaksOfDeniedOpens): web may try any node,
	// and node-b lets it try any of its partitions, so the other refusals
	// are reached.
	specs[0].Extra += "\n[[allow]]\nfrom = \"node-a/web\"\nto = \"*/*/*\"\n"
	specs[1].Extra += "\n[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/*/*\"\n"
	c, err := cluster.Make(shortTempDir(t), specs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	open := func(cfg *configT) { cfg.Timers.Open = 700 * time.Millisecond }
	p := &pair{c: c, a: startAgent(t, c.Nodes["node-a"], open), b: startAgent(t, c.Nodes["node-b"], open)}
	waitUp(t, p.a, "node-b")
	echo(t, p.listen(t, "node-b", "db", "echo"))
	echo(t, p.listen(t, "node-b", "cache", "echo"))

	for _, tc := range []struct {
		part, addr string
		want       error
		by         string
	}{
		{"web", "node-z/db/echo", sinc.ErrNoSuchNode, "node-a"},
		{"web", "node-c/x/echo", sinc.ErrUnreachable, "node-a"}, // configured, never up
		{"web", "node-b/nope/echo", sinc.ErrNoSuchPartition, "node-b"},
		{"web", "node-b/db/nope", sinc.ErrNoSuchService, "node-b"},
		{"batch", "node-b/cache/echo", sinc.ErrDenied, "node-a"}, // node-a's policy
		{"batch", "node-b/db/echo", sinc.ErrDenied, "node-b"},    // node-b's policy
		{"web", "not-an-address", sinc.ErrBadRequest, ""},
	} {
		_, err := p.dial(t, "node-a", tc.part, tc.addr, sinc.Stream)
		var se *sinc.Error
		if !isOp(err, "dial", tc.want) || !errors.As(err, &se) || se.By != tc.by {
			t.Errorf("%s → %s: %v; want %v by %q", tc.part, tc.addr, err, tc.want, tc.by)
		}
	}
	// A denied pair never reaches the destination: node-b logged the
	// refusal and no row was made anywhere.
	p.b.log.waitFor(t, time.Second, "channel open refused", "from=node-a/batch", "code=denied")
	if len(conns(t, p.a)) != 0 || len(conns(t, p.b)) != 0 {
		t.Fatal("a refused open left a row")
	}
}

// TestOpenTimeout: a peer that takes the open and never answers.
func TestOpenTimeout(t *testing.T) {
	c, err := cluster.Make(shortTempDir(t), channelSpecs, fastTimers)
	if err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, c.Nodes["node-a"], func(cfg *configT) { cfg.Timers.Open = 300 * time.Millisecond })
	mute := startMutePeer(t, c.Nodes["node-b"], c.Nodes["node-a"])
	waitUp(t, a, "node-b")
	_, err = (&sinc.Dialer{Socket: c.Nodes["node-a"].Partitions["web"]}).DialContext(ctxT(t), "node-b/db/echo")
	if !isOp(err, "dial", sinc.ErrTimeout) {
		t.Fatalf("dial to a mute peer: %v", err)
	}
	if mute.opens() == 0 {
		t.Fatal("the mute peer never saw the open")
	}
	if a.tables.len() != 0 {
		t.Fatal("a timed-out open left its channel in the tables")
	}
}

// TestHalfClose: after the dialer's CloseWrite the other side reads EOF and
// can still answer.
func TestHalfClose(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "sum")
	go func() {
		c, err := l.AcceptSinc()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c) // until the dialer's CloseWrite
		sum := sha256.Sum256(b)
		c.Write(sum[:])
	}()
	c := p.mustDial(t, "node-a", "web", "node-b/db/sum", sinc.Stream)
	data := random(t, 100000)
	c.Write(data)
	c.CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	mustEqual(t, "answer after half-close", got, want[:])
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("write after CloseWrite succeeded")
	}
}

// TestCloseEndsBothSidesAndZeroesKeys: closing one end ends the other; the
// rows go and the keys are zeroed on both agents.
func TestCloseEndsBothSidesAndZeroesKeys(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "hold")
	accepted := make(chan *sinc.Conn, 1)
	go func() {
		c, err := l.AcceptSinc()
		if err == nil {
			accepted <- c
		}
	}()
	c := p.mustDial(t, "node-a", "web", "node-b/db/hold", sinc.Stream)
	srv := <-accepted
	defer srv.Close()
	ca, cb := p.a.tables.all(), p.b.tables.all()
	if len(ca) != 1 || len(cb) != 1 {
		t.Fatalf("channels: %d, %d", len(ca), len(cb))
	}
	// Each side holds the key the other chose for traffic to it.
	ka, kb := &ca[0].keys, &cb[0].keys
	if !bytes.Equal(ka.sendKey(), kb.recvKey()) || !bytes.Equal(kb.sendKey(), ka.recvKey()) ||
		bytes.Equal(ka.sendKey(), ka.recvKey()) {
		t.Fatal("keys are not receiver-chosen per direction")
	}
	ka.mu.Lock()
	kb.mu.Lock()
	slotA, slotB := ka.slot, kb.slot // the protected memory that held them
	kb.mu.Unlock()
	ka.mu.Unlock()
	c.Close()
	// The other end reads EOF: the dialer's FIN.
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(srv); err != nil {
		t.Fatalf("server read after the dialer closed: %v", err)
	}
	srv.Close()
	eventually(t, 5*time.Second, "both channels ended", func() bool {
		return p.a.tables.len() == 0 && p.b.tables.len() == 0
	})
	for _, k := range []*keyEntry{ka, kb} {
		k.mu.Lock()
		zero := k.slot == nil && k.send == nil && k.recv == nil
		k.mu.Unlock()
		if !zero {
			t.Fatal("keys not dropped after close")
		}
	}
	for _, s := range [][]byte{slotA, slotB} {
		if !bytes.Equal(s, make([]byte, len(s))) {
			t.Fatal("key memory not zeroed after close")
		}
	}
}

// TestPeerAbortReachesProcess: a process that leaves without a FIN (its
// socket closed by the agent's abort on the other side) is seen as a reset,
// with the reason.
func TestListenerGoneMidChannel(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "drop")
	go func() {
		c, err := l.AcceptSinc()
		if err == nil {
			c.Read(make([]byte, 1))
			c.Close() // closes after one byte, unread data behind it
		}
	}()
	c := p.mustDial(t, "node-a", "web", "node-b/db/drop", sinc.Stream)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var err error
	for i := 0; i < 1000 && err == nil; i++ { // keep writing until the channel breaks
		_, err = c.Write(make([]byte, 4096))
		time.Sleep(time.Millisecond)
	}
	buf := make([]byte, 10)
	for err == nil {
		_, err = c.Read(buf)
	}
	if !errors.Is(err, sinc.ErrReset) && err != io.EOF {
		t.Fatalf("dialer after the listener closed: %v, want EOF or a reset", err)
	}
	eventually(t, 5*time.Second, "channels ended", func() bool { return p.a.tables.len() == 0 && p.b.tables.len() == 0 })
}

// TestStalledReaderStallsOnlyItsChannel: a process that stops reading
// stalls its own channel only; the agent holds at most a window for it.
func TestStalledReaderStallsOnlyItsChannel(t *testing.T) {
	p := startPair(t, channelSpecs)
	stalled := p.listen(t, "node-b", "db", "stalled")
	held := make(chan *sinc.Conn, 1)
	go func() {
		c, err := stalled.AcceptSinc()
		if err == nil {
			held <- c // never read
		}
	}()
	echo(t, p.listen(t, "node-b", "db", "echo"))

	s := p.mustDial(t, "node-a", "web", "node-b/db/stalled", sinc.Stream)
	srv := <-held
	defer srv.Close()
	// Fill the stalled channel until writes block.
	s.SetWriteDeadline(time.Now().Add(time.Second))
	var sent int
	for {
		n, err := s.Write(make([]byte, 64<<10))
		sent += n
		if err != nil {
			break
		}
	}
	// A busy channel on the same link still flows.
	c := p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Stream)
	data := random(t, 4<<20)
	mustEqual(t, "busy channel beside a stalled one", roundTrip(t, c, data), data)

	// node-b holds no more than one window for the stalled channel.
	var ch *channel
	for _, x := range p.b.tables.all() {
		if x.conn.Service == "stalled" {
			ch = x
		}
	}
	if ch == nil {
		t.Fatal("stalled channel not found")
	}
	ch.rmu.Lock()
	held2 := ch.received - ch.deliveredB
	queued := 0
	for _, it := range ch.inq {
		queued += len(it.data)
	}
	ch.rmu.Unlock()
	if held2 > uint64(ch.window) || queued > int(ch.window) {
		t.Fatalf("agent holds %d bytes (%d queued) for a stalled channel, window %d", held2, queued, ch.window)
	}
	if sent < int(ch.window) {
		t.Fatalf("only %d bytes went before the writer blocked; window %d", sent, ch.window)
	}
	t.Logf("stalled channel: %d bytes written before blocking, agent holds %d (window %d)", sent, held2, ch.window)
}

// TestConnsShowsOnlyOwnPartition: a process sees its partition's rows; the
// admin socket sees all.
func TestConnsShowsOnlyOwnPartition(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-a", "batch", "echo"))
	echo(t, p.listen(t, "node-b", "db", "echo"))
	p.mustDial(t, "node-a", "web", "node-a/batch/echo", sinc.Stream)
	p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Stream)
	eventually(t, 5*time.Second, "3 rows on node-a", func() bool { return len(conns(t, p.a)) == 3 })
	for part, want := range map[string]int{"web": 2, "batch": 1} {
		rows, err := sinc.Connections(ctxT(t), p.sock("node-a", part))
		if err != nil {
			t.Fatal(err)
		}
		if len(rows) != want {
			t.Fatalf("%s sees %d rows, want %d", part, len(rows), want)
		}
		for _, r := range rows {
			if r.Partition != part {
				t.Fatalf("%s sees a row of %s", part, r.Partition)
			}
		}
	}
	// A row, as the agent writes it on the socket, carries these fields and
	// no other: nothing of the key table (not even epochs: those are the
	// admin view's), nothing of the channel state table.
	var ans struct {
		OK    bool
		Conns []map[string]any
	}
	if raw := rawAnswer(t, p.sock("node-a", "web"), `{"v":2,"op":"conns"}`); json.Unmarshal(raw, &ans) != nil || !ans.OK || len(ans.Conns) != 2 {
		t.Fatalf("conns answer: %s", raw)
	}
	allowed := map[string]bool{"id": true, "partition": true, "process": true, "service": true, "remote_node": true,
		"remote_partition": true, "remote_process": true, "remote_service": true, "kind": true, "dialed": true,
		"state": true, "created": true, "bytes_out": true, "bytes_in": true, "records_out": true, "records_in": true}
	for _, r := range ans.Conns {
		for f := range r {
			if !allowed[f] {
				t.Fatalf("a connection row carries the field %q: %v", f, r)
			}
		}
	}
	// A partition with no rows answers an empty list, not no list.
	if raw := rawAnswer(t, p.sock("node-b", "cache"), `{"v":2,"op":"conns"}`); string(raw) != `{"ok":true,"conns":[]}` {
		t.Fatalf("conns answer with no rows: %s", raw)
	}
}

// rawAnswer sends one request line on a partition socket and returns the
// agent's answer line as it wrote it.
func rawAnswer(t *testing.T, socket, req string) []byte {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req+"\n"); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		t.Fatalf("answer to %s: %v", req, err)
	}
	return bytes.TrimSuffix(line, []byte("\n"))
}

func TestListenerRules(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "svc")
	if _, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(t), "svc"); !isOp(err, "listen", sinc.ErrExists) {
		t.Fatalf("second listener: %v", err)
	}
	if l.Addr().String() != "node-b/db/svc" {
		t.Fatalf("listener addr %q", l.Addr())
	}
	l.Close()
	eventually(t, 5*time.Second, "service freed", func() bool {
		l2, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(t), "svc")
		if err == nil {
			l2.Close()
		}
		return err == nil
	})
	for _, bad := range []string{"", "a/b", strings.Repeat("x", 64), "-x"} {
		if _, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(t), bad); !isOp(err, "listen", sinc.ErrBadRequest) {
			t.Errorf("listen %q: %v", bad, err)
		}
	}
}

// TestManyChannelsOneLink: channels in parallel, both kinds, all exact.
func TestManyChannelsOneLink(t *testing.T) {
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kind := sinc.Stream
			if i%2 == 1 {
				kind = sinc.Message
			}
			c, err := p.dial(t, "node-a", "web", "node-b/db/echo", kind)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if kind == sinc.Stream {
				data := random(t, 64<<10+i)
				got := roundTrip(t, c, data)
				if !bytes.Equal(got, data) {
					errs <- fmt.Errorf("channel %d: stream differs", i)
				}
				return
			}
			for j := range 200 {
				m := []byte(fmt.Sprintf("channel %d message %d", i, j))
				c.WriteMessage(m)
				got, err := c.ReadMessage()
				if err != nil || !bytes.Equal(got, m) {
					errs <- fmt.Errorf("channel %d message %d: %q %v", i, j, got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// pumps counts the goroutines running a channel's pumps, in every agent of
// this process.
func pumps() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	count := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("agent.(*channel).outbound")) || bytes.Contains(g, []byte("agent.(*channel).inbound")) {
			count++
		}
	}
	return count
}

// aeads counts the AEADs an agent's channels hold.
func aeads(a *testAgent) int {
	count := 0
	for _, ch := range a.tables.all() {
		ch.rmu.Lock()
		ch.keys.mu.Lock()
		for _, x := range []cipher.AEAD{ch.keys.send, ch.keys.recv, ch.keys.old} {
			if x != nil {
				count++
			}
		}
		ch.keys.mu.Unlock()
		ch.rmu.Unlock()
	}
	return count
}

// heldFrames counts the sent frames an agent's channels hold: waiting for
// acknowledgement, or acknowledged and not yet back in the free list.
func heldFrames(a *testAgent) int {
	count := 0
	for _, ch := range a.tables.all() {
		ch.smu.Lock()
		count += len(ch.rtx) + len(ch.acked)
		ch.smu.Unlock()
	}
	return count
}

// TestIdleChannelsHoldNoPumpsAEADsOrFrames: a channel with nothing to move
// holds no goroutine, no AEAD and no sent frame in either agent, only its
// keys. Sending on it starts its pumps again (the poller sees the
// process's socket readable) and makes its AEADs from the keys; a
// half-close of a channel gone idle is seen too.
func TestIdleChannelsHoldNoPumpsAEADsOrFrames(t *testing.T) {
	defer func(d time.Duration) { idleSweep = d }(idleSweep)
	idleSweep = 50 * time.Millisecond
	p := startPair(t, channelSpecs)
	echo(t, p.listen(t, "node-b", "db", "echo"))
	const n = 40
	conns := make([]*sinc.Conn, n)
	for i := range conns {
		conns[i] = p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Message)
	}
	idle := func() {
		t.Helper()
		eventually(t, 5*time.Second, "no pump left on idle channels", func() bool {
			if pumps() == 0 {
				return true
			}
			if os.Getenv("SINC_DEBUG_PUMPS") != "" {
				buf := make([]byte, 1<<20)
				t.Logf("%s", buf[:runtime.Stack(buf, true)])
			}
			return false
		})
		eventually(t, 5*time.Second, "no AEAD left on idle channels", func() bool { return aeads(p.a)+aeads(p.b) == 0 })
		eventually(t, 5*time.Second, "no sent frame held by idle channels", func() bool { return heldFrames(p.a)+heldFrames(p.b) == 0 })
	}
	idle()
	for round := range 3 {
		for i, c := range conns {
			want := fmt.Sprintf("round %d channel %d", round, i)
			if err := c.WriteMessage([]byte(want)); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if m, err := c.ReadMessage(); err != nil || string(m) != want {
				t.Fatalf("round %d channel %d: got %q, %v", round, i, m, err)
			}
		}
		if n := aeads(p.a) + aeads(p.b); n == 0 {
			t.Fatal("no AEAD on channels in use") // the count would prove nothing
		}
		idle()
	}
	for _, c := range conns {
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if m, err := c.ReadMessage(); err != io.EOF {
			t.Fatalf("channel %d after half-close: %q, %v; want EOF", i, m, err)
		}
	}
}

// TestFreeListsAreBounded: the data path's free lists (full-size frames,
// read buffers, receive buffers) keep at most their capacity, drop the
// rest to the garbage collector, and hand back what they kept; a small
// frame never goes in.
func TestFreeListsAreBounded(t *testing.T) {
	drain := func() {
		for len(frames) > 0 {
			<-frames
		}
		for len(readers) > 0 {
			<-readers
		}
		for len(dataBufs) > 0 {
			<-dataBufs
		}
	}
	drain()
	defer drain()
	putFrame(getFrame(smallFrame)) // exact size: not kept
	if len(frames) != 0 {
		t.Fatalf("a small frame went into the free list")
	}
	var held [][]byte
	for range cap(frames) + 10 {
		held = append(held, make([]byte, 0, wire.MaxDataFrame))
	}
	for _, f := range held {
		putFrame(f)
	}
	if len(frames) != cap(frames) {
		t.Fatalf("frame free list holds %d, want its bound %d", len(frames), cap(frames))
	}
	if f := getFrame(smallFrame + 1); len(f) != wire.DataHeaderLen+smallFrame+1+wire.TagLen || &f[:1][0] != &held[0][:1][0] {
		t.Fatalf("getFrame did not reuse the first frame kept (len %d)", len(f))
	}
	for range cap(readers) + 10 {
		putReader(bufio.NewReaderSize(nil, outboundBuffer))
	}
	for range cap(dataBufs) + 10 {
		putDataBuf(make([]byte, 0, wire.MaxPayload))
	}
	putDataBuf(make([]byte, 10)) // not the full size: not kept
	if len(readers) != cap(readers) || len(dataBufs) != cap(dataBufs) {
		t.Fatalf("free lists hold %d readers (bound %d), %d receive buffers (bound %d)",
			len(readers), cap(readers), len(dataBufs), cap(dataBufs))
	}
}
