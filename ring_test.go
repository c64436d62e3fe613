package sinc

import (
	"encoding/json"
	"io"
	"testing"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/ring"
)

// testRingAgent is the agent's end of a ring channel, played by the test
// with the ring package alone: c is the process's Conn over it.
type testRingAgent struct {
	up   *ring.Consumer
	down *ring.Producer
	c    *Conn
}

func newTestRing(t *testing.T) *testRingAgent {
	t.Helper()
	a, b := socketPair(t)
	hdr, hf, err := ring.Create("test-hdr", ringPage)
	if err != nil {
		t.Fatal(err)
	}
	data, df, err := ring.Create("test-data", 2*ring.MinSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hdr.Unmap(); data.Unmap(); hf.Close(); df.Close() })
	upRoomR, upRoomW, err := ring.NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	downRoomR, downRoomW, err := ring.NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(upRoomW); unix.Close(downRoomR) })
	const gen = 7
	slot := hdr.B[ring.HeaderSize : 2*ring.HeaderSize]
	ring.Init(slot, gen)
	offer, _ := json.Marshal(local.RingOffer{Size: ring.MinSize, Slot: ring.HeaderSize, Gen: gen})
	rec := make([]byte, local.RecordHeaderLen+len(offer))
	local.PutRecordHeader(rec, local.RecRing, len(offer))
	copy(rec[local.RecordHeaderLen:], offer)
	if _, _, err := b.WriteMsgUnix(rec, unix.UnixRights(int(hf.Fd()), int(df.Fd()), upRoomR, downRoomW), nil); err != nil {
		t.Fatal(err)
	}
	unix.Close(upRoomR)
	unix.Close(downRoomW)
	c, err := newConn(a, Stream, nil, "test", true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &testRingAgent{
		up:   ring.NewConsumer(slot, ring.Up, data.B[:ring.MinSize], local.MaxRecord, gen),
		down: ring.NewProducer(slot, ring.Down, data.B[ring.MinSize:], gen),
		c:    c,
	}
}

// TestRingPathAllocs: on the ring path, writing a record and reading one
// allocate nothing in the process.
func TestRingPathAllocs(t *testing.T) {
	r := newTestRing(t)
	p := make([]byte, 1024)
	q := make([]byte, 1024)
	mid := make([]byte, 1024)
	allocs := testing.AllocsPerRun(500, func() {
		if _, err := r.c.Write(p); err != nil {
			t.Fatal(err)
		}
		// The agent takes the record up and puts one down.
		if n, err := r.up.Avail(); err != nil || n != local.RecordHeaderLen+len(p) {
			t.Fatalf("up: %d, %v", n, err)
		}
		if _, n, err := r.up.Next(); err != nil || n != len(p) {
			t.Fatalf("up: record of %d, %v", n, err)
		}
		r.up.Read(mid, 0)
		r.up.Skip(local.RecordHeaderLen + len(mid))
		if _, err := r.up.Release(); err != nil {
			t.Fatal(err)
		}
		if _, err := r.down.Free(); err != nil {
			t.Fatal(err)
		}
		r.down.Put(local.RecData, mid)
		if _, err := r.down.Publish(); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r.c, q); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0 {
		t.Fatalf("%.1f allocations per record written and read", allocs)
	}
}
