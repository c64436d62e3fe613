package agent

import (
	"io"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc"
)

// In-process data path benchmarks (both agents and both processes in one
// process): for profiling the agent. sinc bench compares transports across
// real processes.

// benchChannel opens a channel of kind from node-a/web to node-b/db, whose
// accepted end serve handles in a goroutine; done is closed when serve
// returns.
func benchChannel(b *testing.B, kind sinc.Kind, serve func(*sinc.Conn)) (c *sinc.Conn, done chan struct{}) {
	p := startPair(b, channelSpecs)
	l := p.listen(b, "node-b", "db", "bench")
	done = make(chan struct{})
	go func() {
		defer close(done)
		c, err := l.AcceptSinc()
		if err != nil {
			return
		}
		serve(c)
		c.Close()
	}()
	return p.mustDial(b, "node-a", "web", "node-b/db/bench", kind), done
}

func BenchmarkStreamBulk(b *testing.B) {
	c, _ := benchChannel(b, sinc.Stream, func(c *sinc.Conn) { io.Copy(io.Discard, c) })
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
	c, done := benchChannel(b, sinc.Message, func(c *sinc.Conn) {
		for {
			if _, err := c.ReadMessage(); err != nil {
				return
			}
		}
	})
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
}

func BenchmarkPingPong64(b *testing.B) {
	c, _ := benchChannel(b, sinc.Stream, func(c *sinc.Conn) { io.Copy(c, c) })
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
// accepted, and closed, from one opener. cpu-µs/op is the CPU time of the
// whole test process (both agents, the opener and the acceptor) per op.
func BenchmarkOpenClose(b *testing.B) {
	p := startPair(b, channelSpecs)
	l := p.listen(b, "node-b", "db", "sink")
	go func() {
		for {
			c, err := l.AcceptSinc()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	cpu0 := processCPU(b)
	b.ResetTimer()
	for range b.N {
		c, err := p.dial(b, "node-a", "web", "node-b/db/sink", sinc.Stream)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.StopTimer()
	b.ReportMetric(float64(processCPU(b)-cpu0)/float64(time.Microsecond)/float64(b.N), "cpu-µs/op")
}

// processCPU is the CPU time, user and system, this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
