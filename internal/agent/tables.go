package agent

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"sync"

	"sinc.dev/sinc/internal/admin"
	"sinc.dev/sinc/internal/local"
)

// The agent's three tables (docs/design.md, "Tables"). One id, the connection id, names
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
	perPeer  map[string]int         // channels in the tables, by peer node
	nextID   uint64
	max      int
}

type remoteKey struct {
	peer string
	conn uint64
}

func newTables(max int) *tables {
	return &tables{byID: map[uint64]*channel{}, byIndex: map[uint32]*channel{},
		byRemote: map[remoteKey]*channel{}, perPeer: map[string]int{}, nextID: 1, max: max}
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
	t.perPeer[ch.state.peer]++
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
		if t.perPeer[st.peer]--; t.perPeer[st.peer] <= 0 {
			delete(t.perPeer, st.peer)
		}
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

// count returns the number of channels to peer in the tables.
func (t *tables) count(peer string) int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.perPeer[peer]
}

func (t *tables) len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.byID)
}

// row returns the channel's connection table row, as the processes of its
// partition see it.
func (ch *channel) row() local.Conn {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	r := ch.conn
	r.ID = ch.id
	r.State = ch.state.status.String()
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
