package testkit

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
)

var firstNames = []string{"Bonita", "Ali", "Mei", "Jonas", "Amara", "Lucía", "Tariq", "Ingrid", "Kofi", "Noor", "Pavel", "Yuki"}
var lastNames = []string{"Kautzer", "Okafor", "Lindqvist", "Moreau", "Haddad", "Tanaka", "Novak", "Silva", "Reyes", "Kowalski"}

// Generator makes events round-robin over keys "key-0" .. "key-<Keys-1>",
// each key with its own sequence 0, 1, 2, ...
type Generator struct {
	Keys int
	// Size, if set, pads each event's JSON to about this many bytes.
	Size int
	// KeyOf, if set, picks the key index of the i-th event instead of
	// round-robin (the benchmark uses it for a hot key).
	KeyOf func(i int) int

	next     int
	seq      []int64
	expected map[string][]int64
}

// Next returns the next event's key and JSON value.
func (g *Generator) Next() (key string, value []byte) {
	if g.seq == nil {
		g.seq = make([]int64, g.Keys)
		g.expected = make(map[string][]int64, g.Keys)
	}
	k := g.next % g.Keys
	if g.KeyOf != nil {
		k = g.KeyOf(g.next)
	}
	i := g.next
	g.next++
	key = "key-" + strconv.Itoa(k)
	ev := Event{Key: key, Seq: g.seq[k], FirstName: firstNames[i%len(firstNames)],
		LastName: lastNames[(i/7)%len(lastNames)], ProducedAt: time.Now().UnixNano()}
	g.expected[key] = append(g.expected[key], g.seq[k])
	g.seq[k]++
	value, _ = json.Marshal(ev)
	if g.Size > len(value) {
		ev.Pad = strings.Repeat("x", g.Size-len(value)-len(`,"pad":""`))
		value, _ = json.Marshal(ev)
	}
	return key, value
}

// Expected returns, per key, the sequence numbers generated so far. The map
// is the generator's own: do not modify it while generating.
func (g *Generator) Expected() map[string][]int64 { return g.expected }

// Record is one message to produce.
type Record struct {
	Key     []byte // nil: no key
	Value   []byte
	Headers []kafka.Header
	// Timestamp, if set, is the record's create time (else the producer's clock).
	Timestamp time.Time
}

// Producer produces records with the real librdkafka client and waits for
// their delivery.
type Producer struct {
	p *kafka.Producer
}

// NewProducer connects a producer (acks=all, idempotent) to brokers.
func NewProducer(brokers string) (*Producer, error) {
	p, err := kafka.NewProducer(&kafka.ConfigMap{
		"bootstrap.servers":   brokers,
		"enable.idempotence":  true,
		"acks":                "all",
		"linger.ms":           5,
		"enable.metrics.push": false,
		"log_level":           3,
	})
	if err != nil {
		return nil, fmt.Errorf("testkit: unable to create a producer: %w", err)
	}
	go func() {
		for range p.Events() { // errors surface in delivery reports
		}
	}()
	return &Producer{p: p}, nil
}

// Produce sends records to topic (partitioned by key; unkeyed records by
// librdkafka's default) and waits until every one is acknowledged.
func (p *Producer) Produce(ctx context.Context, topic string, recs []Record) error {
	return p.produce(ctx, topic, kafka.PartitionAny, recs)
}

// ProduceTo sends records to one partition.
func (p *Producer) ProduceTo(ctx context.Context, topic string, partition int32, recs []Record) error {
	return p.produce(ctx, topic, partition, recs)
}

func (p *Producer) produce(ctx context.Context, topic string, partition int32, recs []Record) error {
	reports := make(chan kafka.Event, len(recs))
	for i := range recs {
		m := &kafka.Message{
			TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: partition},
			Key:            recs[i].Key, Value: recs[i].Value, Headers: recs[i].Headers,
			Timestamp: recs[i].Timestamp,
		}
		for {
			err := p.p.Produce(m, reports)
			if err == nil {
				break
			}
			if ke, ok := err.(kafka.Error); ok && ke.Code() == kafka.ErrQueueFull {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(5 * time.Millisecond):
				}
				continue
			}
			return fmt.Errorf("testkit: produce: %w", err)
		}
	}
	for range recs {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev := <-reports:
			if m, ok := ev.(*kafka.Message); ok && m.TopicPartition.Error != nil {
				return fmt.Errorf("testkit: delivery: %w", m.TopicPartition.Error)
			}
		}
	}
	return nil
}

// Close flushes and closes the producer.
func (p *Producer) Close() {
	p.p.Flush(5000)
	p.p.Close()
}

// Records makes n generated events into records.
func (g *Generator) Records(n int) []Record {
	recs := make([]Record, n)
	for i := range recs {
		k, v := g.Next()
		recs[i] = Record{Key: []byte(k), Value: v}
	}
	return recs
}

// EventJSON is the smallest event the sink checks: {"key":..,"seq":..}.
func EventJSON(key string, seq int64) []byte {
	return []byte(`{"key":"` + key + `","seq":` + strconv.FormatInt(seq, 10) + `}`)
}

// StampNow rewrites, in place, the produced_at of JSON events about to be
// produced to the current time, so that end-to-end latency starts at the
// produce call rather than at generation.
func StampNow(recs []Record) {
	now := strconv.AppendInt(nil, time.Now().UnixNano(), 10)
	for i := range recs {
		restamp(recs[i].Value, now)
	}
}

// restamp overwrites the digits of "produced_at":<digits> in place; the
// generator wrote a same-length nanosecond timestamp.
func restamp(v, now []byte) {
	const field = `"produced_at":`
	for i := 0; i+len(field) < len(v); i++ {
		if string(v[i:i+len(field)]) == field {
			j := i + len(field)
			if j+len(now) <= len(v) {
				copy(v[j:j+len(now)], now)
			}
			return
		}
	}
}
