package dispatcher

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/avrov2"

	"github.com/orderly-dispatch/orderly/internal/schemareg/schemaregtest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestSchemaRegistryOutageIsNotPoison: Avro values, produced with
// confluent-kafka-go's serializer through a registry speaking the REST API,
// go through the dispatcher to the sink as JSON bodies templated from
// .Value, routed by a `when` on the value. The registry answers 503 when
// the dispatcher starts: nothing is sent or dead-lettered meanwhile, the
// keys wait; once it answers, everything is delivered, in order per key.
func TestSchemaRegistryOutageIsNotPoison(t *testing.T) {
	h := newHarness(t, 4)
	srv := schemaregtest.New(t)
	client, err := schemaregistry.NewClient(schemaregistry.NewConfig(srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	ser, err := avrov2.NewSerializer(client, serde.ValueSerde, avrov2.NewSerializerConfig())
	if err != nil {
		t.Fatal(err)
	}
	type event struct {
		Key  string `avro:"key"`
		Seq  int64  `avro:"seq"`
		Note string `avro:"note"`
	}
	const keys, n = 25, 500
	expected := make(map[string][]int64)
	recs := make([]testkit.Record, n)
	for i := range recs {
		k, seq := fmt.Sprintf("key-%d", i%keys), int64(i/keys)
		v, err := ser.Serialize(h.Topic, &event{Key: k, Seq: seq, Note: "avro"})
		if err != nil {
			t.Fatal(err)
		}
		recs[i] = testkit.Record{Key: []byte(k), Value: v}
		expected[k] = append(expected[k], seq)
	}
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}

	srv.SetStatus(http.StatusServiceUnavailable)
	cfg := h.Config("schema-registry", "max_in_flight = 100", fmt.Sprintf(`
[schema_registry]
url = %q
timeout = "1s"

[[routes]]
name = "avro"
value_format = "avro"
when = 'value.note == "avro" && value.seq >= 0'
  [[routes.requests]]
  url = "%s/people/{{ .Value.key }}"
  body = '{"key":{{ json .Value.key }},"seq":{{ .Value.seq }}}'
`, srv.URL, h.Srv.URL))
	_, m, stop := h.run(cfg, nil)

	testkit.WaitFor(t, 30*time.Second, "the dispatcher asking the registry while it is down", func() bool {
		return srv.Refused() >= 10
	})
	if got := h.Sink.Requests(); got != 0 {
		t.Fatalf("%d requests sent while the registry was down", got)
	}
	if got := m.Sum("orderly_dlq_produced_total"); got != 0 {
		t.Fatalf("%v messages dead-lettered while the registry was down", got)
	}
	srv.SetStatus(0)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == n
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(expected); !rep.OK() {
		t.Fatal(rep)
	}
	if got := m.Sum("orderly_dlq_produced_total"); got != 0 {
		t.Fatalf("%v messages dead-lettered", got)
	}
	if got := len(h.ReadAll("orderly.dlq", 1, 2*time.Second)); got != 0 {
		t.Fatalf("the DLQ holds %d records after a registry outage", got)
	}
	t.Logf("the registry refused %d requests, answered %d", srv.Refused(), srv.Requests()-srv.Refused())
}

// TestSchemaRegistryDownAtShutdown: keys waiting for a registry that never
// answers do not hold a shutdown beyond drain_timeout, and nothing is
// committed or dead-lettered for them.
func TestSchemaRegistryDownAtShutdown(t *testing.T) {
	h := newHarness(t, 2)
	srv := schemaregtest.New(t)
	srv.SetStatus(http.StatusServiceUnavailable)
	recs := make([]testkit.Record, 20)
	for i := range recs {
		// Framed for schema id 1, which the registry cannot be asked for.
		recs[i] = testkit.Record{Key: []byte(fmt.Sprintf("key-%d", i%5)), Value: []byte{0, 0, 0, 0, 1, 2, 'x'}}
	}
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("schema-registry-down", "", fmt.Sprintf(`
[schema_registry]
url = %q

[[routes]]
name = "avro"
value_format = "avro"
  [[routes.requests]]
  url = "%s/people/{{ .Value.key }}"
`, srv.URL, h.Srv.URL))
	cfg.Dispatch.DrainTimeout.Duration = time.Second
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, 30*time.Second, "the dispatcher asking the registry", func() bool { return srv.Refused() >= 5 })
	start := time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("shutdown took %v with drain_timeout 1s", took)
	}
	if got := m.Sum("orderly_committed_offset"); got != 0 {
		t.Errorf("committed %v offsets of messages never delivered", got)
	}
	if got := m.Sum("orderly_dlq_produced_total"); got != 0 || h.Sink.Requests() != 0 {
		t.Errorf("%v dead-lettered, %d sent while the registry was down", got, h.Sink.Requests())
	}
}
