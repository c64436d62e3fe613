package sinc_test

import (
	"context"
	"net"
	"testing"

	"golang.org/x/net/nettest"

	"sinc.dev/sinc"
)

// TestNetConn runs the standard net.Conn conformance suite on stream
// channels, across two nodes and across two partitions of one node: one
// end dialed, the other accepted.
func TestNetConn(t *testing.T) {
	for _, start := range []func(*testing.T) topology{twoNodes, onePartitionPair} {
		tp := start(t)
		t.Run(tp.name, func(t *testing.T) {
			l, err := (&sinc.ListenConfig{Socket: tp.listen}).Listen(context.Background(), "nettest")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			nettest.TestConn(t, func() (net.Conn, net.Conn, func(), error) {
				c1, c2, err := pairOn(t, tp, l, "nettest", sinc.Stream)
				if err != nil {
					return nil, nil, nil, err
				}
				return c1, c2, func() {
					c1.Close()
					c2.Close()
				}, nil
			})
		})
	}
}
