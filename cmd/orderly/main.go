// Command orderly is the ordered Kafka-to-HTTP dispatcher.
//
//	orderly run --config FILE        the service
//	orderly validate --config FILE   check a configuration, exit 0 or 2
//	orderly demo [flags]             everything in one process, with a verification summary
//	orderly dlq list|replay|status   the admin API's DLQ endpoints
//	orderly version
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
	"strings"
	"syscall"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/service"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `orderly: an ordered Kafka-to-HTTP dispatcher

Usage:
  orderly run --config FILE        consume, dispatch and commit until SIGTERM/SIGINT
  orderly validate --config FILE   parse and compile the configuration; exit 0, or print every error and exit 2
  orderly demo [flags]             embedded broker + generator + HTTP sink + dispatcher, with a summary
  orderly dlq list|replay|status   inspect and replay the dead-letter topic through the admin API
  orderly bench [flags]            benchmark: Orderly against a plain net/http client on a local sink
  orderly version                  print the version

Run 'orderly COMMAND -h' for a command's flags.
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
		return cmdRun(args[1:], stderr)
	case "validate":
		return cmdValidate(args[1:], stdout, stderr)
	case "demo":
		return cmdDemo(args[1:], stdout, stderr)
	case "dlq":
		return cmdDLQ(args[1:], stdout, stderr)
	case "bench":
		return cmdBench(args[1:], stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "orderly", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "orderly: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

// loadConfig loads and fully compiles a configuration, returning every
// problem found.
func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	if _, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics); err != nil {
		return nil, err
	}
	return cfg, nil
}

func configFlag(fs *flag.FlagSet) *string {
	p := fs.String("config", "", "configuration file (TOML)")
	fs.StringVar(p, "c", "", "shorthand for --config")
	return p
}

func cmdValidate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("validate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := configFlag(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *path == "" {
		fmt.Fprintln(stderr, "orderly validate: --config FILE is required")
		return 2
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		printErrors(stderr, err)
		return 2
	}
	fmt.Fprintf(stdout, "%s: ok (%d routes, topics %s)\n", *path, len(cfg.Routes), strings.Join(cfg.Kafka.Topics, ", "))
	return 0
}

// printErrors prints one error per line.
func printErrors(w io.Writer, err error) {
	for _, line := range strings.Split(strings.TrimSpace(err.Error()), "\n") {
		fmt.Fprintln(w, line)
	}
}

func cmdRun(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := configFlag(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *path == "" {
		fmt.Fprintln(stderr, "orderly run: --config FILE is required")
		return 2
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		printErrors(stderr, err)
		return 2
	}
	log := newLogger(cfg.Log, stderr)
	if len(cfg.UnsetEnv) > 0 {
		log.Warn("the configuration refers to environment variables that are not set; they expanded to \"\"",
			"variables", cfg.UnsetEnv)
	}
	svc, err := service.New(cfg, log, version)
	if err != nil {
		log.Error("unable to start", "error", err)
		return 1
	}
	defer svc.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
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
	log.Info("orderly starting", "version", version, "config", *path)
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
