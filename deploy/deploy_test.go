// Package deploy_test checks the deployment files that cannot run here (no
// Docker engine): YAML parses, the dashboard queries real metrics, HAProxy
// accepts its configuration, and the Orderly configurations load and compile.
package deploy_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

func TestYAMLParses(t *testing.T) {
	files, _ := filepath.Glob("*.yml")
	more, _ := filepath.Glob("kubernetes/*.yaml")
	files = append(files, more...)
	if len(files) < 6 {
		t.Fatalf("found only %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var doc map[string]any
		if err := yaml.Unmarshal(b, &doc); err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if strings.HasPrefix(f, "kubernetes/") && (doc["apiVersion"] == nil || doc["kind"] == nil) {
			t.Errorf("%s: no apiVersion/kind", f)
		}
	}
}

func TestOrderlyConfigs(t *testing.T) {
	t.Setenv("ORDERLY_ADMIN_TOKEN", "x")
	check := func(name string, src []byte) {
		cfg, err := config.Parse(src, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	b, err := os.ReadFile("orderly.toml")
	if err != nil {
		t.Fatal(err)
	}
	check("orderly.toml", b)
	var cm struct {
		Data map[string]string `yaml:"data"`
	}
	b, err = os.ReadFile("kubernetes/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &cm); err != nil || cm.Data["orderly.toml"] == "" {
		t.Fatalf("configmap: %v", err)
	}
	check("configmap.yaml:orderly.toml", []byte(cm.Data["orderly.toml"]))
}

func TestDashboardQueriesExportedMetrics(t *testing.T) {
	b, err := os.ReadFile("grafana/orderly-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	mfs, err := telemetry.NewMetrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, mf := range mfs {
		known[mf.GetName()] = true
	}
	// Vectors appear in Gather only once they have a series.
	for _, name := range []string{"orderly_messages_total", "orderly_http_requests_total", "orderly_http_request_duration_seconds",
		"orderly_http_retries_total", "orderly_breaker_state", "orderly_breaker_transitions_total", "orderly_partition_in_flight",
		"orderly_partition_paused", "orderly_committed_offset", "orderly_consumer_lag", "orderly_rebalances_total",
		"orderly_replay_messages_total"} {
		known[name] = true
	}
	re := regexp.MustCompile(`orderly_[a-z_]+`)
	used := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, name := range re.FindAllString(tg.Expr, -1) {
				base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
				if !known[base] {
					t.Errorf("panel %q queries %s, which Orderly does not export", p.Title, name)
				}
				used++
			}
		}
	}
	if used < 10 {
		t.Fatalf("dashboard queries only %d metrics", used)
	}
}

func TestHAProxyConfigIsValid(t *testing.T) {
	hp, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("ORDERLY_E2E") == "1" {
			t.Fatal("haproxy not installed (ORDERLY_E2E=1)")
		}
		t.Skip("haproxy not installed")
	}
	// The servers are compose service names: check with them resolvable
	// as localhost so that only the syntax and semantics are judged.
	b, err := os.ReadFile("haproxy/haproxy.cfg")
	if err != nil {
		t.Fatal(err)
	}
	cfg := strings.NewReplacer("target1:", "127.0.0.1:", "target2:", "127.0.0.1:").Replace(string(b))
	p := filepath.Join(t.TempDir(), "haproxy.cfg")
	os.WriteFile(p, []byte(cfg), 0o644)
	if out, err := exec.Command(hp, "-c", "-f", p).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
}
