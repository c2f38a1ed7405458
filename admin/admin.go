// Package admin serves Orderly's admin HTTP API: liveness, readiness for
// load-balancer health checks, and Prometheus metrics. Errors are JSON:
// {"error": "..."}.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Options configures a Server.
type Options struct {
	// Listen is the host:port to listen on.
	Listen string
	// Ready reports whether the service should receive traffic (/readyz).
	Ready func() bool
	// Problems, if set, lists what fails although the service is up
	// (failing DLQ writes): /readyz reports them without changing its status.
	Problems func() []string
	// Metrics is exported on /metrics.
	Metrics *telemetry.Metrics
	// Token guards /dlq/* (Authorization: Bearer <token>).
	Token string
	// DLQ serves /dlq/*; nil when the DLQ is disabled.
	DLQ    DLQ
	Logger *slog.Logger
}

// Server is the admin HTTP server.
type Server struct {
	o   Options
	ln  net.Listener
	srv *http.Server
}

// Listen binds the admin address so that a bad address fails start-up
// before anything else runs.
func Listen(o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Token == "" && o.DLQ != nil && !config.Loopback(o.Listen) {
		return nil, fmt.Errorf("admin: refusing to serve /dlq/* on %s without admin.token: set a token or listen on a loopback address", o.Listen)
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin: unable to listen on %s: %w", o.Listen, err)
	}
	s := &Server{o: o, ln: ln}
	s.srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	return s, nil
}

// Addr returns the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Handler returns the admin API's handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		body := map[string]any{"status": "ready"}
		status := http.StatusOK
		if s.o.Ready == nil || !s.o.Ready() {
			body["status"], status = "not ready", http.StatusServiceUnavailable
		}
		if s.o.Problems != nil {
			if ps := s.o.Problems(); len(ps) > 0 {
				body["problems"] = ps
			}
		}
		writeJSON(w, status, body)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.o.Metrics.Registry, promhttp.HandlerOpts{}))
	s.dlqRoutes(mux)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path)
	})
	return mux
}

// Serve serves until ctx ends, then shuts down gracefully.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("admin: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(sctx)
	if serr := <-errc; serr != nil && !errors.Is(serr, http.ErrServerClosed) && err == nil {
		err = serr
	}
	return err
}

// WriteError writes {"error": msg} with the given status.
func WriteError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
