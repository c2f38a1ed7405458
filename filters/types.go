package filters

import (
	"net/http"
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

// Request is one rendered HTTP request, ready to be sent. Header and Body
// may be shared with other Requests and with the Message (see the package
// doc): treat them as read-only.
type Request struct {
	Method string
	URL    string
	Header http.Header
	Body   []byte
	// Target is the URL's host:port (the port made explicit from the
	// scheme): the unit of connection limits, circuit breakers and metric
	// labels. Plan always sets it.
	Target string
}

// Plan is what a route makes of a message: its name and the requests to send
// in order.
type Plan struct {
	Route    string
	Requests []Request
}
