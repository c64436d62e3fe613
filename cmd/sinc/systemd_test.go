package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"sinc.dev/sinc/internal/cert"
	"sinc.dev/sinc/internal/cluster"
)

// The shipped units: one agent a host, and the template for several.
const (
	unitPath     = "../../contrib/systemd/sinc-agent.service"
	templatePath = "../../contrib/systemd/sinc-agent@.service"
)

// systemdBinary finds systemd's manager, or "".
func systemdBinary() string {
	for _, p := range []string{"/usr/lib/systemd/systemd", "/lib/systemd/systemd"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// initScopes returns where a systemd started in a new cgroup namespace,
// from this process's cgroups, makes its init.scope: in the named systemd
// hierarchy and in the unified one (at /sys/fs/cgroup/unified or at
// /sys/fs/cgroup).
func initScopes() []string {
	b, _ := os.ReadFile("/proc/self/cgroup")
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) != 3 || strings.Contains(parts[2], "..") {
			continue
		}
		switch parts[1] {
		case "name=systemd":
			out = append(out, filepath.Join("/sys/fs/cgroup/systemd", parts[2], "init.scope"))
		case "":
			out = append(out, filepath.Join("/sys/fs/cgroup/unified", parts[2], "init.scope"),
				filepath.Join("/sys/fs/cgroup", parts[2], "init.scope"))
		}
	}
	return out
}

// skipOrFail skips the test with why outside CI, and fails it in CI
// (where .ci/run installs what it needs).
func skipOrFail(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(why)
	}
	t.Skip(why)
}

// TestSystemdUnit runs contrib/systemd/sinc-agent.service under a real
// systemd: the manager as PID 1 of new PID, mount, network, UTS, IPC and
// cgroup namespaces, seeing only this test's units (SYSTEMD_UNIT_PATH) and
// no generators. A drop-in changes only the binary's and config's paths
// (under PrivateTmp the test's /tmp is out of the agent's sight), the user
// (an existing test user), and where the output goes; every hardening
// option is the unit's. A check unit ordered after the agent (so started
// once the agent sent READY=1) then finds: the service active with the
// agent's status line, its user, CAP_CHOWN its only capability, no new
// privileges and a seccomp filter; keys in memfd_secret memory where the
// kernel has it (the filter lets memfd_secret through); a partition socket
// given to another owner; a channel that echoes; the metrics served;
// systemctl reload done (RELOADING=1, READY=1) with the service still
// active; systemctl stop a success, with the runtime folder gone.
// The template runs the same way as sinc-agent@node-a, its folders
// /run/sinc/node-a and /var/lib/sinc/node-a.
func TestSystemdUnit(t *testing.T) {
	t.Run("sinc-agent", func(t *testing.T) { testSystemdUnit(t, unitPath, "sinc-agent.service", "") })
	t.Run("sinc-agent@node-a", func(t *testing.T) {
		testSystemdUnit(t, templatePath, "sinc-agent@node-a.service", "node-a")
	})
}

// testSystemdUnit runs the unit file at path as unit name; instance is the
// template's instance ("" for none), which names the agent's folders.
func testSystemdUnit(t *testing.T, path, name, instance string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs systemd as PID 1 of its own namespaces")
	}
	sd := systemdBinary()
	if sd == "" {
		skipOrFail(t, "systemd is not installed (Debian package systemd): the unit is not run")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		skipOrFail(t, "unshare (util-linux) is not installed")
	}
	uid, gid := testUser(t, "sinc-e2e-agent")
	ub, _ := testUser(t, "sinc-e2e-b")
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web", "db"}}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	n := c.Nodes["node-a"]
	certPath, keyPath := cert.NodeFiles(n.Dir, "node-a")
	units := filepath.Join(dir, "units")
	out := filepath.Join(dir, "out")
	run := filepath.Join("/run/sinc", instance)       // RuntimeDirectory
	state := filepath.Join("/var/lib/sinc", instance) // StateDirectory
	etc := filepath.Join("/run/sdtest/etc", instance)
	file := filepath.Base(path)
	for _, d := range []string{units, out, filepath.Join(dir, "generators"), filepath.Join(units, file+".d"), filepath.Join(dir, "etc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	unit, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"units/" + file: string(unit),
		// The drop-in keeps the unit's %i: the template's config is
		// found by its instance name.
		"units/" + file + ".d/test.conf": fmt.Sprintf(`[Service]
ExecStart=
ExecStart=/run/sdtest/sinc agent --config /run/sdtest/etc/%s/agent.toml
User=%d
Group=%d
StandardOutput=append:%[4]s/agent.log
StandardError=append:%[4]s/agent.log
`, map[bool]string{true: "%i", false: "."}[instance != ""], uid, gid, out),
		"units/sdcheck.service": fmt.Sprintf(`[Unit]
Description=check the sinc agent under systemd
Wants=%[2]s
After=%[2]s
[Service]
Type=oneshot
ExecStart=/bin/bash /run/sdtest/check.sh
StandardOutput=append:%[1]s/check.log
StandardError=append:%[1]s/check.log
`, out, name),
		"units/sdtest.target": "[Unit]\nDescription=sinc systemd test\nWants=sdcheck.service\n",
		"etc/agent.toml": fmt.Sprintf(`node = "node-a"
cert = "node-a.crt"
key = "node-a.key"
ca = "ca.crt"
listen = "127.0.0.1:7701"
admin = "%[2]s/admin.sock"
state_dir = %[3]q
metrics = "127.0.0.1:9464"

[partitions.web]
socket = "%[2]s/web.sock"

[partitions.db]
socket = "%[2]s/db.sock"
mode = "0660"
owner = "%[1]d"

[[allow]]
from = "node-a/web"
to = "node-a/db/echo"
`, ub, run, state),
		// The check: each step's output, for the test to read.
		"check.sh": strings.NewReplacer("UNIT", name, "RUN", run, "STATE", state).Replace(`S=/run/sdtest/sinc
show() { systemctl show -p ActiveState,SubState,StatusText,Result,ExecMainStatus UNIT; }
echo "== started"; show
PID=$(systemctl show -p MainPID --value UNIT)
grep -E '^(Uid|CapEff|NoNewPrivs|Seccomp):' /proc/$PID/status
echo "== sockets"; stat -c '%n %u %a' RUN/*.sock STATE
echo "== channel"
$S listen echo --socket RUN/db.sock --exec cat & LP=$!
sleep 0.3
echo "hello through systemd" | $S dial node-a/db/echo --socket RUN/web.sock
kill $LP
echo "== metrics"
exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; grep -E '^sinc_(build_info|open_duration_seconds_count)' <&3; exec 3<&-
echo "== reload"; systemctl reload UNIT; echo "reload exit $?"; show
echo "== stop"; systemctl stop UNIT; echo "stop exit $?"; show
ls RUN 2>&1
echo "== done"
kill -s SIGRTMIN+14 1
`),
		// PID 1 of the new namespaces: a private copy of the mounts, a
		// tmpfs for /run and /var/lib (the unit's runtime and state
		// folders), then systemd.
		"inner.sh": fmt.Sprintf(`set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib
mkdir -p %[9]s
cp %[1]q /run/sdtest/sinc
cp %[2]q/check.sh /run/sdtest/
cp %[2]q/etc/agent.toml %[3]q %[4]q %[5]q %[9]s/
chmod 0755 /run/sdtest /run/sdtest/etc %[9]s
chown %[6]d:%[7]d %[9]s/node-a.key
export container=sinc-test SYSTEMD_UNIT_PATH=%[2]q/units SYSTEMD_GENERATOR_PATH=%[2]q/generators SYSTEMD_ENVIRONMENT_GENERATOR_PATH=%[2]q/generators
exec %[8]s --system --unit=sdtest.target --log-target=console --show-status=no
`, bin, dir, certPath, keyPath, filepath.Join(c.CADir, cert.CACertFile), uid, gid, sd, etc),
	}
	// The units every service depends on by default, as stubs: the test
	// boots nothing but its own.
	for _, stub := range []string{"sysinit.target", "basic.target", "multi-user.target", "network.target",
		"network-online.target", "shutdown.target", "sockets.target", "paths.target", "timers.target",
		"slices.target", "local-fs.target", "swap.target", "system.slice"} {
		files["units/"+stub] = "[Unit]\nDescription=stub\nDefaultDependencies=no\n"
	}
	for name, body := range files {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// systemd leaves its init.scope cgroup behind, under the cgroup it
	// was started in: removed after the run if the run made it.
	for _, d := range initScopes() {
		if _, err := os.Stat(d); os.IsNotExist(err) {
			t.Cleanup(func() { os.Remove(d) })
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--net",
		"--uts", "--ipc", "--cgroup", "--mount-proc", "/bin/bash", filepath.Join(dir, "inner.sh"))
	console, _ := cmd.CombinedOutput()
	check, _ := os.ReadFile(filepath.Join(out, "check.log"))
	agentLog, _ := os.ReadFile(filepath.Join(out, "agent.log"))
	if !strings.Contains(string(check), "== started") {
		skipOrFail(t, fmt.Sprintf("systemd did not come up in a namespace here (%v); console:\n%s", ctx.Err(), console))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("check:\n%s\nagent log:\n%s\nsystemd:\n%s", check, agentLog, console)
		}
	})
	section := func(name string) string {
		s := string(check)
		i := strings.Index(s, "== "+name+"\n")
		if i < 0 {
			t.Fatalf("the check has no section %q", name)
		}
		s = s[i+len(name)+4:]
		if j := strings.Index(s, "\n== "); j >= 0 {
			s = s[:j]
		}
		return s
	}
	expect := func(sec string, patterns ...string) {
		t.Helper()
		body := section(sec)
		for _, p := range patterns {
			if !regexp.MustCompile(`(?m)` + p).MatchString(body) {
				t.Errorf("%s: no line matches %q in:\n%s", sec, p, body)
			}
		}
	}
	expect("started", `^ActiveState=active$`, `^SubState=running$`, `^StatusText=serving: node node-a, 2 partitions`,
		fmt.Sprintf(`^Uid:\s+%d\s`, uid), `^CapEff:\s+0000000000000001$`, `^NoNewPrivs:\s+1$`, `^Seccomp:\s+2$`)
	expect("sockets", fmt.Sprintf(`^%s/admin.sock %d 600$`, run, uid), fmt.Sprintf(`^%s/db.sock %d 660$`, run, ub),
		fmt.Sprintf(`^%s/web.sock %d 600$`, run, uid), fmt.Sprintf(`^%s %d 700$`, state, uid))
	expect("channel", `^hello through systemd$`)
	expect("metrics", `^sinc_build_info\{.*node="node-a".*\} 1$`, `^sinc_open_duration_seconds_count 1$`)
	expect("reload", `^reload exit 0$`, `^ActiveState=active$`, `^StatusText=serving: `)
	expect("stop", `^stop exit 0$`, `^ActiveState=inactive$`, `^Result=success$`, `^ExecMainStatus=0$`, `No such file or directory`)
	// Keys in memfd_secret memory if this kernel offers it: the filter
	// lets it through.
	want := "key_memory=mlock+dontdump"
	if fd, err := unix.MemfdSecret(0); err == nil {
		unix.Close(fd)
		want = "key_memory=memfd_secret"
	}
	if !strings.Contains(string(agentLog), want) {
		t.Errorf("agent log lacks %s:\n%s", want, agentLog)
	}
}

// unitOptions returns a unit file's option lines, section by section, in
// order ("[Service] User=sinc"), comments left out.
func unitOptions(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	section := ""
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "" || l[0] == '#' || l[0] == ';':
		case l[0] == '[':
			section = l
		default:
			out = append(out, section+" "+l)
		}
	}
	return out
}

// TestTemplateMatchesUnit: the template differs from sinc-agent.service
// only in its instance's name, config and folders; every hardening option
// is the same, so a change to one unit cannot miss the other.
func TestTemplateMatchesUnit(t *testing.T) {
	unit, tmpl := unitOptions(t, unitPath), unitOptions(t, templatePath)
	instance := strings.NewReplacer(
		"Description=sinc agent (", "Description=sinc agent %i (",
		"--config /etc/sinc/agent.toml", "--config /etc/sinc/%i/agent.toml",
		"RuntimeDirectory=sinc", "RuntimeDirectory=sinc/%i",
		"StateDirectory=sinc", "StateDirectory=sinc/%i")
	for i := range unit {
		if !strings.Contains(unit[i], "Mode=") {
			unit[i] = instance.Replace(unit[i])
		}
	}
	if strings.Join(unit, "\n") != strings.Join(tmpl, "\n") {
		t.Errorf("the template's options are not the unit's:\nunit (as an instance):\n%s\n\ntemplate:\n%s",
			strings.Join(unit, "\n"), strings.Join(tmpl, "\n"))
	}
	if len(unit) < 40 {
		t.Errorf("only %d options read from %s", len(unit), unitPath)
	}
}
