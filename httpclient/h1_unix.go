//go:build unix

package httpclient

import (
	"net"
	"syscall"
	"time"
)

// alive reports whether an idle connection can carry a request: one idle
// for more than a second is checked with a non-blocking peek, which sees a
// close (or stray bytes) from the server without reading anything. A
// connection the server closes between the check and the write is
// replayed (h1Conn.roundTrip).
func alive(nc net.Conn, idleAt time.Time) bool {
	if time.Since(idleAt) < time.Second {
		return true
	}
	if tc, ok := nc.(interface{ NetConn() net.Conn }); ok { // *tls.Conn: its socket
		nc = tc.NetConn()
	}
	if ac, ok := nc.(*agedConn); ok {
		nc = ac.Conn
	}
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	ok = true
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		ok = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK // nothing to read: open
		return true
	})
	return err == nil && ok
}
