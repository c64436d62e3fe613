// Package logx keeps a flood of one kind of event from flooding the log.
//
// A Limiter is a slog.Handler in front of another. Each message — a
// record's level and message text, the rest of the record aside — may
// write Burst lines per Period; past that its lines are counted, not
// written. When that message's period is over, one line says how many
// were left out:
//
//	level=WARN msg="peer handshake failed: bad_mac" node=node-a remote=… err=…
//	… four more …
//	level=WARN msg="suppressed 5301 similar lines" node=node-a message="peer handshake failed: bad_mac" suppressed=5301 period=10s
//
// The summary is written when the message next appears after its period,
// or by Flush (Run calls it every Period, and once more when it stops),
// through the handler of the last line it counted, so it carries that
// line's attributes (the agent's node name, say).
//
// Messages are expected to be constant strings, with what varies in
// attributes; where a reason matters to whoever reads the log, it belongs
// in the message, so that one reason's flood does not hide another's.
// Memory is bounded all the same: at most MaxKeys messages are tracked at
// once; when a new message finds the table full of messages still within
// their period, it shares one extra budget with every other such message
// (its summary says "other messages"). So in any stretch of one Period a
// Limiter writes at most 2·(MaxKeys+1)·(Burst+1) lines, however many it
// is given (twice, because a stretch can hold the end of one period of a
// message and the start of the next).
//
// A Limiter and the handlers its WithAttrs and WithGroup return share one
// table and are safe for concurrent use.
package logx

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Options tune a Limiter. Zero fields take the defaults.
type Options struct {
	Burst   int           // lines per message per period (default 5)
	Period  time.Duration // default 10s
	MaxKeys int           // messages tracked at once (default 256)

	Now func() time.Time // the clock (tests); default time.Now
}

// Defaults for Options.
const (
	DefaultBurst   = 5
	DefaultPeriod  = 10 * time.Second
	DefaultMaxKeys = 256
)

// otherMessages names the shared budget of messages past MaxKeys.
const otherMessages = "other messages"

// Limiter is a slog.Handler that rate-limits repeated messages.
type Limiter struct {
	next slog.Handler
	t    *table
}

// key is what makes two lines "similar".
type key struct {
	level slog.Level
	msg   string
}

// entry is one message's budget in its current period.
type entry struct {
	key
	start      time.Time
	lines      int          // lines of this period, written or not
	suppressed int          // lines of this period not written
	via        slog.Handler // the handler of the last line counted: the summary's
}

type table struct {
	opts Options

	mu    sync.Mutex
	keys  map[key]*entry
	other entry // the shared budget past MaxKeys
}

// New returns a Limiter writing to next.
func New(next slog.Handler, opts Options) *Limiter {
	if opts.Burst <= 0 {
		opts.Burst = DefaultBurst
	}
	if opts.Period <= 0 {
		opts.Period = DefaultPeriod
	}
	if opts.MaxKeys <= 0 {
		opts.MaxKeys = DefaultMaxKeys
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	t := &table{opts: opts, keys: make(map[key]*entry, opts.MaxKeys)}
	t.other.msg = otherMessages
	return &Limiter{next: next, t: t}
}

// Enabled reports whether the next handler takes records of level.
func (l *Limiter) Enabled(ctx context.Context, level slog.Level) bool {
	return l.next.Enabled(ctx, level)
}

// WithAttrs returns a Limiter sharing l's table, writing to next with attrs.
func (l *Limiter) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &Limiter{next: l.next.WithAttrs(attrs), t: l.t}
}

// WithGroup returns a Limiter sharing l's table, writing to next in group.
func (l *Limiter) WithGroup(name string) slog.Handler {
	return &Limiter{next: l.next.WithGroup(name), t: l.t}
}

// summary is a line to write about suppressed lines.
type summary struct {
	level slog.Level
	msg   string
	n     int
	via   slog.Handler
}

// Handle writes r if its message is within its budget, and counts it if
// not.
func (l *Limiter) Handle(ctx context.Context, r slog.Record) error {
	t := l.t
	now := t.opts.Now()
	t.mu.Lock()
	var out []summary
	e := t.entry(key{r.Level, r.Message}, now, &out)
	if now.Sub(e.start) >= t.opts.Period {
		out = e.roll(now, out)
	}
	e.lines++
	e.via = l.next
	pass := e.lines <= t.opts.Burst
	if !pass {
		e.suppressed++
	}
	t.mu.Unlock()
	t.write(ctx, out)
	if pass {
		return l.next.Handle(ctx, r)
	}
	return nil
}

// entry returns k's budget, making one if there is room. With the table
// full it first drops messages whose period is over (queuing their
// summaries on out); failing that, k shares the other budget. t.mu is
// held.
func (t *table) entry(k key, now time.Time, out *[]summary) *entry {
	if e := t.keys[k]; e != nil {
		return e
	}
	if len(t.keys) >= t.opts.MaxKeys {
		for ek, e := range t.keys {
			if now.Sub(e.start) >= t.opts.Period {
				*out = e.roll(now, *out)
				delete(t.keys, ek)
			}
		}
	}
	if len(t.keys) >= t.opts.MaxKeys {
		if t.other.level < k.level {
			t.other.level = k.level // the summary goes at the highest level it stands for
		}
		return &t.other
	}
	e := &entry{key: k, start: now}
	t.keys[k] = e
	return e
}

// roll ends e's period at now: a summary if lines were suppressed, then a
// fresh budget.
func (e *entry) roll(now time.Time, out []summary) []summary {
	if e.suppressed > 0 {
		out = append(out, summary{e.level, e.msg, e.suppressed, e.via})
	}
	e.start, e.lines, e.suppressed = now, 0, 0
	return out
}

func (t *table) write(ctx context.Context, out []summary) {
	for _, s := range out {
		r := slog.NewRecord(t.opts.Now(), s.level, fmt.Sprintf("suppressed %d similar lines", s.n), 0)
		r.AddAttrs(slog.String("message", s.msg), slog.Int("suppressed", s.n), slog.Duration("period", t.opts.Period))
		s.via.Handle(ctx, r)
	}
}

// Flush writes the summaries of the messages whose period is over, and
// forgets those of them that had nothing suppressed. With all, it writes
// every pending summary, period over or not (at exit).
func (l *Limiter) Flush(all bool) {
	t := l.t
	now := t.opts.Now()
	var out []summary
	t.mu.Lock()
	for k, e := range t.keys {
		if all || now.Sub(e.start) >= t.opts.Period {
			out = e.roll(now, out)
			delete(t.keys, k)
		}
	}
	if all || now.Sub(t.other.start) >= t.opts.Period {
		out = t.other.roll(now, out)
	}
	t.mu.Unlock()
	t.write(context.Background(), out)
}

// Run calls Flush every period until ctx is done, then writes every
// pending summary and returns.
func (l *Limiter) Run(ctx context.Context) {
	tick := time.NewTicker(l.t.opts.Period)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			l.Flush(true)
			return
		case <-tick.C:
			l.Flush(false)
		}
	}
}
