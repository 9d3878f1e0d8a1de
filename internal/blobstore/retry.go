package blobstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"time"
)

// Log attribute keys shared by the decorators.
const (
	logKeyOp       = "op"
	logKeyBlob     = "blob"
	logKeySnapshot = "snapshot"
	logKeyOffset   = "offset"
	logKeyBytes    = "bytes"
	logKeyDuration = "duration"
	logKeyErr      = "err"
	logKeyAttempt  = "attempt"
	logKeyWait     = "wait"
	logKeyMatch    = "match"
	logKeyETag     = "etag"
)

// RetryConfig tunes WithRetry. Zero fields take the documented defaults.
type RetryConfig struct {
	// InitialInterval before the first retry (default 500 ms).
	InitialInterval time.Duration
	// MaxInterval caps the backoff (default 10 s: with the jitter, a call
	// goes through at most 15 s after the account answers again, and the
	// journal's uploads, RPO with them, catch up at once; 30 s kept them
	// waiting up to 45 s).
	MaxInterval time.Duration
	// Multiplier grows the interval after each retry (default 2).
	Multiplier float64
	// Jitter randomises each wait uniformly within ±Jitter of the interval
	// so that many agents recovering from one outage do not retry in
	// lockstep (default 0.5; negative disables).
	Jitter float64
	// MaxElapsed bounds the total time spent on one call, retries included
	// (default 15 min; negative: retry until ctx is done). Outages longer
	// than this are the caller's to absorb (its cache keeps the data).
	MaxElapsed time.Duration
	// Logger receives one Warn record per retry and one Error record per
	// call given up (default: discard).
	Logger *slog.Logger
}

func (c RetryConfig) withDefaults() RetryConfig {
	if c.InitialInterval <= 0 {
		c.InitialInterval = 500 * time.Millisecond
	}
	if c.MaxInterval <= 0 {
		c.MaxInterval = 10 * time.Second
	}
	if c.Multiplier < 1 {
		c.Multiplier = 2
	}
	if c.Jitter == 0 {
		c.Jitter = 0.5
	}
	c.Jitter = min(max(c.Jitter, 0), 1)
	if c.MaxElapsed == 0 {
		c.MaxElapsed = 15 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// WithRetry returns s with failed calls retried with exponential backoff and
// jitter. Errors for which IsPermanent is true are returned at once. A call
// ends when it succeeds, when MaxElapsed has passed, or when ctx is done
// (then the error wraps ctx.Err() and the last failure).
//
// A delete that fails ambiguously (e.g. the reply was lost) and then finds
// the blob or snapshot gone on a retry reports success. Snapshot is retried
// too: a lost reply may leave an extra snapshot, which is preferable to a
// missing recovery point.
//
// A PutBlobIf retried after a failure and then refused with ErrConflict may
// be meeting its own earlier attempt, whose reply was lost: the blob is
// read back (Stat, then GetBlob: a version read after its ETag), and if it
// holds data the call reports success with that ETag. Metadata is not
// compared.
func WithRetry(s Store, cfg RetryConfig) Store {
	return &retryStore{s: s, cfg: cfg.withDefaults()}
}

type retryStore struct {
	s   Store
	cfg RetryConfig
}

// maxCorruptAttempts bounds the attempts at a call whose data keeps
// failing its checksum.
const maxCorruptAttempts = 3

// retry runs fn until it succeeds or retrying must stop. isDelete enables
// the NotFound-after-retry rule.
func (r *retryStore) retry(ctx context.Context, op, name string, isDelete bool, fn func() error) error {
	start := time.Now()
	interval := r.cfg.InitialInterval
	corrupt := 0
	for attempt := 1; ; attempt++ {
		err := fn()
		if err == nil {
			return nil
		}
		if isDelete && attempt > 1 && IsNotFound(err) {
			return nil
		}
		if IsPermanent(err) {
			return err
		}
		if errors.Is(err, ErrCorrupt) {
			// Damage in transit passes; damage at rest does not, and
			// each attempt downloads the blob again. Only corrupt
			// downloads count: after an outage's failed attempts, one
			// damaged in transit must not pass for damage at rest.
			if corrupt++; corrupt >= maxCorruptAttempts {
				return fmt.Errorf("%w (corrupt in %d downloads)", err, corrupt)
			}
		}
		if ctx.Err() != nil {
			if errors.Is(err, ctx.Err()) {
				return err
			}
			return fmt.Errorf("%w (last error: %w)", ctx.Err(), err)
		}
		wait := interval
		if j := r.cfg.Jitter; j > 0 {
			wait = time.Duration(float64(wait) * (1 - j + 2*j*rand.Float64()))
		}
		elapsed := time.Since(start)
		if r.cfg.MaxElapsed > 0 && elapsed+wait > r.cfg.MaxElapsed {
			r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "blobstore: giving up",
				slog.String(logKeyOp, op), slog.String(logKeyBlob, name), slog.Int(logKeyAttempt, attempt),
				slog.Duration(logKeyDuration, elapsed), slog.Any(logKeyErr, err))
			return fmt.Errorf("%w (gave up after %d attempts in %v)", err, attempt, elapsed.Round(time.Millisecond))
		}
		r.cfg.Logger.LogAttrs(ctx, slog.LevelWarn, "blobstore: retrying",
			slog.String(logKeyOp, op), slog.String(logKeyBlob, name), slog.Int(logKeyAttempt, attempt),
			slog.Duration(logKeyWait, wait), slog.Any(logKeyErr, err))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (last error: %w)", ctx.Err(), err)
		case <-t.C:
		}
		interval = min(time.Duration(float64(interval)*r.cfg.Multiplier), r.cfg.MaxInterval)
	}
}

func retryV[T any](r *retryStore, ctx context.Context, op, name string, fn func() (T, error)) (T, error) {
	var v T
	err := r.retry(ctx, op, name, false, func() error {
		var err error
		v, err = fn()
		return err
	})
	return v, err
}

func (r *retryStore) EnsureContainer(ctx context.Context) error {
	return r.retry(ctx, "ensure-container", "", false, func() error { return r.s.EnsureContainer(ctx) })
}

// resent charges a write limit above for each attempt after the first of
// an upload of n bytes (chargeResend), then runs fn.
func resent(ctx context.Context, n int, fn func() error) func() error {
	first := true
	return func() error {
		if !first {
			if err := chargeResend(ctx, n); err != nil {
				return err
			}
		}
		first = false
		return fn()
	}
}

func (r *retryStore) PutBlob(ctx context.Context, name string, data []byte, md Metadata) error {
	return r.retry(ctx, "put-blob", name, false, resent(ctx, len(data), func() error { return r.s.PutBlob(ctx, name, data, md) }))
}

func (r *retryStore) PutBlobIf(ctx context.Context, name string, data []byte, md Metadata, match string) (string, error) {
	var etag string
	attempts := 0
	err := r.retry(ctx, "put-blob-if", name, false, resent(ctx, len(data), func() error {
		attempts++
		var err error
		etag, err = r.s.PutBlobIf(ctx, name, data, md, match)
		return err
	}))
	if attempts == 1 || !errors.Is(err, ErrConflict) {
		return etag, err
	}
	// A read-back that fails proves no conflict: the error says so
	// without wrapping ErrConflict.
	got, etagNow, rerr := ReadBack(ctx, r, name)
	if rerr != nil {
		return "", fmt.Errorf("put-blob-if %s: conflict after a failed attempt, which may have succeeded; reading it back failed: %w", name, rerr)
	}
	if !bytes.Equal(got, data) {
		return "", err
	}
	r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "blobstore: conditional put found done by an earlier attempt",
		slog.String(logKeyOp, "put-blob-if"), slog.String(logKeyBlob, name), slog.Int(logKeyAttempt, attempts))
	return etagNow, nil
}

// ReadBack returns blob name's content and an ETag no newer than it: the
// ETag is read first, so content equal to a write of the reader's shows
// that write landed, at that ETag or before a later one (a conditional
// write on it then fails safe).
func ReadBack(ctx context.Context, s Store, name string) (data []byte, etag string, err error) {
	info, err := s.Stat(ctx, name)
	if err != nil {
		return nil, "", err
	}
	data, err = s.GetBlob(ctx, name)
	if err != nil {
		return nil, "", err
	}
	return data, info.ETag, nil
}

func (r *retryStore) GetBlob(ctx context.Context, name string) ([]byte, error) {
	return retryV(r, ctx, "get-blob", name, func() ([]byte, error) { return r.s.GetBlob(ctx, name) })
}

func (r *retryStore) GetBlobRange(ctx context.Context, name string, offset int64, p []byte) (int, error) {
	var n int
	err := r.retry(ctx, "get-blob-range", name, false, func() error {
		var err error
		n, err = r.s.GetBlobRange(ctx, name, offset, p)
		if err == io.EOF {
			// Not a failure: io.ReaderAt end-of-blob signal.
			return nil
		}
		return err
	})
	if err == nil && n < len(p) {
		return n, io.EOF
	}
	return n, err
}

func (r *retryStore) ListBlobs(ctx context.Context, prefix string) ([]BlobInfo, error) {
	return retryV(r, ctx, "list-blobs", prefix, func() ([]BlobInfo, error) { return r.s.ListBlobs(ctx, prefix) })
}

func (r *retryStore) ListDirs(ctx context.Context, prefix string) ([]string, error) {
	return retryV(r, ctx, "list-dirs", prefix, func() ([]string, error) { return r.s.ListDirs(ctx, prefix) })
}

func (r *retryStore) Stat(ctx context.Context, name string) (BlobInfo, error) {
	return retryV(r, ctx, "stat", name, func() (BlobInfo, error) { return r.s.Stat(ctx, name) })
}

func (r *retryStore) SetMetadata(ctx context.Context, name string, md Metadata) error {
	return r.retry(ctx, "set-metadata", name, false, func() error { return r.s.SetMetadata(ctx, name, md) })
}

func (r *retryStore) DeleteBlob(ctx context.Context, name string) error {
	return r.retry(ctx, "delete-blob", name, true, func() error { return r.s.DeleteBlob(ctx, name) })
}

func (r *retryStore) CreatePageBlob(ctx context.Context, name string, size int64, md Metadata) error {
	return r.retry(ctx, "create-page-blob", name, false, func() error { return r.s.CreatePageBlob(ctx, name, size, md) })
}

func (r *retryStore) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	return r.retry(ctx, "write-pages", name, false, resent(ctx, len(data), func() error { return r.s.WritePages(ctx, name, offset, data) }))
}

func (r *retryStore) ClearPages(ctx context.Context, name string, offset, length int64) error {
	return r.retry(ctx, "clear-pages", name, false, func() error { return r.s.ClearPages(ctx, name, offset, length) })
}

func (r *retryStore) ReadPages(ctx context.Context, name, snapshot string, offset int64, p []byte) error {
	return r.retry(ctx, "read-pages", name, false, func() error { return r.s.ReadPages(ctx, name, snapshot, offset, p) })
}

func (r *retryStore) GetPageRanges(ctx context.Context, name, snapshot string, offset, length int64) ([]PageRange, error) {
	return retryV(r, ctx, "get-page-ranges", name, func() ([]PageRange, error) {
		return r.s.GetPageRanges(ctx, name, snapshot, offset, length)
	})
}

func (r *retryStore) ResizePageBlob(ctx context.Context, name string, size int64) error {
	return r.retry(ctx, "resize-page-blob", name, false, func() error { return r.s.ResizePageBlob(ctx, name, size) })
}

func (r *retryStore) Snapshot(ctx context.Context, name string, md Metadata) (SnapshotInfo, error) {
	return retryV(r, ctx, "snapshot", name, func() (SnapshotInfo, error) { return r.s.Snapshot(ctx, name, md) })
}

func (r *retryStore) ListSnapshots(ctx context.Context, name string) ([]SnapshotInfo, error) {
	return retryV(r, ctx, "list-snapshots", name, func() ([]SnapshotInfo, error) { return r.s.ListSnapshots(ctx, name) })
}

func (r *retryStore) DeleteSnapshot(ctx context.Context, name, snapshot string) error {
	return r.retry(ctx, "delete-snapshot", name, true, func() error { return r.s.DeleteSnapshot(ctx, name, snapshot) })
}

func (r *retryStore) CopyFromSnapshot(ctx context.Context, src, snapshot, dst string, md Metadata) error {
	return r.retry(ctx, "copy-from-snapshot", dst, false, func() error { return r.s.CopyFromSnapshot(ctx, src, snapshot, dst, md) })
}

func (r *retryStore) ClaimPageBlob(ctx context.Context, name string, n int64) error {
	return r.retry(ctx, "claim-page-blob", name, false, func() error { return r.s.ClaimPageBlob(ctx, name, n) })
}
