package wire

import (
	"encoding/binary"
	"errors"
	"fmt"

	"sinc.dev/sinc/internal/cert"
)

// Channel control messages travel in control frames of the peer link
// (sealed with the link's session keys). Each starts with its op byte;
// integers are big endian; a string is a 1-byte length and its bytes
// (names) or a 2-byte length and its bytes (reasons, at most MaxReason).
//
//	Open      op=16 kind:1 index:4 conn:8 window:4 key:32
//	          src: node partition pid:4 uid:4 gid:4
//	          dst: node partition service
//	Accept    op=17 initIndex:4 initConn:8 index:4 conn:8 window:4 key:32
//	          dst process: pid:4 uid:4 gid:4
//	Refuse    op=18 initIndex:4 initConn:8 code:1 by:name reason:text
//	Close     op=19 index:4 dstConn:8 srcConn:8 code:1 reason:text
//	Credit    op=20 index:4 dstConn:8 srcConn:8 granted:8 ack:8 flags:1
//	Rekey     op=21 index:4 dstConn:8 srcConn:8 epoch:2 key:32
//	Idle      op=22 step:1
//
// In Open, index and conn are the initiator's receiving index and
// connection id, and key is the key for traffic *to the initiator*, which
// it chose. In Accept they are the acceptor's, with the key for traffic to
// the acceptor. Close and Credit name the receiver's index and connection id
// (dst) and the sender's connection id (src), like a data frame; a Close
// with index 0 names the channel by the connection ids alone (the sender
// no longer knows, or never learned, the receiver's index).
//
// Credit is the receiving side's whole state, not a change, so a lost one
// costs nothing once the next arrives: granted is the total payload bytes
// the sender may have sent, ack the counter of the next data frame expected
// (every frame before it arrived). FlagResend asks the sender to send again
// every frame from ack on: the receiver saw a gap.
//
// Idle closes a link that carries no channel, with links made on demand
// (a registry): the side that dialed the link asks (IdleAsk); the other
// answers IdleYes if it has no channel on the link and none opening — and
// from then on sends nothing on it, taking a new link for its next
// channel — or IdleNo. On IdleYes the asking side closes the link; nobody
// dials again for it. So an Open that crossed the question is never lost:
// the answering side had it in its tables, and said no.

// Control ops.
const (
	OpOpen   byte = 16
	OpAccept byte = 17
	OpRefuse byte = 18
	OpClose  byte = 19
	OpCredit byte = 20
	OpRekey  byte = 21
	OpIdle   byte = 22
)

const (
	KeyLen    = 32
	MaxReason = 512
	// MaxWindow bounds what a receiver may let a sender have in flight on
	// one channel: the Window of an Open or Accept, and Granted less the
	// bytes the sender sent. More is a protocol error.
	MaxWindow = 64 << 20
)

// Kind is a channel's kind.
type Kind byte

const (
	Stream  Kind = 1
	Message Kind = 2
)

func (k Kind) String() string {
	switch k {
	case Stream:
		return "stream"
	case Message:
		return "message"
	}
	return fmt.Sprintf("kind(%d)", byte(k))
}

// Proc is a process's kernel identity as one agent tells another.
type Proc struct {
	PID, UID, GID uint32
}

// Open asks the peer to accept a channel.
type Open struct {
	Kind    Kind
	Index   uint32
	Conn    uint64
	Window  uint32
	Key     [KeyLen]byte
	SrcNode string
	SrcPart string
	SrcProc Proc
	DstNode string
	DstPart string
	DstSvc  string
}

// Accept answers an Open.
type Accept struct {
	InitIndex uint32
	InitConn  uint64
	Index     uint32
	Conn      uint64
	Window    uint32
	Key       [KeyLen]byte
	DstProc   Proc
}

// Refuse answers an Open that failed.
type Refuse struct {
	InitIndex uint32
	InitConn  uint64
	Code      Code
	By        string // the node that refused
	Reason    string
}

// Close ends a channel.
type Close struct {
	Index   uint32
	DstConn uint64
	SrcConn uint64
	Code    Code
	Reason  string
}

// Credit tells the sender of a direction what the receiver allows and has.
type Credit struct {
	Index   uint32
	DstConn uint64
	SrcConn uint64
	Granted uint64
	Ack     uint64
	Flags   byte
}

// Rekey gives the sender of a direction a new key, chosen by the receiver,
// for frames from now on, with the next epoch.
type Rekey struct {
	Index   uint32
	DstConn uint64
	SrcConn uint64
	Epoch   uint16
	Key     [KeyLen]byte
}

// Marshal encodes m.
func (m *Rekey) Marshal() []byte {
	e := enc(make([]byte, 0, 55)).u8(OpRekey).u32(m.Index).u64(m.DstConn).u64(m.SrcConn)
	e = binary.BigEndian.AppendUint16(e, m.Epoch)
	return append(e, m.Key[:]...)
}

// ParseRekey decodes a Rekey.
func ParseRekey(b []byte) (*Rekey, error) {
	d, err := start(b, OpRekey)
	if err != nil {
		return nil, err
	}
	m := &Rekey{Index: d.u32(), DstConn: d.u64(), SrcConn: d.u64(), Epoch: binary.BigEndian.Uint16(d.take(2))}
	copy(m.Key[:], d.take(KeyLen))
	return m, d.done(OpRekey)
}

// Idle is a step of closing an idle link (see above).
type Idle struct {
	Step byte
}

// Steps of Idle.
const (
	IdleAsk byte = 1
	IdleYes byte = 2
	IdleNo  byte = 3
)

// Marshal encodes m.
func (m *Idle) Marshal() []byte { return []byte{OpIdle, m.Step} }

// ParseIdle decodes an Idle.
func ParseIdle(b []byte) (*Idle, error) {
	d, err := start(b, OpIdle)
	if err != nil {
		return nil, err
	}
	m := &Idle{Step: d.u8()}
	if d.err == nil && (m.Step < IdleAsk || m.Step > IdleNo) {
		d.err = fmt.Errorf("unknown idle step %d", m.Step)
	}
	return m, d.done(OpIdle)
}

// Credit flags.
const (
	FlagResend byte = 1 << 0
)

// Code says why a channel could not open or closed.
type Code byte

const (
	CodeOK             Code = 0
	CodeNoSuchNode     Code = 1
	CodeUnreachable    Code = 2
	CodeNoSuchPart     Code = 3
	CodeNoSuchService  Code = 4
	CodeDenied         Code = 5
	CodeTimeout        Code = 6
	CodeLimit          Code = 7
	CodeBadRequest     Code = 8
	CodeClosed         Code = 9  // closed normally
	CodeReset          Code = 10 // aborted: the other end went away or broke the protocol
	CodeInternal       Code = 11
	CodeExists         Code = 12
	CodeBusy           Code = 13
	CodeAgentGone      Code = 14
	CodeProtocol       Code = 15
	CodeMessageTooLong Code = 16
	CodeAborted        Code = 17 // a process aborted the channel (a close record)
)

var codeNames = map[Code]string{
	CodeOK: "ok", CodeNoSuchNode: "no_such_node", CodeUnreachable: "node_unreachable",
	CodeNoSuchPart: "no_such_partition", CodeNoSuchService: "no_such_service", CodeDenied: "denied",
	CodeTimeout: "timeout", CodeLimit: "limit", CodeBadRequest: "bad_request", CodeClosed: "closed",
	CodeReset: "reset", CodeInternal: "internal", CodeExists: "exists", CodeBusy: "busy",
	CodeAgentGone: "agent_gone", CodeProtocol: "protocol", CodeMessageTooLong: "message_too_long",
	CodeAborted: "aborted",
}

// String returns the code's name, as the local protocol spells it.
func (c Code) String() string {
	if s, ok := codeNames[c]; ok {
		return s
	}
	return fmt.Sprintf("code_%d", byte(c))
}

// ParseCode returns the code named s.
func ParseCode(s string) (Code, bool) {
	for c, n := range codeNames {
		if n == s {
			return c, true
		}
	}
	return 0, false
}

type enc []byte

func (e enc) u8(v byte) enc    { return append(e, v) }
func (e enc) u32(v uint32) enc { return binary.BigEndian.AppendUint32(e, v) }
func (e enc) u64(v uint64) enc { return binary.BigEndian.AppendUint64(e, v) }
func (e enc) name(s string) enc {
	return append(append(e, byte(len(s))), s...)
}
func (e enc) text(s string) enc {
	if len(s) > MaxReason {
		s = s[:MaxReason]
	}
	return append(binary.BigEndian.AppendUint16(e, uint16(len(s))), s...)
}
func (e enc) proc(p Proc) enc { return e.u32(p.PID).u32(p.UID).u32(p.GID) }

// Marshal encodes m.
func (m *Open) Marshal() []byte {
	e := enc(make([]byte, 0, 128)).u8(OpOpen).u8(byte(m.Kind)).u32(m.Index).u64(m.Conn).u32(m.Window)
	e = append(e, m.Key[:]...)
	return e.name(m.SrcNode).name(m.SrcPart).proc(m.SrcProc).name(m.DstNode).name(m.DstPart).name(m.DstSvc)
}

// Marshal encodes m.
func (m *Accept) Marshal() []byte {
	e := enc(make([]byte, 0, 80)).u8(OpAccept).u32(m.InitIndex).u64(m.InitConn).u32(m.Index).u64(m.Conn).u32(m.Window)
	e = append(e, m.Key[:]...)
	return e.proc(m.DstProc)
}

// Marshal encodes m.
func (m *Refuse) Marshal() []byte {
	return enc(nil).u8(OpRefuse).u32(m.InitIndex).u64(m.InitConn).u8(byte(m.Code)).name(m.By).text(m.Reason)
}

// Marshal encodes m.
func (m *Close) Marshal() []byte {
	return enc(nil).u8(OpClose).u32(m.Index).u64(m.DstConn).u64(m.SrcConn).u8(byte(m.Code)).text(m.Reason)
}

// Marshal encodes m.
func (m *Credit) Marshal() []byte {
	return enc(make([]byte, 0, 38)).u8(OpCredit).u32(m.Index).u64(m.DstConn).u64(m.SrcConn).u64(m.Granted).u64(m.Ack).u8(m.Flags)
}

// dec reads a message; after the first error every read returns zero.
type dec struct {
	b   []byte
	err error
}

func (d *dec) take(n int) []byte {
	if d.err != nil || n > len(d.b) {
		if d.err == nil {
			d.err = errors.New("message truncated")
		}
		return make([]byte, n)
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}
func (d *dec) u8() byte    { return d.take(1)[0] }
func (d *dec) u32() uint32 { return binary.BigEndian.Uint32(d.take(4)) }
func (d *dec) u64() uint64 { return binary.BigEndian.Uint64(d.take(8)) }
func (d *dec) name(field string) string {
	s := string(d.take(int(d.u8())))
	if d.err == nil {
		if err := cert.ValidName(s); err != nil {
			d.err = fmt.Errorf("%s: %w", field, err)
		}
	}
	return s
}
func (d *dec) text() string {
	n := int(binary.BigEndian.Uint16(d.take(2)))
	if d.err == nil && n > MaxReason {
		d.err = fmt.Errorf("reason of %d bytes exceeds %d", n, MaxReason)
	}
	return string(d.take(n))
}
func (d *dec) proc() Proc { return Proc{d.u32(), d.u32(), d.u32()} }

func (d *dec) done(op byte) error {
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%d trailing bytes", len(d.b))
	}
	if d.err != nil {
		return fmt.Errorf("control op %d: %w", op, d.err)
	}
	return nil
}

func start(b []byte, op byte) (*dec, error) {
	if len(b) == 0 || b[0] != op {
		return nil, fmt.Errorf("not control op %d", op)
	}
	return &dec{b: b[1:]}, nil
}

// ParseOpen decodes an Open.
func ParseOpen(b []byte) (*Open, error) {
	d, err := start(b, OpOpen)
	if err != nil {
		return nil, err
	}
	m := &Open{Kind: Kind(d.u8()), Index: d.u32(), Conn: d.u64(), Window: d.u32()}
	copy(m.Key[:], d.take(KeyLen))
	m.SrcNode, m.SrcPart, m.SrcProc = d.name("source node"), d.name("source partition"), d.proc()
	m.DstNode, m.DstPart, m.DstSvc = d.name("destination node"), d.name("destination partition"), d.name("destination service")
	if d.err == nil && m.Kind != Stream && m.Kind != Message {
		d.err = fmt.Errorf("unknown channel kind %d", m.Kind)
	}
	return m, d.done(OpOpen)
}

// ParseAccept decodes an Accept.
func ParseAccept(b []byte) (*Accept, error) {
	d, err := start(b, OpAccept)
	if err != nil {
		return nil, err
	}
	m := &Accept{InitIndex: d.u32(), InitConn: d.u64(), Index: d.u32(), Conn: d.u64(), Window: d.u32()}
	copy(m.Key[:], d.take(KeyLen))
	m.DstProc = d.proc()
	return m, d.done(OpAccept)
}

// ParseRefuse decodes a Refuse.
func ParseRefuse(b []byte) (*Refuse, error) {
	d, err := start(b, OpRefuse)
	if err != nil {
		return nil, err
	}
	m := &Refuse{InitIndex: d.u32(), InitConn: d.u64(), Code: Code(d.u8())}
	m.By, m.Reason = d.name("refusing node"), d.text()
	return m, d.done(OpRefuse)
}

// ParseClose decodes a Close.
func ParseClose(b []byte) (*Close, error) {
	d, err := start(b, OpClose)
	if err != nil {
		return nil, err
	}
	m := &Close{Index: d.u32(), DstConn: d.u64(), SrcConn: d.u64(), Code: Code(d.u8())}
	m.Reason = d.text()
	return m, d.done(OpClose)
}

// ParseCredit decodes a Credit.
func ParseCredit(b []byte) (*Credit, error) {
	d, err := start(b, OpCredit)
	if err != nil {
		return nil, err
	}
	m := &Credit{Index: d.u32(), DstConn: d.u64(), SrcConn: d.u64(), Granted: d.u64(), Ack: d.u64(), Flags: d.u8()}
	if d.err == nil && m.Flags&^FlagResend != 0 {
		d.err = fmt.Errorf("unknown credit flags %#x", m.Flags)
	}
	return m, d.done(OpCredit)
}
