// Package ring is the shared-memory fast path between a process and its
// agent (docs/protocol.md §8): per channel, one single-producer
// single-consumer ring of records per direction, in a memfd both map, with
// a wake-up pipe for each side that may sleep.
//
// To the agent the ring is hostile memory: the process may write anything
// anywhere in it at any moment. So each side keeps its own index privately
// and reads the other side's index exactly once per look, into private
// memory, and checks it before use: an index that moved backwards or past
// the end is an error, never a value to act on. A record's header is read
// once into private memory and its length checked against what was
// published; its payload is copied out once. Nothing read from the ring is
// read twice. The worst a process can do is break its own channel.
//
// A ring holds records in the channel socket's format (local.RecData,
// local.RecFin): a 4-byte big-endian header, type<<24 | length, then the
// payload, contiguous modulo the ring's size (a record may wrap). Indices
// are byte counts since the start, never reduced: head - tail is what is
// published and not yet consumed. A producer publishes whole records only.
//
// Generations: the agent puts the control words of several channels of
// one process in one page, and gives a slot to another channel once the
// first ended. A Conn of the process that has not yet learnt of its
// channel's end could still write its slot. So every word of a slot
// carries the slot's generation in its top 16 bits, and every store to a
// word the other side also writes, and every store of the process, is a
// compare-and-swap that includes it: a write from an earlier generation
// fails, and its writer learns that its channel ended (ErrEnded), without
// touching the new one. Indices are the low 48 bits, modulo 2^48.
//
// That every store of the handshake is a compare-and-swap matters twice:
// a locked instruction is a full barrier, which the store-then-load
// handshake needs; and under the race detector, atomic loads and stores on
// memory outside Go's heap (this mapping) become plain ones, without the
// barrier, while a compare-and-swap stays locked.
//
// Sleeping (event suppression, as virtio's and io_uring's): a consumer
// that finds its ring empty sets its sleeping flag, looks at the head once
// more, and only then waits on its wake-up pipe; a producer that published
// looks at the flag and writes the pipe only if it is set (clearing it),
// so a busy ring makes no wake-up calls. A producer waiting for room does
// the same with its waiting flag. All four flag and index operations are
// sequentially consistent (Go's sync/atomic), which this handshake needs:
// a store of the index, then a load of the flag, on one side; a store of
// the flag, then a load of the index, on the other.
package ring

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Layout of a channel's header slot: two rings' control words, each in a
// cache line of its own.
const (
	// HeaderSize is the size of one channel's header slot.
	HeaderSize = 512

	offHead  = 0   // producer's index
	offTail  = 64  // consumer's index
	offSleep = 128 // consumer sleeps: wake it after publishing
	offWait  = 192 // producer waits for room: wake it after consuming
	ctlSize  = 256

	// Up is the ring from the process to the agent; Down from the agent
	// to the process. Their control words are at Up*ctlSize and
	// Down*ctlSize in the header slot.
	Up   = 0
	Down = 1
)

// Sizes of a ring's data area.
const (
	MinSize     = 128 << 10
	MaxSize     = 4 << 20
	DefaultSize = 256 << 10
	// RecordHeaderLen is the size of a record's header.
	RecordHeaderLen = 4
)

// CheckSize reports whether n is a valid ring size: a power of two within
// [MinSize, MaxSize], which holds the largest record twice.
func CheckSize(n int) error {
	if n < MinSize || n > MaxSize || n&(n-1) != 0 {
		return fmt.Errorf("ring size %d: want a power of two from %d to %d", n, MinSize, MaxSize)
	}
	return nil
}

// ErrCorrupt is wrapped by the errors that come from what the other side
// wrote into the ring (a word of another generation is ErrEnded): the
// channel cannot go on.
var ErrCorrupt = errors.New("ring corrupt")

// ErrEnded: the slot belongs to a later generation: this side's channel
// ended.
var ErrEnded = errors.New("ring ended: its slot was given to another channel")

const (
	idxBits = 48
	idxMask = 1<<idxBits - 1
)

func word(gen uint16, v uint64) uint64 { return uint64(gen)<<idxBits | v&idxMask }

// load reads a word of generation gen: its low bits, or ErrEnded.
func load(p *uint64, gen uint16) (uint64, error) {
	v := atomic.LoadUint64(p)
	if uint16(v>>idxBits) != gen {
		return 0, ErrEnded
	}
	return v & idxMask, nil
}

// swap sets a word of generation gen from old to new, and fails with
// ErrEnded if the generation changed, or corruption if the word did.
func swap(p *uint64, gen uint16, old, new uint64) error {
	if atomic.CompareAndSwapUint64(p, word(gen, old), word(gen, new)) {
		return nil
	}
	v, err := load(p, gen)
	if err != nil {
		return err
	}
	return corrupt("a word of this side's was changed to %d", v)
}

// NextGen returns the generation after gen; 0 is never one, so that a
// slot of zeros belongs to no channel.
func NextGen(gen uint16) uint16 {
	if gen++; gen == 0 {
		gen = 1
	}
	return gen
}

// End marks a slot's channel ended (the agent): its words take
// generation gen, the one after the channel's, keeping their indices, so
// that every write the process still makes fails (ErrEnded), while what
// was published before can still be read (Consumer.AvailEnded) until the
// slot is given to another channel.
func End(hdr []byte, gen uint16) {
	for dir := range 2 {
		r := newRing(hdr, dir, nil)
		for _, p := range []*uint64{r.head, r.tail} {
			atomic.StoreUint64(p, word(gen, atomic.LoadUint64(p)))
		}
		for _, p := range []*uint64{r.sleep, r.wait} {
			atomic.StoreUint64(p, word(gen, 0))
		}
	}
}

// Init writes a slot's words for generation gen: the agent, before it
// hands the slot over.
func Init(hdr []byte, gen uint16) {
	for dir := range 2 {
		r := newRing(hdr, dir, nil)
		for _, p := range []*uint64{r.head, r.tail, r.sleep, r.wait} {
			atomic.StoreUint64(p, word(gen, 0))
		}
	}
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// ring is one direction: its control words and its data area.
type ring struct {
	head, tail  *uint64
	sleep, wait *uint64
	data        []byte
	size        uint64
	gen         uint16
}

func newRing(hdr []byte, dir int, data []byte) ring {
	if len(hdr) < HeaderSize {
		panic("ring: header slot too short")
	}
	if uintptr(unsafe.Pointer(&hdr[0]))%8 != 0 {
		panic("ring: header slot not aligned")
	}
	c := hdr[dir*ctlSize:]
	return ring{
		head:  (*uint64)(unsafe.Pointer(&c[offHead])),
		tail:  (*uint64)(unsafe.Pointer(&c[offTail])),
		sleep: (*uint64)(unsafe.Pointer(&c[offSleep])),
		wait:  (*uint64)(unsafe.Pointer(&c[offWait])),
		data:  data,
		size:  uint64(len(data)),
	}
}

// copyOut copies len(dst) bytes from ring position pos into dst.
// setFlag raises (v 1) or lowers (v 0) a flag this side owns and the
// other lowers.
func (r *ring) setFlag(p *uint64, v uint64) error {
	for range 4 {
		cur, err := load(p, r.gen)
		if err != nil {
			return err
		}
		if cur == v || atomic.CompareAndSwapUint64(p, word(r.gen, cur), word(r.gen, v)) {
			return nil
		}
	}
	return corrupt("a flag keeps changing")
}

// takeFlag lowers the other side's flag if it is raised, and reports
// whether it was.
func (r *ring) takeFlag(p *uint64) bool {
	return atomic.LoadUint64(p) == word(r.gen, 1) && atomic.CompareAndSwapUint64(p, word(r.gen, 1), word(r.gen, 0))
}

func (r *ring) copyOut(dst []byte, pos uint64) {
	off := pos & (r.size - 1)
	n := copy(dst, r.data[off:])
	copy(dst[n:], r.data)
}

// copyIn copies src into the ring at position pos.
func (r *ring) copyIn(pos uint64, src []byte) {
	off := pos & (r.size - 1)
	n := copy(r.data[off:], src)
	copy(r.data, src[n:])
}

// Producer writes records into a ring. Its head is private: the shared
// one is only ever written from it. Not safe for concurrent use.
type Producer struct {
	r    ring
	head uint64 // the next record's position; published up to here
	pub  uint64 // the head last published
	tail uint64 // the consumer's index as last seen, checked
}

// NewProducer returns the producer side of direction dir of the header
// slot hdr, of generation gen (see Init), over data.
func NewProducer(hdr []byte, dir int, data []byte, gen uint16) *Producer {
	p := &Producer{r: newRing(hdr, dir, data)}
	p.r.gen = gen
	p.head, _ = load(p.r.head, gen)
	p.pub, p.tail = p.head, p.head
	return p
}

// Free reads the consumer's index once and returns the room left for
// records, beyond those put and not yet published. A consumer index that
// moved backwards or past what was published is corruption.
func (p *Producer) Free() (int, error) {
	t, err := load(p.r.tail, p.r.gen)
	if err != nil {
		return 0, err
	}
	if (t-p.tail)&idxMask > (p.pub-p.tail)&idxMask {
		return 0, corrupt("consumer index %d: it was %d, and %d is published", t, p.tail, p.pub)
	}
	p.tail = t
	return int(p.r.size - (p.head-t)&idxMask), nil
}

// Put writes a record of type typ whose payload is the concatenation of
// parts; the caller made sure it fits (Free). It is not published yet.
func (p *Producer) Put(typ byte, parts ...[]byte) {
	n := 0
	for _, b := range parts {
		n += len(b)
	}
	var h [RecordHeaderLen]byte
	binary.BigEndian.PutUint32(h[:], uint32(typ)<<24|uint32(n))
	p.PutRaw(h[:])
	for _, b := range parts {
		p.PutRaw(b)
	}
}

// PutRaw writes bytes that are already whole records (a message
// channel's payload is its records: see wire.CountMessages).
func (p *Producer) PutRaw(b []byte) {
	p.r.copyIn(p.head, b)
	p.head = (p.head + uint64(len(b))) & idxMask
}

// Publish makes what was put visible to the consumer and reports whether
// the consumer sleeps and must be woken (its flag is lowered here, so one
// publication wakes it once).
func (p *Producer) Publish() (wake bool, err error) {
	if p.head == p.pub {
		return false, nil
	}
	if err := swap(p.r.head, p.r.gen, p.pub, p.head); err != nil {
		return false, err
	}
	p.pub = p.head
	return p.r.takeFlag(p.r.sleep), nil
}

// Head returns the position after the last record put.
func (p *Producer) Head() uint64 { return p.head }

// Taken reports whether the consumer, as last seen (Free), has consumed
// everything before position pos (a Head value since).
func (p *Producer) Taken(pos uint64) bool {
	return (pos-p.tail)&idxMask == 0 || (pos-p.tail)&idxMask > p.r.size
}

// Pending returns the bytes published and not yet consumed, as last seen.
func (p *Producer) Pending() int { return int((p.pub - p.tail) & idxMask) }

// Idle reports, reading the consumer's index once, whether everything
// published was consumed.
func (p *Producer) Idle() bool {
	_, err := p.Free()
	return err == nil && p.tail == p.head
}

// WaitRoom prepares to wait for n bytes of room: it raises the waiting
// flag and looks once more. It reports true if the caller must wait for a
// wake-up (and then call Free again), false if the room is there now.
func (p *Producer) WaitRoom(n int) (bool, error) {
	if err := p.r.setFlag(p.r.wait, 1); err != nil {
		return false, err
	}
	free, err := p.Free()
	if err != nil || free >= n {
		p.r.setFlag(p.r.wait, 0)
		return false, err
	}
	return true, nil
}

// Consumer reads records from a ring. Its tail is private: the shared one
// is only ever written from it. Not safe for concurrent use.
type Consumer struct {
	r    ring
	tail uint64 // the next record's position
	pub  uint64 // the tail last published
	head uint64 // the producer's index as last seen, checked
	max  int    // the largest payload a record may have
}

// NewConsumer returns the consumer side of direction dir of the header
// slot hdr, of generation gen (see Init), over data, taking records of at
// most max payload bytes.
func NewConsumer(hdr []byte, dir int, data []byte, max int, gen uint16) *Consumer {
	c := &Consumer{r: newRing(hdr, dir, data), max: max}
	c.r.gen = gen
	c.tail, _ = load(c.r.tail, gen)
	c.pub, c.head = c.tail, c.tail
	return c
}

// Avail reads the producer's index once and returns the bytes published
// and not yet consumed. An index that moved backwards, or more than the
// ring's size ahead of what was consumed, is corruption.
func (c *Consumer) Avail() (int, error) {
	h, err := load(c.r.head, c.r.gen)
	if err != nil {
		return 0, err
	}
	n, seen := (h-c.tail)&idxMask, (c.head-c.tail)&idxMask
	if n < seen || n > c.r.size {
		return 0, corrupt("producer index %d: it was %d, and %d is consumed of a ring of %d", h, c.head, c.tail, c.r.size)
	}
	c.head = h
	return int(n), nil
}

// AvailEnded is Avail for a channel that ended (Avail said ErrEnded):
// if the slot is still the ended channel's (End), what was published
// before the end may be read; once the slot is another channel's, nothing.
func (c *Consumer) AvailEnded() (int, error) {
	v := atomic.LoadUint64(c.r.head)
	if uint16(v>>idxBits) != NextGen(c.r.gen) {
		return 0, ErrEnded
	}
	h := v & idxMask
	n, seen := (h-c.tail)&idxMask, (c.head-c.tail)&idxMask
	if n < seen || n > c.r.size {
		return 0, corrupt("producer index %d: it was %d, and %d is consumed of a ring of %d", h, c.head, c.tail, c.r.size)
	}
	c.head = h
	return int(n), nil
}

// Buffered returns the bytes known published and not yet consumed,
// without looking at the ring again.
func (c *Consumer) Buffered() int { return int((c.head - c.tail) & idxMask) }

// Next reads the next record's header once, into private memory, and
// checks it against what was published (Avail): its type and payload
// length n. The header is not consumed.
func (c *Consumer) Next() (typ byte, n int, err error) { return c.NextAt(0) }

// NextAt is Next for the record off bytes past the next one (a record
// boundary the caller found with NextAt before).
func (c *Consumer) NextAt(off int) (typ byte, n int, err error) {
	avail := uint64(c.Buffered() - off)
	if off < 0 || off > c.Buffered() || avail < RecordHeaderLen {
		return 0, 0, corrupt("%d bytes published: less than a record header", avail)
	}
	var h [RecordHeaderLen]byte
	c.r.copyOut(h[:], c.tail+uint64(off))
	v := binary.BigEndian.Uint32(h[:])
	typ, n = byte(v>>24), int(v&0xffffff)
	if n > c.max {
		return 0, 0, corrupt("record of %d bytes, max %d", n, c.max)
	}
	if uint64(RecordHeaderLen+n) > avail {
		return 0, 0, corrupt("record of %d bytes runs past the %d bytes published", n, avail-RecordHeaderLen)
	}
	return typ, n, nil
}

// Read copies len(dst) bytes of the next record's payload, from offset off
// into it, into dst. The caller checked the record with Next.
func (c *Consumer) Read(dst []byte, off int) {
	c.r.copyOut(dst, c.tail+RecordHeaderLen+uint64(off))
}

// Skip consumes n bytes: a record (RecordHeaderLen plus its payload), or
// a run of them. The caller checked them.
func (c *Consumer) Skip(n int) { c.tail = (c.tail + uint64(n)) & idxMask }

// Release gives the consumed room back to the producer and reports
// whether the producer waits for it and must be woken (its flag is
// lowered here).
func (c *Consumer) Release() (wake bool, err error) {
	if c.tail == c.pub {
		return false, nil
	}
	if err := swap(c.r.tail, c.r.gen, c.pub, c.tail); err != nil {
		return false, err
	}
	c.pub = c.tail
	return c.r.takeFlag(c.r.wait), nil
}

// Sleep prepares to wait for records: it raises the sleeping flag and
// looks at the producer's index once more. It reports true if the caller
// must wait for a wake-up, false if records came meanwhile (the flag is
// then lowered).
func (c *Consumer) Sleep() (bool, error) {
	if err := c.r.setFlag(c.r.sleep, 1); err != nil {
		return false, err
	}
	n, err := c.Avail()
	if err != nil || n > 0 {
		c.r.setFlag(c.r.sleep, 0)
		return false, err
	}
	return true, nil
}

// Awake lowers the sleeping flag after a wake-up or a wait given up.
func (c *Consumer) Awake() { c.r.setFlag(c.r.sleep, 0) }

// Size is the ring's data size.
func (c *Consumer) Size() int { return int(c.r.size) }

// Size is the ring's data size.
func (p *Producer) Size() int { return int(p.r.size) }
