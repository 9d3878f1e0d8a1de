package azure_test

import (
	"bytes"
	"context"
	"flag"
	"log/slog"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
)

// Kept short for the default run; the 30 s outage scenario is
// go test ./internal/blobstore/azure -run Outage -v -args -outage 30s
var outage = flag.Duration("outage", 2*time.Second, "how long TestOutage keeps Azurite down")

// TestOutage stops Azurite while writes are in flight: the decorated store
// must ride it out and every write must land once the service is back.
func TestOutage(t *testing.T) {
	srv := azurite.EmulatorForTest(t) // an account cannot be stopped
	base := newStore(t, srv, azure.CopyAuto)
	s := blobstore.Stack(base, blobstore.StackConfig{
		Retry:  blobstore.RetryConfig{InitialInterval: 100 * time.Millisecond, MaxInterval: time.Second},
		Logger: slog.New(slog.DiscardHandler),
	})
	ctx, cancel := context.WithTimeout(context.Background(), *outage+2*time.Minute)
	defer cancel()
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.CreatePageBlob(ctx, "disk", 16<<20, nil); err != nil {
		t.Fatal(err)
	}
	if err := srv.Down(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	up := make(chan error, 1)
	go func() {
		time.Sleep(*outage)
		up <- srv.Up(ctx)
	}()

	data := blobstoretest.Random(1, 6<<20)
	if err := s.WritePages(ctx, "disk", 0, data); err != nil {
		t.Fatalf("WritePages across the outage: %v", err)
	}
	if err := s.PutBlob(ctx, "journal/1", data[:1000], blobstore.Metadata{"seq": "1"}); err != nil {
		t.Fatalf("PutBlob after the outage: %v", err)
	}
	if err := <-up; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(down); d < *outage {
		t.Fatalf("writes finished after %v, before the service came back", d)
	}
	got := make([]byte, len(data))
	if err := s.ReadPages(ctx, "disk", "", 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data written across the outage does not read back (err %v)", err)
	}
	t.Logf("outage %v: writes completed %v after the service went down", *outage, time.Since(down).Round(time.Millisecond))
}
