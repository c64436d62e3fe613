package agent

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"sync"
	"time"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/replay"
	"sinc.dev/sinc/internal/secret"
	"sinc.dev/sinc/internal/wire"
)

// The agent's three tables (DESIGN.md §6). One id, the connection id, names
// a channel in all three:
//
//   - the connection table (connRow): who talks to whom, readable by the
//     processes of the partition (their rows) and by the admin CLI;
//   - the key table (keyEntry): the channel's keys, one per direction,
//     readable by the agent alone: no method of any socket returns it;
//   - the channel state table (chanState), indexed by the receiving index
//     that data frames carry: which peer, partition and connection a frame
//     for that index must come from, readable by the agent alone.
//
// A channel struct holds its row of each; the tables map ids and indexes to
// channels. Tables.mu guards the maps; each channel guards its own rows.
type tables struct {
	mu       sync.RWMutex
	byID     map[uint64]*channel    // connection table and key table, by connection id
	byIndex  map[uint32]*channel    // channel state table, by receiving index
	byRemote map[remoteKey]*channel // the same, by the peer's connection id
	nextID   uint64
	max      int
}

type remoteKey struct {
	peer string
	conn uint64
}

func newTables(max int) *tables {
	return &tables{byID: map[uint64]*channel{}, byIndex: map[uint32]*channel{},
		byRemote: map[remoteKey]*channel{}, nextID: 1, max: max}
}

var (
	errTableFull = errors.New("channel table full")
	errDuplicate = errors.New("channel already open")
)

// add gives ch a connection id and a fresh receiving index and enters it in
// the tables; a channel whose peer connection is known is refused if that
// connection already has a channel.
func (t *tables) add(ch *channel) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.byID) >= t.max {
		return errTableFull
	}
	rk := remoteKey{ch.state.peer, ch.state.remoteConn}
	if rk.conn != 0 {
		if t.byRemote[rk] != nil {
			return errDuplicate
		}
		t.byRemote[rk] = ch
	}
	for {
		var b [4]byte
		rand.Read(b[:])
		idx := binary.BigEndian.Uint32(b[:])
		if idx == 0 || t.byIndex[idx] != nil {
			continue
		}
		ch.state.index = idx
		break
	}
	ch.id = t.nextID
	t.nextID++
	t.byID[ch.id] = ch
	t.byIndex[ch.state.index] = ch
	return nil
}

// setRemote enters a dialed channel under its peer's connection id, once the
// peer accepted it.
func (t *tables) setRemote(ch *channel) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	rk := remoteKey{ch.state.peer, ch.state.remoteConn}
	if t.byRemote[rk] != nil {
		return false
	}
	t.byRemote[rk] = ch
	return true
}

func (t *tables) lookupRemote(peer string, conn uint64) *channel {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.byRemote[remoteKey{peer, conn}]
}

// remove takes ch out of the tables; st is its state as last seen.
func (t *tables) remove(ch *channel, st chanState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if rk := (remoteKey{st.peer, st.remoteConn}); t.byRemote[rk] == ch {
		delete(t.byRemote, rk)
	}
	if t.byID[ch.id] == ch {
		delete(t.byID, ch.id)
	}
	if t.byIndex[st.index] == ch {
		delete(t.byIndex, st.index)
	}
}

func (t *tables) lookupID(id uint64) *channel {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.byID[id]
}

func (t *tables) lookupIndex(idx uint32) *channel {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.byIndex[idx]
}

func (t *tables) all() []*channel {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*channel, 0, len(t.byID))
	for _, ch := range t.byID {
		out = append(out, ch)
	}
	return out
}

func (t *tables) len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.byID)
}

// chanState is a channel's row in the channel state table.
type chanState struct {
	index       uint32 // ours: data frames to us carry it
	peer        string // the node frames must come from (the link's authenticated peer)
	remotePart  string
	remoteIndex uint32 // theirs: data frames we send carry it
	remoteConn  uint64
	status      string // opening, open, closing
}

// keyEntry is a channel's row in the key table. The keys live in protected
// memory (slot): the send key, which the peer chose, seals frames to the
// peer; the receive key, which we chose, opens frames to us. Their AEADs
// (send, recv) are made on first use and dropped when a sweep finds them
// unused since the last (channel.sweep): an AES-GCM's expanded key takes
// about 750 bytes of heap, which two AEADs per channel would hold in every
// idle channel of both agents.
type keyEntry struct {
	mu        sync.Mutex // guards the sending fields and slot (the sending pump, rekeys, close)
	arena     *secret.Arena
	slot      []byte // protected memory: send key, receive key, retiring receive key
	zeroized  bool
	sendEpoch uint16
	send      cipher.AEAD // nil until used (see sealer)
	sendUsed  bool        // since the last sweep
	sendCtr   uint64
	sealed    uint64 // frames sealed under sendEpoch
	sealedB   uint64 // payload bytes sealed under sendEpoch
	rekeySig  chan struct{}

	// receiving side, guarded by channel.rmu
	recvEpoch uint16
	recv      cipher.AEAD // nil until used (see opener)
	recvUsed  bool        // since the last sweep
	recvSince time.Time
	opened    uint64 // frames opened under recvEpoch
	openedB   uint64
	old       cipher.AEAD // the retiring receive key, while its frames may still come
	oldEpoch  uint16
	window    replay.Window
}

// alloc takes the entry's protected memory.
func (k *keyEntry) alloc(a *secret.Arena) error {
	s, err := a.Alloc()
	if err != nil {
		return err
	}
	k.arena, k.slot = a, s
	return nil
}

func (k *keyEntry) sendKey() []byte { return k.slot[:wire.KeyLen] }
func (k *keyEntry) recvKey() []byte { return k.slot[wire.KeyLen : 2*wire.KeyLen] }
func (k *keyEntry) oldKey() []byte  { return k.slot[2*wire.KeyLen : 3*wire.KeyLen] }

// setSend takes the key the peer chose for traffic to it.
func (k *keyEntry) setSend(key []byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	copy(k.sendKey(), key)
	k.send = nil
	tellKey("channel send", k.sendKey())
}

// pickRecv chooses a fresh random key for traffic to us.
func (k *keyEntry) pickRecv() {
	rand.Read(k.recvKey())
	k.recv = nil
	k.recvSince = time.Now()
	tellKey("channel receive", k.recvKey())
}

// rotateRecv moves the receive key aside, to open the frames still sealed
// with it, and picks a new one under the next epoch. Called under
// channel.rmu, with no rotation under way.
func (k *keyEntry) rotateRecv() {
	k.mu.Lock() // the slot
	copy(k.oldKey(), k.recvKey())
	k.mu.Unlock()
	k.old, k.oldEpoch = k.recv, k.recvEpoch
	if k.old == nil {
		k.old = newGCM(k.oldKey())
	}
	k.recvEpoch++
	k.opened, k.openedB = 0, 0
	k.pickRecv()
}

// retireOld zeroes the retiring receive key: every frame sealed with it
// has arrived. Called under channel.rmu.
func (k *keyEntry) retireOld() {
	k.mu.Lock()
	if k.slot != nil {
		clear(k.oldKey())
	}
	k.mu.Unlock()
	k.old = nil
}

// sealer returns the AEAD that seals frames to the peer, made now if
// need be, or nil once the keys are gone. Called under k.mu.
func (k *keyEntry) sealer() cipher.AEAD {
	if k.slot == nil {
		return nil
	}
	if k.send == nil {
		k.send = newGCM(k.sendKey())
	}
	k.sendUsed = true
	return k.send
}

// opener returns the AEAD that opens frames to us under recvEpoch, made
// now if need be, or nil once the keys are gone. Called under
// channel.rmu, which the keys are dropped under too.
func (k *keyEntry) opener() cipher.AEAD {
	if k.slot == nil {
		return nil
	}
	if k.recv == nil {
		k.recv = newGCM(k.recvKey())
	}
	k.recvUsed = true
	return k.recv
}

// sweep makes an idle channel let go of what it need not hold:
//   - the AEADs not used since the last sweep (the keys stay, and the next
//     frame makes its AEAD again; the retiring receive AEAD of a rotation
//     under way stays, as the rotation ends with the peer's first frame
//     under the new key);
//   - the frames acknowledged since the channel last sent, back to the
//     free list, unless a send holds them now;
//   - and, in the peer, the frames we have and did not acknowledge yet
//     (credit goes back by half windows, so the last few frames of a burst
//     would wait in its retransmit buffer): they are acknowledged now.
func (ch *channel) sweep() {
	if ch.txmu.TryLock() {
		ch.smu.Lock()
		ch.recycleLocked()
		ch.smu.Unlock()
		ch.txmu.Unlock()
	}
	k := &ch.keys
	k.mu.Lock()
	if !k.sendUsed {
		k.send = nil
	}
	k.sendUsed = false
	k.mu.Unlock()
	ch.rmu.Lock()
	if !k.recvUsed {
		k.recv = nil
	}
	k.recvUsed = false
	unacked := ch.next > ch.ackSent
	ch.rmu.Unlock()
	if unacked {
		ch.a.goRun(func() { ch.sendAck(false) })
	}
}

func newGCM(k []byte) cipher.AEAD {
	b, err := aes.NewCipher(k)
	if err != nil {
		panic(err) // cannot happen: the key is 32 bytes
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

// zero drops the keys. Frames can no longer be sealed or opened.
func (k *keyEntry) zero() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.slot != nil {
		k.arena.Free(k.slot) // zeroes it
		k.slot = nil
	}
	k.send, k.recv, k.old = nil, nil, nil
	k.zeroized = true
}

// row returns the channel's connection table row, as the processes of its
// partition see it.
func (ch *channel) row() local.Conn {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	r := ch.conn
	r.ID = ch.id
	r.State = ch.state.status
	r.BytesIn, r.BytesOut = ch.bytesIn.Load(), ch.bytesOut.Load()
	r.RecordsIn, r.RecordsOut = ch.recsIn.Load(), ch.recsOut.Load()
	return r
}

// adminRow returns the channel's row as the operator sees it: with the key
// lifecycle, which no process sees.
func (ch *channel) adminRow() admin.ConnRow {
	r := admin.ConnRow{Conn: ch.row()}
	k := &ch.keys
	ch.rmu.Lock()
	r.KeyEpochIn = k.recvEpoch
	if lim := uint64(ch.a.cfg.Limits.RotateFrames); k.opened < lim {
		r.RotateInFrames = lim - k.opened
	}
	ch.rmu.Unlock()
	k.mu.Lock()
	r.KeyEpochOut = k.sendEpoch
	k.mu.Unlock()
	return r
}
