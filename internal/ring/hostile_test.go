package ring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Each test here is an attack by the process on the agent's side of a
// ring, made as a process can make it: by writing the shared memory
// through a mapping of its own, at any moment. The agent's side must
// refuse with an error wrapping ErrCorrupt (ErrEnded for a word of another
// generation), and must not act on what it refused: its private indices
// stay as they were.

// wantCorrupt fails unless err wraps ErrCorrupt and says what.
func wantCorrupt(t testing.TB, err error, what string) {
	t.Helper()
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err = %v, want one wrapping ErrCorrupt", err)
	}
	if !strings.Contains(err.Error(), what) {
		t.Fatalf("err = %q, want it to say %q", err, what)
	}
}

// putHeader writes a record header at ring position pos, as a process can.
func putHeader(data []byte, pos uint64, typ byte, n uint32) {
	var h [RecordHeaderLen]byte
	binary.BigEndian.PutUint32(h[:], uint32(typ)<<24|n)
	for i, b := range h {
		data[(pos+uint64(i))%uint64(len(data))] = b
	}
}

// TestHostileHeadBackwards: a producer's index that moves backwards is
// refused, and the consumer goes on from what it saw before.
func TestHostileHeadBackwards(t *testing.T) {
	s := newSlot(t)
	w := ctlOf(s.process(t).hdr, Up)
	p, c := s.pair(Up)
	p.Put(0, payload(0, 96))
	publish(t, p)
	mustAvail(t, c, 100)
	take(t, c, 0, payload(0, 96))
	release(t, c)
	p.Put(1, payload(1, 196))
	publish(t, p) // head 300, tail 100
	mustAvail(t, c, 200)

	for _, h := range []uint64{299, 101, 100, 99, 0} {
		atomic.StoreUint64(w.head, wd(h))
		n, err := c.Avail()
		if n != 0 {
			t.Errorf("head %d: Avail = %d with an error", h, n)
		}
		wantCorrupt(t, err, "producer index "+itoa(h))
		if c.Buffered() != 200 {
			t.Fatalf("head %d: Buffered = %d after the refusal, want 200 (as before)", h, c.Buffered())
		}
	}
	// Sleep looks at the index too, and refuses it the same way, with
	// its flag down.
	if sleep, err := c.Sleep(); sleep || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Sleep = %v, %v; want false, ErrCorrupt", sleep, err)
	}
	if f := atomic.LoadUint64(w.sleep); f != wd(0) {
		t.Fatalf("sleep flag = %#x after Sleep refused the index", f)
	}
	// The consumer's own state is intact: the record is still there.
	atomic.StoreUint64(w.head, wd(300))
	mustAvail(t, c, 200)
	take(t, c, 1, payload(1, 196))
	if got := atomic.LoadUint64(w.tail); got != wd(100) {
		t.Fatalf("shared tail = %d, want 100: the consumer released nothing more", got)
	}
}

func itoa(v uint64) string { return strconv.FormatUint(v, 10) }

// TestHostileHeadTooFarAhead: a producer's index more than the ring's
// size ahead of what was consumed is refused; exactly the size (a full
// ring) is not.
func TestHostileHeadTooFarAhead(t *testing.T) {
	s := newSlot(t)
	w := ctlOf(s.process(t).hdr, Up)
	p, c := s.pair(Up)
	p.Put(0, payload(0, 96))
	publish(t, p)
	mustAvail(t, c, 100)
	take(t, c, 0, payload(0, 96)) // tail 100, not yet released
	for _, h := range []uint64{100 + MinSize + 1, 100 + 2*MinSize, 1 << 47, 1<<48 - 1} {
		atomic.StoreUint64(w.head, wd(h))
		n, err := c.Avail()
		if n != 0 {
			t.Errorf("head %d: Avail = %d with an error", h, n)
		}
		wantCorrupt(t, err, "producer index "+itoa(h))
		if c.Buffered() != 0 {
			t.Fatalf("head %d: Buffered = %d after the refusal, want 0", h, c.Buffered())
		}
	}
	atomic.StoreUint64(w.head, wd(100+MinSize))
	mustAvail(t, c, MinSize)

	// A fresh consumer: one byte more than the ring holds.
	s2 := newSlot(t)
	w2 := ctlOf(s2.process(t).hdr, Down)
	_, c2 := s2.pair(Down)
	atomic.StoreUint64(w2.head, wd(MinSize+1))
	_, err := c2.Avail()
	wantCorrupt(t, err, "ring of 131072")
}

// TestHostileHeadReadOnce: the consumer judges a record against the index
// it read, not against one the producer writes after.
func TestHostileHeadReadOnce(t *testing.T) {
	s := newSlot(t)
	ev := s.process(t)
	w := ctlOf(ev.hdr, Up)
	_, c := s.pair(Up)
	putHeader(ev.data[Up], 0, 0, 200)   // a record of 200 bytes...
	atomic.StoreUint64(w.head, wd(100)) // ...of which 96 are published
	mustAvail(t, c, 100)
	atomic.StoreUint64(w.head, wd(204)) // now all of it, but not seen yet
	_, _, err := c.Next()
	wantCorrupt(t, err, "runs past the 96 bytes published")
	if c.Buffered() != 100 {
		t.Fatalf("Buffered = %d, want 100: the index read once", c.Buffered())
	}
	mustAvail(t, c, 204)
	if typ, n, err := c.Next(); typ != 0 || n != 200 || err != nil {
		t.Fatalf("Next = %d, %d, %v; want 0, 200, nil", typ, n, err)
	}
}

// TestHostileRecordTooLong: a record longer than the consumer takes is
// refused, whatever the type byte beside its length.
func TestHostileRecordTooLong(t *testing.T) {
	s := newSlot(t)
	ev := s.process(t)
	w := ctlOf(ev.hdr, Up)
	_, c := s.pair(Up)
	small := NewConsumer(s.hdr, Up, s.data[Up], 100, testGen)
	atomic.StoreUint64(w.head, wd(MinSize)) // the whole ring published
	mustAvail(t, c, MinSize)
	mustAvail(t, small, MinSize)
	for _, tc := range []struct {
		c   *Consumer
		typ byte
		n   uint32
		bad bool
	}{
		{c, 0, testMax, false},
		{c, 0xff, testMax, false},
		{c, 0, testMax + 1, true},
		{c, 0xff, testMax + 1, true},
		{c, 0, MinSize - RecordHeaderLen, true}, // fits what is published
		{c, 0, 0xffffff, true},
		{small, 1, 100, false},
		{small, 1, 101, true},
	} {
		putHeader(ev.data[Up], 0, tc.typ, tc.n)
		typ, n, err := tc.c.Next()
		if tc.bad {
			if n != 0 {
				t.Errorf("length %d: Next = %d with an error", tc.n, n)
			}
			wantCorrupt(t, err, "record of "+itoa(uint64(tc.n))+" bytes, max")
		} else if err != nil || typ != tc.typ || n != int(tc.n) {
			t.Fatalf("header %d, %d: Next = %d, %d, %v", tc.typ, tc.n, typ, n, err)
		}
	}
}

// TestHostileRecordPastPublished: a record whose length runs past what
// was published is refused, by one byte, and across the ring's end.
func TestHostileRecordPastPublished(t *testing.T) {
	for _, start := range []uint64{0, MinSize - 2, 5*MinSize - 1} {
		s := newSlot(t)
		ev := s.process(t)
		w := ctlOf(ev.hdr, Down)
		// The consumer starts at start (a ring used before).
		atomic.StoreUint64(w.tail, wd(start))
		atomic.StoreUint64(w.head, wd(start))
		_, c := s.pair(Down)
		putHeader(ev.data[Down], start, 2, 100)
		atomic.StoreUint64(w.head, wd(start+RecordHeaderLen+99))
		mustAvail(t, c, RecordHeaderLen+99)
		_, _, err := c.Next()
		wantCorrupt(t, err, "record of 100 bytes runs past the 99 bytes published")
		atomic.StoreUint64(w.head, wd(start+RecordHeaderLen+100))
		mustAvail(t, c, RecordHeaderLen+100)
		if typ, n, err := c.Next(); typ != 2 || n != 100 || err != nil {
			t.Fatalf("start %d: Next = %d, %d, %v; want 2, 100, nil", start, typ, n, err)
		}
	}
}

// TestHostileShortPublished: fewer bytes published than a record header
// are refused, at the start and after a record.
func TestHostileShortPublished(t *testing.T) {
	for k := uint64(1); k < RecordHeaderLen; k++ {
		s := newSlot(t)
		ev := s.process(t)
		w := ctlOf(ev.hdr, Up)
		_, c := s.pair(Up)
		atomic.StoreUint64(w.head, wd(k))
		mustAvail(t, c, int(k))
		_, _, err := c.Next()
		wantCorrupt(t, err, itoa(k)+" bytes published: less than a record header")

		putHeader(ev.data[Up], 0, 0, 10)
		atomic.StoreUint64(w.head, wd(14+k))
		mustAvail(t, c, int(14+k))
		take(t, c, 0, make([]byte, 10))
		_, _, err = c.Next()
		wantCorrupt(t, err, "less than a record header")
		if c.Buffered() != int(k) {
			t.Fatalf("Buffered = %d, want %d", c.Buffered(), k)
		}
	}
}

// TestHostileLengthRewrittenAfterNext: the process rewrites a record's
// header after the consumer read it; the consumer acts on what it read
// (its private n), so it reads the record it checked and finds the next
// one where it is.
func TestHostileLengthRewrittenAfterNext(t *testing.T) {
	for _, bad := range []uint32{0, 7, 0xffffff} {
		s := newSlot(t)
		ev := s.process(t)
		p, c := s.pair(Up)
		a, b := payload(1, 100), payload(2, 50)
		p.Put(3, a)
		p.Put(4, b)
		publish(t, p)
		mustAvail(t, c, 158)
		typ, n, err := c.Next()
		if err != nil || typ != 3 || n != 100 {
			t.Fatalf("Next = %d, %d, %v; want 3, 100, nil", typ, n, err)
		}
		putHeader(ev.data[Up], 0, 9, bad) // the process rewrites it
		got := make([]byte, n)
		c.Read(got, 0)
		if string(got) != string(a) {
			t.Fatalf("length rewritten to %d: the payload read differs at %d", bad, firstDiff(got, a))
		}
		c.Skip(RecordHeaderLen + n)
		if c.Buffered() != 54 {
			t.Fatalf("Buffered = %d after the first record, want 54", c.Buffered())
		}
		take(t, c, 4, b)
		if c.Buffered() != 0 {
			t.Fatalf("Buffered = %d after both records, want 0", c.Buffered())
		}
		release(t, c)
		if got := atomic.LoadUint64(ctlOf(ev.hdr, Up).tail); got != wd(158) {
			t.Fatalf("released %d bytes, want 158", got)
		}
	}
}

// TestHostileTailBackwards: a consumer's index that moves backwards is
// refused by the producer, whose own view is unchanged.
func TestHostileTailBackwards(t *testing.T) {
	s := newSlot(t)
	w := ctlOf(s.process(t).hdr, Down)
	p, c := s.pair(Down)
	for i := range 3 {
		p.Put(0, payload(i, 100))
	}
	publish(t, p)
	mustAvail(t, c, 312)
	take(t, c, 0, payload(0, 100))
	take(t, c, 0, payload(1, 100))
	release(t, c) // tail 208
	mustFree(t, p, MinSize-104)

	for _, tl := range []uint64{207, 104, 0} {
		atomic.StoreUint64(w.tail, wd(tl))
		n, err := p.Free()
		if n != 0 {
			t.Errorf("tail %d: Free = %d with an error", tl, n)
		}
		wantCorrupt(t, err, "consumer index "+itoa(tl))
		if p.Idle() {
			t.Fatalf("tail %d: Idle = true", tl)
		}
		wait, err := p.WaitRoom(MinSize)
		if wait || !errors.Is(err, ErrCorrupt) {
			t.Fatalf("tail %d: WaitRoom = %v, %v; want false, ErrCorrupt", tl, wait, err)
		}
		if f := atomic.LoadUint64(w.wait); f != wd(0) {
			t.Fatalf("tail %d: wait flag = %#x after WaitRoom refused the index", tl, f)
		}
		if p.Pending() != 104 {
			t.Fatalf("tail %d: Pending = %d, want 104 (as before)", tl, p.Pending())
		}
	}
	atomic.StoreUint64(w.tail, wd(208))
	mustFree(t, p, MinSize-104)
}

// TestHostileTailPastPublished: a consumer's index past what the producer
// published is refused, even when it is within what was put.
func TestHostileTailPastPublished(t *testing.T) {
	s := newSlot(t)
	w := ctlOf(s.process(t).hdr, Down)
	p, _ := s.pair(Down)
	for i := range 3 {
		p.Put(0, payload(i, 100))
	}
	publish(t, p)             // published 312
	p.Put(0, payload(3, 100)) // put 416
	for _, tl := range []uint64{313, 400, 416, 417, MinSize, 1<<48 - 1} {
		atomic.StoreUint64(w.tail, wd(tl))
		_, err := p.Free()
		wantCorrupt(t, err, "consumer index "+itoa(tl)+": it was 0, and 312 is published")
	}
	atomic.StoreUint64(w.tail, wd(312))
	mustFree(t, p, MinSize-104)
	if p.Idle() {
		t.Fatal("Idle = true with a record put and not consumed")
	}
	if p.Pending() != 0 {
		t.Fatalf("Pending = %d, want 0", p.Pending())
	}
}

// TestHostileConsumerNeverConsumes: a consumer that never moves its index
// leaves the producer no room, and the producer, going by Free, never
// writes over what is not consumed.
func TestHostileConsumerNeverConsumes(t *testing.T) {
	s := newSlot(t)
	p, _ := s.pair(Down)
	rng := rand.New(rand.NewPCG(3, 3))
	var want []byte // the ring's contents, record after record
	for seq := 0; ; seq++ {
		free, err := p.Free()
		if err != nil {
			t.Fatal(err)
		}
		if free < RecordHeaderLen {
			break
		}
		n := min(rng.IntN(5000), free-RecordHeaderLen)
		if rest := free - RecordHeaderLen - n; rest < RecordHeaderLen {
			n += rest // fill the ring to the last byte
		}
		b := payload(seq, n)
		p.Put(0, b)
		want = append(want, rec(0, b)...)
		if seq%3 == 0 {
			publish(t, p)
		}
	}
	publish(t, p)
	if len(want) != MinSize {
		t.Fatalf("put %d bytes, want the ring's %d", len(want), MinSize)
	}
	for i := range 100 {
		mustFree(t, p, 0)
		if wait, err := p.WaitRoom(RecordHeaderLen); !wait || err != nil {
			t.Fatalf("try %d: WaitRoom = %v, %v; want true, nil", i, wait, err)
		}
		if publish(t, p) {
			t.Fatal("Publish of nothing asked for a wake-up")
		}
	}
	if i := firstDiff(s.data[Down], want); i < MinSize {
		t.Fatalf("ring byte %d = %#x, want %#x: the producer wrote over unconsumed data", i, s.data[Down][i], want[i])
	}
	if p.Idle() || p.Pending() != MinSize {
		t.Fatalf("Idle = %v, Pending = %d; want false, %d", p.Idle(), p.Pending(), MinSize)
	}
}

// TestHostileFlags: the process sets the flags to anything; the agent's
// side at worst wakes once per publication or release, never more, and a
// flag that is not exactly "raised" of this generation asks for no
// wake-up at all.
func TestHostileFlags(t *testing.T) {
	s := newSlot(t)
	ev := s.process(t)
	p, c := s.pair(Down) // the agent produces down, the process consumes
	pu, cu := s.pair(Up) // the agent consumes up
	down, up := ctlOf(ev.hdr, Down), ctlOf(ev.hdr, Up)
	for _, v := range []uint64{wd(2), wd(0x100), wd(1<<48 - 1), 1, uint64(testGen+1)<<48 | 1, math.MaxUint64} {
		atomic.StoreUint64(down.sleep, v)
		p.Put(0, nil)
		if publish(t, p) {
			t.Fatalf("sleep flag %#x: Publish asked for a wake-up", v)
		}
		if got := atomic.LoadUint64(down.sleep); got != v {
			t.Fatalf("sleep flag %#x changed to %#x", v, got)
		}
	}
	wakes := 0
	for range 50 {
		atomic.StoreUint64(down.sleep, wd(1))
		p.Put(0, nil)
		for range 3 {
			if publish(t, p) {
				wakes++
			}
		}
	}
	if wakes != 50 {
		t.Fatalf("50 publications, each to a 'sleeping' consumer, made %d wake-ups", wakes)
	}
	mustAvail(t, c, 56*RecordHeaderLen)

	wakes = 0
	for i := range 50 {
		pu.Put(0, nil)
		publish(t, pu)
		mustAvail(t, cu, RecordHeaderLen)
		take(t, cu, 0, nil)
		atomic.StoreUint64(up.wait, wd(uint64(i%2)*7+1)) // 1 or 8
		for range 3 {
			if release(t, cu) {
				wakes++
			}
		}
	}
	if wakes != 25 {
		t.Fatalf("50 releases with the wait flag 1 half the time made %d wake-ups, want 25", wakes)
	}

	// The agent's own flag (up's sleep), left by the process at any value
	// of this generation, is raised and lowered all the same; of another
	// generation, it ends the ring.
	atomic.StoreUint64(up.sleep, wd(77))
	if sleep, err := cu.Sleep(); !sleep || err != nil {
		t.Fatalf("Sleep over a flag of 77 = %v, %v; want true, nil", sleep, err)
	}
	if got := atomic.LoadUint64(up.sleep); got != wd(1) {
		t.Fatalf("sleep flag = %#x after Sleep, want %#x", got, wd(1))
	}
	cu.Awake()
	if got := atomic.LoadUint64(up.sleep); got != wd(0) {
		t.Fatalf("sleep flag = %#x after Awake, want %#x", got, wd(0))
	}
	atomic.StoreUint64(up.sleep, 1)
	if sleep, err := cu.Sleep(); sleep || !errors.Is(err, ErrEnded) {
		t.Fatalf("Sleep over a flag of generation 0 = %v, %v; want false, ErrEnded", sleep, err)
	}
	atomic.StoreUint64(down.wait, uint64(testGen-1)<<48)
	p.Put(0, make([]byte, MinSize-RecordHeaderLen-56*RecordHeaderLen))
	publish(t, p)
	if wait, err := p.WaitRoom(RecordHeaderLen); wait || !errors.Is(err, ErrEnded) {
		t.Fatalf("WaitRoom over a flag of another generation = %v, %v; want false, ErrEnded", wait, err)
	}
}

// TestHostileWrongGeneration: an index of another generation is not an
// index at all: the side that reads it learns that its ring ended
// (ErrEnded), and acts on nothing.
func TestHostileWrongGeneration(t *testing.T) {
	s := newSlot(t)
	ev := s.process(t)
	up, down := ctlOf(ev.hdr, Up), ctlOf(ev.hdr, Down)
	p, c := s.pair(Up)
	pd, _ := s.pair(Down)
	p.Put(0, payload(0, 10))
	publish(t, p)
	mustAvail(t, c, 14)
	for _, v := range []uint64{0, 14, uint64(testGen+1)<<48 | 14, uint64(testGen^0x8000)<<48 | 14, math.MaxUint64} {
		atomic.StoreUint64(up.head, v)
		if n, err := c.Avail(); n != 0 || !errors.Is(err, ErrEnded) {
			t.Fatalf("head word %#x: Avail = %d, %v; want 0, ErrEnded", v, n, err)
		}
		if c.Buffered() != 14 {
			t.Fatalf("head word %#x: Buffered = %d, want 14 (as before)", v, c.Buffered())
		}
		atomic.StoreUint64(down.tail, v)
		if n, err := pd.Free(); n != 0 || !errors.Is(err, ErrEnded) {
			t.Fatalf("tail word %#x: Free = %d, %v; want 0, ErrEnded", v, n, err)
		}
	}
	atomic.StoreUint64(up.head, wd(14))
	take(t, c, 0, payload(0, 10))
	release(t, c)
}

// TestHostileOwnWordChanged: the process writes a word only the agent's
// side writes (its head as producer, its tail as consumer). The agent's
// next store of it fails, as corruption, and does not overwrite it.
func TestHostileOwnWordChanged(t *testing.T) {
	s := newSlot(t)
	ev := s.process(t)
	down, up := ctlOf(ev.hdr, Down), ctlOf(ev.hdr, Up)
	p, _ := s.pair(Down)
	p.Put(0, payload(0, 10))
	atomic.StoreUint64(down.head, wd(5000))
	if _, err := p.Publish(); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "changed to 5000") {
		t.Fatalf("Publish over a changed head = %v, want ErrCorrupt naming 5000", err)
	}
	if got := atomic.LoadUint64(down.head); got != wd(5000) {
		t.Fatalf("head = %#x, want the process's %#x left alone", got, wd(5000))
	}
	atomic.StoreUint64(down.head, uint64(testGen+1)<<48)
	if _, err := p.Publish(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Publish over a head of another generation = %v, want ErrEnded", err)
	}

	pu, cu := s.pair(Up)
	pu.Put(0, payload(1, 10))
	publish(t, pu)
	mustAvail(t, cu, 14)
	take(t, cu, 0, payload(1, 10))
	atomic.StoreUint64(up.tail, wd(3))
	if _, err := cu.Release(); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Release over a changed tail = %v, want ErrCorrupt", err)
	}
	if got := atomic.LoadUint64(up.tail); got != wd(3) {
		t.Fatalf("tail = %#x, want the process's %#x left alone", got, wd(3))
	}
}

// TestStaleGeneration: the agent gives a slot to a new channel (Init with
// the next generation) while the old channel's sides still hold it. Every
// look and every write of theirs fails with ErrEnded, and none reaches the
// new channel's words.
func TestStaleGeneration(t *testing.T) {
	s := newSlot(t)
	op, oc := s.pair(Up)
	dp, dc := s.pair(Down)
	op.Put(0, payload(0, 10))
	publish(t, op)
	mustAvail(t, oc, 14)
	take(t, oc, 0, payload(0, 10))
	dp.Put(0, payload(1, 10))

	next := testGen + 1
	Init(s.hdr, next)
	words := append([]byte(nil), s.hdr...)

	op.Put(0, payload(2, 10))
	if _, err := op.Publish(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Publish = %v, want ErrEnded", err)
	}
	if _, err := dp.Publish(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Publish = %v, want ErrEnded", err)
	}
	if _, err := oc.Release(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Release = %v, want ErrEnded", err)
	}
	if _, err := op.Free(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Free = %v, want ErrEnded", err)
	}
	if _, err := dc.Avail(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Avail = %v, want ErrEnded", err)
	}
	if _, err := dc.Sleep(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Sleep = %v, want ErrEnded", err)
	}
	dc.Awake()
	if _, err := dp.WaitRoom(MinSize); !errors.Is(err, ErrEnded) {
		t.Fatalf("WaitRoom = %v, want ErrEnded", err)
	}
	if op.Idle() {
		t.Fatal("Idle = true on a slot given to another channel")
	}
	if string(s.hdr) != string(words) {
		t.Fatal("the old channel's sides wrote the new channel's words")
	}
	for dir := range 2 {
		w := ctlOf(s.hdr, dir)
		for _, p := range []*uint64{w.head, w.tail, w.sleep, w.wait} {
			if got := atomic.LoadUint64(p); got != uint64(next)<<48 {
				t.Fatalf("dir %d: a word = %#x after Init, want %#x", dir, got, uint64(next)<<48)
			}
		}
	}
	// The new channel works.
	np := NewProducer(s.hdr, Up, s.data[Up], next)
	nc := NewConsumer(s.hdr, Up, s.data[Up], testMax, next)
	np.Put(3, payload(3, 50))
	publish(t, np)
	mustAvail(t, nc, 54)
	take(t, nc, 3, payload(3, 50))
}

// TestHostileScribbler: the process writes garbage over its ring memory,
// indices and records, all the while the agent's side runs. Every error
// is ErrCorrupt (or ErrEnded, for a word of another generation), nothing
// panics, and every record accepted was checked:
// its length within the consumer's max and what was published. (A side
// that read a header or an index twice would let some through.)
func TestHostileScribbler(t *testing.T) {
	s := newSlot(t)
	ev := s.process(t)
	var stop atomic.Bool
	done := make(chan int)
	go func() { // the process
		rng := rand.New(rand.NewPCG(5, 5))
		up, down := ctlOf(ev.hdr, Up), ctlOf(ev.hdr, Down)
		writes := 0
		for !stop.Load() {
			tail := atomic.LoadUint64(up.tail)
			switch rng.IntN(8) {
			case 0:
				atomic.StoreUint64(up.head, wd(rng.Uint64()))
			case 1, 2:
				atomic.StoreUint64(up.head, wd(tail+uint64(rng.IntN(MinSize+2))))
			case 3, 4:
				n := uint32(rng.IntN(testMax + 50))
				if rng.IntN(2) == 0 {
					n = uint32(rng.IntN(200))
				}
				putHeader(ev.data[Up], tail+uint64(rng.IntN(3)), byte(rng.Uint32()), n)
			case 5:
				off := rng.IntN(MinSize)
				ev.data[Up][off] = byte(rng.Uint32())
			case 6:
				head := atomic.LoadUint64(down.head)
				switch rng.IntN(4) {
				case 0:
					atomic.StoreUint64(down.tail, wd(rng.Uint64()))
				case 1:
					atomic.StoreUint64(down.tail, wd(head+uint64(rng.IntN(100))))
				default: // takes what was published, or most of it
					atomic.StoreUint64(down.tail, wd(head-uint64(rng.IntN(2)*rng.IntN(100))))
				}
			case 7:
				atomic.StoreUint64(up.wait, wd(uint64(rng.IntN(3))))
				atomic.StoreUint64(down.sleep, wd(uint64(rng.IntN(3))))
				if rng.IntN(50) == 0 { // a word of another generation
					atomic.StoreUint64(up.head, uint64(testGen+1)<<48)
				}
			}
			writes++
		}
		done <- writes
	}()

	c := NewConsumer(s.hdr, Up, s.data[Up], testMax, testGen)
	p := NewProducer(s.hdr, Down, s.data[Down], testGen)
	buf := make([]byte, testMax)
	var records, corrupt, puts int
	fail := func(err error) {
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrEnded) {
			stop.Store(true)
			<-done
			t.Fatalf("error not wrapping ErrCorrupt or ErrEnded: %v", err)
		}
		corrupt++
	}
	end := time.Now().Add(300 * time.Millisecond)
	for i := 0; i < 200000 && time.Now().Before(end); i++ {
		avail, err := c.Avail()
		if err != nil {
			fail(err)
			c = NewConsumer(s.hdr, Up, s.data[Up], testMax, testGen) // a new channel
			continue
		}
		if b := c.Buffered(); b != avail || b < 0 || b > MinSize {
			stop.Store(true)
			<-done
			t.Fatalf("Avail = %d, then Buffered = %d, in a ring of %d: the index was not read once", avail, b, MinSize)
		}
		for c.Buffered() > 0 {
			before := c.Buffered()
			typ, n, err := c.Next()
			if err != nil {
				fail(err)
				c = NewConsumer(s.hdr, Up, s.data[Up], testMax, testGen)
				break
			}
			if n > testMax || RecordHeaderLen+n > before || n < 0 {
				stop.Store(true)
				<-done
				t.Fatalf("accepted a record of type %d, %d bytes, with %d published", typ, n, before)
			}
			c.Read(buf[:n], 0)
			c.Skip(RecordHeaderLen + n)
			records++
		}
		release(t, c)

		free, err := p.Free()
		if err != nil {
			fail(err)
			p = NewProducer(s.hdr, Down, s.data[Down], testGen)
			continue
		}
		if free >= RecordHeaderLen+10 {
			p.Put(0, payload(i, 10))
			puts++
		}
		publish(t, p)
	}
	stop.Store(true)
	writes := <-done
	t.Logf("%d process writes; agent took %d records, put %d, refused %d times", writes, records, puts, corrupt)
	if records == 0 || corrupt == 0 || puts == 0 {
		t.Fatalf("the scribbler did not exercise both paths: %d records taken, %d refusals, %d puts", records, corrupt, puts)
	}
}

// TestNextGen: generations go round without ever being 0, so a slot of
// zeros (a new page, or a hole the process punched) belongs to no
// channel: both sides of any generation refuse it.
func TestNextGen(t *testing.T) {
	for _, tc := range [][2]uint16{{1, 2}, {0x5a5, 0x5a6}, {0xfffe, 0xffff}, {0xffff, 1}, {0, 1}} {
		if got := NextGen(tc[0]); got != tc[1] {
			t.Errorf("NextGen(%#x) = %#x, want %#x", tc[0], got, tc[1])
		}
	}
	seen := map[uint16]bool{}
	for g, i := uint16(1), 0; i < 1<<16; i++ {
		if g == 0 || seen[g] {
			t.Fatalf("step %d: generation %#x (0, or again before all others)", i, g)
		}
		seen[g] = true
		if g = NextGen(g); len(seen) == 1<<16-1 {
			break
		}
	}
	h, _ := mustCreate(t, "t", 4096)
	d, _ := mustCreate(t, "d", MinSize)
	for _, gen := range []uint16{1, NextGen(0xffff), 0x8000} {
		p := NewProducer(h.B[:HeaderSize], Up, d.B, gen)
		c := NewConsumer(h.B[:HeaderSize], Up, d.B, testMax, gen)
		if _, err := p.Free(); !errors.Is(err, ErrEnded) {
			t.Fatalf("gen %#x: Free on a slot of zeros = %v, want ErrEnded", gen, err)
		}
		p.Put(0, nil)
		if _, err := p.Publish(); !errors.Is(err, ErrEnded) {
			t.Fatalf("gen %#x: Publish on a slot of zeros = %v, want ErrEnded", gen, err)
		}
		if _, err := c.Avail(); !errors.Is(err, ErrEnded) {
			t.Fatalf("gen %#x: Avail on a slot of zeros = %v, want ErrEnded", gen, err)
		}
	}
	if !bytes.Equal(h.B, make([]byte, len(h.B))) {
		t.Fatal("a side wrote a slot of zeros")
	}
}
