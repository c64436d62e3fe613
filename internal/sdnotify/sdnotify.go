// Package sdnotify tells the service manager how the agent is doing, by
// the sd_notify(3) protocol of systemd (a service of Type=notify):
//
//	READY=1          startup is done: every socket listens
//	RELOADING=1      a reload began (with MONOTONIC_USEC=, the time it did)
//	STOPPING=1       shutdown began
//	STATUS=text      one line for systemctl status
//	MAINPID=pid      the service's main process
//
// A message is one datagram of newline-separated assignments, sent to the
// Unix datagram socket named by $NOTIFY_SOCKET: a path, or, when it starts
// with '@', a name in the abstract namespace. Without $NOTIFY_SOCKET
// (not run by systemd, or not as Type=notify) there is no one to tell and
// every call does nothing. The protocol is systemd's; this is a small
// implementation of our own, not a dependency.
package sdnotify

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Notifier sends notifications to one service manager. The nil Notifier
// sends nothing. It is safe for concurrent use.
type Notifier struct {
	addr *net.UnixAddr
}

// FromEnv returns a Notifier for $NOTIFY_SOCKET, or nil if it is unset.
// An address it cannot use is an error naming it.
func FromEnv() (*Notifier, error) {
	return New(os.Getenv("NOTIFY_SOCKET"))
}

// New returns a Notifier for the socket at addr ("" for none: nil).
func New(addr string) (*Notifier, error) {
	if addr == "" {
		return nil, nil
	}
	// A path, or an abstract name ('@', which package net turns into the
	// leading NUL byte). Other forms systemd may use (vsock:) are not
	// for an agent on the host.
	if addr[0] != '/' && addr[0] != '@' {
		return nil, fmt.Errorf("NOTIFY_SOCKET %q: not a socket path or an abstract socket name (@name)", addr)
	}
	return &Notifier{addr: &net.UnixAddr{Name: addr, Net: "unixgram"}}, nil
}

// Send sends one notification: state lines such as "READY=1". A line
// that holds a newline would read as two: it is refused.
func (n *Notifier) Send(state ...string) error {
	if n == nil {
		return nil
	}
	for _, s := range state {
		if strings.Contains(s, "\n") || !strings.Contains(s, "=") {
			return fmt.Errorf("sd_notify: %q is not one VAR=value line", s)
		}
	}
	c, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify to %s: %w", n.addr.Name, err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	msg := strings.Join(state, "\n") + "\n"
	k, err := c.Write([]byte(msg))
	if err == nil && k != len(msg) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("sd_notify to %s: %w", n.addr.Name, err)
	}
	return nil
}

// Ready is the message that startup is done, with a status line.
func Ready(status string) []string {
	return []string{"READY=1", "STATUS=" + oneLine(status), "MAINPID=" + strconv.Itoa(os.Getpid())}
}

// Reloading is the message that a reload begins, now: a Ready follows when
// it is done.
func Reloading() []string {
	return []string{"RELOADING=1", "MONOTONIC_USEC=" + strconv.FormatInt(monotonicUsec(), 10), "STATUS=reloading"}
}

// Stopping is the message that shutdown begins.
func Stopping() []string { return []string{"STOPPING=1", "STATUS=stopping"} }

// monotonicUsec is CLOCK_MONOTONIC in microseconds, the clock systemd
// compares MONOTONIC_USEC with.
func monotonicUsec() int64 {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) != nil {
		return 0
	}
	return ts.Nano() / 1e3
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " ") }
