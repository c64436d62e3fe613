package main

import (
	"encoding/json"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"sinc.dev/sinc/internal/buildinfo"
	"sinc.dev/sinc/internal/cluster"
)

// TestVersion: sinc version and sinc --version print the same build
// information, the Go release that built the binary among it; the agent
// logs it at start and its sinc peers shows it.
func TestVersion(t *testing.T) {
	out := mustSinc(t, "version")
	if alt := mustSinc(t, "--version"); alt != out {
		t.Errorf("sinc --version:\n%s\nsinc version:\n%s", alt, out)
	}
	var in buildinfo.Info
	if err := json.Unmarshal([]byte(mustSinc(t, "version", "--json")), &in); err != nil {
		t.Fatal(err)
	}
	// The test binary built sinc with this toolchain.
	if in.GoVersion != runtime.Version() || in.Module != "sinc.dev/sinc" || in.Version == "" {
		t.Errorf("sinc version --json: %+v", in)
	}
	for _, want := range []string{"sinc " + in.Version + "\n", "module    sinc.dev/sinc\n", "go        " + runtime.Version(), "revision  "} {
		if !strings.Contains(out, want) {
			t.Errorf("sinc version lacks %q:\n%s", want, out)
		}
	}

	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web"}}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	procs := startAgents(t, c)
	n := c.Nodes["node-a"]
	if err := waitAgent(n); err != nil {
		t.Fatal(err)
	}
	peers := mustSinc(t, "peers", "--admin", n.Admin)
	if want := "peers of node-a (sinc " + in.Short() + ", " + in.GoVersion + "):"; !strings.HasPrefix(peers, want) {
		t.Errorf("sinc peers does not begin with %q:\n%s", want, peers)
	}
	log, _ := os.ReadFile(procs[0].Log)
	if want := `msg="agent started" node=node-a version=` + in.Version; !strings.Contains(string(log), want) {
		t.Errorf("agent log lacks %q:\n%s", want, log)
	}
}

// TestLogSettings: log_format and log_level in the config set the agent's
// log; --log-format and --log-level, when given, win over them.
func TestLogSettings(t *testing.T) {
	c, err := cluster.Make(shortTemp(t), []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web"},
		Top: "log_format = \"json\"\nlog_level = \"warn\""}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	for _, tc := range []struct {
		name    string
		args    []string
		json    bool // lines are JSON objects
		started bool // the info line "agent started" is written
	}{
		{"config alone", nil, true, false},
		{"flags win", []string{"--log-format", "text", "--log-level", "info"}, false, true},
		{"one flag, the other from the config", []string{"--log-level", "debug"}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.Remove(n.Dir + "/agent.log")
			p, err := cluster.StartWith(bin, n, nil, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if err := waitAgent(n); err != nil {
				t.Fatal(err)
			}
			// Garbage on the peer port: a warning, written at every level
			// here.
			conn, err := net.Dial("tcp", n.Listen)
			if err != nil {
				t.Fatal(err)
			}
			conn.Write([]byte("not a handshake"))
			conn.Close()
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if b, _ := os.ReadFile(p.Log); strings.Contains(string(b), "peer handshake failed") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("no warning for garbage on the peer port")
				}
			}
			if err := p.Stop(5 * time.Second); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(p.Log)
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			started := false
			for _, l := range lines {
				if l == "" {
					continue
				}
				var obj map[string]any
				isJSON := json.Unmarshal([]byte(l), &obj) == nil
				if isJSON != tc.json {
					t.Errorf("line %q: JSON %v, want %v", l, isJSON, tc.json)
				}
				if strings.Contains(l, "agent started") {
					started = true
				}
			}
			if started != tc.started {
				t.Errorf("\"agent started\" logged: %v, want %v; log:\n%s", started, tc.started, b)
			}
		})
	}
	// A bad flag is a usage error, whatever the config says.
	if _, errs, code := runSinc(t, "agent", "--config", n.Config, "--log-level", "loud"); code != 2 || !strings.Contains(errs, `--log-level: "loud" is not a log level`) {
		t.Errorf("bad --log-level: exit %d, %s", code, errs)
	}
}
