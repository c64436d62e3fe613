package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"sinc.dev/sinc"
)

// worker is a running `sinc bench-worker` process.
type worker struct {
	name    string
	cmd     *exec.Cmd
	in      io.WriteCloser
	lines   chan []byte   // its stdout, a line at a time; closed at its end
	done    chan struct{} // closed when it has exited
	quit    chan struct{} // closed by stop
	logPath string
	mu      sync.Mutex // one call at a time
	stopped sync.Once
}

// startWorker runs bin with args, its stderr going to logPath, and waits
// for its ready line.
func startWorker(ctx context.Context, bin, name, logPath string, args ...string) (*worker, Reply, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, Reply{}, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, append([]string{"bench-worker"}, args...)...)
	cmd.Stderr = logf
	cmd.Env = workerEnv()
	// Should the orchestrator die, its workers die with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, Reply{}, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, Reply{}, err
	}
	if err := cmd.Start(); err != nil {
		return nil, Reply{}, err
	}
	w := &worker{name: name, cmd: cmd, in: in, lines: make(chan []byte, 1), done: make(chan struct{}),
		quit: make(chan struct{}), logPath: logPath}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := bytes.Clone(sc.Bytes())
			select {
			case w.lines <- line:
			case <-w.quit:
			}
		}
		close(w.lines)
		cmd.Wait()
		close(w.done)
	}()
	rep, err := w.read(ctx, 20*time.Second)
	if err == nil && !rep.Ready {
		err = fmt.Errorf("first line is not ready: %+v", rep)
	}
	if err != nil {
		w.stop()
		return nil, Reply{}, fmt.Errorf("worker %s: %w", name, err)
	}
	return w, rep, nil
}

// workerEnv is the workers' environment: the orchestrator's without
// SINC_NO_RING, as each transport says itself which path its channels
// take (transport.go); the variable would turn sinc-ring into a second
// sinc-stream.
func workerEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, sinc.NoRingEnv+"=") })
}

func (w *worker) pid() int { return w.cmd.Process.Pid }

// read waits for the next reply line, at most timeout.
func (w *worker) read(ctx context.Context, timeout time.Duration) (Reply, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case line, ok := <-w.lines:
		if !ok {
			return Reply{}, fmt.Errorf("exited%s", w.logTail())
		}
		var rep Reply
		if err := json.Unmarshal(line, &rep); err != nil {
			return Reply{}, fmt.Errorf("bad reply %q: %w", line, err)
		}
		return rep, nil
	case <-t.C:
		return Reply{}, fmt.Errorf("no reply within %s%s", timeout, w.logTail())
	case <-ctx.Done():
		return Reply{}, ctx.Err()
	}
}

// call sends cmd and returns the reply; a reply with an error is an error.
func (w *worker) call(ctx context.Context, cmd Command) (Reply, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	b, _ := json.Marshal(cmd)
	if _, err := w.in.Write(append(b, '\n')); err != nil {
		return Reply{}, fmt.Errorf("worker %s: %w%s", w.name, err, w.logTail())
	}
	timeout := cmd.Timeout
	if timeout <= 0 {
		timeout = defaultTimeout
	}
	rep, err := w.read(ctx, timeout+10*time.Second)
	if err != nil {
		// A worker that does not answer is of no further use.
		w.kill()
		return Reply{}, fmt.Errorf("worker %s: %s: %w", w.name, cmd.Op, err)
	}
	if rep.Err != "" {
		return rep, fmt.Errorf("worker %s: %s: %s", w.name, cmd.Op, rep.Err)
	}
	return rep, nil
}

// logTail is the end of the worker's stderr, for error messages.
func (w *worker) logTail() string {
	b, err := os.ReadFile(w.logPath)
	if err != nil || len(bytes.TrimSpace(b)) == 0 {
		return ""
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return "; its stderr: " + strings.TrimSpace(string(b))
}

// stop asks the worker to quit (so that a CPU profile is written), then
// kills it if it has not gone within a few seconds.
func (w *worker) stop() {
	w.stopped.Do(func() {
		b, _ := json.Marshal(Command{Op: "quit"})
		w.in.Write(append(b, '\n'))
		w.in.Close()
		close(w.quit)
		select {
		case <-w.done:
		case <-time.After(5 * time.Second):
			w.cmd.Process.Kill()
			<-w.done
		}
	})
}

func (w *worker) kill() {
	w.cmd.Process.Kill()
}

// --- /proc ---

// clockTick is USER_HZ, the unit of /proc/PID/stat times (100 on Linux).
const clockTick = 10 * time.Millisecond

// cpuTime is the CPU time (user+system) a process has used: the sum of
// its threads' run time from /proc/PID/task/*/schedstat (nanoseconds),
// or, where that cannot be read, utime+stime of /proc/PID/stat (10 ms
// ticks).
func cpuTime(pid int) (time.Duration, error) {
	if d, err := schedTime(pid); err == nil {
		return d, nil
	}
	return statTime(pid)
}

func schedTime(pid int) (time.Duration, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "schedstat"))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue // the thread ended meanwhile
			}
			return 0, err
		}
		f := strings.Fields(string(b))
		if len(f) < 1 {
			return 0, fmt.Errorf("schedstat of %d: %q", pid, b)
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, err
		}
		sum += time.Duration(ns)
	}
	return sum, nil
}

func statTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat of %d: %q", pid, s)
	}
	f := strings.Fields(s[i+1:]) // from field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("stat of %d: %q", pid, s)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	st, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * clockTick, nil
}

// rss is a process's resident set size in bytes (VmRSS of
// /proc/PID/status).
func rss(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("VmRSS of %d: %q", pid, line)
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}
