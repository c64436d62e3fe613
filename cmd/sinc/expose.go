package main

// sinc expose: a server that speaks TCP or a Unix socket is offered as a
// sinc service without linking the client library. Each channel accepted
// on the service is connected to the server, and relay.go copies the
// bytes.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"sinc.dev/sinc"
)

const exposeHelp = `usage: sinc expose SERVICE TARGET [flags]

Listens on SERVICE in the partition of --socket (default $SINC_SOCKET);
each channel accepted there is connected to TARGET, and bytes are copied
both ways. A half-close passes on as a half-close; a reset or a failure on
either side ends the other as failed: the dialing program reads "aborted"
with the reason, the server a TCP reset. A TARGET that refuses the
connection ends the channel at once, with the reason, and the log says why.

TARGET is a TCP address (127.0.0.1:5432) or a Unix socket path ("unix:PATH",
or any path with a '/'). The server sees connections from the exposer, not
from the remote program; who may reach SERVICE is the agents' policy (and
the partition's listen rules, which check the exposer's uid).

Stops on SIGTERM or SIGINT, and when the agent goes away (exit status 1).

flags:
`

func runExpose(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("expose", stderr)
	rf := addRelayFlags(fs, "channel", "aborted", "connecting to TARGET")
	fs.Usage = func() { fmt.Fprint(stderr, exposeHelp); fs.PrintDefaults() }
	pos, err := parse(fs, args, 2)
	if err != nil {
		return err
	}
	target, err := parseLocalAddr(pos[1])
	if err != nil {
		return usageError{"TARGET " + err.Error()}
	}
	log, stopLog, err := rf.start(stderr)
	if err != nil {
		return err
	}
	defer stopLog()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	l, err := (&sinc.ListenConfig{Socket: *rf.socket}).Listen(lctx, pos[0])
	cancel()
	if err != nil {
		return err
	}
	e := &exposer{target: target, dialer: &net.Dialer{Timeout: *rf.timeout},
		slots: make(limiter, *rf.maxConns), log: log}
	log.Info("exposing", "service", l.Addr().String(), "target", target.String(), "max_conns", *rf.maxConns)
	if err := e.serve(ctx, l); err != nil {
		return err
	}
	log.Info("stopped", "service", l.Addr().String())
	return nil
}

// exposer connects the channels of a service to target.
type exposer struct {
	target localAddr
	dialer *net.Dialer
	slots  limiter
	log    *slog.Logger
}

// serve accepts until ctx ends (nil) or the listener fails (its error:
// the agent went away), then fails the channels in progress and waits for
// their relays to end.
func (e *exposer) serve(ctx context.Context, l *sinc.Listener) error {
	stopped := context.AfterFunc(ctx, func() { l.Close() })
	defer stopped()
	rctx, failAll := context.WithCancel(ctx)
	defer failAll()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.AcceptSinc()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			failAll()
			return err
		}
		info := c.Info()
		from := []any{"from", info.RemoteNode + "/" + info.RemotePartition,
			"from_uid", info.RemoteProcess.UID, "from_pid", info.RemoteProcess.PID, "conn", info.ID}
		if !e.slots.tryAcquire() {
			e.log.Warn("channel refused: too many connections", append(from, "service", l.Addr().String(), "max_conns", cap(e.slots))...)
			c.Abort(fmt.Sprintf("sinc expose: at its limit of %d connections (--max-conns)", cap(e.slots)))
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer e.slots.release()
			e.expose(rctx, c, from)
		}()
	}
}

// expose connects the channel c to the target and relays it.
func (e *exposer) expose(ctx context.Context, c *sinc.Conn, from []any) {
	channel := newChannelSide(c, c.RemoteAddr().String())
	tc, err := e.dialer.DialContext(ctx, e.target.network, e.target.addr)
	if err != nil {
		e.log.Warn("target refused", append(from, "target", e.target.String(), "err", err)...)
		channel.fail("sinc expose: " + err.Error())
		return
	}
	ls, err := newLocalSide(tc)
	if err != nil {
		tc.Close()
		channel.fail("sinc expose: " + err.Error())
		return
	}
	start := time.Now()
	res := relay(ctx, ls, channel)
	logRelay(e.log, res, time.Since(start), append(from, "target", e.target.String())...)
}
