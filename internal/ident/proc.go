package ident

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// procDir is where procfs is mounted; tests point it elsewhere to show a
// made-up process.
var procDir = "/proc"

// stat is what this package reads from /proc/PID/stat (proc(5)).
type stat struct {
	State byte   // field 3: R, S, D, Z (zombie), X (dead), ...
	Start uint64 // field 22: start time in clock ticks after boot
}

// readStat reads /proc/PID/stat. A process that does not exist (any more)
// gives an error wrapping ErrExited.
func readStat(pid int32) (stat, error) {
	name := procDir + "/" + strconv.Itoa(int(pid)) + "/stat"
	b, err := os.ReadFile(name)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
		return stat{}, fmt.Errorf("read %s: %w", name, ErrExited)
	}
	if err != nil {
		return stat{}, fmt.Errorf("read %s: %w", name, err)
	}
	s, err := parseStat(b)
	if err != nil {
		return stat{}, fmt.Errorf("parse %s: %w", name, err)
	}
	return s, nil
}

// parseStat parses the contents of /proc/PID/stat. Field 2, the command
// name in parentheses, may itself hold spaces and parentheses, so fields are
// counted from the last ')'.
func parseStat(b []byte) (stat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return stat{}, errors.New("no ')' after the command name")
	}
	// Fields 3 onwards; fields[0] is field 3.
	fields := bytes.Fields(b[i+1:])
	const state, start = 3 - 3, 22 - 3
	if len(fields) <= start {
		return stat{}, fmt.Errorf("%d fields, want at least 22", len(fields)+2)
	}
	if len(fields[state]) != 1 {
		return stat{}, fmt.Errorf("bad state %q", fields[state])
	}
	st, err := strconv.ParseUint(string(fields[start]), 10, 64)
	if err != nil {
		return stat{}, fmt.Errorf("bad start time: %w", err)
	}
	return stat{State: fields[state][0], Start: st}, nil
}

// procAlive reports whether the process with this pid and start time runs,
// by /proc alone.
func procAlive(pid int32, start uint64) bool {
	s, err := readStat(pid)
	if err != nil {
		return false
	}
	return s.Start == start && s.State != 'Z' && s.State != 'X' && s.State != 'x'
}

// atClkTck is AT_CLKTCK from <elf.h>: the auxiliary vector entry holding
// sysconf(_SC_CLK_TCK), the kernel's USER_HZ.
const atClkTck = 17

// ClockTicks returns the number of clock ticks per second in which /proc
// reports times (sysconf(_SC_CLK_TCK), USER_HZ): taken from the auxiliary
// vector the kernel passed this process, or 100, Linux's USER_HZ on every
// common architecture, if it is not there.
func ClockTicks() uint64 { return clockTicks() }

var clockTicks = sync.OnceValue(func() uint64 {
	auxv, err := unix.Auxv()
	if err == nil {
		for _, kv := range auxv {
			if kv[0] == atClkTck && kv[1] > 0 {
				return uint64(kv[1])
			}
		}
	}
	return 100
})

// BootTimeTicks converts t to clock ticks since boot, the unit of the start
// time in /proc/PID/stat, rounding down as the kernel does. It measures
// from now on CLOCK_BOOTTIME, which is what the kernel stamps a process's
// start with, and goes back by time.Since(t), which uses t's monotonic
// clock reading when it has one (time.Now's results do). The monotonic
// clock stops during suspend, so across a suspend the result is later than
// the truth.
func BootTimeTicks(t time.Time) (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("clock_gettime(CLOCK_BOOTTIME): %w", err)
	}
	ns := ts.Nano() - int64(time.Since(t))
	if ns < 0 {
		return 0, fmt.Errorf("time %v is before boot", t)
	}
	return uint64(ns) / (uint64(time.Second) / ClockTicks()), nil
}
