package httpclient

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
)

// Benchmarks of request building and sending, complementing BenchmarkSend:
// Send with the network taken out (what Orderly and go-retryablehttp cost
// per request on their own), and Send side by side with a plain net/http
// client on the same transport tuning (the ratio the performance issue
// asks about, per request).

const benchBody = `{"key":"key-17","seq":42,"first_name":"Bonita","last_name":"Kautzer","produced_at":1700000000000000000,` +
	`"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}`

// memoryRoundTripper answers every request with 200 without a network: it
// reads the body, as a connection would.
type memoryRoundTripper struct{}

func (memoryRoundTripper) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		_, _ = io.Copy(io.Discard, r.Body)
		_ = r.Body.Close()
	}
	return &http.Response{StatusCode: http.StatusOK, Status: "200 OK", Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{}, Body: http.NoBody, ContentLength: 0, Request: r}, nil
}

// benchDefaultHTTP is the shipped [http] configuration (config.Defaults):
// breaker on, max_conn_age 60s, 256 connections per host.
func benchDefaultHTTP() config.HTTP { return config.Defaults().HTTP }

// BenchmarkSendInMemory is Send with the Sender's transport answering from
// memory (http.Transport.RegisterProtocol for "http"): request building,
// go-retryablehttp, the attempt transport, breaker and metrics, without
// sockets. Its allocs/op is the sender's own share of a request.
func BenchmarkSendInMemory(b *testing.B) {
	for _, bc := range []struct {
		name string
		h    func() config.HTTP
	}{
		{"plain", baseHTTP},
		{"defaults", benchDefaultHTTP},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s, _ := newTestSender(b, bc.h(), nil)
			s.plain = memoryRoundTripper{}
			r := post("http://sink.invalid:8080/people/key-17", []byte(benchBody))
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Send(ctx, r, "orders-3-123456-0"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("defaults-slot", func(b *testing.B) {
		// As a dispatcher sender makes its attempts: one after another in
		// a Slot, each call reset in place.
		s, _ := newTestSender(b, benchDefaultHTTP(), nil)
		s.plain = memoryRoundTripper{}
		sl := s.NewSlot()
		defer sl.Close()
		r := post("http://sink.invalid:8080/people/key-17", []byte(benchBody))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var c Call
		b.ReportAllocs()
		for b.Loop() {
			c.Reset(r, "orders-3-123456-0")
			if st := sl.Attempt(ctx, &c); st.Outcome != Delivered {
				b.Fatal(st.Err)
			}
		}
	})
	b.Run("net-http-baseline", func(b *testing.B) {
		// The same request through a bare http.Client on the same in-memory
		// transport: what any Go client pays; the difference is Send's own.
		tr := &http.Transport{}
		tr.RegisterProtocol("http", memoryRoundTripper{})
		c := &http.Client{Transport: tr}
		body := []byte(benchBody)
		b.ReportAllocs()
		for b.Loop() {
			if err := benchPlainPost(c, "http://sink.invalid:8080/people/key-17", body); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkSendVsNetHTTP sends to a loopback httptest server, in parallel,
// with Send (shipped defaults) and with a plain http.Client on a transport
// tuned the same way (HTTP/1.1, keep-alive, MaxConnsPerHost and
// MaxIdleConnsPerHost 256, no compression).
func BenchmarkSendVsNetHTTP(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer srv.Close()
	url := srv.URL + "/people/key-17"
	body := []byte(benchBody)
	b.Run("orderly", func(b *testing.B) {
		s, _ := newTestSender(b, benchDefaultHTTP(), nil)
		r := post(url, body)
		b.ReportAllocs()
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := s.Send(context.Background(), r, "orders-3-123456-0"); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("net-http", func(b *testing.B) {
		var protocols http.Protocols
		protocols.SetHTTP1(true)
		tr := &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			Protocols:           &protocols,
			MaxIdleConnsPerHost: 256,
			MaxConnsPerHost:     256,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		}
		defer tr.CloseIdleConnections()
		c := &http.Client{Transport: tr}
		b.ReportAllocs()
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := benchPlainPost(c, url, body); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// benchPlainPost is what a plain Go client does for one request: the same
// headers as Send's, the body drained and closed.
func benchPlainPost(c *http.Client, url string, body []byte) error {
	req, err := http.NewRequestWithContext(context.Background(), http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header = http.Header{"Content-Type": {"application/json"}, "X-Tenant": {"acme"},
		"Idempotency-Key": {"orders-3-123456-0"}, "User-Agent": {"orderly/9.9.9"}}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return &Error{Status: resp.StatusCode, Err: io.ErrUnexpectedEOF}
	}
	return nil
}

// BenchmarkTargetLookup is the per-call target lookup: the host:port key
// from a parsed URL (what prepare does for a hand-built request without a
// Target) and the Sender's map.
func BenchmarkTargetLookup(b *testing.B) {
	s, _ := newTestSender(b, baseHTTP(), nil)
	req, err := http.NewRequest(http.MethodGet, "http://sink.invalid:8080/people/key-17", nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = s.target(filters.TargetOf(req.URL))
	}
}
