package azurite

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

// ForTest returns a storage endpoint for t.
//
// If AZURE_STORAGE_CONNECTION_STRING is set, the returned Server only carries
// that connection string (Stop is a no-op, Emulated reports false), so the
// same tests run against a real account. Otherwise the pinned Azurite is
// installed if needed and started with a workspace in t.TempDir(); it is
// stopped by t.Cleanup. Without node/npm the test is skipped, or fails when
// CI=true so that CI cannot silently lose coverage.
func ForTest(t testing.TB) *Server {
	t.Helper()
	if cs := os.Getenv(EnvConnectionString); cs != "" {
		return &Server{connStr: cs}
	}
	return EmulatorForTest(t)
}

// EmulatorForTest starts an Azurite of t's own even when
// AZURE_STORAGE_CONNECTION_STRING names a real account: for tests that
// stop the service (an account cannot be stopped), so that they run
// everywhere instead of skipping.
func EmulatorForTest(t testing.TB) *Server {
	t.Helper()
	// npm install on a cold cache takes ~20 s; allow for a slow mirror.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := Start(ctx, Options{Location: t.TempDir()})
	if errors.Is(err, ErrNoNode) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("azurite: %v (CI=true, refusing to skip)", err)
		}
		t.Skipf("azurite: %v", err)
	}
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() { _ = s.Stop() })
	return s
}
