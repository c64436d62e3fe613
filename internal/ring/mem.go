package ring

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Memory shared with a process is a memfd sealed against shrinking and
// growing before it is handed over: a process that could truncate it would
// make the agent's next access to a page past the end die of SIGBUS. A
// process can still punch holes in it (fallocate), which reads back as
// zeros: garbage, which the index checks catch like any other.

// Mem is a mapped memfd.
type Mem struct {
	B []byte
}

// Create makes a sealed memfd of size bytes (a multiple of the page size)
// and maps it. It returns the mapping and the memfd, close-on-exec, for
// handing over; the caller closes it.
func Create(name string, size int) (*Mem, *os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, nil, os.NewSyscallError("memfd_create", err)
	}
	f := os.NewFile(uintptr(fd), name)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		f.Close()
		return nil, nil, os.NewSyscallError("ftruncate", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		f.Close()
		return nil, nil, os.NewSyscallError("fcntl(F_ADD_SEALS)", err)
	}
	m, err := mapFD(fd, size)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return m, f, nil
}

// Map maps a memfd received from the agent, checking that it is sealed
// against changes of size and is size bytes long.
func Map(f *os.File, size int) (*Mem, error) {
	fd := int(f.Fd())
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, os.NewSyscallError("fcntl(F_GET_SEALS)", err)
	}
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW; seals&want != want {
		return nil, fmt.Errorf("ring memory is not sealed against resizing (seals %#x)", seals)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, os.NewSyscallError("fstat", err)
	}
	if st.Size != int64(size) {
		return nil, fmt.Errorf("ring memory of %d bytes, want %d", st.Size, size)
	}
	return mapFD(fd, size)
}

func mapFD(fd, size int) (*Mem, error) {
	b, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, os.NewSyscallError("mmap", err)
	}
	return &Mem{B: b}, nil
}

// Unmap unmaps the memory; it must not be used after.
func (m *Mem) Unmap() error {
	if m == nil || m.B == nil {
		return nil
	}
	err := unix.Munmap(m.B)
	m.B = nil
	return err
}

// Release gives back the pages of b (page aligned, within the mapping):
// they are freed, and read back as zeros.
func Release(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return os.NewSyscallError("madvise(MADV_REMOVE)", unix.Madvise(b, unix.MADV_REMOVE))
}
