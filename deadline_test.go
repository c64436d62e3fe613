package sinc_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// traffic is the seeded content of a test channel: the sizes of writes
// (stream) or messages, and their bytes. Writer and reader each make one
// from the same seed, so the reader checks every byte without being told.
type traffic struct {
	sizes *rand.Rand
	data  *rand.ChaCha8
}

func newTraffic(seed uint64) *traffic {
	var key [32]byte
	copy(key[:], fmt.Sprintf("sinc deadline test %016x", seed))
	return &traffic{sizes: rand.New(rand.NewPCG(seed, 1)), data: rand.NewChaCha8(key)}
}

// next returns the next write's (or message's) bytes.
func (tr *traffic) next(kind sinc.Kind) []byte {
	n := sinc.MaxMessage
	if kind == sinc.Stream {
		n = 200 << 10
	}
	b := make([]byte, tr.sizes.IntN(n+1))
	tr.data.Read(b)
	return b
}

// TestDeadlinesKeepFraming: random write deadlines (0–4 ms) on every
// write, random read deadlines (0–3 ms, half of them 0–150 µs) on every
// read, a reader that stalls for 30 ms at a time or reads slowly in small
// pieces: every byte arrives,
// in order, once, and messages arrive whole; after each deadline the
// writer goes on with exactly what Write did not count.
func TestDeadlinesKeepFraming(t *testing.T) {
	tp := onePartitionPair(t)
	begunTotal := 0
	for _, kind := range []sinc.Kind{sinc.Stream, sinc.Message} {
		for _, reader := range []string{"stalled", "slow"} {
			name := kind.String() + "/" + reader
			t.Run(name, func(t *testing.T) {
				c, s := mustPair(t, tp, "dl-"+strings.ReplaceAll(name, "/", "-"), kind)
				const seed = 20261126
				writes, stallEvery := 30, 20 // stream: about 3 MB
				if kind == sinc.Message {
					writes, stallEvery = 120, 10 // about 4 MB
				}
				type result struct {
					timeouts, begun int
					err             error
				}
				done := make(chan result, 1)
				quit := make(chan struct{}) // the reader gave up
				defer close(quit)
				go func() {
					tr := newTraffic(seed)
					dl := rand.New(rand.NewPCG(seed, 3))
					var r result
					for range writes {
						p := tr.next(kind)
						for first := true; first || len(p) > 0; first = false {
							select {
							case <-quit:
								return
							default:
							}
							c.SetWriteDeadline(time.Now().Add(time.Duration(dl.IntN(4000)) * time.Microsecond))
							n, err := c.Write(p)
							if kind == sinc.Message && n != 0 && n != len(p) {
								r.err = fmt.Errorf("message write counted %d of %d bytes", n, len(p))
							}
							p = p[n:]
							if err != nil {
								if !errors.Is(err, os.ErrDeadlineExceeded) {
									r.err = err
								}
								r.timeouts++
								if strings.Contains(err.Error(), "a record was begun") {
									r.begun++
								}
							}
							if r.err != nil {
								done <- r
								return
							}
							if kind == sinc.Message && n == 0 && err != nil {
								first = true // not sent: send it again
							}
						}
					}
					c.SetWriteDeadline(time.Time{})
					r.err = c.CloseWrite()
					done <- r
				}()

				want := newTraffic(seed)
				rd := rand.New(rand.NewPCG(seed, 4))
				buf := make([]byte, sinc.MaxMessage)
				var expect []byte // stream: bytes still expected of the current write
				reads, readTimeouts, got := 0, 0, 0
				progress := time.Now()
				for {
					reads++
					if reader == "stalled" && reads%stallEvery == 0 {
						time.Sleep(30 * time.Millisecond)
					}
					if reader == "slow" {
						time.Sleep(time.Duration(rd.IntN(300)) * time.Microsecond)
					}
					readWait := time.Duration(rd.IntN(3000)) * time.Microsecond
					if rd.IntN(2) == 0 {
						readWait /= 20 // often short enough to fall inside a record
					}
					s.SetReadDeadline(time.Now().Add(readWait))
					var m []byte
					var err error
					switch {
					case kind == sinc.Message && reads%2 == 0:
						m, err = s.ReadMessage()
					case kind == sinc.Stream && reader == "slow":
						var n int
						n, err = s.Read(buf[:1+rd.IntN(16<<10)])
						m = buf[:n]
					default:
						var n int
						n, err = s.Read(buf)
						m = buf[:n]
					}
					if errors.Is(err, os.ErrDeadlineExceeded) {
						if readTimeouts++; time.Since(progress) > 5*time.Second {
							t.Fatalf("nothing arrived for 5 s after %d read: the channel hangs", got)
						}
						continue
					}
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatalf("read after %d: %v", got, err)
					}
					progress = time.Now()
					if kind == sinc.Message {
						if w := want.next(kind); !bytes.Equal(m, w) {
							t.Fatalf("message %d: %d bytes, want %d; or they differ", got, len(m), len(w))
						}
						got++
						continue
					}
					for len(m) > 0 {
						for len(expect) == 0 {
							expect = want.next(kind)
						}
						k := min(len(m), len(expect))
						if !bytes.Equal(m[:k], expect[:k]) {
							t.Fatalf("stream byte %d differs", got)
						}
						m, expect, got = m[k:], expect[k:], got+k
					}
				}
				r := <-done
				if r.err != nil {
					t.Fatalf("writer: %v", r.err)
				}
				// Everything written was read, and nothing else.
				total := writes
				if kind == sinc.Stream {
					total = 0
					for tr, i := newTraffic(seed), 0; i < writes; i++ {
						total += len(tr.next(kind))
					}
				}
				if got != total {
					t.Fatalf("read %d, want %d", got, total)
				}
				t.Logf("%d write deadlines (%d in a record begun), %d read deadlines, %d %s read",
					r.timeouts, r.begun, readTimeouts, got, map[sinc.Kind]string{sinc.Stream: "bytes", sinc.Message: "messages"}[kind])
				begunTotal += r.begun
			})
		}
	}
	switch {
	case os.Getenv(sinc.NoRingEnv) != "1" && begunTotal != 0:
		// A ring takes a record whole or not at all.
		t.Errorf("%d write deadlines passed inside a record on the ring path", begunTotal)
	case os.Getenv(sinc.NoRingEnv) == "1" && begunTotal == 0:
		t.Error("no write deadline passed inside a record: the test did not try what it is for")
	}
}
