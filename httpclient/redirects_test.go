package httpclient

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
)

// redirectServer answers every path /r/<n> with status and a Location to
// /r/<n-1> (/r/0 to final), and final with 200; it records each request as
// "METHOD path body" with its Idempotency-Key and Authorization.
type redirectServer struct {
	*recorder
	mu   sync.Mutex
	seen []string
}

func newRedirectServer(t *testing.T, status int, final string) *redirectServer {
	t.Helper()
	rs := &redirectServer{}
	rs.recorder = newRecorder(t, func(w http.ResponseWriter, r *http.Request, n int) {
		rs.mu.Lock()
		b := string(rs.recorder.get(n).body)
		rs.seen = append(rs.seen, r.Method+" "+r.URL.RequestURI()+" "+b+" "+r.Header.Get("Idempotency-Key")+" "+r.Header.Get("Authorization"))
		rs.mu.Unlock()
		if hops, ok := strings.CutPrefix(r.URL.Path, "/r/"); ok {
			n, _ := strconv.Atoi(hops)
			loc := final
			if n > 0 {
				loc = "/r/" + strconv.Itoa(n-1) + "?secret=1"
			}
			w.Header().Set("Location", loc)
			w.WriteHeader(status)
		}
	})
	return rs
}

func (rs *redirectServer) requests() []string {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return append([]string(nil), rs.seen...)
}

// redirectSender is a Sender with the target "t" on base, following
// redirects if follow.
func redirectSender(t *testing.T, base string, follow bool) *Sender {
	t.Helper()
	h := baseHTTP()
	h.Retry.MaxAttempts = 1
	return targetSender(t, h, []config.Target{{Name: "t", BaseURL: base, FollowRedirects: follow,
		Auth: config.TargetAuth{Type: "basic", Username: "u", Password: "p"}}}, -1)
}

const basicUP = "Basic dTpw" // base64("u:p")

// TestRedirectFollowed: a target with follow_redirects follows a 307 with
// the method, body and headers of the request, and a 303 with a GET and no
// body, to the end of the chain.
func TestRedirectFollowed(t *testing.T) {
	for _, tc := range []struct {
		status int
		from   string
		want   []string
	}{
		{http.StatusTemporaryRedirect, "/r/0", []string{
			"POST /r/0 {\"a\":1} orders-0-1-0 " + basicUP,
			"POST /done {\"a\":1} orders-0-1-0 " + basicUP,
		}},
		{http.StatusSeeOther, "/r/1", []string{
			"POST /r/1 {\"a\":1} orders-0-1-0 " + basicUP,
			"GET /r/0?secret=1  orders-0-1-0 " + basicUP,
			"GET /done  orders-0-1-0 " + basicUP,
		}},
	} {
		t.Run(strconv.Itoa(tc.status), func(t *testing.T) {
			rs := newRedirectServer(t, tc.status, "/done")
			s := redirectSender(t, rs.URL, true)
			st, _ := attemptOnce(s, to("t", rs.URL+tc.from, []byte(`{"a":1}`)))
			if st.Outcome != Delivered {
				t.Fatalf("outcome %v (%v)", st.Outcome, st.Err)
			}
			if got := rs.requests(); strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestRedirectCrossOriginRefused(t *testing.T) {
	other := newRecorder(t, nil)
	rs := newRedirectServer(t, http.StatusTemporaryRedirect, other.URL+"/steal?token=x")
	s := redirectSender(t, rs.URL, true)
	st, c := attemptOnce(s, to("t", rs.URL+"/r/0", []byte(`{"a":1}`)))
	if st.Outcome != Failed {
		t.Fatalf("outcome %v (%v), want Failed", st.Outcome, st.Err)
	}
	msg := st.Err.Error()
	if !errors.Is(st.Err, ErrStatus) || !strings.Contains(msg, other.URL+"/steal not followed") || strings.Contains(msg, "token") {
		t.Errorf("error %q: want ErrStatus naming %s/steal without its query", msg, other.URL)
	}
	if c.Attempts() != 1 || len(rs.requests()) != 1 {
		t.Errorf("attempts %d, requests %v", c.Attempts(), rs.requests())
	}
	if other.n() != 0 {
		t.Errorf("the other origin got %d requests", other.n())
	}
}

// TestRedirectNotFollowedByDefault: without a target, or through one without
// follow_redirects, a 3xx is a permanent failure that says why; the
// request, its body and headers never reach where it points.
func TestRedirectNotFollowedByDefault(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  func(url string) *filters.Request
	}{
		{"no target", func(url string) *filters.Request { return post(url, []byte(`{"secret":1}`)) }},
		{"target", func(url string) *filters.Request { return to("t", url, []byte(`{"secret":1}`)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			elsewhere := newRecorder(t, nil)
			rs := newRedirectServer(t, http.StatusTemporaryRedirect, elsewhere.URL+"/steal")
			s := redirectSender(t, rs.URL, false)
			st, _ := attemptOnce(s, tc.req(rs.URL+"/r/0"))
			if st.Outcome != Failed || !errors.Is(st.Err, ErrStatus) {
				t.Fatalf("outcome %v (%v), want Failed with ErrStatus", st.Outcome, st.Err)
			}
			if e := asError(t, st.Err); !e.Permanent || e.Status != http.StatusTemporaryRedirect {
				t.Errorf("error %+v, want permanent with status 307", e)
			}
			if !strings.Contains(st.Err.Error(), "follow_redirects") {
				t.Errorf("error %q does not say why", st.Err)
			}
			if got := rs.requests(); len(got) != 1 || elsewhere.n() != 0 {
				t.Errorf("requests %v, %d where it points; want only the first", got, elsewhere.n())
			}
		})
	}
}

func TestRedirectLimit(t *testing.T) {
	for _, tc := range []struct {
		hops      int
		delivered bool
	}{{maxRedirects, true}, {maxRedirects + 1, false}} {
		t.Run(strconv.Itoa(tc.hops), func(t *testing.T) {
			rs := newRedirectServer(t, http.StatusPermanentRedirect, "/done")
			s := redirectSender(t, rs.URL, true)
			st, _ := attemptOnce(s, to("t", rs.URL+"/r/"+strconv.Itoa(tc.hops-1), []byte("x")))
			if (st.Outcome == Delivered) != tc.delivered {
				t.Fatalf("outcome %v (%v), delivered want %v", st.Outcome, st.Err, tc.delivered)
			}
			if got := len(rs.requests()); got != maxRedirects+1 {
				t.Errorf("%d requests, want %d", got, maxRedirects+1)
			}
			if !tc.delivered && !strings.Contains(st.Err.Error(), "stopped after 5 redirects") {
				t.Errorf("error %q", st.Err)
			}
		})
	}
}
