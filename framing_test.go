package sinc

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/local"
)

// These tests put a Conn on one end of a socket pair and play the agent on
// the other end by hand, to cut records exactly where a deadline falls.

// record is one record as the agent reads it.
type record struct {
	typ  byte
	data []byte
}

// readRecord reads one record the way the agent does: a header it checks,
// then exactly the payload.
func readRecord(r io.Reader) (record, error) {
	var h [local.RecordHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return record{}, err
	}
	typ, n, err := local.ParseRecordHeader(h[:])
	if err != nil {
		return record{}, err
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return record{}, err
	}
	return record{typ, b}, nil
}

// TestWriteDeadlineCommitsRecord: a write deadline that passes after part of
// a record reached the agent leaves the record committed: Write counts it,
// the next Write sends its rest first, and the agent reads whole records,
// the same bytes, in order.
func TestWriteDeadlineCommitsRecord(t *testing.T) {
	for _, kind := range []Kind{Stream, Message} {
		a, b := socketPair(t)
		a.SetWriteBuffer(4096) // the socket takes a few KiB: a record goes in parts
		c, err := newConn(a, kind, nil, "test", false)
		if err != nil {
			t.Fatal(err)
		}
		first := make([]byte, MaxMessage)
		for i := range first {
			first[i] = byte(i * 7)
		}
		c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		n, err := c.Write(first)
		if !errors.Is(err, os.ErrDeadlineExceeded) || n != len(first) || !strings.Contains(err.Error(), "a record was begun") {
			t.Fatalf("%s: a record begun when the deadline passed: n %d, %v; want n %d and the deadline", kind, n, err, len(first))
		}
		// Past the deadline nothing new starts, and nothing is lost.
		if n, err := c.Write([]byte("lost?")); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%s: write past the deadline: %d %v", kind, n, err)
		}
		got := make(chan []record, 1)
		go func() {
			var rs []record
			for {
				r, err := readRecord(b)
				if err != nil {
					got <- rs
					return
				}
				rs = append(rs, r)
			}
		}()
		c.SetWriteDeadline(time.Time{})
		if n, err := c.Write([]byte("after")); n != 5 || err != nil {
			t.Fatalf("%s: write after the deadline: %d %v", kind, n, err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		rs := <-got
		want := []record{{local.RecData, first}, {local.RecData, []byte("after")}, {local.RecFin, []byte{}}}
		if len(rs) != len(want) {
			t.Fatalf("%s: the agent read %d records, want %d", kind, len(rs), len(want))
		}
		for i := range want {
			if rs[i].typ != want[i].typ || !bytes.Equal(rs[i].data, want[i].data) {
				t.Fatalf("%s: record %d: type %d, %d bytes; want type %d, %d bytes", kind, i, rs[i].typ, len(rs[i].data), want[i].typ, len(want[i].data))
			}
		}
	}
}

// TestCloseWriteFinishesRecord: CloseWrite after a deadline sends the
// committed rest, then the fin.
func TestCloseWriteFinishesRecord(t *testing.T) {
	a, b := socketPair(t)
	a.SetWriteBuffer(4096)
	c, _ := newConn(a, Stream, nil, "test", false)
	defer c.Close()
	data := bytes.Repeat([]byte("0123456789abcdef"), 8192) // two records
	c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	n, err := c.Write(data)
	if !errors.Is(err, os.ErrDeadlineExceeded) || n != local.MaxRecord {
		t.Fatalf("write: %d %v; want the first record counted", n, err)
	}
	got := make(chan []byte, 1)
	go func() {
		var all []byte
		for {
			r, err := readRecord(b)
			if err != nil || r.typ != local.RecData {
				got <- all
				return
			}
			all = append(all, r.data...)
		}
	}()
	c.SetWriteDeadline(time.Time{})
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if all := <-got; !bytes.Equal(all, data[:n]) {
		t.Fatalf("the agent read %d bytes before the fin, want the %d counted", len(all), n)
	}
}

// TestReadResumesAcrossDeadlines: a read deadline that passes with part of
// a header, a message, a dropped message or a close record read loses
// nothing: the next read goes on from there.
func TestReadResumesAcrossDeadlines(t *testing.T) {
	short := func(c *Conn) { c.SetReadDeadline(time.Now().Add(30 * time.Millisecond)) }
	timedOut := func(t *testing.T, what string, n int, err error) {
		t.Helper()
		if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%s: %d, %v; want a timeout", what, n, err)
		}
	}
	t.Run("message", func(t *testing.T) {
		a, b := socketPair(t)
		c, _ := newConn(a, Message, nil, "test", false)
		defer c.Close()
		rec := recordBytes(local.RecData, []byte("0123456789"))
		buf := make([]byte, 64)
		b.Write(rec[:2]) // half a header
		short(c)
		n, err := c.Read(buf)
		timedOut(t, "half a header", n, err)
		b.Write(rec[2:9]) // the rest of the header, half the message
		short(c)
		n, err = c.Read(buf)
		timedOut(t, "half a message", n, err)
		b.Write(rec[9:])
		c.SetReadDeadline(time.Time{})
		if n, err := c.Read(buf); err != nil || string(buf[:n]) != "0123456789" {
			t.Fatalf("the message: %q %v", buf[:n], err)
		}

		// The same through ReadMessage, switching from Read halfway.
		b.Write(rec[:7])
		short(c)
		n, err = c.Read(buf)
		timedOut(t, "Read of half a message", n, err)
		short(c)
		_, err = c.ReadMessage()
		timedOut(t, "ReadMessage of half a message", 0, err)
		b.Write(rec[7:])
		c.SetReadDeadline(time.Time{})
		if m, err := c.ReadMessage(); err != nil || string(m) != "0123456789" {
			t.Fatalf("ReadMessage: %q %v", m, err)
		}

		// A message too long for the buffer is dropped, even when its
		// bytes come after the deadline; the next one is read whole.
		b.Write(rec[:8])
		short(c)
		if _, err := c.Read(buf[:4]); !errors.Is(err, ErrMessageTooLong) {
			t.Fatalf("short buffer: %v", err)
		}
		b.Write(append(rec[8:], recordBytes(local.RecData, []byte("ok"))...))
		c.SetReadDeadline(time.Time{})
		if n, err := c.Read(buf[:4]); err != nil || string(buf[:n]) != "ok" {
			t.Fatalf("after a dropped message: %q %v", buf[:n], err)
		}

		// A close record in parts: its reason arrives whole.
		why, _ := json.Marshal(local.Error{Code: "reset", Message: "the destination process closed the channel"})
		cr := recordBytes(local.RecClose, why)
		b.Write(cr[:10])
		short(c)
		n, err = c.Read(buf)
		timedOut(t, "half a close record", n, err)
		b.Write(cr[10:])
		c.SetReadDeadline(time.Time{})
		if _, err := c.Read(buf); !errors.Is(err, ErrReset) || !strings.Contains(err.Error(), "destination process closed") {
			t.Fatalf("the close record: %v", err)
		}
	})
	t.Run("stream", func(t *testing.T) {
		a, b := socketPair(t)
		c, _ := newConn(a, Stream, nil, "test", false)
		defer c.Close()
		rec := recordBytes(local.RecData, []byte("0123456789"))
		b.Write(rec[:3])
		short(c)
		n, err := c.Read(make([]byte, 64))
		timedOut(t, "part of a header", n, err)
		b.Write(rec[3:])
		b.Write(recordBytes(local.RecFin, nil))
		c.SetReadDeadline(time.Time{})
		if all, err := io.ReadAll(c); err != nil || string(all) != "0123456789" {
			t.Fatalf("the stream: %q %v", all, err)
		}
	})
}

// TestReadRandomCuts: records written in random pieces with random read
// deadlines read back exactly, for both kinds (a seeded PRNG makes the
// bytes and the cuts; the reader checks every byte).
func TestReadRandomCuts(t *testing.T) {
	for _, kind := range []Kind{Stream, Message} {
		a, b := socketPair(t)
		c, _ := newConn(a, kind, nil, "test", false)
		rng := rand.New(rand.NewPCG(7, uint64(kind)))
		var msgs [][]byte
		var wire []byte
		for range 150 {
			m := make([]byte, rng.IntN(2500))
			for i := range m {
				m[i] = byte(rng.Uint32())
			}
			msgs = append(msgs, m)
			wire = append(wire, recordBytes(local.RecData, m)...)
		}
		wire = append(wire, recordBytes(local.RecFin, nil)...)
		cuts := rand.New(rand.NewPCG(8, uint64(kind)))
		go func() {
			for len(wire) > 0 {
				k := min(len(wire), 1+cuts.IntN(700))
				b.Write(wire[:k])
				wire = wire[k:]
				time.Sleep(time.Duration(cuts.IntN(300)) * time.Microsecond)
			}
		}()
		var got [][]byte
		var stream []byte
		timeouts := 0
		buf := make([]byte, 4096)
		for {
			c.SetReadDeadline(time.Now().Add(time.Duration(rng.IntN(400)) * time.Microsecond))
			var n int
			var err error
			var m []byte
			if kind == Message && len(got)%2 == 1 {
				m, err = c.ReadMessage()
			} else {
				p := buf
				if kind == Stream {
					p = buf[:1+rng.IntN(len(buf)-1)]
				}
				n, err = c.Read(p)
				if kind == Stream && n > 0 {
					stream = append(stream, buf[:n]...)
				}
				if kind == Message && err == nil {
					m = append([]byte{}, buf[:n]...)
				}
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				timeouts++
				continue
			}
			if errors.Is(err, ErrMessageTooLong) {
				t.Fatalf("message %d dropped: buffers here are long enough", len(got))
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", kind, err)
			}
			if kind == Message {
				got = append(got, m)
			}
		}
		c.Close()
		if kind == Stream {
			got = [][]byte{stream}
			msgs = [][]byte{bytes.Join(msgs, nil)}
		}
		if len(got) != len(msgs) {
			t.Fatalf("%s: read %d messages, want %d", kind, len(got), len(msgs))
		}
		for i := range msgs {
			if !bytes.Equal(got[i], msgs[i]) {
				t.Fatalf("%s: message %d differs", kind, i)
			}
		}
		if timeouts < 20 {
			t.Fatalf("%s: only %d deadlines passed: the test did not cut records", kind, timeouts)
		}
		t.Logf("%s: %d deadlines passed", kind, timeouts)
	}
}

// TestRecordPathAllocs: writing and reading a record allocate nothing
// (the receive buffer comes from its free list, the writev vector is the
// Conn's).
func TestRecordPathAllocs(t *testing.T) {
	a, b := socketPair(t)
	w, _ := newConn(a, Stream, nil, "test", false)
	r, _ := newConn(b, Stream, nil, "test", false)
	p := make([]byte, 1024)
	q := make([]byte, 1024)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := w.Write(p); err != nil {
			t.Fatal(err)
		}
		// The other end reads the record as a Conn would read the agent's.
		if _, err := io.ReadFull(r, q); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0 {
		t.Fatalf("%.1f allocations per record written and read", allocs)
	}
}
