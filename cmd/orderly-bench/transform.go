package main

// The transform scenario: Orderly's Kafka-to-Kafka transform route against
// the plain loop of the write-ups Orderly grew from (consume, md5, produce),
// both with confluent-kafka-go, on the same broker and the same pre-produced
// name events.

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// The transform's topics, which the bench broker creates (Orderly's records
// producer creates none): the name events, Orderly's output, the plain
// loop's output, and the DLQ Orderly is configured with.
const (
	transformInput       = "names"
	transformOutput      = "names_hashed"
	transformPlainOutput = "names_hashed_plain"
	transformDLQ         = "orderly.dlq"
	plainGroup           = "orderly-bench-plain"
)

// transformSide is what one system measured in a transform run.
type transformSide struct {
	System     string  `json:"system"` // orderly or plain loop
	Topic      string  `json:"topic"`  // its output topic
	StartupMS  float64 `json:"startup_ms"`
	FirstMS    float64 `json:"first_record_ms"`
	Seconds    float64 `json:"seconds"`
	Throughput float64 `json:"msgs_per_s"`
	CPUSeconds float64 `json:"cpu_s"`
	CPUPer10k  float64 `json:"cpu_s_per_10k"`
	BrokerCPU  float64 `json:"broker_cpu_s,omitempty"` // the broker process's over the same window
	RSSSteady  float64 `json:"rss_steady_mb"`
	RSSPeak    float64 `json:"rss_peak_mb"`
	MaxRSS     float64 `json:"maxrss_mb"`
	Records    int     `json:"records"`
	Missing    int     `json:"missing"`
	Duplicates int     `json:"duplicates"`
	Violations int     `json:"order_violations"`
	Wrong      int     `json:"wrong"`
	// Identical: every record's value is byte for byte the other
	// system's for the same event (set on the second side measured).
	Identical *bool `json:"identical_values,omitempty"`

	digest uint64 // the sum over its records of the first 8 bytes of md5(value)
}

// transformResult is a transform run's comparison.
type transformResult struct {
	Orderly transformSide  `json:"orderly"`
	Plain   *transformSide `json:"plain_loop,omitempty"` // nil with -ceiling=false
	Ratio   float64        `json:"ratio"`                // Orderly's msg/s / the plain loop's
	First   string         `json:"first"`                // the system measured first
}

// transformRun is the transform scenario's run: a broker, the name events
// pre-produced to it, then the plain loop and Orderly in turn (the order
// alternating over -repeat, so that a drifting machine favours neither),
// each read back from its output topic and checked.
func (b *bencher) transformRun(r benchRun) (*benchResult, error) {
	f := r.f
	m := r.messages()
	res := &benchResult{Name: r.name, Target: r.target, Messages: m, Keys: f.keys, Partitions: f.partitions,
		Size: f.size, Requests: 1, MaxInFlight: f.maxInFlight, Broker: f.broker, Dispatcher: f.dispatcher}
	b.printf("\n== %s: %d name events, %d keys, %d partitions, %d B, topic %s to %s (orderly) and %s (plain loop), max_in_flight %d, broker %s, orderly and plain loop %s\n",
		r.name, m, f.keys, f.partitions, f.size, transformInput, transformOutput, transformPlainOutput, f.maxInFlight, f.broker, f.dispatcher)
	if r.target != "" {
		b.printf("   issue target: %s\n", r.target)
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()

	brokers, brokerChild, stopBroker, err := startBroker(f, b.stderr)
	if err != nil {
		return nil, err
	}
	defer stopBroker()

	gen := r.generator()
	recs := gen.Records(m)
	t0 := time.Now()
	if err := produceRecords(ctx, brokers, transformInput, recs); err != nil {
		return nil, fmt.Errorf("producing the name events: %w", err)
	}
	res.ProduceSeconds = time.Since(t0).Seconds()
	b.printf("   produced %d events in %.1fs\n", m, res.ProduceSeconds)

	systems := []string{"plain loop", "orderly"}
	if r.rep%2 == 1 {
		systems = []string{"orderly", "plain loop"}
	}
	if !f.ceiling {
		systems = []string{"orderly"}
	}
	tr := &transformResult{First: systems[0]}
	var measured []*transformSide
	for _, system := range systems {
		side, topic, err := b.newTransformSide(f, system, brokers)
		if err != nil {
			return nil, err
		}
		run := r.name
		if system != "orderly" {
			run += "-plain"
		}
		profName := func(file string) string { return b.profileName(file, run) }
		s, err := b.measureTransform(ctx, f, side, system, brokers, brokerChild, topic, recs, profName)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", system, err)
		}
		if len(measured) > 0 && s.Duplicates == 0 && measured[0].Duplicates == 0 {
			same := s.digest == measured[0].digest
			s.Identical = &same
		}
		measured = append(measured, s)
		if system == "orderly" {
			tr.Orderly = *s
		} else {
			tr.Plain = s
		}
	}
	o := tr.Orderly
	res.Transform = tr
	res.Seconds, res.Throughput, res.StartupMS, res.FirstRequestMS = o.Seconds, o.Throughput, o.StartupMS, o.FirstMS
	res.CPUPer10k, res.RSSSteadyMB, res.RSSPeakMB, res.MaxRSSMB = o.CPUPer10k, o.RSSSteady, o.RSSPeak, o.MaxRSS
	res.Delivered, res.Missing, res.Duplicates, res.OrderViolation = o.Records, o.Missing, o.Duplicates, o.Violations
	if p := tr.Plain; p != nil && p.Throughput > 0 {
		tr.Ratio = o.Throughput / p.Throughput
		res.Ceiling, res.Ratio = p.Throughput, tr.Ratio
		b.printf("   ratio     orderly / plain loop = %.2f (%s measured first)\n", tr.Ratio, tr.First)
	}
	for _, s := range measured {
		if s.Missing > 0 || s.Violations > 0 || s.Wrong > 0 {
			return nil, fmt.Errorf("%s: check failed: %d missing, %d order violations, %d wrong", s.System, s.Missing, s.Violations, s.Wrong)
		}
		if s.Identical != nil && !*s.Identical {
			return nil, errors.New("the plain loop's records differ from Orderly's: the two transforms must render the same bytes")
		}
	}
	return res, nil
}

// newTransformSide returns the side of system ("orderly" or "plain loop")
// of a transform run, where f.dispatcher says, and its output topic.
func (b *bencher) newTransformSide(f benchFlags, system, brokers string) (orderlySide, string, error) {
	switch {
	case system != "orderly" && f.dispatcher == "in-process":
		return newLocalPlain(brokers), transformPlainOutput, nil
	case system != "orderly":
		return newChild("plain loop", b.stderr, "-serve-plainloop", "-brokers", brokers), transformPlainOutput, nil
	}
	toml := transformConfig(f, brokers)
	if f.dispatcher == "in-process" {
		cfg, err := config.Parse([]byte(toml), "transform.toml")
		if err != nil {
			return nil, "", fmt.Errorf("transform configuration: %w", err)
		}
		l, err := newLocalOrderly(cfg, f.verbose, b.stderr)
		return l, transformOutput, err
	}
	c, err := newChildOrderly(toml, f.verbose, b.stderr)
	return c, transformOutput, err
}

// produceRecords produces recs to topic and waits for their
// acknowledgement, in chunks.
func produceRecords(ctx context.Context, brokers, topic string, recs []testkit.Record) error {
	p, err := testkit.NewProducer(brokers)
	if err != nil {
		return err
	}
	defer p.Close()
	return produceChunks(ctx, p, topic, len(recs), func(i, j int) []testkit.Record { return recs[i:j] })
}

// measureTransform starts side and measures it until its output topic's end
// offsets (polled every transformPoll) count every event, then stops it and
// reads the topic back to check it. The rate's window runs from the first
// record to the last (start-up left out), the CPU from the assignment.
func (b *bencher) measureTransform(ctx context.Context, f benchFlags, side orderlySide, system, brokers string,
	broker *brokerProcess, topic string, recs []testkit.Record, profName func(string) string) (*transformSide, error) {
	s := &transformSide{System: system, Topic: topic}
	ends, err := newEndOffsets(brokers, topic, f.partitions)
	if err != nil {
		return nil, err
	}
	defer ends.close()
	defer side.shutdown()

	started := time.Now()
	if err := side.start(ctx); err != nil {
		return nil, err
	}
	assigned := time.Now()
	cpu0, bcpu0 := side.cpu(), broker.cpu()
	stopProfiles, err := startProfiles(side, f, profName)
	if err != nil {
		return nil, err
	}
	rss := sampleRSS(100*time.Millisecond, side.rss)
	defer rss.end()
	want := int64(len(recs))
	var first, done time.Time
	tick := time.NewTicker(transformPoll)
	defer tick.Stop()
	for done.IsZero() {
		select {
		case <-side.exited():
			return nil, fmt.Errorf("stopped: %v", side.exitErr())
		case <-ctx.Done():
			return nil, fmt.Errorf("timed out after %s", f.timeout)
		case <-tick.C:
		}
		n, err := ends.total(ctx)
		now := time.Now()
		switch {
		case err != nil:
			return nil, fmt.Errorf("reading the end offsets of %s: %w", topic, err)
		case n > 0 && first.IsZero():
			first = now
		}
		if n >= want {
			done = now
		}
	}
	cpu, bcpu := side.cpu()-cpu0, broker.cpu()-bcpu0
	steady, peak := rss.end()
	if err := stopProfiles(); err != nil {
		return nil, err
	}
	s.MaxRSS = mb(side.peakRSS())
	if err := side.shutdown(); err != nil {
		return nil, fmt.Errorf("stopped with an error: %w", err)
	}
	window := max(done.Sub(first), transformPoll) // within one poll: its resolution
	s.StartupMS, s.FirstMS, s.Seconds = ms(assigned.Sub(started)), ms(first.Sub(assigned)), window.Seconds()
	s.Throughput = float64(len(recs)) / window.Seconds()
	s.CPUSeconds, s.CPUPer10k, s.BrokerCPU = cpu.Seconds(), per10k(cpu, float64(len(recs))), bcpu.Seconds()
	s.RSSSteady, s.RSSPeak = mb(steady), mb(peak)
	b.printf("   %-9s %d records on %s in %.2fs (first record written to the last) = %.0f msg/s; assignment after %.0fms, first record %.0fms later\n",
		system, len(recs), topic, s.Seconds, s.Throughput, s.StartupMS, s.FirstMS)
	b.printf("             cpu %.2f s (%.2f s/10k) in its process", s.CPUSeconds, s.CPUPer10k)
	if f.broker == "process" {
		b.printf(", broker %.2f s", s.BrokerCPU)
	}
	b.printf("; rss MB steady %.0f, peak %.0f (maxrss %.0f)\n", s.RSSSteady, s.RSSPeak, s.MaxRSS)

	rep, digest, err := readHashed(ctx, brokers, topic, recs)
	if err != nil {
		return nil, err
	}
	s.Records, s.Missing, s.Duplicates, s.Violations, s.Wrong = rep.Records, rep.Missing, rep.Duplicates, rep.Violations, rep.Wrong
	s.digest = digest
	b.printf("             order %d violations, %d duplicates, %d missing, %d wrong\n", s.Violations, s.Duplicates, s.Missing, s.Wrong)
	if rep.Wrong > 0 {
		b.printf("             wrong records: %q\n", rep.Problems)
	}
	return s, nil
}

// transformPoll is how often measureTransform reads the output topic's end
// offsets: the resolution of the window's end.
const transformPoll = 5 * time.Millisecond

// endOffsets reads the end offsets of a topic's partitions, all in one
// request.
type endOffsets struct {
	a   *kafka.AdminClient
	req map[kafka.TopicPartition]kafka.OffsetSpec
}

func newEndOffsets(brokers, topic string, partitions int) (*endOffsets, error) {
	a, err := kafka.NewAdminClient(&kafka.ConfigMap{"bootstrap.servers": brokers, "log_level": 3})
	if err != nil {
		return nil, err
	}
	e := &endOffsets{a: a, req: map[kafka.TopicPartition]kafka.OffsetSpec{}}
	for p := range partitions {
		e.req[kafka.TopicPartition{Topic: &topic, Partition: int32(p)}] = kafka.LatestOffsetSpec
	}
	return e, nil
}

// total returns the sum of the end offsets: how many records the topic
// holds, as it was empty at first.
func (e *endOffsets) total(ctx context.Context) (int64, error) {
	res, err := e.a.ListOffsets(ctx, e.req)
	if err != nil {
		return 0, err
	}
	var n int64
	for tp, info := range res.ResultInfos {
		if info.Error.Code() != kafka.ErrNoError {
			return 0, fmt.Errorf("partition %d: %w", tp.Partition, info.Error)
		}
		n += int64(info.Offset)
	}
	return n, nil
}

func (e *endOffsets) close() { e.a.Close() }

// readHashed reads topic from the start until it has a record of every
// event of recs, and returns the check of the records and a digest of
// their values: the sum of the first 8 bytes of each one's md5, the same
// for two topics that hold the same values in any order.
func readHashed(ctx context.Context, brokers, topic string, recs []testkit.Record) (testkit.HashedReport, uint64, error) {
	check := testkit.NewHashedCheck(recs)
	var n atomic.Int64
	var digest atomic.Uint64
	readCtx, stopReading := context.WithCancel(ctx)
	defer stopReading()
	readDone := make(chan error, 1)
	go func() {
		readDone <- testkit.Consume(readCtx, brokers, topic, func(m *kafka.Message) {
			check.Add(m.Key, m.Value)
			sum := md5.Sum(m.Value)
			var d uint64
			for _, c := range sum[:8] {
				d = d<<8 | uint64(c)
			}
			digest.Add(d)
			n.Add(1)
		})
	}()
	want := int64(len(recs))
	for wait := 2 * time.Millisecond; ; {
		if n.Load() >= want {
			// Duplicates may have reached the count first.
			if check.Report().Missing == 0 {
				break
			}
			wait = 50 * time.Millisecond
		}
		select {
		case err := <-readDone:
			return testkit.HashedReport{}, 0, fmt.Errorf("reading %s: %v", topic, err)
		case <-ctx.Done():
			return check.Report(), 0, fmt.Errorf("reading %s: timed out with %d of %d records read", topic, n.Load(), want)
		case <-time.After(wait):
		}
	}
	stopReading()
	if err := <-readDone; err != nil {
		return testkit.HashedReport{}, 0, fmt.Errorf("reading %s: %w", topic, err)
	}
	return check.Report(), digest.Load(), nil
}

// transformConfig is Orderly's configuration of a transform run: one route
// with one topic request, testkit.HashedValue to names_hashed, and the DLQ
// on (the plain loop has none).
func transformConfig(f benchFlags, brokers string) string {
	return configHead(f, brokers, transformInput) + fmt.Sprintf(`
[dlq]
topic = %q

[admin]
listen = ""

[[routes]]
name = "hash-names"
  [[routes.requests]]
  topic = %q
  value = '%s'
`, transformDLQ, transformOutput, testkit.HashedValue)
}

// --- the plain loop -----------------------------------------------------------

// localPlain is the transform's baseline in this process, the write-ups'
// loop: consume, then transform and produce (idempotent, acks=all, not waited
// for) in a goroutine per input partition, which keeps keys in order and beat
// one loop by a fifth here; auto-commit whether acknowledged or not, no DLQ.
type localPlain struct {
	localSide
	brokers string
	// bad counts events the transform could not read (skipped: no DLQ);
	// failed, records whose delivery failed (lost).
	bad, failed atomic.Int64
}

func newLocalPlain(brokers string) *localPlain {
	return &localPlain{localSide: newLocalSide("the plain loop"), brokers: brokers}
}

func (l *localPlain) start(ctx context.Context) error {
	c, err := kafka.NewConsumer(&kafka.ConfigMap{
		"bootstrap.servers":   l.brokers,
		"group.id":            plainGroup,
		"auto.offset.reset":   "earliest",
		"enable.auto.commit":  true,
		"enable.metrics.push": false,
		"log_level":           3,
	})
	if err != nil {
		return fmt.Errorf("unable to create the consumer: %w", err)
	}
	p, err := kafka.NewProducer(&kafka.ConfigMap{
		"bootstrap.servers":  l.brokers,
		"enable.idempotence": true,
		"acks":               "all",
		// Orderly's producer's settings: librdkafka's default linger, and
		// keys partitioned as the Java client does.
		"linger.ms":           5,
		"partitioner":         "murmur2_random",
		"enable.metrics.push": false,
		"log_level":           3,
	})
	if err != nil {
		c.Close()
		return fmt.Errorf("unable to create the producer: %w", err)
	}
	assigned := make(chan struct{})
	var once sync.Once
	err = c.SubscribeTopics([]string{transformInput}, func(c *kafka.Consumer, ev kafka.Event) error {
		switch e := ev.(type) {
		case kafka.AssignedPartitions:
			err := c.Assign(e.Partitions)
			once.Do(func() { close(assigned) })
			return err
		case kafka.RevokedPartitions:
			return c.Unassign()
		}
		return nil
	})
	if err != nil {
		c.Close()
		p.Close()
		return fmt.Errorf("unable to subscribe: %w", err)
	}
	l.run(func(ctx context.Context) error { return l.loop(ctx, c, p) })
	select {
	case <-assigned:
		return nil
	case <-l.done:
		return l.stopped()
	case <-ctx.Done():
		return errors.New("timed out waiting for the partition assignment")
	}
}

// loop consumes until ctx ends, handing each message to its partition's
// worker, then lets the workers finish, flushes the producer and closes both
// clients (the consumer commits its last offsets as it closes).
func (l *localPlain) loop(ctx context.Context, c *kafka.Consumer, p *kafka.Producer) error {
	var reports sync.WaitGroup
	reports.Go(func() {
		for ev := range p.Events() {
			if m, ok := ev.(*kafka.Message); ok && m.TopicPartition.Error != nil {
				l.failed.Add(1)
			}
		}
	})
	var workers sync.WaitGroup
	queues := map[int32]chan *kafka.Message{}
	var failed atomic.Pointer[error] // the first produce error, which ends the loop
	var err error
	for err == nil && ctx.Err() == nil && failed.Load() == nil {
		switch e := c.Poll(100).(type) {
		case *kafka.Message:
			q := queues[e.TopicPartition.Partition]
			if q == nil {
				q = make(chan *kafka.Message, 1024)
				queues[e.TopicPartition.Partition] = q
				workers.Go(func() {
					if err := l.work(ctx, p, q); err != nil {
						failed.CompareAndSwap(nil, &err)
					}
					for range q { // the loop may be sending: drop the rest
					}
				})
			}
			q <- e
		case kafka.Error:
			if e.IsFatal() {
				err = fmt.Errorf("fatal consumer error: %w", e)
			}
		}
	}
	for _, q := range queues {
		close(q)
	}
	workers.Wait()
	if perr := failed.Load(); perr != nil {
		err = errors.Join(err, *perr)
	}
	if left := p.Flush(10000); left > 0 {
		err = errors.Join(err, fmt.Errorf("%d records not acknowledged at shutdown", left))
	}
	err = errors.Join(err, c.Close())
	p.Close()
	reports.Wait()
	if n := l.failed.Load(); n > 0 {
		err = errors.Join(err, fmt.Errorf("%d records failed", n))
	}
	if n := l.bad.Load(); n > 0 {
		err = errors.Join(err, fmt.Errorf("%d events skipped: not name events", n))
	}
	return err
}

// work transforms and produces the messages of one partition, in order,
// until q is closed, or until ctx ends while the producer's queue is full,
// or a produce fails.
func (l *localPlain) work(ctx context.Context, p *kafka.Producer, q <-chan *kafka.Message) error {
	out := transformPlainOutput
	var tf plainTransform
	for m := range q {
		v, err := tf.hashed(m.Value)
		if err != nil {
			l.bad.Add(1) // the write-ups log it and go on: no DLQ
			continue
		}
		rec := &kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &out, Partition: kafka.PartitionAny}, Key: m.Key, Value: v}
		for {
			err := p.Produce(rec, nil)
			if err == nil {
				break
			}
			if ke, ok := err.(kafka.Error); !ok || ke.Code() != kafka.ErrQueueFull {
				return fmt.Errorf("produce: %w", err)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(time.Millisecond):
			}
		}
	}
	return nil
}

func (l *localPlain) stats() (orderlyStats, error) { return l.readStats(nil), nil }

func (l *localPlain) shutdown() error { return l.stopLoop(nil) }

// servePlainLoop is `orderly-bench -serve-plainloop -brokers ADDR`: the plain
// loop alone, answering the protocol of -serve-dispatcher (dispatcher.go).
func servePlainLoop(brokers string, stdin io.Reader, stdout, stderr io.Writer) int {
	fail := failer("serve-plainloop", stderr)
	if brokers == "" {
		return fail(errors.New("-brokers ADDR is required"))
	}
	return serveSide(newLocalPlain(brokers), stdin, stdout, fail)
}

// plainTransform renders what testkit.HashedValue renders, byte for byte,
// with encoding/json: the event's key, seq and names, and the md5 of the
// whole event. Not safe for concurrent use (it reuses its buffer).
type plainTransform struct {
	buf bytes.Buffer
	enc *json.Encoder
}

// hashed returns the transform of the name event value.
func (t *plainTransform) hashed(value []byte) ([]byte, error) {
	var ev struct {
		Key       string      `json:"key"`
		Seq       json.Number `json:"seq"`
		FirstName string      `json:"first_name"`
		LastName  string      `json:"last_name"`
	}
	if err := json.Unmarshal(value, &ev); err != nil {
		return nil, err
	}
	sum := md5.Sum(value)
	if t.enc == nil {
		t.enc = json.NewEncoder(&t.buf)
		t.enc.SetEscapeHTML(false) // as the template's json
	}
	t.buf.Reset()
	err := t.enc.Encode(struct {
		Key       string      `json:"key"`
		Seq       json.Number `json:"seq"`
		FirstName string      `json:"first_name"`
		LastName  string      `json:"last_name"`
		Hash      string      `json:"hash"`
	}{ev.Key, ev.Seq, ev.FirstName, ev.LastName, hex.EncodeToString(sum[:])})
	if err != nil {
		return nil, err
	}
	return bytes.Clone(bytes.TrimSuffix(t.buf.Bytes(), []byte("\n"))), nil
}
