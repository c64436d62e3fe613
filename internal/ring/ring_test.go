package ring

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The tests map their memory as the agent does: a sealed memfd from Create
// for a page of header slots, and one for both directions' data areas.

const testMax = 64 << 10 // the largest payload the tests' consumers take

// mustCreate returns a mapping from Create and its memfd, both released at
// the end of the test.
func mustCreate(t testing.TB, name string, size int) (*Mem, *os.File) {
	t.Helper()
	m, f, err := Create(name, size)
	if err != nil {
		t.Fatalf("Create(%q, %d): %v", name, size, err)
	}
	t.Cleanup(func() {
		m.Unmap()
		f.Close()
	})
	return m, f
}

// testGen is the generation of the tests' header slots (Init): not zero,
// so that a word left at zero is a word of another generation.
const testGen uint16 = 0x5a5

// wd is a control word of the tests' generation holding v.
func wd(v uint64) uint64 { return uint64(testGen)<<48 | v&(1<<48-1) }

// slot is one channel's shared memory: its header slot, initialised for
// testGen, and a data area of MinSize per direction.
type slot struct {
	hdr  []byte
	data [2][]byte
	// The memfds, for a second mapping: the process's.
	hdrF, dataF *os.File
}

func newSlot(t testing.TB) slot {
	t.Helper()
	h, hf := mustCreate(t, "t", 4096)
	d, df := mustCreate(t, "d", 2*MinSize)
	Init(h.B[:HeaderSize], testGen)
	return slot{
		hdr:  h.B[:HeaderSize],
		data: [2][]byte{d.B[:MinSize:MinSize], d.B[MinSize:]},
		hdrF: hf, dataF: df,
	}
}

// process maps the slot's memory a second time, as the process does: the
// hostile writes of the tests go through it.
func (s slot) process(t testing.TB) slot {
	t.Helper()
	h, err := Map(s.hdrF, 4096)
	if err != nil {
		t.Fatal(err)
	}
	d, err := Map(s.dataF, 2*MinSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.Unmap()
		d.Unmap()
	})
	return slot{hdr: h.B[:HeaderSize], data: [2][]byte{d.B[:MinSize:MinSize], d.B[MinSize:]}}
}

func (s slot) pair(dir int) (*Producer, *Consumer) {
	return NewProducer(s.hdr, dir, s.data[dir], testGen), NewConsumer(s.hdr, dir, s.data[dir], testMax, testGen)
}

// ctl is one direction's control words, found by the layout the package
// documents (it is the contract with the process, so it is spelled out
// here rather than taken from the package's constants).
type ctl struct {
	head, tail, sleep, wait *uint64
}

func ctlOf(hdr []byte, dir int) ctl {
	c := hdr[dir*256:]
	return ctl{
		head:  (*uint64)(unsafe.Pointer(&c[0])),
		tail:  (*uint64)(unsafe.Pointer(&c[64])),
		sleep: (*uint64)(unsafe.Pointer(&c[128])),
		wait:  (*uint64)(unsafe.Pointer(&c[192])),
	}
}

// publish publishes, failing the test on an error.
func publish(t testing.TB, p *Producer) bool {
	t.Helper()
	wake, err := p.Publish()
	if err != nil {
		t.Fatalf("Publish: %v", err)
	}
	return wake
}

// release releases, failing the test on an error.
func release(t testing.TB, c *Consumer) bool {
	t.Helper()
	wake, err := c.Release()
	if err != nil {
		t.Fatalf("Release: %v", err)
	}
	return wake
}

// payload returns record seq's payload of n bytes, a pattern that differs
// from record to record and from byte to byte.
func payload(seq, n int) []byte {
	b := make([]byte, n)
	x := uint32(seq)*2654435761 + 12345
	for i := range b {
		x = x*1664525 + 1013904223
		b[i] = byte(x >> 24)
	}
	return b
}

// rec is a record as it lies in the ring.
func rec(typ byte, p []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(typ)<<24|uint32(len(p)))
	return append(b, p...)
}

// take reads one record with the consumer, checking it is typ and want.
func take(t testing.TB, c *Consumer, typ byte, want []byte) {
	t.Helper()
	gt, n, err := c.Next()
	if err != nil {
		t.Fatalf("Next: %v", err)
	}
	if gt != typ || n != len(want) {
		t.Fatalf("Next = type %d, %d bytes; want type %d, %d bytes", gt, n, typ, len(want))
	}
	got := make([]byte, n)
	c.Read(got, 0)
	if !bytes.Equal(got, want) {
		t.Fatalf("record of type %d, %d bytes: payload differs at byte %d", typ, n, firstDiff(got, want))
	}
	c.Skip(RecordHeaderLen + n)
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func mustAvail(t testing.TB, c *Consumer, want int) {
	t.Helper()
	n, err := c.Avail()
	if err != nil || n != want {
		t.Fatalf("Avail = %d, %v; want %d, nil", n, err, want)
	}
}

func mustFree(t testing.TB, p *Producer, want int) {
	t.Helper()
	n, err := p.Free()
	if err != nil || n != want {
		t.Fatalf("Free = %d, %v; want %d, nil", n, err, want)
	}
}

func TestCheckSize(t *testing.T) {
	for _, n := range []int{MinSize, DefaultSize, MaxSize, 512 << 10} {
		if err := CheckSize(n); err != nil {
			t.Errorf("CheckSize(%d) = %v, want nil", n, err)
		}
	}
	for _, n := range []int{0, -MinSize, MinSize / 2, MinSize + 1, 3 * MinSize, 2 * MaxSize, MaxSize - 4096} {
		if err := CheckSize(n); err == nil {
			t.Errorf("CheckSize(%d) = nil, want an error", n)
		}
	}
	// The largest record fits a ring of the smallest size.
	if RecordHeaderLen+testMax > MinSize {
		t.Fatalf("a record of %d bytes does not fit a ring of %d", testMax, MinSize)
	}
}

// TestHeaderLayout pins the control words where the package comment puts
// them, each a native-endian 64-bit word of the slot's generation (top 16
// bits) and its value: the process's side of the contract reads and
// writes them there.
func TestHeaderLayout(t *testing.T) {
	h, _ := mustCreate(t, "t", 4096)
	// Two channels' slots in one page, as the agent lays them out.
	hdr, next := h.B[:HeaderSize], h.B[HeaderSize:2*HeaderSize]
	d, _ := mustCreate(t, "d", 2*MinSize)
	Init(hdr, testGen)
	for dir := range 2 {
		for _, off := range []int{0, 64, 128, 192} {
			if got := binary.NativeEndian.Uint64(hdr[dir*256+off:]); got != wd(0) {
				t.Fatalf("word at %d = %#x after Init, want %#x", dir*256+off, got, wd(0))
			}
		}
	}
	word := func(off int) uint64 { return binary.NativeEndian.Uint64(hdr[off:]) }
	for dir, data := range [][]byte{d.B[:MinSize], d.B[MinSize:]} {
		p := NewProducer(hdr, dir, data, testGen)
		c := NewConsumer(hdr, dir, data, testMax, testGen)
		p.Put(9, payload(1, 10))
		publish(t, p)
		if got := word(dir * 256); got != wd(14) {
			t.Errorf("dir %d: head word at %d = %#x, want %#x", dir, dir*256, got, wd(14))
		}
		mustAvail(t, c, 14)
		take(t, c, 9, payload(1, 10))
		release(t, c)
		if got := word(dir*256 + 64); got != wd(14) {
			t.Errorf("dir %d: tail word at %d = %#x, want %#x", dir, dir*256+64, got, wd(14))
		}
		if sleep, _ := c.Sleep(); !sleep {
			t.Fatalf("dir %d: Sleep on an empty ring = false", dir)
		}
		if got := word(dir*256 + 128); got != wd(1) {
			t.Errorf("dir %d: sleep word at %d = %#x, want %#x", dir, dir*256+128, got, wd(1))
		}
		c.Awake()
		mustFree(t, p, MinSize)
		if wait, _ := p.WaitRoom(MinSize + 1); !wait {
			t.Fatalf("dir %d: WaitRoom(%d) = false", dir, MinSize+1)
		}
		if got := word(dir*256 + 192); got != wd(1) {
			t.Errorf("dir %d: wait word at %d = %#x, want %#x", dir, dir*256+192, got, wd(1))
		}
	}
	// Nothing else in the slot, and nothing of the next one, was written.
	for i, b := range hdr {
		if b != 0 && i%64 >= 8 {
			t.Fatalf("byte %d of the slot is %#x: outside the control words", i, b)
		}
	}
	if !bytes.Equal(next, make([]byte, HeaderSize)) {
		t.Fatalf("the next channel's slot was written")
	}
}

// TestRoundTrip moves records of many sizes through both directions,
// around the ring several times, in batches that fill it, checking every
// byte, and counts the records that wrapped around the end.
func TestRoundTrip(t *testing.T) {
	s := newSlot(t)
	for dir := range 2 {
		t.Run(fmt.Sprint("dir", dir), func(t *testing.T) {
			p, c := s.pair(dir)
			if p.Size() != MinSize || c.Size() != MinSize {
				t.Fatalf("Size = %d, %d; want %d", p.Size(), c.Size(), MinSize)
			}
			fixed := []int{0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 63, 64, 65, 255, 256, 1000, 4095, 4096, 4097, 32 << 10, testMax - 1, testMax}
			rng := rand.New(rand.NewPCG(uint64(dir), 1))
			size := func(seq int) int {
				if seq < len(fixed) {
					return fixed[seq]
				}
				switch rng.IntN(3) {
				case 0:
					return rng.IntN(16)
				case 1:
					return rng.IntN(4096)
				}
				return rng.IntN(testMax + 1)
			}
			var pos, sent, got, wrapped, batches int
			var queue []int // sizes put and not yet taken
			next := -1      // the size of the next record, once drawn
			for pos < 12*MinSize {
				// Put records until the next does not fit, then publish.
				for {
					if next < 0 {
						next = size(sent)
					}
					n := next
					free, err := p.Free()
					if err != nil {
						t.Fatal(err)
					}
					if free < RecordHeaderLen+n {
						if len(queue) == 0 {
							t.Fatalf("a record of %d bytes does not fit an empty ring: Free = %d", n, free)
						}
						break
					}
					if off := pos % MinSize; off+RecordHeaderLen+n > MinSize {
						wrapped++
					}
					p.Put(byte(sent), payload(sent, n))
					pos += RecordHeaderLen + n
					queue = append(queue, n)
					sent++
					next = -1
				}
				if p.Pending() != 0 {
					t.Fatalf("Pending before Publish = %d, want 0 (all consumed)", p.Pending())
				}
				publish(t, p)
				batches++
				want := 0
				for _, n := range queue {
					want += RecordHeaderLen + n
				}
				if p.Pending() != want {
					t.Fatalf("Pending = %d, want %d", p.Pending(), want)
				}
				mustAvail(t, c, want)
				for _, n := range queue {
					take(t, c, byte(got), payload(got, n))
					got++
				}
				queue = queue[:0]
				if c.Buffered() != 0 {
					t.Fatalf("Buffered after taking all = %d", c.Buffered())
				}
				release(t, c)
				mustFree(t, p, MinSize)
				if !p.Idle() {
					t.Fatalf("Idle = false with everything consumed")
				}
			}
			if wrapped < 3 || batches < 12 {
				t.Fatalf("%d records wrapped in %d batches: the test did not go round the ring", wrapped, batches)
			}
			t.Logf("%d records, %d bytes, %d wrapped, %d batches", sent, pos, wrapped, batches)
		})
	}
}

// TestRecordWrap puts a record at each position that splits it at the
// ring's end, header or payload, and checks where its bytes lie in the
// ring and that the consumer reads it whole, and in parts across the end.
func TestRecordWrap(t *testing.T) {
	for _, k := range []int{1, 2, 3, 4, 5, 50, 104} { // bytes before the end
		for dir := range 2 {
			t.Run(fmt.Sprintf("k%d/dir%d", k, dir), func(t *testing.T) {
				s := newSlot(t)
				p, c := s.pair(dir)
				// Two fillers bring the position to MinSize-k.
				f1, f2 := MinSize/2-RecordHeaderLen, MinSize/2-k-RecordHeaderLen
				p.Put(1, payload(1, f1))
				p.Put(2, payload(2, f2))
				publish(t, p)
				mustAvail(t, c, MinSize-k)
				take(t, c, 1, payload(1, f1))
				take(t, c, 2, payload(2, f2))
				release(t, c)
				mustFree(t, p, MinSize)

				// The record, in parts whose boundaries fall either side of
				// the end.
				want := payload(3, 100)
				p.Put(7, want[:3], nil, want[3:53], want[53:])
				publish(t, p)
				r := rec(7, want)
				for i, b := range r {
					if got := s.data[dir][(MinSize-k+i)%MinSize]; got != b {
						t.Fatalf("byte %d of the record at ring offset %d = %#x, want %#x", i, (MinSize-k+i)%MinSize, got, b)
					}
				}
				mustAvail(t, c, len(r))
				typ, n, err := c.Next()
				if err != nil || typ != 7 || n != 100 {
					t.Fatalf("Next = %d, %d, %v; want 7, 100, nil", typ, n, err)
				}
				for _, part := range [][2]int{{0, 100}, {0, 1}, {99, 1}, {10, 80}, {min(max(0, k-RecordHeaderLen-2), 96), 4}} {
					got := make([]byte, part[1])
					c.Read(got, part[0])
					if !bytes.Equal(got, want[part[0]:part[0]+part[1]]) {
						t.Fatalf("Read(%d bytes, off %d) = %x, want %x", part[1], part[0], got, want[part[0]:part[0]+part[1]])
					}
				}
				c.Skip(RecordHeaderLen + n)
				release(t, c)
				mustAvail(t, c, 0)
				mustFree(t, p, MinSize)
			})
		}
	}
}

// TestRawRecords puts a run of whole records at once, across the ring's
// end, as a message channel does, and takes them one by one.
func TestRawRecords(t *testing.T) {
	s := newSlot(t)
	p, c := s.pair(Up)
	f1, f2 := MinSize/2-RecordHeaderLen, MinSize/2-20-RecordHeaderLen
	p.Put(0, payload(0, f1))
	p.Put(0, payload(1, f2))
	publish(t, p)
	mustAvail(t, c, MinSize-20)
	take(t, c, 0, payload(0, f1))
	take(t, c, 0, payload(1, f2))
	release(t, c)
	if n := p.Pending(); n != MinSize-20 {
		t.Fatalf("Pending = %d, want %d: the consumer's index is not read until Free", n, MinSize-20)
	}
	mustFree(t, p, MinSize)

	run := append(append(rec(0, payload(1, 7)), rec(0, nil)...), rec(1, payload(2, 30))...)
	p.PutRaw(run)
	if n := p.Pending(); n != 0 {
		t.Fatalf("Pending before Publish = %d, want 0", n)
	}
	publish(t, p)
	mustAvail(t, c, len(run))
	for ring, i := s.data[Up], 0; i < len(run); i++ {
		if got := ring[(MinSize-20+i)%MinSize]; got != run[i] {
			t.Fatalf("byte %d of the run = %#x in the ring, want %#x", i, got, run[i])
		}
	}
	take(t, c, 0, payload(1, 7))
	take(t, c, 0, nil)
	take(t, c, 1, payload(2, 30))
	if c.Buffered() != 0 {
		t.Fatalf("Buffered = %d after the run", c.Buffered())
	}
	release(t, c)
	mustFree(t, p, MinSize)
}

// TestReattach starts a producer and a consumer on a header whose indices
// are not zero (the ring was used before): they go on from there.
func TestReattach(t *testing.T) {
	s := newSlot(t)
	p, c := s.pair(Down)
	for i := range 5 {
		p.Put(0, payload(i, 30000))
		publish(t, p)
		mustAvail(t, c, 30004)
		take(t, c, 0, payload(i, 30000))
		release(t, c)
	}
	p.Put(5, payload(5, 1000)) // published, not consumed: the new consumer finds it
	publish(t, p)

	c2 := NewConsumer(s.hdr, Down, s.data[Down], testMax, testGen)
	if c2.Buffered() != 0 {
		t.Fatalf("new consumer's Buffered = %d, want 0 (nothing seen yet)", c2.Buffered())
	}
	mustAvail(t, c2, 1004)
	take(t, c2, 5, payload(5, 1000))
	release(t, c2)

	p2 := NewProducer(s.hdr, Down, s.data[Down], testGen)
	mustFree(t, p2, MinSize)
	p2.Put(6, payload(6, 200))
	publish(t, p2)
	mustAvail(t, c2, 204)
	take(t, c2, 6, payload(6, 200))
	release(t, c2)
	mustFree(t, p2, MinSize)
	if h, tl := atomic.LoadUint64(ctlOf(s.hdr, Down).head), atomic.LoadUint64(ctlOf(s.hdr, Down).tail); h != wd(5*30004+1004+204) || tl != h {
		t.Fatalf("words = %#x, %#x; want both %#x", h, tl, wd(5*30004+1004+204))
	}
}

// TestIndexWrap runs a ring across its indices' wrap at 2^48: the words
// go from near 2^48 to small, the records lie where the ring's positions
// say, and the checks hold on either side of the wrap.
func TestIndexWrap(t *testing.T) {
	s := newSlot(t)
	w := ctlOf(s.hdr, Down)
	const start = 1<<48 - 100
	atomic.StoreUint64(w.head, wd(start))
	atomic.StoreUint64(w.tail, wd(start))
	p, c := s.pair(Down)
	mustFree(t, p, MinSize)
	mustAvail(t, c, 0)
	var all []byte
	for i, n := range []int{30, 60, 200, 0, 1000} {
		p.Put(byte(i), payload(i, n))
		all = append(all, rec(byte(i), payload(i, n))...)
	}
	publish(t, p)
	end := uint64(start+len(all)) % (1 << 48)
	if got := atomic.LoadUint64(w.head); got != wd(end) {
		t.Fatalf("head word = %#x, want %#x", got, wd(end))
	}
	for i, b := range all {
		if got := s.data[Down][(start%MinSize+i)%MinSize]; got != b {
			t.Fatalf("byte %d of the records = %#x in the ring, want %#x", i, got, b)
		}
	}
	mustFree(t, p, MinSize-len(all))
	mustAvail(t, c, len(all))
	for i, n := range []int{30, 60, 200, 0, 1000} {
		take(t, c, byte(i), payload(i, n))
	}
	release(t, c)
	if got := atomic.LoadUint64(w.tail); got != wd(end) {
		t.Fatalf("tail word = %#x, want %#x", got, wd(end))
	}
	mustFree(t, p, MinSize)
	// Across the wrap, backwards is still backwards, and too far too far.
	for _, h := range []uint64{1<<48 - 1, start, end - 1} {
		atomic.StoreUint64(w.head, wd(h))
		_, err := c.Avail()
		wantCorrupt(t, err, "producer index")
	}
	atomic.StoreUint64(w.head, wd(end+MinSize+1))
	_, err := c.Avail()
	wantCorrupt(t, err, "producer index")
	atomic.StoreUint64(w.head, wd(end+MinSize))
	mustAvail(t, c, MinSize)
	atomic.StoreUint64(w.tail, wd(1<<48-1))
	_, err = p.Free()
	wantCorrupt(t, err, "consumer index")
}

// TestDirectionsIndependent shows the two rings of a slot do not share
// anything: records up are not seen down, and each has its own room.
func TestDirectionsIndependent(t *testing.T) {
	s := newSlot(t)
	pu, cu := s.pair(Up)
	pd, cd := s.pair(Down)
	pu.Put(1, payload(1, 100))
	publish(t, pu)
	mustAvail(t, cd, 0)
	mustFree(t, pd, MinSize)
	pd.Put(2, payload(2, 50))
	publish(t, pd)
	mustAvail(t, cu, 104)
	mustAvail(t, cd, 54)
	take(t, cu, 1, payload(1, 100))
	take(t, cd, 2, payload(2, 50))
	release(t, cu)
	mustFree(t, pu, MinSize)
	mustFree(t, pd, MinSize-54)
}

// TestEventSuppression: a producer asks for a wake-up only when the
// consumer sleeps, once per sleep; and the same for room.
func TestEventSuppression(t *testing.T) {
	s := newSlot(t)
	p, c := s.pair(Up)
	w := ctlOf(s.hdr, Up)

	// A consumer that does not sleep is never woken.
	for i := range 1000 {
		p.Put(0, payload(i, 20))
		if publish(t, p) {
			t.Fatalf("record %d: Publish asked for a wake-up of a consumer that does not sleep", i)
		}
		mustAvail(t, c, 24)
		take(t, c, 0, payload(i, 20))
		if release(t, c) {
			t.Fatalf("record %d: Release asked for a wake-up of a producer that does not wait", i)
		}
	}

	// Nothing new: nothing to publish, nothing to release.
	if release(t, c) {
		t.Fatal("Release with nothing consumed asked for a wake-up")
	}

	// Sleep with records pending: do not sleep, and the flag is down.
	p.Put(0, nil)
	publish(t, p)
	if sleep, err := c.Sleep(); sleep || err != nil {
		t.Fatalf("Sleep with a record pending = %v, %v; want false, nil", sleep, err)
	}
	if f := atomic.LoadUint64(w.sleep); f != wd(0) {
		t.Fatalf("sleep flag = %#x after Sleep found records", f)
	}
	take(t, c, 0, nil)
	release(t, c)

	// Sleep on an empty ring: one wake-up for the next publication only.
	if sleep, err := c.Sleep(); !sleep || err != nil {
		t.Fatalf("Sleep on an empty ring = %v, %v; want true, nil", sleep, err)
	}
	if publish(t, p) {
		t.Fatal("Publish of nothing woke the consumer")
	}
	if f := atomic.LoadUint64(w.sleep); f != wd(1) {
		t.Fatalf("sleep flag = %#x after Publish of nothing, want 1", f)
	}
	wakes := 0
	for i := range 100 {
		p.Put(0, payload(i, 3))
		if publish(t, p) {
			wakes++
		}
	}
	if wakes != 1 {
		t.Fatalf("100 publications to a sleeping consumer made %d wake-ups, want 1", wakes)
	}
	if f := atomic.LoadUint64(w.sleep); f != wd(0) {
		t.Fatalf("sleep flag = %#x after the wake-up, want 0", f)
	}
	c.Awake()
	mustAvail(t, c, 100*7)
	for i := range 100 {
		take(t, c, 0, payload(i, 3))
	}
	release(t, c)

	// The same for room: fill the ring, wait, and get one wake-up.
	big := payload(0, MinSize/2-RecordHeaderLen)
	p.Put(0, big)
	p.Put(0, big)
	publish(t, p)
	mustFree(t, p, 0)
	if wait, err := p.WaitRoom(1); !wait || err != nil {
		t.Fatalf("WaitRoom on a full ring = %v, %v; want true, nil", wait, err)
	}
	if f := atomic.LoadUint64(w.wait); f != wd(1) {
		t.Fatalf("wait flag = %#x, want 1", f)
	}
	if release(t, c) {
		t.Fatal("Release with nothing consumed woke the waiting producer")
	}
	mustAvail(t, c, MinSize)
	take(t, c, 0, big)
	if !release(t, c) {
		t.Fatal("Release did not wake a waiting producer")
	}
	if f := atomic.LoadUint64(w.wait); f != wd(0) {
		t.Fatalf("wait flag = %#x after the wake-up, want 0", f)
	}
	take(t, c, 0, big)
	if release(t, c) {
		t.Fatal("a second Release woke the producer again")
	}
	if wait, err := p.WaitRoom(MinSize); wait || err != nil {
		t.Fatalf("WaitRoom with the room there = %v, %v; want false, nil", wait, err)
	}
	if f := atomic.LoadUint64(w.wait); f != wd(0) {
		t.Fatalf("wait flag = %#x after WaitRoom found room, want 0", f)
	}
}

// firstTouch runs f with the header page (hdr's) made inaccessible and
// returns the offset in hdr of the first word f touched: the address of
// the fault, which debug.SetPanicOnFault turns into a panic. It returns
// -1 if f touched nothing.
func firstTouch(t testing.TB, hdr []byte, f func()) (off int) {
	t.Helper()
	page := hdr[:os.Getpagesize()] // the slot starts a page (Create)
	if err := unix.Mprotect(page, unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Mprotect(page, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			t.Fatal(err)
		}
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		fault, ok := r.(interface{ Addr() uintptr })
		if !ok {
			panic(r)
		}
		off = int(fault.Addr() - uintptr(unsafe.Pointer(&hdr[0])))
	}()
	f()
	return -1
}

// TestHandshakeOrder checks the order each side's half of the sleep/wake
// handshake touches the shared words in, which TestSleepWakeRace can only
// catch by chance: a side going to sleep (or to wait for room) raises its
// flag before it looks at the other's index, and a side that published
// (or released) stores its index before it looks at the other's flag.
func TestHandshakeOrder(t *testing.T) {
	for dir := range 2 {
		s := newSlot(t)
		base := dir * 256
		p, c := s.pair(dir)
		p.Put(0, payload(0, 10))
		if off := firstTouch(t, s.hdr, func() { p.Publish() }); off != base {
			t.Errorf("dir %d: Publish touched offset %d first, want the head at %d", dir, off, base)
		}
		p, c = s.pair(dir)
		if off := firstTouch(t, s.hdr, func() { c.Sleep() }); off != base+128 {
			t.Errorf("dir %d: Sleep touched offset %d first, want the sleep flag at %d", dir, off, base+128)
		}
		p.Put(0, payload(0, MinSize-RecordHeaderLen))
		publish(t, p)
		mustAvail(t, c, MinSize)
		c.Skip(MinSize)
		if off := firstTouch(t, s.hdr, func() { c.Release() }); off != base+64 {
			t.Errorf("dir %d: Release touched offset %d first, want the tail at %d", dir, off, base+64)
		}
		p, _ = s.pair(dir)
		if off := firstTouch(t, s.hdr, func() { p.WaitRoom(1) }); off != base+192 {
			t.Errorf("dir %d: WaitRoom touched offset %d first, want the wait flag at %d", dir, off, base+192)
		}
		// And the words they touch first are theirs: nothing else wrote.
		if off := firstTouch(t, s.hdr, func() { c.Buffered(); p.Pending(); p.Put(0, nil) }); off != -1 {
			t.Errorf("dir %d: Buffered, Pending or Put touched the header at %d", dir, off)
		}
	}
}

// pipes is the wake-up plumbing of one ring: data wakes its consumer,
// room its producer.
type pipes struct {
	dataW *Waker
	dataS *Sleeper
	roomW *Waker
	roomS *Sleeper
}

func newPipes(t testing.TB) pipes {
	t.Helper()
	var ps pipes
	for _, end := range []struct {
		w **Waker
		s **Sleeper
	}{{&ps.dataW, &ps.dataS}, {&ps.roomW, &ps.roomS}} {
		r, w, err := NewPipe()
		if err != nil {
			t.Fatal(err)
		}
		if *end.w, err = NewWaker(w); err != nil {
			t.Fatal(err)
		}
		if *end.s, err = NewSleeper(r); err != nil {
			t.Fatal(err)
		}
		ww, ss := *end.w, *end.s
		t.Cleanup(func() {
			ww.Close()
			ss.Close()
		})
	}
	return ps
}

// deadline bounds every wait of the sleepers: a lost wake-up shows as
// Wait's deadline error, not as a hung test.
func (ps pipes) deadline(d time.Time) {
	ps.dataS.SetDeadline(d)
	ps.roomS.SetDeadline(d)
}

const recFin = 1 // the type of the tests' last record

// flow counts what a pump moved.
type flow struct {
	records, bytes int
	sum            uint32 // crc32 of types, lengths and payloads
	wakes          int    // wake-ups it sent
	sleeps         int    // waits it made
}

func (f *flow) add(typ byte, p []byte) {
	var h [5]byte
	h[0] = typ
	binary.BigEndian.PutUint32(h[1:], uint32(len(p)))
	f.sum = crc32.Update(f.sum, crc32.IEEETable, h[:])
	f.sum = crc32.Update(f.sum, crc32.IEEETable, p)
	f.records++
	f.bytes += len(p)
}

// produce puts records of random sizes, total payload bytes then a
// RecFin, publishing each, with the sleep/wake protocol for room.
func produce(p *Producer, ps pipes, total int, seed uint64, sizes func(*rand.Rand) int) (flow, error) {
	var f flow
	rng := rand.New(rand.NewPCG(seed, seed))
	src := make([]byte, 2*testMax)
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	for seq := 0; ; seq++ {
		n, typ := sizes(rng), byte(0)
		if f.bytes >= total {
			n, typ = 0, recFin
		}
		off := rng.IntN(len(src) - n + 1)
		b := src[off : off+n]
		if n >= 4 {
			binary.BigEndian.PutUint32(b, uint32(seq)) // shows order
		}
		for {
			free, err := p.Free()
			if err != nil {
				return f, err
			}
			if free >= RecordHeaderLen+n {
				break
			}
			wait, err := p.WaitRoom(RecordHeaderLen + n)
			if err != nil {
				return f, err
			}
			if wait {
				f.sleeps++
				if err := ps.roomS.Wait(); err != nil {
					return f, fmt.Errorf("producer waiting for %d bytes of room, %d free: %w", RecordHeaderLen+n, free, err)
				}
			}
		}
		p.Put(typ, b)
		if typ != recFin {
			f.add(typ, b)
		}
		wake, err := p.Publish()
		if err != nil {
			return f, err
		}
		if wake {
			f.wakes++
			if err := ps.dataW.Wake(); err != nil {
				return f, err
			}
		}
		if typ == recFin {
			return f, nil
		}
	}
}

// consume takes records until a RecFin, sleeping when the ring is empty
// and releasing room after each batch; it checks each record's order.
func consume(c *Consumer, ps pipes) (flow, error) {
	var f flow
	buf := make([]byte, testMax)
	for {
		avail, err := c.Avail()
		if err != nil {
			return f, err
		}
		if avail == 0 {
			sleep, err := c.Sleep()
			if err != nil {
				return f, err
			}
			if sleep {
				f.sleeps++
				err := ps.dataS.Wait()
				c.Awake()
				if err != nil {
					return f, fmt.Errorf("consumer waiting after %d records: %w", f.records, err)
				}
			}
			continue
		}
		for c.Buffered() > 0 {
			typ, n, err := c.Next()
			if err != nil {
				return f, err
			}
			b := buf[:n]
			c.Read(b, 0)
			c.Skip(RecordHeaderLen + n)
			if typ == recFin {
				_, err := c.Release()
				return f, err
			}
			if n >= 4 {
				if seq := binary.BigEndian.Uint32(b); int(seq) != f.records {
					return f, fmt.Errorf("record %d carries sequence number %d", f.records, seq)
				}
			}
			f.add(typ, b)
		}
		wake, err := c.Release()
		if err != nil {
			return f, err
		}
		if wake {
			f.wakes++
			if err := ps.roomW.Wake(); err != nil {
				return f, err
			}
		}
	}
}

type result struct {
	f   flow
	err error
}

// TestConcurrent moves 10 MB each way through one slot, producers and
// consumers in goroutines of their own sleeping and waking through pipes,
// and checks the records' checksum and order. A lost wake-up shows as a
// Wait that reaches its deadline. Busy rings make few wake-ups.
func TestConcurrent(t *testing.T) {
	s := newSlot(t)
	const total = 10 << 20
	sizes := func(rng *rand.Rand) int {
		if rng.IntN(4) == 0 {
			return rng.IntN(32 << 10)
		}
		return rng.IntN(256)
	}
	start := time.Now()
	var prod, cons [2]chan result
	for dir := range 2 {
		ps := newPipes(t)
		ps.deadline(start.Add(10 * time.Second))
		p, c := s.pair(dir)
		prod[dir], cons[dir] = make(chan result, 1), make(chan result, 1)
		go func() {
			f, err := produce(p, ps, total, uint64(dir+7), sizes)
			prod[dir] <- result{f, err}
		}()
		go func() {
			f, err := consume(c, ps)
			cons[dir] <- result{f, err}
		}()
	}
	for dir := range 2 {
		pr, cr := <-prod[dir], <-cons[dir]
		if pr.err != nil || cr.err != nil {
			t.Fatalf("dir %d: producer: %v; consumer: %v", dir, pr.err, cr.err)
		}
		if pr.f.records != cr.f.records || pr.f.bytes != cr.f.bytes || pr.f.sum != cr.f.sum {
			t.Fatalf("dir %d: sent %d records, %d bytes, crc %#x; got %d, %d, %#x",
				dir, pr.f.records, pr.f.bytes, pr.f.sum, cr.f.records, cr.f.bytes, cr.f.sum)
		}
		wakes := pr.f.wakes + cr.f.wakes
		t.Logf("dir %d: %d records, %d bytes; consumer woken %d times (slept %d), producer woken %d times (waited %d)",
			dir, cr.f.records, cr.f.bytes, pr.f.wakes, cr.f.sleeps, cr.f.wakes, pr.f.sleeps)
		if cr.f.bytes < total || wakes*4 > cr.f.records {
			t.Errorf("dir %d: %d wake-ups for %d records: want at most a quarter", dir, wakes, cr.f.records)
		}
	}
	t.Logf("%v", time.Since(start))
}

// TestPingPong sends one record at a time and waits for its echo, so that
// every record meets a sleeping consumer: the sleep/wake race at its
// tightest, each way. A lost wake-up shows as a Wait past its deadline.
func TestPingPong(t *testing.T) {
	s := newSlot(t)
	up, down := newPipes(t), newPipes(t)
	up.deadline(time.Now().Add(10 * time.Second))
	down.deadline(time.Now().Add(10 * time.Second))
	const rounds = 2000
	echo := make(chan result, 1)
	go func() { // the agent: takes a record up, sends it back down
		c := NewConsumer(s.hdr, Up, s.data[Up], testMax, testGen)
		p := NewProducer(s.hdr, Down, s.data[Down], testGen)
		var f flow
		buf := make([]byte, testMax)
		for {
			avail, err := c.Avail()
			if err == nil && avail == 0 {
				var sleep bool
				if sleep, err = c.Sleep(); err == nil && sleep {
					f.sleeps++
					err = up.dataS.Wait()
					c.Awake()
				}
				if err != nil {
					echo <- result{f, err}
					return
				}
				continue
			}
			if err != nil {
				echo <- result{f, err}
				return
			}
			typ, n, err := c.Next()
			if err != nil {
				echo <- result{f, err}
				return
			}
			c.Read(buf[:n], 0)
			c.Skip(RecordHeaderLen + n)
			_, err = c.Release()
			if err == nil {
				p.Put(typ, buf[:n])
				var wake bool
				if wake, err = p.Publish(); wake {
					f.wakes++
					down.dataW.Wake()
				}
			}
			if err != nil {
				echo <- result{f, err}
				return
			}
			if typ == recFin {
				echo <- result{f, nil}
				return
			}
		}
	}()

	p := NewProducer(s.hdr, Up, s.data[Up], testGen)
	c := NewConsumer(s.hdr, Down, s.data[Down], testMax, testGen)
	var wakes, sleeps int
	for i := range rounds + 1 {
		typ, want := byte(0), payload(i, i%50)
		if i == rounds {
			typ = recFin
		}
		p.Put(typ, want)
		if publish(t, p) {
			wakes++
			if err := up.dataW.Wake(); err != nil {
				t.Fatal(err)
			}
		}
		for {
			n, err := c.Avail()
			if err != nil {
				t.Fatal(err)
			}
			if n > 0 {
				break
			}
			sleep, err := c.Sleep()
			if err != nil {
				t.Fatal(err)
			}
			if sleep {
				sleeps++
				err := down.dataS.Wait()
				c.Awake()
				if err != nil {
					t.Fatalf("round %d: waiting for the echo: %v", i, err)
				}
			}
		}
		take(t, c, typ, want)
		release(t, c)
	}
	r := <-echo
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Logf("%d rounds: %d wake-ups up (%d sleeps), %d down (%d sleeps)", rounds, wakes, r.f.sleeps, r.f.wakes, sleeps)
}

// spin burns about n loop turns: a delay of up to a microsecond or so.
func spin(n int) int {
	x := 0
	for i := range n {
		x += i ^ x
	}
	return x
}

// yield lets the scheduler in now and then, in a loop that polls: often
// enough not to starve anything, seldom enough that a goroutine woken from
// the poller gets a processor at once.
var spins atomic.Uint32

func yield() {
	if spins.Add(1)%256 == 0 {
		runtime.Gosched()
	}
}

// TestSleepWakeRace lands publications about the moment the consumer goes
// to sleep, and releases about the moment the producer goes to wait for
// room, one record at a time (each side steers its delay to the other's
// moment, with some jitter): a side that
// looked at the other's index before raising its flag, or a side that
// looked at the flag before storing its index, loses a wake-up here, and
// the test sees a ring that stops. The rings are tiny (64 bytes), to make
// the records cheap. The race is narrow: a broken order is caught in most
// runs, not in every one.
func TestSleepWakeRace(t *testing.T) {
	const rounds = 5000
	const ringSize = 64
	const stuck = time.Second
	// maxLead bounds the delays (a few microseconds): a side slower than
	// that to answer shares its processor with the other, and the two do
	// not race at all.
	const maxLead = 3000
	t.Run("data", func(t *testing.T) {
		s := newSlot(t)
		ps := newPipes(t)
		ps.deadline(time.Now().Add(10 * time.Second))
		data := s.data[Up][:ringSize]
		p, c := NewProducer(s.hdr, Up, data, testGen), NewConsumer(s.hdr, Up, data, testMax, testGen)
		var close atomic.Int64 // Sleeps that found a record after all
		// lead is how long the consumer waits before it looks for the next
		// record: the producer moves it so that half of its publications
		// find the consumer asleep, half not, and so land about the moment
		// the consumer goes to sleep.
		var lead atomic.Int64
		lead.Store(100)
		errc := make(chan error, 1)
		go func() { // the consumer
			rng := rand.New(rand.NewPCG(12, 12))
			buf := make([]byte, ringSize)
			sum := 0
			for i := 0; ; {
				sum += spin(int(lead.Load()) + rng.IntN(32))
				avail, err := c.Avail()
				if err != nil {
					errc <- err
					return
				}
				if avail == 0 {
					sleep, err := c.Sleep()
					if err != nil {
						errc <- err
						return
					}
					if !sleep {
						close.Add(1)
						continue
					}
					err = ps.dataS.Wait()
					c.Awake()
					if err != nil {
						errc <- fmt.Errorf("record %d: %w (%d)", i, err, sum&1)
						return
					}
					continue
				}
				typ, n, err := c.Next()
				if err != nil {
					errc <- err
					return
				}
				c.Read(buf[:n], 0)
				c.Skip(RecordHeaderLen + n)
				if _, err := c.Release(); err != nil {
					errc <- err
					return
				}
				if typ == recFin {
					errc <- nil
					return
				}
				if got := binary.BigEndian.Uint32(buf); int(got) != i {
					errc <- fmt.Errorf("record %d carries %d", i, got)
					return
				}
				i++
			}
		}()
		rng := rand.New(rand.NewPCG(11, 11))
		sum, wakes := 0, 0
		for i := range rounds + 1 {
			sum += spin(rng.IntN(32))
			typ, b := byte(0), binary.BigEndian.AppendUint32(nil, uint32(i))
			if i == rounds {
				typ, b = recFin, nil
			}
			p.Put(typ, b)
			wake := publish(t, p)
			if wake && lead.Load() < maxLead { // the consumer slept already: let it look later
				lead.Add(4)
			} else if !wake && lead.Load() >= 4 {
				lead.Add(-4)
			}
			if wake {
				wakes++
				if err := ps.dataW.Wake(); err != nil {
					t.Fatal(err)
				}
			}
			// Wait, without sleeping, for the consumer to take it.
			start := time.Now()
			for k := 0; !p.Idle(); k++ {
				if k%1024 != 1023 {
					continue
				}
				select {
				case err := <-errc:
					t.Fatalf("round %d: consumer: %v", i, err)
				default:
				}
				if time.Since(start) > stuck {
					t.Fatalf("round %d: the record was not taken in %v: a lost wake-up (sleep flag %d)", i, stuck, atomic.LoadUint64(ctlOf(s.hdr, Up).sleep))
				}
				yield()
			}
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		t.Logf("%d records: %d wake-ups; %d times the record came as the consumer went to sleep; lead %d (%d)", rounds, wakes, close.Load(), lead.Load(), sum&1)
	})
	t.Run("room", func(t *testing.T) {
		s := newSlot(t)
		ps := newPipes(t)
		ps.deadline(time.Now().Add(10 * time.Second))
		data := s.data[Down][:ringSize]
		p, c := NewProducer(s.hdr, Down, data, testGen), NewConsumer(s.hdr, Down, data, testMax, testGen)
		var taken atomic.Int64
		errc := make(chan error, 1)
		go func() { // the consumer: takes each record a random while after it came
			rng := rand.New(rand.NewPCG(12, 12))
			buf := make([]byte, ringSize)
			sum := 0
			for i := 0; ; i++ {
				start := time.Now()
				for k := 0; c.Buffered() == 0; k++ {
					if _, err := c.Avail(); err != nil {
						errc <- err
						return
					}
					if k%1024 != 1023 {
						continue
					}
					if time.Since(start) > stuck {
						errc <- fmt.Errorf("record %d did not come in %v: a lost wake-up (wait flag %d)", i, stuck, atomic.LoadUint64(ctlOf(s.hdr, Down).wait))
						return
					}
					yield()
				}
				sum += spin(rng.IntN(32))
				typ, n, err := c.Next()
				if err != nil {
					errc <- err
					return
				}
				c.Read(buf[:n], 0)
				c.Skip(RecordHeaderLen + n)
				wake, err := c.Release()
				if err == nil && wake {
					err = ps.roomW.Wake()
				}
				if err != nil {
					errc <- err
					return
				}
				taken.Add(1)
				if typ == recFin {
					errc <- nil
					return
				}
				if got := binary.BigEndian.Uint32(buf); int(got) != i {
					errc <- fmt.Errorf("record %d carries %d (%d)", i, got, sum&1)
					return
				}
			}
		}()
		rng := rand.New(rand.NewPCG(13, 13))
		waits, close, sum := 0, 0, 0
		// lead is how long the producer waits before it raises its flag:
		// it moves so that half of the time the room came before, half
		// not, and so lands about the moment the consumer releases.
		lead := 100
		// One record fills the ring: a wake-up lost here is never made up
		// by a later release.
		const n = ringSize - RecordHeaderLen
		for i := range rounds + 1 {
			typ, b := byte(0), binary.BigEndian.AppendUint32(make([]byte, 0, n), uint32(i))
			b = b[:n]
			if i == rounds {
				typ = recFin
			}
			for {
				free, err := p.Free()
				if err != nil {
					t.Fatal(err)
				}
				if free >= RecordHeaderLen+n {
					break
				}
				sum += spin(lead + rng.IntN(32))
				wait, err := p.WaitRoom(RecordHeaderLen + n)
				if err != nil {
					t.Fatal(err)
				}
				if !wait {
					close++
					lead = max(lead-4, 0)
				} else {
					lead = min(lead+4, maxLead)
				}
				if wait {
					waits++
					ps.roomS.SetDeadline(time.Now().Add(stuck))
					if err := ps.roomS.Wait(); err != nil {
						t.Fatalf("round %d: waiting for room (%d taken): %v", i, taken.Load(), err)
					}
				}
			}
			p.Put(typ, b)
			publish(t, p)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		t.Logf("%d records: the producer waited for room %d times; %d times the room came as it went to wait; lead %d (%d)", rounds, waits, close, lead, sum&1)
	})
}
