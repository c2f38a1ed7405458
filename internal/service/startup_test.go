package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
)

// TestNewRetriesAnAddressInUse: an admin address in use is retried until it
// is free; when ctx ends first, NewContext returns the address-in-use error.
func TestNewRetriesAnAddressInUse(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
brokers = "127.0.0.1:1"
[admin]
listen = %q
[[routes]]
name = "r"
  [[routes.requests]]
  url = "http://127.0.0.1:1/x"
`, held.Addr())), "orderly.toml")
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)

	t.Run("gives up when ctx ends", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
		defer cancel()
		s, err := NewContext(ctx, cfg, log, "test")
		if err == nil {
			s.Close()
			t.Fatal("NewContext succeeded on an address in use")
		}
		if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), "stopped retrying") {
			t.Fatalf("error %q, want an address in use and why the retries stopped", err)
		}
	})
	t.Run("starts once the address is free", func(t *testing.T) {
		done := make(chan error, 1)
		var s *Service
		go func() {
			var err error
			s, err = NewContext(context.Background(), cfg, log, "test")
			done <- err
		}()
		select {
		case err := <-done:
			t.Fatalf("NewContext returned while the address is in use: %v", err)
		case <-time.After(500 * time.Millisecond): // it retries meanwhile
		}
		held.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if s.admin.Addr() != held.Addr().String() {
				t.Fatalf("admin on %s, want %s", s.admin.Addr(), held.Addr())
			}
		case <-time.After(10 * time.Second):
			t.Fatal("NewContext still retrying 10 s after the address was freed")
		}
	})
}
