package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// listen opens a datagram socket at addr, as systemd's notify socket.
func listen(t *testing.T, addr string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func recv(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 4096)
	n, err := c.Read(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[:n])
}

func TestSendToPathAndAbstract(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify")
	abstract := "@sinc-sdnotify-test-" + strconv.Itoa(os.Getpid())
	for _, addr := range []string{path, abstract} {
		c := listen(t, addr)
		n, err := New(addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.Send(Ready("serving: 2 partitions")...); err != nil {
			t.Fatal(err)
		}
		want := "READY=1\nSTATUS=serving: 2 partitions\nMAINPID=" + strconv.Itoa(os.Getpid()) + "\n"
		if got := recv(t, c); got != want {
			t.Errorf("%s: got %q, want %q", addr, got, want)
		}
		n.Send(Reloading()...)
		got := recv(t, c)
		usec, _ := strings.CutPrefix(strings.Split(got, "\n")[1], "MONOTONIC_USEC=")
		if v, err := strconv.ParseInt(usec, 10, 64); !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") || err != nil || v <= 0 {
			t.Errorf("%s: reloading message %q", addr, got)
		}
		n.Send(Stopping()...)
		if got := recv(t, c); got != "STOPPING=1\nSTATUS=stopping\n" {
			t.Errorf("%s: stopping message %q", addr, got)
		}
	}
}

func TestNoSocketNoOp(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n, err := FromEnv()
	if n != nil || err != nil {
		t.Fatalf("FromEnv without NOTIFY_SOCKET: %v, %v", n, err)
	}
	if err := n.Send("READY=1"); err != nil {
		t.Errorf("nil Notifier: %v", err)
	}
}

func TestBadInput(t *testing.T) {
	for _, addr := range []string{"vsock:2:1234", "relative/path"} {
		if _, err := New(addr); err == nil || !strings.Contains(err.Error(), addr) {
			t.Errorf("New(%q): %v", addr, err)
		}
	}
	n, _ := New(filepath.Join(t.TempDir(), "none"))
	if err := n.Send("READY=1"); err == nil || !strings.Contains(err.Error(), "sd_notify to") {
		t.Errorf("send to no socket: %v", err)
	}
	c := listen(t, filepath.Join(t.TempDir(), "notify"))
	n, _ = New(c.LocalAddr().String())
	for _, bad := range []string{"READY=1\nSTOPPING=1", "READY"} {
		if err := n.Send(bad); err == nil {
			t.Errorf("Send(%q) passed", bad)
		}
	}
	if err := n.Send(Ready("a\nb")...); err != nil {
		t.Errorf("a status with a newline is made one line: %v", err)
	}
	if got := recv(t, c); !strings.Contains(got, "STATUS=a b\n") {
		t.Errorf("got %q", got)
	}
}
