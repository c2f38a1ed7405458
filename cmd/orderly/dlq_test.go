package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/service"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestDLQCommands drives `orderly dlq list|replay|status` against a running
// service's admin API.
func TestDLQCommands(t *testing.T) {
	sink := testkit.NewSink()
	var reject atomic.Bool
	reject.Store(true)
	sink.Status = func(*testkit.Delivery) int {
		if reject.Load() {
			return http.StatusBadRequest
		}
		return 0
	}
	srv := httptest.NewServer(sink)
	defer srv.Close()
	admin := testkit.FreeAddr(t)
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
group_id = "dlqcli"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 1
[dispatch]
commit_interval = "100ms"
[admin]
listen = %q
token = "tok"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/p/{{ .Key }}"
`, admin, srv.URL)), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler), "test")
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	defer func() { cancel(); <-done }()
	prod, err := testkit.NewProducer(svc.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	gen := &testkit.Generator{Keys: 3}
	if err := prod.Produce(context.Background(), "orders", gen.Records(6)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "6 dead letters", func() bool { return svc.Metrics().Sum("orderly_dlq_produced_total") >= 6 })

	t.Setenv("ORDERLY_ADMIN_TOKEN", "tok")
	var out, errb bytes.Buffer
	if code := run([]string{"dlq", "list", "--admin", admin, "--key", "key-1"}, &out, &errb); code != 0 {
		t.Fatalf("dlq list: exit %d: %s", code, errb.String())
	}
	var list struct{ Count int }
	if err := json.Unmarshal(out.Bytes(), &list); err != nil || list.Count != 2 {
		t.Fatalf("dlq list: %v, %s", err, out.String())
	}
	reject.Store(false)
	out.Reset()
	if code := run([]string{"dlq", "replay", "--admin", admin, "--wait"}, &out, &errb); code != 0 {
		t.Fatalf("dlq replay: exit %d: %s", code, errb.String())
	}
	if !strings.Contains(out.String(), `"replayed": 6`) {
		t.Fatalf("dlq replay --wait output: %s", out.String())
	}
	if rep := sink.Check(gen.Expected()); !rep.OK() {
		t.Fatal(rep)
	}
	out.Reset()
	errb.Reset()
	if code := run([]string{"dlq", "status", "--admin", admin, "--token", "wrong", "nope"}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "401") {
		t.Fatalf("dlq status with a wrong token: exit %d: %s", code, errb.String())
	}
}
