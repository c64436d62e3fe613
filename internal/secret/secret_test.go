package secret

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
)

func testArena(t *testing.T, fallback bool) {
	forceFallback = fallback
	defer func() { forceFallback = false }()
	a, err := New(100, 64)
	if err != nil {
		t.Fatal(err)
	}
	want := MemfdSecret
	if fallback {
		want = Locked
	}
	if a.Protection() != want {
		t.Logf("protection %s (the kernel lacks memfd_secret?)", a.Protection())
		if !fallback && a.Protection() != Locked {
			t.Fatalf("protection %q", a.Protection())
		}
	}
	var slots [][]byte
	for range 100 {
		s, err := a.Alloc()
		if err != nil {
			t.Fatal(err)
		}
		if len(s) != 64 || !bytes.Equal(s, make([]byte, 64)) {
			t.Fatal("slot not zeroed or wrong size")
		}
		for i := range s {
			s[i] = 0xA5
		}
		slots = append(slots, s)
	}
	if _, err := a.Alloc(); !errors.Is(err, ErrFull) {
		t.Fatalf("101st slot: %v", err)
	}
	// Slots do not overlap.
	for i, s := range slots {
		s[0] = byte(i)
	}
	for i, s := range slots {
		if s[0] != byte(i) {
			t.Fatal("slots overlap")
		}
	}
	s := slots[7]
	a.Free(s)
	if !bytes.Equal(s, make([]byte, 64)) {
		t.Fatal("Free did not zero the slot")
	}
	s2, err := a.Alloc()
	if err != nil || &s2[0] != &s[0] {
		t.Fatal("a freed slot is not reused")
	}
	if total, free := a.Slots(); total != 100 || free != 0 {
		t.Fatalf("slots %d free %d", total, free)
	}
	// A slot freed after Close (a key retired late) is left alone.
	late := slots[3]
	a.Close()
	a.Free(late)
	// The region is locked (and, for memfd_secret, not in the direct map):
	// /proc/self/smaps shows it locked.
	smaps, _ := os.ReadFile("/proc/self/smaps")
	if !strings.Contains(string(smaps), "Locked:") {
		t.Skip("no smaps")
	}
}

func TestArenaMemfdSecret(t *testing.T)    { testArena(t, false) }
func TestArenaLockedFallback(t *testing.T) { testArena(t, true) }

// TestMemlockBound: an arena larger than RLIMIT_MEMLOCK is refused with an
// error that says so, and Fit says how many slots fit.
func TestMemlockBound(t *testing.T) {
	n := Fit(64, 0)
	if n >= 1<<30 {
		t.Skip("RLIMIT_MEMLOCK is unlimited here")
	}
	if n <= 0 {
		t.Fatalf("Fit = %d", n)
	}
	a, err := New(n, 64)
	if err != nil {
		t.Fatalf("an arena of Fit's %d slots: %v", n, err)
	}
	a.Close()
	if os.Geteuid() == 0 {
		t.Skip("root has CAP_IPC_LOCK: the kernel does not hold it to RLIMIT_MEMLOCK")
	}
	if _, err := New(n*2+1000, 64); err == nil || !strings.Contains(err.Error(), "RLIMIT_MEMLOCK") {
		t.Fatalf("an arena past the limit: %v", err)
	}
}
