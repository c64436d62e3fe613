package ring

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

var pg = os.Getpagesize()

// fdOf is f's descriptor, without os.File.Fd (which would make a pollable
// file blocking).
func fdOf(t testing.TB, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := rc.Control(func(u uintptr) { fd = int(u) }); err != nil {
		t.Fatal(err)
	}
	return fd
}

// TestCreateSealed: the memory Create hands over is sealed against
// shrinking and growing, and against any further seal, by every way a
// process holding the memfd could try: a process that shrank it would
// make the agent's next access past the end die of SIGBUS.
func TestCreateSealed(t *testing.T) {
	const size = 8 << 10
	m, f := mustCreate(t, "sealed", size)
	fd := fdOf(t, f)
	if len(m.B) != size {
		t.Fatalf("mapping of %d bytes, want %d", len(m.B), size)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; seals&want != want {
		t.Fatalf("seals %#x, want %#x among them", seals, want)
	}
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Fatalf("F_GETFD = %#x, %v: want close-on-exec", fl, err)
	}
	for i := range m.B {
		m.B[i] = byte(i)
	}

	// The process's ways in: the descriptor it was handed (the same open
	// file) and a new open of it through /proc.
	re, err := os.OpenFile(fmt.Sprintf("/proc/self/fd/%d", fd), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer re.Close()
	for name, pfd := range map[string]int{"handed": fd, "reopened": fdOf(t, re)} {
		for _, n := range []int64{0, size - int64(pg), size - 1, size + 1, 2 * size} {
			if err := unix.Ftruncate(pfd, n); !errors.Is(err, unix.EPERM) {
				t.Errorf("%s: ftruncate to %d = %v, want EPERM", name, n, err)
			}
		}
		if err := unix.Fallocate(pfd, 0, size, int64(pg)); !errors.Is(err, unix.EPERM) {
			t.Errorf("%s: fallocate past the end = %v, want EPERM", name, err)
		}
		if _, err := unix.FcntlInt(uintptr(pfd), unix.F_ADD_SEALS, unix.F_SEAL_WRITE); !errors.Is(err, unix.EPERM) {
			t.Errorf("%s: F_ADD_SEALS(F_SEAL_WRITE) = %v, want EPERM", name, err)
		}
		if _, err := unix.FcntlInt(uintptr(pfd), unix.F_ADD_SEALS, unix.F_SEAL_FUTURE_WRITE); !errors.Is(err, unix.EPERM) {
			t.Errorf("%s: F_ADD_SEALS(F_SEAL_FUTURE_WRITE) = %v, want EPERM", name, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Size != size {
		t.Fatalf("size %d, %v after the attempts, want %d", st.Size, err, size)
	}
	// Every byte is still there: touching the last page would have died
	// of SIGBUS had a shrink gone through.
	for i := range m.B {
		if m.B[i] != byte(i) {
			t.Fatalf("byte %d = %#x, want %#x", i, m.B[i], byte(i))
		}
	}
	m.B[size-1] = 1
}

// TestPunchHole: a process can still punch holes in the memory; they read
// back as zeros, without SIGBUS, and what the agent's side makes of them
// is a zero-length record, ErrCorrupt, or (a hole in the header page:
// words of generation 0) ErrEnded, never a crash.
func TestPunchHole(t *testing.T) {
	s := newSlot(t)
	p, c := s.pair(Up)
	a, b := payload(1, 5000), payload(2, 3000)
	p.Put(5, a) // [0, 5004): its payload runs into the second page
	p.Put(6, b) // [5004, 8008): its header in the second page
	publish(t, p)
	mustAvail(t, c, 8008)

	// The process punches out the data's second page.
	if err := unix.Fallocate(fdOf(t, s.dataF), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(pg), int64(pg)); err != nil {
		t.Fatalf("fallocate(PUNCH_HOLE): %v", err)
	}
	for i := range pg {
		if s.data[Up][pg+i] != 0 {
			t.Fatalf("byte %d of the hole = %#x, want 0", pg+i, s.data[Up][pg+i])
		}
	}
	typ, n, err := c.Next()
	if err != nil || typ != 5 || n != 5000 {
		t.Fatalf("Next = %d, %d, %v; want 5, 5000, nil (its header is outside the hole)", typ, n, err)
	}
	got := make([]byte, n)
	c.Read(got, 0)
	want := append(append([]byte(nil), a[:pg-RecordHeaderLen]...), make([]byte, n-(pg-RecordHeaderLen))...)
	if i := firstDiff(got, want); i < n {
		t.Fatalf("payload byte %d = %#x, want %#x (zero past the hole's start)", i, got[i], want[i])
	}
	c.Skip(RecordHeaderLen + n)
	// The next header is in the hole: a record of type 0, empty.
	if typ, n, err := c.Next(); err != nil || typ != 0 || n != 0 {
		t.Fatalf("Next in the hole = %d, %d, %v; want 0, 0, nil", typ, n, err)
	}
	// Taking what is left of the published bytes, record by record, ends
	// in records or ErrCorrupt, never a panic.
	for c.Buffered() > 0 {
		_, n, err := c.Next()
		if err != nil {
			wantCorrupt(t, err, "")
			break
		}
		c.Read(got[:n], 0)
		c.Skip(RecordHeaderLen + n)
	}
	release(t, c)
	if free, err := p.Free(); err != nil || free < MinSize-8008+5004 {
		t.Fatalf("Free = %d, %v; want the consumed room back", free, err)
	}

	// The process punches out the header page: every word reads zero, a
	// word of generation 0, not the slot's: both sides learn their ring
	// ended, and neither writes over the hole.
	if err := unix.Fallocate(fdOf(t, s.hdrF), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, int64(pg)); err != nil {
		t.Fatalf("fallocate(PUNCH_HOLE): %v", err)
	}
	if h := atomic.LoadUint64(ctlOf(s.hdr, Up).head); h != 0 {
		t.Fatalf("head = %d after the hole, want 0", h)
	}
	if n, err := c.Avail(); n != 0 || !errors.Is(err, ErrEnded) {
		t.Fatalf("Avail = %d, %v; want 0, ErrEnded", n, err)
	}
	if n, err := p.Free(); n != 0 || !errors.Is(err, ErrEnded) {
		t.Fatalf("Free = %d, %v; want 0, ErrEnded", n, err)
	}
	p.Put(0, nil)
	if _, err := p.Publish(); !errors.Is(err, ErrEnded) {
		t.Fatalf("Publish = %v, want ErrEnded", err)
	}
	if h := atomic.LoadUint64(ctlOf(s.hdr, Up).head); h != 0 {
		t.Fatalf("head = %#x after Publish, want the hole's 0 left alone", h)
	}
}

// TestMapRefuses: the process maps only memory sealed against resizing
// and of the size it was told.
func TestMapRefuses(t *testing.T) {
	memfd := func(flags, seals int) *os.File {
		fd, err := unix.MemfdCreate("m", unix.MFD_CLOEXEC|flags)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "m")
		t.Cleanup(func() { f.Close() })
		if err := unix.Ftruncate(fd, 4096); err != nil {
			t.Fatal(err)
		}
		if seals != 0 {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
				t.Fatal(err)
			}
		}
		return f
	}
	tmp, err := os.CreateTemp(t.TempDir(), "notmemfd")
	if err != nil {
		t.Fatal(err)
	}
	defer tmp.Close()
	tmp.Truncate(4096)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()

	for _, tc := range []struct {
		name string
		f    *os.File
		want string
	}{
		{"unsealed", memfd(unix.MFD_ALLOW_SEALING, 0), "not sealed against resizing"},
		{"no sealing", memfd(0, 0), "not sealed against resizing"},
		{"shrink only", memfd(unix.MFD_ALLOW_SEALING, unix.F_SEAL_SHRINK), "not sealed against resizing"},
		{"grow only", memfd(unix.MFD_ALLOW_SEALING, unix.F_SEAL_GROW), "not sealed against resizing"},
		{"a file", tmp, "F_GET_SEALS"},
		{"a pipe", pr, "F_GET_SEALS"},
	} {
		m, err := Map(tc.f, 4096)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Map = %v, %v; want an error saying %q", tc.name, m, err, tc.want)
		}
	}

	// Sealed, of the wrong size either way.
	_, f := mustCreate(t, "s", 8192)
	for _, size := range []int{4096, 8191, 8193, 16384} {
		if m, err := Map(f, size); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("ring memory of 8192 bytes, want %d", size)) {
			t.Errorf("Map(%d) of 8192 bytes = %v, %v; want the size error", size, m, err)
		}
	}

	// Sealed against both (not against further seals), of the right size:
	// taken, and shared with its maker.
	ok := memfd(unix.MFD_ALLOW_SEALING, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW)
	m1, err := Map(ok, 4096)
	if err != nil {
		t.Fatalf("Map of a sealed memfd: %v", err)
	}
	defer m1.Unmap()
	m2, err := Map(ok, 4096)
	if err != nil {
		t.Fatal(err)
	}
	m1.B[4095] = 42
	if m2.B[4095] != 42 {
		t.Fatal("two mappings do not share the memory")
	}
	if err := m2.Unmap(); err != nil || m2.B != nil {
		t.Fatalf("Unmap = %v, B = %v", err, m2.B)
	}
	if err := m2.Unmap(); err != nil {
		t.Fatalf("second Unmap = %v", err)
	}
}

// TestReleaseFreesPages: Release gives back the pages of a range: they
// leave memory, for every mapping of it, and read back as zeros; the rest
// stays.
func TestReleaseFreesPages(t *testing.T) {
	const pages = 64
	m, f := mustCreate(t, "r", pages*pg)
	other, err := Map(f, pages*pg)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Unmap()
	resident := func(b []byte) int {
		t.Helper()
		n, err := Resident(b)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := resident(m.B); n != 0 {
		t.Fatalf("%d pages resident before any was touched", n)
	}
	for i := range m.B {
		m.B[i] = byte(i%251 + 1)
	}
	if n := resident(m.B); n != pages {
		t.Fatalf("%d pages resident after all were touched, want %d", n, pages)
	}
	lo, hi := 16*pg, 48*pg
	if err := Release(m.B[lo:hi]); err != nil {
		t.Fatal(err)
	}
	for _, b := range [][]byte{m.B, other.B} {
		if n := resident(b[lo:hi]); n != 0 {
			t.Fatalf("%d of the %d pages released are resident", n, (hi-lo)/pg)
		}
		if n := resident(b[:lo]) + resident(b[hi:]); n != 32 {
			t.Fatalf("%d pages outside the range resident, want 32", n)
		}
	}
	for i, v := range m.B {
		want := byte(i%251 + 1)
		if i >= lo && i < hi {
			want = 0
		}
		if v != want {
			t.Fatalf("byte %d = %#x, want %#x", i, v, want)
		}
	}
	if err := Release(nil); err != nil {
		t.Fatalf("Release(nil) = %v", err)
	}
	if err := Release(m.B[1:pg]); err == nil || !strings.Contains(err.Error(), "madvise") {
		t.Fatalf("Release of an unaligned range = %v, want the madvise error", err)
	}
}

// TestResidentEmpty: Resident of no bytes is no pages, as Release of no
// bytes is nothing.
func TestResidentEmpty(t *testing.T) {
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("Resident(nil) panicked: %v", r)
		}
	}()
	if n, err := Resident(nil); n != 0 || err != nil {
		t.Fatalf("Resident(nil) = %d, %v; want 0, nil", n, err)
	}
}
