package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"sinc.dev/sinc"
)

// stallResult is what runStall measured.
type stallResult struct {
	Stalled      int     `json:"stalled"`       // channels opened and stalled
	Refused      int     `json:"refused_limit"` // opens refused with limit
	StalledBytes int64   `json:"stalled_bytes"` // written into the stalled channels
	BulkBefore   float64 `json:"bulk_before_mibps"`
	BulkDuring   float64 `json:"bulk_during_mibps"`
	Error        string  `json:"error,omitempty"`
}

// runStall opens n channels from nodes[0] to a service on nodes[1] whose
// process takes them and never reads, writes into each until it blocks,
// and measures a bulk transfer on another channel before and while they
// are stalled.
func runStall(nodes []node, n, bulkBytes int) stallResult {
	var res stallResult
	if len(nodes) < 2 {
		res.Error = "-stall needs two nodes"
		return res
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	from, to := nodes[0], nodes[1]
	var held sync.Mutex
	var heldConns []*sinc.Conn
	defer func() {
		held.Lock()
		for _, c := range heldConns {
			c.Close()
		}
		held.Unlock()
	}()
	serve := func(service string, handle func(*sinc.Conn)) error {
		l, err := (&sinc.ListenConfig{Socket: to.socket}).Listen(ctx, service)
		if err != nil {
			return err
		}
		go func() {
			<-ctx.Done()
			l.Close()
		}()
		go func() {
			for {
				c, err := l.AcceptSinc()
				if err != nil {
					return
				}
				go handle(c)
			}
		}()
		return nil
	}
	if err := serve("stall", func(c *sinc.Conn) { // takes the channel, never reads
		held.Lock()
		heldConns = append(heldConns, c)
		held.Unlock()
	}); err != nil {
		res.Error = err.Error()
		return res
	}
	if err := serve("drain", func(c *sinc.Conn) {
		io.Copy(io.Discard, c)
		c.Close()
	}); err != nil {
		res.Error = err.Error()
		return res
	}
	addr := func(service string) string { return to.name + "/" + partOf(to.socket) + "/" + service }
	bulk := func() (float64, error) {
		c, err := (&sinc.Dialer{Socket: from.socket}).DialContext(ctx, addr("drain"))
		if err != nil {
			return 0, err
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		start := time.Now()
		for sent := 0; sent < bulkBytes; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				return 0, err
			}
		}
		c.CloseWrite()
		if _, err := c.Read(buf[:1]); err != io.EOF { // the drain closed: it read all
			return 0, fmt.Errorf("bulk end: %v", err)
		}
		return float64(bulkBytes) / (1 << 20) / time.Since(start).Seconds(), nil
	}
	var err error
	if res.BulkBefore, err = bulk(); err != nil {
		res.Error = "bulk before: " + err.Error()
		return res
	}
	// The writers write without a deadline and block for good once their
	// channel is full; the process exits without closing them.
	var written atomic.Int64
	for range n {
		c, err := (&sinc.Dialer{Socket: from.socket}).DialContext(ctx, addr("stall"))
		if errors.Is(err, sinc.ErrLimit) {
			res.Refused++
			continue
		}
		if err != nil {
			res.Error = fmt.Sprintf("stalled channel %d: %v", res.Stalled, err)
			return res
		}
		res.Stalled++
		go func() {
			buf := make([]byte, 64<<10)
			for {
				k, err := c.Write(buf)
				written.Add(int64(k))
				if err != nil {
					return
				}
			}
		}()
	}
	for last := int64(-1); last != written.Load(); { // until nothing moves for a second
		last = written.Load()
		time.Sleep(time.Second)
	}
	res.StalledBytes = written.Load()
	if res.BulkDuring, err = bulk(); err != nil {
		res.Error = "bulk while stalled: " + err.Error()
	}
	return res
}
