package main

// The relay of sinc forward and sinc expose: the bytes of one local
// connection (TCP or Unix) and one channel, copied both ways.
//
//	local program ⇄ local conn ⇄ ┌ up:   read local,   write channel ┐ ⇄ channel ⇄ agent ⇄ … ⇄ the other end
//	                             └ down: read channel, write local   ┘
//
// One goroutine per direction, each the only reader of its source and the
// only writer of its destination. What ends a direction:
//
//   - io.EOF from its source is a clean end of that direction alone: it
//     passes on as CloseWrite on the destination (a TCP FIN, a channel's
//     fin), and the other direction goes on (half-close).
//   - Any other error, reading or writing, is a failure of the whole
//     connection: both sides are ended as failed at once (fail), so the
//     other direction's blocked Read or Write wakes with an error and its
//     goroutine ends too. A channel fails by Abort, with what happened, so
//     that the program at the other end reads an error, not an end of
//     stream; a TCP connection fails by a reset (SO_LINGER 0, then close),
//     so that the local program reads ECONNRESET. A Unix socket has no
//     reset: it is closed, and its program reads end of file (or EPIPE on
//     write).
//   - The context ending (the forwarder stops) fails both sides.
//
// A side is read only while its direction lasts: a reset that reaches a
// side after its clean end is seen when the relay next writes to it, and
// then fails both (over one TCP connection, too, the peer learns it only
// when it writes).
//
// relay returns when both directions have ended, after closing both sides;
// no goroutine outlives it.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"sinc.dev/sinc"
)

// relayBuffer is the copy buffer of each direction: half a channel record,
// so that a full read makes one record.
const relayBuffer = 32 << 10

// side is one end of a relay.
type side interface {
	io.ReadWriter
	CloseWrite() error
	Close() error
	// fail ends the connection at once as failed, in a way the program at
	// its far end can tell from a clean end; why says what happened.
	fail(why string)
	// String names the side in errors: "local 127.0.0.1:40312", "channel
	// node-b/db/pg".
	String() string
}

// halfConn is a local connection: *net.TCPConn or *net.UnixConn.
type halfConn interface {
	net.Conn
	CloseWrite() error
}

// localSide is a local TCP or Unix connection.
type localSide struct {
	halfConn
	name string
}

func newLocalSide(c net.Conn) (*localSide, error) {
	hc, ok := c.(halfConn)
	if !ok {
		return nil, fmt.Errorf("%T cannot half-close", c)
	}
	name := "local " + c.RemoteAddr().String()
	if _, ok := c.(*net.UnixConn); ok {
		name = "local " + c.LocalAddr().String() // a client's Unix address is usually empty
	}
	return &localSide{halfConn: hc, name: name}, nil
}

func (l *localSide) fail(string) {
	if tc, ok := l.halfConn.(*net.TCPConn); ok {
		tc.SetLinger(0) // close sends a reset
	}
	l.halfConn.Close()
}

func (l *localSide) String() string { return l.name }

// channelSide is a sinc channel.
type channelSide struct {
	*sinc.Conn
	name string
}

func newChannelSide(c *sinc.Conn, addr string) *channelSide {
	return &channelSide{Conn: c, name: "channel " + addr}
}

func (c *channelSide) fail(why string) { c.Abort(why) }
func (c *channelSide) String() string  { return c.name }

// relayResult is how a relay ended.
type relayResult struct {
	up, down int64 // bytes copied local → channel and channel → local
	// err is the first failure, naming the side and the operation; nil if
	// both directions ended cleanly.
	err error
}

// relay copies between local and channel until both directions end (see
// the top of this file) or ctx ends.
func relay(ctx context.Context, local, channel side) relayResult {
	var (
		once  sync.Once // the end: failed, or closed cleanly
		first error     // set under once
		wg    sync.WaitGroup
		res   relayResult
	)
	failBoth := func(err error) {
		once.Do(func() {
			first = err
			why := err.Error()
			channel.fail(why)
			local.fail(why)
		})
	}
	stop := context.AfterFunc(ctx, func() { failBoth(errStopping) })
	defer stop()
	upDone, downDone := make(chan struct{}), make(chan struct{})
	wg.Add(2)
	go func() { defer wg.Done(); defer close(upDone); res.up = copyHalf(channel, local, failBoth, downDone) }()
	go func() { defer wg.Done(); defer close(downDone); res.down = copyHalf(local, channel, failBoth, upDone) }()
	wg.Wait()
	once.Do(func() { // both directions ended cleanly
		local.Close()
		channel.Close()
	})
	res.err = first
	return res
}

// writeFailWait bounds how long a direction whose write failed waits for
// the other direction to report why.
const writeFailWait = time.Second

// errStopping fails the relays of a forwarder or an exposer that stops.
var errStopping = errors.New("the relay is stopping")

// copyHalf copies src to dst until src's clean end, which it passes on as
// dst.CloseWrite, or a failure, which it passes to fail. reverse is closed
// when the other direction, the one that reads dst, has ended. It returns
// the bytes written to dst.
func copyHalf(dst, src side, fail func(error), reverse <-chan struct{}) int64 {
	buf := make([]byte, relayBuffer)
	var n int64
	for {
		k, rerr := src.Read(buf)
		if k > 0 {
			w, werr := dst.Write(buf[:k])
			n += int64(w)
			if werr != nil {
				// A reader learns why a connection ended better than a
				// writer does (a channel's reason comes in a record the
				// writer never sees; TCP says ECONNRESET to a read,
				// EPIPE to a write): give the other direction, which
				// reads dst, a moment to fail first with that.
				select {
				case <-reverse:
				case <-time.After(writeFailWait):
				}
				fail(fmt.Errorf("%v: write: %w", dst, werr))
				return n
			}
		}
		switch {
		case rerr == io.EOF:
			if err := dst.CloseWrite(); err != nil {
				fail(fmt.Errorf("%v: close write: %w", dst, err))
			}
			return n
		case rerr != nil:
			fail(fmt.Errorf("%v: read: %w", src, rerr))
			return n
		}
	}
}

// limiter bounds the connections a forwarder or an exposer relays at
// once.
type limiter chan struct{}

func (l limiter) tryAcquire() bool {
	select {
	case l <- struct{}{}:
		return true
	default:
		return false
	}
}

func (l limiter) release() { <-l }

// localAddr is where a local program is reached: a Unix socket path or a
// TCP address.
type localAddr struct {
	network string // "unix" or "tcp"
	addr    string
}

func (a localAddr) String() string { return a.addr }

// parseLocalAddr reads "unix:PATH", a path (anything with a '/':
// /run/pg.sock, ./pg.sock), or HOST:PORT.
func parseLocalAddr(s string) (localAddr, error) {
	switch {
	case s == "":
		return localAddr{}, errors.New("empty address: want a Unix socket path or HOST:PORT")
	case strings.HasPrefix(s, "unix:"):
		if s == "unix:" {
			return localAddr{}, fmt.Errorf("%q: no path after unix:", s)
		}
		return localAddr{"unix", s[len("unix:"):]}, nil
	case strings.Contains(s, "/"):
		return localAddr{"unix", s}, nil
	}
	if _, _, err := net.SplitHostPort(s); err != nil {
		return localAddr{}, fmt.Errorf("%q is neither a Unix socket path (with a '/', or unix:PATH) nor HOST:PORT: %v", s, err)
	}
	return localAddr{"tcp", s}, nil
}

// relayFlags are the flags forward and expose share.
type relayFlags struct {
	socket              *string
	maxConns            *int
	timeout             *time.Duration
	logFormat, logLevel *string
}

// addRelayFlags defines them on fs; unit names what is relayed
// ("connection", "channel"), full what happens past --max-conns, and
// timeout what --timeout bounds.
func addRelayFlags(fs *flag.FlagSet, unit, full, timeout string) *relayFlags {
	return &relayFlags{
		socket:    fs.String("socket", "", "the partition socket (default $SINC_SOCKET)"),
		maxConns:  fs.Int("max-conns", defaultMaxConns, unit+"s relayed at once; past it, new ones are "+full+" at once"),
		timeout:   fs.Duration("timeout", 10*time.Second, "how long "+timeout+" may take"),
		logFormat: fs.String("log-format", "text", "log format: text or json"),
		logLevel:  fs.String("log-level", "info", "log level: debug (a line per "+unit+"), info, warn, error"),
	}
}

// start checks the flags and makes the log of a forwarder or an exposer
// (startLog); stop writes its last counts.
func (f *relayFlags) start(stderr io.Writer) (log *slog.Logger, stop func(), err error) {
	if *f.maxConns < 1 || *f.timeout <= 0 {
		return nil, nil, usagef("--max-conns must be at least 1 and --timeout positive")
	}
	format, level, err := logFlags(*f.logFormat, *f.logLevel)
	if err != nil {
		return nil, nil, err
	}
	log, stop = startLog(stderr, format, level)
	return log, stop, nil
}
