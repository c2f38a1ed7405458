// Package schemaregtest runs a Schema Registry for tests: an httptest
// server speaking the part of the Confluent Schema Registry REST API that
// confluent-kafka-go's serializers and deserializers use, so that tests
// exercise the real HTTP path. It imports testing: tests only.
package schemaregtest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry"
)

// Server is a Schema Registry holding what was registered through it:
//
//	POST /subjects/{subject}/versions   register (the same schema keeps its id)
//	GET  /schemas/ids/{id}              a schema by id (404, error_code 40403, when unknown)
//	GET  /subjects/{subject}/versions/{version}
//
// SetStatus makes it answer every request with a status instead, an outage.
// It is safe for concurrent use.
type Server struct {
	*httptest.Server
	t testing.TB

	requests atomic.Int64 // every request
	refused  atomic.Int64 // answered with the SetStatus status

	mu       sync.Mutex // protects below
	status   int
	schemas  []schemaregistry.SchemaInfo // id i+1
	subjects map[string][]int            // subject -> ids, version i+1
	auth     string                      // the last Authorization header
}

// New starts a Server, closed by t.Cleanup.
func New(t testing.TB) *Server {
	s := &Server{t: t, subjects: make(map[string][]int)}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

// SetStatus makes every request answer status (0: serve normally again).
func (s *Server) SetStatus(status int) {
	s.mu.Lock()
	s.status = status
	s.mu.Unlock()
}

// Requests returns how many requests arrived.
func (s *Server) Requests() int64 { return s.requests.Load() }

// Refused returns how many requests were answered with the SetStatus status.
func (s *Server) Refused() int64 { return s.refused.Load() }

// Authorization returns the Authorization header of the last request.
func (s *Server) Authorization() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.auth
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.auth = r.Header.Get("Authorization")
	if s.status != 0 {
		s.refused.Add(1)
		fail(w, s.status, s.status*100+1, "unavailable for the test")
		return
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	switch {
	case r.Method == http.MethodGet && len(parts) == 3 && parts[0] == "schemas" && parts[1] == "ids":
		id, err := strconv.Atoi(parts[2])
		if err != nil || id < 1 || id > len(s.schemas) {
			fail(w, http.StatusNotFound, 40403, "Schema "+parts[2]+" not found")
			return
		}
		answer(w, s.schemas[id-1])
	case r.Method == http.MethodPost && len(parts) == 3 && parts[0] == "subjects" && parts[2] == "versions":
		var info schemaregistry.SchemaInfo
		if err := json.NewDecoder(r.Body).Decode(&info); err != nil {
			fail(w, http.StatusUnprocessableEntity, 42201, err.Error())
			return
		}
		id := s.register(info)
		versions := s.subjects[parts[1]]
		if !slices.Contains(versions, id) {
			s.subjects[parts[1]] = append(versions, id)
		}
		answer(w, map[string]int{"id": id})
	case r.Method == http.MethodGet && len(parts) == 4 && parts[0] == "subjects" && parts[2] == "versions":
		versions := s.subjects[parts[1]]
		v, err := strconv.Atoi(parts[3])
		if parts[3] == "latest" {
			v, err = len(versions), nil
		}
		if err != nil || v < 1 || v > len(versions) {
			fail(w, http.StatusNotFound, 40402, "Version not found")
			return
		}
		id := versions[v-1]
		answer(w, schemaregistry.SchemaMetadata{SchemaInfo: s.schemas[id-1], ID: id, Subject: parts[1], Version: v})
	default:
		s.t.Logf("schemaregtest: %s %s is not served", r.Method, r.URL)
		fail(w, http.StatusNotFound, 404, "not served by schemaregtest")
	}
}

// register returns the id of info, registering it if new.
func (s *Server) register(info schemaregistry.SchemaInfo) int {
	for i, x := range s.schemas {
		if x.Schema == info.Schema && x.SchemaType == info.SchemaType {
			return i + 1
		}
	}
	s.schemas = append(s.schemas, info)
	return len(s.schemas)
}

func answer(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/vnd.schemaregistry.v1+json")
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, status, code int, msg string) {
	w.Header().Set("Content-Type", "application/vnd.schemaregistry.v1+json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error_code":%d,"message":%q}`, code, msg)
}
