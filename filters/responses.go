package filters

import (
	"errors"
	"net/http"
	"strconv"

	"golang.org/x/net/http/httpguts"

	"github.com/orderly-dispatch/orderly/config"
)

// Headers of the records sent to a route's reply_topic and error_topic.
const (
	HeaderReplyStatus       = "orderly.status"
	HeaderReplyError        = "orderly.error"
	HeaderReplyRoute        = "orderly.route"
	HeaderOriginalTopic     = "orderly.original_topic"
	HeaderOriginalPartition = "orderly.original_partition"
	HeaderOriginalOffset    = "orderly.original_offset"
)

// replyTo is where a route's reply (or error) records go and which response
// headers they carry.
type replyTo struct {
	topic   string
	headers []string // canonical
}

// compileReplies compiles the route's reply_topic, error_topic and
// reply_headers.
func (rt *Route) compileReplies(cr *config.Route, fail func(string, error)) {
	var hs []string
	for j, h := range cr.ReplyHeaders {
		if !httpguts.ValidHeaderFieldName(h) {
			fail("reply_headers["+strconv.Itoa(j)+"]", errors.New("not a valid header name"))
			continue
		}
		hs = append(hs, http.CanonicalHeaderKey(h))
	}
	for _, t := range []struct {
		field, topic string
		dst          **replyTo
	}{{"reply_topic", cr.ReplyTopic, &rt.reply}, {"error_topic", cr.ErrorTopic, &rt.fail}} {
		if t.topic == "" {
			continue
		}
		if err := config.TopicName(t.topic); err != nil {
			fail(t.field, err)
			continue
		}
		*t.dst = &replyTo{topic: t.topic, headers: hs}
	}
}

// ReadsResponses reports whether a request of the route reads an earlier
// one's answer: a redelivery or replay of a half-done message must then
// send it from its first request again (with the same idempotency keys).
func (rt *Route) ReadsResponses() bool { return rt.chained }

// Captures reports whether the dispatcher must keep the answers of the
// route's requests: a later request reads them, or replies are recorded.
func (rt *Route) Captures() bool { return rt.chained || rt.reply != nil || rt.fail != nil }

// RenderRequest renders request i of the route for m, for its turn: its
// templates read the answers of the requests before it in responses
// ((index .Responses N)). A template that cannot render is a
// *BadMessageError.
func (rt *Route) RenderRequest(m *Message, i int, responses []Response, out *Request) error {
	st := getState(m)
	defer putState(st)
	if err := rt.prepare(st, &rt.renderSpec); err != nil {
		return err
	}
	if err := st.need(rt.needs, &rt.renderSpec); err != nil {
		return rt.bad(rt.valueReq, rt.valueUser+" needs the value as JSON", err)
	}
	st.data.Responses = newTplResponses(responses)
	*out = Request{}
	if field, err := rt.renderRequest(st, i, out); err != nil {
		return rt.bad(i, "requests["+strconv.Itoa(i)+"]."+field, err)
	}
	return nil
}

// Replies reports whether the route has a reply_topic.
func (rt *Route) Replies() bool { return rt.reply != nil }

// Reply returns the record of m's last answer resp for the route's
// reply_topic, nil when it has none.
func (rt *Route) Reply(m *Message, resp *Response) *Request {
	return rt.reply.record(rt.name, m, resp, "")
}

// ReplyError returns the record of m's failure (why, and the failing
// answer resp if there was one) for the route's error_topic, nil when it
// has none.
func (rt *Route) ReplyError(m *Message, resp *Response, why string) *Request {
	return rt.fail.record(rt.name, m, resp, why)
}

// record is the reply record of m: its key, the answer's body as value, and
// headers: the status, the selected response headers, the correlation
// headers (the traceparent is added where the record is produced) and, for
// an error, the reason.
func (r *replyTo) record(route string, m *Message, resp *Response, why string) *Request {
	if r == nil {
		return nil
	}
	if resp == nil {
		resp = &Response{}
	}
	h := http.Header{
		HeaderReplyRoute:        {route},
		HeaderOriginalTopic:     {m.Topic},
		HeaderOriginalPartition: {strconv.Itoa(int(m.Partition))},
		HeaderOriginalOffset:    {strconv.FormatInt(m.Offset, 10)},
	}
	if resp.Status != 0 {
		h[HeaderReplyStatus] = []string{strconv.Itoa(resp.Status)}
	}
	if why != "" {
		h[HeaderReplyError] = []string{why}
	}
	for _, name := range r.headers {
		if v := resp.Header.Values(name); len(v) > 0 {
			h[name] = v
		}
	}
	return &Request{Topic: r.topic, Key: m.Key, Body: resp.Body, Header: h}
}
