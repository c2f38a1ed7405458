package dispatcher

import (
	"slices"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
)

// shareTimeoutMs bounds the metadata request of shareChanged, made inside
// the rebalance callback.
const shareTimeoutMs = 2000

// shareChanged tells the sender, if it takes one (httpclient.Sender does:
// targets' rates are split by it), this instance's share of the group's
// partitions: the partitions it owns over those of the consumed topics,
// read from the cluster's metadata once per rebalance. The share is 1 when
// the metadata cannot be read, and left as it was while no partition is
// owned. Partitions do not carry equal traffic, so a rate split this way
// is an approximation of the group's rate (README, Targets). Runs on the
// poll loop, after d.parts changed.
func (d *Dispatcher) shareChanged(c *kafka.Consumer) {
	s, ok := d.sender.(interface{ SetShare(float64) })
	if !ok || !slices.ContainsFunc(d.cfg.Targets, func(t config.Target) bool { return t.Rate > 0 }) {
		return // nothing to split: no metadata request inside the callback
	}
	owned := 0
	for _, p := range d.parts {
		if !p.revoking {
			owned++
		}
	}
	if owned == 0 {
		return
	}
	total := 0
	for _, topic := range d.cfg.Kafka.Topics {
		md, err := c.GetMetadata(&topic, false, shareTimeoutMs)
		if err != nil {
			d.log.Warn("unable to read the partition count: targets' rates are not split with the group's other instances until the next rebalance",
				"topic", topic, "error", err)
			total = 0
			break
		}
		tm, ok := md.Topics[topic]
		if !ok || tm.Error.Code() != kafka.ErrNoError || len(tm.Partitions) == 0 {
			total = 0
			break
		}
		total += len(tm.Partitions)
	}
	share := 1.0
	if total > 0 {
		share = min(1, float64(owned)/float64(total))
	}
	s.SetShare(share)
	d.log.Info("share of the group's partitions, for targets' rates", "owned", owned, "partitions", total, "share", share)
}
