package testkit

import (
	"encoding/json"
	"testing"
	"time"
)

func TestStampNow(t *testing.T) {
	g := &Generator{Keys: 3, Size: 200}
	recs := g.Records(3)
	before := time.Now().UnixNano()
	StampNow(recs)
	for i, r := range recs {
		var ev Event
		if err := json.Unmarshal(r.Value, &ev); err != nil {
			t.Fatalf("record %d: %v after StampNow: %s", i, err, r.Value)
		}
		if ev.ProducedAt < before || ev.ProducedAt > time.Now().UnixNano() {
			t.Errorf("record %d: produced_at %d, want the time of StampNow", i, ev.ProducedAt)
		}
		if len(r.Value) < 200 {
			t.Errorf("record %d: %d bytes, the padding is gone", i, len(r.Value))
		}
	}
	// A value without the field is left as it is.
	v := []byte(`{"key":"k"}`)
	StampNow([]Record{{Value: v}})
	if string(v) != `{"key":"k"}` {
		t.Errorf("value without produced_at became %s", v)
	}
}
