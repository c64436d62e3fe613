package buildinfo

import (
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

func TestFromBuildInfo(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "sinc.dev/sinc", Version: "v1.2.0"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "e05cfeab60103c09e2185ea875785b18bc0aedbe"},
			{Key: "vcs.time", Value: "2026-12-06T01:14:45Z"}, {Key: "vcs.modified", Value: "true"}, {Key: "GOOS", Value: "linux"}}}
	in := fromBuildInfo(bi)
	want := Info{Module: "sinc.dev/sinc", Version: "v1.2.0", Revision: "e05cfeab60103c09e2185ea875785b18bc0aedbe",
		Time: "2026-12-06T01:14:45Z", Modified: true, GoVersion: "go1.26.8"}
	if in != want {
		t.Fatalf("got %+v, want %+v", in, want)
	}
	if s := in.Short(); s != "v1.2.0-e05cfeab6010+modified" {
		t.Errorf("Short = %q", s)
	}
	for _, line := range []string{"sinc v1.2.0\n", "revision  e05cfeab60103c09e2185ea875785b18bc0aedbe (with uncommitted changes)\n",
		"committed 2026-12-06T01:14:45Z\n", "go        go1.26.8 "} {
		if !strings.Contains(in.String(), line) {
			t.Errorf("String() lacks %q:\n%s", line, in)
		}
	}

	// Without VCS stamping: the version alone, and the reason said.
	bare := fromBuildInfo(&debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Path: "sinc.dev/sinc", Version: "(devel)"}})
	if s := bare.Short(); s != "(devel)" {
		t.Errorf("Short without a revision = %q", s)
	}
	if !strings.Contains(bare.String(), "revision  unknown (built without VCS stamping") {
		t.Errorf("String() without a revision:\n%s", bare)
	}
}

func TestGetIsThisBinary(t *testing.T) {
	in := Get()
	if in.GoVersion != runtime.Version() {
		t.Errorf("GoVersion %q, running %q", in.GoVersion, runtime.Version())
	}
	if in.Module == "" || in.Version == "" {
		t.Errorf("empty fields: %+v", in)
	}
}
