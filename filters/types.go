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

// Request is one rendered HTTP request, ready to be sent.
type Request struct {
	Method string
	URL    string
	Header http.Header
	Body   []byte
}

// Plan is what a route makes of a message: its name and the requests to send
// in order.
type Plan struct {
	Route    string
	Requests []Request
}
