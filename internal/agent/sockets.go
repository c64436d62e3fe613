package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// socketPerm is who may connect to a socket the agent makes.
type socketPerm struct {
	mode     os.FileMode
	uid, gid int         // owner and group; -1 keeps the agent's
	dirMode  os.FileMode // for a folder the agent makes
}

// listenUnix listens on a Unix socket at path with the given permissions.
// The socket's folder is made if missing; an existing folder must belong to
// the agent's user and be writable by it alone, so nobody else can swap the
// socket. A stale socket from an agent that died is replaced; a live one is
// an error.
func listenUnix(path string, perm socketPerm) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, perm.dirMode); err != nil {
		return nil, err
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", dir)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("directory %s belongs to uid %d, not the agent's uid %d", dir, sys.Uid, os.Geteuid())
	}
	if st.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("directory %s has mode %04o: it must not be writable by group or others", dir, uint32(st.Mode().Perm()))
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by a running process (another agent?)", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	// The socket is created with the umask applied: make it private from
	// the start, then widen it to mode, so no one connects in between.
	umaskMu.Lock() // the umask is the process's: two agents of one process must not interleave
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false) // the agent removes it after serving ends
	// Group, mode, then owner: only the owner may change the mode (without
	// CAP_FOWNER, which an agent that is not root lacks: a service gets
	// CAP_CHOWN alone), so the mode is set while the agent still owns the
	// socket; and a group the config names is set first, so that the
	// mode's group bits never reach the agent's own group meanwhile. At
	// each step nobody can connect whom the final owner, group and mode
	// would not let in, but the agent's own uid.
	fail := func(err error) (*net.UnixListener, error) {
		ln.Close()
		os.Remove(path)
		return nil, err
	}
	if perm.gid >= 0 {
		if err := os.Lchown(path, -1, perm.gid); err != nil {
			return fail(err)
		}
	}
	if err := os.Chmod(path, perm.mode); err != nil {
		return fail(err)
	}
	if perm.uid >= 0 {
		if err := os.Lchown(path, perm.uid, -1); err != nil {
			return fail(err)
		}
	}
	return ln, nil
}

// umaskMu serializes listenUnix's change of the process's umask.
var umaskMu sync.Mutex

// peerUID returns the uid of the process at the other end of c, as the
// kernel recorded it at connect (SO_PEERCRED): one getsockopt, nothing read
// from the process, so it is cheap enough to run before anything else.
func peerUID(c *net.UnixConn) (uint32, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("peer credentials: %w", err)
	}
	if cerr != nil {
		return 0, fmt.Errorf("peer credentials: getsockopt SO_PEERCRED: %w", cerr)
	}
	return cred.Uid, nil
}
