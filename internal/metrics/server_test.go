package metrics

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestServer: /metrics answers GET with the registry's metrics, the
// runtime's and the process's among them; any other path or method is
// refused; Close stops the listener.
func TestServer(t *testing.T) {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "sinc_test_gauge", Help: "a test gauge"})
	g.Set(42)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := Start(ln, NewRegistry(g), slog.New(slog.DiscardHandler))
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	base := "http://" + ln.Addr().String()

	resp, err := client.Get(base + Path)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"sinc_test_gauge 42\n", "go_goroutines ", "process_open_fds "} {
		if !strings.Contains(string(body), want) {
			t.Errorf("GET %s lacks %q", Path, want)
		}
	}
	for _, c := range []struct {
		method, path string
		code         int
	}{{"GET", "/", 404}, {"GET", "/debug/pprof/", 404}, {"POST", Path, 405}} {
		req, _ := http.NewRequest(c.method, base+c.path, nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.code {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.code)
		}
	}
	s.Close()
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Error("the listener is open after Close")
	}
}

// blocking is a collector whose Collect waits for release.
type blocking struct {
	entered chan struct{}
	release chan struct{}
}

func (b blocking) Describe(ch chan<- *prometheus.Desc) {}
func (b blocking) Collect(ch chan<- prometheus.Metric) {
	b.entered <- struct{}{}
	<-b.release
}

// TestServerBounds: scrapes past MaxInFlight get 503 at once; connections
// past MaxConns wait until one closes.
func TestServerBounds(t *testing.T) {
	b := blocking{entered: make(chan struct{}, MaxInFlight+1), release: make(chan struct{})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := Start(ln, NewRegistry(b), slog.New(slog.DiscardHandler))
	defer s.Close()
	base := "http://" + ln.Addr().String()
	get := func() (int, error) {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Get(base + Path)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	codes := make(chan int, MaxInFlight)
	for range MaxInFlight {
		go func() { c, _ := get(); codes <- c }()
		<-b.entered // this scrape is in Collect, holding its place
	}
	if c, err := get(); err != nil || c != http.StatusServiceUnavailable {
		t.Errorf("scrape past %d in flight: %d %v, want 503", MaxInFlight, c, err)
	}
	close(b.release)
	for range MaxInFlight {
		if c := <-codes; c != 200 {
			t.Errorf("a held scrape ended %d", c)
		}
	}

	// MaxConns idle connections: the next scrape waits for one to close.
	var idle []net.Conn
	for range MaxConns {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	time.Sleep(50 * time.Millisecond) // the server has taken them
	done := make(chan int, 1)
	go func() {
		c, _ := get()
		done <- c
	}()
	select {
	case c := <-done:
		t.Fatalf("a scrape past %d connections was answered (%d)", MaxConns, c)
	case <-time.After(300 * time.Millisecond):
	}
	idle[0].Close()
	select {
	case c := <-done:
		if c != 200 {
			t.Errorf("the waiting scrape ended %d", c)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting scrape was not answered once a connection closed")
	}
	for _, c := range idle[1:] {
		c.Close()
	}
}
