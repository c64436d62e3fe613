package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The stunnel transport: the classic relay that holds TLS keys for
// programs that speak plain TCP, in the same topology as sinc, four
// processes on loopback:
//
//	client worker --TCP--> stunnel (client side) --TLS 1.3--> stunnel (server side) --TCP--> server worker
//
// The workers are the tcp transport's; the two stunnel processes stand
// where sinc's agents do (agent-a, agent-b in the CPU split). It runs the
// rows where a relay is compared like for like: bulk (and its CPU), the
// round trip, batched messages. Not the setup rows (a connect to the
// local stunnel completes before its TLS handshake starts, so the time
// would not be the open's) nor idle memory.
//
// stunnel comes from the Debian package stunnel4 (binary stunnel4, or
// stunnel); without it the transport is left out of a run with a note.

// Stunnel names the stunnel transport.
const Stunnel = "stunnel"

// ErrNoStunnel: no stunnel binary in PATH.
var ErrNoStunnel = errors.New("stunnel not found in PATH (Debian package stunnel4)")

// StunnelPath returns the stunnel binary, or ErrNoStunnel.
func StunnelPath() (string, error) {
	for _, name := range []string{"stunnel4", "stunnel"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
	}
	return "", ErrNoStunnel
}

// runsMetric reports whether transport tr takes part in the measurement
// of metric (a key of the report; rate keys by prefix).
func runsMetric(tr, metric string) bool {
	if tr != Stunnel {
		return true
	}
	switch {
	case metric == mBulk, metric == mCPU, metric == mRTT50, metric == mRTT99:
		return true
	case strings.HasPrefix(metric, "rate_") && strings.HasSuffix(metric, "_batched"):
		return true
	}
	return false
}

// workerTransport is the transport tr's worker processes speak.
func workerTransport(tr string) string {
	if tr == Stunnel {
		return TCP
	}
	return tr
}

// relay is one stunnel process.
type relay struct {
	cmd  *exec.Cmd
	addr string // where it accepts connections
	log  string
	done chan struct{} // closed when it has exited and been reaped
}

func (r *relay) pid() int { return r.cmd.Process.Pid }

// startRelays starts stunnel's server side, accepting TLS on a free
// loopback port and connecting to backend, then its client side, accepting
// plain TCP on another and connecting with TLS to the server side, which
// it verifies against certPath; it returns once both accept connections.
func startRelays(ctx context.Context, dir, backend, certPath, keyPath string) (client, server *relay, err error) {
	bin, err := StunnelPath()
	if err != nil {
		return nil, nil, err
	}
	serverAddr, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	server, err = startRelay(ctx, bin, dir, "server", serverAddr, fmt.Sprintf(`
accept = %s
connect = %s
cert = %s
key = %s
`, serverAddr, backend, certPath, keyPath))
	if err != nil {
		return nil, nil, err
	}
	clientAddr, err := freePort()
	if err == nil {
		client, err = startRelay(ctx, bin, dir, "client", clientAddr, fmt.Sprintf(`
client = yes
accept = %s
connect = %s
CAfile = %s
verifyChain = yes
checkIP = 127.0.0.1
`, clientAddr, serverAddr, certPath))
	}
	if err != nil {
		server.stop()
		return nil, nil, err
	}
	return client, server, nil
}

// startRelay writes the configuration of one stunnel (the global options,
// then service, the service's own) and starts it in the foreground.
func startRelay(ctx context.Context, bin, dir, side, addr, service string) (*relay, error) {
	logPath := filepath.Join(dir, "stunnel-"+side+".log")
	conf := fmt.Sprintf(`foreground = yes
pid =
syslog = no
output = %s
debug = warning

[bench]
sslVersionMin = TLSv1.3
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
%s`, logPath, service)
	confPath := filepath.Join(dir, "stunnel-"+side+".conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, confPath)
	// Should the orchestrator die, the relay dies with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("bench: start stunnel (%s side): %w", side, err)
	}
	r := &relay{cmd: cmd, addr: addr, log: logPath, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(r.done)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return r, nil
		}
		select {
		case <-r.done:
			return nil, fmt.Errorf("bench: stunnel (%s side) exited: %s", side, tail(logPath))
		case <-ctx.Done():
			r.stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.stop()
			return nil, fmt.Errorf("bench: stunnel (%s side) does not accept on %s within 10 s: %s", side, addr, tail(logPath))
		}
	}
}

// stop ends the relay: SIGTERM, then SIGKILL after 5 seconds.
func (r *relay) stop() {
	if r == nil {
		return
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(5 * time.Second):
		r.cmd.Process.Kill()
		<-r.done
	}
}

// freePort returns a loopback address with a port that was free a moment
// ago (stunnel is told a port; it cannot report one it picked).
func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// tail returns the end of a log file, for an error.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no log)"
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}
