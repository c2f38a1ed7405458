package filters

import (
	"net/http"
	"strconv"
	"time"
)

// Header is one Kafka record header.
type Header struct {
	Key   string
	Value []byte
}

// Message is a Kafka record as the filters see it, independent of the client
// library. The filters never modify a Message.
type Message struct {
	Topic     string
	Partition int32
	Offset    int64
	Key       []byte // nil for a record without key
	Value     []byte
	Headers   []Header
	Timestamp time.Time
}

// IdempotencyKey is the Idempotency-Key of the message's request index:
// <topic>-<partition>-<offset>-<index>, the same for every attempt, replay
// and redelivery. Built on the stack: one allocation, the string.
func (m *Message) IdempotencyKey(index int) string {
	var buf [96]byte
	b := append(buf[:0], m.Topic...)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(m.Partition), 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, m.Offset, 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(index), 10)
	return string(b)
}

// Request is one rendered request, ready to be sent: an HTTP request, or a
// Kafka record when Topic is set. Header and Body may be shared with other
// Requests and with the Message (see the package doc): treat them as
// read-only.
type Request struct {
	Method string
	URL    string
	Header http.Header
	Body   []byte
	// Target is the URL's host:port (the port made explicit from the
	// scheme): the unit of connection limits, circuit breakers and metric
	// labels. Plan always sets it.
	Target string
	// TargetName is the name of the configured [[targets]] the request
	// goes to, whose TLS, authentication, headers and signing apply; ""
	// for a request with a full url.
	TargetName string
	// Topic, when set, makes the request a record produced to that topic:
	// Key is its key (nil: none), Body its value and Header its headers
	// (names as configured); Method, URL and Target are empty.
	Topic string
	Key   []byte
	// Pending marks a request whose templates read earlier requests'
	// answers: Plan leaves it unrendered (but for Topic), and
	// Route.RenderRequest renders it on its turn.
	Pending bool
}

// Plan is what a route makes of a message: its name and the requests to send
// in order.
type Plan struct {
	Route    string
	Requests []Request
}

// Response is what a request's target answered, for the later requests of
// the same message (.Responses in templates) and for reply records. A
// record request's response has Status 0 and no header or body.
type Response struct {
	Status int
	Header http.Header
	// Body is the answer's body, cut to MaxResponseBody bytes (Truncated
	// says whether it was).
	Body      []byte
	Truncated bool
}

// MaxResponseBody is how much of a response's body is kept.
const MaxResponseBody = 64 << 10
