// Package wire holds the formats agents exchange about channels on a peer
// link: the data frame header (this file) and the channel control messages
// (control.go). Decoders are strict and bounded, and fuzzed.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// A data frame on the link. The first 5 bytes are the link's own frame
// header (length, type = FrameData); the rest of the header is in the clear
// and, whole, is the associated data of the AEAD that seals the payload with
// the channel key of this direction:
//
//	 0                   1                   2                   3
//	 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                   length (link frame header)                  |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|  type = 2     |    flags      |   key epoch (16 bits)         |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|              receiver's channel index (32 bits)               |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                      counter (64 bits)                        |
//	+                                                               +
//	|                                                               |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|               source connection id (64 bits)                  |
//	+                                                               +
//	|                                                               |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|             destination connection id (64 bits)               |
//	+                                                               +
//	|                                                               |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|  reserved, zero (16 bits)     |  sealed payload ...           |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+                               +
//	|  ... and 16-byte tag                                          |
//
// (38 bytes of header in all, DataHeaderLen; a frame whose reserved bytes
// are not zero is refused.)
//
// The nonce is 32 zero bits and the counter, big endian: a key is never used
// with the same counter twice, since a sender counts up from 0 and a new
// epoch has a new key.
//
// The payload of a stream channel's frame is the next bytes of the stream.
// The payload of a message channel's frame is one or more messages, each a
// 4-byte big-endian length and its bytes: a sender packs what its process
// wrote in a burst into one frame, sealed once.

// FrameData is the link frame type of a data frame.
const FrameData byte = 2

// Data frame sizes.
const (
	DataHeaderLen = 38
	TagLen        = 16
	// MaxPayload is the most payload one data frame carries: bytes of a
	// stream, or whole messages of a message channel, each with its 4-byte
	// length (the largest message, 64 KiB, fits with its length).
	MaxPayload = 64<<10 + 64
	// MaxDataFrame is the largest data frame, link header included.
	MaxDataFrame = DataHeaderLen + MaxPayload + TagLen
)

// Data frame flags.
const (
	// FlagFin ends the sender's direction of a stream (half-close); the
	// frame's payload is empty.
	FlagFin byte = 1 << 0

	knownFlags = FlagFin
)

// DataHeader is the clear header of a data frame.
type DataHeader struct {
	Flags   byte
	Epoch   uint16
	Index   uint32 // receiver's channel index
	Counter uint64
	SrcConn uint64 // sender's connection id
	DstConn uint64 // receiver's connection id
}

// Errors of ParseDataHeader.
var (
	ErrShortData = errors.New("data frame shorter than header and tag")
	ErrFlags     = errors.New("data frame has unknown flags")
	ErrFinData   = errors.New("data frame with FIN carries payload")
)

// Put writes h, for a payload of n bytes, into the first DataHeaderLen bytes
// of b, link header included.
func (h *DataHeader) Put(b []byte, n int) {
	binary.BigEndian.PutUint32(b[0:4], uint32(DataHeaderLen-4+n+TagLen))
	b[4] = FrameData
	b[5] = h.Flags
	binary.BigEndian.PutUint16(b[6:8], h.Epoch)
	binary.BigEndian.PutUint32(b[8:12], h.Index)
	binary.BigEndian.PutUint64(b[12:20], h.Counter)
	binary.BigEndian.PutUint64(b[20:28], h.SrcConn)
	binary.BigEndian.PutUint64(b[28:36], h.DstConn)
	// b[36:38] reserved, zero
	b[36], b[37] = 0, 0
}

// ParseDataHeader reads the header of a whole data frame f (link header
// included) and returns it with the sealed payload.
func ParseDataHeader(f []byte) (DataHeader, []byte, error) {
	var h DataHeader
	if len(f) < DataHeaderLen+TagLen {
		return h, nil, fmt.Errorf("%w: %d bytes", ErrShortData, len(f))
	}
	if f[4] != FrameData {
		return h, nil, fmt.Errorf("frame type %d is not data", f[4])
	}
	h.Flags = f[5]
	if h.Flags&^knownFlags != 0 {
		return h, nil, fmt.Errorf("%w: %#x", ErrFlags, h.Flags)
	}
	if f[36] != 0 || f[37] != 0 {
		return h, nil, errors.New("data frame reserved bytes are not zero")
	}
	h.Epoch = binary.BigEndian.Uint16(f[6:8])
	h.Index = binary.BigEndian.Uint32(f[8:12])
	h.Counter = binary.BigEndian.Uint64(f[12:20])
	h.SrcConn = binary.BigEndian.Uint64(f[20:28])
	h.DstConn = binary.BigEndian.Uint64(f[28:36])
	sealed := f[DataHeaderLen:]
	if len(sealed) > MaxPayload+TagLen {
		return h, nil, fmt.Errorf("data frame payload of %d bytes exceeds %d", len(sealed)-TagLen, MaxPayload)
	}
	if h.Flags&FlagFin != 0 && len(sealed) != TagLen {
		return h, nil, ErrFinData
	}
	return h, sealed, nil
}

// MessageLenSize is the size of a message's length in a frame.
const MessageLenSize = 4

// CountMessages returns the number of messages in a message frame's
// payload and whether it is well formed: every length within the payload
// and within maxMessage. A message is its 4-byte big-endian length and its
// bytes, the same bytes as a data record of the local protocol (whose type
// byte, data, is 0), so a well-formed payload is also the process's
// records as they are written.
func CountMessages(p []byte, maxMessage int) (int, bool) {
	count := 0
	for len(p) > 0 {
		if len(p) < MessageLenSize {
			return count, false
		}
		n := int(binary.BigEndian.Uint32(p))
		p = p[MessageLenSize:]
		if n > maxMessage || n > len(p) {
			return count, false
		}
		p = p[n:]
		count++
	}
	return count, true
}

// Nonce returns the AEAD nonce of counter.
func Nonce(counter uint64) [12]byte {
	var n [12]byte
	binary.BigEndian.PutUint64(n[4:], counter)
	return n
}
