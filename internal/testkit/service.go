package testkit

import (
	"context"
	"testing"
	"time"
)

// Service is what RunService runs: internal/service's Service, which
// testkit cannot import (the packages it wires import testkit in their
// tests).
type Service interface {
	Run(ctx context.Context) error
	Close()
}

// RunService runs s until the test ends: then it cancels s.Run, waits for it
// to return (an error, or none within 30 s, fails the test) and closes s.
// Cleanups run last first, so what must end before s stops (clients of its
// embedded broker, requests held at a target) is registered after
// RunService, or ended with defer.
func RunService(t testing.TB, s Service) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("service run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("service did not stop within 30 s of its cancel")
		}
		s.Close()
	})
}
