//go:build sinctest

package main

import (
	"encoding/hex"
	"os"
	"sync"

	"sinc.dev/sinc/internal/agent"
)

// A test build only: with SINC_TEST_KEYLOG set, the agent appends every key
// it takes to that file, so the key leak test knows what to search for.
func init() {
	path := os.Getenv("SINC_TEST_KEYLOG")
	if path == "" {
		return
	}
	var mu sync.Mutex
	agent.KeyHook = func(what string, key []byte) {
		mu.Lock()
		defer mu.Unlock()
		f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return
		}
		f.WriteString(what + " " + hex.EncodeToString(key) + "\n")
		f.Close()
	}
}
