package main

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// TestBadHandshakeFloodLogsBounded floods a real agent's peer port with
// 3,000 bad handshakes — 2,000 message 1s with a made-up mac1 and 1,000
// lines of HTTP — and its partition socket with 2,000 bad requests, and
// checks that its log holds a few lines of each kind and, at exit, how
// many were left out, while sinc stats counts every refused handshake.
func TestBadHandshakeFloodLogsBounded(t *testing.T) {
	dir := shortTemp(t)
	c, err := cluster.Make(dir, []cluster.NodeSpec{{Name: "node-a", Partitions: []string{"web"}}}, cluster.Timers{})
	if err != nil {
		t.Fatal(err)
	}
	a := c.Nodes["node-a"]
	proc, err := cluster.Start(bin, a)
	if err != nil {
		t.Fatal(err)
	}
	defer proc.Kill()
	if err := waitAgent(a); err != nil {
		t.Fatal(err)
	}

	const badMACs, garbage = 2000, 1000
	jobs := make(chan []byte)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for msg := range jobs {
				conn, err := net.Dial("tcp", a.Listen)
				if err != nil {
					t.Error(err)
					continue
				}
				conn.Write(msg)
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.Copy(io.Discard, conn) // until the agent closes it
				conn.Close()
			}
		}()
	}
	for i := range badMACs + garbage {
		if i < badMACs {
			m := make([]byte, 2+48)
			m[1] = 48
			rand.Read(m[2:])
			jobs <- m
		} else {
			jobs <- []byte("GET / HTTP/1.1\r\nHost: node-a\r\n\r\n")
		}
	}
	close(jobs)
	wg.Wait()
	const badRequests = 2000
	for range badRequests {
		conn, err := net.Dial("unix", a.Partitions["web"])
		if err != nil {
			t.Fatal(err)
		}
		conn.Write([]byte("not a request\n"))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.Copy(io.Discard, conn)
		conn.Close()
	}

	// sinc stats counts every one.
	stats := func() map[string]uint64 {
		out := mustSinc(t, "stats", "--admin", a.Admin, "--json")
		var m map[string]uint64
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("sinc stats --json: %v\n%s", err, out)
		}
		return m
	}
	var st map[string]uint64
	deadline := time.Now().Add(5 * time.Second)
	for st = stats(); st["refused_handshake_bad_mac"] < badMACs || st["refused_handshake_malformed"] < garbage; st = stats() {
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st["refused_handshake_bad_mac"] != badMACs || st["refused_handshake_malformed"] != garbage {
		t.Errorf("sinc stats counts %d bad_mac and %d malformed refusals, want %d and %d",
			st["refused_handshake_bad_mac"], st["refused_handshake_malformed"], badMACs, garbage)
	}

	if err := proc.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	logText, err := os.ReadFile(proc.Log)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(logText)), "\n")
	t.Logf("3000 bad handshakes and 2000 bad requests: %d log lines in all, %d bytes", len(lines), len(logText))
	if len(lines) > 50 {
		t.Errorf("the agent wrote %d log lines for 3000 bad handshakes and 2000 bad requests; want a few per kind:\n%s",
			len(lines), strings.Join(lines[:min(len(lines), 40)], "\n"))
	}
	// Lines written and lines the summaries say were left out add up to
	// every refusal.
	suppressed := regexp.MustCompile(`message="([^"]*)" suppressed=(\d+)`)
	for msg, want := range map[string]int{
		"peer handshake failed: bad_mac":   badMACs,
		"peer handshake failed: malformed": garbage,
		"bad request on partition socket":  badRequests,
	} {
		written, left := 0, 0
		for _, l := range lines {
			if m := suppressed.FindStringSubmatch(l); m != nil && m[1] == msg {
				n, _ := strconv.Atoi(m[2])
				left += n
			} else if strings.Contains(l, fmt.Sprintf("msg=%q", msg)) {
				written++
			}
		}
		if written == 0 || written+left != want {
			t.Errorf("%q: %d lines written and %d reported suppressed, want %d in all", msg, written, left, want)
		}
	}
}
