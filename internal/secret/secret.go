// Package secret keeps key material where other processes, swap and core
// dumps cannot reach it.
//
// An Arena is one fixed-size region cut into equal slots. It is backed by
// memfd_secret(2) where the kernel offers it: such pages are locked, never
// swapped, left out of core dumps and removed from the kernel's direct map,
// so not even the kernel reads them by accident. Elsewhere the region is an
// anonymous mapping locked with mlock(2) and marked MADV_DONTDUMP. Either way
// it counts against RLIMIT_MEMLOCK, which bounds how many keys fit: size an
// arena with Fit.
//
// Slots are zeroed when freed. An Arena is safe for concurrent use.
package secret

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// Protection says how an arena's memory is kept.
type Protection string

const (
	MemfdSecret Protection = "memfd_secret"
	Locked      Protection = "mlock+dontdump"
)

// Arena is a region of protected memory cut into slots.
type Arena struct {
	mem  []byte
	slot int
	prot Protection

	mu   sync.Mutex
	free []int // free slot offsets, the last taken first (at start, the lowest)
	top  int   // end of the highest slot ever taken: past it, never written
}

// ErrFull is returned by Alloc when every slot is taken.
var ErrFull = errors.New("secret memory full")

// forceFallback makes New skip memfd_secret (tests).
var forceFallback = false

// New maps an arena of n slots of size bytes each.
func New(n, size int) (*Arena, error) {
	if n <= 0 || size <= 0 {
		return nil, fmt.Errorf("secret: bad arena of %d slots of %d bytes", n, size)
	}
	pg := unix.Getpagesize()
	total := (n*size + pg - 1) / pg * pg
	a := &Arena{slot: size}
	var err error
	if !forceFallback {
		a.mem, err = mapSecret(total)
		a.prot = MemfdSecret
	}
	if forceFallback || err != nil {
		a.mem, err = mapLocked(total)
		a.prot = Locked
	}
	if err != nil {
		return nil, fmt.Errorf("secret: %d bytes of protected memory: %w (RLIMIT_MEMLOCK bounds it)", total, err)
	}
	a.free = make([]int, 0, n)
	for i := n - 1; i >= 0; i-- {
		a.free = append(a.free, i*size)
	}
	return a, nil
}

func mapSecret(total int) ([]byte, error) {
	fd, err := unix.MemfdSecret(unix.O_CLOEXEC)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd) // the mapping keeps the memory
	if err := unix.Ftruncate(fd, int64(total)); err != nil {
		return nil, err
	}
	// Secret memory is locked by nature; the kernel charges it against
	// RLIMIT_MEMLOCK when it is mapped, so a mapping past the limit fails
	// here rather than on first use.
	return unix.Mmap(fd, 0, total, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
}

func mapLocked(total int) ([]byte, error) {
	mem, err := unix.Mmap(-1, 0, total, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, err
	}
	if err := unix.Mlock(mem); err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	if err := unix.Madvise(mem, unix.MADV_DONTDUMP); err != nil {
		unix.Munmap(mem)
		return nil, err
	}
	unix.Madvise(mem, unix.MADV_WIPEONFORK)
	return mem, nil
}

// Fit returns how many slots of size bytes fit in the memory this process
// may lock (RLIMIT_MEMLOCK), less reserve bytes kept for other uses.
func Fit(size, reserve int) int {
	var r unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &r); err != nil || r.Cur == unix.RLIM_INFINITY {
		return 1 << 30
	}
	avail := int(r.Cur) - reserve
	if avail <= 0 {
		return 0
	}
	pg := unix.Getpagesize()
	return avail / pg * pg / size
}

// Protection reports how the arena's memory is kept.
func (a *Arena) Protection() Protection { return a.prot }

// Slots returns the number of slots and how many are free.
func (a *Arena) Slots() (total, free int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return cap(a.free), len(a.free)
}

// Alloc returns a zeroed slot.
func (a *Arena) Alloc() ([]byte, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.free) == 0 {
		return nil, ErrFull
	}
	off := a.free[len(a.free)-1]
	a.free = a.free[:len(a.free)-1]
	a.top = max(a.top, off+a.slot)
	return a.mem[off : off+a.slot : off+a.slot], nil
}

// Free zeroes a slot from Alloc and returns it to the arena. After Close it
// does nothing: the memory is gone.
func (a *Arena) Free(b []byte) {
	if len(b) != a.slot {
		panic("secret: Free of a slice that is not a slot")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.mem == nil {
		return
	}
	off := int(uintptr(unsafePointer(b)) - uintptr(unsafePointer(a.mem)))
	if off < 0 || off >= len(a.mem) || off%a.slot != 0 {
		panic("secret: Free of a slice from another arena")
	}
	clear(b)
	a.free = append(a.free, off)
}

// Close zeroes and unmaps the arena. No slot may be used after.
func (a *Arena) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	// Only what was ever handed out: touching the rest would fault in
	// pages (costly for memfd_secret) only to zero them.
	clear(a.mem[:a.top])
	err := unix.Munmap(a.mem)
	a.mem, a.free = nil, nil
	return err
}
