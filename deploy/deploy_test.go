// Package deploy_test checks the deployment files as far as a machine
// without a Docker engine or a Kubernetes cluster allows:
//
//   - every YAML file parses; Kubernetes manifests have apiVersion, kind and
//     a name, and kustomization.yaml lists every one of them;
//   - the Orderly configurations (compose's orderly.toml and the one in the
//     ConfigMap) load with config.Parse and their routes compile;
//   - the pieces agree with each other: ports, paths, names, the Secret and
//     ConfigMap the Deployment refers to, the entrypoint, and the grace
//     periods against admin.drain_grace + dispatch.drain_timeout;
//   - the Grafana dashboard is valid JSON whose queries name only metrics and
//     labels Orderly exports, each filtered by $job and $instance;
//   - prometheus/alerts.yml is a Prometheus rules file whose expressions
//     name only metrics and labels Orderly exports, prometheus.yml loads it,
//     docker-compose.yml mounts it there, and the Prometheus Operator's copy
//     (kubernetes/prometheus-operator) matches it;
//   - `haproxy -c` accepts haproxy/haproxy.cfg and `promtool check` the
//     rules and prometheus.yml (each skipped without the tool, unless
//     ORDERLY_E2E=1).
package deploy_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// ---------------------------------------------------------------- helpers

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// yamlDocs decodes every document of a YAML file.
func yamlDocs(t *testing.T, path string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, path)))
	var docs []map[string]any
	for {
		var doc map[string]any
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if doc != nil {
			docs = append(docs, doc)
		}
	}
}

// decodeYAML decodes a single-document YAML file into v.
func decodeYAML(t *testing.T, path string, v any) {
	t.Helper()
	if err := yaml.Unmarshal(readFile(t, path), v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// loadOrderly parses and compiles an Orderly configuration with
// ORDERLY_ADMIN_TOKEN set, as the deployments set it.
func loadOrderly(t *testing.T, name string, src []byte) *config.Config {
	t.Helper()
	t.Setenv("ORDERLY_ADMIN_TOKEN", "test-token")
	cfg, err := config.Parse(src, name)
	if err != nil {
		t.Fatalf("%s does not load:\n%v", name, err)
	}
	if len(cfg.UnsetEnv) > 0 {
		t.Errorf("%s refers to unset environment variables %v", name, cfg.UnsetEnv)
	}
	if _, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics); err != nil {
		t.Fatalf("%s: routes do not compile:\n%v", name, err)
	}
	if cfg.Admin.Token != "test-token" {
		t.Errorf("%s: admin.token = %q, want it from ${ORDERLY_ADMIN_TOKEN}", name, cfg.Admin.Token)
	}
	return cfg
}

// configMapTOML is orderly.toml as the Kubernetes ConfigMap holds it.
func configMapTOML(t *testing.T) []byte {
	t.Helper()
	var cm struct {
		Kind     string                `yaml:"kind"`
		Metadata struct{ Name string } `yaml:"metadata"`
		Data     map[string]string     `yaml:"data"`
	}
	decodeYAML(t, "kubernetes/configmap.yaml", &cm)
	if cm.Kind != "ConfigMap" || cm.Data["orderly.toml"] == "" {
		t.Fatalf("kubernetes/configmap.yaml: want a ConfigMap with data.orderly.toml, got kind %q, keys %v", cm.Kind, keys(cm.Data))
	}
	return []byte(cm.Data["orderly.toml"])
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func port(t *testing.T, what, hostport string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(hostport)
	if err != nil {
		t.Fatalf("%s: %q: %v", what, hostport, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s: %q: %v", what, hostport, err)
	}
	return n
}

// dockerfile is deploy/Dockerfile, continuation lines joined.
type dockerfile struct {
	froms      []string
	entrypoint []string
	expose     []string
	user       string // of the last stage
	run        []string
	copies     []string
}

func parseDockerfile(t *testing.T) dockerfile {
	t.Helper()
	var df dockerfile
	var lines []string
	cur := ""
	for _, l := range strings.Split(string(readFile(t, "Dockerfile")), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "#") || (l == "" && cur == "") {
			continue
		}
		if strings.HasSuffix(l, "\\") {
			cur += strings.TrimSuffix(l, "\\") + " "
			continue
		}
		lines = append(lines, cur+l)
		cur = ""
	}
	for _, l := range lines {
		instr, rest, _ := strings.Cut(l, " ")
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "FROM":
			df.froms = append(df.froms, strings.Fields(rest)[0])
			df.user = ""
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(rest), &df.entrypoint); err != nil {
				t.Fatalf("Dockerfile: ENTRYPOINT is not in exec form: %v", err)
			}
		case "EXPOSE":
			df.expose = append(df.expose, strings.Fields(rest)...)
		case "USER":
			df.user = rest
		case "RUN":
			df.run = append(df.run, rest)
		case "COPY":
			df.copies = append(df.copies, rest)
		}
	}
	return df
}

// ------------------------------------------------------------------- YAML

func TestYAMLParses(t *testing.T) {
	var files []string
	err := filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"docker-compose.yml", "kubernetes/deployment.yaml", "kubernetes/kustomization.yaml",
		"prometheus/prometheus.yml", "grafana/provisioning/datasources/prometheus.yaml"} {
		if !slices.Contains(files, want) {
			t.Errorf("%s is missing (found %v)", want, files)
		}
	}
	for _, f := range files {
		docs := yamlDocs(t, f)
		if len(docs) == 0 {
			t.Errorf("%s: no YAML document", f)
		}
		if !strings.HasPrefix(f, "kubernetes/") {
			continue
		}
		for _, doc := range docs {
			md, _ := doc["metadata"].(map[string]any)
			if doc["apiVersion"] == nil || doc["kind"] == nil || (doc["kind"] != "Kustomization" && (md == nil || md["name"] == nil)) {
				t.Errorf("%s: a manifest without apiVersion, kind or metadata.name", f)
			}
		}
	}
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	var k struct {
		Resources []string `yaml:"resources"`
		Images    []struct {
			Name string `yaml:"name"`
		} `yaml:"images"`
	}
	decodeYAML(t, "kubernetes/kustomization.yaml", &k)
	files, _ := filepath.Glob("kubernetes/*.yaml")
	var want []string
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" {
			want = append(want, b)
		}
	}
	got := slices.Clone(k.Resources)
	sort.Strings(got)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		t.Errorf("kustomization resources %v, want every manifest of the directory %v", got, want)
	}
	var d struct {
		Spec struct {
			Template struct {
				Spec struct {
					Containers []struct{ Image string } `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	decodeYAML(t, "kubernetes/deployment.yaml", &d)
	for _, c := range d.Spec.Template.Spec.Containers {
		name, _, _ := strings.Cut(c.Image, ":")
		if !slices.ContainsFunc(k.Images, func(i struct {
			Name string `yaml:"name"`
		}) bool {
			return i.Name == name
		}) {
			t.Errorf("kustomization images: no entry for the Deployment's image %q", name)
		}
	}
}

// ------------------------------------------------------ Orderly configs

func TestOrderlyConfigsLoad(t *testing.T) {
	for name, src := range map[string][]byte{
		"orderly.toml":                   readFile(t, "orderly.toml"),
		"kubernetes/configmap.yaml:data": configMapTOML(t),
	} {
		t.Run(name, func(t *testing.T) {
			cfg := loadOrderly(t, name, src)
			if cfg.Kafka.Embedded() {
				t.Errorf("kafka.brokers = %q: a deployment needs real brokers", cfg.Kafka.Brokers)
			}
			host, p, err := net.SplitHostPort(cfg.Admin.Listen)
			if err != nil || p != "9464" || (host != "0.0.0.0" && host != "" && host != "::") {
				t.Errorf("admin.listen = %q, want all interfaces on 9464 (probes and scraping come from outside)", cfg.Admin.Listen)
			}
			if cfg.DLQ.Topic == "" {
				t.Errorf("dlq.topic is empty: a bad message would stall its key")
			}
		})
	}
}

// ------------------------------------------------------------ Dockerfile

func TestDockerfile(t *testing.T) {
	df := parseDockerfile(t)
	want := []string{"/orderly", "run", "--config", "/etc/orderly/orderly.toml"}
	if !slices.Equal(df.entrypoint, want) {
		t.Errorf("ENTRYPOINT %q, want %q", df.entrypoint, want)
	}
	if !slices.Contains(df.expose, "9464") {
		t.Errorf("EXPOSE %v, want the admin port 9464", df.expose)
	}
	if df.user == "" || df.user == "root" || strings.HasPrefix(df.user, "0") {
		t.Errorf("the runtime stage runs as %q, want a non-root user", df.user)
	}
	if len(df.froms) < 2 {
		t.Fatalf("FROM %v: want a multi-stage build", df.froms)
	}
	// confluent-kafka-go's bundled librdkafka is built for glibc: Debian
	// bookworm to build, a Debian 12 (glibc) runtime, and cgo on.
	goMod := string(readFile(t, "../go.mod"))
	goVer := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(goMod)
	if goVer == nil || !strings.HasPrefix(df.froms[0], "golang:"+goVer[1]) || !strings.Contains(df.froms[0], "bookworm") {
		t.Errorf("build stage FROM %s, want golang:<go.mod's %v>-bookworm", df.froms[0], goVer)
	}
	last := df.froms[len(df.froms)-1]
	if !strings.Contains(last, "debian12") && !strings.Contains(last, "bookworm") {
		t.Errorf("runtime FROM %s, want a glibc Debian 12 image", last)
	}
	if strings.Contains(last, "static") {
		t.Errorf("runtime FROM %s: distroless static has no glibc, which librdkafka needs", last)
	}
	all := strings.Join(df.run, "\n") + string(readFile(t, "Dockerfile"))
	if strings.Contains(all, "CGO_ENABLED=0") || !strings.Contains(all, "CGO_ENABLED=1") {
		t.Errorf("the build must run with CGO_ENABLED=1 everywhere (the sink server imports the Kafka client too)")
	}
	// Every package built exists, and both binaries reach the runtime stage.
	for _, pkg := range regexp.MustCompile(`go build [^&]*?(\./[\w/]+)`).FindAllStringSubmatch(strings.Join(df.run, "\n"), -1) {
		if st, err := os.Stat(filepath.Join("..", pkg[1])); err != nil || !st.IsDir() {
			t.Errorf("Dockerfile builds %s, which does not exist", pkg[1])
		}
	}
	for _, bin := range []string{"/orderly", "/sinkserver"} {
		if !slices.ContainsFunc(df.copies, func(c string) bool { return strings.HasSuffix(c, " "+bin) && strings.Contains(c, "--from=") }) {
			t.Errorf("the runtime stage does not COPY %s from the build stage", bin)
		}
	}
}

// -------------------------------------------------------- docker compose

type composeFile struct {
	Services map[string]struct {
		Image           string            `yaml:"image"`
		Build           any               `yaml:"build"`
		Entrypoint      []string          `yaml:"entrypoint"`
		Command         any               `yaml:"command"`
		Environment     map[string]string `yaml:"environment"`
		Volumes         []string          `yaml:"volumes"`
		Ports           []string          `yaml:"ports"`
		DependsOn       any               `yaml:"depends_on"`
		StopGracePeriod string            `yaml:"stop_grace_period"`
	} `yaml:"services"`
}

// haproxyCfg is what the checks need from haproxy.cfg.
type haproxyCfg struct {
	frontendPort  int
	servers       []string // host:port
	timeoutClient time.Duration
}

func parseHAProxy(t *testing.T) haproxyCfg {
	t.Helper()
	var h haproxyCfg
	section, name := "", ""
	for _, l := range strings.Split(string(readFile(t, "haproxy/haproxy.cfg")), "\n") {
		l, _, _ = strings.Cut(l, "#")
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		if !strings.HasPrefix(l, " ") && !strings.HasPrefix(l, "\t") {
			section, name = f[0], ""
			if len(f) > 1 {
				name = f[1]
			}
			continue
		}
		switch {
		case section == "frontend" && name == "targets" && f[0] == "bind":
			h.frontendPort = port(t, "haproxy.cfg bind", f[1])
		case section == "backend" && f[0] == "server" && len(f) >= 3:
			h.servers = append(h.servers, f[2])
		case section == "defaults" && len(f) == 3 && f[0] == "timeout" && f[1] == "client":
			d, err := time.ParseDuration(f[2])
			if err != nil {
				t.Fatalf("haproxy.cfg: timeout client %q: %v", f[2], err)
			}
			h.timeoutClient = d
		}
	}
	if h.frontendPort == 0 || len(h.servers) == 0 || h.timeoutClient == 0 {
		t.Fatalf("haproxy.cfg: want frontend \"targets\" with a bind, backend servers and defaults' timeout client; got %+v", h)
	}
	return h
}

func TestComposeStackIsCoherent(t *testing.T) {
	var c composeFile
	decodeYAML(t, "docker-compose.yml", &c)
	for _, want := range []string{"redpanda", "jaeger", "haproxy", "orderly", "target1", "target2"} {
		if _, ok := c.Services[want]; !ok {
			t.Fatalf("docker-compose.yml: no service %q (have %v)", want, keys(c.Services))
		}
	}
	// Every bind-mounted file exists.
	for name, s := range c.Services {
		for _, v := range s.Volumes {
			src, _, _ := strings.Cut(v, ":")
			if strings.HasPrefix(src, ".") {
				if _, err := os.Stat(src); err != nil {
					t.Errorf("service %s mounts %s: %v", name, src, err)
				}
			}
		}
	}
	o := c.Services["orderly"]
	if !slices.ContainsFunc(o.Volumes, func(v string) bool { return strings.HasPrefix(v, "./orderly.toml:/etc/orderly/orderly.toml") }) {
		t.Errorf("orderly service volumes %v: want ./orderly.toml mounted at /etc/orderly/orderly.toml (the image's --config)", o.Volumes)
	}
	if o.Environment["ORDERLY_ADMIN_TOKEN"] == "" {
		t.Errorf("orderly service: ORDERLY_ADMIN_TOKEN is not set (admin.token needs it)")
	}
	if !slices.ContainsFunc(o.Ports, func(p string) bool { return strings.HasSuffix(p, ":9464") }) {
		t.Errorf("orderly service ports %v: want the admin port 9464 published", o.Ports)
	}

	cfg := loadOrderly(t, "orderly.toml", readFile(t, "orderly.toml"))
	grace, err := time.ParseDuration(o.StopGracePeriod)
	if need := cfg.Admin.DrainGrace.D() + cfg.Dispatch.DrainTimeout.D(); err != nil || grace <= need {
		t.Errorf("orderly stop_grace_period %q, want more than admin.drain_grace + dispatch.drain_timeout = %s", o.StopGracePeriod, need)
	}
	for _, b := range strings.Split(cfg.Kafka.Brokers, ",") {
		host, _, err := net.SplitHostPort(b)
		if _, ok := c.Services[host]; err != nil || !ok {
			t.Errorf("kafka.brokers names %q, which is not a compose service", b)
		}
	}
	if u, err := url.Parse(cfg.Tracing.Endpoint); !cfg.Tracing.Enabled || err != nil || u.Hostname() != "jaeger" || u.Port() != "4318" {
		t.Errorf("tracing: enabled %v, endpoint %q; want OTLP/HTTP to jaeger:4318", cfg.Tracing.Enabled, cfg.Tracing.Endpoint)
	}
	if c.Services["jaeger"].Environment["COLLECTOR_OTLP_ENABLED"] != "true" {
		t.Errorf("jaeger: COLLECTOR_OTLP_ENABLED is not \"true\"")
	}

	// Orderly -> HAProxy's frontend -> the targets' listen address.
	hp := parseHAProxy(t)
	for _, r := range cfg.Routes {
		for i, req := range r.Requests {
			prefix, _, _ := strings.Cut(req.URL, "{{")
			u, err := url.Parse(prefix)
			if err != nil || u.Hostname() != "haproxy" || u.Port() != strconv.Itoa(hp.frontendPort) {
				t.Errorf("route %s request %d posts to %q, want http://haproxy:%d/...", r.Name, i, req.URL, hp.frontendPort)
			}
		}
	}
	if len(hp.servers) < 2 {
		t.Errorf("haproxy backend servers %v: want the two targets", hp.servers)
	}
	for _, s := range hp.servers {
		host, p, _ := net.SplitHostPort(s)
		svc, ok := c.Services[host]
		if !ok {
			t.Errorf("haproxy server %s is not a compose service", s)
			continue
		}
		ep := strings.Join(svc.Entrypoint, " ")
		if !strings.HasPrefix(ep, "/sinkserver ") || !strings.Contains(ep, ":"+p) {
			t.Errorf("service %s runs %q, want /sinkserver listening on port %s", host, ep, p)
		}
	}
	// Orderly closes idle and old connections before HAProxy times them
	// out, so it never writes into a connection HAProxy already closed.
	if cfg.HTTP.IdleConnTimeout.D() >= hp.timeoutClient || cfg.HTTP.MaxConnAge.D() == 0 || cfg.HTTP.MaxConnAge.D() >= hp.timeoutClient {
		t.Errorf("http.idle_conn_timeout %s and max_conn_age %s, want both set below haproxy's timeout client %s",
			cfg.HTTP.IdleConnTimeout.D(), cfg.HTTP.MaxConnAge.D(), hp.timeoutClient)
	}

	var prom struct {
		ScrapeConfigs []struct {
			JobName       string `yaml:"job_name"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	decodeYAML(t, "prometheus/prometheus.yml", &prom)
	scraped := false
	for _, sc := range prom.ScrapeConfigs {
		for _, st := range sc.StaticConfigs {
			scraped = scraped || slices.Contains(st.Targets, "orderly:9464")
		}
	}
	if !scraped {
		t.Errorf("prometheus.yml does not scrape orderly:9464")
	}
}

// ------------------------------------------------------------ Kubernetes

type podSpec struct {
	TerminationGracePeriodSeconds int `yaml:"terminationGracePeriodSeconds"`
	SecurityContext               struct {
		RunAsNonRoot *bool `yaml:"runAsNonRoot"`
		RunAsUser    int   `yaml:"runAsUser"`
	} `yaml:"securityContext"`
	Containers []struct {
		Name  string   `yaml:"name"`
		Image string   `yaml:"image"`
		Args  []string `yaml:"args"`
		Ports []struct {
			Name          string `yaml:"name"`
			ContainerPort int    `yaml:"containerPort"`
		} `yaml:"ports"`
		Env []struct {
			Name      string `yaml:"name"`
			Value     string `yaml:"value"`
			ValueFrom struct {
				SecretKeyRef struct {
					Name string `yaml:"name"`
					Key  string `yaml:"key"`
				} `yaml:"secretKeyRef"`
			} `yaml:"valueFrom"`
		} `yaml:"env"`
		LivenessProbe  *probe `yaml:"livenessProbe"`
		ReadinessProbe *probe `yaml:"readinessProbe"`
		Resources      struct {
			Requests map[string]string `yaml:"requests"`
			Limits   map[string]string `yaml:"limits"`
		} `yaml:"resources"`
		SecurityContext struct {
			AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
			ReadOnlyRootFilesystem   bool  `yaml:"readOnlyRootFilesystem"`
			RunAsNonRoot             *bool `yaml:"runAsNonRoot"`
		} `yaml:"securityContext"`
		VolumeMounts []struct {
			Name      string `yaml:"name"`
			MountPath string `yaml:"mountPath"`
		} `yaml:"volumeMounts"`
	} `yaml:"containers"`
	Volumes []struct {
		Name      string `yaml:"name"`
		ConfigMap *struct {
			Name  string `yaml:"name"`
			Items []struct {
				Key string `yaml:"key"`
			} `yaml:"items"`
		} `yaml:"configMap"`
	} `yaml:"volumes"`
}

type probe struct {
	HTTPGet struct {
		Path string `yaml:"path"`
		Port any    `yaml:"port"`
	} `yaml:"httpGet"`
}

type selector struct {
	MatchLabels map[string]string `yaml:"matchLabels"`
}

func TestKubernetesManifestsAreCoherent(t *testing.T) {
	var dep struct {
		Kind string `yaml:"kind"`
		Spec struct {
			Replicas int      `yaml:"replicas"`
			Selector selector `yaml:"selector"`
			Template struct {
				Metadata struct {
					Labels      map[string]string `yaml:"labels"`
					Annotations map[string]string `yaml:"annotations"`
				} `yaml:"metadata"`
				Spec podSpec `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	decodeYAML(t, "kubernetes/deployment.yaml", &dep)
	if dep.Kind != "Deployment" {
		t.Fatalf("deployment.yaml: kind %q", dep.Kind)
	}
	labels := dep.Spec.Template.Metadata.Labels
	matches := func(what string, s selector) {
		if len(s.MatchLabels) == 0 {
			t.Errorf("%s: empty selector", what)
		}
		for k, v := range s.MatchLabels {
			if labels[k] != v {
				t.Errorf("%s: selector %s=%s does not match the pod labels %v", what, k, v, labels)
			}
		}
	}
	matches("deployment.yaml", dep.Spec.Selector)
	ps := dep.Spec.Template.Spec
	if len(ps.Containers) != 1 {
		t.Fatalf("deployment.yaml: %d containers, want 1", len(ps.Containers))
	}
	ct := ps.Containers[0]

	// Grace period against the ConfigMap's drain settings.
	cfg := loadOrderly(t, "configmap.yaml:orderly.toml", configMapTOML(t))
	need := cfg.Admin.DrainGrace.D() + cfg.Dispatch.DrainTimeout.D()
	if got := time.Duration(ps.TerminationGracePeriodSeconds) * time.Second; got <= need {
		t.Errorf("terminationGracePeriodSeconds %s, want more than admin.drain_grace + dispatch.drain_timeout = %s", got, need)
	}

	// Probes and the admin port.
	adminPort := port(t, "admin.listen", cfg.Admin.Listen)
	portName := ""
	for _, p := range ct.Ports {
		if p.ContainerPort == adminPort {
			portName = p.Name
		}
	}
	if portName == "" {
		t.Errorf("container ports %+v: none is admin.listen's port %d", ct.Ports, adminPort)
	}
	for what, pr := range map[string]struct {
		p    *probe
		path string
	}{"livenessProbe": {ct.LivenessProbe, "/healthz"}, "readinessProbe": {ct.ReadinessProbe, "/readyz"}} {
		if pr.p == nil {
			t.Errorf("%s is missing", what)
			continue
		}
		portOK := pr.p.HTTPGet.Port == portName || pr.p.HTTPGet.Port == adminPort
		if pr.p.HTTPGet.Path != pr.path || !portOK {
			t.Errorf("%s: GET %s on port %v, want %s on the admin port (%s/%d)", what, pr.p.HTTPGet.Path, pr.p.HTTPGet.Port, pr.path, portName, adminPort)
		}
	}
	if a := dep.Spec.Template.Metadata.Annotations; a["prometheus.io/port"] != strconv.Itoa(adminPort) {
		t.Errorf("pod annotation prometheus.io/port = %q, want %d", a["prometheus.io/port"], adminPort)
	}

	// Non-root, read-only root file system, resources.
	if r := ps.SecurityContext.RunAsNonRoot; r == nil || !*r || ps.SecurityContext.RunAsUser == 0 {
		t.Errorf("pod securityContext: want runAsNonRoot: true and a non-zero runAsUser")
	}
	if sc := ct.SecurityContext; !sc.ReadOnlyRootFilesystem || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container securityContext: want readOnlyRootFilesystem: true and allowPrivilegeEscalation: false")
	}
	if ct.Resources.Requests["cpu"] == "" || ct.Resources.Requests["memory"] == "" || ct.Resources.Limits["memory"] == "" {
		t.Errorf("resources %+v: want cpu and memory requests and a memory limit", ct.Resources)
	}
	// GOMEMLIMIT, where set, leaves room below the container's limit for
	// memory the Go runtime does not own (librdkafka, the binary).
	for _, e := range ct.Env {
		switch e.Name {
		case "GOMEMLIMIT":
			soft, err1 := parseBytes(e.Value)
			hard, err2 := parseBytes(ct.Resources.Limits["memory"])
			if err1 != nil || err2 != nil || soft <= 0 || soft > hard*95/100 {
				t.Errorf("GOMEMLIMIT %q against a memory limit of %q: want it set, at most 95%% of the limit",
					e.Value, ct.Resources.Limits["memory"])
			}
		case "GOGC":
			t.Errorf("GOGC is set: leave it at its default and bound the memory with GOMEMLIMIT (README, Memory)")
		}
	}
	// The image's ENTRYPOINT already holds run --config; args would be
	// appended to it.
	if len(ct.Args) > 0 {
		t.Errorf("container args %q: the image's ENTRYPOINT is the whole command line", ct.Args)
	}

	// The Secret and the ConfigMap it refers to.
	var secret struct {
		Kind       string                `yaml:"kind"`
		Metadata   struct{ Name string } `yaml:"metadata"`
		StringData map[string]string     `yaml:"stringData"`
		Data       map[string]string     `yaml:"data"`
	}
	decodeYAML(t, "kubernetes/secret.yaml", &secret)
	tokenFromSecret := false
	for _, e := range ct.Env {
		if e.Name != "ORDERLY_ADMIN_TOKEN" {
			continue
		}
		ref := e.ValueFrom.SecretKeyRef
		_, inString := secret.StringData[ref.Key]
		_, inData := secret.Data[ref.Key]
		if secret.Kind != "Secret" || ref.Name != secret.Metadata.Name || !(inString || inData) {
			t.Errorf("ORDERLY_ADMIN_TOKEN comes from secret %s key %s, which secret.yaml (%s %s, keys %v %v) does not hold",
				ref.Name, ref.Key, secret.Kind, secret.Metadata.Name, keys(secret.StringData), keys(secret.Data))
		}
		tokenFromSecret = true
	}
	if !tokenFromSecret {
		t.Errorf("the container does not take ORDERLY_ADMIN_TOKEN from the Secret")
	}
	var cm struct {
		Metadata struct{ Name string } `yaml:"metadata"`
	}
	decodeYAML(t, "kubernetes/configmap.yaml", &cm)
	mounted := false
	for _, v := range ps.Volumes {
		if v.ConfigMap == nil {
			continue
		}
		if v.ConfigMap.Name != cm.Metadata.Name {
			t.Errorf("volume %s uses ConfigMap %q, want %q", v.Name, v.ConfigMap.Name, cm.Metadata.Name)
		}
		for _, it := range v.ConfigMap.Items {
			if it.Key != "orderly.toml" {
				t.Errorf("volume %s projects key %q, which the ConfigMap does not hold", v.Name, it.Key)
			}
		}
		for _, m := range ct.VolumeMounts {
			mounted = mounted || (m.Name == v.Name && m.MountPath == "/etc/orderly")
		}
	}
	if !mounted {
		t.Errorf("the ConfigMap is not mounted at /etc/orderly (the image runs --config /etc/orderly/orderly.toml)")
	}

	// PDB and Service select the Deployment's pods; the Service reaches the
	// admin port.
	var pdb struct {
		Kind string `yaml:"kind"`
		Spec struct {
			MaxUnavailable any      `yaml:"maxUnavailable"`
			MinAvailable   any      `yaml:"minAvailable"`
			Selector       selector `yaml:"selector"`
		} `yaml:"spec"`
	}
	decodeYAML(t, "kubernetes/pdb.yaml", &pdb)
	if pdb.Kind != "PodDisruptionBudget" || (pdb.Spec.MaxUnavailable == nil && pdb.Spec.MinAvailable == nil) {
		t.Errorf("pdb.yaml: want a PodDisruptionBudget with maxUnavailable or minAvailable")
	}
	matches("pdb.yaml", pdb.Spec.Selector)
	var svc struct {
		Kind     string `yaml:"kind"`
		Metadata struct {
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"metadata"`
		Spec struct {
			Selector map[string]string `yaml:"selector"`
			Ports    []struct {
				Port       int `yaml:"port"`
				TargetPort any `yaml:"targetPort"`
			} `yaml:"ports"`
		} `yaml:"spec"`
	}
	decodeYAML(t, "kubernetes/service.yaml", &svc)
	matches("service.yaml", selector{MatchLabels: svc.Spec.Selector})
	if len(svc.Spec.Ports) == 0 || (svc.Spec.Ports[0].TargetPort != portName && svc.Spec.Ports[0].TargetPort != adminPort) {
		t.Errorf("service.yaml ports %+v: want the admin port %s/%d", svc.Spec.Ports, portName, adminPort)
	}
	if svc.Metadata.Annotations["prometheus.io/scrape"] != "true" {
		t.Errorf("service.yaml: no prometheus.io/scrape annotation")
	}
}

// ---------------------------------------------------------------- HAProxy

func TestHAProxyConfigIsValid(t *testing.T) {
	hp, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("ORDERLY_E2E") == "1" {
			t.Fatal("haproxy is not installed and ORDERLY_E2E=1 requires it (apt-get install haproxy)")
		}
		t.Skip("haproxy is not installed (apt-get install haproxy); set ORDERLY_E2E=1 to make this a failure")
	}
	out, err := exec.Command(hp, "-c", "-f", "haproxy/haproxy.cfg").CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	// The compose service names do not resolve here; the configuration lets
	// HAProxy start without them (init-addr none) and find them later through
	// Docker's DNS. Any other warning is a defect.
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "[WARNING]") && !strings.Contains(l, "could not resolve address") {
			t.Errorf("haproxy -c warns: %s", l)
		}
	}
}

// ---------------------------------------------------------------- Grafana

// exported is what Orderly's registry exports: metric name -> label names.
type exported struct {
	labels     map[string]map[string]bool
	histograms map[string]bool // histogram and summary names: _bucket/_sum/_count series
}

// Desc.String is the only public view of a descriptor's name and labels:
// Desc{fqName: "x", help: "...", unit: "", constLabels: {a="b"}, variableLabels: {c,d}}.
var descRE = regexp.MustCompile(`^Desc\{fqName: "([^"]+)", .*constLabels: \{([^}]*)\}, variableLabels: \{([^}]*)\}\}$`)

func exportedMetrics(t *testing.T) exported {
	t.Helper()
	m := telemetry.NewMetrics()
	ex := exported{labels: map[string]map[string]bool{}, histograms: map[string]bool{}}
	ch := make(chan *prometheus.Desc)
	go func() { m.Registry.Describe(ch); close(ch) }()
	for d := range ch {
		sm := descRE.FindStringSubmatch(d.String())
		if sm == nil {
			t.Fatalf("unable to read the descriptor %s", d)
		}
		ls := map[string]bool{}
		for _, part := range []string{sm[2], sm[3]} {
			for _, l := range strings.Split(part, ",") {
				l, _, _ = strings.Cut(l, "=")
				l = strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")")
				if l != "" {
					ls[l] = true
				}
			}
		}
		ex.labels[sm[1]] = ls
	}
	// Histograms: the families that have series say so themselves; vectors
	// without series are found by their Go type.
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_SUMMARY, dto.MetricType_GAUGE_HISTOGRAM:
			ex.histograms[mf.GetName()] = true
		}
	}
	v := reflect.ValueOf(m).Elem()
	for i := 0; i < v.NumField(); i++ {
		c, ok := v.Field(i).Interface().(prometheus.Collector)
		if !ok || !strings.Contains(v.Field(i).Type().String(), "Histogram") {
			continue
		}
		dch := make(chan *prometheus.Desc)
		go func() { c.Describe(dch); close(dch) }()
		for d := range dch {
			if sm := descRE.FindStringSubmatch(d.String()); sm != nil {
				ex.histograms[sm[1]] = true
			}
		}
	}
	// Make sure the descriptor format was read right.
	if !ex.labels["orderly_messages_total"]["outcome"] || !ex.labels["orderly_http_requests_total"]["status"] ||
		!ex.histograms["orderly_http_request_duration_seconds"] {
		t.Fatalf("reading the registry went wrong: %v / %v", ex.labels["orderly_messages_total"], ex.histograms)
	}
	return ex
}

// metricOf resolves a series name to its exported family ("" if unknown).
func (ex exported) metricOf(name string) string {
	if _, ok := ex.labels[name]; ok {
		return name
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suf); ok && ex.histograms[base] {
			return base
		}
	}
	return ""
}

type dashPanel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	GridPos struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	FieldConfig struct {
		Defaults struct {
			Thresholds *struct {
				Steps []struct {
					Value *float64 `json:"value"`
				} `json:"steps"`
			} `json:"thresholds"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
	Panels []dashPanel `json:"panels"` // inside collapsed rows
}

var (
	// A metric reference: a name of one of the prefixes Orderly's registry
	// exports, optionally followed by a label selector.
	metricRefRE = regexp.MustCompile(`\b((?:orderly|go|process)_[a-zA-Z0-9_]+)(\{[^}]*\})?`)
	byRE        = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	matcherRE   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"`)
)

// promQL checks PromQL expressions (dashboard queries, alert rules) against
// what Orderly's registry exports.
type promQL struct {
	t  *testing.T
	ex exported
	// vars are the $variables an expression may use (the dashboard's); nil
	// for none.
	vars map[string]bool
	// filtered: every selector must filter on job=~"$job" and
	// instance=~"$instance" (the dashboard's convention).
	filtered bool
	// used collects the exported families the expressions refer to.
	used map[string]bool
}

// check reports what is wrong with expr (at where): unbalanced brackets or
// quotes, undefined variables, metrics Orderly does not export, matchers
// or groupings on labels they do not have.
func (c promQL) check(where, expr string) {
	t, ex := c.t, c.ex
	t.Helper()
	if strings.Count(expr, "(") != strings.Count(expr, ")") || strings.Count(expr, "{") != strings.Count(expr, "}") ||
		strings.Count(expr, "[") != strings.Count(expr, "]") || strings.Count(expr, `"`)%2 != 0 {
		t.Errorf("%s: unbalanced brackets or quotes in %s", where, expr)
	}
	for _, v := range regexp.MustCompile(`\$\{?(\w+)`).FindAllStringSubmatch(expr, -1) {
		if !c.vars[v[1]] {
			t.Errorf("%s: uses $%s, which is not defined here", where, v[1])
		}
	}
	allowed := map[string]bool{"job": true, "instance": true}
	refs := metricRefRE.FindAllStringSubmatch(expr, -1)
	if len(refs) == 0 {
		t.Errorf("%s: queries no Orderly metric: %s", where, expr)
	}
	for _, ref := range refs {
		fam := ex.metricOf(ref[1])
		if fam == "" {
			t.Errorf("%s: queries %s, which Orderly does not export", where, ref[1])
			continue
		}
		if c.used != nil {
			c.used[fam] = true
		}
		for l := range ex.labels[fam] {
			allowed[l] = true
		}
		if fam != ref[1] && strings.HasSuffix(ref[1], "_bucket") {
			allowed["le"] = true
		}
		sel := ref[2]
		if c.filtered && (!strings.Contains(sel, `job=~"$job"`) || !strings.Contains(sel, `instance=~"$instance"`)) {
			t.Errorf("%s: %s%s is not filtered by job=~\"$job\" and instance=~\"$instance\"", where, ref[1], sel)
		}
		for _, m := range matcherRE.FindAllStringSubmatch(sel, -1) {
			if m[1] != "job" && m[1] != "instance" && !ex.labels[fam][m[1]] {
				t.Errorf("%s: %s has no label %q", where, ref[1], m[1])
			}
		}
	}
	for _, by := range byRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(by[1], ",") {
			if l = strings.TrimSpace(l); l != "" && !allowed[l] {
				t.Errorf("%s: groups by %q, which none of its metrics has (%v)", where, l, keys(allowed))
			}
		}
	}
}

// aggRE is an aggregation with its optional leading by/without clause.
var aggRE = regexp.MustCompile(`\b(?:sum|min|max|avg|group|count|stddev|stdvar)\s*(?:(by|without)\s*\(([^)]*)\))?\s*\(`)

// resultLabels approximates the labels of expr's result series: those of
// its metrics plus job and instance, narrowed by every aggregation (an
// aggregation without by keeps none). Alert annotations may use these as
// $labels.
func (c promQL) resultLabels(expr string) map[string]bool {
	out := map[string]bool{"job": true, "instance": true}
	for _, ref := range metricRefRE.FindAllStringSubmatch(expr, -1) {
		for l := range c.ex.labels[c.ex.metricOf(ref[1])] {
			out[l] = true
		}
	}
	for _, a := range aggRE.FindAllStringSubmatch(expr, -1) {
		listed := map[string]bool{}
		for _, l := range strings.Split(a[2], ",") {
			listed[strings.TrimSpace(l)] = true
		}
		for l := range out {
			if a[1] == "" || (a[1] == "by") != listed[l] {
				delete(out, l)
			}
		}
	}
	return out
}

func TestDashboardQueriesExportedMetrics(t *testing.T) {
	raw := readFile(t, "grafana/orderly-dashboard.json")
	var dash struct {
		UID        string `json:"uid"`
		Title      string `json:"title"`
		Templating struct {
			List []struct {
				Name string `json:"name"`
			} `json:"list"`
		} `json:"templating"`
		Annotations struct {
			List []struct {
				Expr string `json:"expr"`
			} `json:"list"`
		} `json:"annotations"`
		Panels []dashPanel `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("orderly-dashboard.json: %v", err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Errorf("the dashboard needs a uid and a title")
	}
	vars := map[string]bool{"__rate_interval": true, "__interval": true, "__range": true}
	for _, v := range dash.Templating.List {
		vars[v.Name] = true
	}
	ex := exportedMetrics(t)

	var panels []dashPanel
	for _, p := range dash.Panels {
		panels = append(panels, p)
		panels = append(panels, p.Panels...)
	}
	used := map[string]bool{}
	ids := map[int]string{}
	check := promQL{t: t, ex: ex, vars: vars, filtered: true, used: used}
	checkExpr := func(where, expr string) { check.check(where, expr) }
	for _, a := range dash.Annotations.List {
		if a.Expr != "" {
			checkExpr("annotation", a.Expr)
		}
	}
	type rect struct {
		title      string
		x, y, w, h int
	}
	var rects []rect
	for _, p := range panels {
		where := fmt.Sprintf("panel %d %q", p.ID, p.Title)
		if other, dup := ids[p.ID]; dup || p.ID == 0 {
			t.Errorf("%s: id not unique (also %q)", where, other)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("%s: gridPos %+v outside the 24-column grid", where, g)
		}
		for _, r := range rects {
			if g.X < r.x+r.w && r.x < g.X+g.W && g.Y < r.y+r.h && r.y < g.Y+g.H {
				t.Errorf("%s overlaps panel %q", where, r.title)
			}
		}
		rects = append(rects, rect{p.Title, g.X, g.Y, g.W, g.H})
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("%s: want datasource ${datasource}", where)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: no queries", where)
		}
		for _, tg := range p.Targets {
			checkExpr(where, tg.Expr)
		}
	}
	// What the dashboard must show at least.
	for _, name := range []string{"orderly_messages_total", "orderly_http_requests_total", "orderly_http_request_duration_seconds",
		"orderly_http_retries_total", "orderly_breaker_state", "orderly_partition_in_flight", "orderly_partition_paused",
		"orderly_committed_offset", "orderly_consumer_lag", "orderly_active_lanes", "orderly_dlq_produced_total",
		"orderly_dlq_errors_total", "orderly_rebalances_total", "orderly_partition_span_offsets",
		"orderly_partition_oldest_unfinished_seconds", "orderly_http_attempts_uncounted_total", "orderly_dlq_failing",
		"orderly_dlq_truncated_total", "orderly_commit_metadata_refused_total", "orderly_producer_restarts_total"} {
		if !used[name] {
			t.Errorf("no panel shows %s", name)
		}
	}
	// The panels an operator looks for when an alert of
	// prometheus/alerts.yml fires, by title.
	byTitle := map[string]dashPanel{}
	for _, p := range panels {
		byTitle[p.Title] = p
	}
	for title, metrics := range map[string][]string{
		"Oldest unfinished message (age) per partition": {"orderly_partition_oldest_unfinished_seconds"},
		"Offset span per partition":                     {"orderly_partition_span_offsets"},
		"Attempts not counted (target down)":            {"orderly_http_attempts_uncounted_total"},
		"DLQ health":                                    {"orderly_dlq_failing", "orderly_dlq_truncated_total", "orderly_producer_restarts_total"},
	} {
		p, ok := byTitle[title]
		if !ok {
			t.Errorf("no panel %q", title)
			continue
		}
		for _, m := range metrics {
			found := false
			for _, tg := range p.Targets {
				found = found || strings.Contains(tg.Expr, m+"{")
			}
			if !found {
				t.Errorf("panel %q does not query %s", title, m)
			}
		}
	}
	// The span panel marks where a partition pauses by default.
	maxSpan := float64(config.Defaults().Dispatch.MaxSpan)
	if th := byTitle["Offset span per partition"].FieldConfig.Defaults.Thresholds; th == nil || !slices.ContainsFunc(th.Steps,
		func(s struct {
			Value *float64 `json:"value"`
		}) bool {
			return s.Value != nil && *s.Value == maxSpan
		}) {
		t.Errorf("panel \"Offset span per partition\": no threshold at dispatch.max_span's default %v", maxSpan)
	}
	var unused []string
	for name := range ex.labels {
		if strings.HasPrefix(name, "orderly_") && !used[name] {
			unused = append(unused, name)
		}
	}
	if len(unused) > 0 {
		sort.Strings(unused)
		t.Errorf("exported but on no panel: %v", unused)
	}
}

// ------------------------------------------------------ Prometheus alerts

// alertsFile is the alerting rules file prometheus.yml loads.
const alertsFile = "prometheus/alerts.yml"

// ruleFile is the structure of a Prometheus rules file; unknown keys are
// errors (decoded with KnownFields).
type ruleFile struct {
	Groups []struct {
		Name     string `yaml:"name"`
		Interval string `yaml:"interval"`
		Limit    int    `yaml:"limit"`
		Rules    []struct {
			Alert         string            `yaml:"alert"`
			Record        string            `yaml:"record"`
			Expr          string            `yaml:"expr"`
			For           string            `yaml:"for"`
			KeepFiringFor string            `yaml:"keep_firing_for"`
			Labels        map[string]string `yaml:"labels"`
			Annotations   map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// promDurationRE is a Prometheus duration ("5m", "1h30m", "0s").
var promDurationRE = regexp.MustCompile(`^(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?$`)

func TestAlertRules(t *testing.T) {
	var rf ruleFile
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, alertsFile)))
	dec.KnownFields(true)
	if err := dec.Decode(&rf); err != nil {
		t.Fatalf("%s: not a Prometheus rules file: %v", alertsFile, err)
	}
	if len(rf.Groups) == 0 {
		t.Fatalf("%s: no groups", alertsFile)
	}
	ex := exportedMetrics(t)
	check := promQL{t: t, ex: ex, used: map[string]bool{}}
	type alert struct{ expr, for_, description string }
	alerts := map[string]alert{}
	groups := map[string]bool{}
	labelRefRE := regexp.MustCompile(`\$labels\.(\w+)`)
	for _, g := range rf.Groups {
		if g.Name == "" || groups[g.Name] {
			t.Errorf("%s: group name %q empty or not unique", alertsFile, g.Name)
		}
		groups[g.Name] = true
		if g.Interval != "" && !promDurationRE.MatchString(g.Interval) {
			t.Errorf("group %s: interval %q is not a Prometheus duration", g.Name, g.Interval)
		}
		if len(g.Rules) == 0 {
			t.Errorf("group %s: no rules", g.Name)
		}
		for i, r := range g.Rules {
			where := fmt.Sprintf("group %s rule %d (%s)", g.Name, i, r.Alert)
			if r.Alert == "" || r.Record != "" {
				t.Errorf("%s: want an alerting rule (alert, not record)", where)
				continue
			}
			if !regexp.MustCompile(`^Orderly[A-Z][A-Za-z0-9]*$`).MatchString(r.Alert) {
				t.Errorf("%s: alert names are OrderlyCamelCase", where)
			}
			if _, dup := alerts[r.Alert]; dup {
				t.Errorf("%s: alert %s defined twice", where, r.Alert)
			}
			alerts[r.Alert] = alert{strings.Join(strings.Fields(r.Expr), " "), r.For, r.Annotations["description"]}
			if strings.TrimSpace(r.Expr) == "" {
				t.Errorf("%s: no expr", where)
				continue
			}
			check.check(where, r.Expr)
			if r.For == "" || !promDurationRE.MatchString(r.For) {
				t.Errorf("%s: for %q, want a Prometheus duration", where, r.For)
			}
			if r.KeepFiringFor != "" && !promDurationRE.MatchString(r.KeepFiringFor) {
				t.Errorf("%s: keep_firing_for %q, want a Prometheus duration", where, r.KeepFiringFor)
			}
			if sev := r.Labels["severity"]; sev != "critical" && sev != "warning" && sev != "info" {
				t.Errorf("%s: labels.severity %q, want critical, warning or info", where, sev)
			}
			for _, a := range []string{"summary", "description"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("%s: no %s annotation", where, a)
				}
			}
			// Templates: balanced, and $labels only those the result
			// series carry.
			have := check.resultLabels(r.Expr)
			for name, text := range r.Annotations {
				if strings.Count(text, "{{") != strings.Count(text, "}}") {
					t.Errorf("%s: annotation %s: unbalanced {{ }}", where, name)
				}
				for _, m := range labelRefRE.FindAllStringSubmatch(text, -1) {
					if !have[m[1]] {
						t.Errorf("%s: annotation %s uses $labels.%s, which the expression's series do not carry (%v)",
							where, name, m[1], keys(have))
					}
				}
			}
		}
	}

	// The alerts operators rely on, as documented in README.md.
	for _, w := range []struct {
		name, for_ string
		expr       []string // substrings of the expression, spaces normalised
		desc       []string // substrings of the description
	}{
		{"OrderlyStuckKey", "5m", []string{"orderly_partition_oldest_unfinished_seconds", "> 300"}, nil},
		{"OrderlySpanNearLimit", "10m", []string{"orderly_partition_span_offsets", "> 800000"}, []string{"dispatch.max_span"}},
		{"OrderlyDLQFailing", "2m", []string{"orderly_dlq_failing", "== 1"}, nil},
		{"OrderlyCommitMetadataRefused", "", []string{"increase(orderly_commit_metadata_refused_total[15m])", "> 0"},
			[]string{"dispatch.commit_metadata_max_bytes"}},
		{"OrderlyProducerRestarted", "", []string{"increase(orderly_producer_restarts_total[15m])", "> 0"}, nil},
	} {
		a, ok := alerts[w.name]
		if !ok {
			t.Errorf("%s: no alert %s", alertsFile, w.name)
			continue
		}
		if w.for_ != "" && a.for_ != w.for_ {
			t.Errorf("%s: for %q, want %q", w.name, a.for_, w.for_)
		}
		for _, sub := range w.expr {
			if !strings.Contains(a.expr, sub) {
				t.Errorf("%s: expr %q, want it to contain %q", w.name, a.expr, sub)
			}
		}
		for _, sub := range w.desc {
			if !strings.Contains(a.description, sub) {
				t.Errorf("%s: the description does not mention %s", w.name, sub)
			}
		}
	}
	// The span alert fires before the partitions of the deployed
	// configurations pause, and above where they resume.
	if m := regexp.MustCompile(`> (\d+)`).FindStringSubmatch(alerts["OrderlySpanNearLimit"].expr); m != nil {
		threshold, _ := strconv.ParseInt(m[1], 10, 64)
		for name, src := range map[string][]byte{"orderly.toml": readFile(t, "orderly.toml"), "kubernetes/configmap.yaml": configMapTOML(t)} {
			if ms := loadOrderly(t, name, src).Dispatch.MaxSpan; threshold >= ms || threshold <= ms/2 {
				t.Errorf("OrderlySpanNearLimit fires above %d offsets; %s's dispatch.max_span is %d: want it between half of it and it",
					threshold, name, ms)
			}
		}
	}
}

// TestPrometheusLoadsAlertRules checks that prometheus.yml names the rules
// file, that docker-compose.yml mounts it where that name resolves, and
// that the Prometheus Operator's copy holds the same groups.
func TestPrometheusLoadsAlertRules(t *testing.T) {
	var prom struct {
		RuleFiles []string `yaml:"rule_files"`
	}
	decodeYAML(t, "prometheus/prometheus.yml", &prom)
	found := false
	for _, rf := range prom.RuleFiles {
		// Relative to the configuration's directory, as Prometheus and
		// promtool resolve them; an absolute path would not exist here.
		if filepath.IsAbs(rf) {
			t.Errorf("prometheus.yml rule_files: %q, want a path relative to prometheus.yml", rf)
			continue
		}
		local := filepath.Join("prometheus", rf)
		if m, err := filepath.Glob(local); err != nil || len(m) == 0 {
			t.Errorf("prometheus.yml rule_files: %q matches no file (%s)", rf, local)
		}
		found = found || filepath.ToSlash(local) == alertsFile
	}
	if !found {
		t.Errorf("prometheus.yml rule_files %v does not load %s", prom.RuleFiles, alertsFile)
	}

	var c composeFile
	decodeYAML(t, "docker-compose.yml", &c)
	svc, ok := c.Services["prometheus"]
	if !ok {
		t.Fatalf("docker-compose.yml: no prometheus service")
	}
	mounts := map[string]string{} // source -> target
	for _, v := range svc.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) >= 2 {
			mounts[path.Clean(parts[0])] = parts[1]
		}
	}
	cfgAt, ok := mounts["prometheus/prometheus.yml"]
	if !ok {
		t.Fatalf("prometheus service volumes %v: prometheus.yml is not mounted", svc.Volumes)
	}
	for _, rf := range prom.RuleFiles {
		if filepath.IsAbs(rf) {
			continue
		}
		want := path.Join(path.Dir(cfgAt), rf)
		if got := mounts[path.Join("prometheus", rf)]; got != want {
			t.Errorf("prometheus service: ./prometheus/%s is mounted at %q, want %s (next to %s)", rf, got, want, cfgAt)
		}
	}

	// kubernetes/prometheus-operator/prometheusrule.yaml: spec.groups is
	// alerts.yml's groups.
	const crFile = "kubernetes/prometheus-operator/prometheusrule.yaml"
	var cr struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Spec       struct {
			Groups any `yaml:"groups"`
		} `yaml:"spec"`
	}
	decodeYAML(t, crFile, &cr)
	var rules struct {
		Groups any `yaml:"groups"`
	}
	decodeYAML(t, alertsFile, &rules)
	if cr.APIVersion != "monitoring.coreos.com/v1" || cr.Kind != "PrometheusRule" {
		t.Errorf("%s: %s %s, want a monitoring.coreos.com/v1 PrometheusRule", crFile, cr.APIVersion, cr.Kind)
	}
	if rules.Groups == nil || !reflect.DeepEqual(cr.Spec.Groups, rules.Groups) {
		t.Errorf("%s: spec.groups differs from %s: copy the groups over (indented under spec:)", crFile, alertsFile)
	}
}

// TestPromtoolAcceptsRules runs promtool over the rules and the
// configuration (skipped without promtool, unless ORDERLY_E2E=1).
func TestPromtoolAcceptsRules(t *testing.T) {
	pt, err := exec.LookPath("promtool")
	if err != nil {
		const how = "promtool is not installed (Debian: apt-get install prometheus; or " +
			"go install github.com/prometheus/prometheus/cmd/promtool@latest)"
		if os.Getenv("ORDERLY_E2E") == "1" {
			t.Fatal(how + " and ORDERLY_E2E=1 requires it")
		}
		t.Skip(how + "; set ORDERLY_E2E=1 to make this a failure")
	}
	for _, args := range [][]string{
		{"check", "rules", alertsFile},
		// Also loads rule_files, relative to prometheus.yml.
		{"check", "config", "prometheus/prometheus.yml"},
	} {
		out, err := exec.Command(pt, args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestHAProxyConfigServes runs haproxy/haproxy.cfg for real, with the compose
// names and ports swapped for local ones: requests on new connections
// alternate between the two targets, and the stats port serves the stats
// page and Prometheus metrics.
func TestHAProxyConfigServes(t *testing.T) {
	hp, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("ORDERLY_E2E") == "1" {
			t.Fatal("haproxy is not installed and ORDERLY_E2E=1 requires it (apt-get install haproxy)")
		}
		t.Skip("haproxy is not installed (apt-get install haproxy); set ORDERLY_E2E=1 to make this a failure")
	}
	var hits [2]atomic.Int64
	var addrs [2]string
	for i := range hits {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits[i].Add(1)
			fmt.Fprintf(w, "target%d", i+1)
		}))
		t.Cleanup(srv.Close)
		addrs[i] = strings.TrimPrefix(srv.URL, "http://")
	}
	free := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	front, stats := free(), free()
	cfg := strings.NewReplacer(
		"bind :8080", "bind "+front,
		"bind :8404", "bind "+stats,
		"target1:8081", addrs[0],
		"target2:8081", addrs[1],
	).Replace(string(readFile(t, "haproxy/haproxy.cfg")))
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command(hp, "-db", "-f", path)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("haproxy output:\n%s", out.String())
		}
	})
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(u string) (string, error) {
		resp, err := client.Get(u)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("status %s", resp.Status)
		}
		return string(b), err
	}
	// Wait until both servers passed their first health check.
	deadline := time.Now().Add(15 * time.Second)
	for {
		body, err := get("http://" + stats + "/metrics")
		if err == nil && strings.Contains(body, `haproxy_server_status{proxy="targets",server="target1",state="UP"} 1`) &&
			strings.Contains(body, `haproxy_server_status{proxy="targets",server="target2",state="UP"} 1`) {
			break
		}
		select {
		case <-exited:
			t.Fatalf("haproxy exited:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy did not report both targets UP within 15s (last error %v)", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i := 0; i < 20; i++ {
		if _, err := get("http://" + front + "/orders/k"); err != nil {
			t.Fatalf("request %d through haproxy: %v", i, err)
		}
	}
	if a, b := hits[0].Load(), hits[1].Load(); a != 10 || b != 10 {
		t.Errorf("round robin over new connections: target1 %d, target2 %d requests, want 10 each", a, b)
	}
	if body, err := get("http://" + stats + "/"); err != nil || !strings.Contains(body, "targets") {
		t.Errorf("stats page: %v", err)
	}
}

// parseBytes reads a byte quantity as Kubernetes ("1Gi", "512Mi") and Go's
// GOMEMLIMIT ("900MiB", "1073741824") write it.
func parseBytes(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"Gi", 1 << 30}, {"Mi", 1 << 20}, {"Ki", 1 << 10}, {"B", 1}}
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			n, err := strconv.ParseInt(strings.TrimSuffix(s, u.suffix), 10, 64)
			return n * u.mult, err
		}
	}
	return strconv.ParseInt(s, 10, 64)
}
