# Orderly. `make demo` and `make test` work on a fresh machine with Go and a C compiler.
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
FUZZTIME ?= 10s

.PHONY: all build build-bench test test-short demo demo-transform lint fuzz bench bench-go clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/orderly ./cmd/orderly

# The benchmark harness, a command of its own: not part of the service's binary.
build-bench:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/orderly-bench ./cmd/orderly-bench

# vet + every test with the race detector (the integration and process tests
# run an embedded Kafka-protocol broker in-process: no services needed). The
# end-to-end tests that need a tool which is missing (HAProxy, Jaeger) skip;
# they are listed at the end with how to enable them. The exit status is go
# test's.
SKIPPED := bin/skipped-tests.txt
test:
	$(GO) vet ./...
	@mkdir -p bin && rm -f $(SKIPPED)
	ORDERLY_SKIP_REPORT=$(CURDIR)/$(SKIPPED) $(GO) test -race -shuffle on -timeout 20m ./...; \
	status=$$?; \
	if [ -s $(SKIPPED) ]; then echo; echo "Skipped, a tool they need is missing:"; sed 's/^/  /' $(SKIPPED); fi; \
	exit $$status

test-short:
	$(GO) test -race -short ./...

demo: build
	./bin/orderly demo

# The same with a route that produces to Kafka: name events hashed to names_hashed.
demo-transform: build
	./bin/orderly demo -transform

lint:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Each native fuzz target for a short while (longer: make fuzz FUZZTIME=5m).
fuzz:
	scripts/fuzz.sh ./offsets FuzzTracker $(FUZZTIME)
	scripts/fuzz.sh ./offsets FuzzProgress $(FUZZTIME)
	scripts/fuzz.sh ./config  FuzzParse   $(FUZZTIME)
	scripts/fuzz.sh ./filters FuzzPlan    $(FUZZTIME)
	scripts/fuzz.sh ./filters FuzzDecodeJSON $(FUZZTIME)

# The performance scenarios against the raw-HTTP ceiling (see README, Performance).
bench: build-bench
	./bin/orderly-bench -scenario all

# The hot path's Go benchmarks: offsets tracker, route matching and rendering,
# lane hand-off and the partition worker, request building and sending.
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem ./offsets ./filters ./dispatcher ./httpclient

clean:
	rm -rf bin
