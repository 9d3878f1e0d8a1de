package blobstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
)

// fast retries for tests.
var fastRetry = blobstore.RetryConfig{InitialInterval: 5 * time.Millisecond, MaxInterval: 20 * time.Millisecond}

func newFaulty(t *testing.T) (*blobstoretest.Faulty, *mem.Store) {
	t.Helper()
	m := mem.New()
	if err := m.EnsureContainer(context.Background()); err != nil {
		t.Fatal(err)
	}
	return blobstoretest.NewFaulty(m), m
}

func TestRetryRecoversFromFailedCalls(t *testing.T) {
	f, m := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	f.FailNth(1)
	f.FailNth(2)
	ctx := context.Background()
	if err := s.PutBlob(ctx, "seg", []byte("data"), nil); err != nil {
		t.Fatalf("PutBlob through 2 failures: %v", err)
	}
	if f.Calls() != 3 {
		t.Fatalf("calls = %d, want 3", f.Calls())
	}
	if got, err := m.GetBlob(ctx, "seg"); err != nil || string(got) != "data" {
		t.Fatalf("stored %q, %v", got, err)
	}
}

func TestRetryDoesNotRetryPermanentErrors(t *testing.T) {
	f, _ := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	ctx := context.Background()
	if _, err := s.GetBlob(ctx, "missing"); !blobstore.IsNotFound(err) || f.Calls() != 1 {
		t.Fatalf("GetBlob(missing): err=%v calls=%d, want not found after 1 call", err, f.Calls())
	}
	if err := s.WritePages(ctx, "x", 3, make([]byte, 512)); !errors.Is(err, blobstore.ErrInvalid) || f.Calls() != 2 {
		t.Fatalf("misaligned WritePages: err=%v calls=%d, want ErrInvalid after 1 call", err, f.Calls())
	}
	denied := errors.New("403 AuthorizationFailure")
	f.SetError(blobstore.Permanent(denied))
	f.FailNth(3)
	if err := s.PutBlob(ctx, "b", nil, nil); !errors.Is(err, denied) || f.Calls() != 3 {
		t.Fatalf("permanent failure: err=%v calls=%d, want it returned after 1 call", err, f.Calls())
	}
}

// Data that keeps failing its checksum is damaged at rest, not in
// transit: it was downloaded again for 15 minutes.
func TestRetryBoundsCorruptDownloads(t *testing.T) {
	f, _ := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	f.SetError(fmt.Errorf("md5 of the body: %w", blobstore.ErrCorrupt))
	f.FailFor(time.Hour)
	_, err := s.GetBlob(context.Background(), "seg")
	if !errors.Is(err, blobstore.ErrCorrupt) || f.Calls() != 3 {
		t.Fatalf("err = %v after %d calls, want ErrCorrupt after 3", err, f.Calls())
	}
}

// scripted fails GetBlob with errs in turn, then serves it.
type scripted struct {
	blobstore.Store
	errs  []error
	calls int
}

func (s *scripted) GetBlob(ctx context.Context, name string) ([]byte, error) {
	s.calls++
	if len(s.errs) > 0 {
		err := s.errs[0]
		s.errs = s.errs[1:]
		return nil, err
	}
	return s.Store.GetBlob(ctx, name)
}

// Only corrupt downloads count toward the bound: after an outage's
// failed attempts, one download damaged in transit is retried.
func TestRetryCountsOnlyCorruptDownloads(t *testing.T) {
	_, m := newFaulty(t)
	if err := m.PutBlob(context.Background(), "seg", []byte("data"), nil); err != nil {
		t.Fatal(err)
	}
	corrupt := fmt.Errorf("md5 of the body: %w", blobstore.ErrCorrupt)
	st := &scripted{Store: m, errs: []error{blobstoretest.ErrInjected, blobstoretest.ErrInjected, corrupt, blobstoretest.ErrInjected, corrupt}}
	got, err := blobstore.WithRetry(st, fastRetry).GetBlob(context.Background(), "seg")
	if err != nil || string(got) != "data" || st.calls != 6 {
		t.Fatalf("GetBlob = %q, %v after %d calls; want the data on the 6th", got, err, st.calls)
	}
}

func TestRetryRidesOutOutage(t *testing.T) {
	f, _ := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	f.FailFor(300 * time.Millisecond)
	start := time.Now()
	if err := s.PutBlob(context.Background(), "seg", []byte("x"), nil); err != nil {
		t.Fatalf("PutBlob across a 300 ms outage: %v", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("succeeded after %v, during the outage", d)
	}
	// About 15 with <= 20 ms backoff on an idle host; a loaded one
	// may delay the waits, but the call must have been retried.
	if f.Failures() < 2 {
		t.Fatalf("only %d failed attempts in a 300 ms outage with <= 20 ms backoff", f.Failures())
	}
}

func TestRetryGivesUpAfterMaxElapsed(t *testing.T) {
	f, _ := newFaulty(t)
	cfg := fastRetry
	cfg.MaxElapsed = 200 * time.Millisecond
	s := blobstore.WithRetry(f, cfg)
	f.FailFor(time.Hour)
	start := time.Now()
	err := s.PutBlob(context.Background(), "seg", []byte("x"), nil)
	if !errors.Is(err, blobstoretest.ErrInjected) {
		t.Fatalf("err = %v, want the last injected error", err)
	}
	// The outage lasts an hour: giving up within seconds is MaxElapsed
	// at work (a loaded host may delay the last attempt).
	if d := time.Since(start); d > 5*time.Second || d < 150*time.Millisecond {
		t.Fatalf("gave up after %v, want ~200 ms", d)
	}
}

func TestRetryStopsWhenContextDone(t *testing.T) {
	f, _ := newFaulty(t)
	cfg := fastRetry
	cfg.MaxElapsed = -1 // only ctx bounds it
	s := blobstore.WithRetry(f, cfg)
	f.FailFor(time.Hour)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := s.PutBlob(ctx, "seg", []byte("x"), nil)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, blobstoretest.ErrInjected) {
		t.Fatalf("err = %v, want DeadlineExceeded wrapping the last failure", err)
	}
}

func TestRetryDeleteWithLostReply(t *testing.T) {
	f, m := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	ctx := context.Background()
	if err := s.PutBlob(ctx, "seg", []byte("x"), nil); err != nil { // call 1
		t.Fatal(err)
	}
	f.LoseReplyNth(2)
	if err := s.DeleteBlob(ctx, "seg"); err != nil {
		t.Fatalf("DeleteBlob whose first reply was lost: %v, want success", err)
	}
	if _, err := m.Stat(ctx, "seg"); !blobstore.IsNotFound(err) {
		t.Fatalf("blob still there: %v", err)
	}
	// Without an earlier failure, deleting a missing blob is NotFound.
	if err := s.DeleteBlob(ctx, "seg"); !blobstore.IsNotFound(err) {
		t.Fatalf("DeleteBlob(missing) = %v, want not found", err)
	}
}

// A conditional put whose reply was lost meets its own write as a
// conflict on the retry: that is success. A real conflict after a lost
// reply (another writer came in between) stays one, and a conflict is
// never retried.
func TestRetryPutBlobIfWithLostReply(t *testing.T) {
	f, m := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	ctx := context.Background()
	f.LoseReplyNth(1)
	e1, err := s.PutBlobIf(ctx, "man", []byte("v1"), nil, "")
	if err != nil {
		t.Fatalf("create whose reply was lost: %v, want success", err)
	}
	if info, err := m.Stat(ctx, "man"); err != nil || info.ETag != e1 {
		t.Fatalf("returned ETag %q, blob has %q (%v)", e1, info.ETag, err)
	}
	calls := f.Calls()
	f.LoseReplyNth(calls + 1)
	e2, err := s.PutBlobIf(ctx, "man", []byte("v2"), nil, e1)
	if err != nil || e2 == e1 {
		t.Fatalf("update whose reply was lost: ETag %q, %v; want success with a new ETag", e2, err)
	}
	if got, _ := m.GetBlob(ctx, "man"); string(got) != "v2" {
		t.Fatalf("blob holds %q, want v2", got)
	}

	// The reply is lost, and another writer overwrites before the retry.
	other := &overwriteAfter{Store: f, name: "man", data: []byte("other")}
	s = blobstore.WithRetry(other, fastRetry)
	f.LoseReplyNth(f.Calls() + 1)
	if _, err := s.PutBlobIf(ctx, "man", []byte("v3"), nil, e2); !errors.Is(err, blobstore.ErrConflict) {
		t.Fatalf("PutBlobIf overtaken by another writer after a lost reply: %v, want ErrConflict", err)
	}
	if got, _ := m.GetBlob(ctx, "man"); string(got) != "other" {
		t.Fatalf("blob holds %q, want the other writer's", got)
	}

	// Without an earlier failure a conflict is returned at once.
	calls = f.Calls()
	s = blobstore.WithRetry(f, fastRetry)
	if _, err := s.PutBlobIf(ctx, "man", []byte("v4"), nil, e2); !errors.Is(err, blobstore.ErrConflict) || f.Calls() != calls+1 {
		t.Fatalf("stale PutBlobIf: %v after %d calls, want ErrConflict after 1", err, f.Calls()-calls)
	}
}

// overwriteAfter puts data into name after the first PutBlobIf that fails
// (and before its retry), as another writer would.
type overwriteAfter struct {
	blobstore.Store
	name string
	data []byte
	done bool
}

func (o *overwriteAfter) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	etag, err := o.Store.PutBlobIf(ctx, name, data, md, match)
	if err != nil && !o.done {
		o.done = true
		if perr := o.Store.PutBlob(ctx, o.name, o.data, nil); perr != nil {
			return "", perr
		}
	}
	return etag, err
}

func TestRetryPassesEOFThrough(t *testing.T) {
	f, _ := newFaulty(t)
	s := blobstore.WithRetry(f, fastRetry)
	ctx := context.Background()
	if err := s.PutBlob(ctx, "b", []byte("abc"), nil); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 10)
	n, err := s.GetBlobRange(ctx, "b", 1, p)
	if n != 2 || err != io.EOF || f.Calls() != 2 {
		t.Fatalf("GetBlobRange at end: n=%d err=%v calls=%d, want 2, io.EOF, no retry", n, err, f.Calls())
	}
}

// recorder captures log records.
type recorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.records = append(r.records, rec.Clone())
	return nil
}
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *recorder) WithGroup(string) slog.Handler      { return r }

func (r *recorder) attr(msg, key string) []slog.Value {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []slog.Value
	for _, rec := range r.records {
		if rec.Message != msg {
			continue
		}
		rec.Attrs(func(a slog.Attr) bool {
			if a.Key == key {
				out = append(out, a.Value)
			}
			return true
		})
	}
	return out
}

func TestRetryBackoffSchedule(t *testing.T) {
	f, _ := newFaulty(t)
	rec := &recorder{}
	s := blobstore.WithRetry(f, blobstore.RetryConfig{
		InitialInterval: 2 * time.Millisecond, MaxInterval: 8 * time.Millisecond, Multiplier: 2,
		Jitter: -1, Logger: slog.New(rec),
	})
	for i := 1; i <= 5; i++ {
		f.FailNth(i)
	}
	if err := s.PutBlob(context.Background(), "b", nil, nil); err != nil {
		t.Fatal(err)
	}
	var waits []time.Duration
	for _, v := range rec.attr("blobstore: retrying", "wait") {
		waits = append(waits, v.Duration())
	}
	want := []time.Duration{2, 4, 8, 8, 8}
	for i := range want {
		want[i] *= time.Millisecond
	}
	if !slices.Equal(waits, want) {
		t.Fatalf("waits = %v, want %v (exponential, capped)", waits, want)
	}

	// With jitter the waits spread around the interval.
	rec2 := &recorder{}
	s = blobstore.WithRetry(f, blobstore.RetryConfig{InitialInterval: time.Millisecond, MaxInterval: time.Millisecond,
		Jitter: 0.5, Logger: slog.New(rec2)})
	f.FailFor(50 * time.Millisecond)
	if err := s.PutBlob(context.Background(), "b", nil, nil); err != nil {
		t.Fatal(err)
	}
	seen := map[time.Duration]bool{}
	for _, v := range rec2.attr("blobstore: retrying", "wait") {
		d := v.Duration()
		if d < 500*time.Microsecond || d > 1500*time.Microsecond {
			t.Fatalf("jittered wait %v outside [0.5, 1.5] ms", d)
		}
		seen[d] = true
	}
	if len(seen) < 3 {
		t.Fatalf("jitter produced only %d distinct waits", len(seen))
	}
}

func TestWriteLimit(t *testing.T) {
	f, m := newFaulty(t)
	ctx := context.Background()
	if err := m.CreatePageBlob(ctx, "d", 4<<20, nil); err != nil {
		t.Fatal(err)
	}
	const burst = 256 << 10
	s := blobstore.WithWriteLimit(f, 4<<20, burst) // 4 MiB/s
	data := blobstoretest.Random(1, 1<<20)
	start := time.Now()
	if err := s.WritePages(ctx, "d", 0, data); err != nil {
		t.Fatal(err)
	}
	// The first burst is free; the remaining 768 KiB take 187.5 ms.
	if d := time.Since(start); d < 170*time.Millisecond || d > 2*time.Second {
		t.Fatalf("1 MiB at 4 MiB/s with 256 KiB burst took %v, want ~190 ms", d)
	}
	if f.Calls() != 4 {
		t.Fatalf("WritePages reached the store in %d calls, want 4 chunks of the burst size", f.Calls())
	}
	got := make([]byte, len(data))
	if err := m.ReadPages(ctx, "d", "", 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("chunked write does not read back (err %v)", err)
	}
	start = time.Now()
	if err := s.PutBlob(ctx, "b", make([]byte, 512<<10), nil); err != nil {
		t.Fatal(err)
	}
	// The bucket refills up to its burst between the two writes (the
	// read-back above takes time on a loaded machine): at least the other
	// 256 KiB wait, 62.5 ms.
	if d := time.Since(start); d < 60*time.Millisecond {
		t.Fatalf("512 KiB PutBlob at 4 MiB/s with a 256 KiB burst took %v, want at least 62.5 ms", d)
	}
	// Reads are not limited: 20 MiB at 4 MiB/s would take about 5 s.
	start = time.Now()
	for range 20 {
		if err := s.ReadPages(ctx, "d", "", 0, got); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("reads were throttled: %v", d)
	}
}

func TestLoggingHasNoSecrets(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m := mem.New()
	s := blobstore.WithLogging(m, log)
	ctx := context.Background()
	_ = s.EnsureContainer(ctx)
	if err := s.PutBlob(ctx, "journal/7", []byte("abc"), blobstore.Metadata{"token": "s3cr3t"}); err != nil {
		t.Fatal(err)
	}
	_, _ = s.GetBlob(ctx, "missing")
	out := buf.String()
	for _, want := range []string{"op=put-blob", "blob=journal/7", "bytes=3", "op=get-blob", "blob=missing", "err="} {
		if !strings.Contains(out, want) {
			t.Fatalf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "s3cr3t") {
		t.Fatalf("log contains a metadata value:\n%s", out)
	}
}

func TestStackRetriesOnlyTheFailedChunk(t *testing.T) {
	f, m := newFaulty(t)
	ctx := context.Background()
	if err := m.CreatePageBlob(ctx, "d", 16<<20, nil); err != nil {
		t.Fatal(err)
	}
	s := blobstore.Stack(f, blobstore.StackConfig{Retry: fastRetry})
	f.FailNth(2)
	data := blobstoretest.Random(2, 2*blobstore.MaxPutPage+4096) // 3 chunks
	if err := s.WritePages(ctx, "d", 0, data); err != nil {
		t.Fatal(err)
	}
	if f.Calls() != 4 {
		t.Fatalf("store saw %d calls, want 3 chunks + 1 retry of the failed chunk", f.Calls())
	}
	got := make([]byte, len(data))
	if err := m.ReadPages(ctx, "d", "", 0, got); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data does not read back (err %v)", err)
	}
}

// The decorated stack is still a conforming Store.
func TestStackConformance(t *testing.T) {
	blobstoretest.Run(t, func(t *testing.T) blobstore.Store {
		return blobstore.Stack(mem.New(), blobstore.StackConfig{Retry: fastRetry, WriteBytesPerSec: 1 << 30,
			Logger: slog.New(slog.DiscardHandler)})
	}, blobstoretest.Options{})
}

// A control upload (a manifest) is not queued behind the segments being
// drained at the limit, but is charged: the next large write waits for it.
// Other small uploads (small segments) stay limited.
func TestWriteLimitSmallWritesNotQueued(t *testing.T) {
	_, m := newFaulty(t)
	s := blobstore.WithWriteLimit(m, 256<<10, 0) // 256 KiB/s, 4 MiB burst
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := s.PutBlob(ctx, "first", make([]byte, 4<<20), nil); err != nil {
		t.Fatal(err) // the burst: at once
	}
	for i := range 4 { // 32 MiB queued: about 128 s
		go s.PutBlob(ctx, fmt.Sprint("seg", i), make([]byte, 8<<20), nil)
	}
	time.Sleep(50 * time.Millisecond)
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	defer wcancel()
	start := time.Now()
	if _, err := s.PutBlobIf(blobstore.Unmetered(wctx), "m/manifest.json", make([]byte, 4<<10), nil, ""); err != nil {
		t.Fatalf("manifest write behind queued segments: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("manifest write took %v behind queued segments", d)
	}
	sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
	defer scancel()
	if err := s.PutBlob(sctx, "m/journal/small", make([]byte, 4<<10), nil); err == nil {
		t.Fatal("a small segment went past the queued ones")
	}
}

// Small page writes, the bulk of a replica's traffic, stay limited.
func TestWriteLimitSmallPagesLimited(t *testing.T) {
	_, m := newFaulty(t)
	ctx := context.Background()
	if err := m.CreatePageBlob(ctx, "d", 4<<20, nil); err != nil {
		t.Fatal(err)
	}
	s := blobstore.WithWriteLimit(m, 1<<20, 64<<10) // 1 MiB/s, 64 KiB burst
	start := time.Now()
	for i := range 8 { // 512 KiB in 64 KiB pages: about 0.44 s past the burst
		if err := s.WritePages(ctx, "d", int64(i)<<16, make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("512 KiB of 64 KiB pages at 1 MiB/s took %v, want at least 0.4 s", d)
	}
}
