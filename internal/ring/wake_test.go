package ring

import (
	"errors"
	"io"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// In these tests the agent holds a Waker or a Sleeper, and the process the
// pipe's other end, as a raw descriptor it may do anything with.

// waker returns a Waker on a new pipe, and the process's read end.
func waker(t testing.TB) (*Waker, int) {
	t.Helper()
	r, w, err := NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	wk, err := NewWaker(w)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		wk.Close()
		unix.Close(r)
	})
	return wk, r
}

// sleeper returns a Sleeper on a new pipe, and the process's write end.
func sleeper(t testing.TB) (*Sleeper, int) {
	t.Helper()
	r, w, err := NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSleeper(r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		unix.Close(w)
	})
	return s, w
}

// within runs f and fails the test if it does not return within d.
func within(t testing.TB, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
	}
}

// pending is the bytes waiting in a pipe (TIOCINQ is FIONREAD).
func pending(t testing.TB, fd int) int {
	t.Helper()
	n, err := unix.IoctlGetInt(fd, unix.TIOCINQ)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func setBlocking(t testing.TB, fd int) {
	t.Helper()
	if err := unix.SetNonblock(fd, false); err != nil {
		t.Fatal(err)
	}
	if fl, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); fl&unix.O_NONBLOCK != 0 {
		t.Fatalf("fd %d is still non-blocking", fd)
	}
}

// fill wakes until the pipe, shrunk to a page by the process, is full.
func fill(t testing.TB, w *Waker, r int) {
	t.Helper()
	if _, err := unix.FcntlInt(uintptr(r), unix.F_SETPIPE_SZ, pg); err != nil {
		t.Fatal(err)
	}
	for i := range pg {
		if err := w.Wake(); err != nil {
			t.Fatalf("Wake %d: %v", i, err)
		}
	}
	if n := pending(t, r); n != pg {
		t.Fatalf("%d wake-ups pending in a pipe of %d", n, pg)
	}
}

func TestNewPipe(t *testing.T) {
	r, w, err := NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(r)
	defer unix.Close(w)
	for _, fd := range []int{r, w} {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		if err != nil || fl&unix.O_NONBLOCK == 0 {
			t.Errorf("fd %d: F_GETFL = %#x, %v; want O_NONBLOCK", fd, fl, err)
		}
		fdfl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err != nil || fdfl&unix.FD_CLOEXEC == 0 {
			t.Errorf("fd %d: F_GETFD = %#x, %v; want FD_CLOEXEC", fd, fdfl, err)
		}
	}
	// Two open files, not one: flags set on one end are not the other's.
	setBlocking(t, r)
	if fl, _ := unix.FcntlInt(uintptr(w), unix.F_GETFL, 0); fl&unix.O_NONBLOCK == 0 {
		t.Fatal("clearing O_NONBLOCK on the read end cleared it on the write end")
	}
}

// TestWakeWait: wake-ups reach the sleeper; pending ones are all taken by
// one Wait or Poll.
func TestWakeWait(t *testing.T) {
	r, w, err := NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	wk, err := NewWaker(w)
	if err != nil {
		t.Fatal(err)
	}
	defer wk.Close()
	s, err := NewSleeper(r)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.File() == nil {
		t.Fatal("File = nil")
	}
	short := func() error {
		s.SetDeadline(time.Now().Add(30 * time.Millisecond))
		defer s.SetDeadline(time.Time{})
		return s.Wait()
	}

	for range 5 {
		if err := wk.Wake(); err != nil {
			t.Fatal(err)
		}
	}
	within(t, time.Second, "Wait with wake-ups pending", func() {
		if err := s.Wait(); err != nil {
			t.Errorf("Wait = %v", err)
		}
	})
	if err := short(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait after all were taken = %v, want the deadline", err)
	}

	wk.Wake()
	if err := s.Poll(); err != nil {
		t.Fatal(err)
	}
	if err := short(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait after Poll took the wake-up = %v, want the deadline", err)
	}

	// A Wait in progress is woken.
	go func() {
		time.Sleep(20 * time.Millisecond)
		wk.Wake()
	}()
	within(t, 2*time.Second, "Wait for a wake-up", func() {
		if err := s.Wait(); err != nil {
			t.Errorf("Wait = %v", err)
		}
	})
}

// TestWaitDeadline: Wait gives up at its deadline, with the deadline's
// error.
func TestWaitDeadline(t *testing.T) {
	s, _ := sleeper(t)
	start := time.Now()
	s.SetDeadline(start.Add(100 * time.Millisecond))
	var err error
	within(t, 2*time.Second, "Wait with a deadline", func() { err = s.Wait() })
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait = %v, want os.ErrDeadlineExceeded", err)
	}
	if d := time.Since(start); d < 90*time.Millisecond {
		t.Fatalf("Wait returned after %v, before its deadline", d)
	}
	// A deadline already past: at once.
	within(t, time.Second, "Wait past its deadline", func() { err = s.Wait() })
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait = %v, want os.ErrDeadlineExceeded", err)
	}
}

// TestWakeFullPipe: a process that never takes its wake-ups fills the
// pipe; the agent's Wake then returns at once, without error: the
// wake-ups waiting are enough.
func TestWakeFullPipe(t *testing.T) {
	wk, r := waker(t)
	fill(t, wk, r)
	within(t, time.Second, "1000 Wakes on a full pipe", func() {
		for i := range 1000 {
			if err := wk.Wake(); err != nil {
				t.Errorf("Wake %d on a full pipe = %v, want nil", i, err)
				return
			}
		}
	})
	if n := pending(t, r); n != pg {
		t.Fatalf("%d pending, want %d", n, pg)
	}
	// A wake-up is still there for the process to take.
	var b [1]byte
	if n, err := unix.Read(r, b[:]); n != 1 || err != nil || b[0] == 0 {
		t.Fatalf("read = %d, %v, %d; want a wake-up token", n, err, b[0])
	}
}

// TestWakeReaderClosed: a process that closed its end (or died) makes Wake
// fail with EPIPE, at once, and does not kill the agent with SIGPIPE.
func TestWakeReaderClosed(t *testing.T) {
	wk, r := waker(t)
	unix.Close(r)
	within(t, time.Second, "Wake to a closed pipe", func() {
		for range 3 {
			err := wk.Wake()
			if !errors.Is(err, unix.EPIPE) {
				t.Errorf("Wake = %v, want EPIPE", err)
				return
			}
		}
	})
	wk.Close()
	if err := wk.Wake(); err == nil {
		t.Fatal("Wake after Close = nil, want an error")
	}
}

// TestWaitEOF: a sleeper whose waker's end is closed (the other side ended
// or died) reads end of file, and keeps reading it.
func TestWaitEOF(t *testing.T) {
	t.Run("waker closed", func(t *testing.T) {
		s, w := sleeper(t)
		unix.Close(w)
		s.SetDeadline(time.Now().Add(2 * time.Second))
		for range 3 {
			if err := s.Wait(); err != io.EOF {
				t.Fatalf("Wait = %v, want io.EOF", err)
			}
		}
		if err := s.Poll(); err != io.EOF {
			t.Fatalf("Poll = %v, want io.EOF", err)
		}
	})
	t.Run("Waker closed with wake-ups pending", func(t *testing.T) {
		r, w, err := NewPipe()
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewSleeper(r)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		wk, err := NewWaker(w)
		if err != nil {
			t.Fatal(err)
		}
		wk.Wake()
		wk.Wake()
		wk.Close()
		s.SetDeadline(time.Now().Add(2 * time.Second))
		err1, err2 := s.Wait(), s.Wait()
		if err1 != nil && err1 != io.EOF || err2 != io.EOF {
			t.Fatalf("Waits = %v, %v; want nil or io.EOF, then io.EOF", err1, err2)
		}
	})
	t.Run("Poll", func(t *testing.T) {
		s, w := sleeper(t)
		unix.Write(w, make([]byte, 64))
		unix.Close(w)
		var err error
		for range 3 {
			if err = s.Poll(); err == io.EOF {
				break
			}
		}
		if err != io.EOF {
			t.Fatalf("Poll = %v, want io.EOF", err)
		}
		s.SetDeadline(time.Now().Add(2 * time.Second))
		if err := s.Wait(); err != io.EOF {
			t.Fatalf("Wait after Poll saw the end = %v, want io.EOF", err)
		}
	})
}

// TestWakerIgnoresProcessFlags: the process makes its read end blocking,
// on the descriptor it was given and on a duplicate; the agent's write end
// is another open file, so Wake on a full pipe still does not block.
func TestWakerIgnoresProcessFlags(t *testing.T) {
	wk, r := waker(t)
	dup, err := unix.Dup(r)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dup)
	setBlocking(t, r)
	setBlocking(t, dup)
	fill(t, wk, r)
	within(t, time.Second, "Wake on a full pipe whose read end is blocking", func() {
		for range 100 {
			if err := wk.Wake(); err != nil {
				t.Errorf("Wake = %v", err)
				return
			}
		}
	})
}

// TestWakerOnBlockingFD: NewWaker makes its end non-blocking, whatever it
// was given, so Wake on a full pipe does not block.
func TestWakerOnBlockingFD(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	wk, err := NewWaker(p[1])
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		// Unblock a Wake that hung, before closing its end.
		unix.Close(p[0])
		wk.Close()
	}()
	fill(t, wk, p[0])
	within(t, time.Second, "Wake on a full pipe given blocking", func() {
		if err := wk.Wake(); err != nil {
			t.Errorf("Wake = %v", err)
		}
	})
}

// TestSleeperOnBlockingFD: NewSleeper makes its end non-blocking and
// pollable, whatever it was given: Poll of an empty pipe returns, and Wait
// honours its deadline.
func TestSleeperOnBlockingFD(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	s, err := NewSleeper(p[0])
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		unix.Close(p[1]) // unblocks a read that hung
		s.Close()
	}()
	within(t, time.Second, "Poll of an empty pipe given blocking", func() {
		if err := s.Poll(); err != nil {
			t.Errorf("Poll = %v", err)
		}
	})
	s.SetDeadline(time.Now().Add(50 * time.Millisecond))
	within(t, 2*time.Second, "Wait with a deadline on a pipe given blocking", func() {
		if err := s.Wait(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("Wait = %v, want os.ErrDeadlineExceeded", err)
		}
	})
}

// TestPollNeverBlocks: Poll returns at once, with nothing pending, with
// exactly a read's worth pending (the read after it finds nothing), and
// with the process's end made blocking.
func TestPollNeverBlocks(t *testing.T) {
	s, w := sleeper(t)
	within(t, time.Second, "Poll of an empty pipe", func() {
		for range 100 {
			if err := s.Poll(); err != nil {
				t.Errorf("Poll = %v", err)
				return
			}
		}
	})
	setBlocking(t, w)
	for _, n := range []int{1, 63, 64, 128, 512} {
		if _, err := unix.Write(w, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
		within(t, time.Second, "Poll", func() {
			if err := s.Poll(); err != nil {
				t.Errorf("Poll = %v", err)
			}
		})
		s.SetDeadline(time.Now().Add(20 * time.Millisecond))
		if err := s.Wait(); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%d bytes pending: Wait after Poll = %v, want the deadline: Poll took them all", n, err)
		}
		s.SetDeadline(time.Time{})
	}
}

// TestWaitDrainBounded: a process that writes without end into its
// wake-up pipe does not hold Wait or Poll: each takes a bounded amount
// and returns.
func TestWaitDrainBounded(t *testing.T) {
	s, w := sleeper(t)
	// A full pipe: one Wait takes some, not all of it.
	for {
		if _, err := unix.Write(w, make([]byte, 4096)); err != nil {
			break
		}
	}
	r := fdOf(t, s.File())
	full := pending(t, r)
	within(t, time.Second, "Wait on a full pipe", func() {
		if err := s.Wait(); err != nil {
			t.Errorf("Wait = %v", err)
		}
	})
	took := full - pending(t, r)
	if took <= 0 || took > 4096 {
		t.Fatalf("one Wait took %d of %d bytes pending: want some, and a bounded amount", took, full)
	}
	within(t, time.Second, "Poll on a full pipe", func() { s.Poll() })
	if left := pending(t, r); left < full-2*4096 {
		t.Fatalf("Wait and Poll took %d of %d bytes", full-left, full)
	}

	// A writer that never stops.
	var stop atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 4096)
		for !stop.Load() {
			if _, err := unix.Write(w, b); err != nil {
				runtime.Gosched()
			}
		}
	}()
	within(t, 2*time.Second, "200 Waits against a writer without end", func() {
		for range 200 {
			if err := s.Wait(); err != nil {
				t.Errorf("Wait = %v", err)
				return
			}
			s.Poll()
		}
	})
	stop.Store(true)
	<-done
}

// TestWakeFD: a wake-up written on a bare descriptor reaches the reader;
// on a full pipe it returns at once, without error; with the reader gone,
// it fails with EPIPE.
func TestWakeFD(t *testing.T) {
	r, w, err := NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(w)
	if err := WakeFD(w); err != nil {
		t.Fatal(err)
	}
	if n := pending(t, r); n != 1 {
		t.Fatalf("%d bytes pending after a wake-up, want 1", n)
	}
	if _, err := unix.FcntlInt(uintptr(r), unix.F_SETPIPE_SZ, pg); err != nil {
		t.Fatal(err)
	}
	setBlocking(t, r) // the process's end: its flags are not the waker's
	within(t, time.Second, "WakeFD until and past a full pipe", func() {
		for i := range pg + 100 {
			if err := WakeFD(w); err != nil {
				t.Errorf("WakeFD %d: %v", i, err)
				return
			}
		}
	})
	if n := pending(t, r); n != pg {
		t.Fatalf("%d bytes pending, want a full pipe of %d", n, pg)
	}
	unix.Close(r)
	within(t, time.Second, "WakeFD with the reader gone", func() {
		if err := WakeFD(w); !errors.Is(err, unix.EPIPE) {
			t.Errorf("WakeFD = %v, want EPIPE", err)
		}
	})
	if err := WakeFD(-1); !errors.Is(err, unix.EBADF) {
		t.Fatalf("WakeFD(-1) = %v, want EBADF", err)
	}
}

// TestDrainFD: a drain takes what is pending, a bounded amount of it, and
// never waits: on an empty pipe, on exactly a read's worth, and against a
// writer that does not stop; it reports the writer's end closed.
func TestDrainFD(t *testing.T) {
	r, w, err := NewPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(r)
	setBlocking(t, w) // the process's end
	within(t, time.Second, "DrainFD", func() {
		for _, n := range []int{0, 1, 63, 64, 128, 512} {
			if n > 0 {
				if _, err := unix.Write(w, make([]byte, n)); err != nil {
					t.Error(err)
					return
				}
			}
			if eof, err := DrainFD(r); eof || err != nil {
				t.Errorf("%d pending: DrainFD = %v, %v; want false, nil", n, eof, err)
			}
			if left := pending(t, r); left != 0 {
				t.Errorf("%d pending: %d left after a drain", n, left)
			}
		}
	})

	// A full pipe: one drain takes a bounded part of it.
	if err := unix.SetNonblock(w, true); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := unix.Write(w, make([]byte, 4096)); err != nil {
			break
		}
	}
	full := pending(t, r)
	if eof, err := DrainFD(r); eof || err != nil {
		t.Fatalf("DrainFD = %v, %v", eof, err)
	}
	if took := full - pending(t, r); took <= 0 || took > 4096 {
		t.Fatalf("one drain took %d of %d bytes: want some, and a bounded amount", took, full)
	}

	// The writer closes: the drain reads end of file, after what was left.
	unix.Close(w)
	eof := false
	within(t, time.Second, "DrainFD to the end", func() {
		for i := 0; i < full && !eof; i++ {
			if eof, err = DrainFD(r); err != nil {
				t.Errorf("DrainFD = %v", err)
				return
			}
		}
	})
	if !eof {
		t.Fatal("DrainFD never reported the writer's end closed")
	}
	if left := pending(t, r); left != 0 {
		t.Fatalf("%d bytes left at end of file", left)
	}
	if _, err := DrainFD(-1); !errors.Is(err, unix.EBADF) {
		t.Fatalf("DrainFD(-1) = %v, want EBADF", err)
	}
}
