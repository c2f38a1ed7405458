// Package kafkalog forwards librdkafka's log lines to slog.
package kafkalog

import (
	"context"
	"log/slog"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
)

// Pump forwards librdkafka's log lines to slog until stop is closed.
func Pump(log *slog.Logger, logs <-chan kafka.LogEvent, stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case e := <-logs:
			lvl := slog.LevelDebug
			switch {
			case e.Level <= 3:
				lvl = slog.LevelError
			case e.Level == 4:
				lvl = slog.LevelWarn
			case e.Level <= 6:
				lvl = slog.LevelInfo
			}
			log.Log(context.Background(), lvl, e.Message, "component", "librdkafka", "client", e.Name, "tag", e.Tag)
		}
	}
}
