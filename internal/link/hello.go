package link

import (
	"encoding/binary"
	"errors"
	"fmt"

	"sinc.dev/sinc/internal/cert"
)

// hello is the payload each side sends inside the encrypted part of the
// Noise_XX handshake (message 2 from the responder, message 3 from the
// initiator):
//
//	offset  size  field
//	0       1     version (helloVersion)
//	1       16    instance id: random, new at each agent start
//	17      2     certificate length c, big endian
//	19      c     the node certificate (cert package encoding)
type hello struct {
	instance [InstanceSize]byte
	cert     *cert.Certificate
}

func (h *hello) marshal() []byte {
	raw := h.cert.Raw()
	b := make([]byte, 0, 1+InstanceSize+2+len(raw))
	b = append(b, helloVersion)
	b = append(b, h.instance[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(raw)))
	return append(b, raw...)
}

func parseHello(b []byte) (*hello, error) {
	if len(b) < 1+InstanceSize+2 {
		return nil, fmt.Errorf("handshake payload is %d bytes, too short", len(b))
	}
	if b[0] != helloVersion {
		return nil, fmt.Errorf("handshake payload version %d, want %d", b[0], helloVersion)
	}
	h := &hello{}
	copy(h.instance[:], b[1:1+InstanceSize])
	b = b[1+InstanceSize:]
	n := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if n != len(b) {
		return nil, errors.New("handshake payload certificate length does not match")
	}
	c, err := cert.Decode(b)
	if err != nil {
		return nil, fmt.Errorf("handshake payload: %w", err)
	}
	h.cert = c
	return h, nil
}
