package filters

import (
	"net/http"
	"strings"
	"testing"

	"github.com/orderly-dispatch/orderly/config"
)

// TestChainedRequests: a request whose templates read an earlier answer is
// left pending by Plan and rendered on its turn from the answers so far:
// status, headers, body and the decoded JSON.
func TestChainedRequests(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "create-attach", Requests: []config.Request{
		{Method: "POST", URL: "http://api.example/items"},
		{Method: "PUT", URL: `http://api.example/items/{{ (index .Responses 0).JSON.id }}/attach`,
			Headers: map[string]string{"X-Created": `{{ (index .Responses 0).Status }} {{ index (index .Responses 0).Headers "Location" }}`},
			Body:    strp(`{"raw": {{ json (index .Responses 0).Body }}}`)},
		{Topic: "attached", Value: strp(`{{ (index $.Responses 1).JSON.ok }}`)},
	}})
	rt := r.Route("create-attach")
	if !rt.ReadsResponses() || !rt.Captures() {
		t.Fatal("the route reads responses")
	}
	m := msg("orders", `{"id": 1}`)
	plan := mustPlan(t, r, m)
	if plan.Requests[0].Pending || !plan.Requests[1].Pending || !plan.Requests[2].Pending || plan.Requests[2].Topic != "attached" {
		t.Fatalf("plan %+v: want requests 1 and 2 pending, their kind known", plan.Requests)
	}
	answers := []Response{{Status: 201, Header: http.Header{"Location": {"/items/42"}}, Body: []byte(`{"id": 42}`)}}
	if err := rt.RenderRequest(m, 1, answers, &plan.Requests[1]); err != nil {
		t.Fatal(err)
	}
	rq := plan.Requests[1]
	if rq.Pending || rq.URL != "http://api.example/items/42/attach" || rq.Header.Get("X-Created") != "201 /items/42" ||
		string(rq.Body) != `{"raw": "{\"id\": 42}"}` {
		t.Fatalf("rendered %+v body %s", rq, rq.Body)
	}
	answers = append(answers, Response{Status: 200, Body: []byte(`{"ok": true}`)})
	if err := rt.RenderRequest(m, 2, answers, &plan.Requests[2]); err != nil || string(plan.Requests[2].Body) != "true" {
		t.Fatalf("record: %v %s", err, plan.Requests[2].Body)
	}
	// An answer that is not JSON, or was cut, is a bad message naming the field.
	for _, bad := range []Response{{Status: 201, Body: []byte("created")}, {Status: 201, Body: []byte(`{"id": 4`), Truncated: true}} {
		err := rt.RenderRequest(m, 1, []Response{bad}, &plan.Requests[1])
		if b := badMessage(t, err); b.Index != 1 || !strings.Contains(b.Reason, "requests[1].url") {
			t.Fatalf("bad answer %q: %v", bad.Body, err)
		}
	}
}

// TestChainedRequestErrors: a template may read only the answers of the
// requests before its own, and only as (index .Responses N).
func TestChainedRequestErrors(t *testing.T) {
	got := compileErrors(t, config.Route{Name: "r", Requests: []config.Request{
		{URL: "http://a.example/{{ (index .Responses 0).JSON.id }}"},
		{URL: "http://a.example/x", Body: strp(`{{ (index .Responses 2).Body }}`)},
		{URL: "http://a.example/y", Body: strp(`{{ range .Responses }}{{ .Status }}{{ end }}`)},
	}})
	for i, want := range []string{
		`requests[0].url: reads the response of requests[0], which is sent after it`,
		`requests[1].body: reads the response of requests[2], which is sent after it`,
		`requests[2].body: template: body:1:9: read an earlier response as (index .Responses N)`,
	} {
		if i >= len(got) || !strings.Contains(got[i], want) {
			t.Fatalf("errors %q\nwant %d: %q", got, i, want)
		}
	}
}

// TestReplyRecords: the reply record carries the message's key, the
// answer's body, its status, the selected headers and where the message
// came from; the error record the reason too.
func TestReplyRecords(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", ReplyTopic: "replies", ErrorTopic: "errors", ReplyHeaders: []string{"location"},
		Requests: []config.Request{{URL: "http://a.example/x"}}})
	rt := r.Route("r")
	m := msg("orders", `{}`)
	resp := &Response{Status: 201, Header: http.Header{"Location": {"/x/1"}, "Server": {"s"}}, Body: []byte(`{"id":1}`)}
	rec := rt.Reply(m, resp)
	if rec.Topic != "replies" || string(rec.Key) != "k1" || string(rec.Body) != `{"id":1}` || rec.Header.Get("Server") != "" {
		t.Fatalf("reply %+v", rec)
	}
	for k, v := range map[string]string{HeaderReplyStatus: "201", "Location": "/x/1", HeaderReplyRoute: "r",
		HeaderOriginalTopic: "orders", HeaderOriginalPartition: "3", HeaderOriginalOffset: "42"} {
		if got := rec.Header[k]; len(got) != 1 || got[0] != v {
			t.Fatalf("reply header %s = %q, want %q", k, got, v)
		}
	}
	rec = rt.ReplyError(m, nil, "no answer")
	if rec.Topic != "errors" || rec.Header[HeaderReplyError][0] != "no answer" || rec.Header[HeaderReplyStatus] != nil || rec.Body != nil {
		t.Fatalf("error record %+v", rec)
	}
	if r := mustCompile(t, req1("plain", "", "http://a.example/", nil)).Route("plain"); r.Reply(m, resp) != nil || r.Captures() {
		t.Fatal("a route without reply_topic has no reply record and captures nothing")
	}
	if got := r.RecordTopics(); strings.Join(got, ",") != "errors,replies" {
		t.Fatalf("RecordTopics = %v", got)
	}
}
