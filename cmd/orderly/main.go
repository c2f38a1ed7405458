// Command orderly is the ordered Kafka-to-HTTP dispatcher.
//
//	orderly run --config FILE        the service
//	orderly validate --config FILE   check a configuration, exit 0 or 2
//	orderly demo [flags]             everything in one process, with a verification summary
//	orderly dlq list|replay|release|status|cancel   the admin API's DLQ endpoints
//	orderly version
//
// Every command prints its synopsis, description and flags on --help (or
// -h, or `orderly help COMMAND`) and exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/schemareg"
	"github.com/orderly-dispatch/orderly/internal/service"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `orderly: an ordered Kafka-to-HTTP dispatcher

Usage:
  orderly run --config FILE        consume, dispatch and commit until SIGTERM/SIGINT
  orderly validate --config FILE   parse and compile the configuration; exit 0, or print every error and exit 2
                                   (--print: show the effective configuration, secrets redacted)
  orderly demo [flags]             embedded broker + generator + HTTP sink + dispatcher, with a summary
  orderly dlq COMMAND [flags]      list, replay, release, status, cancel: the dead-letter topic through the admin API
  orderly version                  print the version

Run 'orderly help COMMAND' or 'orderly COMMAND --help' for a command's description and flags.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes a command line and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "validate":
		return cmdValidate(args[1:], stdout, stderr)
	case "demo":
		return cmdDemo(args[1:], stdout, stderr)
	case "dlq":
		return cmdDLQ(args[1:], stdout, stderr)
	case "version", "--version", "-v":
		if len(args) > 1 && isHelp(args[1]) {
			fmt.Fprint(stdout, "Usage: orderly version\n\nPrint the version of this binary.\n")
			return 0
		}
		fmt.Fprintln(stdout, "orderly", version)
		return 0
	case "help", "-h", "--help":
		if len(args) > 1 && args[0] == "help" && !isHelp(args[1]) {
			// orderly help dlq list: orderly dlq list --help
			return run(append(slices.Clone(args[1:]), "--help"), stdout, stderr)
		}
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "orderly: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

// isHelp reports whether arg asks for help.
func isHelp(arg string) bool {
	switch arg {
	case "-h", "-help", "--help", "help":
		return true
	}
	return false
}

// command describes a command for its help: `orderly NAME --help` prints
// the synopsis, the description and the flags but the hidden ones, to
// stdout, and exits 0.
type command struct {
	name     string   // "run", "dlq list"
	synopsis string   // what follows the name: "--config FILE"
	desc     string   // paragraphs, lines of at most 100 characters
	hidden   []string // internal flags, left out of the help
}

// flags returns a FlagSet for c whose parse errors go to stderr; parse
// prints the help.
func (c *command) flags(stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("orderly "+c.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	return fs
}

// parse parses args with fs. When the command is not to run, it returns
// false and the exit status: 0 after printing the help for -h or --help,
// 2 after a wrong flag (the flag package printed what is wrong).
func (c *command) parse(fs *flag.FlagSet, args []string, stdout, stderr io.Writer) (int, bool) {
	err := fs.Parse(args)
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, flag.ErrHelp):
		c.help(fs, stdout)
		return 0, false
	default:
		c.usageError(stderr, "")
		return 2, false
	}
}

// usageError prints msg (when not empty), the synopsis and where the help
// is, for a wrong command line; the caller exits 2.
func (c *command) usageError(w io.Writer, msg string) {
	if msg != "" {
		fmt.Fprintf(w, "orderly %s: %s\n", c.name, msg)
	}
	fmt.Fprintf(w, "Usage: orderly %s %s\nRun 'orderly %s --help' for more.\n", c.name, c.synopsis, c.name)
}

// help prints the synopsis, the description and the visible flags of c to
// w, each flag with its default as the flag package shows it.
func (c *command) help(fs *flag.FlagSet, w io.Writer) {
	fmt.Fprintf(w, "Usage: orderly %s %s\n\n%s\n", c.name, c.synopsis, strings.TrimSpace(c.desc))
	visible := flag.NewFlagSet(fs.Name(), flag.ContinueOnError)
	visible.SetOutput(w)
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		if slices.Contains(c.hidden, f.Name) {
			return
		}
		visible.Var(f.Value, f.Name, f.Usage)
		// The default, not what a flag before -h may have set.
		visible.Lookup(f.Name).DefValue = f.DefValue
		n++
	})
	if n > 0 {
		fmt.Fprintln(w, "\nFlags:")
		visible.PrintDefaults()
	}
}

// load parses args and loads the --config file, printing its problems on
// stderr, one per line. Without a configuration the command exits with
// code; err is the configuration's error when it is the cause.
func (c *command) load(fs *flag.FlagSet, path *string, args []string, stdout, stderr io.Writer) (*config.Config, int, error) {
	if code, ok := c.parse(fs, args, stdout, stderr); !ok {
		return nil, code, nil
	}
	if *path == "" {
		c.usageError(stderr, "--config FILE is required")
		return nil, 2, nil
	}
	cfg, err := config.Load(*path, compileRoutes)
	if err != nil {
		fmt.Fprintln(stderr, strings.TrimSpace(err.Error()))
		return nil, 2, err
	}
	return cfg, 0, nil
}

// compileRoutes is the config.Check that compiles the routes' `when`
// expressions and templates, placing each problem at its key in the file.
func compileRoutes(cfg *config.Config) error {
	var errs config.Errors
	opts := []filters.CompileOption{filters.WithTargets(cfg.Targets)}
	switch reg, err := schemareg.FromConfig(cfg, nil); {
	case err != nil:
		// Validation names the key at fault; the routes compile as if the
		// registry were there.
		errs = append(errs, cfg.ErrorAt("schema_registry", err))
		opts = append(opts, filters.WithSchemaRegistry(noRegistry{err}))
	case reg != nil:
		defer reg.Close()
		opts = append(opts, filters.WithSchemaRegistry(reg))
	}
	_, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics, opts...)
	if err == nil {
		if len(errs) > 0 {
			return errs
		}
		return nil
	}
	all := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		all = j.Unwrap()
	}
	for _, e := range all {
		var ce *filters.CompileError
		if errors.As(e, &ce) {
			errs = append(errs, cfg.ErrorAt(fmt.Sprintf("routes[%d].%s", ce.Index, ce.Field), ce.Err))
		} else {
			errs = append(errs, &config.FieldError{Key: "routes", Msg: e.Error(), Err: e})
		}
	}
	return errs
}

// noRegistry stands for a [schema_registry] that cannot be built.
type noRegistry struct{ err error }

func (n noRegistry) Decode(string, string, bool, []byte) ([]byte, error) { return nil, n.err }

func configFlag(fs *flag.FlagSet) *string {
	p := fs.String("config", "", "configuration file (TOML)")
	fs.StringVar(p, "c", "", "shorthand for --config")
	return p
}

var validateCommand = command{
	name:     "validate",
	synopsis: "[--print] --config FILE",
	desc: `
Parse the configuration and compile its routes (keys, values, ` + "`when`" + ` expressions, templates)
without connecting to anything. Prints "FILE: ok" and exits 0, or prints every problem, one a line
as FILE:LINE:COL: KEY: PROBLEM, and exits 2.

With --print, prints the effective configuration as TOML on stdout (and "FILE: ok" on stderr):
defaults applied, ${NAME} expanded, secrets (admin.token, credentials in headers, properties and
URLs) replaced by "REDACTED".`,
}

func cmdValidate(args []string, stdout, stderr io.Writer) int {
	c := &validateCommand
	fs := c.flags(stderr)
	path := configFlag(fs)
	printCfg := fs.Bool("print", false, "print the effective configuration, secrets redacted")
	cfg, code, _ := c.load(fs, path, args, stdout, stderr)
	if cfg == nil {
		return code
	}
	status := stdout
	if *printCfg {
		// stdout is the TOML alone, to be saved or diffed.
		fmt.Fprint(stdout, cfg.Redacted())
		status = stderr
	}
	fmt.Fprintf(status, "%s: ok (%d routes, topics %s)\n", *path, len(cfg.Routes), strings.Join(cfg.Kafka.Topics, ", "))
	return 0
}

var runCommand = command{
	name:     "run",
	synopsis: "--config FILE",
	desc: `
Run the service: consume the configured topics, send each message to the first route that takes
it (in order per key), dead-letter what cannot be delivered, and commit what is finished. Logs go
to stderr (log.level, log.format); the first lines are the version and the effective
configuration, secrets redacted. The admin server (admin.listen) serves /healthz, /readyz,
/metrics and /dlq/*.

On SIGTERM or SIGINT readiness turns 503, consumption stops after admin.drain_grace, in-flight
work drains for up to dispatch.drain_timeout, offsets are committed, and orderly exits 0. A second
signal exits at once (status 1). Exit status 2: the command line or the configuration is invalid
(check it with 'orderly validate'); 1: the service failed.

What is not ready yet at start is waited for, and logged while it lasts: brokers that cannot be
reached, the DLQ, quarantine and jobs topics, an admin or embedded broker address still in use. A
failure to start is logged at error level, with its cause, before the exit.`,
}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	c := &runCommand
	fs := c.flags(stderr)
	path := configFlag(fs)
	cfg, code, err := c.load(fs, path, args, stdout, stderr)
	if err != nil {
		// The problems as validate prints them, and one line at error level
		// for whoever reads the log (in the default log format: the
		// configured one is not known).
		problems := strings.Count(strings.TrimSpace(err.Error()), "\n") + 1
		newLogger(config.Log{Format: "json"}, stderr).Error("invalid configuration: not starting; check it with 'orderly validate'",
			"config", *path, "problems", problems, "error", err)
	}
	if cfg == nil {
		return code
	}
	log := newLogger(cfg.Log, stderr)
	log.Info("orderly starting", "version", version, "config", *path)
	log.Info("effective configuration (secrets redacted)", "config", cfg.Redacted())
	if len(cfg.UnsetEnv) > 0 {
		log.Warn("the configuration refers to environment variables that are not set; they expanded to \"\"",
			"variables", cfg.UnsetEnv)
	}
	// Signals are handled from here on: one during start-up ends the
	// retries of an address in use.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	svc, err := service.NewContext(ctx, cfg, log, version)
	if err != nil {
		log.Error("unable to start: exiting", "error", err)
		return 1
	}
	defer svc.Close()
	go func() {
		// A second signal while draining exits at once.
		<-ctx.Done()
		stop()
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		log.Error("second signal: exiting without finishing the drain")
		os.Exit(1)
	}()
	if err := svc.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("orderly stopped with an error", "error", err)
		return 1
	}
	return 0
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: lvl}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}
