package cert_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sinc.dev/sinc/internal/cert"
)

// TestReadNodeKey: the key lands in the caller's buffer and nowhere it
// does not belong — the bytes past it are zero, a buffer too small or a
// file that is not one clean PEM block is refused and leaves the buffer
// zero.
func TestReadNodeKey(t *testing.T) {
	ca := newCA(t, "ca")
	_, keyPath := signNode(t, ca, "node-a")
	want := pemBytes(t, keyPath)

	dst := bytes.Repeat([]byte{0xAA}, 96)
	if err := cert.ReadNodeKey(keyPath, dst); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst[:cert.KeySize], want) {
		t.Fatal("ReadNodeKey read another key than the file's")
	}
	if !bytes.Equal(dst[cert.KeySize:], make([]byte, 96-cert.KeySize)) {
		t.Fatal("ReadNodeKey left bytes past the key")
	}
	k, err := cert.LoadNodeKey(keyPath)
	if err != nil || !bytes.Equal(k.Bytes(), want) {
		t.Fatalf("LoadNodeKey: %v", err)
	}

	if err := cert.ReadNodeKey(keyPath, make([]byte, cert.NodeKeyBuffer-1)); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Fatalf("a buffer of %d bytes: %v", cert.NodeKeyBuffer-1, err)
	}
	data, _ := os.ReadFile(keyPath)
	dir := t.TempDir()
	for name, c := range map[string]struct {
		data string
		ok   bool
	}{
		"CRLF line ends":       {strings.ReplaceAll(string(data), "\n", "\r\n"), true},
		"body split in lines":  {splitBody(string(data)), true},
		"text after the block": {string(data) + "more\n", false},
		"text before it":       {"hello\n" + string(data), false},
		"a header":             {strings.Replace(string(data), "KEY-----\n", "KEY-----\nProc-Type: 4\n\n", 1), false},
		"not base64":           {strings.Replace(string(data), "\n", "\n*", 1), false},
		"two blocks":           {string(data) + string(data), false},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_"))
		if err := os.WriteFile(p, []byte(c.data), 0o600); err != nil {
			t.Fatal(err)
		}
		dst := bytes.Repeat([]byte{0xAA}, cert.NodeKeyBuffer)
		err := cert.ReadNodeKey(p, dst)
		if c.ok {
			if err != nil || !bytes.Equal(dst[:cert.KeySize], want) {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: err %v, want a refusal naming the file", name, err)
		}
		if !bytes.Equal(dst, bytes.Repeat([]byte{0xAA}, cert.NodeKeyBuffer)) && !bytes.Equal(dst, make([]byte, cert.NodeKeyBuffer)) {
			t.Errorf("%s: a refused file left part of a key in the buffer", name)
		}
	}
}

// splitBody rewraps a PEM key file's one body line into lines of 10.
func splitBody(s string) string {
	lines := strings.Split(s, "\n")
	var b strings.Builder
	b.WriteString(lines[0] + "\n")
	body := lines[1]
	for len(body) > 10 {
		b.WriteString(body[:10] + "\n")
		body = body[10:]
	}
	b.WriteString(body + "\n" + lines[2] + "\n")
	return b.String()
}
