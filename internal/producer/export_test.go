package producer

import "github.com/confluentinc/confluent-kafka-go/v2/kafka"

// TestFatalError raises a fatal error in the librdkafka producer in use, as
// librdkafka's rd_kafka_test_fatal_error does.
func (pr *Producer) TestFatalError(code kafka.ErrorCode, reason string) kafka.ErrorCode {
	pr.mu.RLock()
	defer pr.mu.RUnlock()
	return pr.p.TestFatalError(code, reason)
}
