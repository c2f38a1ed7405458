package filters

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/orderly-dispatch/orderly/config"
)

// compileRecord compiles a request that produces a Kafka record: its topic
// (literal), and its key, value and header templates (see compileRequest
// for at and compile). Header names are kept as written: Kafka header keys
// are case-sensitive.
func compileRecord(rq *request, cr *config.Request, at func(string) string, fail func(string, error), compile func(field, src string) *text) {
	switch {
	case cr.Topic == "":
		fail(at("topic"), errors.New("a request with a key or value produces a record and needs a topic"))
		return
	case cr.URL != "" || cr.Target != "" || cr.Path != "" || cr.Body != nil:
		fail(at("topic"), errors.New("set either topic (with key, value and headers) or url/target (with method, body and headers)"))
		return
	}
	if err := config.TopicName(cr.Topic); err != nil {
		fail(at("topic"), err)
		return
	}
	rq.topic = cr.Topic
	if cr.Key != nil {
		rq.key = compile("key", *cr.Key)
	}
	if cr.Value != nil {
		rq.body = compile("value", *cr.Value)
	}
	for _, name := range slices.Sorted(maps.Keys(cr.Headers)) {
		field := fmt.Sprintf("headers[%q]", name)
		if name == "" {
			fail(at(field), errors.New("a record header needs a name"))
		} else if tx := compile(field, cr.Headers[name]); tx != nil {
			rq.headers = append(rq.headers, header{name: name, val: tx})
		}
	}
	rq.shareStaticHeaders()
}

// renderRecord renders the record request rq into out; on error it returns
// the field that failed.
func (st *state) renderRecord(rq *request, out *Request) (string, error) {
	m := st.m
	out.Topic = rq.topic
	switch k := rq.key; {
	case k == nil:
		out.Key = m.Key
	case k.static:
		out.Key = []byte(k.str)
	default:
		if err := st.render(k); err != nil {
			return "key", err
		}
		out.Key = slices.Clone(st.buf.Bytes())
	}
	if rq.key != nil && len(out.Key) == 0 {
		out.Key = nil // a key that renders empty: a record without key
	}
	if field, err := st.renderHeaders(rq, out, nil); err != nil {
		return field, err
	}
	if err := st.renderBody(rq, out); err != nil {
		return "value", err
	}
	return "", nil
}

// RecordTopics returns the topics the routes write records to (topic
// requests, reply_topic, error_topic), sorted.
func (r *Router) RecordTopics() []string {
	var topics []string
	add := func(t string) {
		if t != "" && !slices.Contains(topics, t) {
			topics = append(topics, t)
		}
	}
	for i := range r.routes {
		rt := &r.routes[i]
		for j := range rt.reqs {
			add(rt.reqs[j].topic)
		}
		for _, rp := range []*replyTo{rt.reply, rt.fail} {
			if rp != nil {
				add(rp.topic)
			}
		}
	}
	slices.Sort(topics)
	return topics
}
