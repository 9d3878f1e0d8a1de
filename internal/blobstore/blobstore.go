// Package blobstore defines Lifeboat's storage sink: one container of blobs
// holding journal segments (block blobs), replica disks (page blobs) and
// recovery points (page-blob snapshots).
//
// Store is the contract. Implementations: blobstore/azure (Azure Blob
// Storage and Azurite) and blobstore/mem (in memory, for tests); both pass
// the single conformance suite in blobstore/blobstoretest. Cross-cutting
// behaviour (retries, bandwidth limiting, logging) is added by decorators
// that Stack assembles in one place.
package blobstore

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Page blob geometry imposed by Azure.
const (
	// PageSize is the alignment of every page-blob offset and length.
	PageSize = 512
	// MaxPageBlobSize is the largest page blob Azure accepts (8 TiB).
	MaxPageBlobSize = 8 << 40
	// MaxPutPage is the largest single Put Page request; WritePages splits
	// larger writes into calls of at most this size.
	MaxPutPage = 4 << 20
	// MaxBlockBlobSize bounds PutBlob: a single Put Blob request (5000 MiB).
	MaxBlockBlobSize = 5000 << 20
	// MaxMetadataSize is Azure's limit on the total size of a blob's
	// metadata names and values.
	MaxMetadataSize = 8 << 10
)

// Metadata is user-defined name/value metadata of a blob or snapshot.
// Names are case-insensitive identifiers ([a-z_][a-z0-9_]*, stores return
// them lower-cased); values are printable ASCII without leading or trailing
// spaces. Invalid metadata is rejected with ErrInvalid rather than being
// silently altered by the service.
type Metadata map[string]string

// Kind is the type of a blob.
type Kind int

// Blob kinds.
const (
	BlockBlob Kind = iota + 1
	PageBlob
)

func (k Kind) String() string {
	switch k {
	case BlockBlob:
		return "block"
	case PageBlob:
		return "page"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// BlobInfo describes a blob (never a snapshot).
type BlobInfo struct {
	Name     string
	Kind     Kind
	Size     int64
	Metadata Metadata
	Modified time.Time
	// ETag identifies the blob's current version: it changes with every
	// change of content, metadata or size. Opaque; compare for equality
	// only, and pass it to PutBlobIf.
	ETag string
}

// SnapshotInfo describes a read-only, point-in-time snapshot of a page blob.
type SnapshotInfo struct {
	// ID identifies the snapshot together with the blob name. It is opaque
	// (Azure uses the creation timestamp with 100 ns precision).
	ID       string
	Time     time.Time
	Metadata Metadata
}

// PageRange is a byte range [Offset, Offset+Length) of a page blob.
type PageRange struct {
	Offset int64
	Length int64
}

// End returns the first offset after r.
func (r PageRange) End() int64 { return r.Offset + r.Length }

// Store is a container of blobs. It is safe for concurrent use.
//
// Fences keep an older writer of a page blob from landing writes after a
// newer one's. A blob's fence is a number (Azure's blob sequence number; 0
// for a blob created without one), raised by ClaimPageBlob. A write made
// with a context from WithFence(ctx, n) (CreatePageBlob, WritePages,
// ClearPages, ResizePageBlob, SetMetadata and Snapshot) happens only
// while the blob's fence is n, checked atomically with the write;
// CreatePageBlob also where there is no page blob yet or its fence is
// below n (a newer writer replaces an older one's blob), and gives the
// blob it creates fence n. Otherwise it fails with an error wrapping
// ErrFenced (a FenceError) and changes nothing. Fences are at most
// MaxFence. Writers that claim a blob with increasing numbers thus
// exclude each other: once the newer has claimed it, none of the older's
// writes lands. CopyFromSnapshot ignores fences. Without WithFence,
// writes are not checked.
//
// Unless stated otherwise: a missing blob, snapshot or container yields an
// error for which IsNotFound reports true; invalid arguments (names,
// misaligned or out-of-range offsets, metadata) yield an error wrapping
// ErrInvalid, detected before any data is sent when possible; every method
// honours ctx cancellation. Retrying a failed call is safe for every method
// except Snapshot (a retry after a lost reply may create a second snapshot)
// and PutBlobIf (a retry after a lost reply fails with ErrConflict).
type Store interface {
	// EnsureContainer creates the container if it does not exist. It
	// succeeds if the container already exists.
	EnsureContainer(ctx context.Context) error

	// PutBlob atomically creates or replaces the block blob name with data
	// and metadata md (nil for none). Readers see either the old or the new
	// blob, never a mix. Data corrupted in transit is detected (content
	// checksum) and the call fails with the blob unchanged.
	PutBlob(ctx context.Context, name string, data []byte, md Metadata) error

	// PutBlobIf is PutBlob on a condition, checked atomically with the
	// write: blob name must exist with ETag match or, when match is "",
	// must not exist. It returns the ETag of the blob written. A failed
	// condition (also a blob gone since match was read) fails with an
	// error wrapping ErrConflict, the blob unchanged; it is permanent:
	// another writer got there first, and only the caller can decide
	// what its write means now. A PutBlobIf that fails otherwise may have
	// happened (lost reply): a retry then meets its own write as a
	// conflict (WithRetry sorts that case out).
	PutBlobIf(ctx context.Context, name string, data []byte, md Metadata, match string) (etag string, err error)

	// GetBlob returns the whole content of blob name. When the store holds a
	// checksum of the content (all blobs written by PutBlob), a mismatch is
	// reported as ErrCorrupt.
	GetBlob(ctx context.Context, name string) ([]byte, error)

	// GetBlobRange reads len(p) bytes of blob name starting at offset, with
	// io.ReaderAt semantics: when fewer than len(p) bytes exist it returns
	// the count read and io.EOF (also for offset >= size).
	GetBlobRange(ctx context.Context, name string, offset int64, p []byte) (int, error)

	// ListBlobs returns every blob (no snapshots) whose name starts with
	// prefix, sorted by name, with metadata.
	ListBlobs(ctx context.Context, prefix string) ([]BlobInfo, error)

	// ListDirs returns the distinct names, up to and including the first
	// "/" after prefix, of the blobs whose name starts with prefix and
	// holds a "/" after it (the virtual directories directly under
	// prefix), sorted: a listing of the top of the container does not
	// walk every blob under it.
	ListDirs(ctx context.Context, prefix string) ([]string, error)

	// Stat returns the properties, ETag included, and metadata of blob
	// name. ListBlobs fills ETag too.
	Stat(ctx context.Context, name string) (BlobInfo, error)

	// SetMetadata replaces all metadata of blob name with md. Content and
	// existing snapshots are not affected.
	SetMetadata(ctx context.Context, name string, md Metadata) error

	// DeleteBlob deletes blob name together with all of its snapshots.
	DeleteBlob(ctx context.Context, name string) error

	// CreatePageBlob creates the page blob name with the given size (a
	// multiple of PageSize, at most MaxPageBlobSize) and metadata. The blob
	// reads as zeros and has no valid page ranges. An existing blob of that
	// name is REPLACED (its content is lost; its snapshots are kept).
	CreatePageBlob(ctx context.Context, name string, size int64, md Metadata) error

	// WritePages writes data at offset into page blob name. offset and
	// len(data) must be multiples of PageSize and the range must lie within
	// the blob. Writes larger than MaxPutPage are split into several
	// requests, so a failed call may have written a prefix of data; writing
	// the same data again is always safe.
	WritePages(ctx context.Context, name string, offset int64, data []byte) error

	// ClearPages zeroes [offset, offset+length) of page blob name and
	// removes it from the valid page ranges (frees the storage). Alignment
	// rules are those of WritePages.
	ClearPages(ctx context.Context, name string, offset, length int64) error

	// ReadPages fills p from page blob name at offset. snapshot selects a
	// snapshot ID from Snapshot/ListSnapshots, or the live blob when empty.
	// offset and len(p) must be multiples of PageSize and the range must lie
	// within the blob. Pages never written read as zeros.
	ReadPages(ctx context.Context, name, snapshot string, offset int64, p []byte) error

	// GetPageRanges returns the valid (written and not cleared) ranges of
	// page blob name (or of its snapshot) that intersect [offset,
	// offset+length), clipped to it. Ranges are sorted, non-overlapping and
	// coalesced (no two are adjacent). length 0 means up to the end of the
	// blob. Use it to read sparse blobs without transferring zeros.
	GetPageRanges(ctx context.Context, name, snapshot string, offset, length int64) ([]PageRange, error)

	// ResizePageBlob changes the size of page blob name (alignment and
	// limit as CreatePageBlob). Growing appends zeros; shrinking discards
	// the tail. Snapshots are not affected.
	ResizePageBlob(ctx context.Context, name string, size int64) error

	// Snapshot creates a read-only snapshot of page blob name. The snapshot
	// carries md, or a copy of the blob's metadata if md is empty. Later
	// writes to the blob do not change the snapshot.
	Snapshot(ctx context.Context, name string, md Metadata) (SnapshotInfo, error)

	// ListSnapshots returns the snapshots of blob name, oldest first. It
	// returns an empty list (no error) if the blob has none.
	ListSnapshots(ctx context.Context, name string) ([]SnapshotInfo, error)

	// DeleteSnapshot deletes one snapshot of blob name.
	DeleteSnapshot(ctx context.Context, name, snapshot string) error

	// ClaimPageBlob raises the fence of page blob name to n if it is
	// lower (0 ≤ n ≤ MaxFence). It fails with ErrFenced, changing
	// nothing, when the fence is already higher: a newer writer claimed
	// the blob. Claiming again with the same n is harmless.
	ClaimPageBlob(ctx context.Context, name string, n int64) error

	// CopyFromSnapshot creates or replaces page blob dst with the content,
	// size and valid page ranges of snapshot of page blob src. dst carries
	// md, or the snapshot's metadata if md is empty. It returns when the
	// copy is complete.
	CopyFromSnapshot(ctx context.Context, src, snapshot, dst string, md Metadata) error
}

// Sentinel errors. Implementations wrap them, so test with errors.Is (or
// IsNotFound).
var (
	// ErrNotFound: the blob, snapshot or container does not exist.
	ErrNotFound = errors.New("not found")
	// ErrInvalid: the caller passed an argument the store cannot accept.
	ErrInvalid = errors.New("invalid argument")
	// ErrCorrupt: content read back does not match its stored checksum.
	ErrCorrupt = errors.New("content checksum mismatch")
	// ErrConflict: the condition of a PutBlobIf did not hold (the blob
	// changed, appeared or went since its ETag was read).
	ErrConflict = errors.New("blob changed by another writer")
	// ErrFenced: a write under WithFence found the page blob's fence
	// moved, or ClaimPageBlob found it higher: a newer writer claimed
	// the blob.
	ErrFenced = errors.New("page blob fenced")
)

// MaxFence is the highest fence: Azurite keeps a blob's sequence number
// as a JavaScript number, exact up to 2^53.
const MaxFence = 1<<53 - 1

// CheckFence checks a fence to be set on a blob (for implementations).
func CheckFence(name string, n int64) error {
	if n < 0 || n > MaxFence {
		return fmt.Errorf("page blob %q: fence %d outside [0, %d]: %w", name, n, int64(MaxFence), ErrInvalid)
	}
	return nil
}

type fenceKey struct{}

// WithFence returns ctx carrying fence n: page-blob writes made with it
// happen only while the blob's fence is n (see Store). The decorators
// pass it through untouched.
func WithFence(ctx context.Context, n int64) context.Context {
	return context.WithValue(ctx, fenceKey{}, n)
}

// WithoutFence returns ctx without the fence it may carry.
func WithoutFence(ctx context.Context) context.Context {
	return context.WithValue(ctx, fenceKey{}, nil)
}

// FenceOf returns the fence ctx carries, if any (for implementations).
func FenceOf(ctx context.Context) (n int64, ok bool) {
	n, ok = ctx.Value(fenceKey{}).(int64)
	return n, ok
}

// FenceError is the error of a write under fence N, or of a claim with N,
// that found the blob's fence at Got (-1: unknown). It wraps ErrFenced.
type FenceError struct {
	Store, Op, Name string
	N, Got          int64
}

func (e *FenceError) Error() string {
	switch {
	case e.Got < 0:
		return fmt.Sprintf("%s: %s %q: the blob's fence is not this writer's %d", e.Store, e.Op, e.Name, e.N)
	case e.Got < e.N:
		return fmt.Sprintf("%s: %s %q: not claimed by this writer (its fence %d, this writer's %d)", e.Store, e.Op, e.Name, e.Got, e.N)
	}
	return fmt.Sprintf("%s: %s %q: claimed by a newer writer (its fence %d, this writer's %d)", e.Store, e.Op, e.Name, e.Got, e.N)
}

func (e *FenceError) Unwrap() error { return ErrFenced }

// Fenced returns the error of a write under fence n that found the fence
// of blob name at got (-1: unknown), for implementations.
func Fenced(store, op, name string, n, got int64) error {
	return &FenceError{Store: store, Op: op, Name: name, N: n, Got: got}
}

// NewerFence reports whether err says a newer writer claimed a blob: its
// fence is above the writer's. (Below it, the writer has only not
// claimed the blob yet.)
func NewerFence(err error) bool {
	var fe *FenceError
	return errors.As(err, &fe) && fe.Got > fe.N
}

// IsNotFound reports whether err means that the blob, snapshot or container
// does not exist.
func IsNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

// permanentError marks an error that retrying cannot fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// Permanent marks err as not worth retrying (e.g. an authorization failure).
// Implementations use it for service errors the retry decorator must not
// retry; Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err}
}

// IsPermanent reports whether retrying the call that returned err is
// pointless: errors marked with Permanent, ErrNotFound, ErrInvalid,
// ErrConflict and ErrFenced.
func IsPermanent(err error) bool {
	var p *permanentError
	return errors.As(err, &p) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalid) ||
		errors.Is(err, ErrConflict) || errors.Is(err, ErrFenced)
}
