// Package buildinfo says which build of sinc is running: the module
// version, the commit it was built from and the Go release, as the Go
// toolchain recorded them in the binary (runtime/debug.ReadBuildInfo).
//
// A binary built by `go install sinc.dev/sinc/cmd/sinc@vX` carries its
// module version; one built in a checkout carries "(devel)" and, when the
// go command stamped it (the default for a git clone; not with
// -buildvcs=false, nor in a git worktree, whose .git is a file), the
// revision, its commit time and whether the tree had uncommitted changes.
// Nothing here is secret: it is what `go version -m` prints of the binary.
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
)

// Unknown stands for a field the binary does not record.
const Unknown = "unknown"

// Info describes one build.
type Info struct {
	Module    string `json:"module"`             // the main module's path
	Version   string `json:"version"`            // its version, "(devel)" for a checkout build
	Revision  string `json:"revision,omitempty"` // the VCS revision, if stamped
	Time      string `json:"time,omitempty"`     // the revision's commit time (RFC 3339), if stamped
	Modified  bool   `json:"modified,omitempty"` // the tree had changes not committed
	GoVersion string `json:"go"`                 // the Go release that built it
}

var (
	once sync.Once
	info Info
)

// Get returns the running binary's build information.
func Get() Info {
	once.Do(func() {
		info = Info{Module: Unknown, Version: Unknown, GoVersion: runtime.Version()}
		bi, ok := debug.ReadBuildInfo()
		if !ok {
			return
		}
		info = fromBuildInfo(bi)
	})
	return info
}

// fromBuildInfo picks the fields of Info out of bi.
func fromBuildInfo(bi *debug.BuildInfo) Info {
	in := Info{Module: bi.Main.Path, Version: bi.Main.Version, GoVersion: bi.GoVersion}
	if in.Module == "" {
		in.Module = Unknown
	}
	if in.Version == "" {
		in.Version = Unknown
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.time":
			in.Time = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
}

// Short is the build in one token, for a log attribute or a table cell:
// the version, and the revision's first 12 digits (with "+modified") when
// the binary records one: "(devel)-e05cfeab6010+modified", "v1.2.0".
func (in Info) Short() string {
	s := in.Version
	if in.Revision != "" {
		s += "-" + in.Revision[:min(12, len(in.Revision))]
		if in.Modified {
			s += "+modified"
		}
	}
	return s
}

// String is the build as `sinc version` prints it, one field a line.
func (in Info) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "sinc %s\n", in.Version)
	fmt.Fprintf(&b, "module    %s\n", in.Module)
	if in.Revision == "" {
		b.WriteString("revision  unknown (built without VCS stamping: -buildvcs=false, a git worktree, or not from a clone)\n")
	} else {
		mod := ""
		if in.Modified {
			mod = " (with uncommitted changes)"
		}
		fmt.Fprintf(&b, "revision  %s%s\n", in.Revision, mod)
		if in.Time != "" {
			fmt.Fprintf(&b, "committed %s\n", in.Time)
		}
	}
	fmt.Fprintf(&b, "go        %s %s/%s\n", in.GoVersion, runtime.GOOS, runtime.GOARCH)
	return b.String()
}
