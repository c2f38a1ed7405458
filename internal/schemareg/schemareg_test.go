package schemareg

import (
	"encoding/binary"
	"log/slog"
	"math"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry"
	"github.com/hamba/avro/v2"

	"github.com/orderly-dispatch/orderly/config"
)

// TestAvroJSON: what Avro's generic decoding yields becomes plain JSON:
// unions (of records too) as the value they hold, decimals exact, times
// in RFC 3339, NaN as a string, bytes and fixed as base64 and arrays.
func TestAvroJSON(t *testing.T) {
	const schema = `{"type": "record", "name": "Payment", "namespace": "com.example", "fields": [
		{"name": "id", "type": "long"},
		{"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
		{"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
		{"name": "ratio", "type": "double"},
		{"name": "note", "type": ["null", "string"]},
		{"name": "payer", "type": ["null", {"type": "record", "name": "Party", "fields": [
			{"name": "name", "type": "string"},
			{"name": "tags", "type": {"type": "array", "items": ["null", "string"]}}]}]},
		{"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["OPEN", "SETTLED"]}},
		{"name": "raw", "type": "bytes"}]}`
	client, err := schemaregistry.NewClient(schemaregistry.NewConfig("mock://avro-json"))
	if err != nil {
		t.Fatal(err)
	}
	id, err := client.Register("payments-value", schemaregistry.SchemaInfo{Schema: schema}, false)
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(Options{Client: client})
	if err != nil {
		t.Fatal(err)
	}
	s := avro.MustParse(schema)
	at := time.Date(2026, 1, 2, 3, 4, 5, 6e6, time.UTC)
	data, err := avro.Marshal(s, map[string]any{
		"id": int64(1) << 60, "amount": big.NewRat(12345, 100), "at": at, "ratio": math.NaN(),
		"note":   map[string]any{"string": "hello"},
		"payer":  map[string]any{"com.example.Party": map[string]any{"name": "ann", "tags": []any{map[string]any{"string": "a"}, nil}}},
		"status": "SETTLED", "raw": []byte{1, 2},
	})
	if err != nil {
		t.Fatal(err)
	}
	payload := binary.BigEndian.AppendUint32([]byte{0}, uint32(id))
	js, err := r.Decode(config.FormatAvro, "payments", false, append(payload, data...))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"amount":123.45,"at":"2026-01-02T03:04:05.006Z","id":1152921504606846976,"note":"hello",` +
		`"payer":{"name":"ann","tags":["a",null]},"ratio":"NaN","raw":"AQI=","status":"SETTLED"}`
	if string(js) != want {
		t.Errorf("JSON\n %s\nwant\n %s", js, want)
	}
}

// TestClientSurvivesAPanic: a panic in the registry client during a
// request becomes that request's error (an outage: the keys wait); the
// next probe is made and answers (before, the request lock stayed held and
// every later lookup waited for good).
func TestClientSurvivesAPanic(t *testing.T) {
	c := &client{initial: time.Millisecond, max: time.Millisecond, log: slog.New(slog.DiscardHandler)}
	if err := c.do(func() error { panic("boom") }, func() string { return "" }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("a panicking request: %v, want its panic in the error", err)
	}
	done := make(chan error, 1)
	go func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := c.do(func() error { return nil }, func() string { return "" })
			if err == nil || time.Now().After(deadline) {
				done <- err
				return
			}
			time.Sleep(time.Millisecond) // the probe is due 1 ms after the failure
		}
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the requests after it: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the next request waits for the lock the panicking one held")
	}
}
