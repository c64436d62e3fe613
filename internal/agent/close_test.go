package agent

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/local"
)

// rawChannel opens a channel by speaking the local protocol by hand, as a
// client in another language would, and returns its socket.
func rawChannel(t *testing.T, socket, to, kind string) *net.UnixConn {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	req, _ := json.Marshal(local.Request{V: local.Version, Op: local.OpOpen, To: to, Kind: kind})
	if _, err := c.Write(append(req, '\n')); err != nil {
		t.Fatal(err)
	}
	// The answer, byte by byte: nothing after it may be consumed.
	var line []byte
	b := make([]byte, 1)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(line) == 0 || line[len(line)-1] != '\n' {
		if _, err := c.Read(b); err != nil {
			t.Fatalf("answer: %v", err)
		}
		line = append(line, b[0])
	}
	c.SetReadDeadline(time.Time{})
	var r local.Response
	if err := json.Unmarshal(line, &r); err != nil || !r.OK {
		t.Fatalf("open %s: %s", to, line)
	}
	return c.(*net.UnixConn)
}

func writeRecord(t *testing.T, c net.Conn, typ byte, p []byte) {
	t.Helper()
	b := make([]byte, local.RecordHeaderLen+len(p))
	local.PutRecordHeader(b, typ, len(p))
	copy(b[local.RecordHeaderLen:], p)
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
}

// readRecord reads one record from a raw channel socket.
func readRecord(t *testing.T, r io.Reader) (byte, []byte) {
	t.Helper()
	var h [local.RecordHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		t.Fatalf("record header: %v", err)
	}
	typ, n, err := local.ParseRecordHeader(h[:])
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		t.Fatalf("record payload: %v", err)
	}
	return typ, p
}

// acceptNext returns the next channel l is handed.
func acceptNext(t *testing.T, l *sinc.Listener) *sinc.Conn {
	t.Helper()
	c, err := l.AcceptSinc()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestStreamEndsOnlyByFin: a process whose socket closes without a fin —
// it crashed, or closed without ending its side — ends the channel as a
// reset at the other end, never as a clean end-of-stream that would make a
// truncated stream look whole; shutdown(SHUT_WR) and a fin record are
// clean ends, and the reading side goes on.
func TestStreamEndsOnlyByFin(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "sink")
	web := p.sock("node-a", "web")

	// Closed without a fin: the other end reads what was sent, then a reset
	// that says so.
	c := rawChannel(t, web, "node-b/db/sink", "stream")
	srv := acceptNext(t, l)
	writeRecord(t, c, local.RecData, []byte("half of what I meant to say"))
	c.Close()
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(srv)
	if string(got) != "half of what I meant to say" || !errors.Is(err, sinc.ErrReset) || !strings.Contains(err.Error(), "without a fin") {
		t.Fatalf("after the writer closed without a fin the reader got %q, %v; want the bytes, then a reset saying so", got, err)
	}

	// shutdown(SHUT_WR): a fin. The reader sees a clean end and can still
	// answer; the writer reads the answer and the other side's fin.
	c = rawChannel(t, web, "node-b/db/sink", "stream")
	srv = acceptNext(t, l)
	writeRecord(t, c, local.RecData, []byte("all of it"))
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(srv); string(got) != "all of it" || err != nil {
		t.Fatalf("after shutdown(SHUT_WR) the reader got %q, %v; want the bytes and a clean end", got, err)
	}
	srv.Write([]byte("answer"))
	srv.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	if typ, b := readRecord(t, br); typ != local.RecData || string(b) != "answer" {
		t.Fatalf("the half-closed writer read record %d %q, want the answer", typ, b)
	}
	if typ, _ := readRecord(t, br); typ != local.RecFin {
		t.Fatalf("then record %d, want the other side's fin", typ)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after the fin: %v, want the socket closed", err)
	}

	// A fin record, then the socket closed: a clean end too.
	c = rawChannel(t, web, "node-b/db/sink", "stream")
	srv = acceptNext(t, l)
	writeRecord(t, c, local.RecData, []byte("said"))
	writeRecord(t, c, local.RecFin, nil)
	c.Close()
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(srv); string(got) != "said" || err != nil {
		t.Fatalf("after a fin and close the reader got %q, %v; want the bytes and a clean end", got, err)
	}
}

// TestProcessAbort: a process's close record aborts the channel: the other
// process is told `aborted`, with the message the aborting one gave, and
// by which node; the aborting one is told it aborted.
func TestProcessAbort(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "sink")
	c := rawChannel(t, p.sock("node-a", "web"), "node-b/db/sink", "message")
	srv := acceptNext(t, l)
	writeRecord(t, c, local.RecData, []byte("first"))
	writeRecord(t, c, local.RecClose, []byte(`{"message":"the user pressed cancel\u0007"}`))
	if m, err := srv.ReadMessage(); err != nil || string(m) != "first" {
		t.Fatalf("read %q, %v", m, err)
	}
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := srv.ReadMessage()
	var se *sinc.Error
	if !errors.Is(err, sinc.ErrAborted) || !errors.As(err, &se) || se.By != "node-a" ||
		se.Message != "the remote process aborted the channel: the user pressed cancel" {
		t.Fatalf("the other process read %#v (%v); want aborted by node-a with the message", se, err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	typ, b := readRecord(t, c)
	var le local.Error
	if typ != local.RecClose || json.Unmarshal(b, &le) != nil || le.Code != "aborted" || !strings.Contains(le.Message, "this process aborted") {
		t.Fatalf("the aborting process read record %d %s; want a close record saying it aborted", typ, b)
	}
}

// TestMessageChannelClosedAfterReply: a client that reads its replies and
// closes without waiting for the other side's fin ends the channel
// cleanly on both agents — it had everything — and the server reads a
// clean end (before the fix both agents ended it as a reset).
func TestMessageChannelClosedAfterReply(t *testing.T) {
	p := startPair(t, channelSpecs)
	l := p.listen(t, "node-b", "db", "rpc")
	const n = 20
	served := make(chan error, n)
	go func() {
		for range n {
			c, err := l.AcceptSinc()
			if err != nil {
				served <- err
				return
			}
			req, err := c.ReadMessage()
			if err == nil {
				err = c.WriteMessage(append([]byte("re: "), req...))
			}
			if err == nil {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err = c.ReadMessage(); err == io.EOF {
					err = nil
				} else if err == nil {
					err = errors.New("a message after the request")
				}
			}
			c.Close()
			served <- err
		}
	}()
	for range n {
		c, err := p.dial(t, "node-a", "web", "node-b/db/rpc", sinc.Message)
		if err != nil {
			t.Fatal(err)
		}
		c.WriteMessage([]byte("question"))
		if m, err := c.ReadMessage(); err != nil || string(m) != "re: question" {
			t.Fatalf("reply %q, %v", m, err)
		}
		c.Close() // without waiting for the server's fin
		if err := <-served; err != nil {
			t.Fatalf("the server: %v; want the client's clean end", err)
		}
	}
	eventually(t, 5*time.Second, "every channel ended", func() bool { return p.a.tables.len() == 0 && p.b.tables.len() == 0 })
	for _, a := range []*testAgent{p.a, p.b} {
		if n := logCount(a, "channel ended", "code=reset"); n != 0 {
			t.Fatalf("%s ended %d of the channels as a reset:\n%s", a.node.Name, n, a.log)
		}
		if n := logCount(a, "broke off a record"); n != 0 {
			t.Fatalf("%s said a process broke off a record", a.node.Name)
		}
	}
}
