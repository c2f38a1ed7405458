package httpclient

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/orderly-dispatch/orderly/filters"
)

// TestCaptureKeepsTheLastAnswer: a Call with Capture keeps the status,
// headers and body of its last attempt's answer, the body cut at
// filters.MaxResponseBody; a Call without keeps nothing. Send keeps it in
// the Result.
func TestCaptureKeepsTheLastAnswer(t *testing.T) {
	big := strings.Repeat("b", filters.MaxResponseBody+10)
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, n int) {
		switch {
		case r.URL.Path == "/big":
			_, _ = w.Write([]byte(big))
		case n == 0:
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("busy"))
		default:
			w.Header().Set("Location", "/items/7")
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`{"id":7}`))
		}
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	var c Call
	c.Reset(post(rec.URL+"/items", nil), "k")
	c.Capture()
	if st := s.Attempt(context.Background(), &c); st.Outcome != Retry || c.Response().Status != 503 || string(c.Response().Body) != "busy" {
		t.Fatalf("first attempt: %v, kept %+v", st.Outcome, c.Response())
	}
	if st := s.Attempt(context.Background(), &c); st.Outcome != Delivered {
		t.Fatalf("second attempt: %v %v", st.Outcome, st.Err)
	}
	if r := c.Response(); r.Status != 201 || r.Header.Get("Location") != "/items/7" || string(r.Body) != `{"id":7}` || r.Truncated {
		t.Fatalf("kept %+v", r)
	}
	res, err := s.Send(context.Background(), post(rec.URL+"/big", nil), "k2")
	if err != nil || len(res.Response.Body) != filters.MaxResponseBody || !res.Response.Truncated || res.Response.Status != 200 {
		t.Fatalf("big answer: %v, kept %d bytes (truncated %v)", err, len(res.Response.Body), res.Response.Truncated)
	}
	var plain Call
	plain.Reset(post(rec.URL+"/items", nil), "k3")
	if st := s.Attempt(context.Background(), &plain); st.Outcome != Delivered || plain.Response().Status != 0 || plain.Response().Body != nil {
		t.Fatalf("a call without Capture kept %+v (%v)", plain.Response(), st.Outcome)
	}
}

// TestStepLatency: an attempt reports its round trip as a load sample when
// the target served it (2xx, or an answer that is not retried), not for a
// retried 503: a target failing fast is no measure of its latency.
func TestStepLatency(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, n int) {
		switch {
		case r.URL.Path == "/bad":
			w.WriteHeader(http.StatusBadRequest)
		case n == 0:
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			w.WriteHeader(http.StatusOK)
		}
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	var c Call
	c.Reset(post(rec.URL+"/items", nil), "k")
	if st := s.Attempt(context.Background(), &c); st.Outcome != Retry || st.Latency != 0 {
		t.Fatalf("503: %v, latency %v; want Retry and no sample", st.Outcome, st.Latency)
	}
	if st := s.Attempt(context.Background(), &c); st.Outcome != Delivered || st.Latency <= 0 {
		t.Fatalf("200: %v, latency %v; want Delivered and a sample", st.Outcome, st.Latency)
	}
	var bad Call
	bad.Reset(post(rec.URL+"/bad", nil), "k2")
	if st := s.Attempt(context.Background(), &bad); st.Outcome != Failed || st.Latency <= 0 {
		t.Fatalf("400: %v, latency %v; want Failed and a sample", st.Outcome, st.Latency)
	}
}

// TestCaptureRetriesACutAnswer: a 2xx answer whose body the connection cuts
// short is not delivered with an empty body (a later request or the reply
// would read nothing of it): the attempt is retried like a transport error,
// and the next answer is kept whole.
func TestCaptureRetriesACutAnswer(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, n int) {
		w.Header().Set("Content-Length", "8")
		w.WriteHeader(http.StatusCreated)
		if n == 0 {
			_, _ = w.Write([]byte(`{"id"`))
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // the connection closes mid-body
		}
		_, _ = w.Write([]byte(`{"id":7}`))
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	var c Call
	c.Reset(post(rec.URL+"/items", nil), "k")
	c.Capture()
	if st := s.Attempt(context.Background(), &c); st.Outcome != Retry {
		t.Fatalf("cut answer: %v %v, kept %+v; want a retry", st.Outcome, st.Err, c.Response())
	}
	if st := s.Attempt(context.Background(), &c); st.Outcome != Delivered || string(c.Response().Body) != `{"id":7}` {
		t.Fatalf("second attempt: %v %v, kept %+v", st.Outcome, st.Err, c.Response())
	}
}
