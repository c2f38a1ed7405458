package config

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

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

func TestDefaults(t *testing.T) {
	c, err := parse(t, minimal)
	if err != nil {
		t.Fatal(err)
	}
	d := Defaults()
	if !reflect.DeepEqual(c.Dispatch, d.Dispatch) || !reflect.DeepEqual(c.HTTP, d.HTTP) || c.DLQ != d.DLQ || c.Admin != d.Admin {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if c.Kafka.Brokers != "embedded" || c.Kafka.GroupID != "orderly" || c.Kafka.Topics[0] != "orders" ||
		c.Dispatch.MaxInFlight != 10000 || c.Dispatch.CommitInterval.D() != time.Second || c.HTTP.Retry.MaxAttempts != 10 ||
		c.Routes[0].Requests[0].Method != "POST" || c.Routes[0].Requests[0].Body != nil || c.Routes[0].Line != 2 {
		t.Fatalf("unexpected defaults: %+v", c)
	}
}

func TestExplicitZeroSticks(t *testing.T) {
	c, err := parse(t, `
[http.retry]
max_attempts = 0
[http.breaker]
enabled = false
[dlq]
topic = ""
[tracing]
sample_ratio = 0.0
[http]
max_conn_age = "0s"
`+minimal)
	if err != nil {
		t.Fatal(err)
	}
	if c.HTTP.Retry.MaxAttempts != 0 || c.HTTP.Breaker.Enabled || c.DLQ.Topic != "" || c.Tracing.SampleRatio != 0 || c.HTTP.MaxConnAge.D() != 0 {
		t.Fatalf("explicit zero values were replaced by defaults: %+v", c)
	}
}

func TestEnvExpansion(t *testing.T) {
	t.Setenv("ORDERLY_TEST_TOKEN", `s3"cr\et`)
	t.Setenv("ORDERLY_TEST_HOST", "10.0.0.1:9092")
	c, err := parse(t, `
[kafka]
brokers = "${ORDERLY_TEST_HOST}"
[kafka.properties]
"sasl.password" = "${ORDERLY_TEST_TOKEN}"
[admin]
token = "${ORDERLY_TEST_TOKEN}"
`+strings.Replace(minimal, "/x", "/$${literal}", 1))
	if err != nil {
		t.Fatal(err)
	}
	if c.Admin.Token != `s3"cr\et` || c.Kafka.Brokers != "10.0.0.1:9092" || c.Kafka.Properties["sasl.password"] != `s3"cr\et` {
		t.Fatalf("expansion: token %q brokers %q", c.Admin.Token, c.Kafka.Brokers)
	}
	if got := c.Routes[0].Requests[0].URL; got != "http://127.0.0.1:8081/${literal}" {
		t.Fatalf("$${ escape: %q", got)
	}
}

func TestPropertiesConversion(t *testing.T) {
	c, err := parse(t, `
[kafka.properties]
"session.timeout.ms" = 6000
"enable.partition.eof" = false
"some.ratio" = 0.25
"security.protocol" = "SASL_SSL"
`+minimal)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"session.timeout.ms": "6000", "enable.partition.eof": "false", "some.ratio": "0.25", "security.protocol": "SASL_SSL"}
	if !reflect.DeepEqual(c.Kafka.Properties, want) {
		t.Fatalf("properties %v, want %v", c.Kafka.Properties, want)
	}
}

// TestErrorsNameTheirKeys: each invalid field is reported, all at once,
// naming its key.
func TestErrorsNameTheirKeys(t *testing.T) {
	cases := map[string]string{
		"kafka.brokers":                   "[kafka]\nbrokers = \"nohostport\"\n",
		"kafka.group_id":                  "[kafka]\ngroup_id = \"\"\n",
		"kafka.topics":                    "[kafka]\ntopics = []\n",
		"kafka.topics[1]":                 "[kafka]\ntopics = [\"a\", \"a\"]\n",
		"kafka.embedded_listen":           "[kafka]\nembedded_listen = \"x\"\n",
		"kafka.embedded_partitions":       "[kafka]\nembedded_partitions = 0\n",
		"kafka.properties.group.id":       "[kafka.properties]\n\"group.id\" = \"x\"\n",
		"kafka.properties.nested":         "[kafka.properties]\nnested = [1, 2]\n",
		"dispatch.max_in_flight":          "[dispatch]\nmax_in_flight = 0\n",
		"dispatch.commit_interval":        "[dispatch]\ncommit_interval = \"0s\"\n",
		"dispatch.drain_timeout":          "[dispatch]\ndrain_timeout = \"-1s\"\n",
		"dispatch.unkeyed":                "[dispatch]\nunkeyed = \"x\"\n",
		"dispatch.unmatched":              "[dispatch]\nunmatched = \"dlq\"\n[dlq]\ntopic = \"\"\n",
		"dispatch.max_lanes":              "[dispatch]\nmax_lanes = 0\n",
		"dispatch.lane_idle":              "[dispatch]\nlane_idle = \"0s\"\n",
		"http.timeout":                    "[http]\ntimeout = \"0s\"\n",
		"http.max_conns_per_host":         "[http]\nmax_conns_per_host = -1\n",
		"http.retry.max_attempts":         "[http.retry]\nmax_attempts = -1\n",
		"http.retry.initial_backoff":      "[http.retry]\ninitial_backoff = \"0s\"\n",
		"http.retry.max_backoff":          "[http.retry]\ninitial_backoff = \"2s\"\nmax_backoff = \"1s\"\n",
		"http.retry.retry_statuses[1]":    "[http.retry]\nretry_statuses = [500, 1000]\n",
		"http.breaker.failure_ratio":      "[http.breaker]\nfailure_ratio = 1.5\n",
		"http.breaker.min_requests":       "[http.breaker]\nmin_requests = 0\n",
		"http.breaker.open_timeout":       "[http.breaker]\nopen_timeout = \"0s\"\n",
		"http.breaker.half_open_requests": "[http.breaker]\nhalf_open_requests = 0\n",
		"dlq.topic":                       "[dlq]\ntopic = \"orders\"\n",
		"admin.listen":                    "[admin]\nlisten = \"nope\"\n",
		"tracing.endpoint":                "[tracing]\nenabled = true\nendpoint = \"ftp://x\"\n",
		"tracing.sample_ratio":            "[tracing]\nsample_ratio = 2.0\n",
		"log.level":                       "[log]\nlevel = \"loud\"\n",
		"log.format":                      "[log]\nformat = \"xml\"\n",
	}
	for key, src := range cases {
		_, err := parse(t, src+minimal)
		if err == nil {
			t.Errorf("%s: no error for\n%s", key, src)
			continue
		}
		if !strings.Contains(err.Error(), key) {
			t.Errorf("%s: error does not name the key: %v", key, err)
		}
		var es Errors
		if !errors.As(err, &es) {
			t.Errorf("%s: error is %T, want Errors", key, err)
		}
	}
}

func TestRouteErrorsNameRouteAndLine(t *testing.T) {
	_, err := parse(t, `
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
`)
	if err == nil {
		t.Fatal("no error")
	}
	msg := err.Error()
	for _, want := range []string{
		`t.toml:2: routes[0] ("a").requests: at least one`,
		`t.toml:5: routes[1] ("a").name: "a" is also the name of routes[0]`,
		`routes[1] ("a").topics[0]: "users" is not consumed`,
		`routes[1] ("a").requests[0].method`,
		`routes[1] ("a").requests[0].url: must not be empty`,
		`routes[1] ("a").requests[0].headers."Bad Header"`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("missing %q in:\n%s", want, msg)
		}
	}
	if _, err := parse(t, "[kafka]\n"); err == nil || !strings.Contains(err.Error(), "routes: at least one") {
		t.Errorf("no routes: %v", err)
	}
}

func TestUnknownKeyNamesKeyAndLine(t *testing.T) {
	_, err := parse(t, "[dispatch]\nmax_in_flight = 5\nmax_in_flihgt = 3\n"+minimal)
	if err == nil || !strings.Contains(err.Error(), "t.toml:3:1: dispatch.max_in_flihgt: unknown key") {
		t.Fatalf("unknown key: %v", err)
	}
	_, err = parse(t, minimal+"  retries = 3\n")
	if err == nil || !strings.Contains(err.Error(), "routes.requests.retries") {
		t.Fatalf("unknown key in a route: %v", err)
	}
}

func TestSyntaxAndTypeErrorsHaveLineAndColumn(t *testing.T) {
	_, err := parse(t, "[dispatch\nx = 1\n")
	if err == nil || !strings.Contains(err.Error(), "t.toml:1:10") {
		t.Fatalf("syntax error: %v", err)
	}
	_, err = parse(t, "[dispatch]\nmax_in_flight = \"many\"\n")
	if err == nil || !strings.Contains(err.Error(), "t.toml:2:17: dispatch.max_in_flight") {
		t.Fatalf("type error: %v", err)
	}
	_, err = parse(t, "[dispatch]\ncommit_interval = \"soon\"\n")
	if err == nil || !strings.Contains(err.Error(), "dispatch.commit_interval") || !strings.Contains(err.Error(), "duration") {
		t.Fatalf("duration error: %v", err)
	}
}

// TestExampleIsCompleteAndValid: config.example.toml loads cleanly and
// mentions every key of the schema.
func TestExampleIsCompleteAndValid(t *testing.T) {
	t.Setenv("ORDERLY_ADMIN_TOKEN", "x")
	c, err := Load("../config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	if !c.Kafka.Embedded() || len(c.Routes) == 0 {
		t.Fatalf("example is not runnable on the embedded broker: %+v", c.Kafka)
	}
	raw, err := os.ReadFile("../config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	text := string(raw)
	var walk func(typ reflect.Type, prefix string)
	walk = func(typ reflect.Type, prefix string) {
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			tag := strings.Split(f.Tag.Get("toml"), ",")[0]
			if tag == "" || tag == "-" {
				continue
			}
			ft := f.Type
			for ft.Kind() == reflect.Slice || ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct && ft != reflect.TypeOf(Duration{}) {
				if !strings.Contains(text, "["+prefix+tag+"]") && !strings.Contains(text, "[["+prefix+tag+"]]") {
					t.Errorf("example lacks table %s%s", prefix, tag)
				}
				walk(ft, prefix+tag+".")
				continue
			}
			if !strings.Contains(text, "\n"+tag+" =") && !strings.Contains(text, " "+tag+" =") && !strings.Contains(text, "["+prefix+tag+"]") {
				t.Errorf("example does not document %s%s", prefix, tag)
			}
		}
	}
	walk(reflect.TypeOf(Config{}), "")
}

func FuzzParse(f *testing.F) {
	if b, err := os.ReadFile("../config.example.toml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(minimal))
	f.Add([]byte("[dispatch\n"))
	f.Add([]byte("[kafka.properties]\nx = {a = 1}\n"))
	f.Add([]byte("[[routes]]\n[[routes.requests]]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "f.toml")
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error text")
			}
			if c != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		if c.Dispatch.MaxInFlight < 1 || len(c.Routes) == 0 {
			t.Fatalf("invalid config accepted: %+v", c)
		}
	})
}
