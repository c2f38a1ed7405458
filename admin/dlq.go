package admin

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"

	"github.com/orderly-dispatch/orderly/dispatcher"
)

// DLQ is what the /dlq/ endpoints need; *dispatcher.DLQAdmin implements it.
type DLQ interface {
	List(ctx context.Context, f dispatcher.DLQFilter) ([]dispatcher.DLQRecord, error)
	StartReplay(req dispatcher.ReplayRequest) (string, error)
	Job(id string) (dispatcher.ReplayJob, bool)
}

const maxListLimit = 1000

// dlqRoutes registers the bearer-protected /dlq/ endpoints.
func (s *Server) dlqRoutes(mux *http.ServeMux) {
	mux.Handle("GET /dlq/messages", s.auth(http.HandlerFunc(s.listDLQ)))
	mux.Handle("POST /dlq/replay", s.auth(http.HandlerFunc(s.startReplay)))
	mux.Handle("GET /dlq/replay/{id}", s.auth(http.HandlerFunc(s.replayStatus)))
	mux.Handle("/dlq/", s.auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		WriteError(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path)
	})))
}

// auth checks Authorization: Bearer <admin.token> in constant time. With
// no token configured (allowed only on loopback) every request passes.
func (s *Server) auth(next http.Handler) http.Handler {
	want := []byte(s.o.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(want) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), want) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="orderly"`)
				WriteError(w, http.StatusUnauthorized, "missing or wrong bearer token")
				return
			}
		}
		if s.o.DLQ == nil {
			WriteError(w, http.StatusNotFound, "the dead-letter topic is disabled (dlq.topic is empty)")
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) listDLQ(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := dispatcher.DLQFilter{Partition: -1, To: -1, Limit: 100, Route: q.Get("route"), Key: q.Get("key")}
	var bad []string
	intParam := func(name string, dst *int64) {
		if v := q.Get(name); v != "" {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				bad = append(bad, name+" must be a non-negative integer")
				return
			}
			*dst = n
		}
	}
	var part, limit, to int64 = -1, int64(f.Limit), -1
	intParam("partition", &part)
	intParam("from", &f.From)
	intParam("to", &to)
	intParam("limit", &limit)
	if len(bad) > 0 {
		WriteError(w, http.StatusBadRequest, strings.Join(bad, "; "))
		return
	}
	if limit < 1 || limit > maxListLimit {
		WriteError(w, http.StatusBadRequest, "limit must be between 1 and "+strconv.Itoa(maxListLimit))
		return
	}
	f.Partition, f.Limit = int32(part), int(limit)
	if to >= 0 {
		f.To = to + 1
	}
	recs, err := s.o.DLQ.List(r.Context(), f)
	if err != nil {
		WriteError(w, http.StatusBadGateway, "reading the DLQ: "+err.Error())
		return
	}
	if recs == nil {
		recs = []dispatcher.DLQRecord{}
	}
	out := map[string]any{"messages": recs, "count": len(recs)}
	if len(recs) == f.Limit {
		last := recs[len(recs)-1]
		out["next"] = map[string]int64{"partition": int64(last.Partition), "from": last.Offset + 1}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) startReplay(w http.ResponseWriter, r *http.Request) {
	var req dispatcher.ReplayRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		WriteError(w, http.StatusBadRequest, "invalid replay request: "+err.Error())
		return
	}
	switch {
	case req.Limit < 0:
		WriteError(w, http.StatusBadRequest, "limit must not be negative")
		return
	case req.FromOffset != nil && req.ToOffset != nil && *req.ToOffset < *req.FromOffset:
		WriteError(w, http.StatusBadRequest, "to_offset is before from_offset")
		return
	case req.Partition != nil && *req.Partition < 0:
		WriteError(w, http.StatusBadRequest, "partition must not be negative")
		return
	}
	id, err := s.o.DLQ.StartReplay(req)
	switch {
	case errors.Is(err, dispatcher.ErrReplayRunning):
		WriteError(w, http.StatusConflict, err.Error())
	case err != nil:
		WriteError(w, http.StatusInternalServerError, err.Error())
	default:
		w.Header().Set("Location", "/dlq/replay/"+id)
		writeJSON(w, http.StatusAccepted, map[string]string{"id": id, "status": "/dlq/replay/" + id})
	}
}

func (s *Server) replayStatus(w http.ResponseWriter, r *http.Request) {
	job, ok := s.o.DLQ.Job(r.PathValue("id"))
	if !ok {
		WriteError(w, http.StatusNotFound, "no replay job "+r.PathValue("id"))
		return
	}
	writeJSON(w, http.StatusOK, job)
}
