package dispatcher

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// hashedValue is the transform the record tests configure: the event's key
// and sequence, and the md5 of the whole original value.
const hashedValue = `{"key":"{{ .Value.key }}","seq":{{ .Value.seq }},"hash":"{{ md5 .Raw }}"}`

// recordsHarness is a harness whose broker also has the topic "hashed".
func recordsHarness(t *testing.T, partitions int) *harness {
	return newHarnessWith(t, partitions, func(o *embedded.Options) { o.Topics = append(o.Topics, "hashed") })
}

// transformConfig is h's configuration with one route: a POST to the sink,
// then the hashed record to topic.
func transformConfig(h *harness, group, topic string) *config.Config {
	cfg := h.Config(group, "", "")
	v := hashedValue
	rt := &cfg.Routes[0]
	rt.Requests = append(rt.Requests, config.Request{Topic: topic, Value: &v,
		Headers: map[string]string{"source": "{{ .Topic }}/{{ .Partition }}/{{ .Offset }}"}})
	return cfg
}

type hashed struct {
	Key  string `json:"key"`
	Seq  int64  `json:"seq"`
	Hash string `json:"hash"`
}

// checkHashed checks the records of the hashed topic against the events
// produced (want, per key): every one there once, under its key, in its
// key's order, with the md5 of its event.
func checkHashed(t *testing.T, recs []*kafka.Message, want map[string][]int64) {
	t.Helper()
	got := map[string][]int64{}
	for _, r := range recs {
		var v hashed
		if err := json.Unmarshal(r.Value, &v); err != nil {
			t.Fatalf("record %s: %v", r.Value, err)
		}
		if string(r.Key) != v.Key {
			t.Fatalf("record of %s has key %q", v.Key, r.Key)
		}
		sum := md5.Sum(testkit.EventJSON(v.Key, v.Seq))
		if v.Hash != hex.EncodeToString(sum[:]) {
			t.Fatalf("record %s: hash is not the md5 of the event", r.Value)
		}
		idem, _ := kafkatest.Header(r, producer.HeaderIdempotencyKey)
		src, _ := kafkatest.Header(r, "source")
		if !strings.HasSuffix(idem, "-1") || !strings.HasPrefix(idem, strings.ReplaceAll(src, "/", "-")+"-") {
			t.Fatalf("record %s: idempotency key %q does not name its message %q and request 1", r.Value, idem, src)
		}
		got[v.Key] = append(got[v.Key], v.Seq)
	}
	for k, seqs := range want {
		if len(got[k]) != len(seqs) {
			t.Fatalf("key %s: %d records, want %d", k, len(got[k]), len(seqs))
		}
		for i := range seqs {
			if got[k][i] != seqs[i] {
				t.Fatalf("key %s: records %v, want %v (in order)", k, got[k], seqs)
			}
		}
	}
}

// TestTopicRequestsTransform: a route posts each event to the sink and then
// produces its hashed form to another topic. Every record arrives once, with
// the message's key, the md5 of the original value and the message's
// idempotency key, in each key's order, after the key's HTTP request; the
// offsets are committed to the end.
func TestTopicRequestsTransform(t *testing.T) {
	h := recordsHarness(t, 4)
	var recs []testkit.Record
	want := map[string][]int64{}
	for i := range 2000 {
		k := "key-" + strconv.Itoa(i%50)
		seq := int64(len(want[k]))
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
		want[k] = append(want[k], seq)
	}
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	_, m, stop := h.run(transformConfig(h, "transform", "hashed"), nil)
	testkit.WaitFor(t, 2*time.Minute, "every message finished", func() bool {
		return m.Sum("orderly_messages_total") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("HTTP deliveries: %s", rep)
	}
	checkHashed(t, h.ReadAll("hashed", len(recs), time.Minute), want)
	if got := testutilCounter(t, m, "orderly_records_total", "result", "produced"); got != float64(len(recs)) {
		t.Fatalf("orderly_records_total{result=produced} = %v, want %d", got, len(recs))
	}
	c, end := h.Committed("transform")
	for i := range c {
		if c[i] != end[i] {
			t.Fatalf("partition %d committed %d of %d", i, c[i], end[i])
		}
	}
}

// TestTopicRequestFailures: a record the broker refuses for a while
// (authorization) is written again until it passes, nothing dead-lettered;
// a record too large for its topic, or for a topic that does not exist, is
// dead-lettered with the reason, and its key goes on.
func TestTopicRequestFailures(t *testing.T) {
	t.Run("transient", func(t *testing.T) {
		h := recordsHarness(t, 2)
		fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "hashed",
			Err: kerr.TopicAuthorizationFailed, Count: -1})
		var recs []testkit.Record
		want := map[string][]int64{}
		for i := range 100 {
			k := "k" + strconv.Itoa(i%5)
			seq := int64(len(want[k]))
			recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
			want[k] = append(want[k], seq)
		}
		if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
			t.Fatal(err)
		}
		_, m, stop := h.run(transformConfig(h, "transient", "hashed"), nil)
		testkit.WaitFor(t, time.Minute, "failed record writes retried", func() bool {
			return testutilCounter(t, m, "orderly_records_total", "result", "retried") >= 3
		})
		fh.Remove()
		testkit.WaitFor(t, 2*time.Minute, "every message delivered", func() bool {
			return testutilCounter(t, m, "orderly_messages_total", "outcome", "delivered") == float64(len(recs))
		})
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if got := m.Sum("orderly_dlq_produced_total"); got != 0 {
			t.Fatalf("%v messages dead-lettered by a passing refusal", got)
		}
		checkHashed(t, h.ReadAll("hashed", len(recs), time.Minute), want)
	})
	t.Run("permanent", func(t *testing.T) {
		h := recordsHarness(t, 1)
		setTopicConfig(t, h.Broker.Addr(), "hashed", "max.message.bytes", "300")
		recs := []testkit.Record{
			{Key: []byte("a"), Value: testkit.EventJSON("a", 0)},
			{Key: []byte("big"), Value: []byte(`{"key":"big","seq":0,"pad":"` + strings.Repeat("x", 2000) + `"}`)},
			{Key: []byte("a"), Value: testkit.EventJSON("a", 1)},
		}
		if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
			t.Fatal(err)
		}
		cfg := transformConfig(h, "permanent", "hashed")
		cfg.Routes[0].Requests[1].Value = nil // the message's value as is: too large for "hashed"
		missing := "missing-" + strconv.Itoa(int(time.Now().UnixNano()%1000))
		v := `{{ .Raw }}`
		cfg.Routes = append(cfg.Routes, config.Route{Name: "nowhere", Requests: []config.Request{{Topic: missing, Value: &v}}})
		cfg.Routes[0].When = `key != "lost"`
		if err := h.Prod.Produce(context.Background(), h.Topic, []testkit.Record{{Key: []byte("lost"), Value: testkit.EventJSON("lost", 0)}}); err != nil {
			t.Fatal(err)
		}
		d, m, stop := h.run(cfg, nil)
		testkit.WaitFor(t, 2*time.Minute, "every message finished", func() bool {
			return m.Sum("orderly_messages_total") == 4
		})
		if ps := d.Problems(); len(ps) != 1 || !strings.Contains(ps[0], missing) {
			t.Fatalf("problems %q: want the missing topic %s reported (readyz)", ps, missing)
		}
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		dead := h.ReadAll("orderly.dlq", 2, time.Minute)
		if len(dead) != 2 {
			t.Fatalf("DLQ holds %d records, want 2", len(dead))
		}
		reasons := map[string]string{}
		for _, r := range dead {
			reasons[string(r.Key)], _ = kafkatest.Header(r, dlq.HeaderError)
			if idx, _ := kafkatest.Header(r, dlq.HeaderRequestIndex); (string(r.Key) == "big") != (idx == "1") {
				t.Fatalf("dead letter of %s failed at request %s", r.Key, idx)
			}
		}
		if !strings.Contains(reasons["big"], "too large") {
			t.Fatalf("reason of the oversized record: %q", reasons["big"])
		}
		if !strings.Contains(strings.ToLower(reasons["lost"]), "unknown topic") {
			t.Fatalf("reason of the record to a missing topic: %q", reasons["lost"])
		}
		if got := len(h.ReadAll("hashed", 2, 30*time.Second)); got != 2 {
			t.Fatalf("hashed holds %d records, want the 2 of key a", got)
		}
	})
}
