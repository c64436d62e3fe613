package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"
)

func sampleOpen() *Open {
	m := &Open{Kind: Stream, Index: 7, Conn: 9, Window: 1 << 18, SrcNode: "node-a", SrcPart: "web",
		SrcProc: Proc{1, 2, 3}, DstNode: "node-b", DstPart: "db", DstSvc: "pg"}
	m.Key[0] = 0xAA
	return m
}

func TestControlRoundTrip(t *testing.T) {
	o := sampleOpen()
	if got, err := ParseOpen(o.Marshal()); err != nil || *got != *o {
		t.Fatalf("Open: %+v %v", got, err)
	}
	a := &Accept{InitIndex: 1, InitConn: 2, Index: 3, Conn: 4, Window: 5, DstProc: Proc{6, 7, 8}}
	a.Key[31] = 1
	if got, err := ParseAccept(a.Marshal()); err != nil || *got != *a {
		t.Fatalf("Accept: %+v %v", got, err)
	}
	r := &Refuse{InitIndex: 1, InitConn: 2, Code: CodeDenied, By: "node-b", Reason: "policy"}
	if got, err := ParseRefuse(r.Marshal()); err != nil || *got != *r {
		t.Fatalf("Refuse: %+v %v", got, err)
	}
	c := &Close{Index: 1, DstConn: 2, SrcConn: 3, Code: CodeReset, Reason: "gone"}
	if got, err := ParseClose(c.Marshal()); err != nil || *got != *c {
		t.Fatalf("Close: %+v %v", got, err)
	}
	rk := &Rekey{Index: 1, DstConn: 2, SrcConn: 3, Epoch: 4}
	rk.Key[5] = 6
	if got, err := ParseRekey(rk.Marshal()); err != nil || *got != *rk {
		t.Fatalf("Rekey: %+v %v", got, err)
	}
	cr := &Credit{Index: 1, DstConn: 2, SrcConn: 3, Granted: 4, Ack: 5, Flags: FlagResend}
	if got, err := ParseCredit(cr.Marshal()); err != nil || *got != *cr {
		t.Fatalf("Credit: %+v %v", got, err)
	}
	for _, step := range []byte{IdleAsk, IdleYes, IdleNo} {
		m := &Idle{Step: step}
		if got, err := ParseIdle(m.Marshal()); err != nil || *got != *m {
			t.Fatalf("Idle: %+v %v", got, err)
		}
	}
}

func TestControlRejects(t *testing.T) {
	good := sampleOpen().Marshal()
	for i := range good {
		if _, err := ParseOpen(good[:i]); err == nil {
			t.Fatalf("truncated Open of %d bytes accepted", i)
		}
	}
	if _, err := ParseOpen(append(bytes.Clone(good), 0)); err == nil {
		t.Fatal("Open with a trailing byte accepted")
	}
	bad := sampleOpen()
	bad.Kind = 9
	if _, err := ParseOpen(bad.Marshal()); err == nil {
		t.Fatal("Open of an unknown kind accepted")
	}
	bad = sampleOpen()
	bad.SrcNode = "node/a"
	if _, err := ParseOpen(bad.Marshal()); err == nil {
		t.Fatal("Open with a bad node name accepted")
	}
	if _, err := ParseClose([]byte{OpClose, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 10, 0xff, 0xff}); err == nil {
		t.Fatal("Close with a reason over the maximum accepted")
	}
	if _, err := ParseCredit([]byte{OpOpen}); err == nil {
		t.Fatal("an Open parsed as Credit")
	}
	for _, b := range [][]byte{{OpIdle}, {OpIdle, 0}, {OpIdle, 4}, {OpIdle, IdleAsk, 0}, {OpClose, IdleAsk}} {
		if _, err := ParseIdle(b); err == nil {
			t.Fatalf("Idle %x accepted", b)
		}
	}
}

func TestDataHeader(t *testing.T) {
	h := DataHeader{Flags: FlagFin, Epoch: 3, Index: 0xdeadbeef, Counter: 1 << 40, SrcConn: 5, DstConn: 6}
	f := make([]byte, DataHeaderLen+TagLen)
	h.Put(f, 0)
	got, sealed, err := ParseDataHeader(f)
	if err != nil || got != h || len(sealed) != TagLen {
		t.Fatalf("%+v %d %v", got, len(sealed), err)
	}
	f[5] = 0x80
	if _, _, err := ParseDataHeader(f); !errors.Is(err, ErrFlags) {
		t.Fatalf("unknown flag: %v", err)
	}
	f[5] = FlagFin
	f2 := append(bytes.Clone(f), 1)
	if _, _, err := ParseDataHeader(f2); !errors.Is(err, ErrFinData) {
		t.Fatalf("FIN with data: %v", err)
	}
	f[36] = 1
	if _, _, err := ParseDataHeader(f); err == nil {
		t.Fatal("reserved bytes not checked")
	}
	if _, _, err := ParseDataHeader(f[:DataHeaderLen]); !errors.Is(err, ErrShortData) {
		t.Fatalf("short frame: %v", err)
	}
}

// FuzzControl: no decoder panics, and what one accepts re-encodes to the
// same bytes.
func FuzzControl(f *testing.F) {
	f.Add(sampleOpen().Marshal())
	f.Add((&Accept{Index: 1}).Marshal())
	f.Add((&Refuse{Code: CodeDenied, By: "n", Reason: "r"}).Marshal())
	f.Add((&Close{Reason: "x"}).Marshal())
	f.Add((&Credit{Granted: 1, Ack: 2}).Marshal())
	f.Add([]byte{OpOpen, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		check := func(enc []byte, err error) {
			if err == nil && !bytes.Equal(enc, b) {
				t.Fatalf("accepted %x re-encodes as %x", b, enc)
			}
		}
		if m, err := ParseOpen(b); err == nil {
			check(m.Marshal(), nil)
		}
		if m, err := ParseAccept(b); err == nil {
			check(m.Marshal(), nil)
		}
		if m, err := ParseRefuse(b); err == nil {
			check(m.Marshal(), nil)
		}
		if m, err := ParseClose(b); err == nil {
			check(m.Marshal(), nil)
		}
		if m, err := ParseCredit(b); err == nil {
			check(m.Marshal(), nil)
		}
		if m, err := ParseRekey(b); err == nil {
			check(m.Marshal(), nil)
		}
		if m, err := ParseIdle(b); err == nil {
			check(m.Marshal(), nil)
		}
	})
}

// FuzzDataHeader: the header decoder never panics and accepts only what
// re-encodes identically.
func FuzzDataHeader(f *testing.F) {
	good := make([]byte, DataHeaderLen+TagLen+3)
	(&DataHeader{Index: 1, Counter: 2}).Put(good, 3)
	f.Add(good)
	f.Add(good[:DataHeaderLen])
	f.Fuzz(func(t *testing.T, b []byte) {
		h, sealed, err := ParseDataHeader(b)
		if err != nil {
			return
		}
		out := make([]byte, len(b))
		copy(out[DataHeaderLen:], sealed)
		h.Put(out, len(sealed)-TagLen)
		if !bytes.Equal(out[4:DataHeaderLen], b[4:DataHeaderLen]) {
			t.Fatalf("header %x re-encodes as %x", b[:DataHeaderLen], out[:DataHeaderLen])
		}
	})
}

// TestCountMessages: a message payload's count, and every malformed one
// refused: a length cut short, a length past the payload, a length past
// the bound (which is also how a record type other than data, in the
// length's top byte, is refused).
func TestCountMessages(t *testing.T) {
	msg := func(n int) []byte { return append(binary.BigEndian.AppendUint32(nil, uint32(n)), make([]byte, n)...) }
	for _, tc := range []struct {
		name    string
		payload []byte
		n       int
		ok      bool
	}{
		{"empty payload", nil, 0, true},
		{"one empty message", msg(0), 1, true},
		{"three messages", slices.Concat(msg(1), msg(0), msg(300)), 3, true},
		{"the largest message", msg(1000), 1, true},
		{"length cut short", msg(5)[:3], 0, false},
		{"length past the payload", msg(5)[:8], 0, false},
		{"a good message, then a cut length", slices.Concat(msg(2), []byte{0, 0}), 1, false},
		{"length past the bound", msg(1001), 0, false},
		{"a record type in the top byte", binary.BigEndian.AppendUint32(nil, 2<<24|4), 0, false},
	} {
		n, ok := CountMessages(tc.payload, 1000)
		if n != tc.n || ok != tc.ok {
			t.Errorf("%s: %d, %v; want %d, %v", tc.name, n, ok, tc.n, tc.ok)
		}
	}
}
