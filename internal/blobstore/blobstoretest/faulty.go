package blobstoretest

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
)

// ErrInjected is the (retryable) error returned by injected faults.
var ErrInjected = errors.New("blobstoretest: injected fault")

// Faulty wraps a Store and makes chosen calls fail, to test code that must
// survive storage failures (retry decorator, callers' caches). Calls are
// numbered from 1 in the order they reach Faulty, across all methods.
type Faulty struct {
	s blobstore.Store

	mu       sync.Mutex
	calls    int
	failures int
	nth      map[int]bool // call number -> lose reply (operation done, error returned)
	until    time.Time
	err      error
}

var _ blobstore.Store = (*Faulty)(nil)

// NewFaulty returns s wrapped; it injects nothing until told to.
func NewFaulty(s blobstore.Store) *Faulty {
	return &Faulty{s: s, nth: make(map[int]bool), err: ErrInjected}
}

// SetError changes the injected error (default ErrInjected), e.g. to
// blobstore.Permanent(...) to check that it is not retried.
func (f *Faulty) SetError(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

// FailNth makes call number n fail without reaching the store.
func (f *Faulty) FailNth(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nth[n] = false
}

// LoseReplyNth makes call number n reach the store and then fail, as when
// the service acted but the reply was lost.
func (f *Faulty) LoseReplyNth(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nth[n] = true
}

// FailFor makes every call fail without reaching the store for d from now:
// an outage.
func (f *Faulty) FailFor(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.until = time.Now().Add(d)
}

// Calls returns the number of calls so far.
func (f *Faulty) Calls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// Failures returns the number of injected failures so far.
func (f *Faulty) Failures() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failures
}

// before reports whether to fail after the call, or the error to fail
// with instead of making it.
func (f *Faulty) before() (after bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	lose, ok := f.nth[f.calls]
	switch {
	case ok && lose:
		f.failures++
		return true, nil
	case ok || time.Now().Before(f.until):
		f.failures++
		return false, f.err
	}
	return false, nil
}

// do runs one call with fault injection.
func (f *Faulty) do(call func() error) error {
	after, err := f.before()
	if err != nil {
		return err
	}
	err = call()
	if after && err == nil {
		f.mu.Lock()
		err = f.err
		f.mu.Unlock()
	}
	return err
}

func doV[T any](f *Faulty, call func() (T, error)) (T, error) {
	var v T
	err := f.do(func() error {
		var err error
		v, err = call()
		return err
	})
	return v, err
}

func (f *Faulty) EnsureContainer(ctx context.Context) error {
	return f.do(func() error { return f.s.EnsureContainer(ctx) })
}

func (f *Faulty) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	return f.do(func() error { return f.s.PutBlob(ctx, name, data, md) })
}

func (f *Faulty) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	return doV(f, func() (string, error) { return f.s.PutBlobIf(ctx, name, data, md, match) })
}

func (f *Faulty) GetBlob(ctx context.Context, name string) ([]byte, error) {
	return doV(f, func() ([]byte, error) { return f.s.GetBlob(ctx, name) })
}

func (f *Faulty) GetBlobRange(ctx context.Context, name string, offset int64, p []byte) (int, error) {
	return doV(f, func() (int, error) { return f.s.GetBlobRange(ctx, name, offset, p) })
}

func (f *Faulty) ListBlobs(ctx context.Context, prefix string) ([]blobstore.BlobInfo, error) {
	return doV(f, func() ([]blobstore.BlobInfo, error) { return f.s.ListBlobs(ctx, prefix) })
}

func (f *Faulty) ListDirs(ctx context.Context, prefix string) ([]string, error) {
	return doV(f, func() ([]string, error) { return f.s.ListDirs(ctx, prefix) })
}

func (f *Faulty) Stat(ctx context.Context, name string) (blobstore.BlobInfo, error) {
	return doV(f, func() (blobstore.BlobInfo, error) { return f.s.Stat(ctx, name) })
}

func (f *Faulty) SetMetadata(ctx context.Context, name string, md blobstore.Metadata) error {
	return f.do(func() error { return f.s.SetMetadata(ctx, name, md) })
}

func (f *Faulty) DeleteBlob(ctx context.Context, name string) error {
	return f.do(func() error { return f.s.DeleteBlob(ctx, name) })
}

func (f *Faulty) CreatePageBlob(ctx context.Context, name string, size int64, md blobstore.Metadata) error {
	return f.do(func() error { return f.s.CreatePageBlob(ctx, name, size, md) })
}

func (f *Faulty) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	return f.do(func() error { return f.s.WritePages(ctx, name, offset, data) })
}

func (f *Faulty) ClearPages(ctx context.Context, name string, offset, length int64) error {
	return f.do(func() error { return f.s.ClearPages(ctx, name, offset, length) })
}

func (f *Faulty) ReadPages(ctx context.Context, name, snapshot string, offset int64, p []byte) error {
	return f.do(func() error { return f.s.ReadPages(ctx, name, snapshot, offset, p) })
}

func (f *Faulty) GetPageRanges(ctx context.Context, name, snapshot string, offset, length int64) ([]blobstore.PageRange, error) {
	return doV(f, func() ([]blobstore.PageRange, error) { return f.s.GetPageRanges(ctx, name, snapshot, offset, length) })
}

func (f *Faulty) ResizePageBlob(ctx context.Context, name string, size int64) error {
	return f.do(func() error { return f.s.ResizePageBlob(ctx, name, size) })
}

func (f *Faulty) Snapshot(ctx context.Context, name string, md blobstore.Metadata) (blobstore.SnapshotInfo, error) {
	return doV(f, func() (blobstore.SnapshotInfo, error) { return f.s.Snapshot(ctx, name, md) })
}

func (f *Faulty) ListSnapshots(ctx context.Context, name string) ([]blobstore.SnapshotInfo, error) {
	return doV(f, func() ([]blobstore.SnapshotInfo, error) { return f.s.ListSnapshots(ctx, name) })
}

func (f *Faulty) DeleteSnapshot(ctx context.Context, name, snapshot string) error {
	return f.do(func() error { return f.s.DeleteSnapshot(ctx, name, snapshot) })
}

func (f *Faulty) CopyFromSnapshot(ctx context.Context, src, snapshot, dst string, md blobstore.Metadata) error {
	return f.do(func() error { return f.s.CopyFromSnapshot(ctx, src, snapshot, dst, md) })
}

func (f *Faulty) ClaimPageBlob(ctx context.Context, name string, n int64) error {
	return f.do(func() error { return f.s.ClaimPageBlob(ctx, name, n) })
}
