package dlq

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/producer"
)

// TestReplayWritesRecords: dead letters whose failed request is a topic
// request (the HTTP request before it succeeded) are replayed from that
// request: their records land in the topic, in each key's order, with the
// message's idempotency key, and the HTTP request is not sent again.
func TestReplayWritesRecords(t *testing.T) {
	h := &harness{kafkatest.New(t, 1, func(o *embedded.Options) { o.Topics = append(o.Topics, "hashed") })}
	ds := seqs([]string{"K", "G"}, 3)
	h.seedDLQAt(t, "1", ds...)
	cfg := h.Config("records", "", "")
	v := `{"key":"{{ .Value.key }}","seq":{{ .Value.seq }}}`
	cfg.Routes[0].Requests = append(cfg.Routes[0].Requests, config.Request{Topic: "hashed", Value: &v})
	a := h.dlqAdmin(cfg)
	if j := runJob(t, a, JobReplay, ReplayRequest{}); j.State != JobDone || j.Replayed != len(ds) {
		t.Fatalf("replay: %s; want %d replayed", counts(j), len(ds))
	}
	if n := h.Sink.Requests(); n != 0 {
		t.Fatalf("the sink got %d requests: the replay resent the request that had succeeded", n)
	}
	got := map[string][]int64{}
	for _, m := range h.ReadAll("hashed", len(ds), time.Minute) {
		var ev struct {
			Key string `json:"key"`
			Seq int64  `json:"seq"`
		}
		if err := json.Unmarshal(m.Value, &ev); err != nil || ev.Key != string(m.Key) {
			t.Fatalf("record %q under key %q: %v", m.Value, m.Key, err)
		}
		if idem, _ := kafkatest.Header(m, producer.HeaderIdempotencyKey); len(idem) < 3 || idem[len(idem)-2:] != "-1" {
			t.Fatalf("record %s: idempotency key %q, want the message's for request 1", m.Value, idem)
		}
		got[ev.Key] = append(got[ev.Key], ev.Seq)
	}
	for k, want := range expected(ds...) {
		if !slices.Equal(got[k], want) {
			t.Fatalf("key %s: records %v, want %v", k, got[k], want)
		}
	}
}

// TestReplayWritesRefusedReply: dead letters whose requests all succeeded
// but whose reply record was refused (orderly.request_index past the last
// request) are replayed by writing the reply: when the last request is an
// HTTP one, it is asked again, with its idempotency key, for the answer the
// reply is made of; when it is a topic request, whose answer is empty,
// nothing is sent or written again. The replies land in the reply topic,
// in each key's order. Before, the replay wrote no reply and counted the
// records replayed.
func TestReplayWritesRefusedReply(t *testing.T) {
	for _, tc := range []struct {
		name      string
		topicLast bool
		wantSink  int // requests the sink gets per dead letter
	}{
		{"http request last", false, 1},
		{"topic request last", true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &harness{kafkatest.New(t, 1, func(o *embedded.Options) { o.Topics = append(o.Topics, "replies", "hashed") })}
			ds := seqs([]string{"K", "G"}, 3)
			cfg := h.Config("replies", "", "")
			cfg.Routes[0].ReplyTopic = "replies"
			index := "1" // past the route's one request: the reply's turn
			if tc.topicLast {
				v := `{"key":"{{ .Value.key }}"}`
				cfg.Routes[0].Requests = append(cfg.Routes[0].Requests, config.Request{Topic: "hashed", Value: &v})
				index = "2"
			}
			h.seedDLQAt(t, index, ds...)
			a := h.dlqAdmin(cfg)
			if j := runJob(t, a, JobReplay, ReplayRequest{}); j.State != JobDone || j.Replayed != len(ds) {
				t.Fatalf("replay: %s; want %d replayed", counts(j), len(ds))
			}
			if n := h.Sink.Requests(); n != int64(tc.wantSink*len(ds)) {
				t.Fatalf("the sink got %d requests, want %d", n, tc.wantSink*len(ds))
			}
			if tc.topicLast {
				if recs := h.ReadAll("hashed", 1, 2*time.Second); len(recs) != 0 {
					t.Fatalf("the topic request's record was written %d times again", len(recs))
				}
			}
			got := map[string]int{}
			for _, m := range h.ReadAll("replies", len(ds), time.Minute) {
				got[string(m.Key)]++
			}
			for k, want := range expected(ds...) {
				if got[k] != len(want) {
					t.Fatalf("key %s: %d replies, want %d", k, got[k], len(want))
				}
			}
		})
	}
}

// seedDLQAt writes the dead letters of ds to the DLQ's partition 0, each
// failed at request index.
func (h *harness) seedDLQAt(t *testing.T, index string, ds ...dead) {
	t.Helper()
	recs := h.deadLetters(ds...)
	for i := range recs {
		for j := range recs[i].Headers {
			if recs[i].Headers[j].Key == HeaderRequestIndex {
				recs[i].Headers[j].Value = []byte(index)
			}
		}
	}
	if err := h.Prod.ProduceTo(context.Background(), "orderly.dlq", 0, recs); err != nil {
		t.Fatal(err)
	}
}
