// Package admin is the agent's admin socket protocol, used by the CLI.
//
// One request per connection: the client writes one JSON object on one line
// ({"v":1,"op":"peers"}), the agent answers with one JSON object on one line
// and closes. A request over MaxRequest bytes, or not finished within
// RequestTimeout, gets an error reply. No reply ever carries key material:
// the types below have no field that could hold it.
package admin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"sinc.dev/sinc/internal/buildinfo"
	"sinc.dev/sinc/internal/local"
	"sinc.dev/sinc/internal/registry"
)

const (
	Version        = 1
	MaxRequest     = 4 << 10
	MaxResponse    = 16 << 20
	RequestTimeout = 5 * time.Second
	MaxClients     = 32
)

// Request is one admin request.
type Request struct {
	V  int    `json:"v"`
	Op string `json:"op"` // "peers", "conns", "stats" or "nodes"
}

// Response is the agent's answer.
type Response struct {
	OK       bool              `json:"ok"`
	Error    *Error            `json:"error,omitempty"`
	Node     string            `json:"node,omitempty"`
	Peers    []PeerRow         `json:"peers,omitempty"`
	Conns    []ConnRow         `json:"conns,omitempty"`
	Counters map[string]uint64 `json:"counters,omitempty"`
	Registry *registry.Status  `json:"registry,omitempty"` // "nodes": the registry's own state
	Nodes    []NodeRow         `json:"nodes,omitempty"`
	// Build is the answering agent's own build (op "peers"). A peer's
	// build is not known: the link handshake does not carry it.
	Build *buildinfo.Info `json:"build,omitempty"`
}

// Error is a failed request.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

// ConnRow is a connection table row as the operator sees it: the row a
// process of the partition sees, and the key lifecycle of the channel
// (never a key): the epoch of the key each direction is sealed with, and
// how many more frames the incoming key opens before the agent replaces
// it. Processes never see these.
type ConnRow struct {
	local.Conn
	KeyEpochOut    uint16 `json:"key_epoch_out"`
	KeyEpochIn     uint16 `json:"key_epoch_in"`
	RotateInFrames uint64 `json:"rotate_in_frames"`
}

// PeerRow is one row of the peer table.
type PeerRow struct {
	Peer    string `json:"peer"`
	Address string `json:"address"`
	State   string `json:"state"` // "up", "connecting", "down"; "unlinked" for a node known to the registry only
	// Link is "linked" (up, carrying channels), "idle" (up, carrying
	// none) or "unlinked" (no link up).
	Link        string    `json:"link"`
	Since       time.Time `json:"since"`
	Initiator   bool      `json:"initiator,omitempty"`
	CertExpiry  time.Time `json:"cert_expiry,omitzero"`
	CertWarning string    `json:"cert_warning,omitempty"` // the peer's certificate nears its end
	NextRekey   time.Time `json:"next_rekey,omitzero"`    // when this side replaces the link's session keys
	FramesOut   uint64    `json:"frames_out"`
	BytesOut    uint64    `json:"bytes_out"`
	FramesIn    uint64    `json:"frames_in"`
	BytesIn     uint64    `json:"bytes_in"`
	LastError   string    `json:"last_error,omitempty"`
}

// NodeRow is one node as the agent's registry has it (sinc nodes).
type NodeRow struct {
	Node      string   `json:"node"`
	Self      bool     `json:"self,omitempty"` // this agent's own record
	Addresses []string `json:"addresses"`
	// Instance and Fingerprint are the record's (etcd), in hex.
	Instance    string `json:"instance,omitempty"`
	Fingerprint string `json:"fingerprint,omitempty"`
	// Record is "current" (in the registry's view), "gone" for a peer
	// whose record left while it still has a link or channels, or
	// "configured" for a peer of the static file.
	Record string `json:"record"`
	// CertExpiry is the end of the node's certificate, when this agent
	// has it: read from the registry for a dial, or presented on a link.
	CertExpiry time.Time `json:"cert_expiry,omitzero"`
	Link       string    `json:"link"` // as in PeerRow
	Channels   int       `json:"channels"`
}

// Query sends req to the admin socket at path and returns the reply.
func Query(ctx context.Context, path string, req Request) (*Response, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	} else {
		conn.SetDeadline(time.Now().Add(RequestTimeout))
	}
	req.V = Version
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w", path, err)
	}
	var resp Response
	if err := json.NewDecoder(io.LimitReader(conn, MaxResponse)).Decode(&resp); err != nil {
		return nil, fmt.Errorf("admin socket %s: bad reply: %w", path, err)
	}
	if !resp.OK {
		if resp.Error == nil {
			return nil, fmt.Errorf("admin socket %s: request failed without a reason", path)
		}
		return nil, resp.Error
	}
	return &resp, nil
}

// Serve answers requests on ln with handle until ln is closed. At most
// MaxClients requests are served at once; more wait in the kernel's backlog.
func Serve(ln net.Listener, log *slog.Logger, handle func(Request) *Response) {
	sem := make(chan struct{}, MaxClients)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Warn("admin accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			serveOne(conn, log, handle)
		}()
	}
}

func serveOne(conn net.Conn, log *slog.Logger, handle func(Request) *Response) {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(RequestTimeout))
	resp := func() *Response {
		line, err := bufio.NewReaderSize(io.LimitReader(conn, MaxRequest+1), MaxRequest+1).ReadSlice('\n')
		if err != nil {
			if len(line) > MaxRequest {
				return fail("too_large", fmt.Sprintf("request exceeds %d bytes", MaxRequest))
			}
			return fail("bad_request", "request must be one JSON object ending in a newline")
		}
		var req Request
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return fail("bad_request", "malformed request: "+err.Error())
		}
		if req.V != Version {
			return fail("bad_version", fmt.Sprintf("version %d, this agent speaks %d", req.V, Version))
		}
		return handle(req)
	}()
	if !resp.OK {
		log.Info("admin request refused", "code", resp.Error.Code, "reason", resp.Error.Message)
	}
	b, _ := json.Marshal(resp)
	conn.Write(append(b, '\n'))
}

func fail(code, msg string) *Response {
	return &Response{Error: &Error{Code: code, Message: msg}}
}

// Fail returns an error response.
func Fail(code, msg string) *Response { return fail(code, msg) }
