//go:build !unix

package httpclient

import (
	"net"
	"time"
)

// alive reports whether an idle connection can carry a request; without a
// non-blocking peek every one is tried (a closed one is replayed).
func alive(net.Conn, time.Time) bool { return true }
