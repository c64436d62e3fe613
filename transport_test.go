package sinc_test

import (
	"os"
	"os/exec"
	"testing"

	"sinc.dev/sinc"
)

// TestSocketPathToo runs this package's tests again with the channel data
// on the sockets (SINC_NO_RING=1) instead of rings, so that both paths
// keep the same net.Conn contract: one `go test` checks both.
func TestSocketPathToo(t *testing.T) {
	if os.Getenv(sinc.NoRingEnv) == "1" {
		t.Skip("this is the socket path's run")
	}
	cmd := exec.Command(os.Args[0], "-test.count=1", "-test.skip", "^TestSocketPathToo$")
	cmd.Env = append(os.Environ(), sinc.NoRingEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("on the socket path: %v\n%s", err, out)
	}
}
