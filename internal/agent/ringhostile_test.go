package agent

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/cluster"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/ring"
)

// Adversarial tests of the ring path (ring.go) in which the test plays a
// hostile process on node-a: it speaks the local protocol by hand, maps the
// rings the agent offers, and then breaks them — indices, records, the
// agent's own words, wake-ups (records on the socket, and the room pipes),
// the memory itself, the channel socket. node-a's agent is real; the peer
// is a Go client on node-b. After each attack: the attack was refused (the
// hostile channel ended with protocol where it broke the protocol, and the
// peer read sinc.ErrProtocol), node-a still serves (a well-behaved channel
// opened before the attack still echoes), and nothing is left behind
// (node-a's connection table, goroutines).

// ringSpecs: node-a/web may reach node-b/db, and node-b/db node-a/web (for
// a hostile listener).
var ringSpecs = []cluster.NodeSpec{
	{Name: "node-a", Partitions: []string{"web"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/*/*"

[[allow]]
from = "node-b/db"
to = "node-a/web/*"
`},
	{Name: "node-b", Partitions: []string{"db"}, Extra: `
[[allow]]
from = "node-a/web"
to = "node-b/db/*"

[[allow]]
from = "node-b/db"
to = "node-a/web/*"
`},
}

// The layout of a channel's header slot (internal/ring/ring.go), which
// the hostile process plays with directly: per direction, four 64-bit
// words, each the slot's generation in its top 16 bits and an index or a
// flag in the low 48.
const (
	hCtlSize  = 256 // each direction's control words
	hOffHead  = 0
	hOffTail  = 64
	hOffSleep = 128
	hOffWait  = 192
	hIdxBits  = 48
	hIdxMask  = 1<<hIdxBits - 1
)

// ringEnv is node-a and node-b, a well-behaved channel from node-a/web to
// an echo on node-b/db opened first and kept open, and a sink on node-b/db
// that the hostile process's channels reach.
type ringEnv struct {
	p        *pair
	good     *sinc.Conn
	goodTime time.Duration // one checkGood before any attack
	sink     *sinc.Listener
	base     int // goroutines before any attack
}

func startRingEnv(t *testing.T) *ringEnv {
	t.Helper()
	withRings(t)
	e := &ringEnv{p: startPair(t, ringSpecs)}
	echo(t, e.p.listen(t, "node-b", "db", "echo"))
	e.sink = e.p.listen(t, "node-b", "db", "sink")
	e.good = e.p.mustDial(t, "node-a", "web", "node-b/db/echo", sinc.Stream)
	e.goodTime = e.checkGood(t)
	e.base = runtime.NumGoroutine()
	return e
}

// checkGood sends 256 KiB through the well-behaved channel and reads them
// back; it returns how long that took.
func (e *ringEnv) checkGood(t *testing.T) time.Duration {
	t.Helper()
	data := random(t, 256<<10)
	start := time.Now()
	e.good.SetDeadline(start.Add(5 * time.Second))
	defer e.good.SetDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() {
		_, err := e.good.Write(data)
		errc <- err
	}()
	got := make([]byte, len(data))
	if _, err := io.ReadFull(e.good, got); err != nil {
		t.Fatalf("the well-behaved channel: read: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("the well-behaved channel: write: %v", err)
	}
	mustEqual(t, "the well-behaved channel's echo", got, data)
	return time.Since(start)
}

// after checks that node-a still serves and holds nothing of the hostile
// channels: the well-behaved channel echoes, node-a's table has it alone,
// and the goroutines are back near where they were.
func (e *ringEnv) after(t *testing.T) {
	t.Helper()
	if d := e.checkGood(t); d > 3*time.Second {
		t.Fatalf("the well-behaved channel echoed 256 KiB in %s (%s before the attack)", d, e.goodTime)
	}
	var rows []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		rows = rows[:0]
		for _, r := range conns(t, e.p.a) {
			rows = append(rows, fmt.Sprintf("conn %d %s, in %d out %d", r.ID, r.State, r.BytesIn, r.BytesOut))
		}
		if len(rows) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node-a's connection table holds more than the well-behaved channel 5s after the attack: %q", rows)
		}
	}
	eventually(t, 5*time.Second, "goroutines back near their number before the attack", func() bool {
		return runtime.NumGoroutine() <= e.base+20
	})
}

// dialHostile opens a ring channel from node-a/web to the sink by hand and
// returns the hostile process's end and the peer's.
func (e *ringEnv) dialHostile(t *testing.T, kind string) (*ringProc, *sinc.Conn) {
	t.Helper()
	sock := openRingRaw(t, e.p.sock("node-a", "web"), "node-b/db/sink", kind)
	h := mapRing(t, sock)
	return h, acceptNext(t, e.sink)
}

// readLine reads the agent's answer line byte by byte: nothing after it
// may be consumed (the ring record and its descriptors follow).
func readLine(t *testing.T, c net.Conn) []byte {
	t.Helper()
	var line []byte
	b := make([]byte, 1)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	for len(line) == 0 || line[len(line)-1] != '\n' {
		if _, err := c.Read(b); err != nil {
			t.Fatalf("answer: %v", err)
		}
		line = append(line, b[0])
	}
	return line
}

// openRingRaw opens a channel asking for a ring, as a process in any
// language would, and returns its socket, the ring record unread.
func openRingRaw(t *testing.T, socket, to, kind string) *net.UnixConn {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	req, _ := json.Marshal(local.Request{V: 3, Op: local.OpOpen, To: to, Kind: kind, Ring: true})
	if _, err := c.Write(append(req, '\n')); err != nil {
		t.Fatal(err)
	}
	line := readLine(t, c)
	var r local.Response
	if err := json.Unmarshal(line, &r); err != nil || !r.OK || !r.Ring {
		t.Fatalf("open %s with a ring: %s", to, line)
	}
	return c.(*net.UnixConn)
}

// ringProc is the hostile process's end of a ring channel: its socket, its
// own mappings of the rings, and its descriptors.
type ringProc struct {
	sock        *net.UnixConn
	offer       local.RingOffer
	fds         [local.RingFDs]int // the room pipes' ends; -1 once closed
	hdrF, dataF *os.File           // the memfds
	hdrM, dataM *ring.Mem
	hdr         []byte // the channel's header slot
	up          *ring.Producer
	down        *ring.Consumer
	once        sync.Once
	put         uint64 // bytes published up
}

// mapRing reads the ring record from sock and maps the rings, checking
// them as a careful process would.
func mapRing(t *testing.T, sock *net.UnixConn) *ringProc {
	t.Helper()
	offer, fds, err := local.ReadRing(sock)
	if err != nil {
		t.Fatalf("the agent's ring record: %v", err)
	}
	h := &ringProc{sock: sock, offer: *offer}
	copy(h.fds[:], fds)
	h.hdrF = os.NewFile(uintptr(fds[local.RingFDHeader]), "ring-hdr")
	h.dataF = os.NewFile(uintptr(fds[local.RingFDData]), "ring-data")
	h.fds[local.RingFDHeader], h.fds[local.RingFDData] = -1, -1
	t.Cleanup(h.close)
	if err := ring.CheckSize(offer.Size); err != nil {
		t.Fatal(err)
	}
	if offer.Slot < 0 || offer.Slot%ring.HeaderSize != 0 || offer.Slot+ring.HeaderSize > pageSize {
		t.Fatalf("header slot at %d", offer.Slot)
	}
	if h.hdrM, err = ring.Map(h.hdrF, pageSize); err != nil {
		t.Fatal(err)
	}
	if h.dataM, err = ring.Map(h.dataF, 2*offer.Size); err != nil {
		t.Fatal(err)
	}
	h.hdr = h.hdrM.B[offer.Slot : offer.Slot+ring.HeaderSize]
	h.up = ring.NewProducer(h.hdr, ring.Up, h.dataM.B[:offer.Size], offer.Gen)
	h.down = ring.NewConsumer(h.hdr, ring.Down, h.dataM.B[offer.Size:], local.MaxRecord, offer.Gen)
	if g := h.word(ring.Up, hOffHead) >> hIdxBits; g != uint64(offer.Gen) {
		t.Fatalf("the slot's words are of generation %d, the offer says %d", g, offer.Gen)
	}
	return h
}

// close closes everything the process holds. Nothing may use the mappings
// after (the caller stopped its goroutines).
func (h *ringProc) close() {
	h.once.Do(func() {
		h.sock.Close()
		for i := range h.fds {
			h.closeFD(i)
		}
		h.hdrM.Unmap()
		h.dataM.Unmap()
		h.hdrF.Close()
		h.dataF.Close()
	})
}

func (h *ringProc) closeFD(i int) {
	if h.fds[i] >= 0 {
		unix.Close(h.fds[i])
		h.fds[i] = -1
	}
}

func (h *ringProc) ptr(dir, off int) *uint64 {
	return (*uint64)(unsafe.Pointer(&h.hdr[dir*hCtlSize+off]))
}

// word reads a control word as it is; idx its low bits.
func (h *ringProc) word(dir, off int) uint64 { return atomic.LoadUint64(h.ptr(dir, off)) }
func (h *ringProc) idx(dir, off int) uint64  { return h.word(dir, off) & hIdxMask }

// set stores v into a control word, with the slot's generation: whatever
// the other side or this side's own code expects there.
func (h *ringProc) set(dir, off int, v uint64) {
	atomic.StoreUint64(h.ptr(dir, off), uint64(h.offer.Gen)<<hIdxBits|v&hIdxMask)
}

// upData is the ring up's data area, as the process maps it.
func (h *ringProc) upData() []byte { return h.dataM.B[:h.offer.Size] }

// poke writes b into the ring up at index pos, wrapping.
func (h *ringProc) poke(pos uint64, b []byte) {
	d := h.upData()
	for i, c := range b {
		d[(pos+uint64(i))&uint64(len(d)-1)] = c
	}
}

// wakeRec is a wake-up record.
var wakeRec = []byte{local.RecWake, 0, 0, 0}

// sockFD runs f with the socket's descriptor.
func (h *ringProc) sockFD(f func(fd int)) {
	rc, err := h.sock.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) { f(int(fd)) })
}

// writable waits at most 100ms for fd to take a write.
func writable(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
	n, err := unix.Poll(p, 100)
	return err == nil && n == 1 && p[0].Revents&unix.POLLOUT != 0
}

// wake writes a wake-up record on the socket if it can within a moment
// (the process may have made its socket blocking), with raw system calls,
// whatever its socket's flags.
func (h *ringProc) wake() {
	h.sockFD(func(fd int) {
		if writable(fd) {
			unix.SendmsgN(fd, wakeRec, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		}
	})
}

// roomWake tells the agent, on the down room pipe, that the process made
// room down.
func (h *ringProc) roomWake() {
	if fd := h.fds[local.RingFDDownRoom]; fd >= 0 && writable(fd) {
		unix.Write(fd, []byte{1})
	}
}

// waitRoom waits, at most d, for n bytes of room up.
func (h *ringProc) waitRoom(n int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		free, err := h.up.Free()
		if err != nil {
			return err
		}
		if free >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no room for %d bytes up within %s", n, d)
		}
		time.Sleep(time.Millisecond)
	}
}

// send puts one record up, publishes it and wakes the agent if it sleeps;
// it waits at most d for room.
func (h *ringProc) send(typ byte, p []byte, d time.Duration) error {
	if err := h.waitRoom(ring.RecordHeaderLen+len(p), d); err != nil {
		return err
	}
	h.up.Put(typ, p)
	return h.publish(uint64(ring.RecordHeaderLen + len(p)))
}

// sendRaw puts bytes up as they are (records, or not), publishes them and
// wakes the agent.
func (h *ringProc) sendRaw(t *testing.T, b []byte) {
	t.Helper()
	if err := h.waitRoom(len(b), 3*time.Second); err != nil {
		t.Fatal(err)
	}
	h.up.PutRaw(b)
	if err := h.publish(uint64(len(b))); err != nil {
		t.Fatal(err)
	}
	h.wake()
}

func (h *ringProc) publish(n uint64) error {
	wake, err := h.up.Publish()
	if err != nil {
		return err
	}
	h.put += n
	if wake {
		h.wake()
	}
	return nil
}

// upHead is the index published up (the ring starts at 0).
func (h *ringProc) upHead() uint64 { return h.put & hIdxMask }

// ringRecord returns a record's bytes, its length field n.
func ringRecord(typ byte, n int, p []byte) []byte {
	b := make([]byte, ring.RecordHeaderLen+len(p))
	binary.BigEndian.PutUint32(b, uint32(typ)<<24|uint32(n))
	copy(b[ring.RecordHeaderLen:], p)
	return b
}

var errNothingDown = errors.New("nothing down in time")

// get takes the next record down, polling the ring (never the socket) for
// at most d.
func (h *ringProc) get(d time.Duration) (byte, []byte, error) {
	deadline := time.Now().Add(d)
	for {
		n, err := h.down.Avail()
		if err != nil {
			return 0, nil, err
		}
		if n > 0 {
			typ, size, err := h.down.Next()
			if err != nil {
				return 0, nil, err
			}
			b := make([]byte, size)
			h.down.Read(b, 0)
			h.down.Skip(ring.RecordHeaderLen + size)
			wake, err := h.down.Release()
			if err != nil {
				return 0, nil, err
			}
			if wake {
				h.roomWake()
			}
			return typ, b, nil
		}
		if time.Now().After(deadline) {
			return 0, nil, errNothingDown
		}
		time.Sleep(time.Millisecond)
	}
}

// getStream reads n bytes of data records down.
func (h *ringProc) getStream(t *testing.T, n int) []byte {
	t.Helper()
	var got []byte
	for len(got) < n {
		typ, b, err := h.get(5 * time.Second)
		if err != nil {
			t.Fatalf("hostile process: reading down after %d of %d bytes: %v", len(got), n, err)
		}
		if typ != local.RecData {
			t.Fatalf("hostile process: record of type %d down", typ)
		}
		got = append(got, b...)
	}
	return got
}

// closeRecord waits at most d for the agent's close record on the
// socket, taking the wake-up records before it: on a ring channel,
// nothing else may come there.
func (h *ringProc) closeRecord(d time.Duration) (*local.Error, error) {
	h.sock.SetReadDeadline(time.Now().Add(d))
	defer h.sock.SetReadDeadline(time.Time{})
	for wakes := 0; ; wakes++ {
		var hd [local.RecordHeaderLen]byte
		if _, err := io.ReadFull(h.sock, hd[:]); err != nil {
			return nil, fmt.Errorf("no close record on the channel socket (after %d wake-ups): %w", wakes, err)
		}
		typ, n, err := local.ParseRecordHeader(hd[:])
		if err != nil {
			return nil, err
		}
		if typ == local.RecWake {
			continue
		}
		if typ != local.RecClose {
			return nil, fmt.Errorf("record of type %d on the socket of a ring channel", typ)
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(h.sock, p); err != nil {
			return nil, err
		}
		var why local.Error
		if err := json.Unmarshal(p, &why); err != nil {
			return nil, fmt.Errorf("close record %q: %w", p, err)
		}
		return &why, nil
	}
}

// ended checks that the agent ended the channel with one of codes.
func (h *ringProc) ended(t *testing.T, codes ...string) *local.Error {
	t.Helper()
	why, err := h.closeRecord(5 * time.Second)
	if err != nil {
		t.Fatalf("hostile process: %v", err)
	}
	for _, c := range codes {
		if why.Code == c {
			return why
		}
	}
	t.Fatalf("hostile process: channel ended with %s: %s; want %v", why.Code, why.Message, codes)
	return nil
}

// peerEnd reads the peer's channel to its end (at most d) and returns the
// error that ended it (nil for a clean end of stream).
func peerEnd(c *sinc.Conn, d time.Duration) error {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	return err
}

func peerProtocol(t *testing.T, c *sinc.Conn) {
	t.Helper()
	if err := peerEnd(c, 5*time.Second); !errors.Is(err, sinc.ErrProtocol) {
		t.Fatalf("peer: read ended with %v, want %v", err, sinc.ErrProtocol)
	}
}

// peerGets reads len(want) bytes on the peer's channel and checks them.
func peerGets(t *testing.T, c *sinc.Conn, want []byte) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("peer: read: %v", err)
	}
	mustEqual(t, "what the peer read", got, want)
}

// roundTripUp sends a record up and checks the peer gets it: the hostile
// channel works.
func (h *ringProc) roundTripUp(t *testing.T, peer *sinc.Conn, n int) {
	t.Helper()
	msg := random(t, n)
	if err := h.send(local.RecData, msg, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	peerGets(t, peer, msg)
}

// roundTripDown has the peer write and checks the hostile process gets it.
func (h *ringProc) roundTripDown(t *testing.T, peer *sinc.Conn, n int) {
	t.Helper()
	msg := random(t, n)
	if _, err := peer.Write(msg); err != nil {
		t.Fatalf("peer: write: %v", err)
	}
	mustEqual(t, "what the hostile process read down", h.getStream(t, n), msg)
}

// consumedUp waits until the agent took everything published up.
func (h *ringProc) consumedUp(t *testing.T) {
	t.Helper()
	eventually(t, 5*time.Second, "the agent takes what was published up", func() bool {
		return h.idx(ring.Up, hOffTail) == h.upHead()
	})
}

func malformed(t *testing.T, a *testAgent) uint64 { return stats(t, a)["rejected_malformed"] }

// TestRingHostileUpIndexRewound: the process moves its up index backwards
// after the agent took what it published: the agent ends the channel with
// protocol, and tells the peer so.
func TestRingHostileUpIndexRewound(t *testing.T) {
	e := startRingEnv(t)
	before := malformed(t, e.p.a)
	h, peer := e.dialHostile(t, local.KindStream)
	h.roundTripUp(t, peer, 1000)
	h.consumedUp(t)

	h.set(ring.Up, hOffHead, h.upHead()-500)
	h.wake()
	h.ended(t, "protocol")
	peerProtocol(t, peer)
	if got := malformed(t, e.p.a); got <= before {
		t.Errorf("rejected_malformed %d, was %d", got, before)
	}
	h.close()
	e.after(t)
}

// TestRingHostileUpIndexPastEnd: the process moves its up index more than
// the ring's size past what the agent consumed (by one byte, and to the
// largest index), or writes it with another generation than the slot's:
// protocol, every time.
func TestRingHostileUpIndexPastEnd(t *testing.T) {
	e := startRingEnv(t)
	for _, c := range []struct {
		name string
		head func(h *ringProc) uint64 // the whole word
	}{
		{"size+1", func(h *ringProc) uint64 {
			return uint64(h.offer.Gen)<<hIdxBits | h.upHead() + uint64(h.offer.Size) + 1
		}},
		{"largest", func(h *ringProc) uint64 { return uint64(h.offer.Gen)<<hIdxBits | hIdxMask }},
		{"all ones", func(*ringProc) uint64 { return ^uint64(0) }},
		{"next generation", func(h *ringProc) uint64 {
			return uint64(ring.NextGen(h.offer.Gen))<<hIdxBits | h.upHead() + 4
		}},
		{"generation zero", func(h *ringProc) uint64 { return h.upHead() + 4 }},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, peer := e.dialHostile(t, local.KindStream)
			h.roundTripUp(t, peer, 1000)
			h.consumedUp(t)
			atomic.StoreUint64(h.ptr(ring.Up, hOffHead), c.head(h))
			h.wake()
			h.ended(t, "protocol")
			peerProtocol(t, peer)
			h.close()
		})
	}
	e.after(t)
}

// TestRingHostileAgentWords: the process writes the words that are the
// agent's — its index of each ring, its sleeping flag up — out of turn:
// the agent's next compare-and-swap or look fails and ends the channel
// with protocol.
func TestRingHostileAgentWords(t *testing.T) {
	e := startRingEnv(t)
	for _, c := range []struct {
		name   string
		attack func(h *ringProc)
		then   func(t *testing.T, h *ringProc, peer *sinc.Conn) // what makes the agent look
	}{
		{"up tail moved", func(h *ringProc) { h.set(ring.Up, hOffTail, h.idx(ring.Up, hOffTail)+8) },
			func(t *testing.T, h *ringProc, _ *sinc.Conn) {
				// Its own Free would refuse the index it wrote: past it.
				h.up.Put(local.RecData, []byte("after"))
				if err := h.publish(ring.RecordHeaderLen + 5); err != nil {
					t.Fatal(err)
				}
				h.wake()
			}},
		{"down head moved", func(h *ringProc) { h.set(ring.Down, hOffHead, h.idx(ring.Down, hOffHead)+8) },
			func(t *testing.T, _ *ringProc, peer *sinc.Conn) { peer.Write([]byte("after")) }},
		{"up sleeping flag of another generation", func(h *ringProc) {
			atomic.StoreUint64(h.ptr(ring.Up, hOffSleep), uint64(ring.NextGen(h.offer.Gen))<<hIdxBits)
		}, func(t *testing.T, h *ringProc, _ *sinc.Conn) {
			h.send(local.RecData, []byte("after"), time.Second)
			h.wake()
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, peer := e.dialHostile(t, local.KindStream)
			h.roundTripUp(t, peer, 1000)
			h.roundTripDown(t, peer, 1000)
			h.consumedUp(t)
			c.attack(h)
			c.then(t, h, peer)
			why := h.ended(t, "protocol")
			t.Logf("hostile process told: %s", why.Message)
			peerProtocol(t, peer)
			h.close()
		})
	}
	e.after(t)
}

// TestRingHostileBadRecords: records in the ring up that no process may
// write — too long, running past what was published, of an unknown type, a
// close record (it goes on the socket), a fin with a payload, a ring or
// wake-up record — end the channel with protocol; what came before them
// was delivered.
func TestRingHostileBadRecords(t *testing.T) {
	e := startRingEnv(t)
	closeJSON, _ := json.Marshal(local.Error{Code: "aborted", Message: "in the ring"})
	for _, c := range []struct {
		name string
		kind string
		rec  []byte // published as it is
	}{
		{"longer than MaxRecord", local.KindStream, ringRecord(local.RecData, local.MaxRecord+1, make([]byte, local.MaxRecord+1))},
		{"length field all ones", local.KindStream, ringRecord(local.RecData, 0xffffff, make([]byte, 100))},
		{"runs past what was published", local.KindStream, ringRecord(local.RecData, 1000, make([]byte, 500))},
		{"runs past what was published (message)", local.KindMessage, ringRecord(local.RecData, 1000, make([]byte, 999))},
		{"half a header", local.KindStream, []byte{0, 0}},
		{"unknown type 7", local.KindStream, ringRecord(7, 10, make([]byte, 10))},
		{"close record in the ring", local.KindStream, ringRecord(local.RecClose, len(closeJSON), closeJSON)},
		{"fin with a payload", local.KindStream, ringRecord(local.RecFin, 5, make([]byte, 5))},
		{"ring record in the ring", local.KindStream, ringRecord(local.RecRing, 10, make([]byte, 10))},
		{"wake-up record in the ring", local.KindStream, ringRecord(local.RecWake, 0, nil)},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, peer := e.dialHostile(t, c.kind)
			msg := random(t, 300)
			if err := h.send(local.RecData, msg, 3*time.Second); err != nil {
				t.Fatal(err)
			}
			if c.kind == local.KindMessage {
				peer.SetReadDeadline(time.Now().Add(5 * time.Second))
				m, err := peer.ReadMessage()
				if err != nil {
					t.Fatalf("peer: %v", err)
				}
				mustEqual(t, "the message before the bad record", m, msg)
			} else {
				peerGets(t, peer, msg)
			}
			h.sendRaw(t, c.rec)
			why := h.ended(t, "protocol")
			t.Logf("hostile process told: %s", why.Message)
			peerProtocol(t, peer)
			h.close()
		})
	}
	e.after(t)
}

// TestRingHostileRecordsRewrittenAfterPublish: the process publishes
// records and rewrites them while the agent reads them, in a tight loop.
// The agent reads each header once and copies each payload once: it never
// crashes, never delivers more than was published, and the peer gets
// well-framed messages (their bytes are the process's own business) until
// the channel ends — with protocol when the agent caught a bad header,
// else with a reset when the process closes.
func TestRingHostileRecordsRewrittenAfterPublish(t *testing.T) {
	e := startRingEnv(t)

	type result struct {
		msgs, bytes int
		lens        map[int]int // messages by length
		err         error
	}
	reader := func(peer *sinc.Conn) chan result {
		res := make(chan result, 1)
		go func() {
			r := result{lens: map[int]int{}}
			peer.SetReadDeadline(time.Now().Add(10 * time.Second))
			for {
				m, err := peer.ReadMessage()
				if err != nil {
					r.err = err
					res <- r
					return
				}
				r.msgs++
				r.bytes += ring.RecordHeaderLen + len(m)
				r.lens[len(m)]++
			}
		}()
		return res
	}
	// storm runs the process's writer and its scribbler for 500ms.
	storm := func(h *ringProc, size func(i int) int, poke func(x uint32, last uint64)) (records int, serr error, pokes int) {
		var (
			last atomic.Uint64 // the index of the last record published
			stop = make(chan struct{})
			wg   sync.WaitGroup
		)
		wg.Add(2)
		go func() { // publishes records, well formed when published
			defer wg.Done()
			p := bytes.Repeat([]byte{0x5a}, local.MaxRecord)
			for ; records < 100000; records++ {
				select {
				case <-stop:
					return
				default:
				}
				pos := h.upHead()
				if serr = h.send(local.RecData, p[:size(records)], 200*time.Millisecond); serr != nil {
					return // the agent stopped taking: the channel ended
				}
				last.Store(pos)
			}
		}()
		go func() { // rewrites what was published, as fast as it can
			defer wg.Done()
			x := uint32(2463534242)
			for pokes = 0; pokes < 50_000_000; pokes++ {
				if pokes%1024 == 0 {
					select {
					case <-stop:
						return
					default:
					}
				}
				x ^= x << 13
				x ^= x >> 17
				x ^= x << 5
				poke(x, last.Load())
			}
		}()
		time.Sleep(500 * time.Millisecond)
		close(stop)
		wg.Wait()
		return records, serr, pokes
	}

	// Headers and payloads rewritten: the agent may catch a bad header
	// (protocol), or deliver whatever framing it read once.
	t.Run("headers", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindMessage)
		res := reader(peer)
		records, serr, pokes := storm(h, func(i int) int { return 1 + i%3000 }, func(x uint32, pos uint64) {
			var b [4]byte
			binary.BigEndian.PutUint32(b[:], x)
			switch x >> 30 {
			case 0: // any length, type data
				b[0] = 0
				h.poke(pos, b[:])
			case 1: // a plausible length
				b[0], b[1] = 0, b[1]&0x0f
				h.poke(pos, b[:])
			case 2: // any type
				h.poke(pos, b[:])
			default: // the payload
				h.poke(pos+4+uint64(x&0x3ff), b[:])
			}
		})
		published := h.put
		t.Logf("published %d records, %d bytes up; %d rewrites; the writer stopped with %v", records, published, pokes, serr)
		var r result
		select {
		case r = <-res:
			why := h.ended(t, "protocol")
			t.Logf("the agent ended the channel: %s", why.Message)
			if !errors.Is(r.err, sinc.ErrProtocol) {
				t.Errorf("peer: read ended with %v, want %v", r.err, sinc.ErrProtocol)
			}
		case <-time.After(time.Second):
			h.close()
			r = <-res
			if !errors.Is(r.err, sinc.ErrProtocol) && !errors.Is(r.err, sinc.ErrReset) {
				t.Errorf("peer: read ended with %v, want %v or %v", r.err, sinc.ErrProtocol, sinc.ErrReset)
			}
		}
		t.Logf("peer read %d messages (%d bytes as records), then %v", r.msgs, r.bytes, r.err)
		if uint64(r.bytes) > published {
			t.Errorf("peer read %d bytes of records: more than the %d published", r.bytes, published)
		}
		h.close()
	})

	// Payloads only: records of 1024 bytes, so that every header is at a
	// multiple of 1024 in the ring, and the process rewrites any byte but
	// those. The framing the agent read once is the one the process
	// published: the peer gets every message, each of 1020 bytes, then the
	// process's fin.
	t.Run("payloads", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindMessage)
		res := reader(peer)
		const rec = 1024
		size := uint32(h.offer.Size)
		records, serr, pokes := storm(h, func(int) int { return rec - ring.RecordHeaderLen }, func(x uint32, _ uint64) {
			pos := uint64(x % size)
			if pos%rec < ring.RecordHeaderLen {
				pos += ring.RecordHeaderLen
			}
			h.poke(pos, []byte{byte(x)})
		})
		t.Logf("published %d records; %d rewrites; the writer stopped with %v", records, pokes, serr)
		if serr != nil {
			t.Fatalf("the process's writer: %v", serr)
		}
		if err := h.send(local.RecFin, nil, time.Second); err != nil {
			t.Fatal(err)
		}
		r := <-res
		t.Logf("peer read %d messages, then %v", r.msgs, r.err)
		if r.msgs != records || r.lens[rec-ring.RecordHeaderLen] != records {
			t.Errorf("peer read messages of these lengths %v; want %d of %d bytes", r.lens, records, rec-ring.RecordHeaderLen)
		}
		if r.err != io.EOF {
			t.Errorf("peer: read ended with %v, want %v (the process's fin)", r.err, io.EOF)
		}
		h.close()
	})
	e.after(t)
}

// TestRingHostileDownIndexBroken: the process moves its down index
// backwards, or past what the agent published: the agent finds out at its
// next write down and ends the channel with protocol.
func TestRingHostileDownIndexBroken(t *testing.T) {
	e := startRingEnv(t)
	for _, c := range []struct {
		name string
		tail func(h *ringProc, consumed, published uint64) uint64
	}{
		{"backwards", func(_ *ringProc, consumed, _ uint64) uint64 { return consumed - 50 }},
		{"past what was published", func(_ *ringProc, _, published uint64) uint64 { return published + 100 }},
		{"past the end", func(h *ringProc, _, published uint64) uint64 { return published + 2*uint64(h.offer.Size) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := malformed(t, e.p.a)
			h, peer := e.dialHostile(t, local.KindStream)
			h.roundTripDown(t, peer, 1000) // the agent sees this consumed at its next write
			consumed := h.idx(ring.Down, hOffTail)
			msg := random(t, 1000)
			if _, err := peer.Write(msg); err != nil {
				t.Fatal(err)
			}
			eventually(t, 5*time.Second, "the agent publishes down", func() bool {
				n, err := h.down.Avail()
				return err == nil && n > 0
			})
			published := h.idx(ring.Down, hOffHead)
			h.set(ring.Down, hOffTail, c.tail(h, consumed, published))
			h.roomWake()
			if _, err := peer.Write(msg); err != nil {
				t.Fatal(err)
			}
			h.ended(t, "protocol")
			peerProtocol(t, peer)
			if got := malformed(t, e.p.a); got <= before {
				t.Errorf("rejected_malformed %d, was %d", got, before)
			}
			h.close()
		})
	}
	e.after(t)
}

func budgetUsed(a *testAgent) int64 {
	a.budget.mu.Lock()
	defer a.budget.mu.Unlock()
	return a.budget.used
}

// TestRingHostileRingNeverConsumed: the process never reads its ring down
// while the peer writes 8 MiB to it. The agent does not block (the
// well-behaved channel echoes as fast as before), holds a bounded amount
// (the peer's writer stops by flow control: a window and the rings), and
// when the process closes its socket everything goes.
func TestRingHostileRingNeverConsumed(t *testing.T) {
	e := startRingEnv(t)
	usedBefore := budgetUsed(e.p.a)
	h, peer := e.dialHostile(t, local.KindStream)

	var written atomic.Int64
	werr := make(chan error, 1)
	go func() {
		buf := make([]byte, 16<<10)
		for written.Load() < 8<<20 {
			n, err := peer.Write(buf)
			written.Add(int64(n))
			if err != nil {
				werr <- err
				return
			}
		}
		werr <- nil
	}()
	// Wait until the writer is stopped: nothing more for 500ms.
	var last int64 = -1
	stable := 0
	for deadline := time.Now().Add(8 * time.Second); stable < 5; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the peer's writer never stopped: %d bytes written", written.Load())
		}
		if w := written.Load(); w == last {
			stable++
		} else {
			last, stable = w, 0
		}
	}
	win, size := int64(e.p.a.cfg.Limits.Window), int64(e.p.a.cfg.Limits.Ring)
	bound := win + 2*size + 4*local.MaxRecord
	t.Logf("the peer wrote %d bytes before flow control stopped it (window %d, rings %d; bound %d)", last, win, size, bound)
	if last > bound || last < size {
		t.Fatalf("the peer wrote %d bytes to a process that reads nothing: want between %d and %d", last, size, bound)
	}
	select {
	case err := <-werr:
		t.Fatalf("the peer's writer ended: %v", err)
	default:
	}
	if used := budgetUsed(e.p.a) - usedBefore; used > win {
		t.Errorf("node-a holds %d bytes of its memory budget for the channel: more than a window (%d)", used, win)
	}
	if n := (h.idx(ring.Down, hOffHead) - h.idx(ring.Down, hOffTail)) & hIdxMask; n > uint64(size) {
		t.Errorf("%d bytes down: more than the ring", n)
	}
	if d := e.checkGood(t); d > 3*time.Second || d > 10*e.goodTime+time.Second {
		t.Errorf("with a stuck channel, the well-behaved one echoed 256 KiB in %s (%s before)", d, e.goodTime)
	}
	if g := runtime.NumGoroutine(); g > e.base+20 {
		t.Errorf("%d goroutines with the channel stuck, %d before", g, e.base)
	}

	h.close()
	select {
	case err := <-werr:
		if !errors.Is(err, sinc.ErrReset) {
			t.Errorf("the peer's writer ended with %v, want %v", err, sinc.ErrReset)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the peer's writer still blocked 5s after the process closed its channel")
	}
	e.after(t)
	eventually(t, 5*time.Second, "node-a's memory budget back", func() bool { return budgetUsed(e.p.a) <= usedBefore })
}

// setNonblock sets or clears O_NONBLOCK on the process's own descriptor
// fd: its open file, not the agent's.
func setNonblock(t *testing.T, fd int, on bool) {
	t.Helper()
	if err := unix.SetNonblock(fd, on); err != nil {
		t.Fatalf("fcntl(F_SETFL): %v", err)
	}
}

// fillPipe shrinks the pipe whose read end the process holds to a page,
// and fills it: the process reopens its read end for writing through
// /proc, which any process may do with its own pipe.
func fillPipe(t *testing.T, fd int) {
	t.Helper()
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETPIPE_SZ, pageSize); err != nil {
		t.Fatalf("F_SETPIPE_SZ: %v", err)
	}
	w, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", fd), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("reopening a pipe for writing: %v", err)
	}
	defer unix.Close(w)
	buf := make([]byte, 512)
	for range 1024 {
		if _, err := unix.Write(w, buf); err == unix.EAGAIN {
			break
		} else if err != nil {
			t.Fatalf("filling a pipe: %v", err)
		}
	}
	if _, err := unix.Write(w, buf[:1]); err != unix.EAGAIN {
		t.Fatalf("the pipe is not full: %v", err)
	}
}

// sockQueued returns the bytes waiting to be read on the process's socket.
func (h *ringProc) sockQueued() int {
	n := 0
	h.sockFD(func(fd int) { n, _ = unix.IoctlGetInt(fd, unix.SIOCINQ) })
	return n
}

// TestRingHostileWakeUps: the process plays with its wake-ups — the
// records on its socket, and the room pipes.
func TestRingHostileWakeUps(t *testing.T) {
	e := startRingEnv(t)

	// The process makes its ends blocking (its socket, its room pipes),
	// fills the room pipe it reads and never drains it, never reads its
	// socket, and raises its sleeping and waiting flags again and again so
	// that the agent wakes it at every write, until its socket is full of
	// wake-up records: the agent's wake-ups never wait (the well-behaved
	// channel and this one go on); then it breaks its ring, and finds the
	// agent's close record behind the wake-ups once it reads.
	t.Run("never taken", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindStream)
		fillPipe(t, h.fds[local.RingFDUpRoom])
		setNonblock(t, h.fds[local.RingFDUpRoom], false)
		setNonblock(t, h.fds[local.RingFDDownRoom], false)
		h.sockFD(func(fd int) { setNonblock(t, fd, false) })
		// In step: the process raises its flags, the peer writes a
		// little, the process writes a little, and takes what came down.
		// Every write down wakes it: a wake-up record more on its socket,
		// until the socket is full (its queue stops growing).
		const steps, nUp, chunk = 3000, 200, 16
		down := random(t, steps*chunk)
		up := random(t, nUp*chunk)
		rerr := make(chan error, 1)
		go func() {
			peer.SetReadDeadline(time.Now().Add(15 * time.Second))
			got := make([]byte, len(up))
			_, err := io.ReadFull(peer, got)
			if err == nil && !bytes.Equal(got, up) {
				err = errors.New("the peer read other bytes than the process sent")
			}
			rerr <- err
		}()
		wakes, roomWakes, queued, still, i := 0, 0, 0, 0, 0
		for deadline := time.Now().Add(10 * time.Second); i < steps && (still < 50 || i < nUp); i++ {
			if time.Now().After(deadline) {
				break
			}
			h.set(ring.Down, hOffSleep, 1)
			if _, err := peer.Write(down[i*chunk : (i+1)*chunk]); err != nil {
				t.Fatalf("peer: write: %v", err)
			}
			if i < nUp {
				h.set(ring.Up, hOffWait, 1)
				if err := h.send(local.RecData, up[i*chunk:(i+1)*chunk], time.Second); err != nil {
					t.Fatal(err)
				}
			}
			mustEqual(t, "what the hostile process read down", h.getStream(t, chunk), down[i*chunk:(i+1)*chunk])
			if h.idx(ring.Down, hOffSleep) == 0 {
				wakes++ // the agent lowered it: it woke us
			}
			if i < nUp && h.idx(ring.Up, hOffWait) == 0 {
				roomWakes++ // into its full room pipe
			}
			if q := h.sockQueued(); q > queued {
				queued, still = q, 0
			} else {
				still++
			}
		}
		if err := <-rerr; err != nil {
			t.Fatalf("peer: read: %v", err)
		}
		t.Logf("%d steps: the agent woke the process %d times on its socket (%d bytes of wake-ups wait there) and %d times on its full room pipe",
			i, wakes, queued, roomWakes)
		if still < 50 {
			t.Errorf("the socket never filled with wake-ups (%d bytes of them)", queued)
		}
		if wakes < i/2 || roomWakes == 0 {
			t.Error("the agent seldom woke the process: the attack did not happen")
		}
		e.checkGood(t)

		h.consumedUp(t)
		h.set(ring.Up, hOffHead, h.upHead()-1)
		h.wake()
		time.Sleep(100 * time.Millisecond)                  // the close record waits behind the wake-ups
		h.sockFD(func(fd int) { setNonblock(t, fd, true) }) // Go's reads want it back
		h.ended(t, "protocol")
		peerProtocol(t, peer)
		h.close()
	})

	// Wake-up records on the socket and tokens on the down room pipe, as
	// fast as the process can write them, with nothing published: the
	// agent stays responsive and the channel works after.
	t.Run("flood", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindStream)
		stop := make(chan struct{})
		var flood, tokens atomic.Int64
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat(wakeRec, 1024)
			for i := 0; i < 10_000_000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				var n int
				var err error
				h.sockFD(func(fd int) { n, err = unix.SendmsgN(fd, buf, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL) })
				if err == nil {
					flood.Add(int64(n))
				} else {
					runtime.Gosched()
				}
			}
		}()
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for i := 0; i < 10_000_000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if n, err := unix.Write(h.fds[local.RingFDDownRoom], buf); err == nil {
					tokens.Add(int64(n))
				} else {
					runtime.Gosched()
				}
			}
		}()
		time.Sleep(100 * time.Millisecond)
		d := e.checkGood(t)
		g := runtime.NumGoroutine()
		time.Sleep(300 * time.Millisecond)
		close(stop)
		wg.Wait()
		t.Logf("%d bytes of wake-up records and %d room tokens written; the well-behaved channel echoed 256 KiB in %s meanwhile (%s before)",
			flood.Load(), tokens.Load(), d, e.goodTime)
		if d > 3*time.Second {
			t.Errorf("the well-behaved channel echoed 256 KiB in %s during the flood", d)
		}
		if g > e.base+20 {
			t.Errorf("%d goroutines during the flood, %d before", g, e.base)
		}
		if flood.Load() <= 1<<20 {
			t.Errorf("only %d bytes of wake-up records written: the agent did not read them", flood.Load())
		}
		h.roundTripUp(t, peer, 1000)
		h.roundTripDown(t, peer, 1000)
		h.close()
	})

	// The room pipes closed, the socket kept. The agent's wake-ups on the
	// up room pipe meet no reader (EPIPE, never SIGPIPE's death): the
	// channel goes on. Once the agent puts data down it waits to hear
	// that the process took it, and finds the down room pipe closed: the
	// process's end, a reset, not a channel that waits forever.
	t.Run("room pipes closed", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindStream)
		h.closeFD(local.RingFDUpRoom)
		h.closeFD(local.RingFDDownRoom)
		for range 20 {
			h.set(ring.Up, hOffWait, 1)
			h.roundTripUp(t, peer, 1000)
		}
		h.consumedUp(t)
		if h.idx(ring.Up, hOffWait) != 0 {
			t.Error("the agent never woke the process's room pipe: the attack did not happen")
		}
		werr := make(chan error, 1)
		go func() {
			peer.SetWriteDeadline(time.Now().Add(8 * time.Second))
			_, err := peer.Write(make([]byte, 4*h.offer.Size))
			werr <- err
		}()
		why := h.ended(t, "reset", "protocol")
		t.Logf("hostile process told: %s: %s", why.Code, why.Message)
		if err := peerEnd(peer, 5*time.Second); !errors.Is(err, sinc.ErrReset) && !errors.Is(err, sinc.ErrProtocol) {
			t.Errorf("peer: read ended with %v, want %v or %v", err, sinc.ErrReset, sinc.ErrProtocol)
		}
		if err := <-werr; err == nil {
			t.Error("peer: writing 4 rings to a channel that ended succeeded")
		}
		h.close()
	})

	// The socket shut for writing, the ring kept: the process's end,
	// without a fin — a reset, not a channel that hangs.
	t.Run("socket shut", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindStream)
		h.roundTripUp(t, peer, 100)
		if err := h.sock.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		h.ended(t, "reset")
		if err := peerEnd(peer, 5*time.Second); !errors.Is(err, sinc.ErrReset) {
			t.Errorf("peer: read ended with %v, want %v", err, sinc.ErrReset)
		}
		h.close()
	})
	e.after(t)
}

// TestRingHostileMemory: the process cannot resize the memory it shares
// with the agent (it is sealed: a shrunk memfd would kill the agent with
// SIGBUS), nor add seals; punching holes in it while data moves reads back
// as zeros, which harms only the process's own channel.
func TestRingHostileMemory(t *testing.T) {
	e := startRingEnv(t)

	t.Run("resize", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindStream)
		h.roundTripUp(t, peer, 1000)
		size := int64(h.offer.Size)
		for _, c := range []struct {
			name string
			f    *os.File
			to   int64
		}{
			{"data memfd shrunk by half", h.dataF, size},
			{"data memfd shrunk to nothing", h.dataF, 0},
			{"data memfd grown", h.dataF, 4 * size},
			{"header memfd shrunk to nothing", h.hdrF, 0},
			{"header memfd shrunk", h.hdrF, 100},
			{"header memfd grown", h.hdrF, 2 * pageSize},
		} {
			if err := unix.Ftruncate(int(c.f.Fd()), c.to); err == nil {
				t.Errorf("%s: ftruncate succeeded", c.name)
			}
		}
		for _, f := range []*os.File{h.dataF, h.hdrF} {
			if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_WRITE); err == nil {
				t.Errorf("%s: a seal against writing was added", f.Name())
			}
			if _, err := unix.Pwrite(int(f.Fd()), []byte{1}, 2*size+pageSize); err == nil {
				t.Errorf("%s: written past its end", f.Name())
			}
		}
		h.roundTripUp(t, peer, 1000)
		h.roundTripDown(t, peer, 1000)
		h.close()
	})

	// Holes punched over the whole data memfd again and again while data
	// moves both ways: the agent survives; the channel carries zeros or
	// ends with protocol.
	t.Run("punch holes", func(t *testing.T) {
		h, peer := e.dialHostile(t, local.KindStream)
		h.roundTripUp(t, peer, 1000)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var punched atomic.Int64
		var perr, upErr, downErr error
		wg.Add(3)
		go func() {
			defer wg.Done()
			for i := 0; i < 100000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				err := unix.Fallocate(int(h.dataF.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 2*int64(h.offer.Size))
				if err != nil {
					perr = err
					return
				}
				punched.Add(1)
				time.Sleep(200 * time.Microsecond)
			}
		}()
		go func() { // up
			defer wg.Done()
			p := bytes.Repeat([]byte{0xa5}, 1000)
			for i := 0; i < 100000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := h.send(local.RecData, p, 200*time.Millisecond); err != nil {
					upErr = fmt.Errorf("after %d records: %w", i, err)
					return
				}
			}
		}()
		go func() { // down
			defer wg.Done()
			for i := 0; i < 100000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if _, _, err := h.get(200 * time.Millisecond); err != nil && err != errNothingDown {
					downErr = fmt.Errorf("after %d records: %w", i, err)
					return
				}
			}
		}()
		pw := make(chan error, 1)
		go func() {
			p := bytes.Repeat([]byte{0x3c}, 1000)
			peer.SetWriteDeadline(time.Now().Add(2 * time.Second))
			for range 100000 {
				select {
				case <-stop:
					pw <- nil
					return
				default:
				}
				if _, err := peer.Write(p); err != nil {
					pw <- err
					return
				}
			}
			pw <- nil
		}()
		pr := make(chan error, 1)
		var got atomic.Int64
		go func() {
			peer.SetReadDeadline(time.Now().Add(8 * time.Second))
			n, err := io.Copy(io.Discard, peer)
			got.Store(n)
			pr <- err
		}()
		time.Sleep(500 * time.Millisecond)
		close(stop)
		peer.SetWriteDeadline(time.Now()) // the peer's writer may wait for room
		wg.Wait()
		t.Logf("punched %d times (error %v); the process's writer: %v; its reader: %v; the peer's writer: %v", punched.Load(), perr, upErr, downErr, <-pw)
		if perr != nil || punched.Load() == 0 {
			t.Fatalf("fallocate(PUNCH_HOLE) on the data memfd: %v", perr)
		}
		h.close()
		err := <-pr
		t.Logf("peer read %d bytes, then %v", got.Load(), err)
		if !errors.Is(err, sinc.ErrReset) && !errors.Is(err, sinc.ErrProtocol) {
			t.Errorf("peer: read ended with %v, want %v or %v", err, sinc.ErrReset, sinc.ErrProtocol)
		}
	})
	e.after(t)
}

// TestRingHostileRecordsOnSocket: on a ring channel's socket the process
// may send wake-up and close records only; a data record, a fin, or
// anything else there ends the channel with protocol.
func TestRingHostileRecordsOnSocket(t *testing.T) {
	e := startRingEnv(t)
	for _, c := range []struct {
		name string
		rec  []byte
	}{
		{"data", ringRecord(local.RecData, 5, []byte("hello"))},
		{"fin", ringRecord(local.RecFin, 0, nil)},
		{"ring", ringRecord(local.RecRing, 2, []byte("{}"))},
		{"wake-up with a payload", ringRecord(local.RecWake, 3, []byte("abc"))},
		{"type 9", ringRecord(9, 3, []byte("abc"))},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, peer := e.dialHostile(t, local.KindStream)
			h.roundTripUp(t, peer, 1000)
			if _, err := h.sock.Write(c.rec); err != nil {
				t.Fatal(err)
			}
			h.ended(t, "protocol")
			peerProtocol(t, peer)
			h.close()
		})
	}
	e.after(t)
}

// TestRingHostileAcceptedChannel: a hostile listener's ring channels get
// the same checks as its dialed ones: it listens asking for rings, takes
// a channel from the peer, and rewinds its up index.
func TestRingHostileAcceptedChannel(t *testing.T) {
	e := startRingEnv(t)
	lc, err := net.Dial("unix", e.p.sock("node-a", "web"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lc.Close() })
	req, _ := json.Marshal(local.Request{V: 3, Op: local.OpListen, Service: "hostile", Ring: true})
	if _, err := lc.Write(append(req, '\n')); err != nil {
		t.Fatal(err)
	}
	if line := readLine(t, lc); !bytes.Contains(line, []byte(`"ok":true`)) {
		t.Fatalf("listen: %s", line)
	}
	peer := e.p.mustDial(t, "node-b", "db", "node-a/web/hostile", sinc.Stream)
	nr := local.NewNoticeReader(lc.(*net.UnixConn))
	defer nr.Close()
	lc.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, f, err := nr.Next()
	if err != nil {
		t.Fatalf("notice: %v", err)
	}
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fc.Close() })
	if !n.Ring {
		t.Fatalf("notice without a ring: %+v", n)
	}
	h := mapRing(t, fc.(*net.UnixConn))
	h.roundTripUp(t, peer, 1000)
	h.roundTripDown(t, peer, 1000)
	h.consumedUp(t)
	h.set(ring.Up, hOffHead, h.upHead()-1)
	h.wake()
	h.ended(t, "protocol")
	peerProtocol(t, peer)
	h.close()
	lc.Close()
	e.after(t)
}

// TestRingHostileCloseRecordSplit: a close record on a ring channel's
// socket that the agent's first read does not hold whole — a long abort
// message (as the Go client's Abort sends, up to 512 bytes), a short one
// behind wake-ups, or one the process cuts short and then says nothing
// more — still ends the channel within moments: an abort, or a reset for
// the record broken off.
func TestRingHostileCloseRecordSplit(t *testing.T) {
	e := startRingEnv(t)
	long, _ := json.Marshal(local.Error{Code: "aborted", Message: string(bytes.Repeat([]byte("x"), 600))})
	for _, c := range []struct {
		name string
		rec  []byte
		want *sinc.Error
	}{
		{"short message", ringRecord(local.RecClose, 2, []byte("{}")), sinc.ErrAborted}, // whole in one read: the control
		{"long message", ringRecord(local.RecClose, len(long), long), sinc.ErrAborted},
		{"cut short", ringRecord(local.RecClose, 100, []byte(`{"code":`)), sinc.ErrReset},
		// 63 wake-ups and a close record's header fill the agent's read
		// of 256 bytes: its short payload comes in the next read.
		{"short message after wake-ups", append(bytes.Repeat(wakeRec, 63), ringRecord(local.RecClose, 2, []byte("{}"))...), sinc.ErrAborted},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, peer := e.dialHostile(t, local.KindStream)
			h.roundTripUp(t, peer, 1000)
			if _, err := h.sock.Write(c.rec); err != nil {
				t.Fatal(err)
			}
			if err := peerEnd(peer, 2*time.Second); !errors.Is(err, c.want) {
				t.Errorf("peer: read ended with %v, want %v; the agent's ring pumps:\n%s", err, c.want, stacks("ringOutbound"))
			}
			h.close()
		})
	}

	// The Go client itself, aborting with a message of 512 bytes.
	t.Run("Go client", func(t *testing.T) {
		c := e.p.mustDial(t, "node-a", "web", "node-b/db/sink", sinc.Stream)
		peer := acceptNext(t, e.sink)
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		peerGets(t, peer, []byte("hello"))
		if err := c.Abort(string(bytes.Repeat([]byte("y"), 512))); err != nil {
			t.Fatal(err)
		}
		if err := peerEnd(peer, 2*time.Second); !errors.Is(err, sinc.ErrAborted) {
			t.Errorf("peer: read ended with %v, want %v; the agent's ring pumps:\n%s", err, sinc.ErrAborted, stacks("ringOutbound"))
		}
	})
	e.after(t)
}

// stacks returns the stacks of the goroutines that have fn in theirs.
func stacks(fn string) string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []byte
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(fn)) {
			out = append(append(out, g...), "\n\n"...)
		}
	}
	return string(out)
}
