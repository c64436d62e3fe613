package agent

import (
	"context"
	"errors"
	"runtime"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/wire"
)

// TestHostileRefusesBackToBack: a peer that answers one of node-a's opens
// with a burst of Refuses gets the first taken and the rest dropped. (Each
// Refuse used to be handed to the waiting dial with a blocking send on the
// link's reading goroutine: the third found the one-slot hand-over full,
// and node-a stopped reading node-c for good.)
func TestHostileRefusesBackToBack(t *testing.T) {
	e := startHostileEnv(t, false)
	start := e.h.mark()
	done := make(chan error, 1)
	go func() {
		_, err := (&sinc.Dialer{Socket: e.c.Nodes["node-a"].Partitions["db"], Kind: sinc.Stream}).DialContext(ctxT(t), "node-c/app/svc")
		done <- err
	}()
	open, err := wire.ParseOpen(e.h.waitCtlFrom(t, start, "node-a's open", func(b []byte) bool { return b[0] == wire.OpOpen }))
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		r := &wire.Refuse{InitIndex: open.Index, InitConn: open.Conn, Code: wire.CodeNoSuchService, By: "node-c", Reason: "no such service"}
		e.h.sendCtl(t, r.Marshal())
	}
	select {
	case err := <-done:
		if !errors.Is(err, sinc.ErrNoSuchService) {
			t.Fatalf("dial: %v, want the refusal", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the dial was not answered")
	}
	// node-a still reads node-c: a new open from it is answered.
	e.h.openChan(t)
	e.sink.next(t).Close()
}

// TestHostileAnswerFlood: a peer that sends frames node-a must answer —
// Credits for channels it does not have (each answered by a Close), or
// questions whether an idle link may close (each answered by an Idle) —
// while it reads nothing cannot pile up goroutines in node-a: at most
// maxReplies answers are being written at once, the rest are dropped and
// counted as refused_reply_backlog.
func TestHostileAnswerFlood(t *testing.T) {
	for _, c := range []struct {
		name string
		msg  func(i int) []byte
	}{
		{"credits for unknown channels", func(i int) []byte {
			return (&wire.Credit{Index: 0x7fff0000 + uint32(i), DstConn: uint64(i), SrcConn: uint64(i), Granted: 1}).Marshal()
		}},
		{"idle questions", func(int) []byte { return (&wire.Idle{Step: wire.IdleAsk}).Marshal() }},
	} {
		t.Run(c.name, func(t *testing.T) { answerFlood(t, c.msg) })
	}
}

func answerFlood(t *testing.T, msg func(i int) []byte) {
	e := startHostileEnv(t, false)
	e.h.block = make(chan struct{}) // node-c stops reading
	unblock := func() {
		select {
		case <-e.h.block:
		default:
			close(e.h.block)
		}
	}
	defer unblock()
	base := runtime.NumGoroutine()
	peak := make(chan int, 1)
	ctx, stop := context.WithCancel(context.Background())
	go func() {
		m := 0
		for ctx.Err() == nil {
			m = max(m, runtime.NumGoroutine())
			time.Sleep(time.Millisecond)
		}
		peak <- m
	}()
	const n = 150_000 // answers of tens of bytes: more than the sockets' buffers hold
	for i := range n {
		if err := e.h.l.Send(msg(i)); err != nil {
			break // node-a closed the link: its writes found node-c not reading
		}
	}
	time.Sleep(100 * time.Millisecond) // node-a reads what is on the way
	stop()
	if grew := <-peak - base; grew > 2*maxReplies {
		t.Fatalf("goroutines grew by %d during the flood (bound %d answers being written)", grew, maxReplies)
	}
	eventually(t, 5*time.Second, "answers counted as dropped", func() bool {
		return stats(t, e.a)["refused_reply_backlog"] > 0
	})
	unblock()
}

// TestCreditForEndingChannelIsAnswered: a Credit that finds a channel
// ended but not yet out of the tables — its end's Close sent, perhaps on
// a link that broke under it while the peer resumed the channel on the
// next — is answered with that Close again, its reason intact. (It was
// ignored: TestChannelStateInterleavings, under load, left a channel open
// on node-b for good after its peer had ended it.)
func TestCreditForEndingChannelIsAnswered(t *testing.T) {
	e := startHostileEnv(t, false)
	hc, conn := e.accepted(t)
	defer conn.Close()
	ch := e.a.tables.lookupIndex(hc.acc.Index)
	if ch == nil {
		t.Fatal("node-a has no channel for the hostile's open")
	}
	// The moment inside finish between marking the channel ended and
	// taking it out of the tables, held.
	ch.mu.Lock()
	ch.state.status = statusEnded
	ch.closeErr = &local.Error{Code: wire.CodeReset.String(), Message: "the real reason"}
	ch.mu.Unlock()
	ch.ended.Store(true)
	start := e.h.mark()
	e.h.sendCtl(t, (&wire.Credit{Index: hc.acc.Index, DstConn: hc.acc.Conn, SrcConn: hc.open.Conn, Granted: 1, Flags: wire.FlagResend}).Marshal())
	m, err := wire.ParseClose(e.h.waitCtlFrom(t, start, "node-a's Close again", hc.isCloseOf))
	if err != nil {
		t.Fatal(err)
	}
	if m.Code != wire.CodeReset || m.Reason != "the real reason" {
		t.Fatalf("Close again: %s %q, want reset with the reason of the end", m.Code, m.Reason)
	}
	// An end that told the peer a reason of its own (abortTelling: the
	// peer's process is to read "the remote process aborted …", ours
	// "this process aborted …") is told that one again, not ours.
	ch.mu.Lock()
	ch.closeErr = &local.Error{Code: wire.CodeAborted.String(), Message: "this process aborted the channel"}
	ch.told = &wire.Close{Code: wire.CodeAborted, Reason: "the remote process aborted the channel"}
	ch.mu.Unlock()
	start = e.h.mark()
	e.h.sendCtl(t, (&wire.Credit{Index: hc.acc.Index, DstConn: hc.acc.Conn, SrcConn: hc.open.Conn, Granted: 2, Flags: wire.FlagResend}).Marshal())
	if m, err = wire.ParseClose(e.h.waitCtlFrom(t, start, "node-a's Close again", hc.isCloseOf)); err != nil {
		t.Fatal(err)
	}
	if m.Code != wire.CodeAborted || m.Reason != "the remote process aborted the channel" {
		t.Fatalf("Close again: %s %q, want aborted with the peer's reason", m.Code, m.Reason)
	}
	// Let finish run through, as it would have.
	ch.mu.Lock()
	ch.state.status = statusOpen
	ch.closeErr, ch.told = nil, nil
	ch.mu.Unlock()
	ch.ended.Store(false)
	ch.end(&local.Error{Code: wire.CodeReset.String(), Message: "the real reason"}, true)
}
