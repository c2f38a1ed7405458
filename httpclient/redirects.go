package httpclient

import (
	"context"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// maxRedirects is how many redirects in a row one attempt follows.
const maxRedirects = 5

// send makes the round trip of one attempt of c with headers h. For a named
// target with follow_redirects, a 301, 302, 303, 307 or 308 whose Location
// is on base_url's scheme://host:port is followed within the attempt, at
// most maxRedirects times, with the same headers: 307 and 308 re-send the
// method and body, 301, 302 and 303 become a GET (a HEAD stays one) without
// body, as net/http does (a signing target's hop is signed again for the
// empty body). The bodies of the answers followed are drained and
// closed; the caller owns the body of the answer returned, which the
// attempt judges. A redirect not followed is that answer (see redirectNote).
func (s *Sender) send(ctx context.Context, c *Call, h http.Header) (*http.Response, error) {
	rt := s.transportFor(c)
	req := c.newRequest(ctx, h)
	resp, err := rt.RoundTrip(req)
	bt := c.named.bt
	if bt == nil || bt.redirectOrigin == "" {
		return resp, err
	}
	for hops := 0; err == nil && hops < maxRedirects; hops++ {
		u := redirectLocation(req.URL, resp)
		if u == nil || origin(u) != bt.redirectOrigin {
			break
		}
		next := *req // same context, headers and Host
		next.URL = u
		if resp.StatusCode == http.StatusTemporaryRedirect || resp.StatusCode == http.StatusPermanentRedirect {
			if req.GetBody != nil {
				next.Body, _ = req.GetBody() // c.getBody never fails
			}
		} else {
			if req.Method != http.MethodGet && req.Method != http.MethodHead {
				next.Method = http.MethodGet
			}
			next.Body, next.GetBody, next.ContentLength = nil, nil, 0
			if len(bt.keys) > 0 && len(c.req.Body) > 0 {
				// The signature covers the body, which this hop drops.
				next.Header = next.Header.Clone()
				sign(next.Header, bt.keys, c.named.webhookID, time.Now(), nil)
			}
		}
		drain(resp.Body)
		req = &next
		resp, err = rt.RoundTrip(req)
	}
	return resp, err
}

// redirectLocation is where resp redirects a request to from, or nil when
// it is not a 301, 302, 303, 307 or 308 with a valid Location.
func redirectLocation(from *url.URL, resp *http.Response) *url.URL {
	switch resp.StatusCode {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
	default:
		return nil
	}
	loc := resp.Header.Get("Location")
	if loc == "" {
		return nil
	}
	u, err := from.Parse(loc)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil
	}
	return u
}

// origin is u's scheme://host:port, lower-cased, with the scheme's default
// port when u has none.
func origin(u *url.URL) string {
	scheme := strings.ToLower(u.Scheme)
	port := u.Port()
	if port == "" {
		port = "80"
		if scheme == "https" {
			port = "443"
		}
	}
	return scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port)
}

// redirectNote completes the error of an attempt that ended on a redirect:
// where it pointed (without user info or query) and why it was not
// followed; "" for any other answer.
func redirectNote(c *Call, resp *http.Response) string {
	from := c.u
	if resp.Request != nil {
		from = resp.Request.URL
	}
	u := redirectLocation(from, resp)
	if u == nil {
		return ""
	}
	var why string
	switch bt := c.named.bt; {
	case bt == nil || bt.redirectOrigin == "":
		why = "redirects are followed only for a target with follow_redirects = true"
	case origin(u) != bt.redirectOrigin:
		why = "it leaves the target's " + bt.redirectOrigin
	default:
		why = "stopped after " + strconv.Itoa(maxRedirects) + " redirects"
	}
	return " (redirect to " + safeURL(u) + " not followed: " + why + ")"
}
