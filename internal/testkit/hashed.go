package testkit

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
)

// HashedValue is the transform of the name events (Event) the transform demo
// and benchmark configure: the event's key, sequence and names, and the md5
// of the whole original event as "hash".
const HashedValue = `{"key":"{{ .Value.key }}","seq":{{ .Value.seq }},"first_name":{{ json .Value.first_name }},` +
	`"last_name":{{ json .Value.last_name }},"hash":"{{ md5 .Raw }}"}`

// HashedCheck checks the records a HashedValue transform produced against
// the events it was given: each under its event's key, with the md5 of its
// event, once, in its key's order. Safe for concurrent use.
type HashedCheck struct {
	mu   sync.Mutex
	want map[string][]string // per key, the md5 of each event by seq
	got  map[string][]int64  // per key, the seqs received in order
	n    int
	bad  []string // the first problems of records that do not match their event
	nbad int
}

// NewHashedCheck expects the transforms of recs (keys and Event values).
func NewHashedCheck(recs []Record) *HashedCheck {
	c := &HashedCheck{want: map[string][]string{}, got: map[string][]int64{}}
	for _, r := range recs {
		sum := md5.Sum(r.Value)
		c.want[string(r.Key)] = append(c.want[string(r.Key)], hex.EncodeToString(sum[:]))
	}
	return c
}

// Add checks one produced record.
func (c *HashedCheck) Add(key, value []byte) {
	var v struct {
		Key  string `json:"key"`
		Seq  int64  `json:"seq"`
		Hash string `json:"hash"`
	}
	err := json.Unmarshal(value, &v)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
	want := c.want[v.Key]
	switch {
	case err != nil:
		c.problem("record %q is not a transformed event: %v", value, err)
	case string(key) != v.Key:
		c.problem("the record of %s/%d has key %q", v.Key, v.Seq, key)
	case v.Seq < 0 || v.Seq >= int64(len(want)):
		c.problem("no event %s/%d was produced", v.Key, v.Seq)
	case want[v.Seq] != v.Hash:
		c.problem("the record of %s/%d has hash %s, the event's md5 is %s", v.Key, v.Seq, v.Hash, want[v.Seq])
	default:
		c.got[v.Key] = append(c.got[v.Key], v.Seq)
	}
}

func (c *HashedCheck) problem(format string, args ...any) {
	c.nbad++
	if len(c.bad) < 5 {
		c.bad = append(c.bad, fmt.Sprintf(format, args...))
	}
}

// Records returns how many records were added.
func (c *HashedCheck) Records() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// Complete reports whether every event's record arrived.
func (c *HashedCheck) Complete() bool { r := c.Report(); return r.Missing == 0 }

// HashedReport is what a HashedCheck found.
type HashedReport struct {
	Records    int      // added
	Missing    int      // events without a record
	Duplicates int      // records of an event seen before
	Violations int      // records that came after a later event of their key
	Wrong      int      // records that match no event (key, hash, format)
	Problems   []string // the first wrong records
}

// OK reports whether every event arrived, in order, transformed right.
func (r HashedReport) OK() bool { return r.Missing == 0 && r.Violations == 0 && r.Wrong == 0 }

func (r HashedReport) String() string {
	return fmt.Sprintf("records %d, missing %d, duplicates %d, order violations %d, wrong %d %q",
		r.Records, r.Missing, r.Duplicates, r.Violations, r.Wrong, r.Problems)
}

// Report returns what the check found so far.
func (c *HashedCheck) Report() HashedReport {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := HashedReport{Records: c.n, Wrong: c.nbad, Problems: c.bad}
	for k, want := range c.want {
		seen := make([]bool, len(want))
		high := int64(-1)
		for _, s := range c.got[k] {
			switch {
			case seen[s]:
				r.Duplicates++
			case s < high:
				r.Violations++
			}
			seen[s] = true
			high = max(high, s)
		}
		for _, ok := range seen {
			if !ok {
				r.Missing++
			}
		}
	}
	return r
}

// Consume reads every partition of topic from the start, handing each
// record to fn, until ctx ends.
func Consume(ctx context.Context, brokers, topic string, fn func(*kafka.Message)) error {
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": brokers, "group.id": "orderly-check-" + topic,
		"enable.auto.commit": false, "auto.offset.reset": "earliest", "enable.metrics.push": false, "log_level": 3})
	if err != nil {
		return err
	}
	defer c.Close()
	md, err := c.GetMetadata(&topic, false, 10000)
	if err != nil {
		return err
	}
	var tps []kafka.TopicPartition
	for _, p := range md.Topics[topic].Partitions {
		tps = append(tps, kafka.TopicPartition{Topic: &topic, Partition: p.ID, Offset: kafka.OffsetBeginning})
	}
	if err := c.Assign(tps); err != nil {
		return err
	}
	for ctx.Err() == nil {
		if m, ok := c.Poll(100).(*kafka.Message); ok && m.TopicPartition.Error == nil {
			fn(m)
		}
	}
	return nil
}
