// Package embedded runs an in-process Kafka-protocol broker (franz-go's
// kfake) for `orderly demo`, `brokers = "embedded"` and tests. It speaks the
// real Kafka protocol on a TCP address, so librdkafka, kcat or any other
// Kafka client can produce to and consume from it.
//
// It is a single-node broker meant for development and testing: without a
// data directory its whole log lives in memory.
package embedded

import (
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Options configures an embedded broker.
type Options struct {
	// Listen is the host:port to listen on; port 0 picks a free port.
	Listen string
	// Partitions is the number of partitions of each seeded topic.
	Partitions int
	// Topics are created at start-up (when the data directory has no state).
	Topics []string
	// DataDir, if set, makes the log, committed offsets and producer state
	// durable across restarts.
	DataDir string
	// MinSessionTimeout lowers the group session timeout the broker accepts
	// (tests use 1s to make rebalances fast); 0 keeps kfake's default.
	MinSessionTimeout time.Duration
	// Logger receives the broker's warnings and errors; nil discards them.
	Logger *slog.Logger
	// MaxCommitMetadata is the longest offset-commit metadata the broker
	// accepts, as a real broker's offset.metadata.max.bytes: 0 means 4096
	// (Kafka's default), negative means no limit (kfake's own behaviour).
	MaxCommitMetadata int
	// Extra options are passed to kfake unchanged (tests use them for
	// fault injection settings).
	Extra []kfake.Opt
}

// DefaultMaxCommitMetadata is Kafka's default offset.metadata.max.bytes.
const DefaultMaxCommitMetadata = 4096

// Broker is a running embedded broker. Close it after every client that
// talks to it: a client whose broker vanished first waits for its timeouts.
type Broker struct {
	cluster *kfake.Cluster
	addr    string
}

// Start starts a broker as configured.
func Start(o Options) (*Broker, error) {
	host, portStr, err := net.SplitHostPort(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("embedded broker: listen address %q: %w", o.Listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("embedded broker: listen port %q: %w", portStr, err)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	parts := o.Partitions
	if parts <= 0 {
		parts = 1
	}
	opts := []kfake.Opt{
		kfake.Ports(port),
		kfake.ListenFn(func(network, _ string) (net.Listener, error) {
			return net.Listen(network, net.JoinHostPort(host, strconv.Itoa(port)))
		}),
		kfake.DefaultNumPartitions(parts),
		kfake.AllowAutoTopicCreation(),
		kfake.ClusterID("orderly-embedded"),
	}
	if len(o.Topics) > 0 {
		opts = append(opts, kfake.SeedTopics(int32(parts), o.Topics...))
	}
	if o.DataDir != "" {
		opts = append(opts, kfake.DataDir(o.DataDir))
	}
	if o.MinSessionTimeout > 0 {
		opts = append(opts, kfake.GroupMinSessionTimeout(o.MinSessionTimeout))
	}
	if o.Logger != nil {
		opts = append(opts, kfake.WithLogger(slogLogger{o.Logger}))
	}
	opts = append(opts, o.Extra...)
	cl, err := kfake.NewCluster(opts...)
	if err != nil {
		return nil, fmt.Errorf("embedded broker: unable to start on %s: %w", o.Listen, err)
	}
	limit := o.MaxCommitMetadata
	if limit == 0 {
		limit = DefaultMaxCommitMetadata
	}
	if limit > 0 {
		capCommitMetadata(cl, limit)
	}
	addrs := cl.ListenAddrs()
	if len(addrs) == 0 {
		cl.Close()
		return nil, fmt.Errorf("embedded broker: no listener on %s", o.Listen)
	}
	return &Broker{cluster: cl, addr: addrs[0]}, nil
}

// Addr returns the bootstrap address, host:port.
func (b *Broker) Addr() string { return b.addr }

// Cluster returns the kfake cluster, for fault injection in tests.
func (b *Broker) Cluster() *kfake.Cluster { return b.cluster }

// Close stops the broker and, with a data directory, flushes its state.
func (b *Broker) Close() { b.cluster.Close() }

// capCommitMetadata makes cl refuse offset commits whose metadata is longer
// than limit with OFFSET_METADATA_TOO_LARGE, as a real broker does (kfake
// accepts any length). A real broker commits the other partitions of such a
// request; this one refuses them with UNKNOWN_SERVER_ERROR, so that a client
// can never take a partition that was not committed for one that was.
// Commits that fit are left to kfake.
func capCommitMetadata(cl *kfake.Cluster, limit int) {
	cl.ControlKey(int16(kmsg.OffsetCommit), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
		cl.KeepControl()
		req := kreq.(*kmsg.OffsetCommitRequest)
		over := false
		for _, t := range req.Topics {
			for _, p := range t.Partitions {
				if p.Metadata != nil && len(*p.Metadata) > limit {
					over = true
				}
			}
		}
		if !over {
			return nil, nil, false
		}
		resp := req.ResponseKind().(*kmsg.OffsetCommitResponse)
		for _, t := range req.Topics {
			rt := kmsg.NewOffsetCommitResponseTopic()
			rt.Topic, rt.TopicID = t.Topic, t.TopicID
			for _, p := range t.Partitions {
				rp := kmsg.NewOffsetCommitResponseTopicPartition()
				rp.Partition = p.Partition
				rp.ErrorCode = kerr.UnknownServerError.Code
				if p.Metadata != nil && len(*p.Metadata) > limit {
					rp.ErrorCode = kerr.OffsetMetadataTooLarge.Code
				}
				rt.Partitions = append(rt.Partitions, rp)
			}
			resp.Topics = append(resp.Topics, rt)
		}
		return resp, nil, true
	})
}

// slogLogger adapts slog to kfake's logger; kfake's info and debug lines
// are protocol chatter, so only warnings and errors are passed on.
type slogLogger struct{ l *slog.Logger }

func (s slogLogger) Logf(level kfake.LogLevel, msg string, args ...any) {
	switch level {
	case kfake.LogLevelError:
		s.l.Error("embedded broker: " + fmt.Sprintf(msg, args...))
	case kfake.LogLevelWarn:
		s.l.Warn("embedded broker: " + fmt.Sprintf(msg, args...))
	}
}
