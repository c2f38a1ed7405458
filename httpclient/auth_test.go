package httpclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
)

// --- certificates ------------------------------------------------------------

// testCA is a certificate authority made for one test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

var serials atomic.Int64

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serials.Add(1)), Subject: pkix.Name{CommonName: "orderly test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a certificate signed by ca for cn: a server certificate for
// 127.0.0.1 and localhost, or a client certificate.
func (ca *testCA) issue(t *testing.T, cn string, server bool) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serials.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.DNSNames = []string{"localhost"}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return pair, certPEM, keyPEM
}

// writeFile writes b into a new file of the test's temporary directory.
func writeFile(t *testing.T, name string, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// tlsServer starts an HTTPS server with a certificate of ca that answers
// 200, counts the requests it serves and keeps the common name of the last
// client certificate; with clientCA set it requires a client certificate
// signed by it.
func tlsServer(t *testing.T, ca *testCA, clientCA *testCA) (*httptest.Server, *atomic.Int64, *atomic.Pointer[string]) {
	t.Helper()
	var served atomic.Int64
	var client atomic.Pointer[string]
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		if len(r.TLS.PeerCertificates) > 0 {
			cn := r.TLS.PeerCertificates[0].Subject.CommonName
			client.Store(&cn)
		}
	}))
	pair, _, _ := ca.issue(t, "server", true)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}}
	if clientCA != nil {
		pool := x509.NewCertPool()
		pool.AddCert(clientCA.cert)
		srv.TLS.ClientAuth, srv.TLS.ClientCAs = tls.RequireAndVerifyClientCert, pool
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv, &served, &client
}

// --- senders with targets ---------------------------------------------------

func targetSender(t *testing.T, h config.HTTP, targets []config.Target, early time.Duration) *Sender {
	t.Helper()
	ts, err := LoadTargets(targets)
	if err != nil {
		t.Fatal(err)
	}
	if early >= 0 {
		ts.earlyExpiry = early
	}
	s, _ := newSenderWith(t, Options{HTTP: h, Targets: ts})
	return s
}

// to is a request to url through the named target.
func to(target, url string, body []byte) *filters.Request {
	r := post(url, body)
	r.TargetName = target
	return r
}

// attemptOnce makes one attempt of req.
func attemptOnce(s *Sender, req *filters.Request) (Step, *Call) {
	var c Call
	c.Reset(req, "orders-0-1-0")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.Attempt(ctx, &c), &c
}

// TestTargetCAFile: a target's ca_file, written to disk, is what verifies
// its server; the same URL without the target (system roots), or with
// another CA, is refused.
func TestTargetCAFile(t *testing.T) {
	ca := newTestCA(t)
	srv, served, _ := tlsServer(t, ca, nil)
	caFile := writeFile(t, "ca.pem", ca.pem)
	other := writeFile(t, "other.pem", newTestCA(t).pem)
	s := targetSender(t, baseHTTP(), []config.Target{
		{Name: "ok", BaseURL: srv.URL, TLS: config.TargetTLS{CAFile: caFile}},
		{Name: "wrong-ca", BaseURL: srv.URL, TLS: config.TargetTLS{CAFile: other}},
		{Name: "insecure", BaseURL: srv.URL, TLS: config.TargetTLS{InsecureSkipVerify: true}},
	}, -1)

	if res, err := s.Send(context.Background(), to("ok", srv.URL+"/x", []byte("{}")), "k"); err != nil || res.Status != 200 {
		t.Fatalf("with the target's CA: %+v %v", res, err)
	}
	for _, name := range []string{"", "wrong-ca"} {
		st, _ := attemptOnce(s, to(name, srv.URL+"/x", nil))
		if st.Outcome != Failed || !IsPermanent(st.Err) {
			t.Errorf("target %q: %+v, want a permanent failure (untrusted certificate)", name, st)
		}
	}
	if st, _ := attemptOnce(s, to("insecure", srv.URL+"/x", nil)); st.Outcome != Delivered {
		t.Errorf("insecure_skip_verify: %+v", st)
	}
	if n := served.Load(); n != 2 {
		t.Errorf("server served %d requests, want 2", n)
	}
}

// TestTargetMutualTLS: a server that requires a client certificate serves
// the target that has one and refuses the one that does not.
func TestTargetMutualTLS(t *testing.T) {
	ca := newTestCA(t)
	srv, served, client := tlsServer(t, ca, ca)
	_, certPEM, keyPEM := ca.issue(t, "orderly-client", false)
	caFile := writeFile(t, "ca.pem", ca.pem)
	s := targetSender(t, baseHTTP(), []config.Target{
		{Name: "mtls", BaseURL: srv.URL, TLS: config.TargetTLS{CAFile: caFile,
			CertFile: writeFile(t, "client.pem", certPEM), KeyFile: writeFile(t, "client-key.pem", keyPEM)}},
		{Name: "no-cert", BaseURL: srv.URL, TLS: config.TargetTLS{CAFile: caFile}},
	}, -1)
	if st, _ := attemptOnce(s, to("mtls", srv.URL+"/x", []byte("{}"))); st.Outcome != Delivered || client.Load() == nil || *client.Load() != "orderly-client" {
		t.Fatalf("with a client certificate: %+v, server saw %v", st, client.Load())
	}
	if st, _ := attemptOnce(s, to("no-cert", srv.URL+"/x", nil)); st.Outcome == Delivered {
		t.Errorf("without a client certificate: delivered")
	}
	if n := served.Load(); n != 1 {
		t.Errorf("server served %d requests, want 1", n)
	}
}

// TestTargetHeadersBasicBearer: a target's static headers (under the
// request's own) and its basic or bearer Authorization (over them) reach
// the server; a request with a full url gets none of them.
func TestTargetHeadersBasicBearer(t *testing.T) {
	t.Setenv("ORDERLY_TEST_TOKEN", "tok-abc")
	rec := newRecorder(t, nil)
	s := targetSender(t, baseHTTP(), []config.Target{
		{Name: "basic", BaseURL: rec.URL, Auth: config.TargetAuth{Type: "basic", Username: "orderly", Password: "p:w"},
			Headers: map[string]string{"X-Env": "prod", "x-tenant": "default"}},
		{Name: "bearer", BaseURL: rec.URL, Auth: config.TargetAuth{Type: "bearer", TokenEnv: "ORDERLY_TEST_TOKEN"}},
	}, -1)
	basic := to("basic", rec.URL+"/b", nil)
	basic.Header = basic.Header.Clone()
	basic.Header.Set("Authorization", "from the message")
	for _, r := range []*filters.Request{basic, to("bearer", rec.URL+"/t", nil), post(rec.URL+"/u", nil)} {
		if _, err := s.Send(context.Background(), r, "k"); err != nil {
			t.Fatal(err)
		}
	}
	h := rec.get(0).header
	r := &http.Request{Header: h}
	if u, p, ok := r.BasicAuth(); !ok || u != "orderly" || p != "p:w" || h.Get("X-Env") != "prod" || h.Get("X-Tenant") != "acme" {
		t.Errorf("basic: %q %q %v, headers %v", u, p, ok, h)
	}
	if got := rec.get(1).header.Get("Authorization"); got != "Bearer tok-abc" {
		t.Errorf("bearer: Authorization %q", got)
	}
	if h := rec.get(2).header; h.Get("Authorization") != "" || h.Get("X-Env") != "" {
		t.Errorf("a full url got the target's headers: %v", h)
	}
	if _, err := LoadTargets([]config.Target{{Name: "b", Auth: config.TargetAuth{Type: "bearer", TokenEnv: "ORDERLY_TEST_UNSET_TOKEN"}}}); err == nil {
		t.Error("LoadTargets: no error for an unset token variable")
	}
}

// tokenServer is an OAuth2 token endpoint that issues tok-1, tok-2, ...,
// each valid for ttl seconds.
type tokenServer struct {
	*httptest.Server
	issued atomic.Int64
	fail   atomic.Bool // answer 500
}

func newTokenServer(t *testing.T, ttl int) *tokenServer {
	ts := &tokenServer{}
	ts.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, secret, _ := r.BasicAuth()
		if err := r.ParseForm(); err != nil || r.Form.Get("grant_type") != "client_credentials" ||
			id != "orderly" || secret != "s3cret" || r.Form.Get("scope") != "billing.write other" {
			t.Errorf("token request: %v %v %q %q", err, r.Form, id, secret)
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if ts.fail.Load() {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		n := ts.issued.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": fmt.Sprintf("tok-%d", n), "token_type": "bearer", "expires_in": ttl})
	}))
	t.Cleanup(ts.Close)
	return ts
}

// TestTargetOAuth2: the token is fetched once and reused, fetched again
// after it expired, and replaced after a 401, whose attempt does not count;
// a token endpoint that fails makes no attempt.
func TestTargetOAuth2(t *testing.T) {
	tokens := newTokenServer(t, 1)
	var mu sync.Mutex
	var seen []string
	revoked := map[string]bool{}
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		mu.Lock()
		seen = append(seen, auth)
		bad := revoked[auth] || revoked["*"]
		mu.Unlock()
		if bad {
			w.WriteHeader(http.StatusUnauthorized)
		}
	}))
	t.Cleanup(api.Close)
	last := func() string { mu.Lock(); defer mu.Unlock(); return seen[len(seen)-1] }
	s := targetSender(t, baseHTTP(), []config.Target{{Name: "api", BaseURL: api.URL, Auth: config.TargetAuth{Type: "oauth2",
		TokenURL: tokens.URL + "/token", ClientID: "orderly", ClientSecret: "s3cret", Scopes: []string{"billing.write", "other"}}}}, time.Millisecond)
	send := func() (Result, error) {
		return s.Send(context.Background(), to("api", api.URL+"/x", []byte("{}")), "k")
	}

	for range 3 {
		if _, err := send(); err != nil {
			t.Fatal(err)
		}
	}
	if tokens.issued.Load() != 1 || last() != "Bearer tok-1" {
		t.Fatalf("3 requests: %d tokens issued, last %q; want 1, reused", tokens.issued.Load(), last())
	}
	// Expiry: the next token is fetched once the first one expired.
	waitFor(t, 5*time.Second, "a new token after expiry", func() bool {
		if _, err := send(); err != nil {
			t.Fatal(err)
		}
		return last() == "Bearer tok-2"
	})
	if n := tokens.issued.Load(); n != 2 {
		t.Fatalf("%d tokens issued, want 2", n)
	}

	// A 401: the token is dropped and the request sent again at once, with
	// a new token, the 401 not counted.
	mu.Lock()
	revoked["Bearer tok-2"] = true
	mu.Unlock()
	res, err := send()
	if err != nil || res.Attempts != 2 || res.Counted != 1 || last() != "Bearer tok-3" || tokens.issued.Load() != 3 {
		t.Fatalf("after a 401: %+v %v, last %q, %d issued", res, err, last(), tokens.issued.Load())
	}
	// Once per call: a second 401 is a permanent failure.
	mu.Lock()
	revoked["*"] = true
	mu.Unlock()
	if res, err := send(); !IsPermanent(err) || res.Status != 401 || res.Attempts != 2 {
		t.Errorf("401 twice: %+v %v", res, err)
	}

	// A token endpoint that fails: no attempt, the call waits (Retry).
	tokens.fail.Store(true)
	waitFor(t, 5*time.Second, "an attempt without a token", func() bool {
		st, c := attemptOnce(s, to("api", api.URL+"/x", nil))
		return st.Outcome == Retry && c.Attempts() == 0
	})
	mu.Lock()
	before := len(seen)
	mu.Unlock()
	st, c := attemptOnce(s, to("api", api.URL+"/x", nil))
	mu.Lock()
	after := len(seen)
	mu.Unlock()
	if st.Outcome != Retry || st.After <= 0 || c.Attempts() != 0 || c.Counted() != 0 || after != before {
		t.Errorf("without a token: %+v, %d attempts, %d requests sent", st, c.Attempts(), after-before)
	}
}

// TestTokenEndpointThatHangs: while the token endpoint does not answer,
// the calls that need a token share one fetch and each waits no longer
// than its own context (a revoke or a shutdown ends the wait); once the
// endpoint answers, the next call has its token. Before, each caller
// queued behind the previous one's fetch and made its own, so the last of
// N waited N fetches' timeouts and no context could end the wait.
func TestTokenEndpointThatHangs(t *testing.T) {
	release := make(chan struct{})
	var asked atomic.Int64
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token": "tok", "token_type": "bearer", "expires_in": 3600}`))
	}))
	t.Cleanup(tokens.Close)
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(api.Close)
	s := targetSender(t, baseHTTP(), []config.Target{{Name: "api", BaseURL: api.URL, Auth: config.TargetAuth{Type: "oauth2",
		TokenURL: tokens.URL + "/token", ClientID: "orderly", ClientSecret: "s3cret"}}}, time.Millisecond)

	const callers = 20
	outcomes := make(chan Outcome, callers)
	start := time.Now()
	for i := range callers {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			var c Call
			c.Reset(to("api", api.URL+"/x", nil), "orders-0-"+strconv.Itoa(i)+"-0")
			outcomes <- s.Attempt(ctx, &c).Outcome
		}()
	}
	for range callers {
		select {
		case o := <-outcomes:
			if o != Canceled {
				t.Fatalf("a call while the token endpoint hangs: outcome %d, want Canceled", o)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("calls still waiting for a token %s after their contexts ended", time.Since(start))
		}
	}
	if n := asked.Load(); n != 1 {
		t.Fatalf("the token endpoint was asked %d times, want once (one fetch shared)", n)
	}
	releaseOnce.Do(func() { close(release) })
	waitFor(t, 10*time.Second, "a token once the endpoint answers", func() bool {
		st, c := attemptOnce(s, to("api", api.URL+"/x", nil))
		return st.Outcome == Delivered && c.Attempts() == 1
	})
}
