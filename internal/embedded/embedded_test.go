package embedded

import (
	"errors"
	"strings"
	"testing"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
)

// TestCommitMetadataCap: like a real broker, the embedded one refuses
// offset-commit metadata over offset.metadata.max.bytes (4096 by default)
// with OFFSET_METADATA_TOO_LARGE and keeps metadata that fits byte-exact.
func TestCommitMetadataCap(t *testing.T) {
	b, err := Start(Options{Listen: "127.0.0.1:0", Partitions: 2, Topics: []string{"t"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": b.Addr(), "group.id": "g",
		"enable.auto.commit": false, "enable.metrics.push": false, "log_level": 3})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	topic := "t"
	commit := func(part int32, off int64, md string) error {
		res, err := c.CommitOffsets([]kafka.TopicPartition{{Topic: &topic, Partition: part, Offset: kafka.Offset(off), Metadata: &md}})
		if err != nil {
			return err
		}
		return res[0].Error
	}
	fits := strings.Repeat("a", DefaultMaxCommitMetadata)
	if err := commit(0, 7, fits); err != nil {
		t.Fatalf("metadata of %d bytes refused: %v", len(fits), err)
	}
	err = commit(0, 9, fits+"b")
	var kerr kafka.Error
	if !errors.As(err, &kerr) || kerr.Code() != kafka.ErrOffsetMetadataTooLarge {
		t.Fatalf("metadata of %d bytes: got %v, want OFFSET_METADATA_TOO_LARGE", len(fits)+1, err)
	}
	res, err := c.Committed([]kafka.TopicPartition{{Topic: &topic, Partition: 0}}, 10000)
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Offset != 7 || res[0].Metadata == nil || *res[0].Metadata != fits {
		t.Fatalf("committed %v with %d bytes of metadata; want 7 with the %d bytes that fit (the refused commit must not land)",
			res[0].Offset, len(deref(res[0].Metadata)), len(fits))
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
