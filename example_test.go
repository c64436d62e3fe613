package sinc_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"testing"

	"sinc.dev/sinc"
)

// Example is the code of the README's "Using channels"; TestReadmeExample
// keeps the two the same. It is compiled, not run: it needs an agent.
func Example() {
	ctx := context.Background()

	// A stream channel (a net.Conn) through the socket in $SINC_SOCKET.
	c, err := sinc.Dial("node-b/db/pg")
	if err != nil {
		log.Fatal(err) // "sinc: dial node-b/db/pg: denied (by node-b): …"
	}
	defer c.Close()
	c.Write([]byte("hello"))

	// A message channel through a given socket: one Write, one message.
	d := &sinc.Dialer{Socket: "/run/sinc/node-a/web.sock", Kind: sinc.Message}
	m, err := d.DialContext(ctx, "node-b/db/pg")
	switch {
	case errors.Is(err, sinc.ErrDenied): // the error names the agent that refused
	case errors.Is(err, sinc.ErrNoAgent): // nothing at the socket: the error says what to check
	case err == nil:
		defer m.Close()
		m.WriteMessage([]byte("one message"))
	}

	// A service (a net.Listener) at node/partition/pg.
	ln, err := sinc.Listen("pg")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept() // ErrAgentGone once the agent stops
			if err != nil {
				return
			}
			go func() {
				io.Copy(conn, conn) // echo
				conn.Close()
			}()
		}
	}()

	// This partition's rows of the connection table.
	rows, err := sinc.Connections(ctx, "")
	for _, r := range rows {
		fmt.Println(r.ID, r.RemoteNode+"/"+r.RemotePartition, r.Kind, r.State)
	}
}

// TestReadmeExample: the README shows Example's body, unchanged.
func TestReadmeExample(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "## Using channels\n")
	_, block, ok2 := strings.Cut(section, "```go\n")
	block, _, ok3 := strings.Cut(block, "```\n")
	_, body, ok4 := strings.Cut(string(src), "func Example() {\n")
	body, _, ok5 := strings.Cut(body, "\n}\n")
	if !ok || !ok2 || !ok3 || !ok4 || !ok5 {
		t.Fatal("README's Using channels code block or Example not found")
	}
	var lines []string
	for _, l := range strings.Split(body, "\n") {
		lines = append(lines, strings.TrimPrefix(l, "\t"))
	}
	if want := strings.Join(lines, "\n") + "\n"; block != want {
		t.Fatalf("README's example differs from Example in example_test.go:\n--- README\n%s--- Example\n%s", block, want)
	}
}
