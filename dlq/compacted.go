package dlq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"sync"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/kafkalog"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// compacted is a compacted topic that an instance reads whole and then
// follows, and writes keyed records to, each acknowledged by every in-sync
// replica: the store of the key quarantine and of the DLQ jobs. Safe for
// concurrent use; follow reads until its context ends, close then releases
// the clients.
type compacted struct {
	topic string
	what  string // names the store in errors and logs
	log   *slog.Logger
	prod  *producer.Producer // starts a new librdkafka producer after a fatal error
	cons  *kafka.Consumer    // assigned the whole topic from its beginning; commits nothing
	apply func(*kafka.Message)

	logs     chan kafka.LogEvent // the producer's librdkafka logs, pumped to log
	stopLogs chan struct{}
	pump     sync.WaitGroup

	mu      sync.Mutex      // protects read and changed
	read    map[int32]int64 // next offset to read per partition
	changed chan struct{}   // closed and replaced when read advances
}

// openCompacted creates topic if it does not exist (one partition,
// compacted), connects, and reads it to its end, handing every record to
// apply (in order, from the reading goroutine). readerGroup is the group.id
// librdkafka requires of a consumer; nothing is committed under it.
func openCompacted(ctx context.Context, what, topic, brokers, readerGroup string, cfg *config.Config, log *slog.Logger,
	m *telemetry.Metrics, apply func(*kafka.Message)) (*compacted, error) {
	c := &compacted{topic: topic, what: what, log: log, apply: apply, read: map[int32]int64{}, changed: make(chan struct{})}
	common := kafka.ConfigMap{"bootstrap.servers": brokers, "enable.metrics.push": false, "log_level": 3}
	producer.CopyClientProperties(common, cfg.Kafka.Properties)
	if err := c.ensure(ctx, common); err != nil {
		return nil, err
	}
	cc := kafka.ConfigMap{"group.id": readerGroup, "enable.auto.commit": false, "auto.offset.reset": "earliest",
		"client.id": "orderly-" + what, "fetch.wait.max.ms": 50}
	for k, v := range common {
		cc[k] = v
	}
	c.logs, c.stopLogs = make(chan kafka.LogEvent, 16), make(chan struct{})
	c.pump.Go(func() { kafkalog.Pump(log, c.logs, c.stopLogs) })
	var err error
	// Idempotent, acks=all (producer.New); its restarts count under the
	// store's name: producer="quarantine" or "dlq-jobs".
	c.prod, err = producer.New(brokers, "orderly-"+strings.ReplaceAll(what, " ", "-"), cfg.Kafka.Properties,
		kafka.ConfigMap{"linger.ms": 0, "log_level": 3}, log, c.logs, m)
	if err != nil {
		c.close()
		return nil, fmt.Errorf("%s: unable to create the producer: %w", what, err)
	}
	if c.cons, err = kafka.NewConsumer(&cc); err != nil {
		c.close()
		return nil, fmt.Errorf("%s: unable to create the reader: %w", what, err)
	}
	md, err := c.cons.GetMetadata(&c.topic, false, 10000)
	if err != nil {
		c.close()
		return nil, fmt.Errorf("%s: metadata of %s: %w", what, topic, err)
	}
	var tps []kafka.TopicPartition
	for _, p := range md.Topics[topic].Partitions {
		tps = append(tps, kafka.TopicPartition{Topic: &c.topic, Partition: p.ID, Offset: kafka.OffsetBeginning})
		c.read[p.ID] = 0
	}
	if len(tps) == 0 {
		c.close()
		return nil, fmt.Errorf("%s: topic %s has no partitions", what, topic)
	}
	if err := c.cons.Assign(tps); err != nil {
		c.close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := c.catchUp(ctx, func() { c.poll(100) }); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

// ensure creates the topic, one partition, compacted, unless it exists.
func (c *compacted) ensure(ctx context.Context, common kafka.ConfigMap) error {
	a, err := kafka.NewAdminClient(&common)
	if err != nil {
		return fmt.Errorf("%s: unable to create an admin client: %w", c.what, err)
	}
	defer a.Close()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	res, err := a.CreateTopics(cctx, []kafka.TopicSpecification{{Topic: c.topic, NumPartitions: 1, ReplicationFactor: -1,
		Config: map[string]string{"cleanup.policy": "compact"}}})
	if err != nil {
		return fmt.Errorf("%s: unable to create topic %s: %w", c.what, c.topic, err)
	}
	for _, r := range res {
		if code := r.Error.Code(); code != kafka.ErrNoError && code != kafka.ErrTopicAlreadyExists {
			return fmt.Errorf("%s: unable to create topic %s: %v", c.what, c.topic, r.Error)
		}
	}
	return nil
}

// close releases the clients; follow must have returned.
func (c *compacted) close() {
	if c.cons != nil {
		c.cons.Close()
	}
	if c.prod != nil {
		c.prod.Close() // flushes for up to 5 s
	}
	close(c.stopLogs)
	c.pump.Wait()
}

// follow reads the topic until ctx ends.
func (c *compacted) follow(ctx context.Context) {
	for ctx.Err() == nil {
		c.poll(100)
	}
}

// poll reads at most one record and applies it.
func (c *compacted) poll(ms int) {
	switch e := c.cons.Poll(ms).(type) {
	case *kafka.Message:
		if e.TopicPartition.Error != nil {
			c.log.Warn(c.what+" read", "error", e.TopicPartition.Error)
			return
		}
		c.apply(e)
		c.mu.Lock()
		c.read[e.TopicPartition.Partition] = int64(e.TopicPartition.Offset) + 1
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
	case kafka.Error:
		c.log.Warn(c.what+" reader", "error", e)
	}
}

// catchUp waits until everything written to the topic before the call has
// been read (step reads when nothing else does).
func (c *compacted) catchUp(ctx context.Context, step func()) error {
	want := map[int32]int64{}
	c.mu.Lock()
	parts := make([]int32, 0, len(c.read))
	for p := range c.read {
		parts = append(parts, p)
	}
	c.mu.Unlock()
	for _, p := range parts {
		_, hi, err := c.cons.QueryWatermarkOffsets(c.topic, p, 10000)
		if err != nil {
			return fmt.Errorf("%s: end of %s: %w", c.what, c.topic, err)
		}
		want[p] = hi
	}
	for {
		c.mu.Lock()
		done := true
		for p, hi := range want {
			if c.read[p] < hi {
				done = false
			}
		}
		changed := c.changed
		c.mu.Unlock()
		if done {
			return nil
		}
		if step != nil {
			step()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			continue
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s: catching up with %s: %w", c.what, c.topic, ctx.Err())
		case <-changed:
		case <-t.C:
		}
		t.Stop()
	}
}

// write writes a keyed record (nil value: a tombstone), retrying with
// backoff until it is acknowledged or ctx ends, and returns where it landed.
func (c *compacted) write(ctx context.Context, key, value []byte) (kafka.TopicPartition, error) {
	rec := &kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &c.topic, Partition: kafka.PartitionAny}, Key: key, Value: value}
	wait := 100 * time.Millisecond
	for {
		tp, err := c.prod.Write(ctx, rec)
		if err == nil {
			return tp, nil
		}
		c.log.Error(c.what+" write failed, retrying", "key", string(key), "error", err, "retry_in", wait.String())
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return kafka.TopicPartition{}, fmt.Errorf("%s: writing %s: %w", c.what, key, errors.Join(err, ctx.Err()))
		case <-t.C:
		}
		wait = min(2*wait, 5*time.Second)
	}
}

// readPast reports whether the reader has read the record at tp (and
// applied it).
func (c *compacted) readPast(tp kafka.TopicPartition) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.read[tp.Partition] > int64(tp.Offset)
}
