package main

// sinc forward: a program that speaks TCP or a Unix socket reaches a
// service through sinc without linking the client library. Each
// connection it makes to the forwarder's socket becomes a stream channel,
// and relay.go copies the bytes.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc"
	"sinc.dev/sinc/internal/local"
)

const forwardHelp = `usage: sinc forward LISTEN node/partition/service [flags]

Each connection a program makes to LISTEN becomes a stream channel to
node/partition/service, opened through the partition socket (--socket,
default $SINC_SOCKET). Bytes are copied both ways; a half-close passes on
as a half-close, a reset as a reset (the other end reads "aborted"). A
channel the agents refuse closes the connection at once (a reset), and the
log says why.

LISTEN is a Unix socket path, "unix:PATH" or any path with a '/'
(/run/pg/.s.PGSQL.5432, ./pg.sock), made with --mode, --owner and --group;
or a loopback TCP address: 127.0.0.1:PORT, [::1]:PORT or localhost:PORT.
Any other address is refused.

The agent sees the forwarder, not the program: its policy checks the
forwarder's uid, and every process that can connect to LISTEN speaks as
the forwarder. Run it as the program's user. ANY LOCAL USER CAN CONNECT TO
A TCP PORT, even on loopback: prefer a Unix socket, whose mode says who
may use it.

flags:
`

func runForward(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("forward", stderr)
	mode := fs.String("mode", "0600", "a Unix LISTEN socket's mode")
	owner := fs.String("owner", "", "a Unix LISTEN socket's owner: user name or uid (default the forwarder's)")
	group := fs.String("group", "", "a Unix LISTEN socket's group: group name or gid (default the forwarder's)")
	rf := addRelayFlags(fs, "connection", "reset", "opening a channel")
	fs.Usage = func() { fmt.Fprint(stderr, forwardHelp); fs.PrintDefaults() }
	pos, err := parse(fs, args, 2)
	if err != nil {
		return err
	}
	target := pos[1]
	if _, err := local.ParseAddr(target); err != nil {
		return usageError{err.Error()}
	}
	la, err := parseLocalAddr(pos[0])
	if err != nil {
		return usageError{"LISTEN " + err.Error()}
	}
	perm, err := parseSocketPerm(*mode, *owner, *group)
	if err != nil {
		return err
	}
	if la.network == "tcp" {
		if perm != (socketPerm{mode: 0o600, uid: -1, gid: -1}) {
			return usagef("--mode, --owner and --group are for a Unix socket; %s is a TCP address", la)
		}
		if la.addr, err = loopbackOnly(la.addr); err != nil {
			return err
		}
	}
	log, stopLog, err := rf.start(stderr)
	if err != nil {
		return err
	}
	defer stopLog()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ln, err := listenLocal(la, perm)
	if err != nil {
		return err
	}
	f := &forwarder{
		target: target, timeout: *rf.timeout,
		dialer: &sinc.Dialer{Socket: *rf.socket, Kind: sinc.Stream},
		slots:  make(limiter, *rf.maxConns), log: log,
	}
	log.Info("forwarding", "listen", ln.Addr().String(), "to", target, "max_conns", *rf.maxConns)
	f.serve(ctx, ln)
	log.Info("stopped", "listen", ln.Addr().String(), "to", target)
	return nil
}

// defaultMaxConns is the default of --max-conns: each connection holds
// two relay buffers (64 KiB) and, at the agent, a channel.
const defaultMaxConns = 256

// forwarder turns local connections into channels to target.
type forwarder struct {
	target  string
	timeout time.Duration
	dialer  *sinc.Dialer
	slots   limiter
	log     *slog.Logger
}

// serve accepts until ctx ends, then fails the connections in progress
// and waits for their relays to end.
func (f *forwarder) serve(ctx context.Context, ln net.Listener) {
	stopped := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopped()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			f.log.Warn("accept failed", "listen", ln.Addr().String(), "err", err)
			time.Sleep(50 * time.Millisecond) // out of descriptors, say: let connections end
			continue
		}
		from := peerOf(c)
		if !f.slots.tryAcquire() {
			f.log.Warn("connection refused: too many connections", append(from, "to", f.target, "max_conns", cap(f.slots))...)
			resetLocal(c)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer f.slots.release()
			f.forward(ctx, c, from)
		}()
	}
}

// forward opens a channel for the local connection c and relays it.
func (f *forwarder) forward(ctx context.Context, c net.Conn, from []any) {
	ls, err := newLocalSide(c)
	if err != nil {
		c.Close()
		return
	}
	dctx, cancel := context.WithTimeout(ctx, f.timeout)
	ch, err := f.dialer.DialContext(dctx, f.target)
	cancel()
	if err != nil {
		f.log.Warn("channel refused: "+errCode(err), append(from, "to", f.target, "err", err)...)
		ls.fail("")
		return
	}
	start := time.Now()
	res := relay(ctx, ls, newChannelSide(ch, f.target))
	logRelay(f.log, res, time.Since(start), append(from, "to", f.target, "conn", ch.Info().ID)...)
}

// logRelay logs how a relay ended: a failure as a warning, a clean end at
// debug level.
func logRelay(log *slog.Logger, res relayResult, d time.Duration, attrs ...any) {
	attrs = append(attrs, "up", res.up, "down", res.down, "duration", d.Round(time.Millisecond))
	switch {
	case res.err == nil:
		log.Debug("connection closed", attrs...)
	case errors.Is(res.err, errStopping):
		log.Info("connection ended: stopping", attrs...)
	default:
		log.Warn("connection failed", append(attrs, "err", res.err)...)
	}
}

// errCode returns the code of a sinc error ("denied", "no_such_service"),
// or "error".
func errCode(err error) string {
	var se *sinc.Error
	if errors.As(err, &se) {
		return se.Code
	}
	return "error"
}

// resetLocal closes a local connection as failed.
func resetLocal(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// peerOf names the program at the other end of a local connection, for
// the log: its address (TCP), or its pid and uid from the kernel (Unix).
func peerOf(c net.Conn) []any {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return []any{"from", c.RemoteAddr().String()}
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	var cred *unix.Ucred
	rc.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if cred == nil {
		return nil
	}
	return []any{"from_pid", cred.Pid, "from_uid", cred.Uid}
}

// listenLocal listens on a TCP address (loopbackOnly checked it) or a
// Unix socket.
func listenLocal(la localAddr, perm socketPerm) (net.Listener, error) {
	if la.network == "unix" {
		return listenUnixSocket(la.addr, perm)
	}
	return net.Listen("tcp", la.addr)
}

// loopbackOnly returns addr with localhost made 127.0.0.1, or an error if
// its host is not a loopback address.
func loopbackOnly(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return "", usagef("LISTEN %q is not a loopback address: the forwarder listens only on 127.0.0.1, [::1], localhost or a Unix socket, since whoever reaches it speaks to the agent as the forwarder", addr)
	}
	return net.JoinHostPort(host, port), nil
}

// socketPerm is who may connect to the forwarder's Unix socket.
type socketPerm struct {
	mode     os.FileMode
	uid, gid int // -1: the forwarder's
}

// parseSocketPerm reads --mode (octal), --owner and --group (names or
// numbers).
func parseSocketPerm(mode, owner, group string) (socketPerm, error) {
	p := socketPerm{uid: -1, gid: -1}
	m, err := strconv.ParseUint(mode, 8, 32)
	if err != nil || m > 0o777 {
		return p, usagef("--mode %q is not a file mode like 0660", mode)
	}
	p.mode = os.FileMode(m)
	if owner != "" {
		if p.uid, err = lookupID(owner, "user", func(s string) (string, error) {
			u, err := user.Lookup(s)
			if err != nil {
				return "", err
			}
			return u.Uid, nil
		}); err != nil {
			return p, err
		}
	}
	if group != "" {
		if p.gid, err = lookupID(group, "group", func(s string) (string, error) {
			g, err := user.LookupGroup(s)
			if err != nil {
				return "", err
			}
			return g.Gid, nil
		}); err != nil {
			return p, err
		}
	}
	return p, nil
}

// lookupID returns a number, or the id of a name.
func lookupID(s, what string, lookup func(string) (string, error)) (int, error) {
	if n, err := strconv.Atoi(s); err == nil && n >= 0 {
		return n, nil
	}
	id, err := lookup(s)
	if err != nil {
		return 0, usagef("--%s: %v", map[string]string{"user": "owner", "group": "group"}[what], err)
	}
	return strconv.Atoi(id)
}

// listenUnixSocket listens on a Unix socket at path with perm. A stale
// socket (nobody listening) is replaced; a live one, or a file that is not
// a socket, is an error. The socket is made private and then widened to
// perm, so nobody connects in between; it is removed when the listener
// closes.
func listenUnixSocket(path string, perm socketPerm) (*net.UnixListener, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("listen %s: the file exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: a running process listens on it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	old := syscall.Umask(0o177) // the forwarder makes no other file meanwhile
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	if perm.uid >= 0 || perm.gid >= 0 {
		if err := os.Lchown(path, perm.uid, perm.gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("listen %s: set owner and group: %w", path, err)
		}
	}
	if err := os.Chmod(path, perm.mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("listen %s: set mode: %w", path, err)
	}
	return ln, nil
}
