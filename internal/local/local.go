// Package local is the protocol between a process and its agent on a
// partition socket (docs/protocol.md). It is shared by the agent and the Go
// client so that both speak exactly one definition.
package local

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"sinc.dev/sinc/internal/cert"
)

// Protocol constants.
const (
	// Version is the protocol version the Go client speaks; MinVersion
	// the oldest an agent still takes. Version 3 adds rings (§8); a
	// version 2 request is answered as before.
	Version    = 3
	MinVersion = 2

	// MaxRequest bounds a request line, newline included.
	MaxRequest = 4096
	// MaxRecord is the largest record payload; on a message channel it is
	// the largest message.
	MaxRecord = 64 << 10
	// MaxMessage is the largest message of a message channel.
	MaxMessage = MaxRecord
	// RecordHeaderLen is the size of a record header.
	RecordHeaderLen = 4
	// MaxNotice bounds a listener's notice line.
	MaxNotice = 8 << 10
)

// Ops of a request.
const (
	OpOpen   = "open"
	OpListen = "listen"
	OpConns  = "conns"
)

// Kinds of channel.
const (
	KindStream  = "stream"
	KindMessage = "message"
)

// Request is the one line a process sends first on a partition socket.
type Request struct {
	V       int    `json:"v"`
	Op      string `json:"op"`
	To      string `json:"to,omitempty"`      // open: node/partition/service
	Kind    string `json:"kind,omitempty"`    // open: stream (default) or message
	Service string `json:"service,omitempty"` // listen
	// Ring asks (version 3) for the channel's data to go through shared
	// memory: open asks for its channel, listen for every channel it
	// accepts. The agent may still give the socket path (the answer or
	// the notice says).
	Ring bool `json:"ring,omitempty"`
}

// Response is the agent's one-line answer.
type Response struct {
	OK    bool   `json:"ok"`
	Error *Error `json:"error,omitempty"`
	Conn  *Conn  `json:"conn,omitempty"` // open
	Conns []Conn `json:"conns,omitzero"` // conns: present, [] when empty
	Addr  string `json:"addr,omitempty"` // listen: node/partition/service listened on
	Ring  bool   `json:"ring,omitempty"` // open: the channel's data goes through a ring (§8)
}

// Error is a typed failure: Code is one of the codes in docs/protocol.md;
// By names the agent that refused, where one did.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	By      string `json:"by,omitempty"`
}

func (e *Error) Error() string {
	if e.By != "" {
		return fmt.Sprintf("%s (by %s): %s", e.Code, e.By, e.Message)
	}
	return e.Code + ": " + e.Message
}

// Notice tells a listener about an accepted channel; the channel's socket
// rides with it (SCM_RIGHTS).
type Notice struct {
	Event string `json:"event"` // "accept"
	Conn  *Conn  `json:"conn"`
	Ring  bool   `json:"ring,omitempty"` // the channel's data goes through a ring (§8)
}

// Proc is a process's kernel identity.
type Proc struct {
	PID uint32 `json:"pid"`
	UID uint32 `json:"uid"`
	GID uint32 `json:"gid"`
}

// Conn is a row of the connection table.
type Conn struct {
	ID              uint64    `json:"id"`
	Partition       string    `json:"partition"`
	Process         Proc      `json:"process"`
	Service         string    `json:"service,omitempty"` // set on the accepting side
	RemoteNode      string    `json:"remote_node"`
	RemotePartition string    `json:"remote_partition"`
	RemoteProcess   Proc      `json:"remote_process"`
	RemoteService   string    `json:"remote_service,omitempty"` // set on the dialing side
	Kind            string    `json:"kind"`
	Dialed          bool      `json:"dialed"` // this side opened it
	State           string    `json:"state"`
	Created         time.Time `json:"created"`
	BytesOut        uint64    `json:"bytes_out"`
	BytesIn         uint64    `json:"bytes_in"`
	RecordsOut      uint64    `json:"records_out"`
	RecordsIn       uint64    `json:"records_in"`
}

// ParseRequest decodes a request line strictly: one JSON object, no unknown
// fields, this version.
func ParseRequest(line []byte) (*Request, error) {
	if len(line) > MaxRequest {
		return nil, fmt.Errorf("request longer than %d bytes", MaxRequest)
	}
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("malformed request: %v", err)
	}
	if dec.More() {
		return nil, errors.New("malformed request: more than one JSON value")
	}
	if req.V < MinVersion || req.V > Version {
		return nil, fmt.Errorf("protocol version %d; this agent speaks %d to %d", req.V, MinVersion, Version)
	}
	if req.Ring && (req.V < 3 || req.Op == OpConns) {
		return nil, fmt.Errorf("ring is a field of open and listen in version 3")
	}
	return &req, nil
}

// Addr is a channel's destination: node/partition/service.
type Addr struct {
	Node, Partition, Service string
}

func (a Addr) String() string { return a.Node + "/" + a.Partition + "/" + a.Service }

// ParseAddr parses node/partition/service.
func ParseAddr(s string) (Addr, error) {
	parts := strings.Split(s, "/")
	if len(parts) != 3 {
		return Addr{}, fmt.Errorf("address %.100q is not node/partition/service", s)
	}
	for i, what := range []string{"node", "partition", "service"} {
		if err := cert.ValidName(parts[i]); err != nil {
			return Addr{}, fmt.Errorf("address %.100q: %s: %w", s, what, err)
		}
	}
	return Addr{parts[0], parts[1], parts[2]}, nil
}

// Record types of the data socket. A record is a 4-byte big-endian header,
// type in the top 8 bits and payload length in the low 24, then the
// payload.
const (
	RecData  byte = 0 // payload: channel bytes (stream) or one message
	RecFin   byte = 1 // no payload: the sender's direction has ended
	RecClose byte = 2 // payload: JSON Error; the channel is closed at once
	// RecRing is the agent's first record on a channel that goes through a
	// ring (version 3, §8): its payload is a RingOffer, and the ring's
	// descriptors ride with its first byte.
	RecRing byte = 3
	// RecWake, on the socket of a ring channel, either way, no payload:
	// look at the rings again (the sender published, or made room, while
	// the other side slept or waited).
	RecWake byte = 4
)

// RingOffer describes a channel's rings: the header memfd holds the
// channel's control words at Slot (ring.HeaderSize bytes); the data memfd
// holds the ring up (process to agent) at 0 and the ring down at Size,
// Size bytes each.
type RingOffer struct {
	Size int    `json:"size"`
	Slot int    `json:"slot"`
	Gen  uint16 `json:"gen"` // the slot's generation (package ring)
}

// The descriptors that ride with a RecRing record, in this order.
const (
	RingFDHeader   = iota // memfd: the header slots
	RingFDData            // memfd: the two rings' data
	RingFDUpRoom          // pipe, read end: the agent made room up
	RingFDDownRoom        // pipe, write end: the process made room down
	RingFDs
)

// PutRecordHeader writes a record header into b[:4].
func PutRecordHeader(b []byte, typ byte, n int) {
	binary.BigEndian.PutUint32(b, uint32(typ)<<24|uint32(n))
}

// Errors of ParseRecordHeader.
var (
	ErrRecordType = errors.New("unknown record type")
	ErrRecordLen  = errors.New("record length out of bounds")
)

// ParseRecordHeader checks a record header.
func ParseRecordHeader(b []byte) (typ byte, n int, err error) {
	v := binary.BigEndian.Uint32(b)
	typ, n = byte(v>>24), int(v&0xffffff)
	switch typ {
	case RecData:
		if n > MaxRecord {
			return 0, 0, fmt.Errorf("%w: data record of %d bytes, max %d", ErrRecordLen, n, MaxRecord)
		}
	case RecFin:
		if n != 0 {
			return 0, 0, fmt.Errorf("%w: fin record with %d bytes", ErrRecordLen, n)
		}
	case RecWake:
		if n != 0 {
			return 0, 0, fmt.Errorf("%w: wake-up record with %d bytes", ErrRecordLen, n)
		}
	case RecClose:
		if n > MaxRequest {
			return 0, 0, fmt.Errorf("%w: close record of %d bytes", ErrRecordLen, n)
		}
	default:
		return 0, 0, fmt.Errorf("%w %d", ErrRecordType, typ)
	}
	return typ, n, nil
}
