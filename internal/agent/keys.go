package agent

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"sync"
	"time"

	"sinc.dev/sinc/internal/replay"
	"sinc.dev/sinc/internal/secret"
	"sinc.dev/sinc/internal/wire"
)

// The key table (docs/design.md, "Tables"; claims 11 and 12): a channel's keys, one
// per direction, readable by the agent alone — no method of any socket
// returns them. The receiving agent of each direction picks its key (for
// traffic to its own process) and sends it to the other agent in a control
// frame (Open, Accept, Rekey); the sender seals with the key it was given.
//
// The keys live in protected memory (a slot of the agent's secret arena):
// the send key, the receive key, and the receive key being retired while a
// rotation is under way. Their AEADs are made on first use and dropped
// when a sweep finds them unused since the last (channel.sweep): an
// AES-GCM's expanded key takes about 750 bytes of heap, which two AEADs
// per channel would hold in every idle channel of both agents.
//
// The slot is freed (and so zeroed) only by channel.end, after the channel
// is marked ended, under both keyEntry.mu and channel.rmu. Every method
// that touches a key checks for the slot under one of those locks, so a
// handler that races with the end of its channel finds no key, never a
// freed one.

// keyEntry is a channel's row in the key table.
type keyEntry struct {
	mu        sync.Mutex // guards slot and the sending fields (the sending pump, rekeys, the end)
	arena     *secret.Arena
	slot      []byte // protected memory: send key, receive key, retiring receive key; nil once ended
	sendEpoch uint16
	send      cipher.AEAD // nil until used (see sealer)
	sendUsed  bool        // since the last sweep
	sendCtr   uint64      // counter of the next frame sealed
	sealed    uint64      // frames sealed under sendEpoch
	sealedB   uint64      // payload bytes sealed under sendEpoch
	rekeySig  chan struct{}

	// receiving side, guarded by channel.rmu (and slot by mu as well)
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

// alloc takes the entry's protected memory and picks the receive key.
// The channel is not in the tables yet: nothing else can see it.
func (k *keyEntry) alloc(a *secret.Arena) error {
	s, err := a.Alloc()
	if err != nil {
		return err
	}
	k.arena, k.slot = a, s
	k.pickRecv()
	return nil
}

func (k *keyEntry) sendKey() []byte { return k.slot[:wire.KeyLen] }
func (k *keyEntry) recvKey() []byte { return k.slot[wire.KeyLen : 2*wire.KeyLen] }
func (k *keyEntry) oldKey() []byte  { return k.slot[2*wire.KeyLen : 3*wire.KeyLen] }

// setSend takes the key the peer chose for traffic to it. It reports false
// if the channel's keys are gone (it ended meanwhile).
func (k *keyEntry) setSend(key []byte) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.slot == nil {
		return false
	}
	copy(k.sendKey(), key)
	k.send = nil
	tellKey("channel send", k.sendKey())
	return true
}

// copyRecv copies the receive key into dst, to send it to the peer; it
// reports false if the keys are gone.
func (k *keyEntry) copyRecv(dst []byte) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.slot == nil {
		return false
	}
	copy(dst, k.recvKey())
	return true
}

// pickRecv chooses a fresh random key for traffic to us. Called under
// channel.rmu (or before the channel is in the tables), with the slot
// present.
func (k *keyEntry) pickRecv() {
	rand.Read(k.recvKey())
	k.recv = nil
	k.recvSince = time.Now()
	tellKey("channel receive", k.recvKey())
}

// rotateRecv moves the receive key aside, to open the frames still sealed
// with it, and picks a new one under the next epoch. Called under
// channel.rmu with the slot present (rmu keeps it), no rotation under way.
func (k *keyEntry) rotateRecv() {
	k.mu.Lock()
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

// sweepAEADs drops the AEADs not used since the last sweep (the keys stay,
// and the next frame makes its AEAD again; the retiring receive AEAD of a
// rotation under way stays, as the rotation ends with the peer's first
// frame under the new key). Called under channel.rmu.
func (k *keyEntry) sweepAEADs() {
	k.mu.Lock()
	if !k.sendUsed {
		k.send = nil
	}
	k.sendUsed = false
	k.mu.Unlock()
	if !k.recvUsed {
		k.recv = nil
	}
	k.recvUsed = false
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

// zero drops the keys: frames can no longer be sealed or opened. Called
// by channel.end under channel.rmu.
func (k *keyEntry) zero() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.slot != nil {
		k.arena.Free(k.slot) // zeroes it
		k.slot = nil
	}
	k.send, k.recv, k.old = nil, nil, nil
}

// present reports whether the keys are still there. For tests.
func (k *keyEntry) present() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.slot != nil
}

// Key rotation: the receiving side of each direction picks a new key under
// the next epoch after limits.rotate_frames, limits.rotate_bytes or
// timers.rotate, and sends it in a Rekey; it opens both epochs until the
// first frame under the new one arrives, then zeroes the old key.

// sendRekey gives the peer the key for its frames to us from now on.
func (ch *channel) sendRekey() {
	m := &wire.Rekey{}
	ch.rmu.Lock()
	m.Epoch = ch.keys.recvEpoch
	ok := ch.keys.copyRecv(m.Key[:])
	ch.rmu.Unlock()
	if !ok {
		return
	}
	ch.mu.Lock()
	m.Index, m.DstConn, m.SrcConn = ch.state.remoteIndex, ch.state.remoteConn, ch.id
	ch.mu.Unlock()
	msg := m.Marshal()
	clear(m.Key[:])
	ch.carrier.sendControl(msg)
	clear(msg)
}

// handleRekey takes the new key the peer chose for our frames to it.
func (a *Agent) handleRekey(car carrier, m *wire.Rekey) {
	defer clear(m.Key[:])
	ch := a.tables.lookupIndex(m.Index)
	if ch == nil || !a.idsMatch(car, ch, m.DstConn, m.SrcConn) {
		return
	}
	k := &ch.keys
	k.mu.Lock()
	switch {
	case k.slot == nil || m.Epoch == k.sendEpoch: // gone, or sent again on a resume
	case m.Epoch == k.sendEpoch+1:
		copy(k.sendKey(), m.Key[:])
		k.send = nil // made again, with the new key, by the next seal
		k.sendEpoch, k.sealed, k.sealedB = m.Epoch, 0, 0
		tellKey("channel send", k.sendKey())
		signal(k.rekeySig)
	default:
		a.counters.malformed.Add(1)
	}
	k.mu.Unlock()
}
