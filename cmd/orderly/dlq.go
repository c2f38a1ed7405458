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
	"strings"
	"time"
)

const dlqUsage = `Usage:
  orderly dlq list    [flags]       print a page of dead letters
  orderly dlq replay  [flags]       resend dead letters through their routes (a job)
  orderly dlq release [flags]       mark dead letters handled without sending them (a job)
  orderly dlq status  [flags] [ID]  print a job, or every job
  orderly dlq cancel  [flags] ID    stop a job

These call the admin API of a running instance (--admin, default 127.0.0.1:9464) and print its
JSON answer. The admin token (the server's admin.token) is read from $ORDERLY_ADMIN_TOKEN, or from
the file --token-file FILE; --token TOKEN works too, but shows in ps.

Run 'orderly dlq COMMAND --help' for a command's description and flags.
`

// dlqFilterFlags are the flags that select dead letters.
type dlqFilterFlags struct {
	partition int
	from, to  int64
	route     string
	key       string
	limit     int
}

func (f *dlqFilterFlags) add(fs *flag.FlagSet) {
	fs.IntVar(&f.partition, "partition", -1, "only this DLQ partition (-1: all)")
	fs.Int64Var(&f.from, "from", -1, "first DLQ offset (-1: the start)")
	fs.Int64Var(&f.to, "to", -1, "last DLQ offset, inclusive (-1: the end)")
	fs.StringVar(&f.route, "route", "", "only records of this route")
	fs.StringVar(&f.key, "key", "", "only records with this key")
}

// each calls set with the API name and value of every filter flag given:
// offsets are from and to in a query, from_offset and to_offset in a body.
func (f *dlqFilterFlags) each(offsetSuffix string, set func(name string, v any)) {
	if f.partition >= 0 {
		set("partition", f.partition)
	}
	if f.from >= 0 {
		set("from"+offsetSuffix, f.from)
	}
	if f.to >= 0 {
		set("to"+offsetSuffix, f.to)
	}
	if f.route != "" {
		set("route", f.route)
	}
	if f.key != "" {
		set("key", f.key)
	}
	if f.limit > 0 {
		set("limit", f.limit)
	}
}

const dlqTokenHelp = `

The admin token is read from $ORDERLY_ADMIN_TOKEN, or from --token-file FILE; --token TOKEN works
too, but shows in ps.`

var dlqCommands = map[string]*command{
	"list": {name: "dlq list", synopsis: "[flags]", desc: `
Print a page of dead letters as JSON, in offset order per partition: each with its source topic,
partition, offset and key, the error, the route and the attempts. When the page is full,
"next_page" holds the cursor of the next one: pass it to --cursor.` + dlqTokenHelp},
	"replay": {name: "dlq replay", synopsis: "[flags]", desc: `
Queue a job that resends the dead letters matching the filters through their routes, once the
target is fixed; one instance of the group runs it. Prints the job; with --wait, waits for it to
end, prints its final state and exits 1 unless it finished. --dry-run counts what would be
resent and changes nothing.` + dlqTokenHelp},
	"release": {name: "dlq release", synopsis: "[flags]", desc: `
Queue a job that marks the dead letters matching the filters handled without sending them (drops
them); one instance of the group runs it. Prints the job; with --wait, waits for it to end, prints
its final state and exits 1 unless it finished. --dry-run counts what would be released and changes
nothing.` + dlqTokenHelp},
	"status": {name: "dlq status", synopsis: "[flags] [ID]", desc: `
Print the replay or release job ID, or without ID every job, newest first.` + dlqTokenHelp},
	"cancel": {name: "dlq cancel", synopsis: "[flags] ID", desc: `
Stop a queued or running job, after the records in flight; a new replay resumes where it stopped.
With --wait, waits until it stopped and prints its final state.` + dlqTokenHelp},
}

// cmdDLQ calls the admin API's /dlq/ endpoints and prints their JSON.
func cmdDLQ(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, dlqUsage)
		return 2
	}
	sub := args[0]
	if isHelp(sub) {
		fmt.Fprint(stdout, dlqUsage)
		return 0
	}
	cmd := dlqCommands[sub]
	if cmd == nil {
		fmt.Fprintf(stderr, "orderly dlq: unknown command %q\n\n%s", sub, dlqUsage)
		return 2
	}
	fs := cmd.flags(stderr)
	admin := fs.String("admin", "127.0.0.1:9464", "admin address of a running instance (host:port or URL)")
	token := fs.String("token", "", "admin token (shows in ps: prefer $ORDERLY_ADMIN_TOKEN or --token-file)")
	tokenFile := fs.String("token-file", "", "read the admin token from this file (default: $ORDERLY_ADMIN_TOKEN)")
	var filter dlqFilterFlags
	var cursor string
	var rate float64
	var dryRun, wait bool
	switch sub {
	case "list":
		filter.add(fs)
		fs.IntVar(&filter.limit, "limit", 0, "records per page, 1 to 1000 (0: the server's default, 100)")
		fs.StringVar(&cursor, "cursor", "", "resume at PARTITION:OFFSET (the next_page of the previous answer)")
	case "replay", "release":
		filter.add(fs)
		fs.IntVar(&filter.limit, "limit", 0, "at most this many records (0: all)")
		if sub == "replay" {
			fs.Float64Var(&rate, "rate", 0, "at most this many records per second (0: no cap)")
		}
		fs.BoolVar(&dryRun, "dry-run", false, "count what would be handled, change nothing")
		fs.BoolVar(&wait, "wait", false, "wait for the job to end and print its final state")
	case "cancel":
		fs.BoolVar(&wait, "wait", false, "wait for the job to stop and print its final state")
	}
	if code, ok := cmd.parse(fs, args[1:], stdout, stderr); !ok {
		return code
	}
	base := *admin
	if len(base) < 7 || (base[:7] != "http://" && (len(base) < 8 || base[:8] != "https://")) {
		base = "http://" + base
	}
	c := apiCaller{base: base, out: stdout, errw: stderr}
	switch {
	case *token != "" && *tokenFile != "":
		cmd.usageError(stderr, "give --token or --token-file, not both")
		return 2
	case *token != "":
		c.token, c.tokenFrom = *token, "--token"
	case *tokenFile != "":
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			fmt.Fprintf(stderr, "orderly %s: unable to read the admin token: %v\n", cmd.name, err)
			return 2
		}
		c.token, c.tokenFrom = strings.TrimSpace(string(b)), "--token-file "+*tokenFile
	default:
		c.token, c.tokenFrom = os.Getenv("ORDERLY_ADMIN_TOKEN"), "$ORDERLY_ADMIN_TOKEN"
	}
	switch sub {
	case "list":
		q := url.Values{}
		filter.each("", func(name string, v any) { q.Set(name, fmt.Sprint(v)) })
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		return c.call("GET", "/dlq/messages?"+q.Encode(), nil, nil)
	case "replay", "release":
		body := map[string]any{"dry_run": dryRun}
		filter.each("_offset", func(name string, v any) { body[name] = v })
		if rate != 0 {
			body["rate"] = rate
		}
		var started struct{ ID string }
		if code := c.call("POST", "/dlq/"+sub, body, &started); code != 0 || !wait {
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
		cmd.usageError(stderr, "at most one job ID")
		return 2
	default: // cancel
		if fs.NArg() != 1 {
			cmd.usageError(stderr, "one job ID is needed")
			return 2
		}
		id := fs.Arg(0)
		if code := c.call("DELETE", "/dlq/replay/"+url.PathEscape(id), nil, nil); code != 0 || !wait {
			return code
		}
		return c.wait(id, "cancelled")
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
			c.authHint(status)
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
	tokenFrom   string // where the token came from, for messages
	out, errw   io.Writer
}

// authHint explains a 401: which token was sent (if any), where it came
// from and how to give the right one.
func (c apiCaller) authHint(status int) {
	if status != http.StatusUnauthorized {
		return
	}
	if c.token == "" {
		fmt.Fprintf(c.errw, "orderly dlq: no admin token was sent (%s is empty): set ORDERLY_ADMIN_TOKEN "+
			"to the server's admin.token, or pass --token-file FILE\n", c.tokenFrom)
		return
	}
	fmt.Fprintf(c.errw, "orderly dlq: the admin API refused the token from %s: it must equal the server's "+
		"admin.token (set ORDERLY_ADMIN_TOKEN, or pass --token-file FILE)\n", c.tokenFrom)
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
		c.authHint(status)
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
