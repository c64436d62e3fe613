package agent

import (
	"io"
	"testing"

	"sinc.dev/sinc"
)

// In-process data path benchmarks (both agents and both processes in one
// process): for profiling the agent. sinc bench compares transports across
// real processes.

func BenchmarkStreamBulk(b *testing.B) {
	p := startPair(b, channelSpecs)
	l, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(b), "sink")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.AcceptSinc()
		if err != nil {
			return
		}
		io.Copy(io.Discard, c)
		c.Close()
	}()
	c, err := (&sinc.Dialer{Socket: p.sock("node-a", "web")}).DialContext(ctxT(b), "node-b/db/sink")
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMessages64(b *testing.B) {
	p := startPair(b, channelSpecs)
	l, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(b), "sink")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := l.AcceptSinc()
		if err != nil {
			return
		}
		for {
			if _, err := c.ReadMessage(); err != nil {
				break
			}
		}
		c.Close()
	}()
	c, err := (&sinc.Dialer{Socket: p.sock("node-a", "web"), Kind: sinc.Message}).DialContext(ctxT(b), "node-b/db/sink")
	if err != nil {
		b.Fatal(err)
	}
	msg := make([]byte, 64)
	b.SetBytes(64)
	b.ResetTimer()
	for range b.N {
		if err := c.WriteMessage(msg); err != nil {
			b.Fatal(err)
		}
	}
	c.CloseWrite()
	<-done
	c.Close()
}

func BenchmarkPingPong64(b *testing.B) {
	p := startPair(b, channelSpecs)
	l, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(b), "echo")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.AcceptSinc()
		if err != nil {
			return
		}
		io.Copy(c, c)
		c.Close()
	}()
	c, err := (&sinc.Dialer{Socket: p.sock("node-a", "web")}).DialContext(ctxT(b), "node-b/db/echo")
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkOpenClose: one op is a channel opened through both agents,
// accepted, and closed, from one opener.
func BenchmarkOpenClose(b *testing.B) {
	p := startPair(b, channelSpecs)
	l, err := (&sinc.ListenConfig{Socket: p.sock("node-b", "db")}).Listen(ctxT(b), "sink")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	d := &sinc.Dialer{Socket: p.sock("node-a", "web")}
	b.ResetTimer()
	for range b.N {
		c, err := d.DialContext(ctxT(b), "node-b/db/sink")
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
