package link

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/noise"

	"sinc.dev/sinc/internal/cert"
)

// Control ops the link itself handles; the agent's own ops start at
// OpFirstAgent and reach its Handler.
const (
	opAccept    byte = 1
	opReject    byte = 2
	opKeepalive byte = 3
	opClose     byte = 4

	// OpFirstAgent is the first control op a Handler receives.
	OpFirstAgent byte = 16
)

// ErrPeerClosed wraps the reason a peer gave when it closed the link.
var ErrPeerClosed = errors.New("peer closed the link")

// ErrDead is the error of a link on which nothing arrived for DeadAfter.
var ErrDead = errors.New("peer silent past the dead-peer bound")

// Link is an authenticated, encrypted connection to one peer agent. Its
// methods are safe for concurrent use.
type Link struct {
	conn         net.Conn
	peer         *cert.Certificate
	peerInstance [InstanceSize]byte
	initiator    bool
	keepalive    time.Duration
	deadAfter    time.Duration

	wmu      sync.Mutex // guards send, sendN, wbuf and writes to conn
	send     cipher.AEAD
	sendN    uint64
	wbuf     []byte
	lastSend atomic.Int64 // unix nanos of the last frame written
	lastRecv atomic.Int64 // unix nanos of the last frame read

	recv  cipher.AEAD // used by the reading goroutine only
	recvN uint64
	rbuf  []byte
	br    *bufio.Reader // reads conn: many small frames per read

	stats   Stats
	started time.Time
	retired bool // guarded by wmu

	closeOnce sync.Once
	done      chan struct{}
	err       error // why the link closed; set before done is closed
}

// Stats counts a link's traffic. Fields are read with atomic loads.
type Stats struct {
	FramesOut, BytesOut atomic.Uint64
	FramesIn, BytesIn   atomic.Uint64
}

func newLink(conn net.Conn, c *Config, h *hello, initiator bool, send, recv *noise.CipherState) (*Link, error) {
	sk, rk := send.UnsafeKey(), recv.UnsafeKey()
	defer clear(sk[:])
	defer clear(rk[:])
	sa, err := newAEAD(sk[:])
	if err != nil {
		return nil, err
	}
	ra, err := newAEAD(rk[:])
	if err != nil {
		return nil, err
	}
	l := &Link{
		conn:         conn,
		peer:         h.cert,
		peerInstance: h.instance,
		initiator:    initiator,
		keepalive:    c.Keepalive,
		deadAfter:    c.DeadAfter,
		send:         sa,
		recv:         ra,
		wbuf:         make([]byte, 0, frameHeaderLen+MaxControlLen+tagLen),
		rbuf:         make([]byte, frameHeaderLen+MaxFrameLen),
		br:           bufio.NewReaderSize(conn, readBuffer),
		done:         make(chan struct{}),
		started:      time.Now(),
	}
	if l.keepalive <= 0 {
		l.keepalive = DefaultKeepalive
	}
	if l.deadAfter <= 0 {
		l.deadAfter = DefaultDeadAfter
	}
	l.lastSend.Store(time.Now().UnixNano())
	l.lastRecv.Store(time.Now().UnixNano())
	return l, nil
}

func newAEAD(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// zero drops the link's keys and closes it; used when a handshake fails
// after the keys exist.
func (l *Link) zero() { l.Close(errors.New("handshake failed")) }

// Peer returns the peer's verified certificate.
func (l *Link) Peer() *cert.Certificate { return l.peer }

// PeerInstance returns the peer agent's instance id.
func (l *Link) PeerInstance() [InstanceSize]byte { return l.peerInstance }

// Initiator reports whether this side dialed the link.
func (l *Link) Initiator() bool { return l.initiator }

// RemoteAddr returns the peer's address.
func (l *Link) RemoteAddr() net.Addr { return l.conn.RemoteAddr() }

// LocalAddr returns this side's address.
func (l *Link) LocalAddr() net.Addr { return l.conn.LocalAddr() }

// Stats returns the link's counters.
func (l *Link) Stats() *Stats { return &l.stats }

// Done is closed when the link has closed.
func (l *Link) Done() <-chan struct{} { return l.done }

// Err returns why the link closed, or nil while it is open.
func (l *Link) Err() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

func nonce(n uint64) []byte {
	var b [12]byte
	binary.BigEndian.PutUint64(b[4:], n)
	return b[:]
}

// Send sends one agent control message (first byte: its op, at least
// OpFirstAgent).
func (l *Link) Send(msg []byte) error {
	if len(msg) == 0 || msg[0] < OpFirstAgent {
		return fmt.Errorf("link: control op %d is reserved", firstByte(msg))
	}
	return l.sendControl(msg)
}

func firstByte(b []byte) byte {
	if len(b) == 0 {
		return 0
	}
	return b[0]
}

func (l *Link) sendControl(msg []byte) error {
	if len(msg) > MaxControlLen {
		return fmt.Errorf("link: control message of %d bytes exceeds %d", len(msg), MaxControlLen)
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.send == nil {
		return l.closedErr()
	}
	b := l.wbuf[:frameHeaderLen]
	putHeader(b, FrameControl, len(msg)+tagLen)
	b = l.send.Seal(b, nonce(l.sendN), msg, b[:frameHeaderLen])
	l.sendN++
	l.conn.SetWriteDeadline(time.Now().Add(l.deadAfter))
	if _, err := l.conn.Write(b); err != nil {
		go l.Close(fmt.Errorf("write: %w", err))
		return err
	}
	l.lastSend.Store(time.Now().UnixNano())
	l.stats.FramesOut.Add(1)
	l.stats.BytesOut.Add(uint64(len(b)))
	return nil
}

func (l *Link) closedErr() error {
	if err := l.Err(); err != nil {
		return fmt.Errorf("link closed: %w", err)
	}
	return errors.New("link closed")
}

// SendData writes one data frame, laid out and sealed by the caller (its
// first 5 bytes are the link frame header).
func (l *Link) SendData(frame []byte) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.send == nil {
		return l.closedErr()
	}
	l.conn.SetWriteDeadline(time.Now().Add(l.deadAfter))
	if _, err := l.conn.Write(frame); err != nil {
		go l.Close(fmt.Errorf("write: %w", err))
		return err
	}
	l.lastSend.Store(time.Now().UnixNano())
	l.stats.FramesOut.Add(1)
	l.stats.BytesOut.Add(uint64(len(frame)))
	return nil
}

// readControl reads and opens one control frame.
func (l *Link) readControl() ([]byte, error) {
	m, data, err := l.read()
	if err == nil && data != nil {
		err = fmt.Errorf("%w: data frame before the link is up", ErrFrameType)
	}
	return m, err
}

// read reads one frame: a control frame is opened and returned as msg; a
// data frame is returned whole as data, aliasing the read buffer.
func (l *Link) read() (msg, data []byte, err error) {
	hdr, body, typ, err := readFrame(l.br, l.rbuf)
	if err != nil {
		return nil, nil, err
	}
	l.stats.FramesIn.Add(1)
	l.stats.BytesIn.Add(uint64(len(hdr) + len(body)))
	l.lastRecv.Store(time.Now().UnixNano())
	if typ == FrameData {
		return nil, l.rbuf[:len(hdr)+len(body)], nil
	}
	m, err := l.recv.Open(body[:0], nonce(l.recvN), body, hdr)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: control frame %d", ErrAuth, l.recvN)
	}
	l.recvN++
	if len(m) == 0 {
		return nil, nil, errors.New("empty control message")
	}
	return m, nil, nil
}

// Handler receives what arrives on a link: agent control messages, opened,
// and data frames, whole and still sealed. Both alias the link's read
// buffer: they are valid only until the call returns. The calls come from
// the link's one reading goroutine, so they must not block.
type Handler interface {
	HandleControl(l *Link, msg []byte)
	HandleData(l *Link, frame []byte)
}

// Serve reads frames until the link fails or is closed, handing agent
// control messages to h and keeping the link alive. It returns why the link
// closed.
func (l *Link) Serve(h Handler) error {
	go l.keepaliveLoop()
	for {
		l.conn.SetReadDeadline(time.Now().Add(l.deadAfter))
		m, data, err := l.read()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				err = fmt.Errorf("%w (%s)", ErrDead, l.deadAfter)
			} else if err == io.EOF {
				err = errors.New("connection closed by peer")
			}
			l.Close(err)
			return l.err
		}
		if data != nil {
			h.HandleData(l, data)
			continue
		}
		switch m[0] {
		case opKeepalive:
		case opClose:
			l.Close(fmt.Errorf("%w: %s", ErrPeerClosed, m[1:]))
			return l.err
		default:
			if m[0] < OpFirstAgent {
				l.Close(fmt.Errorf("unexpected control op %d", m[0]))
				return l.err
			}
			h.HandleControl(l, m)
			clear(m) // it may have carried a channel key
		}
	}
}

func (l *Link) keepaliveLoop() {
	t := time.NewTicker(l.keepalive / 2)
	defer t.Stop()
	for {
		select {
		case <-l.done:
			return
		case <-t.C:
			if time.Since(time.Unix(0, l.lastSend.Load())) >= l.keepalive {
				l.sendControl([]byte{opKeepalive})
			}
		}
	}
}

// Retire ends the link gracefully: the peer is told why (our last frame),
// nothing more is sent, and the link keeps reading until the peer closes
// it (or goes quiet for DeadAfter), so nothing the peer sent before it
// learned is lost. A link replaced by a newer one is retired.
func (l *Link) Retire(reason string) {
	l.sendControl(append([]byte{opClose}, truncate(reason, 200)...))
	l.wmu.Lock()
	l.send = nil
	l.retired = true
	l.wmu.Unlock()
}

// LastHeard returns when the last frame from the peer was read (any frame,
// keepalives included), or when the link came up if none was.
func (l *Link) LastHeard() time.Time { return time.Unix(0, l.lastRecv.Load()) }

// Started returns when the link came up.
func (l *Link) Started() time.Time { return l.started }

// Shutdown tells the peer why the link is closing, then closes it.
func (l *Link) Shutdown(reason string) {
	l.sendControl(append([]byte{opClose}, truncate(reason, 200)...))
	l.Close(errors.New(reason))
}

// Close closes the link with err as its reason and drops its keys. Only the
// first call has an effect.
func (l *Link) Close(err error) {
	l.closeOnce.Do(func() {
		l.err = err
		l.conn.Close()
		close(l.done)
		l.wmu.Lock()
		l.send = nil
		l.wmu.Unlock()
	})
}
