package admin

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/orderly-dispatch/orderly/dlq"
)

// DLQ is what the /dlq/ endpoints need; *dlq.Admin implements it.
type DLQ interface {
	List(ctx context.Context, f dlq.Filter) (dlq.Page, error)
	StartReplay(req dlq.ReplayRequest) (string, error)
	StartRelease(req dlq.ReplayRequest) (string, error)
	Job(id string) (dlq.ReplayJob, bool)
	Jobs() []dlq.ReplayJob
	Cancel(id string) (dlq.ReplayJob, error)
	// JobsLoaded reports whether the jobs topic is loaded (Job and Jobs
	// know nothing before).
	JobsLoaded() bool
}

const maxListLimit = 1000

// dlqRoutes registers the bearer-protected /dlq/ endpoints.
func (s *Server) dlqRoutes(mux *http.ServeMux) {
	mux.Handle("GET /dlq/messages", s.auth(http.HandlerFunc(s.listDLQ)))
	mux.Handle("POST /dlq/replay", s.auth(s.startJob(dlq.JobReplay)))
	mux.Handle("POST /dlq/release", s.auth(s.startJob(dlq.JobRelease)))
	mux.Handle("GET /dlq/replay", s.auth(s.jobsLoaded(s.listJobs)))
	mux.Handle("GET /dlq/replay/{id}", s.auth(s.jobsLoaded(s.replayStatus)))
	mux.Handle("DELETE /dlq/replay/{id}", s.auth(http.HandlerFunc(s.cancelJob)))
	allowed := map[string]string{"/dlq/messages": "GET", "/dlq/replay": "GET, POST", "/dlq/release": "POST"}
	unknown := s.auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		allow, ok := allowed[r.URL.Path]
		if rest, found := strings.CutPrefix(r.URL.Path, "/dlq/replay/"); found && rest != "" && !strings.Contains(rest, "/") {
			allow, ok = "GET, DELETE", true
		}
		if ok {
			w.Header().Set("Allow", allow)
			WriteError(w, http.StatusMethodNotAllowed, r.Method+" is not allowed on "+r.URL.Path+" (allowed: "+allow+")")
			return
		}
		WriteError(w, http.StatusNotFound, "no such endpoint: "+r.Method+" "+r.URL.Path)
	}))
	mux.Handle("/dlq/", unknown)
	mux.Handle("/dlq", unknown) // not the mux's redirect to /dlq/, which is not JSON
}

// jobsLoaded serves next once the jobs topic is loaded, 503 before (Job
// and Jobs know no job until then).
func (s *Server) jobsLoaded(next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.o.DLQ.JobsLoaded() {
			WriteError(w, http.StatusServiceUnavailable, dlq.ErrJobsNotReady.Error())
			return
		}
		next(w, r)
	})
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

// listDLQ serves GET /dlq/messages: a page of DLQ records across every
// partition (or one). "next" says where the next page starts and
// "next_page" is the request for it (cursor=<partition>:<offset>).
func (s *Server) listDLQ(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := dlq.Filter{Partition: -1, To: -1, Limit: 100, Route: q.Get("route"), Key: q.Get("key")}
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
	if v := q.Get("cursor"); v != "" {
		ps, offs, ok := strings.Cut(v, ":")
		p, err1 := strconv.ParseInt(ps, 10, 32)
		o, err2 := strconv.ParseInt(offs, 10, 64)
		if !ok || err1 != nil || err2 != nil || p < 0 || o < 0 {
			bad = append(bad, "cursor must be <partition>:<offset>, as in next_page")
		} else {
			f.Cursor = &dlq.Position{Partition: int32(p), From: o}
		}
	}
	if part > 1<<31-1 {
		bad = append(bad, "partition is out of range")
	}
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
	if f.Cursor != nil && f.Partition >= 0 && f.Cursor.Partition != f.Partition {
		WriteError(w, http.StatusBadRequest, "cursor is in another partition than partition")
		return
	}
	page, err := s.o.DLQ.List(r.Context(), f)
	if err != nil {
		WriteError(w, http.StatusBadGateway, "reading the DLQ: "+err.Error())
		return
	}
	recs := page.Records
	if recs == nil {
		recs = []dlq.Record{}
	}
	out := map[string]any{"messages": recs, "count": len(recs)}
	if n := page.Next; n != nil {
		out["next"] = map[string]int64{"partition": int64(n.Partition), "from": n.From}
		q.Set("cursor", strconv.Itoa(int(n.Partition))+":"+strconv.FormatInt(n.From, 10))
		out["next_page"] = "/dlq/messages?" + q.Encode()
	}
	writeJSON(w, http.StatusOK, out)
}

// startJob serves POST /dlq/replay and POST /dlq/release: 202 and the id
// of the job queued (in the jobs topic: whichever instance owns it runs
// it), 409 while another one is queued or runs, 503 while the jobs topic
// is not loaded yet.
func (s *Server) startJob(kind string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req dlq.ReplayRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			WriteError(w, http.StatusBadRequest, "invalid "+kind+" request: "+err.Error())
			return
		}
		if dec.More() {
			WriteError(w, http.StatusBadRequest, "invalid "+kind+" request: more than one JSON value")
			return
		}
		start := s.o.DLQ.StartReplay
		if kind == dlq.JobRelease {
			start = s.o.DLQ.StartRelease
		}
		id, err := start(req)
		switch {
		case errors.Is(err, dlq.ErrBadRequest):
			WriteError(w, http.StatusBadRequest, err.Error())
		case errors.Is(err, dlq.ErrReplayRunning):
			WriteError(w, http.StatusConflict, err.Error())
		case errors.Is(err, dlq.ErrJobsNotReady), errors.Is(err, dlq.ErrJobUnsure):
			WriteError(w, http.StatusServiceUnavailable, err.Error())
		case err != nil:
			WriteError(w, http.StatusInternalServerError, err.Error())
		default:
			status := "/dlq/replay/" + url.PathEscape(id)
			w.Header().Set("Location", status)
			writeJSON(w, http.StatusAccepted, map[string]string{"id": id, "kind": kind, "status": status})
		}
	})
}

// listJobs serves GET /dlq/replay: the jobs kept, newest first, as the
// jobs topic shows them on this instance.
func (s *Server) listJobs(w http.ResponseWriter, _ *http.Request) {
	jobs := s.o.DLQ.Jobs()
	writeJSON(w, http.StatusOK, map[string]any{"jobs": jobs, "count": len(jobs)})
}

func (s *Server) replayStatus(w http.ResponseWriter, r *http.Request) {
	job, ok := s.o.DLQ.Job(r.PathValue("id"))
	if !ok {
		WriteError(w, http.StatusNotFound, "no job "+r.PathValue("id"))
		return
	}
	writeJSON(w, http.StatusOK, job)
}

// cancelJob serves DELETE /dlq/replay/{id}: 202 and the job, now
// "cancelling" (the cancel request is written to the jobs topic; the
// instance running the job stops it); 404 for an unknown job, 409 for one
// that has finished.
func (s *Server) cancelJob(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	job, err := s.o.DLQ.Cancel(id)
	switch {
	case errors.Is(err, dlq.ErrNoJob):
		WriteError(w, http.StatusNotFound, "no job "+id)
	case errors.Is(err, dlq.ErrJobFinished):
		WriteError(w, http.StatusConflict, "job "+id+" has already finished ("+job.State+")")
	case errors.Is(err, dlq.ErrJobsNotReady):
		WriteError(w, http.StatusServiceUnavailable, err.Error())
	case err != nil:
		WriteError(w, http.StatusInternalServerError, err.Error())
	default:
		writeJSON(w, http.StatusAccepted, job)
	}
}
