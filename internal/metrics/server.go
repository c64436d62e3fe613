// Package metrics serves an agent's metrics over HTTP in the Prometheus
// exposition formats (github.com/prometheus/client_golang), at /metrics and
// nowhere else.
//
// What is served is the agent's to say (internal/agent/metrics.go): counts,
// states and a build label, never a key, never a label per channel or per
// process. The server is bounded: a request's headers must come within
// ReadHeaderTimeout and fit MaxHeaderBytes, at most MaxConns connections
// are open at once (more wait in the kernel's backlog), at most MaxInFlight
// scrapes are answered at once (more get 503), and a scrape that has not
// been written within WriteTimeout is cut off. Anyone who can reach the address may read
// the metrics: bind it to loopback, or to an address only the monitoring
// system reaches.
package metrics

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
)

// Path is where the metrics are served.
const Path = "/metrics"

// Bounds of the server.
const (
	ReadHeaderTimeout = 5 * time.Second
	WriteTimeout      = 10 * time.Second
	IdleTimeout       = 60 * time.Second
	MaxHeaderBytes    = 8 << 10
	MaxConns          = 16
	MaxInFlight       = 4
)

// Server serves metrics on one listener.
type Server struct {
	srv  *http.Server
	done chan struct{}
}

// NewRegistry returns a registry holding c, with the Go runtime's and the
// process's standard collectors beside it (go_*, process_*: the agent's
// heap, resident memory, open files and CPU). It panics if c describes a
// metric of those collectors: a mistake in the code, not in input.
func NewRegistry(c prometheus.Collector) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Start serves g's metrics on ln until Close. Errors of single requests go
// to log.
func Start(ln net.Listener, g prometheus.Gatherer, log *slog.Logger) *Server {
	mux := http.NewServeMux()
	mux.Handle("GET "+Path, promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog:            slogPrinter{log},
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: MaxInFlight,
		Timeout:             WriteTimeout - time.Second,
	}))
	s := &Server{
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: ReadHeaderTimeout,
			WriteTimeout:      WriteTimeout,
			IdleTimeout:       IdleTimeout,
			MaxHeaderBytes:    MaxHeaderBytes,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		},
		done: make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(netutil.LimitListener(ln, MaxConns)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	return s
}

// Close stops the server: the listener closes at once, scrapes under way
// get a moment to finish, and Close returns once the server is gone.
func (s *Server) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if s.srv.Shutdown(ctx) != nil {
		s.srv.Close()
	}
	<-s.done
}

// slogPrinter passes promhttp's errors to the log.
type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) {
	p.log.Warn("metrics scrape error", "err", v)
}
