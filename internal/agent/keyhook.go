package agent

// KeyHook, when set, is told every key the agent takes into its memory: the
// node's private key and each channel key. It exists for one test, which
// searches everything the agents and the CLI print for these keys; only a
// binary built with the sinctest tag sets it (cmd/sinc/keyhook_sinctest.go).
// It must stay nil in any other build.
var KeyHook func(what string, key []byte)

func tellKey(what string, key []byte) {
	if KeyHook != nil {
		KeyHook(what, key)
	}
}
