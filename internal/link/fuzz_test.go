package link

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cert/certtest"
)

// FuzzReadFrame feeds arbitrary bytes to the frame reader: it must never
// panic, never return a body over the maximum, and fail only with one of its
// stated errors or an I/O end.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{})
	f.Add(binary.BigEndian.AppendUint32(nil, 17))
	f.Add(append(binary.BigEndian.AppendUint32(nil, 17), FrameControl))
	f.Add(append(append(binary.BigEndian.AppendUint32(nil, 17), FrameControl), make([]byte, 16)...))
	f.Add(append(binary.BigEndian.AppendUint32(nil, MaxFrameLen+1), FrameControl))
	f.Add(append(binary.BigEndian.AppendUint32(nil, 3), 7, 1, 2))
	buf := make([]byte, frameHeaderLen+MaxFrameLen)
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for {
			hdr, body, typ, err := readFrame(r, buf)
			if err != nil {
				if err != io.EOF && !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrFrameTooLarge) &&
					!errors.Is(err, ErrFrameTooSmall) && !errors.Is(err, ErrFrameType) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if len(hdr) != frameHeaderLen || len(body) > MaxFrameLen || (typ != FrameControl && typ != FrameData) {
				t.Fatalf("bad frame: hdr %d body %d type %d", len(hdr), len(body), typ)
			}
		}
	})
}

// FuzzParseHello: the handshake payload decoder never panics, and what it
// accepts re-encodes to the same bytes.
func FuzzParseHello(f *testing.F) {
	ca := certtest.NewCA(f)
	n := ca.Node(f, cert.NodeRequest{Node: "node-a", Partitions: []string{"web", "db"}})
	good := (&hello{instance: NewInstance(), cert: n.Cert}).marshal()
	f.Add(good)
	f.Add(good[:len(good)-1])
	f.Add(append(bytes.Clone(good), 0))
	f.Add([]byte{helloVersion})
	f.Add([]byte{2})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := parseHello(in)
		if err != nil {
			return
		}
		if out := h.marshal(); !bytes.Equal(out, in) {
			t.Fatalf("accepted hello re-encodes differently")
		}
	})
}
