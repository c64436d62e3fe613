// Package replay is the anti-replay sliding window that a receiving agent
// applies to the counters of a channel's data frames (docs/design.md, "counter
// not replayed"). It follows RFC 6479, "IPsec Anti-Replay Algorithm without
// Bit Shifting": the window is a ring of 64-bit blocks indexed by counter>>6,
// so sliding it forward clears whole blocks and never shifts bits.
//
// Contract:
//
//   - Counters start at 0: a fresh window accepts 0 (once), and any counter
//     up to math.MaxUint64.
//   - A counter is accepted at most once, and only while it is no more than
//     WindowSize (1984) behind the highest counter accepted so far.
//   - The zero value of Window is an empty window ready to use.
//   - A Window is not safe for concurrent use; its owner serialises calls.
//   - Accept only counters of frames that have already been authenticated,
//     or a forger can slide the window past the honest traffic.
package replay

const (
	blockBits = 64                  // bits in one block of the bitmap
	blockLog  = 6                   // log2(blockBits): counter>>blockLog is the block number
	bitMask   = blockBits - 1       // counter&bitMask is the bit within the block
	ringLen   = 32                  // blocks in the ring (RFC 6479 §2: a power of two)
	ringMask  = ringLen - 1         // block number & ringMask is the ring index
	ringBits  = ringLen * blockBits // 2048 counters of state
)

// WindowSize is how far behind the highest accepted counter a counter may be
// and still be accepted: 1984, i.e. (32-1)*64. One block of the ring is kept
// for the block the highest counter is in, so the window never needs the
// block it is about to clear.
const WindowSize = (ringLen - 1) * blockBits

// Compile-time checks: each fails to build (a negative constant overflows
// uint) if the constants above are changed inconsistently.
const (
	// The window fits in the ring with a whole block to spare.
	_ uint = ringBits - WindowSize - blockBits
	// ringLen is a power of two, so ringMask is a mask.
	_ uint = -(ringLen & ringMask)
	// blockLog matches blockBits.
	_ uint = -(blockBits ^ 1<<blockLog)
)

// Window is a sliding anti-replay window. See the package documentation for
// its contract.
type Window struct {
	// last is the highest counter accepted, or 0 when none has been.
	last uint64
	// ring holds a bit per counter for the blocks last>>6-ringLen+1 through
	// last>>6; block b is ring[b&ringMask]. Bits above last are always 0.
	ring [ringLen]uint64
}

// Seen reports, without changing the window, whether counter would be
// rejected: already accepted, or too old (more than WindowSize behind the
// highest accepted counter).
func (w *Window) Seen(counter uint64) bool {
	if counter > w.last {
		return false // ahead of everything: bits above last are never set
	}
	if w.last-counter > WindowSize {
		return true // too old
	}
	return w.ring[(counter>>blockLog)&ringMask]&(1<<(counter&bitMask)) != 0
}

// Accept marks counter as accepted and returns true, or returns false and
// changes nothing if Seen(counter) is true. Call it only after the frame
// carrying counter has been authenticated.
func (w *Window) Accept(counter uint64) bool {
	if w.Seen(counter) {
		return false
	}
	if counter > w.last {
		w.slide(counter)
	}
	w.ring[(counter>>blockLog)&ringMask] |= 1 << (counter & bitMask)
	return true
}

// slide moves the head of the window to counter, which is above w.last,
// clearing the blocks that come into the window and forgetting those that
// fall out of it.
func (w *Window) slide(counter uint64) {
	cur := w.last >> blockLog
	next := counter >> blockLog
	if n := next - cur; n >= ringLen {
		w.ring = [ringLen]uint64{} // a jump past the whole ring
	} else {
		for b := cur + 1; b <= next; b++ {
			w.ring[b&ringMask] = 0
		}
	}
	w.last = counter
}

// Reset forgets every counter: the window is as new.
func (w *Window) Reset() {
	*w = Window{}
}
