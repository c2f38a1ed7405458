package httpclient

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"

	"github.com/orderly-dispatch/orderly/config"
)

// TestSignatureSpecVector: the test vector the Standard Webhooks spec
// publishes.
func TestSignatureSpecVector(t *testing.T) {
	key, err := config.SigningKey("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := signature([][]byte{key}, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", []byte(`{"test": 2432232314}`))
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Errorf("signature %q, want %q", got, want)
	}
}

// TestSignedRequests: every attempt to a signing target carries webhook-id
// (the Idempotency-Key), its own webhook-timestamp and one signature per
// secret, which the standard-webhooks Go library verifies with either
// secret, and not with another.
func TestSignedRequests(t *testing.T) {
	const (
		secret    = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
		newSecret = "whsec_c2VjcmV0LWtleS10aGF0LWlzLWxvbmctZW5vdWdoIQ=="
		stranger  = "whsec_b3RoZXItc2VjcmV0LW5vdC1jb25maWd1cmVkLWhlcmU="
	)
	rec := newRecorder(t, statuses(503))
	s := targetSender(t, baseHTTP(), []config.Target{{Name: "hooks", BaseURL: rec.URL,
		Signing: config.Signing{Secrets: []string{newSecret, secret}}}}, -1)
	body := []byte(`{"type":"order.created","id":42}`)
	res, err := s.Send(context.Background(), to("hooks", rec.URL+"/hook", body), "orders-3-42-0")
	if err != nil || res.Attempts != 2 {
		t.Fatalf("Send: %+v %v", res, err)
	}
	verifiers := map[string]bool{secret: true, newSecret: true, stranger: false}
	for i := range 2 {
		h := rec.get(i).header
		if id := h.Get("webhook-id"); id != "orders-3-42-0" || id != h.Get("Idempotency-Key") {
			t.Errorf("attempt %d: webhook-id %q", i, id)
		}
		ts, err := strconv.ParseInt(h.Get("webhook-timestamp"), 10, 64)
		if err != nil || time.Since(time.Unix(ts, 0)) > time.Minute {
			t.Errorf("attempt %d: webhook-timestamp %q", i, h.Get("webhook-timestamp"))
		}
		if sigs := strings.Split(h.Get("webhook-signature"), " "); len(sigs) != 2 || !strings.HasPrefix(sigs[0], "v1,") {
			t.Errorf("attempt %d: webhook-signature %q, want two v1 signatures", i, h.Get("webhook-signature"))
		}
		for sec, ok := range verifiers {
			wh, err := standardwebhooks.NewWebhook(sec)
			if err != nil {
				t.Fatal(err)
			}
			if err := wh.Verify(rec.get(i).body, h); (err == nil) != ok {
				t.Errorf("attempt %d, secret %s: verify: %v, want ok = %v", i, sec, err, ok)
			}
		}
		// The body is covered: another body does not verify.
		wh, _ := standardwebhooks.NewWebhook(secret)
		if err := wh.Verify([]byte(`{"type":"order.created","id":43}`), h); err == nil {
			t.Errorf("attempt %d: a changed body verifies", i)
		}
	}
	// A request with a full url is not signed.
	if _, err := s.Send(context.Background(), post(rec.URL+"/plain", body), "k"); err != nil {
		t.Fatal(err)
	}
	if h := rec.get(2).header; h.Get("webhook-signature") != "" || h.Get("webhook-id") != "" {
		t.Errorf("a full url was signed: %v", h)
	}
	// Without an Idempotency-Key the call gets an id of its own.
	if _, err := s.Send(context.Background(), to("hooks", rec.URL+"/hook", nil), ""); err != nil {
		t.Fatal(err)
	}
	h := rec.get(3).header
	wh, _ := standardwebhooks.NewWebhook(secret)
	if !strings.HasPrefix(h.Get("webhook-id"), "msg_") || wh.Verify(nil, h) != nil {
		t.Errorf("without an Idempotency-Key: %v", h)
	}
}

// TestSignedRedirectToGet: a signed POST that a 303 turns into a GET
// without body arrives signed for what it carries (no body), so that the
// receiver verifies it; before, the signature was the POST body's.
func TestSignedRedirectToGet(t *testing.T) {
	const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		if r.URL.Path == "/hook" {
			http.Redirect(w, r, "/status/42", http.StatusSeeOther)
		}
	})
	s := targetSender(t, baseHTTP(), []config.Target{{Name: "hooks", BaseURL: rec.URL, FollowRedirects: true,
		Signing: config.Signing{Secrets: []string{secret}}}}, -1)
	if _, err := s.Send(context.Background(), to("hooks", rec.URL+"/hook", []byte(`{"id":42}`)), "orders-3-42-0"); err != nil {
		t.Fatal(err)
	}
	wh, err := standardwebhooks.NewWebhook(secret)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{`{"id":42}`, ""} {
		got := rec.get(i)
		if string(got.body) != want {
			t.Fatalf("request %d: body %q, want %q", i, got.body, want)
		}
		if err := wh.Verify(got.body, got.header); err != nil {
			t.Errorf("request %d (%q): %v", i, want, err)
		}
	}
}
