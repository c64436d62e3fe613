package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"sinc.dev/sinc/internal/cluster"
)

// EnvConfig says what an Env runs.
type EnvConfig struct {
	Bin        string   // the sinc binary (agents and workers)
	Transports []string // nil: all
	// Dir is where the Env's temporary folder goes ("" for the system's).
	Dir string
	// ProfileDir, if set, gets a CPU profile of each worker and agent process.
	ProfileDir string
	// Keep keeps the temporary folder (certificates, configs, logs).
	Keep bool
}

// Env is a running benchmark set-up on loopback: for each transport a
// server worker process and a client worker process, and for the sinc
// transports two agent processes (node-a with partition app, where the
// clients are; node-b with partition svc, where the servers are). Each
// sinc transport's path (ring or socket) is checked as it starts
// (ringcheck.go).
type Env struct {
	cfg     EnvConfig
	Dir     string
	cluster *cluster.Cluster
	agents  []*cluster.Process // node-a, node-b
	servers map[string]*worker
	clients map[string]*worker
	relays  []*relay // stunnel: its client side, its server side
	TLSInfo string   // what TLS negotiated
}

// The policy and limits of the benchmark's agents. The limits are raised
// only so that 10,000 idle channels fit in one process; window, timers
// and every check of the data path are the defaults.
const agentLimits = `
[limits]
channels = 65536
channels_per_partition = 65536
channels_per_process = 65536
accepted = 65536
accepted_per_partition = 65536
accepted_per_node = 65536
`

func benchNodes() []cluster.NodeSpec {
	rule := fmt.Sprintf("\n[[allow]]\nfrom = %q\nto = %q\n", nodeA+"/"+partA, nodeB+"/"+partB+"/bench-*")
	return []cluster.NodeSpec{
		{Name: nodeA, Partitions: []string{partA}, Extra: agentLimits + rule},
		{Name: nodeB, Partitions: []string{partB}, Extra: agentLimits + rule},
	}
}

// StartEnv starts everything cfg asks for and waits until it is ready.
func StartEnv(ctx context.Context, cfg EnvConfig) (_ *Env, err error) {
	if cfg.Bin == "" {
		return nil, errors.New("bench: no sinc binary")
	}
	if cfg.Transports == nil {
		cfg.Transports = Transports
	}
	for _, tr := range cfg.Transports {
		if !validTransport(tr) {
			return nil, fmt.Errorf("bench: unknown transport %q", tr)
		}
	}
	dir, err := os.MkdirTemp(cfg.Dir, "sinc-bench-")
	if err != nil {
		return nil, err
	}
	e := &Env{cfg: cfg, Dir: dir, servers: map[string]*worker{}, clients: map[string]*worker{}}
	// On failure, stop what started (a return of nil, err must not make
	// this e nil: it is not the named result).
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	if slices.ContainsFunc(cfg.Transports, isSinc) {
		if err := e.startAgents(ctx); err != nil {
			return nil, err
		}
	}
	var certPath, keyPath string
	if slices.Contains(cfg.Transports, TLS) || slices.Contains(cfg.Transports, Stunnel) {
		if certPath, keyPath, err = makeTLSCert(dir); err != nil {
			return nil, err
		}
	}
	for _, tr := range cfg.Transports {
		args := []string{"server", "--transport", workerTransport(tr)}
		switch {
		case tr == TLS:
			args = append(args, "--cert", certPath, "--key", keyPath)
		case isSinc(tr):
			args = append(args, "--socket", e.cluster.Nodes[nodeB].Partitions[partB])
		}
		srv, ready, err := startWorker(ctx, cfg.Bin, "server "+tr, filepath.Join(dir, "server-"+tr+".log"), e.profileArgs("server", tr, args)...)
		if err != nil {
			return nil, err
		}
		e.servers[tr] = srv
		addr := ready.Addr
		if tr == Stunnel {
			cl, sv, err := startRelays(ctx, dir, addr, certPath, keyPath)
			if err != nil {
				return nil, err
			}
			e.relays = []*relay{cl, sv}
			addr = cl.addr
		}
		args = []string{"client", "--transport", workerTransport(tr), "--addr", addr}
		switch {
		case tr == TLS:
			args = append(args, "--cert", certPath)
		case isSinc(tr):
			args = append(args, "--socket", e.cluster.Nodes[nodeA].Partitions[partA])
		}
		cl, _, err := startWorker(ctx, cfg.Bin, "client "+tr, filepath.Join(dir, "client-"+tr+".log"), e.profileArgs("client", tr, args)...)
		if err != nil {
			return nil, err
		}
		e.clients[tr] = cl
		if isSinc(tr) {
			if err := e.checkPath(ctx, tr); err != nil {
				return nil, err
			}
		}
		if tr == TLS {
			rep, err := cl.call(ctx, Command{Op: "info", Timeout: 10 * time.Second})
			if err != nil {
				return nil, err
			}
			e.TLSInfo = rep.Info
		}
	}
	return e, nil
}

func (e *Env) profileArgs(role, tr string, args []string) []string {
	if e.cfg.ProfileDir == "" {
		return args
	}
	return append(args, "--cpuprofile", filepath.Join(e.cfg.ProfileDir, role+"-"+tr+".prof"))
}

func (e *Env) startAgents(ctx context.Context) error {
	c, err := cluster.Make(e.Dir, benchNodes(), cluster.Timers{})
	if err != nil {
		return err
	}
	e.cluster = c
	for _, name := range []string{nodeA, nodeB} {
		var args []string
		if e.cfg.ProfileDir != "" {
			args = []string{"--cpuprofile", filepath.Join(e.cfg.ProfileDir, "agent-"+name+".prof")}
		}
		p, err := cluster.StartWith(e.cfg.Bin, c.Nodes[name], nil, args...)
		if err != nil {
			return err
		}
		e.agents = append(e.agents, p)
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for _, pair := range [][2]string{{nodeA, nodeB}, {nodeB, nodeA}} {
		if _, err := cluster.WaitPeer(wctx, c.Nodes[pair[0]], pair[1], "up"); err != nil {
			return fmt.Errorf("bench: link %s→%s did not come up: %w", pair[0], pair[1], err)
		}
	}
	return nil
}

// Close stops every process and removes the folder (unless Keep).
func (e *Env) Close() error {
	for _, w := range e.clients {
		w.stop()
	}
	for _, w := range e.servers {
		w.stop()
	}
	for _, r := range e.relays {
		r.stop()
	}
	var errs []error
	for _, p := range e.agents {
		if err := p.Stop(5 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	e.clients, e.servers, e.agents, e.relays = nil, nil, nil, nil
	if !e.cfg.Keep {
		if err := os.RemoveAll(e.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// proc is a process of a transport's path.
type proc struct {
	name string // client, server, agent-a, agent-b
	pid  int
	// threadPerConn: the process runs a thread per connection (stunnel),
	// whose CPU time leaves /proc/PID/task with it when the connection
	// ends; its time is read from /proc/PID/stat, which keeps it.
	threadPerConn bool
}

// cpu returns the CPU time p has used.
func (p proc) cpu() (time.Duration, error) {
	if p.threadPerConn {
		return statTime(p.pid)
	}
	return cpuTime(p.pid)
}

func (e *Env) procs(tr string) []proc {
	ps := []proc{{name: "client", pid: e.clients[tr].pid()}, {name: "server", pid: e.servers[tr].pid()}}
	switch {
	case isSinc(tr):
		ps = append(ps, proc{name: "agent-a", pid: e.agents[0].Cmd.Process.Pid}, proc{name: "agent-b", pid: e.agents[1].Cmd.Process.Pid})
	case tr == Stunnel:
		ps = append(ps, proc{name: "agent-a", pid: e.relays[0].pid(), threadPerConn: true},
			proc{name: "agent-b", pid: e.relays[1].pid(), threadPerConn: true})
	}
	return ps
}

func (e *Env) client(tr string) (*worker, error) {
	w, ok := e.clients[tr]
	if !ok {
		return nil, fmt.Errorf("bench: transport %s is not running", tr)
	}
	return w, nil
}

// call runs cmd on tr's client; on failure it adds what the server saw.
func (e *Env) call(ctx context.Context, tr string, cmd Command) (Reply, error) {
	w, err := e.client(tr)
	if err != nil {
		return Reply{}, err
	}
	rep, err := w.call(ctx, cmd)
	if err != nil {
		if srep, serr := e.servers[tr].call(ctx, Command{Op: "count", Timeout: 5 * time.Second}); serr == nil && srep.Info != "" {
			err = fmt.Errorf("%w (server: %s)", err, srep.Info)
		}
		return Reply{}, fmt.Errorf("%s: %w", tr, err)
	}
	return rep, nil
}

// BulkResult is one bulk transfer.
type BulkResult struct {
	Bytes   int64
	Seconds float64
	CPU     map[string]float64 // CPU seconds by process (client, server, agent-a, agent-b)
}

// MiBps is the throughput in MiB/s.
func (r BulkResult) MiBps() float64 { return float64(r.Bytes) / (1 << 20) / r.Seconds }

// CPUPerByte is the CPU time of every process of the path per byte, in
// nanoseconds.
func (r BulkResult) CPUPerByte() float64 {
	var s float64
	for _, v := range r.CPU {
		s += v
	}
	return s * 1e9 / float64(r.Bytes)
}

// Bulk sends bytes in 64 KiB writes from tr's client to its server and
// measures the time and the CPU time of every process on the path.
func (e *Env) Bulk(ctx context.Context, tr string, bytes int64) (BulkResult, error) {
	if _, err := e.client(tr); err != nil {
		return BulkResult{}, err
	}
	ps := e.procs(tr)
	before := make([]time.Duration, len(ps))
	for i, p := range ps {
		t, err := p.cpu()
		if err != nil {
			return BulkResult{}, err
		}
		before[i] = t
	}
	rep, err := e.call(ctx, tr, Command{Op: "bulk", Bytes: bytes})
	if err != nil {
		return BulkResult{}, err
	}
	r := BulkResult{Bytes: rep.Bytes, Seconds: rep.Seconds, CPU: map[string]float64{}}
	for i, p := range ps {
		t, err := p.cpu()
		if err != nil {
			return BulkResult{}, err
		}
		r.CPU[p.name] = (t - before[i]).Seconds()
	}
	if r.Bytes != bytes || r.Seconds <= 0 {
		return r, fmt.Errorf("%s: bulk: %d bytes in %gs", tr, r.Bytes, r.Seconds)
	}
	return r, nil
}

// Latency is a set of timed operations.
type Latency struct {
	N                   int
	Seconds             float64 // all of them
	P50, P99, Mean, Max time.Duration
}

// PerSec is operations per second.
func (l Latency) PerSec() float64 { return float64(l.N) / l.Seconds }

func latencyOf(rep Reply) Latency {
	return Latency{N: rep.N, Seconds: rep.Seconds, P50: time.Duration(rep.P50), P99: time.Duration(rep.P99),
		Mean: time.Duration(rep.Mean), Max: time.Duration(rep.Max)}
}

// PingPong times up to n round trips of a size-byte message on one
// connection, for at most maxTime (0: no limit but n).
func (e *Env) PingPong(ctx context.Context, tr string, n, size int, maxTime time.Duration) (Latency, error) {
	rep, err := e.call(ctx, tr, Command{Op: "pingpong", N: n, Size: size, MaxTime: maxTime})
	if err != nil {
		return Latency{}, err
	}
	return latencyOf(rep), nil
}

// Rate is a one-way message transfer.
type Rate struct {
	N       int
	Bytes   int64
	Seconds float64
}

// PerSec is messages per second.
func (r Rate) PerSec() float64 { return float64(r.N) / r.Seconds }

// MsgRate sends up to n messages of size bytes one way, for at most
// maxTime, batched or one write per message (the report's Batched and
// OneWrite say what each means per transport), and waits for the server's
// count.
func (e *Env) MsgRate(ctx context.Context, tr string, size, n int, batched bool, maxTime time.Duration) (Rate, error) {
	rep, err := e.call(ctx, tr, Command{Op: "msgrate", N: n, Size: size, Batched: batched, MaxTime: maxTime})
	if err != nil {
		return Rate{}, err
	}
	return Rate{N: rep.N, Bytes: rep.Bytes, Seconds: rep.Seconds}, nil
}

// Setup runs up to n open+close cycles, for at most maxTime, from conc
// concurrent openers in tr's client; the latencies are those of the
// opens.
func (e *Env) Setup(ctx context.Context, tr string, n, conc int, maxTime time.Duration) (Latency, error) {
	rep, err := e.call(ctx, tr, Command{Op: "setup", N: n, Conc: conc, MaxTime: maxTime})
	if err != nil {
		return Latency{}, err
	}
	return latencyOf(rep), nil
}

// IdleResult is the memory of idle connections, at each count.
type IdleResult struct {
	Counts []int
	// AgentBytes: the growth of both agents' RSS together, per channel
	// (sinc only).
	AgentBytes []float64
	// EndpointBytes: the growth of the client's and the server's RSS
	// together, per connection.
	EndpointBytes []float64
}

// Idle opens idle connections up to each of counts in turn (ascending),
// measuring the RSS of the processes before and at each count (settle
// after the last open), then closes them. Memory a process has grown does not shrink back in time for
// another measurement: use an Env of its own, fresh.
func (e *Env) Idle(ctx context.Context, tr string, counts []int, conc int, settle time.Duration) (IdleResult, error) {
	w, err := e.client(tr)
	if err != nil {
		return IdleResult{}, err
	}
	ps := e.procs(tr)
	measure := func() ([]int64, error) {
		r := make([]int64, len(ps))
		for i, p := range ps {
			v, err := rss(p.pid)
			if err != nil {
				return nil, err
			}
			r[i] = v
		}
		return r, nil
	}
	base, err := measure()
	if err != nil {
		return IdleResult{}, err
	}
	defer w.call(ctx, Command{Op: "release"})
	res := IdleResult{Counts: counts}
	held := 0
	for _, n := range counts {
		if n <= held {
			return res, fmt.Errorf("bench: idle counts must ascend: %v", counts)
		}
		rep, err := e.call(ctx, tr, Command{Op: "idle", N: n - held, Conc: conc})
		if err != nil {
			return res, err
		}
		if held = rep.Conns; held != n {
			return res, fmt.Errorf("%s: holding %d connections, want %d", tr, held, n)
		}
		if err := e.waitServer(ctx, tr, n); err != nil {
			return res, err
		}
		if isSinc(tr) {
			if err := e.checkRings(tr, n); err != nil {
				return res, err
			}
		}
		time.Sleep(settle) // let the agents finish what the opens started
		now, err := measure()
		if err != nil {
			return res, err
		}
		var agents, ends int64
		for i, p := range ps {
			if p.name == "client" || p.name == "server" {
				ends += now[i] - base[i]
			} else {
				agents += now[i] - base[i]
			}
		}
		if isSinc(tr) {
			res.AgentBytes = append(res.AgentBytes, float64(agents)/float64(n))
		}
		res.EndpointBytes = append(res.EndpointBytes, float64(ends)/float64(n))
	}
	return res, nil
}

// waitServer waits until tr's server holds n live connections.
func (e *Env) waitServer(ctx context.Context, tr string, n int) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		rep, err := e.servers[tr].call(ctx, Command{Op: "count", Timeout: 5 * time.Second})
		if err != nil {
			return err
		}
		if rep.Conns == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: the server holds %d connections, want %d (%s)", tr, rep.Conns, n, rep.Info)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// PIDs returns the processes of tr's path, by name (for profiling).
func (e *Env) PIDs(tr string) map[string]int {
	m := map[string]int{}
	for _, p := range e.procs(tr) {
		m[p.name] = p.pid
	}
	return m
}
