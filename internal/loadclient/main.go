// Command loadclient drives many channels through a local sinc cluster for
// the end-to-end load tests: it listens with a message echo on every node
// given, opens the channels, sends numbered, checksummed messages on each,
// and checks that every one comes back exactly once and in order. It is
// built without the race detector so the load is the agents', not the
// test's.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"os"
	"strings"
	"sync"
	"time"

	"sinc.dev/sinc"
)

func main() {
	var nodes nodeFlag
	flag.Var(&nodes, "node", "name=socket of a node's partition (repeat, at least two)")
	channels := flag.Int("channels", 1000, "channels to open, spread over the node pairs")
	messages := flag.Int("messages", 1000, "messages each way on each channel")
	busy := flag.Int("busy", 200, "channels sending at once (all stay open)")
	stall := flag.Int("stall", 0, "instead: open this many channels from the first node to a reader on the second that never reads, "+
		"and measure a bulk transfer beside them before and while they are stalled")
	bulk := flag.Int("bulk", 64<<20, "bytes of each bulk transfer (with -stall)")
	flag.Parse()
	if *stall > 0 {
		res := runStall(nodes, *stall, *bulk)
		json.NewEncoder(os.Stdout).Encode(res)
		if res.Error != "" {
			os.Exit(1)
		}
		return
	}
	res := run(nodes, *channels, *messages, *busy)
	json.NewEncoder(os.Stdout).Encode(res)
	if res.Error != "" {
		os.Exit(1)
	}
}

type node struct{ name, socket string }

type nodeFlag []node

func (f *nodeFlag) String() string { return fmt.Sprint(*f) }
func (f *nodeFlag) Set(v string) error {
	name, sock, ok := strings.Cut(v, "=")
	if !ok {
		return fmt.Errorf("want name=socket, got %q", v)
	}
	*f = append(*f, node{name, sock})
	return nil
}

type result struct {
	Channels  int     `json:"channels"`
	Messages  int     `json:"messages"`
	Delivered int     `json:"delivered"`
	Seconds   float64 `json:"seconds"`
	Error     string  `json:"error,omitempty"`
}

func payload(i, j int) []byte {
	s := fmt.Sprintf("%d:%d:", i, j)
	return fmt.Appendf(nil, "%s%08x", s, crc32.ChecksumIEEE([]byte(s)))
}

func run(nodes []node, channels, messages, busy int) result {
	res := result{Channels: channels, Messages: messages}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	for _, n := range nodes {
		l, err := (&sinc.ListenConfig{Socket: n.socket}).Listen(ctx, "echo")
		if err != nil {
			res.Error = err.Error()
			return res
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.AcceptSinc()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					for {
						m, err := c.ReadMessage()
						if err != nil || c.WriteMessage(m) != nil {
							return
						}
					}
				}()
			}
		}()
	}
	conns := make([]*sinc.Conn, channels)
	for i := range conns {
		from, to := nodes[i%len(nodes)], nodes[(i+1+i/len(nodes)%(len(nodes)-1))%len(nodes)]
		c, err := (&sinc.Dialer{Socket: from.socket, Kind: sinc.Message}).DialContext(ctx, to.name+"/"+partOf(to.socket)+"/echo")
		if err != nil {
			res.Error = fmt.Sprintf("channel %d (%s → %s): %v", i, from.name, to.name, err)
			return res
		}
		defer c.Close()
		conns[i] = c
	}
	start := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, busy)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			go func() {
				for j := range messages {
					if c.WriteMessage(payload(i, j)) != nil {
						return
					}
				}
			}()
			for j := range messages {
				m, err := c.ReadMessage()
				if err != nil || string(m) != string(payload(i, j)) {
					mu.Lock()
					if res.Error == "" {
						res.Error = fmt.Sprintf("channel %d message %d: %q, want %q (%v)", i, j, m, payload(i, j), err)
					}
					mu.Unlock()
					return
				}
				mu.Lock()
				res.Delivered++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	return res
}

// partOf takes the partition name from a socket path .../NAME.sock.
func partOf(sock string) string {
	base := sock[strings.LastIndexByte(sock, '/')+1:]
	return strings.TrimSuffix(base, ".sock")
}
