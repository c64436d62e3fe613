// Package link is the peer link between two agents (docs/design.md): a TCP
// connection on which a Noise_XX handshake, carrying each side's node
// certificate, authenticates both agents and derives the session keys, and
// after which every frame is length-prefixed and sealed.
package link

import "time"

// Protocol constants. The handshake is Noise_XX_25519_AESGCM_SHA256 from the
// Noise Protocol Framework, revision 34 (noiseprotocol.org/noise.html §7.5);
// the transport frame layout is drawn in frame.go.
const (
	// prologue is mixed into the handshake hash: both sides must speak
	// this exact protocol version or the handshake fails. v2 added mac1
	// to message 1 (mac1.go); a v1 agent's message 1 is refused as
	// malformed.
	prologue = "sinc peer link v2"

	// helloVersion is the version of the handshake payload (hello.go).
	helloVersion = 1

	// MaxFrameLen is the hard maximum of a frame's length field (type byte
	// and body). A frame announcing more kills the link before any of
	// its body is read.
	MaxFrameLen = 1 << 17

	// MaxControlLen bounds a control message's plaintext.
	MaxControlLen = 16 << 10

	// InstanceSize is the length of an agent's per-start instance id.
	InstanceSize = 16

	// readBuffer is what a link reads from its connection at once.
	readBuffer = 64 << 10
)

// Defaults for Config's timers.
const (
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultKeepalive        = 5 * time.Second
	DefaultDeadAfter        = 15 * time.Second
)
