package agent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/wire"
)

// dialedByA opens a channel from node-a/db to node-c/app/svc, with the
// hostile (node-c) answering window as its Accept's window and key as the
// key for traffic to it. It returns node-a's process's end and the Open
// and Accept as the hostile saw them.
func (e *hostileEnv) dialedByA(t *testing.T, window uint32) (*sinc.Conn, *wire.Open, *wire.Accept, error) {
	t.Helper()
	start := e.h.mark()
	type result struct {
		c   *sinc.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := (&sinc.Dialer{Socket: e.c.Nodes["node-a"].Partitions["db"], Kind: sinc.Stream}).DialContext(ctxT(t), "node-c/app/svc")
		done <- result{c, err}
	}()
	open, err := wire.ParseOpen(e.h.waitCtlFrom(t, start, "node-a's open", func(b []byte) bool { return b[0] == wire.OpOpen }))
	if err != nil {
		t.Fatal(err)
	}
	acc := &wire.Accept{InitIndex: open.Index, InitConn: open.Conn, Index: 0x61c0 + hostileIDs.Add(1), Conn: 1<<41 + uint64(hostileIDs.Add(1)),
		Window: window, Key: testKey(), DstProc: wire.Proc{PID: 1, UID: 1000, GID: 1000}}
	e.h.sendCtl(t, acc.Marshal())
	select {
	case r := <-done:
		if r.c != nil {
			t.Cleanup(func() { r.c.Close() })
		}
		return r.c, open, acc, r.err
	case <-time.After(10 * time.Second):
		t.Fatal("the open did not complete")
		return nil, nil, nil, nil
	}
}

// TestHostilePeerCannotGrowSendBuffer: a peer that grants the most the
// protocol allows and never acknowledges a frame cannot make node-a hold
// more than its own window of unacknowledged frames for the channel:
// node-a stops reading its process instead. (Before the fix a peer's grant
// was taken as it came: granting 2^62 bytes made the sender keep every
// frame, 926 MB after 768 MiB of traffic; such a grant is now a protocol
// error, TestHostileImpossibleCredit.)
func TestHostilePeerCannotGrowSendBuffer(t *testing.T) {
	e := startHostileEnv(t, false)
	c, open, acc, err := e.dialedByA(t, wire.MaxWindow)
	if err != nil {
		t.Fatal(err)
	}
	// Grant what the protocol allows at most (as the Accept did), again
	// and again, and never acknowledge.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			e.h.l.Send((&wire.Credit{Index: open.Index, DstConn: open.Conn, SrcConn: acc.Conn, Granted: wire.MaxWindow}).Marshal())
		}
	}()
	wrote := make(chan int64, 1)
	go func() {
		buf := make([]byte, 64<<10)
		var n int64
		c.SetWriteDeadline(time.Now().Add(2 * time.Second))
		for {
			k, err := c.Write(buf)
			n += int64(k)
			if err != nil {
				wrote <- n
				return
			}
		}
	}()
	n := <-wrote
	ch := e.a.tables.lookupIndex(open.Index)
	if ch == nil {
		t.Fatal("node-a's channel is gone")
	}
	ch.smu.Lock()
	held, frames := ch.sent-ch.ackedB, len(ch.rtx)
	ch.smu.Unlock()
	window := uint64(e.a.cfg.Limits.Window)
	t.Logf("the process wrote %d bytes in 2s; node-a holds %d bytes in %d unacknowledged frames (window %d)", n, held, frames, window)
	if held > window {
		t.Fatalf("node-a holds %d unacknowledged bytes, more than its window %d", held, window)
	}
	if n > int64(window)+8<<20 { // the window, and what the sockets on the way hold
		t.Fatalf("the process wrote %d bytes: node-a kept reading it though nothing was acknowledged", n)
	}
	if used := e.a.budget.inUse(); used > int64(window) {
		t.Fatalf("node-a's memory budget holds %d bytes for one channel of window %d", used, window)
	}
}

// TestHostileImpossibleCredit: a grant larger than any window beyond what
// was sent, or an acknowledgement of frames never sent, is a protocol
// error: that channel ends (both processes told), and nothing else does.
func TestHostileImpossibleCredit(t *testing.T) {
	e := startHostileEnv(t, false)
	for _, tc := range []struct {
		name   string
		credit func(open *wire.Open, acc *wire.Accept) *wire.Credit
		want   string
	}{
		{"grant of 2^62", func(open *wire.Open, acc *wire.Accept) *wire.Credit {
			return &wire.Credit{Index: open.Index, DstConn: open.Conn, SrcConn: acc.Conn, Granted: 1 << 62}
		}, "more than any window"},
		{"ack of frames never sent", func(open *wire.Open, acc *wire.Accept) *wire.Credit {
			return &wire.Credit{Index: open.Index, DstConn: open.Conn, SrcConn: acc.Conn, Granted: uint64(acc.Window), Ack: 1000}
		}, "only 0 were sent"},
	} {
		c, open, acc, err := e.dialedByA(t, hostileWindow)
		if err != nil {
			t.Fatal(err)
		}
		s := stats(t, e.a)
		start := e.h.mark()
		e.h.sendCtl(t, tc.credit(open, acc).Marshal())
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if !errors.Is(err, sinc.ErrProtocol) || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s: node-a's process read %v; want a protocol error saying %q", tc.name, err, tc.want)
		}
		cm := e.h.waitCtlFrom(t, start, "node-a's Close", func(b []byte) bool {
			m, err := wire.ParseClose(b)
			return err == nil && m.DstConn == acc.Conn
		})
		if m, _ := wire.ParseClose(cm); m.Code != wire.CodeProtocol || !strings.Contains(m.Reason, tc.want) {
			t.Fatalf("%s: node-a told node-c %s %q", tc.name, m.Code, m.Reason)
		}
		if d := stats(t, e.a)["rejected_malformed"] - s["rejected_malformed"]; d != 1 {
			t.Fatalf("%s: rejected_malformed moved by %d, want 1", tc.name, d)
		}
	}
	e.goodChannel(t)
}

// TestHostileImpossibleWindow: an Open or Accept whose window exceeds what
// the protocol allows is refused.
func TestHostileImpossibleWindow(t *testing.T) {
	e := startHostileEnv(t, false)
	m := e.h.newOpen()
	m.Window = wire.MaxWindow + 1
	e.h.refused(t, m, wire.CodeProtocol, "window")
	_, _, _, err := e.dialedByA(t, wire.MaxWindow+1)
	if !errors.Is(err, sinc.ErrProtocol) || !strings.Contains(err.Error(), "window") {
		t.Fatalf("an Accept with a window over the maximum: %v; want a protocol error naming the window", err)
	}
	if n := e.a.tables.len(); n != 0 {
		t.Fatalf("node-a holds %d channels after refusing both", n)
	}
	e.goodChannel(t)
}

// TestHostileResendFlood: a peer that asks again and again for the frames
// it has not acknowledged gets them again once per place in the stream
// (or after a retransmission timeout), not once per request: a stream of
// small Credits cannot make node-a send a window for each.
func TestHostileResendFlood(t *testing.T) {
	e := startHostileEnv(t, false)
	c, open, acc, err := e.dialedByA(t, wire.MaxWindow)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, 48<<10)); err != nil { // frames the peer never acknowledges
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "node-a sent its frames", func() bool { return stats(t, e.a)["data_frames_out"] > 0 })
	s := stats(t, e.a)
	const asks = 200
	for range asks {
		e.h.sendCtl(t, (&wire.Credit{Index: open.Index, DstConn: open.Conn, SrcConn: acc.Conn,
			Granted: wire.MaxWindow, Flags: wire.FlagResend}).Marshal())
	}
	eventually(t, 5*time.Second, "node-a handled every request", func() bool {
		d := stats(t, e.a)
		return d["refused_resend_request_ignored"]-s["refused_resend_request_ignored"]+
			d["retransmitted_frames"]-s["retransmitted_frames"] >= asks-5
	})
	d := stats(t, e.a)
	sent := d["retransmitted_frames"] - s["retransmitted_frames"]
	if sent > 5 {
		t.Fatalf("%d requests to send again made node-a resend %d frames", asks, sent)
	}
	if sent == 0 {
		t.Fatal("node-a honoured no request to send again")
	}
}
