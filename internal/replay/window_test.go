package replay

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"
)

// step is one call of Accept and the result it must give.
type step struct {
	counter uint64
	want    bool
}

const (
	W   = WindowSize
	max = math.MaxUint64
)

// vectors are sequences of Accept calls on a fresh window, in the style of
// the replay test of wireguard-go and of RFC 6479's examples. The numbers
// are written so the reason for each result can be read off: W is
// WindowSize (1984), a counter exactly W behind the highest is the last one
// still inside the window.
var vectors = []struct {
	name  string
	steps []step
}{
	{"in order and duplicates", []step{
		{0, true}, {0, false}, {1, true}, {1, false},
		{2, true}, {3, true}, {3, false}, {2, false}, {0, false},
	}},
	{"out of order within the window", []step{
		{10, true}, {5, true}, {7, true}, {5, false}, {0, true},
		{9, true}, {10, false}, {11, true}, {8, true}, {6, true},
		{6, false}, {0, false}, {4, true}, {1, true}, {2, true}, {3, true},
	}},
	{"first counter large", []step{
		{2000, true},
		{2000 - W, true},      // exactly at the edge
		{2000 - W - 1, false}, // one past it
		{2000 - W, false},     // duplicate at the edge
		{0, false},
		{2000 - W + 1, true},
		{2001, true},         // the edge moves up by one...
		{2000 - W, false},    // ...so 16 is now too old
		{2001 - W, false},    // 17 was already accepted
		{2001 - W + 1, true}, // 18 is inside
		{1999, true}, {2000, false}, {2001, false}, {2002, true},
	}},
	{"first counter exactly the window size", []step{
		{W, true}, {0, true}, {0, false}, {1, true}, {W, false},
	}},
	{"first counter one past the window size", []step{
		{W + 1, true}, {0, false}, {1, true}, {1, false},
	}},
	{"just outside the window after in-order traffic", []step{
		{0, true}, {1, true}, {2, true},
		{W + 2, true},  // 2 is now exactly at the edge
		{0, false},     // too old
		{1, false},     // too old
		{2, false},     // at the edge, but a duplicate
		{3, true},      // inside, never seen
		{W + 1, true},  // just below the highest
		{W + 3, true},  // 3 is now at the edge
		{3, false},     // duplicate
		{4, true},      //
		{W + 4, true},  // 4 at the edge, 3 outside
		{3, false},     // outside (and a duplicate)
		{5, true},      //
		{W + 2, false}, //
	}},
	{"big jump forward", []step{
		{0, true}, {1, true}, {2, true},
		{1 << 20, true},
		{2, false}, {3, false}, // far too old
		{1<<20 - W, true},
		{1<<20 - W - 1, false},
		{1 << 20, false},
		{1<<20 + 1, true},
		{1<<20 - 1, true},
	}},
	{"jump of exactly one ring", []step{
		// 100 and 100+2048 share a bit of the ring; the jump must clear it.
		{100, true}, {100 + ringBits, true}, {100 + ringBits, false},
		{100, false},
		{100 + ringBits - W, true}, {100 + ringBits - W - 1, false},
		{100 + ringBits - 1, true}, {100 + ringBits - 64, true},
	}},
	{"slot reused within one slide", []step{
		// The slide from block 23 to block 33 clears blocks 24..33 one by
		// one; block 33 reuses block 1's slot, where 100's bit is still set.
		{99, true}, {100, true}, {1500, true},
		{2147, true},
		{2148, true}, // 100 + 2048: same slot and bit as 100
		{2148, false},
		{100, false},     // too old now
		{2148 - W, true}, // 164: exactly at the edge
		{2148 - W - 1, false},
		{1500, false}, {1501, true},
	}},
	{"ring wrap-around", []step{
		{0, true}, {1, true}, {63, true},
		{31*64 + 5, true}, // block 31: block 0 is still in the ring
		{5, true},         // exactly at the edge
		{4, false},        // outside
		{63, false},       // inside, duplicate
		{62, true},
		{32 * 64, true}, // block 32 reuses block 0's slot, which must be cleared
		{32*64 + 1, true}, {32*64 + 63, true}, {32*64 + 62, true},
		{32 * 64, false},
		{32*64 + 63 - W, true},      // 127: exactly at the edge
		{32*64 + 63 - W - 1, false}, // 126: outside
		{33*64 + 63, true},          // block 33 reuses block 1's slot
		{33 * 64, true},
		{33*64 + 63, false},
	}},
	{"repeated wrap-around", []step{
		{0, true}, {65*64 + 1, true}, {65 * 64, true}, {64*64 + 63, true},
		{1, false}, {130*64 + 1, true}, {65*64 + 1, false}, {130*64 - 1, true},
	}},
	{"top of the counter space", []step{
		{max, true}, {max, false}, {max - 1, true},
		{max - W, true}, {max - W - 1, false}, {max - W, false},
		{0, false}, {1 << 63, false},
	}},
	{"from the bottom to the top", []step{
		{0, true}, {max - 1, true}, {0, false}, {max, true},
		{max - 1, false}, {max - W, true},
	}},
	{"top block boundaries", []step{
		{max - 64, true}, {max - 63, true}, {max - 127, true},
		{max - 64, false}, {max, true}, {max - 64, false},
		{max - 63, false}, {max - 65, true},
	}},
}

func TestVectors(t *testing.T) {
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			var w Window
			for i, s := range v.steps {
				if seen := w.Seen(s.counter); seen == s.want {
					t.Fatalf("step %d: Seen(%d) = %v, want %v", i, s.counter, seen, !s.want)
				}
				if got := w.Accept(s.counter); got != s.want {
					t.Fatalf("step %d: Accept(%d) = %v, want %v", i, s.counter, got, s.want)
				}
				if !w.Seen(s.counter) {
					t.Fatalf("step %d: Seen(%d) = false after Accept", i, s.counter)
				}
			}
		})
	}
}

func TestZeroValueAcceptsZeroOnce(t *testing.T) {
	var w Window
	if w.Seen(0) {
		t.Fatal("zero window: Seen(0) = true")
	}
	if !w.Accept(0) {
		t.Fatal("zero window: Accept(0) = false")
	}
	if w.Accept(0) {
		t.Fatal("Accept(0) twice = true")
	}
}

func TestInOrderLongRun(t *testing.T) {
	var w Window
	const n = 10 * ringBits
	for c := uint64(0); c < n; c++ {
		if !w.Accept(c) {
			t.Fatalf("Accept(%d) = false in order", c)
		}
	}
	for c := uint64(n - 1 - W); c < n; c++ {
		if !w.Seen(c) {
			t.Fatalf("Seen(%d) = false after in-order run", c)
		}
	}
	if !w.Seen(n - 2 - W) {
		t.Fatalf("Seen(%d) = false, but it is outside the window", n-2-W)
	}
}

func TestSeenChangesNothing(t *testing.T) {
	var w Window
	for _, c := range []uint64{5, 3, 1 << 12, 1<<12 - 7} {
		w.Accept(c)
	}
	before := w
	for _, c := range []uint64{0, 3, 4, 1 << 12, 1<<12 + 1, 1 << 40, max} {
		w.Seen(c)
	}
	if w != before {
		t.Fatal("Seen changed the window")
	}
}

func TestRejectedAcceptChangesNothing(t *testing.T) {
	var w Window
	for _, c := range []uint64{5000, 4000, 4999} {
		w.Accept(c)
	}
	before := w
	for _, c := range []uint64{5000, 4000, 4999, 5000 - W - 1, 0} {
		if w.Accept(c) {
			t.Fatalf("Accept(%d) = true", c)
		}
	}
	if w != before {
		t.Fatal("a rejected Accept changed the window")
	}
}

func TestReset(t *testing.T) {
	var w Window
	for _, c := range []uint64{0, 1, 1 << 30, max} {
		w.Accept(c)
	}
	w.Reset()
	if w != (Window{}) {
		t.Fatal("Reset did not return the window to its zero value")
	}
	for _, c := range []uint64{0, 1, 1 << 30} {
		if !w.Accept(c) {
			t.Fatalf("after Reset: Accept(%d) = false", c)
		}
	}
}

// model is the obvious reference the Window must agree with: the set of
// accepted counters and the highest of them.
type model struct {
	accepted map[uint64]bool
	last     uint64
}

func (m *model) seen(c uint64) bool {
	return m.accepted[c] || (c < m.last && m.last-c > W)
}

func (m *model) accept(c uint64) bool {
	if m.seen(c) {
		return false
	}
	m.accepted[c] = true
	if c > m.last {
		m.last = c
		// Forget what can no longer matter, to bound the map.
		if len(m.accepted) > 4*ringBits {
			for k := range m.accepted {
				if m.last-k > W {
					delete(m.accepted, k)
				}
			}
		}
	}
	return true
}

// next picks a counter near the interesting places of the window.
func next(r *rand.Rand, last uint64) uint64 {
	var d uint64
	switch k := r.IntN(100); {
	case k < 35: // just ahead: in-order traffic with small gaps
		d = last + 1 + r.Uint64N(4)
	case k < 70: // anywhere in the window, and a little beyond its edge
		d = last - r.Uint64N(W+64)
	case k < 80: // around the edge exactly
		d = last - W - 2 + r.Uint64N(5)
	case k < 90: // a jump of up to a few rings
		d = last + r.Uint64N(4*ringBits)
	case k < 92: // a huge jump
		d = last + r.Uint64()>>r.IntN(64)
	case k < 96: // the very top
		d = max - r.Uint64N(3*ringBits)
	default: // the very bottom
		d = r.Uint64N(3 * ringBits)
	}
	return d // wraps around the counter space; that is fine
}

func TestAgainstModel(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		r := rand.New(rand.NewPCG(seed, 0x5eed))
		var w Window
		m := model{accepted: map[uint64]bool{}}
		steps := 20000
		if testing.Short() {
			steps = 2000
		}
		for i := 0; i < steps; i++ {
			c := next(r, m.last)
			if got, want := w.Seen(c), m.seen(c); got != want {
				t.Fatalf("seed %d step %d: Seen(%d) = %v, model says %v (highest %d)", seed, i, c, got, want, m.last)
			}
			if got, want := w.Accept(c), m.accept(c); got != want {
				t.Fatalf("seed %d step %d: Accept(%d) = %v, model says %v (highest %d)", seed, i, c, got, want, m.last)
			}
			if r.IntN(5000) == 0 {
				w.Reset()
				m = model{accepted: map[uint64]bool{}}
			}
		}
	}
}

// FuzzAgainstModel reads the input as a sequence of signed 16-bit moves
// relative to the highest accepted counter (with a few bytes steering to the
// top and bottom of the counter space) and checks Window against the model.
func FuzzAgainstModel(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 1, 0, 1})
	f.Add([]byte{0x07, 0xc0, 0xf8, 0x40, 0x08, 0x00, 0xf8, 0x3f})
	f.Add([]byte{0x80, 0x00, 0x7f, 0xff, 0x00, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		var w Window
		m := model{accepted: map[uint64]bool{}}
		for len(data) >= 2 {
			v := int16(binary.BigEndian.Uint16(data))
			data = data[2:]
			var c uint64
			switch v {
			case math.MinInt16:
				c = max
			case math.MaxInt16:
				c = 0
			default:
				c = m.last + uint64(int64(v)) // may wrap; that is fine
			}
			if got, want := w.Accept(c), m.accept(c); got != want {
				t.Fatalf("Accept(%d) = %v, model says %v (highest %d)", c, got, want, m.last)
			}
		}
	})
}

func BenchmarkAcceptInOrder(b *testing.B) {
	var w Window
	var c uint64
	for b.Loop() {
		if !w.Accept(c) {
			b.Fatal("rejected")
		}
		c++
	}
}

// BenchmarkAcceptReordered accepts counters with every pair swapped, as
// after reordering on a network path.
func BenchmarkAcceptReordered(b *testing.B) {
	var w Window
	var c uint64
	for b.Loop() {
		if !w.Accept(c ^ 1) {
			b.Fatal("rejected")
		}
		c++
	}
}

func BenchmarkSeenReplay(b *testing.B) {
	var w Window
	for c := uint64(0); c < ringBits; c++ {
		w.Accept(c)
	}
	var c uint64
	for b.Loop() {
		if !w.Seen(ringBits - 1 - c%W) {
			b.Fatal("not seen")
		}
		c++
	}
}
