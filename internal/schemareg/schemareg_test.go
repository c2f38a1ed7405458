package schemareg

import (
	"encoding/binary"
	"math"
	"math/big"
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
