package link

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"sinc.dev/sinc/internal/wire"
)

// A transport frame on the link, after the handshake:
//
//	 0                   1                   2                   3
//	 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|                     length (type + body)                      |
//	+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//	|     type      |  body ...
//	+-+-+-+-+-+-+-+-+
//
// length is big endian and at most MaxFrameLen. For a control frame the
// body is AES-256-GCM(session key of this direction, nonce = 32 zero bits ‖
// 64-bit big-endian frame counter, associated data = the 5 header bytes,
// control message). The counter is implicit: each side counts the control
// frames it sent and received, so a dropped, reordered or replayed frame
// fails to open.

// Frame types. A data frame's body is laid out and sealed by the agent with
// a channel key (wire.FrameData, drawn in package wire); the link only
// carries it.
const (
	FrameControl byte = 1
	FrameData         = wire.FrameData
)

// Every data frame fits in a link frame.
const _ uint = MaxFrameLen - (wire.MaxDataFrame - 4)

const (
	frameHeaderLen = 5
	tagLen         = 16
)

// Frame errors. A link that meets one is closed; the agent logs the reason.
var (
	ErrFrameTooLarge = errors.New("frame larger than the maximum")
	ErrFrameTooSmall = errors.New("frame smaller than its type's minimum")
	ErrFrameType     = errors.New("unknown frame type")
	ErrTruncated     = errors.New("truncated frame")
	ErrAuth          = errors.New("frame failed authentication")
)

// parseHeader checks a frame header and returns the frame type and the body
// length.
func parseHeader(h []byte) (typ byte, n int, err error) {
	l := binary.BigEndian.Uint32(h[:4])
	typ = h[4]
	if l > MaxFrameLen {
		return 0, 0, fmt.Errorf("%w: length %d > %d", ErrFrameTooLarge, l, MaxFrameLen)
	}
	switch typ {
	case FrameControl:
		if l < 1+tagLen {
			return 0, 0, fmt.Errorf("%w: control frame length %d", ErrFrameTooSmall, l)
		}
	case FrameData:
		if l < wire.DataHeaderLen-4+wire.TagLen {
			return 0, 0, fmt.Errorf("%w: data frame length %d", ErrFrameTooSmall, l)
		}
	default:
		return 0, 0, fmt.Errorf("%w %d", ErrFrameType, typ)
	}
	return typ, int(l) - 1, nil
}

func putHeader(h []byte, typ byte, bodyLen int) {
	binary.BigEndian.PutUint32(h[:4], uint32(bodyLen+1))
	h[4] = typ
}

// readFrame reads one frame into buf (which must hold frameHeaderLen +
// MaxFrameLen bytes) and returns its header and body, aliasing buf.
func readFrame(r io.Reader, buf []byte) (hdr, body []byte, typ byte, err error) {
	hdr = buf[:frameHeaderLen]
	if _, err := io.ReadFull(r, hdr); err != nil {
		if err == io.ErrUnexpectedEOF {
			err = fmt.Errorf("%w: header cut short", ErrTruncated)
		}
		return nil, nil, 0, err
	}
	typ, n, err := parseHeader(hdr)
	if err != nil {
		return nil, nil, 0, err
	}
	body = buf[frameHeaderLen : frameHeaderLen+n]
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.ErrUnexpectedEOF || err == io.EOF {
			err = fmt.Errorf("%w: body of %d bytes cut short", ErrTruncated, n)
		}
		return nil, nil, 0, err
	}
	return hdr, body, typ, nil
}
