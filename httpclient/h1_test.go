package httpclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// rawServer accepts connections and hands each to serve, in a goroutine
// the test waits for.
func rawServer(t *testing.T, serve func(c net.Conn, n int)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Go(func() {
		for n := 0; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer c.Close(); serve(c, n) })
		}
	})
	return ln.Addr().String()
}

// readRequest reads one request from br and its body.
func readRequest(br *bufio.Reader) (*http.Request, error) {
	r, err := http.ReadRequest(br)
	if err == nil {
		_, err = io.Copy(io.Discard, r.Body)
	}
	return r, err
}

// TestStaleConnectionIsReplayed: a server that closes a keep-alive
// connection after one answer, without saying so, makes the next request
// on it fail before any answer; that request is sent again on a new
// connection, within the same attempt.
func TestStaleConnectionIsReplayed(t *testing.T) {
	var served atomic.Int64
	addr := rawServer(t, func(c net.Conn, _ int) {
		if _, err := readRequest(bufio.NewReader(c)); err != nil {
			return
		}
		served.Add(1)
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	for i := range 5 {
		res, err := s.Send(context.Background(), post("http://"+addr+"/x", []byte(`{}`)), fmt.Sprintf("k-%d", i))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if res.Attempts != 1 {
			t.Errorf("request %d took %d attempts, want 1 (the replay is part of the attempt)", i, res.Attempts)
		}
	}
	if got := served.Load(); got != 5 {
		t.Errorf("server answered %d requests, want 5", got)
	}
}

// TestStaleConnectionWithoutKeyIsNotReplayed: a POST without an
// Idempotency-Key that may have reached the server is not sent again by
// the transport: the attempt fails, and the Sender's retry policy decides.
func TestStaleConnectionWithoutKeyIsNotReplayed(t *testing.T) {
	addr := rawServer(t, func(c net.Conn, n int) {
		br := bufio.NewReader(c)
		if _, err := readRequest(br); err != nil {
			return
		}
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
		_, _ = readRequest(br) // the second request: read, then closed unanswered
	})
	tr := newH1Transport(&http.Transport{MaxConnsPerHost: 4, IdleConnTimeout: time.Minute}, (&net.Dialer{}).DialContext)
	defer tr.CloseIdleConnections()
	send := func() error {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/x", strings.NewReader("{}"))
		resp, err := tr.RoundTrip(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
		}
		return err
	}
	if err := send(); err != nil {
		t.Fatal(err)
	}
	if err := send(); err == nil {
		t.Fatal("a POST without Idempotency-Key was replayed after the server read it")
	}
}

// TestMaxConnsPerHost: no more connections than max_conns_per_host are
// open at once; the requests beyond wait for one and all succeed.
func TestMaxConnsPerHost(t *testing.T) {
	var open, peak atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(2 * time.Millisecond)
	}))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			n := open.Add(1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	srv.Start()
	defer srv.Close()
	h := baseHTTP()
	h.MaxConnsPerHost = 3
	s, _ := newTestSender(t, h, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Go(func() {
			if _, err := s.Send(context.Background(), post(srv.URL+"/x", []byte(`{}`)), fmt.Sprintf("k-%d", i)); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if p := peak.Load(); p > 3 || p == 0 {
		t.Errorf("peak of %d open connections, want 1 to 3", p)
	}
}

// TestWaitForConnectionEndsWithContext: a request waiting for a connection
// gives up when its context ends, and the place it waited for still serves
// the next request.
func TestWaitForConnectionEndsWithContext(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			<-release
		}
	}))
	defer srv.Close()
	defer close(release)
	tr := newH1Transport(&http.Transport{MaxConnsPerHost: 1, IdleConnTimeout: time.Minute}, (&net.Dialer{}).DialContext)
	defer tr.CloseIdleConnections()
	get := func(ctx context.Context, path string) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+path, nil)
		resp, err := tr.RoundTrip(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
		}
		return err
	}
	slow := make(chan error, 1)
	go func() { slow <- get(context.Background(), "/slow") }()
	waitFor(t, 5*time.Second, "the slow request holds the connection", func() bool {
		tr.mu.Lock()
		h := tr.hosts[srv.Listener.Addr().String()]
		tr.mu.Unlock()
		if h == nil {
			return false
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.conns == 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := get(ctx, "/fast"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waiting request: %v, want context.DeadlineExceeded", err)
	}
	release <- struct{}{}
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
	if err := get(context.Background(), "/fast"); err != nil {
		t.Fatalf("after the wait: %v", err)
	}
}

// TestCancelDuringAnswer: an answer that stops coming is cut when the
// context ends, with the context's error, and its connection is not reused.
func TestCancelDuringAnswer(t *testing.T) {
	var conns atomic.Int64
	addr := rawServer(t, func(c net.Conn, _ int) {
		conns.Add(1)
		br := bufio.NewReader(c)
		for {
			r, err := readRequest(br)
			if err != nil {
				return
			}
			if r.URL.Path == "/stall" {
				_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
				_, _ = io.Copy(io.Discard, c) // until the client closes
				return
			}
			_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	tr := newH1Transport(&http.Transport{IdleConnTimeout: time.Minute}, (&net.Dialer{}).DialContext)
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/stall", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(20*time.Millisecond, cancel)
	if _, err := io.ReadAll(resp.Body); !errors.Is(err, context.Canceled) {
		t.Fatalf("reading the stalled answer: %v, want context.Canceled", err)
	}
	_ = resp.Body.Close()
	req, _ = http.NewRequest(http.MethodGet, "http://"+addr+"/ok", nil)
	if resp, err = tr.RoundTrip(req); err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if string(b) != "ok" || conns.Load() != 2 {
		t.Errorf("got %q on connection %d, want \"ok\" on a second connection", b, conns.Load())
	}
}

// TestInformationalAnswersAreSkipped: 1xx answers before the final one are
// read past.
func TestInformationalAnswersAreSkipped(t *testing.T) {
	addr := rawServer(t, func(c net.Conn, _ int) {
		if _, err := readRequest(bufio.NewReader(c)); err != nil {
			return
		}
		_, _ = io.WriteString(c, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"+
			"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	res, err := s.Send(context.Background(), post("http://"+addr+"/x", []byte(`{}`)), "k")
	if err != nil || res.Status != http.StatusCreated {
		t.Fatalf("status %d, %v; want 201", res.Status, err)
	}
}

// TestIdleConnectionsExpire: idle connections are closed after
// idle_conn_timeout, and a host without connections is forgotten.
func TestIdleConnectionsExpire(t *testing.T) {
	var open atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed:
			open.Add(-1)
		}
	}
	srv.Start()
	defer srv.Close()
	h := baseHTTP()
	h.IdleConnTimeout = d(50 * time.Millisecond)
	s, _ := newTestSender(t, h, nil)
	if _, err := s.Send(context.Background(), post(srv.URL+"/x", nil), "k"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the idle connection closes and the host is forgotten", func() bool {
		s.h1.mu.Lock()
		defer s.h1.mu.Unlock()
		return open.Load() == 0 && len(s.h1.hosts) == 0
	})
}

// TestAliveSeesAClose: the idle check tells an open connection from one
// the server closed.
func TestAliveSeesAClose(t *testing.T) {
	closeIt := make(chan struct{})
	addr := rawServer(t, func(c net.Conn, _ int) { <-closeIt })
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	long := time.Now().Add(-time.Minute)
	if !alive(nc, long) {
		t.Fatal("an open connection reported closed")
	}
	close(closeIt)
	waitFor(t, 5*time.Second, "the close is seen", func() bool { return !alive(nc, long) })
}

// TestProxiedHostsUseTheFallback: a host the proxy settings send through a
// proxy is left to net/http, which speaks to the proxy.
func TestProxiedHostsUseTheFallback(t *testing.T) {
	var proxied atomic.Int64
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.IsAbs() && r.URL.Host == "target.invalid" {
			proxied.Add(1)
		}
	}))
	defer proxy.Close()
	pu, _ := url.Parse(proxy.URL)
	tr := newH1Transport(&http.Transport{Proxy: http.ProxyURL(pu), IdleConnTimeout: time.Minute}, (&net.Dialer{}).DialContext)
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodGet, "http://target.invalid/x", nil)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if proxied.Load() != 1 {
		t.Fatal("the request did not go through the proxy")
	}
}

// TestInvalidHeaderIsRefused: a header value net/http would refuse is
// refused with net/http's error, before anything is sent.
func TestInvalidHeaderIsRefused(t *testing.T) {
	tr := newH1Transport(&http.Transport{IdleConnTimeout: time.Minute}, func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("dialed")
	})
	req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1:1/x", nil)
	req.Header.Set("X-Bad", "a\r\nInjected: yes")
	if _, err := tr.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "invalid header field value") {
		t.Fatalf("got %v, want an invalid header error", err)
	}
}

// TestTargetGoneIsAConnectionFailure: when the target goes away, an attempt
// that takes a pooled connection (now dead), replays on a new one and
// cannot connect got no connection: like a refused dial, it does not count
// toward max_attempts.
func TestTargetGoneIsAConnectionFailure(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	s, _ := newTestSender(t, baseHTTP(), nil)
	url := srv.URL + "/x"
	if _, err := s.Send(context.Background(), post(url, []byte(`{}`)), "k-0"); err != nil {
		t.Fatal(err)
	}
	srv.Close() // the pooled connection dies with the listener
	st, c := attemptOnce(s, post(url, []byte(`{}`)))
	if st.Outcome != Retry {
		t.Fatalf("outcome %v (%v), want Retry", st.Outcome, st.Err)
	}
	if c.Counted() != 0 {
		t.Errorf("the attempt counted toward max_attempts (%v): the target refused the connection", st.Err)
	}
}

// TestHTTPSUsesTheTransport: https requests make their round trips on the
// calling goroutine too, over a TLS handshake with the fallback's settings,
// and reuse their connection.
func TestHTTPSUsesTheTransport(t *testing.T) {
	srv, conns := countingServer(t, true, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	trustServer(s, srv)
	for i := range 5 {
		if _, err := s.Send(context.Background(), post(srv.URL+"/x", []byte(`{}`)), fmt.Sprintf("k-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	s.h1.mu.RLock()
	_, ok := s.h1.hosts["https://"+srv.Listener.Addr().String()]
	s.h1.mu.RUnlock()
	if !ok {
		t.Error("the https requests did not go through the HTTP/1.1 transport")
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections for 5 sequential requests, want 1", n)
	}
}

// TestTLSHandshakeTimeout: a server that accepts and never answers the
// handshake costs the attempt TLSHandshakeTimeout, with net/http's error.
func TestTLSHandshakeTimeout(t *testing.T) {
	addr := rawServer(t, func(c net.Conn, _ int) { _, _ = io.Copy(io.Discard, c) })
	tr := newH1Transport(&http.Transport{TLSHandshakeTimeout: 50 * time.Millisecond, IdleConnTimeout: time.Minute}, (&net.Dialer{}).DialContext)
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodGet, "https://"+addr+"/x", nil)
	if _, err := tr.RoundTrip(req); !errors.Is(err, errTLSHandshakeTimeout) {
		t.Fatalf("got %v, want %v", err, errTLSHandshakeTimeout)
	}
}

// TestEarlyAnswerToALargeBody: a server that answers before reading a body
// larger than the socket buffers (a 413 from a size limit) and closes gets
// its answer through, as net/http returns it, not the write error.
func TestEarlyAnswerToALargeBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		w.WriteHeader(http.StatusRequestEntityTooLarge)
		_, _ = io.WriteString(w, "too large")
	}))
	defer srv.Close()
	tr := newH1Transport(&http.Transport{IdleConnTimeout: time.Minute}, (&net.Dialer{}).DialContext)
	defer tr.CloseIdleConnections()
	body := strings.Repeat("x", 64<<20)
	req, err := http.NewRequest(http.MethodPost, srv.URL+"/upload", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("round trip: %v, want the server's 413", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestEntityTooLarge || string(b) != "too large" {
		t.Errorf("answer %d %q, want 413 \"too large\"", resp.StatusCode, b)
	}
}
