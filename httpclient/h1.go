package httpclient

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptrace"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Transport makes the round trips of HTTP/1.1 requests (http and https)
// itself, on the goroutine that calls RoundTrip: it writes the request and reads the
// answer on a pooled connection, with no goroutine per connection and no
// hand-off between goroutines per request, which cost net/http's Transport
// more CPU than the rest of a request (docs/DESIGN.md, Decisions,
// "HTTP/1.1 round trips on the sender's goroutine"). It keeps the shared
// transport's connection policy (max_conns_per_host, idle_conn_timeout, its
// dialer and so max_conn_age, its TLS configuration and handshake timeout,
// HTTP/1.1 only) and hands everything else to that transport: proxied
// hosts, bodies of unknown length, trailers.
//
// Of httptrace it calls GotConn only, before writing the request (the
// Sender's connection hook, which may add Connection: close to its headers).
type h1Transport struct {
	fallback    *http.Transport
	dial        func(ctx context.Context, network, addr string) (net.Conn, error)
	maxIdle     int // per host
	idleTimeout time.Duration

	mu    sync.RWMutex // protects hosts
	hosts map[string]*h1Host
}

// h1Host is the connection pool of one scheme://host:port.
type h1Host struct {
	t       *h1Transport
	key     string      // scheme://host:port
	addr    string      // host:port
	tls     *tls.Config // https: the handshake's; nil for http
	proxied bool        // its requests go through a proxy: fallback's

	mu      sync.Mutex
	idle    []*h1Conn // oldest first; the newest is reused first
	conns   int       // open or being dialed, idle included
	waiters []chan *h1Conn
	sweep   *time.Timer // closes expired idle connections; nil when not armed
}

// h1Conn is one connection of an h1Host.
type h1Conn struct {
	h      *h1Host
	nc     net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	idleAt time.Time // when it was put back in the pool
	reused bool      // it carried a request before this one
	cut    func()    // stops the exchange under way: what a canceled attempt runs
}

// aLongTimeAgo is a deadline that makes blocked reads and writes return at
// once: how a canceled attempt stops its round trip.
var aLongTimeAgo = time.Unix(1, 0)

func newH1Transport(fallback *http.Transport, dial func(context.Context, string, string) (net.Conn, error)) *h1Transport {
	return &h1Transport{fallback: fallback, dial: dial,
		maxIdle:     positiveOr(fallback.MaxIdleConnsPerHost, http.DefaultMaxIdleConnsPerHost),
		idleTimeout: positiveOr(fallback.IdleConnTimeout, defaultIdleConnTimeout), hosts: make(map[string]*h1Host)}
}

// RoundTrip implements http.RoundTripper. It closes req.Body.
func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if (req.URL.Scheme != "http" && req.URL.Scheme != "https") || len(req.TransferEncoding) > 0 || req.Trailer != nil ||
		(req.ContentLength <= 0 && req.Body != nil && req.Body != http.NoBody) ||
		!plainHost(req.URL.Host) || !plainHost(req.Host) {
		return t.fallback.RoundTrip(req)
	}
	h := t.host(req)
	if h.proxied {
		return t.fallback.RoundTrip(req)
	}
	if err := validRequest(req); err != nil {
		closeBody(req)
		return nil, err
	}
	ctx := req.Context()
	for {
		pc, err := h.get(ctx)
		if err != nil {
			closeBody(req)
			return nil, err
		}
		if tr := httptrace.ContextClientTrace(ctx); tr != nil && tr.GotConn != nil {
			info := httptrace.GotConnInfo{Conn: pc.nc, Reused: pc.reused, WasIdle: pc.reused}
			if pc.reused {
				info.IdleTime = time.Since(pc.idleAt)
			}
			tr.GotConn(info)
		}
		resp, stale, err := pc.roundTrip(ctx, req)
		if err == nil || !stale || ctx.Err() != nil || req.GetBody == nil && req.Body != nil && req.Body != http.NoBody {
			return resp, err
		}
		// A reused connection the server had closed: send again on another,
		// as net/http does (see stale). Each time costs a pooled
		// connection; a new one is never stale.
		if req.GetBody != nil {
			next := *req
			if next.Body, err = req.GetBody(); err != nil {
				return nil, err
			}
			req = &next
		}
	}
}

// host returns the pool of req's scheme://host:port.
func (t *h1Transport) host(req *http.Request) *h1Host {
	https := req.URL.Scheme == "https"
	addr := req.URL.Host
	if req.URL.Port() == "" {
		port := "80"
		if https {
			port = "443"
		}
		addr = net.JoinHostPort(req.URL.Hostname(), port)
	}
	key := addr
	if https {
		key = "https://" + addr
	}
	t.mu.RLock()
	h := t.hosts[key]
	t.mu.RUnlock()
	if h != nil {
		return h
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	h = t.hosts[key]
	if h == nil {
		h = &h1Host{t: t, key: key, addr: addr}
		if https {
			// As net/http configures its handshakes: the fallback's
			// settings, the URL's host name, HTTP/1.1 only.
			h.tls = &tls.Config{}
			if t.fallback.TLSClientConfig != nil {
				h.tls = t.fallback.TLSClientConfig.Clone()
			}
			if h.tls.ServerName == "" {
				h.tls.ServerName = req.URL.Hostname()
			}
			h.tls.NextProtos = []string{"http/1.1"}
		}
		if t.fallback.Proxy != nil {
			// The environment's proxy settings are read once per process,
			// so whether a host is proxied does not change.
			p, err := t.fallback.Proxy(req)
			h.proxied = p != nil || err != nil
		}
		t.hosts[key] = h
	}
	return h
}

// CloseIdleConnections closes the idle connections of every host, and the
// fallback's.
func (t *h1Transport) CloseIdleConnections() {
	t.fallback.CloseIdleConnections()
	t.mu.RLock()
	hosts := slices.Collect(maps.Values(t.hosts))
	t.mu.RUnlock()
	for _, h := range hosts {
		h.mu.Lock()
		idle := h.idle
		h.idle = nil
		h.conns -= len(idle)
		if h.sweep != nil {
			h.sweep.Stop()
			h.sweep = nil
		}
		h.mu.Unlock()
		for _, pc := range idle {
			_ = pc.nc.Close()
		}
	}
}

// get returns an idle connection of h, or a new one, waiting for one while
// h has max_conns_per_host (the fallback's MaxConnsPerHost; 0: unlimited)
// open.
func (h *h1Host) get(ctx context.Context) (*h1Conn, error) {
	h.mu.Lock()
	for len(h.idle) > 0 {
		pc := h.idle[len(h.idle)-1]
		h.idle[len(h.idle)-1] = nil
		h.idle = h.idle[:len(h.idle)-1]
		if time.Since(pc.idleAt) < h.t.idleTimeout && pc.br.Buffered() == 0 && alive(pc.nc, pc.idleAt) {
			h.mu.Unlock()
			pc.reused = true
			return pc, nil
		}
		h.conns--
		_ = pc.nc.Close()
	}
	if maxConns := h.t.fallback.MaxConnsPerHost; maxConns <= 0 || h.conns < maxConns {
		h.conns++
		h.mu.Unlock()
		return h.dial(ctx)
	}
	w := make(chan *h1Conn, 1)
	h.waiters = append(h.waiters, w)
	h.mu.Unlock()
	select {
	case pc := <-w:
		if pc == nil {
			return h.dial(ctx) // a connection closed: its place is ours
		}
		pc.reused = true
		return pc, nil
	case <-ctx.Done():
		h.mu.Lock()
		for i, x := range h.waiters {
			if x == w {
				h.waiters = append(h.waiters[:i], h.waiters[i+1:]...)
				h.mu.Unlock()
				return nil, ctxErr(ctx)
			}
		}
		h.mu.Unlock()
		// Handed something meanwhile: pass it on.
		if pc := <-w; pc != nil {
			h.put(pc)
		} else {
			h.closed()
		}
		return nil, ctxErr(ctx)
	}
}

// dial opens a connection in a place get reserved, with its TLS handshake
// for https (bounded by the fallback's TLSHandshakeTimeout).
func (h *h1Host) dial(ctx context.Context) (*h1Conn, error) {
	nc, err := h.t.dial(ctx, "tcp", h.addr)
	if err == nil && h.tls != nil {
		nc, err = h.handshake(ctx, nc)
	}
	if err != nil {
		h.closed()
		if ctx.Err() != nil {
			return nil, ctxErr(ctx)
		}
		return nil, err
	}
	pc := &h1Conn{h: h, nc: nc, br: bufio.NewReaderSize(nc, 4096), bw: bufio.NewWriterSize(nc, 4096)}
	pc.cut = func() { _ = nc.SetDeadline(aLongTimeAgo) }
	return pc, nil
}

// handshake runs the TLS handshake on nc, and closes nc if it fails.
func (h *h1Host) handshake(ctx context.Context, nc net.Conn) (net.Conn, error) {
	hctx := ctx
	if d := h.t.fallback.TLSHandshakeTimeout; d > 0 {
		var cancel context.CancelFunc
		hctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	tc := tls.Client(nc, h.tls)
	if err := tc.HandshakeContext(hctx); err != nil {
		_ = nc.Close()
		if hctx.Err() != nil && ctx.Err() == nil {
			return nil, errTLSHandshakeTimeout
		}
		return nil, err
	}
	return tc, nil
}

// errTLSHandshakeTimeout is net/http's error for a handshake that took
// longer than TLSHandshakeTimeout.
var errTLSHandshakeTimeout = errors.New("net/http: TLS handshake timeout")

// put returns a connection whose answer was read in full to the pool (or to
// a waiter).
func (h *h1Host) put(pc *h1Conn) {
	h.mu.Lock()
	if len(h.waiters) > 0 {
		w := h.waiters[0]
		h.waiters = h.waiters[1:]
		h.mu.Unlock()
		w <- pc
		return
	}
	if len(h.idle) >= h.t.maxIdle {
		h.conns--
		h.mu.Unlock()
		_ = pc.nc.Close()
		return
	}
	pc.idleAt = time.Now()
	h.idle = append(h.idle, pc)
	h.armSweep()
	h.mu.Unlock()
}

// closed frees the place of a connection closed (or never opened) for a
// waiter, if any.
func (h *h1Host) closed() {
	h.mu.Lock()
	if len(h.waiters) > 0 {
		w := h.waiters[0]
		h.waiters = h.waiters[1:]
		h.mu.Unlock()
		w <- nil // the waiter dials in this place
		return
	}
	h.conns--
	h.armSweep()
	h.mu.Unlock()
}

// armSweep makes sure a sweep will run (h.mu held).
func (h *h1Host) armSweep() {
	if h.sweep == nil {
		h.sweep = time.AfterFunc(h.t.idleTimeout, h.expire)
	}
}

// expire closes the idle connections past idle_conn_timeout, and forgets h
// once it has no connection at all (a later request makes a new pool).
func (h *h1Host) expire() {
	t := h.t
	t.mu.Lock()
	h.mu.Lock()
	h.sweep = nil
	n := 0
	for n < len(h.idle) && time.Since(h.idle[n].idleAt) >= t.idleTimeout {
		n++
	}
	old := slices.Clone(h.idle[:n])
	h.idle = slices.Delete(h.idle, 0, n)
	h.conns -= n
	switch {
	case len(h.idle) > 0:
		h.sweep = time.AfterFunc(t.idleTimeout-time.Since(h.idle[0].idleAt), h.expire)
	case h.conns == 0 && len(h.waiters) == 0 && t.hosts[h.key] == h:
		delete(t.hosts, h.key)
	}
	h.mu.Unlock()
	t.mu.Unlock()
	for _, pc := range old {
		_ = pc.nc.Close()
	}
}

// roundTrip writes req on pc and reads the answer's head. The answer's body
// reads from pc, which goes back to the pool once it is read to the end
// (h1Body). stale reports a failure that happened before the server
// answered a byte on a reused connection, which a request may be replayed
// after: writing failed (the server did not get it whole), or the server
// closed the connection without answering, as servers do to idle
// connections (replayed only when the request is idempotent or carries an
// Idempotency-Key, as net/http does).
func (pc *h1Conn) roundTrip(ctx context.Context, req *http.Request) (resp *http.Response, stale bool, err error) {
	stop := context.AfterFunc(ctx, pc.cut)
	fail := func(err error, stale bool) (*http.Response, bool, error) {
		stop()
		pc.drop()
		if ctx.Err() != nil {
			return nil, false, ctxErr(ctx)
		}
		return nil, stale && pc.reused, err
	}
	writeErr := pc.write(req)
	if writeErr != nil && !pc.answered(ctx) {
		return fail(writeErr, true)
	}
	if _, err := pc.br.Peek(1); err != nil {
		return fail(err, replayable(req))
	}
	resp, err = http.ReadResponse(pc.br, req)
	for n := 0; err == nil && resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols; n++ {
		if n == 5 {
			return fail(errors.New("too many 1xx informational responses"), false)
		}
		resp, err = http.ReadResponse(pc.br, req)
	}
	if err != nil {
		return fail(err, false)
	}
	last := writeErr != nil || resp.Close || req.Close || resp.StatusCode == http.StatusSwitchingProtocols ||
		httpguts.HeaderValuesContainsToken(req.Header["Connection"], "close")
	if resp.Body == http.NoBody {
		pc.done(stop, last)
		return resp, false, nil
	}
	resp.Body = &h1Body{rc: resp.Body, ctx: ctx, pc: pc, stop: stop, last: last}
	return resp, false, nil
}

// answered reports whether the server sent something before writing to it
// failed: a server may answer before it has read the whole request and
// close (a 413 for a body over its limit), and its answer is then in the
// socket's buffer. net/http reads answers while it writes and returns
// that one; so does roundTrip, reading what came within earlyAnswerWait.
func (pc *h1Conn) answered(ctx context.Context) bool {
	// A canceled attempt (its cut failed the write) does not wait.
	if ctx.Err() != nil || pc.nc.SetReadDeadline(time.Now().Add(earlyAnswerWait)) != nil {
		return false
	}
	_, err := pc.br.Peek(1)
	// Clearing the deadline may undo a cut: a canceled attempt stops here.
	return pc.nc.SetReadDeadline(time.Time{}) == nil && ctx.Err() == nil && err == nil
}

// earlyAnswerWait bounds how long a failed write waits for an answer the
// server sent before it closed.
const earlyAnswerWait = 50 * time.Millisecond

// done ends a round trip whose answer was read in full: the connection goes
// back to the pool, unless it was its last or the attempt was canceled.
func (pc *h1Conn) done(stop func() bool, last bool) {
	if !stop() || last {
		pc.drop()
		return
	}
	pc.h.put(pc)
}

// drop closes pc and frees its place in the pool.
func (pc *h1Conn) drop() {
	_ = pc.nc.Close()
	pc.h.closed()
}

// write writes req's head and body, with one write when they fit the
// buffer, and closes the body.
func (pc *h1Conn) write(req *http.Request) error {
	w := pc.bw
	host := hostHeader(req)
	_, _ = w.WriteString(req.Method)
	_ = w.WriteByte(' ')
	_, _ = w.WriteString(req.URL.RequestURI())
	_, _ = w.WriteString(" HTTP/1.1\r\nHost: ")
	_, _ = w.WriteString(host)
	_, _ = w.WriteString("\r\n")
	if _, ok := req.Header["User-Agent"]; !ok {
		_, _ = w.WriteString("User-Agent: Go-http-client/1.1\r\n")
	}
	for k, vs := range req.Header {
		switch k {
		case "Host", "Content-Length", "Transfer-Encoding", "Trailer":
			continue
		}
		for _, v := range vs {
			_, _ = w.WriteString(k)
			_, _ = w.WriteString(": ")
			_, _ = w.WriteString(v)
			_, _ = w.WriteString("\r\n")
		}
	}
	switch {
	case req.ContentLength > 0:
		var n [24]byte
		_, _ = w.WriteString("Content-Length: ")
		_, _ = w.Write(strconv.AppendInt(n[:0], req.ContentLength, 10))
		_, _ = w.WriteString("\r\n")
	case req.Method == http.MethodPost || req.Method == http.MethodPut || req.Method == http.MethodPatch:
		_, _ = w.WriteString("Content-Length: 0\r\n")
	}
	_, _ = w.WriteString("\r\n")
	if req.Body != nil && req.Body != http.NoBody {
		n, err := io.Copy(w, io.LimitReader(req.Body, req.ContentLength))
		_ = req.Body.Close()
		if err == nil && n != req.ContentLength {
			err = fmt.Errorf("http: ContentLength=%d with Body length %d", req.ContentLength, n)
		}
		if err != nil {
			w.Reset(pc.nc)
			return err
		}
	}
	return w.Flush()
}

// h1Body is the body of an answer read from an h1Conn: once read to the end
// and closed, the connection goes back to the pool; closed before the end,
// the connection is closed (the rest is not read).
type h1Body struct {
	rc     io.ReadCloser
	ctx    context.Context
	pc     *h1Conn
	stop   func() bool
	last   bool
	eof    bool
	closed bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.closed {
		return 0, http.ErrBodyReadAfterClose
	}
	n, err := b.rc.Read(p)
	switch {
	case err == io.EOF:
		b.eof = true
	case err != nil && b.ctx.Err() != nil:
		err = ctxErr(b.ctx) // not the deadline that cut the read
	}
	return n, err
}

func (b *h1Body) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	if b.eof {
		b.pc.done(b.stop, b.last)
		return nil
	}
	b.stop()
	b.pc.drop()
	return nil
}

// validRequest checks what net/http's Transport checks before sending, with
// its error messages: the header fields, and the Host.
func validRequest(req *http.Request) error {
	for k, vs := range req.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("net/http: invalid header field name %q", k)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return fmt.Errorf("net/http: invalid header field value for %q", k)
			}
		}
	}
	if !httpguts.ValidHostHeader(hostHeader(req)) {
		return errors.New("http: invalid Host header")
	}
	return nil
}

// hostHeader is the Host req is sent with: its own, or its URL's.
func hostHeader(req *http.Request) string {
	if req.Host != "" {
		return req.Host
	}
	return req.URL.Host
}

// plainHost reports whether a host needs none of the rewriting net/http
// does (IDNA for a name that is not ASCII, an IPv6 zone, cutting at a space
// or slash): those requests take the fallback.
func plainHost(host string) bool {
	for i := 0; i < len(host); i++ {
		if c := host[i]; c >= 0x80 || c == '%' || c == ' ' || c == '/' {
			return false
		}
	}
	return true
}

// replayable reports whether req may be sent again after the server may
// have received it: an idempotent method, or an idempotency key.
func replayable(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, a := req.Header["Idempotency-Key"]
	_, b := req.Header["X-Idempotency-Key"]
	return a || b
}

// ctxErr is the error of a round trip its context ended: the cause
// (http.timeout's for a slot's attempt).
func ctxErr(ctx context.Context) error {
	if err := context.Cause(ctx); err != nil {
		return err
	}
	return ctx.Err()
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}
