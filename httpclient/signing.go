package httpclient

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// sign adds the Standard Webhooks (https://www.standardwebhooks.com)
// headers of one attempt to h:
//
//	webhook-id: <id>                 the Idempotency-Key: the same on every attempt
//	webhook-timestamp: <unix seconds> of this attempt
//	webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body"> ...
//
// one signature per key, space-separated, so that a receiver that knows
// either of two secrets (a rotation) verifies the request.
func sign(h http.Header, keys [][]byte, id []string, now time.Time, body []byte) {
	ts := strconv.FormatInt(now.Unix(), 10)
	h["Webhook-Id"] = id
	h["Webhook-Timestamp"] = []string{ts}
	h["Webhook-Signature"] = []string{signature(keys, id[0], ts, body)}
}

// signature returns the webhook-signature value of id, ts and body.
func signature(keys [][]byte, id, ts string, body []byte) string {
	var b strings.Builder
	sum := make([]byte, 0, sha256.Size)
	for i, key := range keys {
		mac := hmac.New(sha256.New, key)
		mac.Write([]byte(id))
		mac.Write([]byte{'.'})
		mac.Write([]byte(ts))
		mac.Write([]byte{'.'})
		mac.Write(body)
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("v1,")
		b.WriteString(base64.StdEncoding.EncodeToString(mac.Sum(sum[:0])))
	}
	return b.String()
}

// randomID is the webhook-id of a call sent without an Idempotency-Key.
func randomID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return "msg_" + base64.RawURLEncoding.EncodeToString(b[:])
}
