package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	toml "github.com/pelletier/go-toml/v2"
)

// minimal is the smallest valid configuration: one route with one request.
// Its [[routes]] header is on line 2 when it starts a file.
const minimal = `
[[routes]]
name = "all"
  [[routes.requests]]
  url = "http://127.0.0.1:8081/x"
`

func parse(t *testing.T, src string) (*Config, error) {
	t.Helper()
	return Parse([]byte(src), "t.toml")
}

func mustParse(t *testing.T, src string) *Config {
	t.Helper()
	c, err := parse(t, src)
	if err != nil {
		t.Fatalf("unexpected error:\n%v\nfor:\n%s", err, src)
	}
	return c
}

// wantError parses src and checks that the error holds every string of
// wants, and that it is an Errors.
func wantError(t *testing.T, src string, wants ...string) Errors {
	t.Helper()
	c, err := parse(t, src)
	if err == nil {
		t.Fatalf("no error for:\n%s", src)
	}
	if c != nil {
		t.Errorf("a configuration was returned with the error")
	}
	var es Errors
	if !errors.As(err, &es) || len(es) == 0 {
		t.Fatalf("error is %T (%v), want a non-empty Errors", err, err)
	}
	for _, w := range wants {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error does not contain %q:\n%v", w, err)
		}
	}
	return es
}

func TestDefaults(t *testing.T) {
	c := mustParse(t, minimal)
	d := Defaults()
	if !reflect.DeepEqual(c.Dispatch, d.Dispatch) || !reflect.DeepEqual(c.HTTP, d.HTTP) || c.DLQ != d.DLQ ||
		c.Admin != d.Admin || c.Tracing != d.Tracing || c.Log != d.Log {
		t.Errorf("defaults not applied:\n got %+v\nwant %+v", c, d)
	}
	// The documented defaults (config.example.toml), written out so that
	// Defaults cannot drift alone.
	k := c.Kafka
	if k.Brokers != "embedded" || !k.Embedded() || k.GroupID != "orderly" || !slices.Equal(k.Topics, []string{"orders"}) ||
		k.EmbeddedListen != "127.0.0.1:9092" || k.EmbeddedPartitions != 8 || k.EmbeddedDataDir != "" ||
		k.Properties == nil || len(k.Properties) != 0 {
		t.Errorf("kafka defaults: %+v", k)
	}
	s := time.Second
	dp, h, r, b := c.Dispatch, c.HTTP, c.HTTP.Retry, c.HTTP.Breaker
	for name, ok := range map[string]bool{
		"dispatch":     dp.MaxInFlight == 2000 && dp.CommitInterval.D() == 5*time.Millisecond && dp.DrainTimeout.D() == 30*s && dp.Unkeyed == "partition" && dp.Unmatched == "skip" && dp.MaxLanes == 10000 && dp.LaneIdle.D() == 10*s && dp.MaxSpan == 1_000_000 && dp.MaxKeyInFlight == 0 && dp.CommitMetadataMaxBytes == 4096,
		"http":         h.Timeout.D() == 10*s && h.MaxConnsPerHost == 256 && h.MaxConnAge.D() == 60*s && h.IdleConnTimeout.D() == 90*s,
		"http.retry":   r.MaxAttempts == 10 && r.InitialBackoff.D() == 100*time.Millisecond && r.MaxBackoff.D() == 30*s && slices.Equal(r.RetryStatuses, []int{408, 425, 429, 500, 502, 503, 504}),
		"http.breaker": b.Enabled && b.FailureRatio == 0.5 && b.MinRequests == 20 && b.ConsecutiveFailures == 10 && b.OpenTimeout.D() == 15*s && b.HalfOpenRequests == 3,
		"dlq":          c.DLQ.Topic == "orderly.dlq",
		"admin":        c.Admin.Listen == "127.0.0.1:9464" && c.Admin.Token == "" && c.Admin.DrainGrace.D() == 0,
		"tracing":      !c.Tracing.Enabled && c.Tracing.Endpoint == "http://127.0.0.1:4318" && c.Tracing.SampleRatio == 1,
		"log":          c.Log.Level == "info" && c.Log.Format == "json",
	} {
		if !ok {
			t.Errorf("%s defaults differ from config.example.toml: %+v", name, c)
		}
	}
	rt := c.Routes[0]
	if rt.Topics != nil || rt.When != "" || rt.Line != 2 {
		t.Errorf("route defaults: %+v", rt)
	}
	if rq := rt.Requests[0]; rq.Method != "POST" || rq.Body != nil || rq.Headers != nil {
		t.Errorf("request defaults: %+v", rq)
	}
	// Defaults returns fresh slices each time.
	d.Kafka.Topics[0] = "changed"
	if Defaults().Kafka.Topics[0] != "orders" {
		t.Error("Defaults shares its slices")
	}
}

// TestExplicitZeroSticks: a key present with its zero value keeps it; only
// absent keys take defaults.
func TestExplicitZeroSticks(t *testing.T) {
	cases := []struct {
		src   string
		check func(c *Config) bool
	}{
		{"[http.retry]\nmax_attempts = 0\n", func(c *Config) bool { return c.HTTP.Retry.MaxAttempts == 0 }},
		{"[http.retry]\nretry_statuses = []\n", func(c *Config) bool { return len(c.HTTP.Retry.RetryStatuses) == 0 }},
		{"[http.breaker]\nenabled = false\n", func(c *Config) bool { return !c.HTTP.Breaker.Enabled }},
		{"[http.breaker]\nconsecutive_failures = 0\n", func(c *Config) bool { return c.HTTP.Breaker.ConsecutiveFailures == 0 }},
		{"[dlq]\ntopic = \"\"\n", func(c *Config) bool { return c.DLQ.Topic == "" }},
		{"[tracing]\nsample_ratio = 0.0\n", func(c *Config) bool { return c.Tracing.SampleRatio == 0 }},
		{"[tracing]\nsample_ratio = 0\n", func(c *Config) bool { return c.Tracing.SampleRatio == 0 }},
		{"[admin]\ndrain_grace = \"0s\"\n", func(c *Config) bool { return c.Admin.DrainGrace.D() == 0 }},
		{"[admin]\nlisten = \"\"\n", func(c *Config) bool { return c.Admin.Listen == "" }},
		{"[http]\nmax_conn_age = \"0s\"\n", func(c *Config) bool { return c.HTTP.MaxConnAge.D() == 0 }},
		{"[http]\nmax_conn_age = 0\n", func(c *Config) bool { return c.HTTP.MaxConnAge.D() == 0 }},
		{"[http]\nmax_conns_per_host = 0\n", func(c *Config) bool { return c.HTTP.MaxConnsPerHost == 0 }},
		{"[dispatch]\ndrain_timeout = \"0s\"\n", func(c *Config) bool { return c.Dispatch.DrainTimeout.D() == 0 }},
		{minimal + "  body = \"\"\n", func(c *Config) bool {
			return c.Routes[0].Requests[0].Body != nil && *c.Routes[0].Requests[0].Body == ""
		}},
	}
	for _, tc := range cases {
		src := tc.src
		if !strings.Contains(src, "[[routes]]") {
			src += minimal
		}
		c := mustParse(t, src)
		if !tc.check(c) {
			t.Errorf("explicit zero replaced by the default for:\n%s", tc.src)
		}
	}
	// Other keys of the same table keep their defaults.
	c := mustParse(t, "[http.breaker]\nenabled = false\n"+minimal)
	if c.HTTP.Breaker.FailureRatio != 0.5 || c.HTTP.Breaker.MinRequests != 20 {
		t.Errorf("sibling defaults lost: %+v", c.HTTP.Breaker)
	}
}

func TestEnvExpansion(t *testing.T) {
	tricky := "s3\"cr\\et\n' ]] = x"
	t.Setenv("ORDERLY_TEST_TOKEN", tricky)
	t.Setenv("ORDERLY_TEST_HOST", "10.0.0.1:9092")
	t.Setenv("ORDERLY_TEST_INTERVAL", "250ms")
	t.Setenv("ORDERLY_TEST_EMPTY", "")
	os.Unsetenv("ORDERLY_TEST_UNSET")
	c := mustParse(t, `
[kafka]
brokers = "${ORDERLY_TEST_HOST}"
topics = ["${ORDERLY_TEST_TOPIC:-orders}"]
[kafka.properties]
"sasl.password" = "${ORDERLY_TEST_TOKEN}"
"session.timeout.ms" = 6000
[dispatch]
commit_interval = "${ORDERLY_TEST_INTERVAL}"
[admin]
token = "${ORDERLY_TEST_TOKEN}"
[log]
level = "${ORDERLY_TEST_EMPTY:-debug}"
[[routes]]
name = "r${ORDERLY_TEST_UNSET}"
  [[routes.requests]]
  url = "http://127.0.0.1:8081/$${literal}/$x/${ORDERLY_TEST_UNSET}"
  body = '{"t": "${ORDERLY_TEST_HOST}"}'
  [routes.requests.headers]
  Authorization = "Bearer ${ORDERLY_TEST_TOKEN}"
`)
	checks := map[string][2]string{
		"admin.token":      {c.Admin.Token, tricky},
		"kafka.brokers":    {c.Kafka.Brokers, "10.0.0.1:9092"},
		"kafka.topics[0]":  {c.Kafka.Topics[0], "orders"},
		"sasl.password":    {c.Kafka.Properties["sasl.password"], tricky},
		"log.level":        {c.Log.Level, "debug"},
		"routes[0].name":   {c.Routes[0].Name, "r"},
		"url":              {c.Routes[0].Requests[0].URL, "http://127.0.0.1:8081/${literal}/$x/"},
		"body":             {*c.Routes[0].Requests[0].Body, `{"t": "10.0.0.1:9092"}`},
		"header":           {c.Routes[0].Requests[0].Headers["Authorization"], "Bearer " + tricky},
		"commit_interval":  {c.Dispatch.CommitInterval.D().String(), "250ms"},
		"unset variables":  {strings.Join(c.UnsetEnv, ","), "ORDERLY_TEST_UNSET"},
		"numbers untouche": {c.Kafka.Properties["session.timeout.ms"], "6000"},
	}
	for name, got := range checks {
		if got[0] != got[1] {
			t.Errorf("%s = %q, want %q", name, got[0], got[1])
		}
	}

	// Malformed references are errors naming the key and its line.
	wantError(t, "[admin]\ntoken = \"${ORDERLY TOKEN}\"\n"+minimal,
		`t.toml:2:9: admin.token: malformed environment reference "${ORDERLY TOKEN}"`)
	wantError(t, "[admin]\ntoken = \"${UNCLOSED\"\n"+minimal, `t.toml:2:9: admin.token: malformed`)
	wantError(t, "[kafka]\ntopics = [\"a\", \"${1X}\"]\n"+minimal, `t.toml:2:16: kafka.topics[1]: malformed`)
	wantError(t, "[dispatch]\ncommit_interval = \"${}\"\n"+minimal, `t.toml:2:19: dispatch.commit_interval: malformed`)
	// An unset variable in a duration is an invalid (empty) duration.
	wantError(t, "[dispatch]\ncommit_interval = \"${ORDERLY_TEST_UNSET}\"\n"+minimal,
		`t.toml:2:19: dispatch.commit_interval: invalid duration "" (expanded from "${ORDERLY_TEST_UNSET}")`)
}

func TestUnknownKeys(t *testing.T) {
	es := wantError(t, "[dispatch]\nmax_in_flight = 5\nmax_in_flihgt = 3\n[http]\nretry.max_attempt = 1\n"+
		"[dispatc]\nx = 1\n[log]\nlevel = \"loud\"\n"+minimal+"  retries = 3\n",
		"t.toml:3:1: dispatch.max_in_flihgt: unknown key (did you mean max_in_flight?)",
		"t.toml:5:1: http.retry.max_attempt: unknown key (did you mean max_attempts?)",
		"t.toml:6:1: dispatc: unknown table (did you mean dispatch?)",
		`t.toml:15:3: routes[0] ("all").requests[0].retries: unknown key`,
		// Validation problems are reported in the same run.
		`t.toml:9:1: log.level: must be "debug", "info", "warn" or "error", not "loud"`,
	)
	if len(es) != 5 {
		t.Errorf("%d errors, want 5:\n%v", len(es), es)
	}
	wantError(t, minimal+"[[routes]]\nname = \"b\"\nwhen = \"true\"\nwhne = \"x\"\n",
		`t.toml:9:1: routes[1] ("b").whne: unknown key (did you mean when?)`)
	wantError(t, "[kafka]\nbrokers = \"x:1\"\n[kafka.embedded]\nlisten = 1\n"+minimal, "t.toml:3:1: kafka.embedded: unknown table")
}

func TestSyntaxAndTypeErrors(t *testing.T) {
	cases := []struct{ src, want string }{
		{"[dispatch\nx = 1\n", "t.toml:1:10: "},
		{"[dispatch]\nmax_in_flight = \n", "t.toml:2:17: "},
		{"a = \"unterminated\n", "t.toml:1:"},
		{"[dispatch]\nmax_in_flight = 1\nmax_in_flight = 2\n", "t.toml:3:1: dispatch.max_in_flight: key max_in_flight is already defined"},
		{"[dispatch]\nmax_in_flight = \"many\"\n", "t.toml:2:17: dispatch.max_in_flight: must be an integer, not a TOML string"},
		{"[kafka]\ntopics = [\"a\", 2]\n", "t.toml:2:16: kafka.topics[1]: must be a string, not a TOML integer"},
		{"[kafka]\ntopics = \"orders\"\n", "t.toml:2:10: kafka.topics: must be an array of strings, not a TOML string"},
		{"[http.breaker]\nenabled = \"yes\"\n", "t.toml:2:11: http.breaker.enabled: must be true or false"},
		{"[http.breaker]\nfailure_ratio = \"half\"\n", "t.toml:2:17: http.breaker.failure_ratio: must be a number"},
		{minimal + "  method = 1\n", `t.toml:6:12: routes[0] ("all").requests[0].method: must be a string, not a TOML integer`},
		{minimal + "  [routes.requests.headers]\n  X-N = 1\n", `t.toml:7:9: routes[0] ("all").requests[0].headers.X-N: must be a string`},
		{"[dispatch]\ncommit_interval = \"soon\"\n", `t.toml:2:19: dispatch.commit_interval: invalid duration "soon"`},
		{"[dispatch]\ncommit_interval = 5\n", `t.toml:2:19: dispatch.commit_interval: must be a quoted Go duration such as "1s" or "250ms", not the number 5`},
		{"[dispatch]\ncommit_interval = true\n", `t.toml:2:19: dispatch.commit_interval: must be a quoted Go duration such as "1s" or "250ms", not a boolean`},
		{"[dispatch]\ncommit_interval = {s = 1}\n", `t.toml:2:19: dispatch.commit_interval: must be a quoted Go duration such as "1s" or "250ms", not a table`},
		{"[dispatch.commit_interval]\n", `t.toml:1:1: dispatch.commit_interval: must be a quoted Go duration`},
		{"[dispatch]\ncommit_interval.x = \"1s\"\n", `t.toml:2:1: dispatch.commit_interval: must be a quoted Go duration`},
		{"[dispatch]\nmax_in_flight = 99999999999999999999\n", "t.toml:2:17: dispatch.max_in_flight"},
	}
	for _, tc := range cases {
		src := tc.src
		if !strings.Contains(src, "[[routes]]") {
			src += minimal
		}
		es := wantError(t, src, tc.want)
		if len(es) != 1 {
			t.Errorf("%d errors for\n%s\nwant 1:\n%v", len(es), tc.src, es)
		}
	}
}

func TestProperties(t *testing.T) {
	c := mustParse(t, `
[kafka.properties]
"session.timeout.ms" = 6000
"enable.partition.eof" = false
"some.ratio" = 0.25
"big.ratio" = 1e21
"security.protocol" = "SASL_SSL"
`+minimal)
	want := map[string]string{"session.timeout.ms": "6000", "enable.partition.eof": "false", "some.ratio": "0.25",
		"big.ratio": "1000000000000000000000", "security.protocol": "SASL_SSL"}
	if !reflect.DeepEqual(c.Kafka.Properties, want) {
		t.Fatalf("properties %v, want %v", c.Kafka.Properties, want)
	}

	cases := []struct{ src, want string }{
		{`"group.id" = "x"`, "t.toml:3:1: kafka.properties.group.id: Orderly sets this librdkafka property itself: set kafka.group_id instead"},
		{`"bootstrap.servers" = "x:1"`, "kafka.properties.bootstrap.servers: Orderly sets this librdkafka property itself: set kafka.brokers instead"},
		{`"enable.auto.commit" = true`, "kafka.properties.enable.auto.commit: Orderly sets this librdkafka property itself: Orderly manages it"},
		{`"enable.auto.offset.store" = false`, "kafka.properties.enable.auto.offset.store: Orderly sets this librdkafka property itself: Orderly manages it"},
		{`nested = [1, 2]`, "t.toml:3:1: kafka.properties.nested: is an array"},
		{`security.protocol = "SSL"`, `t.toml:3:1: kafka.properties.security: is a table: librdkafka properties are flat; quote a dotted name`},
		{"[kafka.properties.sasl]\nmechanism = \"PLAIN\"", `kafka.properties.sasl: is a table`},
		{`when = 1979-05-27`, "kafka.properties.when: must be a string, number or boolean, not a date or time"},
		{`"x.ratio" = nan`, "kafka.properties.x.ratio: must be a finite number"},
		{`"x.ratio" = inf`, "kafka.properties.x.ratio: must be a finite number"},
	}
	for _, tc := range cases {
		wantError(t, "\n[kafka.properties]\n"+tc.src+"\n"+minimal, tc.want)
	}
}

// TestValidationNamesKeyAndLine: every check of Validate, each reported
// with its key and, as the offending key is on line 2, that line.
func TestValidationNamesKeyAndLine(t *testing.T) {
	cases := []struct{ src, want string }{
		{"[kafka]\nbrokers = \"\"\n", "t.toml:2:1: kafka.brokers: must be"},
		{"[kafka]\nbrokers = \"nohostport\"\n", `t.toml:2:1: kafka.brokers: entry 1 "nohostport": want host:port`},
		{"[kafka]\nbrokers = \"a:9092,,b:9092\"\n", `t.toml:2:1: kafka.brokers: entry 2 "": want host:port`},
		{"[kafka]\nbrokers = \"a:9092,b:0\"\n", `t.toml:2:1: kafka.brokers: entry 2 "b:0": port "0" is not a number from 1 to 65535`},
		{"[kafka]\nbrokers = \":9092\"\n", `kafka.brokers: entry 1 ":9092": want host:port, the host is missing`},
		{"[kafka]\ngroup_id = \" \"\n", "t.toml:2:1: kafka.group_id: must not be empty"},
		{"[kafka]\ntopics = []\n", "t.toml:2:1: kafka.topics: must name at least one topic"},
		{"[kafka]\ntopics = [\"a\", \"a\"]\n", `t.toml:2:16: kafka.topics[1]: "a" is listed twice (also kafka.topics[0])`},
		{"[kafka]\ntopics = [\"a\", \"\"]\n", "t.toml:2:16: kafka.topics[1]: a topic name must not be empty"},
		{"[kafka]\ntopics = [\"a b\"]\n", `t.toml:2:11: kafka.topics[0]: "a b" is not a valid topic name`},
		{"[kafka]\nembedded_listen = \"x\"\n", `t.toml:2:1: kafka.embedded_listen: "x": want host:port`},
		{"[kafka]\nembedded_partitions = 0\n", "t.toml:2:1: kafka.embedded_partitions: must be from 1 to 10000, not 0"},
		{"[kafka]\nembedded_partitions = 10001\n", "t.toml:2:1: kafka.embedded_partitions: must be from 1 to 10000"},
		{"[dispatch]\nmax_in_flight = 0\n", "t.toml:2:1: dispatch.max_in_flight: must be at least 1, not 0"},
		{"[dispatch]\ncommit_interval = \"0s\"\n", "t.toml:2:1: dispatch.commit_interval: must be positive, not 0s"},
		{"[dispatch]\ndrain_timeout = \"-1s\"\n", "t.toml:2:1: dispatch.drain_timeout: must not be negative, not -1s"},
		{"[dispatch]\nunkeyed = \"x\"\n", `t.toml:2:1: dispatch.unkeyed: must be "partition" or "parallel", not "x"`},
		{"[dispatch]\nunmatched = \"x\"\n", `t.toml:2:1: dispatch.unmatched: must be "skip" or "dlq", not "x"`},
		{"[dispatch]\nunmatched = \"dlq\"\n[dlq]\ntopic = \"\"\n", `t.toml:2:1: dispatch.unmatched: "dlq" needs a dead-letter topic, but dlq.topic is ""`},
		{"[dispatch]\nmax_lanes = 0\n", "t.toml:2:1: dispatch.max_lanes: must be at least 1, not 0"},
		{"[dispatch]\nlane_idle = \"0s\"\n", "t.toml:2:1: dispatch.lane_idle: must be positive"},
		{"[dlq]\ntopic = \"\"\nquarantine_keys = true\n", `t.toml:3:1: dlq.quarantine_keys: needs a dead-letter topic, but dlq.topic is ""`},
		{"[dlq]\nquarantine_topic = \"orderly.dlq\"\n", `t.toml:2:1: dlq.quarantine_topic: "orderly.dlq" must differ from dlq.topic and kafka.topics`},
		{"[dispatch]\nmax_span = 10\n", "t.toml:2:1: dispatch.max_span: must be at least dispatch.max_in_flight (2000), not 10"},
		{"[dispatch]\ncommit_metadata_max_bytes = -1\n", "t.toml:2:1: dispatch.commit_metadata_max_bytes: must not be negative (0 = record no progress), not -1"},
		{"[dispatch]\ndrain_timeout = \"296s\"\n", "t.toml:2:1: dispatch.drain_timeout: 4m56s does not fit in max.poll.interval.ms (5m0s) with 5s to spare"},
		{"[dispatch]\ndrain_timeout = \"30s\"\n[kafka.properties]\n\"max.poll.interval.ms\" = 20000\n", "t.toml:2:1: dispatch.drain_timeout: 30s does not fit in max.poll.interval.ms (20s) with 5s to spare"},
		{"[http]\ntimeout = \"0s\"\n", "t.toml:2:1: http.timeout: must be positive"},
		{"[http]\nmax_conns_per_host = -1\n", "t.toml:2:1: http.max_conns_per_host: must not be negative (0 = unlimited), not -1"},
		{"[http]\nmax_conn_age = \"-1s\"\n", "t.toml:2:1: http.max_conn_age: must not be negative"},
		{"[http]\nidle_conn_timeout = \"0s\"\n", "t.toml:2:1: http.idle_conn_timeout: must be positive, not 0s"},
		{"[http.retry]\nmax_attempts = -1\n", "t.toml:2:1: http.retry.max_attempts: must not be negative (0 = until it succeeds), not -1"},
		{"[http.retry]\ninitial_backoff = \"0s\"\n", "t.toml:2:1: http.retry.initial_backoff: must be positive"},
		{"[http.retry]\ninitial_backoff = \"1m\"\n", "t.toml:2:1: http.retry.max_backoff: 30s is less than http.retry.initial_backoff (1m0s)"},
		{"[http.retry]\nmax_backoff = \"10ms\"\n", "t.toml:2:1: http.retry.max_backoff: 10ms is less than http.retry.initial_backoff (100ms)"},
		{"[http.retry]\nmax_retry_after = \"0s\"\n", "t.toml:2:1: http.retry.max_retry_after: must be positive, not 0s"},
		{"[http.retry]\nretry_statuses = [500, 1000]\n", "t.toml:2:24: http.retry.retry_statuses[1]: 1000 is not an HTTP status (100 to 599)"},
		{"[http.retry]\nretry_statuses = [204]\n", "t.toml:2:19: http.retry.retry_statuses[0]: 204 is a success"},
		{"[http.breaker]\nfailure_ratio = 1.5\n", "t.toml:2:1: http.breaker.failure_ratio: must be more than 0 and at most 1, not 1.5"},
		{"[http.breaker]\nfailure_ratio = 0.0\n", "t.toml:2:1: http.breaker.failure_ratio: must be more than 0 and at most 1, not 0"},
		{"[http.breaker]\nfailure_ratio = nan\n", "t.toml:2:1: http.breaker.failure_ratio: must be more than 0 and at most 1, not NaN"},
		{"[http.breaker]\nmin_requests = 0\n", "t.toml:2:1: http.breaker.min_requests: must be at least 1, not 0"},
		{"[http.breaker]\nconsecutive_failures = -1\n", "t.toml:2:1: http.breaker.consecutive_failures: must not be negative (0 = off)"},
		{"[http.breaker]\nopen_timeout = \"0s\"\n", "t.toml:2:1: http.breaker.open_timeout: must be positive"},
		{"[http.breaker]\nhalf_open_requests = 0\n", "t.toml:2:1: http.breaker.half_open_requests: must be at least 1, not 0"},
		{"[dlq]\ntopic = \"orders\"\n", `t.toml:2:1: dlq.topic: "orders" is also consumed (kafka.topics[0]): dead letters would be dispatched again`},
		{"[dlq]\ntopic = \"dead letters\"\n", `t.toml:2:1: dlq.topic: "dead letters" is not a valid topic name`},
		{"[admin]\nlisten = \"nope\"\n", `t.toml:2:1: admin.listen: "nope": want host:port (or "" to disable the admin server)`},
		{"[admin]\nlisten = \"0.0.0.0:9464\"\n", `t.toml:2:1: admin.token: must be set: /dlq/* would be open to anyone on 0.0.0.0:9464`},
		{"[admin]\ndrain_grace = \"-1s\"\n", "t.toml:2:1: admin.drain_grace: must not be negative"},
		{"[tracing]\nenabled = true\nendpoint = \"ftp://x\"\n", `t.toml:3:1: tracing.endpoint: "ftp://x" is not an http:// or https:// URL`},
		{"[tracing]\nsample_ratio = 2.0\n", "t.toml:2:1: tracing.sample_ratio: must be from 0 to 1, not 2"},
		{"[tracing]\nsample_ratio = -0.5\n", "t.toml:2:1: tracing.sample_ratio: must be from 0 to 1, not -0.5"},
		{"[log]\nlevel = \"loud\"\n", `t.toml:2:1: log.level: must be "debug", "info", "warn" or "error", not "loud"`},
		{"[log]\nformat = \"xml\"\n", `t.toml:2:1: log.format: must be "json" or "text", not "xml"`},
	}
	for _, tc := range cases {
		es := wantError(t, tc.src+minimal, tc.want)
		if len(es) != 1 {
			t.Errorf("%d errors for\n%s\nwant 1:\n%v", len(es), tc.src, es)
		}
	}
	// Brokers that are not "embedded" turn the embedded settings off.
	mustParse(t, "[kafka]\nbrokers = \"a:9092, [::1]:9093\"\nembedded_listen = \"x\"\n"+minimal)
	// A loopback admin listener needs no token, nor does one without a DLQ.
	mustParse(t, "[admin]\nlisten = \"localhost:0\"\n"+minimal)
	mustParse(t, "[admin]\nlisten = \":9464\"\n[dlq]\ntopic = \"\"\n"+minimal)
	mustParse(t, "[admin]\nlisten = \":9464\"\ntoken = \"t\"\n"+minimal)
}

func TestRouteErrors(t *testing.T) {
	es := wantError(t, `
[[routes]]
name = "a"

[[routes]]
name = "a"
topics = ["users"]
  [[routes.requests]]
  method = "NOT A METHOD"
  url = ""
  [routes.requests.headers]
  "Bad Header" = "x"
  [[routes.requests]]
  url = "/relative"
  [routes.requests.headers]
  content-type = "a"
  Content-Type = "b"

[[routes]]
  [[routes.requests]]
  url = "http://{{ .Value.host }}/x"
  method = "{{ .Value.method }}"
`,
		`t.toml:2:1: routes[0] ("a").requests: at least one [[routes.requests]] is needed`,
		`t.toml:6:1: routes[1] ("a").name: "a" is also the name of routes[0]`,
		`t.toml:7:11: routes[1] ("a").topics[0]: "users" is not consumed (kafka.topics = ["orders"])`,
		`t.toml:9:3: routes[1] ("a").requests[0].method: "NOT A METHOD" is not an HTTP method`,
		`t.toml:10:3: routes[1] ("a").requests[0].url: must not be empty`,
		`t.toml:12:3: routes[1] ("a").requests[0].headers."Bad Header": is not a valid header name`,
		`t.toml:14:3: routes[1] ("a").requests[1].url: "/relative" is not an absolute http:// or https:// URL`,
		`t.toml:16:3: routes[1] ("a").requests[1].headers.content-type: is the same header as "Content-Type"`,
		`t.toml:19:1: routes[2].name: every route needs a name`,
	)
	if len(es) != 9 {
		t.Errorf("%d errors, want 9:\n%v", len(es), es)
	}
	wantError(t, "[kafka]\n", "t.toml: routes: at least one [[routes]] table is needed")
}

func TestRouteLinesAndMethods(t *testing.T) {
	c := mustParse(t, `# a comment
[[routes]]
name = "a"
when = '''
[[routes]]
'''
  [[ routes.requests ]]
  url = "http://h/1"
  method = "put"

  [[routes.requests]]
  url = "http://h/2"

  [[ routes ]]   # spaces and a comment
name = "b"
requests = [{url = "http://h/3", method = "{{ .Value.m }}"}]
`)
	if len(c.Routes) != 2 || c.Routes[0].Line != 2 || c.Routes[1].Line != 14 {
		t.Fatalf("route lines: %+v", c.Routes)
	}
	methods := []string{c.Routes[0].Requests[0].Method, c.Routes[0].Requests[1].Method, c.Routes[1].Requests[0].Method}
	if !slices.Equal(methods, []string{"PUT", "POST", "{{ .Value.m }}"}) {
		t.Errorf("methods %q", methods)
	}
	wantError(t, `
[[routes]]
name = "a"
requests = [{url = "http://h/3"}, {url = ""}]
`, `t.toml:4:36: routes[0] ("a").requests[1].url: must not be empty`)
}

// TestValidateBuiltConfig: Validate on a Config built in code, without a
// file: keys without positions.
func TestValidateBuiltConfig(t *testing.T) {
	c := Defaults()
	c.Routes = []Route{{Name: "r", Requests: []Request{{Method: "POST", URL: "http://h/x"}}}}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	c.Dispatch.MaxInFlight = 0
	c.Kafka.Properties = map[string]string{"group.id": "g"}
	c.Routes[0].Requests[0].URL = ""
	err := c.Validate()
	want := "dispatch.max_in_flight: must be at least 1, not 0\n" +
		"kafka.properties.group.id: Orderly sets this librdkafka property itself: set kafka.group_id instead\n" +
		`routes[0] ("r").requests[0].url: must not be empty`
	var es Errors
	if !errors.As(err, &es) || len(es) != 3 {
		t.Fatalf("Validate: %v", err)
	}
	for _, line := range strings.Split(want, "\n") {
		if !strings.Contains(err.Error(), line) {
			t.Errorf("missing %q in:\n%v", line, err)
		}
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Key == "" {
		t.Errorf("errors.As *FieldError: %v", fe)
	}

	// Validate on a parsed Config keeps the file's positions.
	p := mustParse(t, "[dispatch]\nmax_in_flight = 5\n"+minimal)
	p.Dispatch.MaxInFlight = -1
	if err := p.Validate(); err == nil || !strings.Contains(err.Error(), "t.toml:2:1: dispatch.max_in_flight") {
		t.Errorf("Validate after Parse: %v", err)
	}
}

func TestFieldErrorFormat(t *testing.T) {
	for _, tc := range []struct {
		e    FieldError
		want string
	}{
		{FieldError{File: "o.toml", Line: 12, Col: 3, Key: "a.b", Msg: "bad"}, "o.toml:12:3: a.b: bad"},
		{FieldError{File: "o.toml", Line: 12, Key: "a.b", Msg: "bad"}, "o.toml:12: a.b: bad"},
		{FieldError{File: "o.toml", Col: 3, Key: "a.b", Msg: "bad"}, "o.toml: a.b: bad"},
		{FieldError{File: "o.toml", Line: 1, Col: 2, Msg: "bad"}, "o.toml:1:2: bad"},
		{FieldError{Key: "a.b", Msg: "bad"}, "a.b: bad"},
	} {
		if got := tc.e.Error(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.e, got, tc.want)
		}
	}
	es := Errors{{File: "f", Msg: "one"}, {File: "f", Msg: "two"}}
	if es.Error() != "f: one\nf: two" {
		t.Errorf("Errors: %q", es.Error())
	}
}

func TestLoad(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "missing.toml"))
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "missing.toml: unable to read") {
		t.Errorf("missing file: %v", err)
	}
	path := filepath.Join(t.TempDir(), "orderly.toml")
	if err := os.WriteFile(path, []byte("[dispatch]\nmax_in_flight = 0\n"+minimal), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil || !strings.Contains(err.Error(), path+":2:1: dispatch.max_in_flight") {
		t.Errorf("Load: %v", err)
	}
}

func TestRedacted(t *testing.T) {
	c := mustParse(t, `
[kafka]
brokers = "k:9092"
[kafka.properties]
"sasl.username" = "user"
"sasl.password" = "hunter2"
[admin]
token = "s3cret-token"
[tracing]
endpoint = "https://me:tracepass@otel:4318"
[[routes]]
name = "r"
  [[routes.requests]]
  url = "http://u:urlpass@h/{{ .Key }}"
  [routes.requests.headers]
  Authorization = "Bearer abc123"
  X-Api-Key = "key123"
  Content-Type = "application/json"
`)
	out := c.Redacted()
	for _, secret := range []string{"hunter2", "s3cret-token", "tracepass", "urlpass", "abc123", "key123"} {
		if strings.Contains(out, secret) {
			t.Errorf("Redacted shows %q:\n%s", secret, out)
		}
	}
	for _, kept := range []string{"sasl.username", "user", "application/json", "{{ .Key }}", "me:REDACTED@otel", "k:9092"} {
		if !strings.Contains(out, kept) {
			t.Errorf("Redacted lacks %q:\n%s", kept, out)
		}
	}
	if c.Admin.Token != "s3cret-token" || c.Routes[0].Requests[0].Headers["Authorization"] != "Bearer abc123" {
		t.Error("Redacted modified the configuration")
	}
	// The output is itself a configuration that parses.
	if _, err := Parse([]byte(out), "redacted.toml"); err != nil {
		t.Errorf("Redacted output does not parse: %v\n%s", err, out)
	}
}

const examplePath = "../config.example.toml"

// TestExample: config.example.toml runs as it is (with or without
// ORDERLY_ADMIN_TOKEN) and sets every key of the schema.
func TestExample(t *testing.T) {
	for _, token := range []string{"", "x"} {
		t.Setenv("ORDERLY_ADMIN_TOKEN", token)
		c, err := Load(examplePath)
		if err != nil {
			t.Fatalf("the example does not load:\n%v", err)
		}
		if !c.Kafka.Embedded() || !slices.Equal(c.Kafka.Topics, []string{"orders"}) || len(c.Routes) < 2 || c.Admin.Token != token {
			t.Fatalf("the example is not the embedded one: %+v", c)
		}
	}
	os.Unsetenv("ORDERLY_ADMIN_TOKEN")
	if c, err := Load(examplePath); err != nil || !slices.Equal(c.UnsetEnv, []string{"ORDERLY_ADMIN_TOKEN"}) {
		t.Fatalf("example without ORDERLY_ADMIN_TOKEN: %v, %v", c, err)
	}

	raw, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := toml.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	missing := schemaKeysMissing(reflect.TypeOf(Config{}), []any{doc}, "")
	for _, k := range missing {
		if commentedInExample[k] {
			continue // needs files or credentials: TestExampleTargets checks its comment
		}
		t.Errorf("the example does not set %s", k)
	}
	// A commented [kafka.properties] example for a secured cluster.
	for _, s := range []string{`#   "security.protocol" = "SASL_SSL"`, `#   "sasl.password" = "${KAFKA_PASSWORD}"`} {
		if !strings.Contains(string(raw), s) {
			t.Errorf("the example lacks %q", s)
		}
	}
}

// schemaKeysMissing returns the keys of struct type t (by toml tag,
// recursively) that none of the tables in docs sets. A key of an array of
// tables counts when any element sets it.
func schemaKeysMissing(t reflect.Type, docs []any, prefix string) []string {
	var missing []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("toml"), ",")[0]
		if tag == "" || tag == "-" || !f.IsExported() {
			continue
		}
		var vals []any
		for _, d := range docs {
			if m, ok := d.(map[string]any); ok {
				if v, ok := m[tag]; ok {
					vals = append(vals, v)
				}
			}
		}
		if len(vals) == 0 {
			missing = append(missing, prefix+tag)
			continue
		}
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		switch {
		case ft.Kind() == reflect.Struct && ft != durationType:
			missing = append(missing, schemaKeysMissing(ft, vals, prefix+tag+".")...)
		case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
			var elems []any
			for _, v := range vals {
				if a, ok := v.([]any); ok {
					elems = append(elems, a...)
				}
			}
			missing = append(missing, schemaKeysMissing(ft.Elem(), elems, prefix+tag+".")...)
		}
	}
	return missing
}

func TestKeyPathDisplay(t *testing.T) {
	p := key("routes").at(1).key("requests").at(0).key("headers", "Bad Header")
	names := func(i int) string { return map[int]string{1: "o-c"}[i] }
	if got := p.display(names); got != `routes[1] ("o-c").requests[0].headers."Bad Header"` {
		t.Errorf("display: %s", got)
	}
	if got := key("kafka", "properties", "group.id").String(); got != "kafka.properties.group.id" {
		t.Errorf("display: %s", got)
	}
	if key("a.b").id() == key("a", "b").id() || key("[0]").id() == (keyPath{}).at(0).id() {
		t.Error("ids are ambiguous")
	}
}

func TestExpand(t *testing.T) {
	t.Setenv("ORDERLY_X", "x")
	os.Unsetenv("ORDERLY_NOPE")
	for in, want := range map[string]string{
		"plain":                      "plain",
		"$HOME and $":                "$HOME and $",
		"${ORDERLY_X}":               "x",
		"a${ORDERLY_X}b${ORDERLY_X}": "axbx",
		"${ORDERLY_NOPE}":            "",
		"${ORDERLY_NOPE:-d}":         "d",
		"${ORDERLY_X:-d}":            "x",
		"${ORDERLY_NOPE:-}":          "",
		"$${ORDERLY_X}":              "${ORDERLY_X}",
		"$$${ORDERLY_X}":             "$${ORDERLY_X}",
		"{{ $v := 1 }}":              "{{ $v := 1 }}",
	} {
		got, _, err := expand(in)
		if err != nil || got != want {
			t.Errorf("expand(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"${", "${}", "${1A}", "${A-B}", "${A B}", "x ${A"} {
		if _, _, err := expand(bad); err == nil {
			t.Errorf("expand(%q): no error", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	if b, err := os.ReadFile(examplePath); err == nil {
		f.Add(b)
	}
	for _, seed := range []string{
		minimal,
		"[dispatch\n",
		"[kafka.properties]\nx = {a = 1}\n",
		"[[routes]]\n[[routes.requests]]\n",
		"[dispatch]\ncommit_interval = 5\n",
		"[dispatch.commit_interval]\nx = 1\n",
		"[admin]\ntoken = \"${X\"\n",
		"routes = [{requests = [{url = \"${A:-b}\"}]}]\n",
		"[[routes]]\n[routes.requests]\n[[routes.requests.headers]]\n",
		"a.b.c = [[1], [{x = 2}]]\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "f.toml")
		if err != nil {
			var es Errors
			if !errors.As(err, &es) || len(es) == 0 {
				t.Fatalf("error is not a non-empty Errors: %T %v", err, err)
			}
			for _, e := range es {
				if e == nil || strings.TrimSpace(e.Msg) == "" || e.Error() == "" {
					t.Fatalf("empty error in %q", err.Error())
				}
			}
			if c != nil {
				t.Fatal("configuration returned with an error")
			}
			return
		}
		if c.Dispatch.MaxInFlight < 1 || len(c.Routes) == 0 || c.Kafka.Properties == nil {
			t.Fatalf("invalid configuration accepted: %+v", c)
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse accepted what Validate rejects: %v", err)
		}
		_ = c.Redacted()
	})
}

func TestUnknownTableInArray(t *testing.T) {
	wantError(t, minimal+"[routes.bogus]\nx = 1\n", `t.toml:6:1: routes[0] ("all").bogus: unknown table`)
	wantError(t, minimal+"  [routes.requests.header]\n  X = \"1\"\n",
		`t.toml:6:3: routes[0] ("all").requests[0].header: unknown table (did you mean headers?)`)
}

// TestEveryErrorAtOnce: values of the wrong type (an invalid duration, a
// duration given as a number, a string for an integer) are each reported
// and left out, and decoding goes on: the unknown keys, the validation
// problems and the checks of the rest are reported in the same run, each
// once, with its line.
func TestEveryErrorAtOnce(t *testing.T) {
	src := `[dispatch]
commit_interval = "10x"
drain_timeout = 5
max_in_flight = "many"
max_lanes = 0
bogus = 1
[http.retry]
initial_backoff = "5 ms"
max_backoff = "10ms"
[log]
level = "loud"
[[routes]]
name = "a"
when = 'value.id'
  [[routes.requests]]
  url = ""
`
	var checked *Config
	check := func(c *Config) error {
		checked = c
		return errors.Join(
			c.ErrorAt("routes[0].when", errors.New("not a boolean")),
			// Validate reports the empty URL already: not twice.
			c.ErrorAt("routes[0].requests[0].url", errors.New("a request needs a url")),
		)
	}
	_, err := Parse([]byte(src), "t.toml", check)
	want := []string{
		`t.toml:2:19: dispatch.commit_interval: invalid duration "10x"`,
		`t.toml:3:17: dispatch.drain_timeout: must be a quoted Go duration such as "1s" or "250ms", not the number 5`,
		`t.toml:4:17: dispatch.max_in_flight: must be an integer, not a TOML string`,
		`t.toml:6:1: dispatch.bogus: unknown key`,
		`t.toml:8:19: http.retry.initial_backoff: invalid duration "5 ms"`,
		`t.toml:5:1: dispatch.max_lanes: must be at least 1, not 0`,
		`t.toml:11:1: log.level: must be "debug", "info", "warn" or "error", not "loud"`,
		`t.toml:16:3: routes[0] ("a").requests[0].url: must not be empty`,
		`t.toml:14:1: routes[0] ("a").when: not a boolean`,
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("Parse: %v", err)
	}
	if checked == nil {
		t.Fatal("the check did not run")
	}
	for i, w := range want {
		if i >= len(es) || !strings.HasPrefix(es[i].Error(), w) {
			t.Errorf("error %d: want %q", i, w)
		}
	}
	// Left-out values keep their defaults and are not reported again
	// (max_backoff is not compared with a default initial_backoff).
	if len(es) != len(want) {
		t.Errorf("%d errors, want %d:\n%v", len(es), len(want), err)
	}
	if checked.Dispatch.CommitInterval.D() != 5*time.Millisecond || checked.Dispatch.MaxInFlight != 2000 {
		t.Errorf("left-out values: %+v", checked.Dispatch)
	}

	// A syntax error still stops decoding, and comes with what was found
	// before it.
	wantError(t, "[dispatch]\ncommit_interval = \"10x\"\nmax_in_flight = \n"+minimal,
		`t.toml:2:19: dispatch.commit_interval: invalid duration "10x"`, "t.toml:3:17: ")
}

// TestCheckErrors: a Check's errors are placed at their key, ones that are
// not FieldErrors are reported against the file, and a Check runs only
// when the values could be decoded.
func TestCheckErrors(t *testing.T) {
	src := minimal + `  [routes.requests.headers]
  X-Id = "{{ .Key"
`
	_, err := Parse([]byte(src), "t.toml", func(c *Config) error {
		return Errors{
			c.ErrorAt(`routes[0].requests[0].headers["X-Id"]`, errors.New("unclosed action")),
			c.ErrorAt(`routes[0].requests[0].body`, errors.New("absent key: placed at its table")),
			c.ErrorAt(`not a [path`, errors.New("unplaced")),
		}
	}, func(*Config) error { return errors.New("plain") })
	for _, w := range []string{
		`t.toml:7:3: routes[0] ("all").requests[0].headers.X-Id: unclosed action`,
		`t.toml:4:3: routes[0] ("all").requests[0].body: absent key: placed at its table`,
		`t.toml: not a [path: unplaced`,
		`t.toml: plain`,
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in:\n%v", w, err)
		}
	}
	ran := false
	_, err = Parse([]byte("[dispatch\n"+minimal), "t.toml", func(*Config) error { ran = true; return nil })
	if err == nil || ran {
		t.Errorf("after a syntax error: %v, check ran: %v", err, ran)
	}
	if _, err := Parse([]byte(minimal), "t.toml", func(*Config) error { return nil }); err != nil {
		t.Errorf("a check without problems: %v", err)
	}
}

func TestParseKeyPath(t *testing.T) {
	for in, want := range map[string]string{
		"dispatch.max_in_flight":                  `."dispatch"."max_in_flight"`,
		"routes[0].requests[1].url":               `."routes"[0]."requests"[1]."url"`,
		`routes[0].requests[0].headers["X-Id"]`:   `."routes"[0]."requests"[0]."headers"."X-Id"`,
		`routes[0].requests[0].headers["a]b"]`:    `."routes"[0]."requests"[0]."headers"."a]b"`,
		`routes[0].requests[0].headers."Bad H"`:   `."routes"[0]."requests"[0]."headers"."Bad H"`,
		`kafka.properties."max.poll.interval.ms"`: `."kafka"."properties"."max.poll.interval.ms"`,
	} {
		p, ok := parseKeyPath(in)
		if !ok || p.id() != want {
			t.Errorf("parseKeyPath(%q) = %s, %v; want %s", in, p.id(), ok, want)
		}
	}
	for _, bad := range []string{"", "a..b", "a[", `a["x"`, "a]", ".a", "a[x]"} {
		if p, ok := parseKeyPath(bad); ok {
			t.Errorf("parseKeyPath(%q) = %s, want failure", bad, p.id())
		}
	}
}

// TestEmptyVariableNamed: a value that came out empty from an environment
// variable names the variable.
func TestEmptyVariableNamed(t *testing.T) {
	t.Setenv("ORDERLY_TEST_EMPTY", "")
	wantError(t, "[admin]\nlisten = \"0.0.0.0:9464\"\ntoken = \"${ORDERLY_TEST_UNSET_TOKEN}\"\n"+minimal,
		`t.toml:3:1: admin.token: is empty because the environment variable ORDERLY_TEST_UNSET_TOKEN is not set: /dlq/* would be open to anyone on 0.0.0.0:9464`)
	wantError(t, "[admin]\nlisten = \"0.0.0.0:9464\"\ntoken = \"${ORDERLY_TEST_EMPTY}\"\n"+minimal,
		`admin.token: is empty because the environment variable ORDERLY_TEST_EMPTY is empty`)
	wantError(t, "[kafka]\nbrokers = \"${ORDERLY_TEST_EMPTY}\"\n"+minimal,
		`t.toml:2:1: kafka.brokers: must be "host:port,host:port" or "embedded" (the environment variable ORDERLY_TEST_EMPTY is empty)`)
}

func TestRecordRequestErrors(t *testing.T) {
	es := wantError(t, `
[[routes]]
name = "a"
  [[routes.requests]]
  topic = "out"
  url = "http://x.example/"
  method = "PUT"
  body = "{{ .Raw }}"
  [[routes.requests]]
  value = "{{ .Raw }}"
  [[routes.requests]]
  topic = "{{ .Value.topic }}"
  [[routes.requests]]
  topic = "bad topic"
  key = "{{ .Value.id }}"
  [routes.requests.headers]
  "" = "x"
`,
		`routes[0] ("a").requests[0].url: is set with topic: set either url (an HTTP request) or topic (a Kafka record)`,
		`routes[0] ("a").requests[0].method: is set with topic: a Kafka record has no method`,
		`routes[0] ("a").requests[0].body: is set with topic: a Kafka record's value is set with value`,
		`routes[0] ("a").requests[1].topic: must be set with key or value`,
		`routes[0] ("a").requests[2].topic: cannot be a template`,
		`routes[0] ("a").requests[3].topic: "bad topic" is not a valid topic name`,
		`routes[0] ("a").requests[3].headers."": a record header needs a name`,
	)
	if len(es) != 7 {
		t.Errorf("%d errors, want 7:\n%v", len(es), es)
	}
	c, err := Parse([]byte(`
[kafka]
topics = ["orders"]
[[routes]]
name = "a"
  [[routes.requests]]
  topic = "out"
  value = '{"hash":"{{ md5 .Raw }}"}'
`), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	if rq := c.Routes[0].Requests[0]; rq.Method != "" || rq.Topic != "out" || rq.Key != nil {
		t.Fatalf("record request %+v: want no method and the message's key", rq)
	}
}

func TestReplyErrors(t *testing.T) {
	es := wantError(t, `
[[routes]]
name = "a"
reply_topic = "{{ .Topic }}"
error_topic = "bad topic"
reply_headers = ["Bad Header"]
  [[routes.requests]]
  url = "http://x.example/"
[[routes]]
name = "b"
reply_headers = ["Location"]
  [[routes.requests]]
  url = "http://x.example/"
`,
		`routes[0] ("a").reply_topic: "{{ .Topic }}" is not a topic name`,
		`routes[0] ("a").error_topic: "bad topic" is not a topic name`,
		`routes[0] ("a").reply_headers[0]: "Bad Header" is not a valid header name`,
		`routes[1] ("b").reply_headers: is set without reply_topic or error_topic`,
	)
	if len(es) != 4 {
		t.Errorf("%d errors, want 4:\n%v", len(es), es)
	}
}
