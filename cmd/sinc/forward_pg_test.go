package main

import (
	"bytes"
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// A program no one here wrote, through sinc: psql on node-a talks to a
// Debian postgresql server on node-b, through sinc forward and sinc
// expose, the server, the exposer and the forwarder each under the uid
// that would run them:
//
//	psql (uid A) ⇄ sinc forward (uid A, node-a/web) ⇄ agents ⇄ sinc expose (uid B, node-b/db) ⇄ postgres (uid B)

// needTool skips the test when a program it needs is missing, naming the
// Debian package; in CI (CI set), where .ci/run installs it, it fails.
func needTool(t *testing.T, path, pkg string) {
	t.Helper()
	if _, err := os.Stat(path); err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s not found: .ci/run installs the Debian package %s", path, pkg)
	}
	t.Skipf("%s not found: install the Debian package %s (apt-get install -y --no-install-recommends %s)", path, pkg, pkg)
}

// pgBin returns the folder of the newest PostgreSQL server programs.
func pgBin(t *testing.T) string {
	t.Helper()
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return pgVersion(dirs[i]) < pgVersion(dirs[j]) })
	if len(dirs) == 0 {
		needTool(t, "/usr/lib/postgresql/VERSION/bin/postgres", "postgresql")
	}
	dir := dirs[len(dirs)-1]
	needTool(t, filepath.Join(dir, "initdb"), "postgresql")
	return dir
}

func pgVersion(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// startPostgres makes a database cluster in a folder of its own and runs
// the server as uid/gid on 127.0.0.1:port, stopped when the test ends.
func startPostgres(t *testing.T, uid, gid int) (port int) {
	t.Helper()
	bin := pgBin(t)
	dir := shortTemp(t)
	os.Chmod(dir, 0o755)
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	for _, d := range []string{data, sock} {
		os.Mkdir(d, 0o700)
		os.Chown(d, uid, gid)
	}
	asUser := func(name string, args ...string) *exec.Cmd {
		cmd := exec.Command(filepath.Join(bin, name), args...)
		cmd.Dir = dir
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + dir, "LC_ALL=C"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
			Pdeathsig: syscall.SIGKILL}
		return cmd
	}
	start := time.Now()
	if out, err := asUser("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	srv := asUser("postgres", "-D", data, "-p", strconv.Itoa(port), "-k", sock,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
		"-c", "shared_buffers=16MB", "-c", "max_connections=20")
	log := &syncBuffer{}
	srv.Stdout, srv.Stderr = log, log
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	t.Cleanup(func() {
		srv.Process.Signal(syscall.SIGINT) // fast shutdown
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			srv.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("postgres:\n%s", log)
		}
	})
	for !strings.Contains(log.String(), "ready to accept connections") {
		select {
		case <-done:
			t.Fatalf("postgres exited:\n%s", log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("postgres not ready after 30s:\n%s", log)
		}
	}
	t.Logf("initdb and postgres start: %s", time.Since(start).Round(time.Millisecond))
	return port
}

// psql runs psql as uid/gid against conninfo with script on stdin, and
// returns its output, its error output and whether it succeeded, and how
// long it took.
func psql(t *testing.T, uid, gid int, conninfo, script string) (string, string, bool, time.Duration) {
	t.Helper()
	cmd := exec.Command("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", conninfo)
	cmd.Stdin = strings.NewReader(script)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/", "LC_ALL=C", "PGCONNECT_TIMEOUT=10"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)},
		Pdeathsig: syscall.SIGKILL}
	var out, errs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errs
	start := time.Now()
	err := cmd.Run()
	return out.String(), errs.String(), err == nil, time.Since(start)
}

// TestPsqlThroughSinc: psql reaches postgres through forward and expose,
// over a loopback TCP port and over a Unix socket; a table of 500 rows
// and a 3 MiB value go up (COPY) and come back byte-exact, checked by
// postgres's md5 against ours and by the bytes themselves. A forward that
// policy denies closes psql's connection at once and says why; the Unix
// socket keeps out other uids, the TCP port does not (the warning of the
// README).
func TestPsqlThroughSinc(t *testing.T) {
	needTool(t, "/usr/bin/psql", "postgresql-client")
	pgBin(t)
	ua, ga := testUser(t, "sinc-e2e-a")
	ub, gb := testUser(t, "sinc-e2e-b")
	own := func(uid int) string { return fmt.Sprintf("mode = \"0600\"\nowner = \"%d\"\n", uid) }
	rules := fmt.Sprintf("\n[[allow]]\nfrom = \"node-a/web\"\nto = \"node-b/db/pg\"\nuids = [%d]\n", ua)
	a, b := startPair(t, rules, map[string]string{"web": own(ua), "db": own(ub)})
	pgPort := startPostgres(t, ub, gb)

	startDaemon(t, as(ub, gb, "expose", "pg", "127.0.0.1:"+strconv.Itoa(pgPort), "--socket", b.Partitions["db"]), "msg=exposing")
	tcp := startDaemon(t, as(ua, ga, "forward", "127.0.0.1:0", "node-b/db/pg", "--socket", a.Partitions["web"]), "msg=forwarding")
	sockDir := shortTemp(t)
	os.Chmod(sockDir, 0o755)
	os.Chown(sockDir, ua, ga) // the forwarder makes its socket there
	startDaemon(t, as(ua, ga, "forward", filepath.Join(sockDir, ".s.PGSQL.5432"), "node-b/db/pg", "--socket", a.Partitions["web"]), "msg=forwarding")
	host, port, _ := strings.Cut(tcp.addr(t), ":")
	viaTCP := fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres gssencmode=disable", host, port)
	viaUnix := fmt.Sprintf("host=%s port=5432 user=postgres dbname=postgres", sockDir)

	// 500 small rows and one 3 MiB value up, all of it back.
	raw := make([]byte, 3<<19)
	rand.Read(raw)
	big := hex.EncodeToString(raw)
	script := "CREATE TABLE t (id int PRIMARY KEY, v text);\n" +
		"INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 500) AS i;\n" +
		"COPY t (id, v) FROM STDIN;\n0\t" + big + "\n\\.\n" +
		"SELECT count(*) FROM t;\n" +
		"SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t WHERE id > 0;\n" +
		"SELECT md5(v) || ' ' || length(v) FROM t WHERE id = 0;\n" +
		"SELECT v FROM t WHERE id = 0;\n"
	out, errs, ok, d := psql(t, ua, ga, viaTCP, script)
	if !ok {
		t.Fatalf("psql through sinc over TCP: %s%s", errs, tcp.log)
	}
	var small []string
	for i := 1; i <= 500; i++ {
		sum := md5.Sum([]byte(strconv.Itoa(i)))
		small = append(small, hex.EncodeToString(sum[:]))
	}
	sumSmall := md5.Sum([]byte(strings.Join(small, ",")))
	sumBig := md5.Sum([]byte(big))
	want := []string{"501", hex.EncodeToString(sumSmall[:]), fmt.Sprintf("%x %d", sumBig, len(big)), big}
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != len(want) {
		t.Fatalf("psql printed %d lines, want %d (%.300q)", len(lines), len(want), out)
	}
	for i, w := range want {
		if lines[i] != w {
			t.Fatalf("psql line %d: %.100q, want %.100q", i+1, lines[i], w)
		}
	}
	t.Logf("psql over TCP: 500 rows and %d bytes up (COPY), the same back, md5s equal, in %s", len(big), d.Round(time.Millisecond))

	// The same table over the Unix socket.
	out, errs, ok, d = psql(t, ua, ga, viaUnix, "SELECT md5(v) FROM t WHERE id = 0;\n")
	if !ok || strings.TrimSpace(out) != hex.EncodeToString(sumBig[:]) {
		t.Fatalf("psql through sinc over a Unix socket: %q %s", out, errs)
	}
	t.Logf("psql over a Unix socket: %s", d.Round(time.Millisecond))

	// The Unix socket is uid A's (0600): uid B is kept out by the kernel.
	if _, errs, ok, _ = psql(t, ub, gb, viaUnix, "SELECT 1;\n"); ok || !strings.Contains(errs, "Permission denied") {
		t.Errorf("psql as another uid through the forwarder's 0600 socket: ok=%v %q; want Permission denied", ok, errs)
	}
	// The TCP port is not: any local user speaks to the agent as the
	// forwarder's uid. This is what the README warns about.
	if out, _, ok, _ = psql(t, ub, gb, viaTCP, "SELECT 1;\n"); !ok || strings.TrimSpace(out) != "1" {
		t.Errorf("psql as another uid through the TCP port: %q; the README says any local user can use it", out)
	}

	// A channel policy denies: psql's connection closes at once, and the
	// forwarder's log says why and to where.
	denied := startDaemon(t, as(ua, ga, "forward", "127.0.0.1:0", "node-b/db/secret", "--socket", a.Partitions["web"]), "msg=forwarding")
	host, port, _ = strings.Cut(denied.addr(t), ":")
	_, errs, ok, d = psql(t, ua, ga, fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres gssencmode=disable", host, port), "SELECT 1;\n")
	if ok || d > 2*time.Second {
		t.Fatalf("psql to a denied service: ok=%v after %s; want a failure at once", ok, d)
	}
	log := denied.waitLog(t, 5*time.Second, `msg="channel refused: denied"`, "to=node-b/db/secret")
	t.Logf("denied: psql failed in %s: %s; the forwarder: %s", d.Round(time.Millisecond), strings.TrimSpace(errs), grepLine(log, "channel refused"))
}
