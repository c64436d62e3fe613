package local

import (
	"errors"
	"testing"
)

func TestParseAddr(t *testing.T) {
	a, err := ParseAddr("node-b/db/pg")
	if err != nil || a != (Addr{"node-b", "db", "pg"}) || a.String() != "node-b/db/pg" {
		t.Fatalf("%+v %v", a, err)
	}
	for _, bad := range []string{"", "a/b", "a/b/c/d", "a//c", "/b/c", "a/b/ c", "a/b/c\n"} {
		if _, err := ParseAddr(bad); err == nil {
			t.Errorf("ParseAddr(%q) succeeded", bad)
		}
	}
}

func TestRecordHeader(t *testing.T) {
	var b [4]byte
	for _, tc := range []struct {
		typ byte
		n   int
		err error
	}{
		{RecData, 0, nil}, {RecData, MaxRecord, nil}, {RecData, MaxRecord + 1, ErrRecordLen},
		{RecFin, 0, nil}, {RecFin, 1, ErrRecordLen},
		{RecClose, 100, nil}, {RecClose, MaxRequest + 1, ErrRecordLen},
		{7, 0, ErrRecordType},
	} {
		PutRecordHeader(b[:], tc.typ, tc.n)
		typ, n, err := ParseRecordHeader(b[:])
		if !errors.Is(err, tc.err) || (err == nil && (typ != tc.typ || n != tc.n)) {
			t.Errorf("type %d len %d: got %d %d %v", tc.typ, tc.n, typ, n, err)
		}
	}
}

// FuzzRecordHeader: whatever four bytes a process sends, the header check
// never panics and never passes a length over its type's bound.
func FuzzRecordHeader(f *testing.F) {
	f.Add([]byte{0, 1, 0, 0})
	f.Add([]byte{1, 0, 0, 0})
	f.Add([]byte{2, 0, 0x10, 0})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 4 {
			return
		}
		typ, n, err := ParseRecordHeader(b)
		if err == nil && (n > MaxRecord || typ > RecClose || (typ == RecFin && n != 0)) {
			t.Fatalf("accepted type %d length %d", typ, n)
		}
	})
}

// FuzzParseRequest: any line a process sends is refused or is a request
// of this version with only known fields.
func FuzzParseRequest(f *testing.F) {
	f.Add([]byte(`{"v":2,"op":"open","to":"node-b/db/pg","kind":"stream"}` + "\n"))
	f.Add([]byte(`{"v":2,"op":"listen","service":"pg"}`))
	f.Add([]byte(`{"v":2,"op":"conns"}{"v":1}`))
	f.Add([]byte(`{"v":2}`))
	f.Add([]byte(`{"v":1,"key":"x"}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := ParseRequest(line)
		if err == nil && (r.V < MinVersion || r.V > Version) {
			t.Fatalf("accepted version %d", r.V)
		}
	})
}

func TestParseRequest(t *testing.T) {
	for _, bad := range []string{`{"v":2,"op":"conns"}{"v":2}`, `{"v":1,"op":"conns"}`, `{"v":4,"op":"conns"}`, `{"v":2,"key":"x"}`,
		`{"v":2,"op":"open","to":"a/b/c","ring":true}`, `{"v":3,"op":"conns","ring":true}`, `[1]`, ``} {
		if _, err := ParseRequest([]byte(bad)); err == nil {
			t.Errorf("ParseRequest(%q) succeeded", bad)
		}
	}
	if r, err := ParseRequest([]byte(`{"v":2,"op":"open","to":"a/b/c"}` + "\n")); err != nil || r.To != "a/b/c" {
		t.Fatalf("%+v %v", r, err)
	}
	if r, err := ParseRequest([]byte(`{"v":3,"op":"listen","service":"s","ring":true}` + "\n")); err != nil || !r.Ring {
		t.Fatalf("%+v %v", r, err)
	}
}
