package agent

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Confine makes this process a poor place to look for keys: not dumpable
// (no core dumps; /proc/PID/mem, environ and ptrace closed to other
// processes, same uid included, unless they hold CAP_SYS_PTRACE) and with
// a core size limit of zero. The agent calls it before it reads a key.
func Confine() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("PR_SET_DUMPABLE: %w", err)
	}
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{}); err != nil {
		return fmt.Errorf("RLIMIT_CORE: %w", err)
	}
	return nil
}
