package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"
)

const dlqUsage = `Usage:
  orderly dlq list    [--admin ADDR] [--partition N] [--from OFFSET] [--to OFFSET] [--route R] [--key K] [--limit N] [--cursor P:O]
  orderly dlq replay  [--admin ADDR] [--partition N] [--from OFFSET] [--to OFFSET] [--route R] [--key K] [--limit N] [--rate R] [--dry-run] [--wait]
  orderly dlq release [--admin ADDR] [--partition N] [--from OFFSET] [--to OFFSET] [--route R] [--key K] [--limit N] [--dry-run] [--wait]
  orderly dlq status  [--admin ADDR] [ID]
  orderly dlq cancel  [--admin ADDR] [--wait] ID

list pages with --cursor (the "next_page" of the previous answer); replay resends dead letters,
release marks them handled without sending (drops them); both queue a job that one instance of the
group runs (any instance answers for it); status without ID lists the jobs, newest first; cancel
stops a queued or running job (after the records in flight; a new replay resumes there).
The admin token is read from $ORDERLY_ADMIN_TOKEN (or --token). ADDR defaults to 127.0.0.1:9464.
`

// cmdDLQ calls the admin API's /dlq/ endpoints and prints their JSON.
func cmdDLQ(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, dlqUsage)
		return 2
	}
	sub := args[0]
	fs := flag.NewFlagSet("dlq "+sub, flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := fs.String("admin", "127.0.0.1:9464", "admin address (host:port or URL)")
	token := fs.String("token", os.Getenv("ORDERLY_ADMIN_TOKEN"), "bearer token (default $ORDERLY_ADMIN_TOKEN)")
	partition := fs.Int("partition", -1, "DLQ partition (-1: all)")
	from := fs.Int64("from", -1, "first DLQ offset")
	to := fs.Int64("to", -1, "last DLQ offset, inclusive")
	route := fs.String("route", "", "only records of this route")
	key := fs.String("key", "", "only records with this key")
	limit := fs.Int("limit", 0, "at most this many records")
	cursor := fs.String("cursor", "", "list: resume at PARTITION:OFFSET (from next_page)")
	rate := fs.Float64("rate", 0, "replay: at most this many records per second (0: no cap)")
	dryRun := fs.Bool("dry-run", false, "replay, release: count what would be handled, change nothing")
	wait := fs.Bool("wait", false, "replay, release, cancel: wait for the job to finish and print its final state")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	base := *admin
	if len(base) < 7 || (base[:7] != "http://" && (len(base) < 8 || base[:8] != "https://")) {
		base = "http://" + base
	}
	c := apiCaller{base: base, token: *token, out: stdout, errw: stderr}
	switch sub {
	case "list":
		q := url.Values{}
		if *partition >= 0 {
			q.Set("partition", strconv.Itoa(*partition))
		}
		if *from >= 0 {
			q.Set("from", strconv.FormatInt(*from, 10))
		}
		if *to >= 0 {
			q.Set("to", strconv.FormatInt(*to, 10))
		}
		if *route != "" {
			q.Set("route", *route)
		}
		if *key != "" {
			q.Set("key", *key)
		}
		if *limit > 0 {
			q.Set("limit", strconv.Itoa(*limit))
		}
		if *cursor != "" {
			q.Set("cursor", *cursor)
		}
		return c.call("GET", "/dlq/messages?"+q.Encode(), nil, nil)
	case "replay", "release":
		body := map[string]any{"dry_run": *dryRun}
		if *partition >= 0 {
			body["partition"] = *partition
		}
		if *from >= 0 {
			body["from_offset"] = *from
		}
		if *to >= 0 {
			body["to_offset"] = *to
		}
		if *route != "" {
			body["route"] = *route
		}
		if *key != "" {
			body["key"] = *key
		}
		if *limit > 0 {
			body["limit"] = *limit
		}
		if *rate != 0 {
			body["rate"] = *rate
		}
		var started struct{ ID string }
		if code := c.call("POST", "/dlq/"+sub, body, &started); code != 0 || !*wait {
			return code
		}
		return c.wait(started.ID, "done")
	case "status":
		switch fs.NArg() {
		case 0:
			return c.call("GET", "/dlq/replay", nil, nil)
		case 1:
			return c.call("GET", "/dlq/replay/"+url.PathEscape(fs.Arg(0)), nil, nil)
		}
		fmt.Fprint(stderr, dlqUsage)
		return 2
	case "cancel":
		if fs.NArg() != 1 {
			fmt.Fprint(stderr, dlqUsage)
			return 2
		}
		id := fs.Arg(0)
		if code := c.call("DELETE", "/dlq/replay/"+url.PathEscape(id), nil, nil); code != 0 || !*wait {
			return code
		}
		return c.wait(id, "cancelled")
	default:
		fmt.Fprintf(stderr, "orderly dlq: unknown subcommand %q\n\n%s", sub, dlqUsage)
		return 2
	}
}

// wait polls job id until it finishes, prints it and returns 0 when it
// ended in state want, 1 otherwise. Behind a load balancer the instance
// asked may not have read a job just queued yet: a 404 is retried for a
// few seconds.
func (c apiCaller) wait(id, want string) int {
	path := "/dlq/replay/" + url.PathEscape(id)
	unknownUntil := time.Now().Add(5 * time.Second)
	for {
		var job struct{ State string }
		if b, status, err := c.do("GET", path, nil); err == nil && status == http.StatusNotFound && time.Now().Before(unknownUntil) {
			time.Sleep(200 * time.Millisecond)
			continue
		} else if err != nil || status >= 300 {
			fmt.Fprintf(c.errw, "orderly dlq: GET %s: %v %s\n", path, err, b)
			return 1
		} else {
			_ = json.Unmarshal(b, &job)
		}
		if job.State != "queued" && job.State != "running" && job.State != "cancelling" {
			code := c.call("GET", path, nil, nil)
			if code == 0 && job.State != want {
				return 1
			}
			return code
		}
		time.Sleep(200 * time.Millisecond)
	}
}

type apiCaller struct {
	base, token string
	out, errw   io.Writer
}

// call performs a request, prints the JSON answer to out (errors to errw)
// and returns the exit status: 0 for 2xx, 1 otherwise.
func (c apiCaller) call(method, path string, body, into any) int {
	b, status, err := c.do(method, path, body)
	if err != nil {
		fmt.Fprintln(c.errw, "orderly dlq:", err)
		return 1
	}
	if status >= 300 {
		fmt.Fprintf(c.errw, "orderly dlq: %s %s: HTTP %d: %s\n", method, path, status, bytes.TrimSpace(b))
		return 1
	}
	var pretty bytes.Buffer
	if json.Indent(&pretty, b, "", "  ") == nil {
		b = pretty.Bytes()
	}
	fmt.Fprintln(c.out, string(bytes.TrimSpace(b)))
	if into != nil {
		_ = json.Unmarshal(b, into)
	}
	return 0
}

func (c apiCaller) do(method, path string, body any) ([]byte, int, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, 0, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return nil, 0, err
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	cl := &http.Client{Timeout: 30 * time.Second}
	resp, err := cl.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return b, resp.StatusCode, err
}
