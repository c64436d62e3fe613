package logx

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// clock is a fake time source.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// sink collects what a Limiter writes, as text lines.
type sink struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *sink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *sink) lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Split(strings.TrimSpace(s.b.String()), "\n")
}

// count returns how many lines contain sub, and the sum of the suppressed=
// counts of the summary lines among them.
func (s *sink) count(sub string) (lines, suppressed int) {
	for _, l := range s.lines() {
		if !strings.Contains(l, sub) {
			continue
		}
		if i := strings.Index(l, " suppressed="); i >= 0 {
			var n int
			fmt.Sscanf(l[i+len(" suppressed="):], "%d", &n)
			suppressed += n
			continue
		}
		lines++
	}
	return lines, suppressed
}

func newTest(opts Options) (*slog.Logger, *Limiter, *sink, *clock) {
	c := &clock{t: time.Unix(1000, 0)}
	opts.Now = c.now
	s := &sink{}
	l := New(slog.NewTextHandler(s, nil), opts)
	return slog.New(l), l, s, c
}

// TestBurstThenSuppressed: a message writes its burst, the rest is
// counted, and one line says how many were left out — when the message
// comes back after its period, or at a Flush after it.
func TestBurstThenSuppressed(t *testing.T) {
	log, lim, s, c := newTest(Options{Burst: 3, Period: time.Second})
	for i := range 1000 {
		log.Warn("bad request", "i", i)
	}
	if n, _ := s.count(`msg="bad request"`); n != 3 {
		t.Fatalf("%d lines written of 1000, want the burst of 3", n)
	}
	lim.Flush(false) // the period is not over: nothing yet
	if n := len(s.lines()); n != 3 {
		t.Fatalf("a Flush within the period wrote %d lines", n-3)
	}
	c.add(time.Second)
	log.Warn("bad request", "i", 1000)
	lines := s.lines()
	if len(lines) != 5 || !strings.Contains(lines[3], `msg="suppressed 997 similar lines"`) ||
		!strings.Contains(lines[3], `message="bad request"`) || !strings.Contains(lines[3], "level=WARN") ||
		!strings.Contains(lines[4], "i=1000") {
		t.Fatalf("after the period, want the summary and then the line; got:\n%s", strings.Join(lines, "\n"))
	}
	// Then a flood that stops: its summary comes at the Flush after its
	// period.
	for range 10 {
		log.Warn("bad request")
	}
	c.add(time.Second)
	lim.Flush(false)
	if _, sup := s.count(`message="bad request"`); sup != 997+8 {
		t.Fatalf("summaries count %d suppressed, want %d", sup, 997+8)
	}
}

// TestMessagesIndependent: one message's flood leaves another's lines
// alone, and so does one level's.
func TestMessagesIndependent(t *testing.T) {
	log, _, s, _ := newTest(Options{Burst: 2})
	for range 500 {
		log.Warn("peer handshake failed: bad_mac")
	}
	log.Warn("peer handshake failed: auth", "peer", "node-b")
	log.Error("peer handshake failed: bad_mac")
	if n, _ := s.count("auth"); n != 1 {
		t.Fatal("a flood of one message suppressed another")
	}
	if n, _ := s.count("level=ERROR"); n != 1 {
		t.Fatal("a flood at one level suppressed the same message at another")
	}
}

// TestCountsAddUp: over many periods and messages, lines written plus
// lines the summaries say were suppressed is every line logged.
func TestCountsAddUp(t *testing.T) {
	log, lim, s, c := newTest(Options{Burst: 4, Period: time.Second})
	sent := map[string]int{}
	for step := range 20000 {
		msg := fmt.Sprintf("event %d", step%7)
		log.Info(msg)
		sent[msg]++
		if step%1000 == 999 {
			c.add(300 * time.Millisecond)
		}
		if step%3000 == 2999 {
			lim.Flush(false)
		}
	}
	lim.Flush(true)
	for msg, n := range sent {
		written, _ := s.count(`msg="` + msg + `"`)
		_, suppressed := s.count(`message="` + msg + `"`)
		if written+suppressed != n {
			t.Errorf("%s: %d written + %d suppressed, %d logged", msg, written, suppressed, n)
		}
	}
}

// TestBoundedTable: ten thousand different messages in one period track
// at most MaxKeys, write at most (MaxKeys+1)·Burst lines, and still
// account for every line.
func TestBoundedTable(t *testing.T) {
	log, lim, s, c := newTest(Options{Burst: 2, MaxKeys: 16, Period: time.Second})
	const total = 10000
	for i := range total {
		log.Warn(fmt.Sprintf("dynamic message %d", i))
		if i%1000 == 0 {
			lim.t.mu.Lock()
			n := len(lim.t.keys)
			lim.t.mu.Unlock()
			if n > 16 {
				t.Fatalf("%d messages tracked, bound 16", n)
			}
		}
	}
	// Each of the first 16 got a budget of its own (and wrote its one
	// line); the other 9984 shared one budget of 2.
	written, _ := s.count("dynamic message")
	if written != 16+2 {
		t.Fatalf("%d lines written in one period, want %d", written, 16+2)
	}
	c.add(time.Second)
	lim.Flush(false)
	_, suppressed := s.count(`message=`)
	if written+suppressed != total {
		t.Fatalf("%d written + %d suppressed, %d logged", written, suppressed, total)
	}
	if n, _ := s.count(`message="other messages"`); n != 0 {
		t.Fatal("the summary of other messages is not a summary")
	}
	if _, sup := s.count(`message="other messages"`); sup != total-16-2 {
		t.Fatalf("other messages: %d suppressed, want %d", sup, total-16-2)
	}
	// The table frees itself: after the period, new messages get a
	// budget of their own again.
	log.Warn("a new message")
	if n, _ := s.count("a new message"); n != 1 {
		t.Fatal("a new message after the period found no room")
	}
}

// TestSummaryKeepsAttrs: lines logged through a derived logger share the
// budget of their message, and the summary carries the attrs of the last
// line it counts.
func TestSummaryKeepsAttrs(t *testing.T) {
	log, lim, s, c := newTest(Options{Burst: 1, Period: time.Second})
	node := log.With("node", "node-a")
	for range 5 {
		log.Warn("peer handshake failed: timeout")
		node.Warn("peer handshake failed: timeout")
	}
	c.add(time.Second)
	lim.Flush(false)
	lines := s.lines()
	if len(lines) != 2 || !strings.Contains(lines[1], "node=node-a") || !strings.Contains(lines[1], "suppressed=9") {
		t.Fatalf("got:\n%s", strings.Join(lines, "\n"))
	}
}

// TestRunFlushesAtStop: Run writes what is pending when its context ends.
func TestRunFlushesAtStop(t *testing.T) {
	s := &sink{}
	lim := New(slog.NewTextHandler(s, nil), Options{Burst: 1, Period: time.Hour})
	log := slog.New(lim)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { lim.Run(ctx); close(done) }()
	for range 3 {
		log.Info("x")
	}
	cancel()
	<-done
	if _, sup := s.count(`message=x`); sup != 2 {
		t.Fatalf("at stop: %d suppressed reported, want 2:\n%s", sup, s.b.String())
	}
}

// TestConcurrent: many goroutines through one Limiter and its derived
// handlers (run with -race); every line is written or counted.
func TestConcurrent(t *testing.T) {
	log, lim, s, _ := newTest(Options{Burst: 10, MaxKeys: 8})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := log.With("g", g)
			for i := range 2000 {
				l.Warn(fmt.Sprintf("m%d", i%12))
			}
		}()
	}
	wg.Wait()
	lim.Flush(true)
	written, _ := s.count(`msg=m`)
	_, suppressed := s.count(`message=`)
	if written+suppressed != 8*2000 {
		t.Fatalf("%d written + %d suppressed, %d logged", written, suppressed, 8*2000)
	}
}
