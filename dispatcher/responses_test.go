package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// chainAPI is a "create, then attach" API: POST /create/{key}/{seq} answers
// {"id": "<key>.<seq>"}; PUT /attach/{id} answers 503 twice per id, then
// 200 with {"attached": id} and X-Request-Id (422 for the key "bad").
type chainAPI struct {
	mu      sync.Mutex
	creates map[string]int // per key/seq
	attachs map[string]int // per id
}

func (a *chainAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	switch {
	case parts[0] == "create" && len(parts) == 3 && r.Method == http.MethodPost:
		a.creates[parts[1]+"/"+parts[2]]++
		fmt.Fprintf(w, `{"id": %q}`, parts[1]+"."+parts[2])
	case parts[0] == "attach" && len(parts) == 2 && r.Method == http.MethodPut:
		id := parts[1]
		a.attachs[id]++
		switch {
		case strings.HasPrefix(id, "bad."):
			w.WriteHeader(http.StatusUnprocessableEntity)
			fmt.Fprint(w, `{"error": "cannot attach"}`)
		case a.attachs[id] <= 2:
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			w.Header().Set("X-Request-Id", "req-"+id)
			fmt.Fprintf(w, `{"attached": %q}`, id)
		}
	default:
		http.Error(w, "no such endpoint", http.StatusNotFound)
	}
}

// TestChainedRequestsAndReplies: request 2's URL reads request 1's JSON
// answer; request 2 fails twice and is retried without resending request 1.
// The last answer of each message goes to the reply topic (status, the
// selected header, the body, correlation headers), in each key's order; a
// message whose request 2 is refused goes to the error topic, then to the
// DLQ.
func TestChainedRequestsAndReplies(t *testing.T) {
	h := newHarnessWith(t, 2, func(o *embedded.Options) { o.Topics = append(o.Topics, "replies", "errors") })
	api := &chainAPI{creates: map[string]int{}, attachs: map[string]int{}}
	srv := httptest.NewServer(api)
	t.Cleanup(srv.Close)
	var recs []testkit.Record
	want := map[string][]int64{}
	for i := range 60 {
		k := "k" + strconv.Itoa(i%3)
		seq := int64(len(want[k]))
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
		want[k] = append(want[k], seq)
	}
	recs = append(recs, testkit.Record{Key: []byte("bad"), Value: testkit.EventJSON("bad", 0)})
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("chain", "", "")
	rt := &cfg.Routes[0]
	rt.Requests = []config.Request{
		{Method: "POST", URL: srv.URL + "/create/{{ .Value.key }}/{{ .Value.seq }}"},
		{Method: "PUT", URL: srv.URL + "/attach/{{ (index .Responses 0).JSON.id }}"},
	}
	rt.ReplyTopic, rt.ErrorTopic, rt.ReplyHeaders = "replies", "errors", []string{"x-request-id"}
	cfg.HTTP.Breaker.Enabled = false // two failures of three attempts per message would keep it open
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, 2*time.Minute, "every message finished", func() bool {
		return m.Sum("orderly_messages_total") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	api.mu.Lock()
	for k, seqs := range want {
		for _, s := range seqs {
			id := fmt.Sprintf("%s.%d", k, s)
			if c, a := api.creates[k+"/"+strconv.FormatInt(s, 10)], api.attachs[id]; c != 1 || a != 3 {
				t.Fatalf("%s: %d creates, %d attaches; want 1 create (not resent with the retries) and 3 attaches", id, c, a)
			}
		}
	}
	api.mu.Unlock()

	got := map[string][]int64{}
	for _, r := range h.ReadAll("replies", 60, time.Minute) {
		var body struct{ Attached string }
		if err := json.Unmarshal(r.Value, &body); err != nil {
			t.Fatalf("reply %q: %v", r.Value, err)
		}
		k, seqStr, _ := strings.Cut(body.Attached, ".")
		seq, _ := strconv.ParseInt(seqStr, 10, 64)
		status, _ := kafkatest.Header(r, filters.HeaderReplyStatus)
		reqID, _ := kafkatest.Header(r, "X-Request-Id")
		topic, _ := kafkatest.Header(r, filters.HeaderOriginalTopic)
		_, hasOffset := kafkatest.Header(r, filters.HeaderOriginalOffset)
		if string(r.Key) != k || status != "200" || reqID != "req-"+body.Attached || topic != h.Topic || !hasOffset {
			t.Fatalf("reply %s under key %q: status %q, X-Request-Id %q, original topic %q (offset %v)", r.Value, r.Key, status, reqID, topic, hasOffset)
		}
		got[k] = append(got[k], seq)
	}
	for k, seqs := range want {
		if fmt.Sprint(got[k]) != fmt.Sprint(seqs) {
			t.Fatalf("replies of %s: %v, want %v in order", k, got[k], seqs)
		}
	}
	errs := h.ReadAll("errors", 1, time.Minute)
	if len(errs) != 1 || string(errs[0].Key) != "bad" {
		t.Fatalf("error topic holds %d records, want the one of bad", len(errs))
	}
	status, _ := kafkatest.Header(errs[0], filters.HeaderReplyStatus)
	why, _ := kafkatest.Header(errs[0], filters.HeaderReplyError)
	if status != "422" || !strings.Contains(why, "422") || !strings.Contains(string(errs[0].Value), "cannot attach") {
		t.Fatalf("error record: status %q, error %q, body %s", status, why, errs[0].Value)
	}
	if dead := h.ReadAll("orderly.dlq", 1, 10*time.Second); len(dead) != 1 {
		t.Fatalf("DLQ holds %d records, want 1", len(dead))
	}
}

// TestRevokeKeepsOwedReplies: a cooperative rebalance moves partitions while
// a route with a reply_topic is sending. A revoked partition's requests
// under way finish, but a message whose reply record is not written yet is
// not finished with them: its next owner sends it again and writes the
// reply. Before, such a message was committed as done, its reply never
// written.
func TestRevokeKeepsOwedReplies(t *testing.T) {
	h := newHarnessWith(t, 4, func(o *embedded.Options) { o.Topics = append(o.Topics, "replies") })
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 40 * time.Millisecond }
	const n, keys = 4000, 128
	gen := &testkit.Generator{Keys: keys}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("owedreplies", "max_in_flight = 200", "")
	cfg.Routes[0].ReplyTopic = "replies"
	var atRevoke atomic.Int64
	_, m1, stop1 := h.run(cfg, func(d *Dispatcher) {
		d.onRevoke = func([]int32) { atRevoke.CompareAndSwap(0, h.Sink.InFlight()+1) }
	})
	testkit.WaitFor(t, time.Minute, "a sixth delivered", func() bool { return h.Sink.Distinct() >= n/6 })
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, 2*time.Minute, "every message delivered and committed", func() bool {
		return h.Sink.Distinct() >= n && m1.Sum("orderly_committed_offset")+m2.Sum("orderly_committed_offset") == n
	})
	for _, stop := range []func() error{stop1, stop2} {
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	}
	if atRevoke.Load() < 2 {
		t.Fatalf("no request was under way at the revoke (%d): the test proves nothing", atRevoke.Load()-1)
	}
	replied := map[string]bool{}
	for _, r := range h.ReadAll("replies", n, time.Minute) {
		p, _ := kafkatest.Header(r, filters.HeaderOriginalPartition)
		o, _ := kafkatest.Header(r, filters.HeaderOriginalOffset)
		replied[p+"/"+o] = true
	}
	committed, _ := h.Committed("owedreplies")
	var missing []string
	for p, end := range committed {
		for o := range end {
			if id := strconv.Itoa(p) + "/" + strconv.FormatInt(o, 10); !replied[id] {
				missing = append(missing, id)
			}
		}
	}
	if len(missing) > 0 {
		t.Fatalf("%d committed messages have no reply record (%d requests were under way at the revoke): %v",
			len(missing), atRevoke.Load()-1, missing[:min(len(missing), 20)])
	}
}
