// Command sinkserver is the test sink as a standalone HTTP server, for
// end-to-end scripts and process tests: it records every event it receives
// and reports on GET /stats how many arrived, whether per-key order held and
// whether a key ever had two requests in flight ("concurrent").
//
//	sinkserver -listen 127.0.0.1:8081 [-latency 5ms] [-fail-rate 0.1] [-reject user-3:4,...]
//
// -reject answers 400 to the events listed (key:seq) until POST /fix: a
// target that rejects one message, then is fixed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "address to serve on")
	latency := flag.Duration("latency", 0, "time taken per request")
	failRate := flag.Float64("fail-rate", 0, "share of requests answered 503")
	reject := flag.String("reject", "", "events answered 400 until POST /fix, as key:seq,key:seq")
	flag.Parse()

	sink := testkit.NewSink()
	if *latency > 0 {
		sink.Delay = func(*testkit.Delivery) time.Duration { return *latency }
	}
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(7, 7))
	rejected := map[string]bool{}
	if *reject != "" {
		for _, ev := range strings.Split(*reject, ",") {
			rejected[strings.TrimSpace(ev)] = true
		}
	}
	sink.Status = func(d *testkit.Delivery) int {
		mu.Lock()
		defer mu.Unlock()
		if rejected[fmt.Sprintf("%s:%d", d.Key, d.Seq)] {
			return http.StatusBadRequest
		}
		if *failRate > 0 && rng.Float64() < *failRate {
			return http.StatusServiceUnavailable
		}
		return 0
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		// ?expect=key-0:100,key-1:100 checks order against 0..n-1 per key.
		out := map[string]any{
			"requests": sink.Requests(), "delivered": sink.Delivered(), "distinct": sink.Distinct(),
		}
		if exp := r.URL.Query().Get("expect"); exp != "" {
			want := map[string][]int64{}
			for _, kv := range strings.Split(exp, ",") {
				var k string
				var n int64
				i := strings.LastIndexByte(kv, ':')
				if i < 0 {
					http.Error(w, "expect: key:count,...", http.StatusBadRequest)
					return
				}
				k = kv[:i]
				if _, err := fmt.Sscan(kv[i+1:], &n); err != nil {
					http.Error(w, "expect: "+err.Error(), http.StatusBadRequest)
					return
				}
				for q := int64(0); q < n; q++ {
					want[k] = append(want[k], q)
				}
			}
			rep := sink.Check(want)
			out["missing"], out["duplicates"], out["violations"], out["first_violation"] = rep.Missing, rep.Duplicates, rep.Violations, rep.First
			out["concurrent"], out["first_concurrent"] = rep.Concurrent, rep.FirstConcurrent
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("POST /fix", func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		clear(rejected)
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.Handle("/", sink)
	srv := &http.Server{Addr: *listen, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	select {
	case err := <-errc:
		fmt.Fprintln(os.Stderr, "sinkserver:", err)
		os.Exit(1)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
}
