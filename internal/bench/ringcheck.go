package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"
	"time"
)

// Which path a sinc transport's channels really take. A channel asks for
// a ring and the agent may still give it the socket path (it logs why), so
// the sinc-ring column is checked, not assumed: a process's end of a ring
// channel maps the channel's data memfd, which the agent names
// ringMemName (internal/agent/ring.go), and a channel on the socket path
// maps none. Each sinc transport is checked when its Env starts
// (checkPath), the idle measurement counts every channel it holds, and a
// run notes the channels the agents could give no ring (ringFallbacks).

// ringMemName is the name of a ring channel's data memfd, as
// /proc/PID/maps shows it.
const ringMemName = "/memfd:sinc-ring"

// ringFallbackLog is what an agent logs when a channel that asked for a
// ring gets the socket path.
const ringFallbackLog = "cannot make a channel's ring"

// ringMaps counts the ring data mappings of process pid: one per ring
// channel it holds.
func ringMaps(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return 0, err
	}
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		// address perms offset dev inode pathname (" (deleted)" after a
		// memfd's name)
		f := strings.Fields(sc.Text())
		if len(f) >= 6 && f[5] == ringMemName {
			n++
		}
	}
	return n, sc.Err()
}

// wantRings is how many ring channels tr's client and server each hold
// with n channels open.
func wantRings(tr string, n int) int {
	if usesRing(tr) {
		return n
	}
	return 0
}

// checkRings fails unless tr's client and server each map as many rings
// as n open channels of tr have.
func (e *Env) checkRings(tr string, n int) error {
	want := wantRings(tr, n)
	for _, role := range []struct {
		name string
		w    *worker
	}{{"client", e.clients[tr]}, {"server", e.servers[tr]}} {
		got, err := ringMaps(role.w.pid())
		if err != nil {
			return fmt.Errorf("bench: %s: rings of the %s: %w", tr, role.name, err)
		}
		if got != want {
			err := fmt.Errorf("bench: %s: the %s maps %d channel rings with %d channels open, want %d: %s", tr, role.name, got, n, want, pathName(tr))
			if got < want {
				err = fmt.Errorf("%w (the agents log why they gave no ring: their logs are in %s, kept with sinc bench --keep)", err, e.Dir)
			}
			return err
		}
	}
	return nil
}

func pathName(tr string) string {
	if usesRing(tr) {
		return "its channels are to go through rings"
	}
	return "its channels are to stay on their sockets"
}

// checkPath opens one channel of the sinc transport tr and checks that
// both of its ends take the path tr names, then closes it.
func (e *Env) checkPath(ctx context.Context, tr string) error {
	w, err := e.client(tr)
	if err != nil {
		return err
	}
	if _, err := e.call(ctx, tr, Command{Op: "idle", N: 1, Conc: 1, Timeout: 10 * time.Second}); err != nil {
		return err
	}
	if err := e.waitServer(ctx, tr, 1); err != nil {
		w.call(ctx, Command{Op: "release"})
		return err
	}
	err = e.checkRings(tr, 1)
	if _, rerr := w.call(ctx, Command{Op: "release"}); err == nil {
		err = rerr
	}
	if err == nil {
		err = e.waitServer(ctx, tr, 0)
	}
	return err
}

// ringFallbacks counts the channels for which the agents could not make
// a ring, so far.
func (e *Env) ringFallbacks() int {
	n := 0
	for _, p := range e.agents {
		b, err := os.ReadFile(p.Log)
		if err != nil {
			continue
		}
		n += bytes.Count(b, []byte(ringFallbackLog))
	}
	return n
}
