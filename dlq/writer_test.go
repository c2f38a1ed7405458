package dlq

import (
	"strconv"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/filters"
)

// TestBuild: a dead letter keeps the original key, value and headers (in
// their order, first) and says, with the documented values, why it failed
// and where it came from.
func TestBuild(t *testing.T) {
	m := &filters.Message{Topic: "orders", Partition: 3, Offset: 41, Key: []byte("user-7"), Value: []byte(`{"id":1}`),
		Timestamp: time.Date(2024, 5, 6, 7, 8, 9, 123e6, time.FixedZone("CEST", 2*3600)),
		Headers:   []filters.Header{{Key: "traceparent", Value: []byte("00-abc-01")}, {Key: "bin", Value: []byte{0, 0xff}}}}
	f := &Failure{Reason: "answered 400", Status: 400, Route: "people", RequestIndex: 1, Attempts: 2}
	now := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	rec := Build("orderly.dlq", m, f, now, -1)
	if *rec.TopicPartition.Topic != "orderly.dlq" || string(rec.Key) != "user-7" || string(rec.Value) != `{"id":1}` {
		t.Fatalf("record %s %q = %q, want the original key and value on orderly.dlq", *rec.TopicPartition.Topic, rec.Key, rec.Value)
	}
	if len(rec.Headers) < 2 || rec.Headers[0].Key != "traceparent" || string(rec.Headers[0].Value) != "00-abc-01" ||
		rec.Headers[1].Key != "bin" || string(rec.Headers[1].Value) != "\x00\xff" {
		t.Fatalf("headers %v, want the original ones first", rec.Headers)
	}
	got := map[string]string{}
	for _, h := range rec.Headers[2:] {
		if _, dup := got[h.Key]; dup {
			t.Fatalf("header %s twice", h.Key)
		}
		got[h.Key] = string(h.Value)
	}
	want := map[string]string{
		HeaderError:             "answered 400",
		HeaderStatus:            "400",
		HeaderRoute:             "people",
		HeaderRequestIndex:      "1",
		HeaderAttempts:          "2",
		HeaderOriginalTopic:     "orders",
		HeaderOriginalPartition: "3",
		HeaderOriginalOffset:    "41",
		HeaderOriginalTimestamp: "2024-05-06T05:08:09.123Z", // UTC
		HeaderFailedAt:          "2025-01-02T03:04:05.000000006Z",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("orderly headers %v, want exactly %v", got, want)
	}

	// Cut to fit: the value's prefix and its original size.
	rec = Build("orderly.dlq", m, &Failure{Reason: "r", RequestIndex: -1}, now, 3)
	last := rec.Headers[len(rec.Headers)-1]
	if string(rec.Value) != `{"i` || last.Key != HeaderValueTruncated || string(last.Value) != strconv.Itoa(len(m.Value)) {
		t.Fatalf("cut record %q with %s=%q, want 3 bytes and the original size", rec.Value, last.Key, last.Value)
	}
	// No request was sent: index 0, where a replay starts.
	for _, h := range rec.Headers {
		if h.Key == HeaderRequestIndex && string(h.Value) != "0" {
			t.Fatalf("%s = %q for a message no request was sent for, want 0", h.Key, h.Value)
		}
	}
	// Quarantined: the cause is named.
	rec = Build("orderly.dlq", m, &Failure{Reason: "r", QuarantinedBy: &Cause{Topic: "orders", Partition: 3, Offset: 40}}, now, -1)
	hs := map[string]string{}
	for _, h := range rec.Headers {
		hs[h.Key] = string(h.Value)
	}
	if hs[HeaderQuarantined] != "true" || hs[HeaderQuarantinedBy] != "orders/3/40" {
		t.Fatalf("quarantined record headers %v", hs)
	}
}
