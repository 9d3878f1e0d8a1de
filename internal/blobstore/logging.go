package blobstore

import (
	"context"
	"log/slog"
	"time"
)

// WithLogging returns s with every call logged at Debug level: operation,
// blob, snapshot/offset/bytes where relevant, duration and error. Metadata
// values and credentials are never logged. Nothing is formatted when Debug
// is disabled.
func WithLogging(s Store, log *slog.Logger) Store {
	if log == nil {
		return s
	}
	return &logStore{s: s, log: log}
}

type logStore struct {
	s   Store
	log *slog.Logger
}

// done logs one call; extra holds call-specific attributes.
func (l *logStore) done(ctx context.Context, op, name string, start time.Time, err error, extra ...slog.Attr) {
	if !l.log.Enabled(ctx, slog.LevelDebug) {
		return
	}
	attrs := make([]slog.Attr, 0, 4+len(extra))
	attrs = append(attrs, slog.String(logKeyOp, op), slog.String(logKeyBlob, name))
	attrs = append(attrs, extra...)
	attrs = append(attrs, slog.Duration(logKeyDuration, time.Since(start)))
	if err != nil {
		attrs = append(attrs, slog.Any(logKeyErr, err))
	}
	l.log.LogAttrs(ctx, slog.LevelDebug, "blobstore call", attrs...)
}

func (l *logStore) EnsureContainer(ctx context.Context) error {
	t := time.Now()
	err := l.s.EnsureContainer(ctx)
	l.done(ctx, "ensure-container", "", t, err)
	return err
}

func (l *logStore) PutBlob(ctx context.Context, name string, data []byte, md Metadata) error {
	t := time.Now()
	err := l.s.PutBlob(ctx, name, data, md)
	l.done(ctx, "put-blob", name, t, err, slog.Int(logKeyBytes, len(data)))
	return err
}

func (l *logStore) PutBlobIf(ctx context.Context, name string, data []byte, md Metadata, match string) (string, error) {
	t := time.Now()
	etag, err := l.s.PutBlobIf(ctx, name, data, md, match)
	l.done(ctx, "put-blob-if", name, t, err, slog.Int(logKeyBytes, len(data)), slog.String(logKeyMatch, match), slog.String(logKeyETag, etag))
	return etag, err
}

func (l *logStore) GetBlob(ctx context.Context, name string) ([]byte, error) {
	t := time.Now()
	b, err := l.s.GetBlob(ctx, name)
	l.done(ctx, "get-blob", name, t, err, slog.Int(logKeyBytes, len(b)))
	return b, err
}

func (l *logStore) GetBlobRange(ctx context.Context, name string, offset int64, p []byte) (int, error) {
	t := time.Now()
	n, err := l.s.GetBlobRange(ctx, name, offset, p)
	l.done(ctx, "get-blob-range", name, t, err, slog.Int64(logKeyOffset, offset), slog.Int(logKeyBytes, n))
	return n, err
}

func (l *logStore) ListBlobs(ctx context.Context, prefix string) ([]BlobInfo, error) {
	t := time.Now()
	r, err := l.s.ListBlobs(ctx, prefix)
	l.done(ctx, "list-blobs", prefix, t, err, slog.Int("count", len(r)))
	return r, err
}

func (l *logStore) ListDirs(ctx context.Context, prefix string) ([]string, error) {
	t := time.Now()
	r, err := l.s.ListDirs(ctx, prefix)
	l.done(ctx, "list-dirs", prefix, t, err, slog.Int("count", len(r)))
	return r, err
}

func (l *logStore) Stat(ctx context.Context, name string) (BlobInfo, error) {
	t := time.Now()
	r, err := l.s.Stat(ctx, name)
	l.done(ctx, "stat", name, t, err)
	return r, err
}

func (l *logStore) SetMetadata(ctx context.Context, name string, md Metadata) error {
	t := time.Now()
	err := l.s.SetMetadata(ctx, name, md)
	l.done(ctx, "set-metadata", name, t, err)
	return err
}

func (l *logStore) DeleteBlob(ctx context.Context, name string) error {
	t := time.Now()
	err := l.s.DeleteBlob(ctx, name)
	l.done(ctx, "delete-blob", name, t, err)
	return err
}

func (l *logStore) CreatePageBlob(ctx context.Context, name string, size int64, md Metadata) error {
	t := time.Now()
	err := l.s.CreatePageBlob(ctx, name, size, md)
	l.done(ctx, "create-page-blob", name, t, err, slog.Int64("size", size))
	return err
}

func (l *logStore) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	t := time.Now()
	err := l.s.WritePages(ctx, name, offset, data)
	l.done(ctx, "write-pages", name, t, err, slog.Int64(logKeyOffset, offset), slog.Int(logKeyBytes, len(data)))
	return err
}

func (l *logStore) ClearPages(ctx context.Context, name string, offset, length int64) error {
	t := time.Now()
	err := l.s.ClearPages(ctx, name, offset, length)
	l.done(ctx, "clear-pages", name, t, err, slog.Int64(logKeyOffset, offset), slog.Int64(logKeyBytes, length))
	return err
}

func (l *logStore) ReadPages(ctx context.Context, name, snapshot string, offset int64, p []byte) error {
	t := time.Now()
	err := l.s.ReadPages(ctx, name, snapshot, offset, p)
	l.done(ctx, "read-pages", name, t, err, slog.String(logKeySnapshot, snapshot),
		slog.Int64(logKeyOffset, offset), slog.Int(logKeyBytes, len(p)))
	return err
}

func (l *logStore) GetPageRanges(ctx context.Context, name, snapshot string, offset, length int64) ([]PageRange, error) {
	t := time.Now()
	r, err := l.s.GetPageRanges(ctx, name, snapshot, offset, length)
	l.done(ctx, "get-page-ranges", name, t, err, slog.String(logKeySnapshot, snapshot), slog.Int("count", len(r)))
	return r, err
}

func (l *logStore) ResizePageBlob(ctx context.Context, name string, size int64) error {
	t := time.Now()
	err := l.s.ResizePageBlob(ctx, name, size)
	l.done(ctx, "resize-page-blob", name, t, err, slog.Int64("size", size))
	return err
}

func (l *logStore) Snapshot(ctx context.Context, name string, md Metadata) (SnapshotInfo, error) {
	t := time.Now()
	r, err := l.s.Snapshot(ctx, name, md)
	l.done(ctx, "snapshot", name, t, err, slog.String(logKeySnapshot, r.ID))
	return r, err
}

func (l *logStore) ListSnapshots(ctx context.Context, name string) ([]SnapshotInfo, error) {
	t := time.Now()
	r, err := l.s.ListSnapshots(ctx, name)
	l.done(ctx, "list-snapshots", name, t, err, slog.Int("count", len(r)))
	return r, err
}

func (l *logStore) DeleteSnapshot(ctx context.Context, name, snapshot string) error {
	t := time.Now()
	err := l.s.DeleteSnapshot(ctx, name, snapshot)
	l.done(ctx, "delete-snapshot", name, t, err, slog.String(logKeySnapshot, snapshot))
	return err
}

func (l *logStore) CopyFromSnapshot(ctx context.Context, src, snapshot, dst string, md Metadata) error {
	t := time.Now()
	err := l.s.CopyFromSnapshot(ctx, src, snapshot, dst, md)
	l.done(ctx, "copy-from-snapshot", dst, t, err, slog.String("src", src), slog.String(logKeySnapshot, snapshot))
	return err
}

func (l *logStore) ClaimPageBlob(ctx context.Context, name string, n int64) error {
	t := time.Now()
	err := l.s.ClaimPageBlob(ctx, name, n)
	l.done(ctx, "claim-page-blob", name, t, err, slog.Int64("fence", n))
	return err
}
