// Package mem is an in-memory blobstore.Store for tests. It follows the
// Store contract exactly (it passes the same conformance suite as the Azure
// store); page blobs are sparse, so an 8 TiB blob costs only the pages
// written.
package mem

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
)

const ps = blobstore.PageSize

// Store is an in-memory blobstore.Store. The zero value is not usable; use New.
type Store struct {
	mu        sync.Mutex
	container bool
	blobs     map[string]*blob
	lastSnap  time.Time
	version   uint64 // of the last change to any blob: ETags never repeat
}

var _ blobstore.Store = (*Store)(nil)

// pages maps page index to its 512 bytes. Stored slices are never mutated,
// so snapshots can share them with the live blob.
type pages map[int64][]byte

type blob struct {
	kind     blobstore.Kind
	data     []byte // block blobs
	size     int64  // page blobs
	pages    pages  // page blobs
	md       blobstore.Metadata
	modified time.Time
	etag     string
	fence    int64       // page blobs (see blobstore.Store)
	snaps    []*snapshot // oldest first
}

type snapshot struct {
	info  blobstore.SnapshotInfo
	size  int64
	pages pages
}

// touch records a change of b (content, metadata or size); s.mu is held.
func (s *Store) touch(b *blob) {
	s.version++
	b.modified, b.etag = time.Now(), fmt.Sprintf("\"0x%X\"", s.version)
}

// checkFence fails a write to b (nil: none yet) under a fence other than
// b's; s.mu is held.
func checkFence(ctx context.Context, op, name string, b *blob) error {
	n, ok := blobstore.FenceOf(ctx)
	if !ok || b == nil || b.fence == n {
		return nil
	}
	return blobstore.Fenced("mem", op, name, n, b.fence)
}

// New returns an empty store whose container does not exist yet.
func New() *Store { return &Store{blobs: make(map[string]*blob)} }

func (s *Store) String() string { return "mem" }

func notFound(what, name string) error {
	return fmt.Errorf("mem: %s %q: %w", what, name, blobstore.ErrNotFound)
}

// create returns the blob named name, creating an empty one if needed;
// the caller holds s.mu and sets every field it keeps (a create replaces).
func (s *Store) create(name string) (*blob, error) {
	if !s.container {
		return nil, notFound("container of blob", name)
	}
	b := s.blobs[name]
	if b == nil {
		b = &blob{}
		s.blobs[name] = b
	}
	return b, nil
}

// lookup returns blob name; callers hold s.mu.
func (s *Store) lookup(name string) (*blob, error) {
	if !s.container {
		return nil, notFound("container of blob", name)
	}
	b := s.blobs[name]
	if b == nil {
		return nil, notFound("blob", name)
	}
	return b, nil
}

func (s *Store) lookupPage(name string) (*blob, error) {
	b, err := s.lookup(name)
	if err == nil && b.kind != blobstore.PageBlob {
		err = fmt.Errorf("mem: blob %q is a %v blob, not a page blob: %w", name, b.kind, blobstore.ErrInvalid)
	}
	return b, err
}

// view returns the size and pages of blob name or of one of its snapshots.
func (s *Store) view(name, snap string) (int64, pages, error) {
	b, err := s.lookupPage(name)
	if err != nil {
		return 0, nil, err
	}
	if snap == "" {
		return b.size, b.pages, nil
	}
	for _, sn := range b.snaps {
		if sn.info.ID == snap {
			return sn.size, sn.pages, nil
		}
	}
	return 0, nil, notFound("snapshot "+snap+" of blob", name)
}

func checkWithin(offset, length, size int64) error {
	if offset+length > size {
		return fmt.Errorf("mem: range [%d, %d) beyond blob size %d: %w", offset, offset+length, size, blobstore.ErrInvalid)
	}
	return nil
}

// EnsureContainer implements blobstore.Store.
func (s *Store) EnsureContainer(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.container = true
	return nil
}

// PutBlob implements blobstore.Store.
func (s *Store) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	_, err := s.put(ctx, name, data, md, nil)
	return err
}

// PutBlobIf implements blobstore.Store.
func (s *Store) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	return s.put(ctx, name, data, md, &match)
}

// put is PutBlob, on condition match when not nil.
func (s *Store) put(ctx context.Context, name string, data []byte, md blobstore.Metadata, match *string) (string, error) {
	if err := checkPut(ctx, name, md); err != nil {
		return "", err
	}
	if len(data) > blobstore.MaxBlockBlobSize {
		return "", fmt.Errorf("mem: blob %q: %d bytes exceeds PutBlob limit: %w", name, len(data), blobstore.ErrInvalid)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if match != nil && s.container {
		switch b := s.blobs[name]; {
		case *match == "" && b != nil:
			return "", fmt.Errorf("mem: blob %q exists: %w", name, blobstore.ErrConflict)
		case *match != "" && (b == nil || b.etag != *match):
			return "", fmt.Errorf("mem: blob %q is not at ETag %s: %w", name, *match, blobstore.ErrConflict)
		}
	}
	b, err := s.create(name)
	if err != nil {
		return "", err
	}
	b.kind, b.data, b.size, b.pages, b.fence = blobstore.BlockBlob, bytes.Clone(data), 0, nil, 0
	if b.data == nil {
		b.data = []byte{}
	}
	b.md = blobstore.NormalizeMetadata(md)
	s.touch(b)
	return b.etag, nil
}

func checkPut(ctx context.Context, name string, md blobstore.Metadata) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := blobstore.CheckName(name); err != nil {
		return err
	}
	return blobstore.CheckMetadata(md)
}

// GetBlob implements blobstore.Store.
func (s *Store) GetBlob(ctx context.Context, name string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookup(name)
	if err != nil {
		return nil, err
	}
	if b.kind == blobstore.PageBlob {
		p := make([]byte, b.size)
		readPages(b.pages, 0, p)
		return p, nil
	}
	return bytes.Clone(b.data), nil
}

// GetBlobRange implements blobstore.Store.
func (s *Store) GetBlobRange(ctx context.Context, name string, offset int64, p []byte) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if offset < 0 {
		return 0, fmt.Errorf("mem: negative offset %d: %w", offset, blobstore.ErrInvalid)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookup(name)
	if err != nil {
		return 0, err
	}
	data := b.data
	if b.kind == blobstore.PageBlob {
		data = make([]byte, b.size)
		readPages(b.pages, 0, data)
	}
	if offset >= int64(len(data)) {
		return 0, io.EOF
	}
	n := copy(p, data[offset:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (b *blob) info(name string) blobstore.BlobInfo {
	size := int64(len(b.data))
	if b.kind == blobstore.PageBlob {
		size = b.size
	}
	return blobstore.BlobInfo{Name: name, Kind: b.kind, Size: size, Metadata: maps.Clone(b.md), Modified: b.modified, ETag: b.etag}
}

// ListBlobs implements blobstore.Store.
func (s *Store) ListBlobs(ctx context.Context, prefix string) ([]blobstore.BlobInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.container {
		return nil, notFound("container", "")
	}
	var out []blobstore.BlobInfo
	for name, b := range s.blobs {
		if strings.HasPrefix(name, prefix) {
			out = append(out, b.info(name))
		}
	}
	slices.SortFunc(out, func(a, b blobstore.BlobInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// ListDirs implements blobstore.Store.
func (s *Store) ListDirs(ctx context.Context, prefix string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.container {
		return nil, notFound("container", "")
	}
	var out []string
	for name := range s.blobs {
		rest, ok := strings.CutPrefix(name, prefix)
		if i := strings.IndexByte(rest, '/'); ok && i >= 0 && !slices.Contains(out, prefix+rest[:i+1]) {
			out = append(out, prefix+rest[:i+1])
		}
	}
	slices.Sort(out)
	return out, nil
}

// Stat implements blobstore.Store.
func (s *Store) Stat(ctx context.Context, name string) (blobstore.BlobInfo, error) {
	if err := ctx.Err(); err != nil {
		return blobstore.BlobInfo{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookup(name)
	if err != nil {
		return blobstore.BlobInfo{}, err
	}
	return b.info(name), nil
}

// SetMetadata implements blobstore.Store.
func (s *Store) SetMetadata(ctx context.Context, name string, md blobstore.Metadata) error {
	if err := checkPut(ctx, name, md); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookup(name)
	if err != nil {
		return err
	}
	if err := checkFence(ctx, "set metadata", name, b); err != nil {
		return err
	}
	b.md = blobstore.NormalizeMetadata(md)
	s.touch(b)
	return nil
}

// DeleteBlob implements blobstore.Store.
func (s *Store) DeleteBlob(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.lookup(name); err != nil {
		return err
	}
	delete(s.blobs, name)
	return nil
}

// CreatePageBlob implements blobstore.Store.
func (s *Store) CreatePageBlob(ctx context.Context, name string, size int64, md blobstore.Metadata) error {
	if err := checkPut(ctx, name, md); err != nil {
		return err
	}
	if err := blobstore.CheckPageBlobSize(size); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// A create replaces a blob of another kind, which has no fence, and
	// an older writer's.
	if n, ok := blobstore.FenceOf(ctx); ok {
		if err := blobstore.CheckFence(name, n); err != nil {
			return err
		}
		if b := s.blobs[name]; s.container && b != nil && b.kind == blobstore.PageBlob && b.fence > n {
			return blobstore.Fenced("mem", "create page blob", name, n, b.fence)
		}
	}
	b, err := s.create(name)
	if err != nil {
		return err
	}
	b.kind, b.data, b.size, b.pages = blobstore.PageBlob, nil, size, make(pages)
	b.fence, _ = blobstore.FenceOf(ctx)
	b.md = blobstore.NormalizeMetadata(md)
	s.touch(b)
	return nil
}

func (s *Store) writable(ctx context.Context, op, name string, offset, length int64) (*blob, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := blobstore.CheckPageRange(offset, length); err != nil {
		return nil, err
	}
	b, err := s.lookupPage(name)
	if err != nil {
		return nil, err
	}
	if err := checkWithin(offset, length, b.size); err != nil {
		return nil, err
	}
	return b, checkFence(ctx, op, name, b)
}

// WritePages implements blobstore.Store.
func (s *Store) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.writable(ctx, "write pages", name, offset, int64(len(data)))
	if err != nil {
		return err
	}
	// One allocation for all pages; stored slices are never written again.
	buf := bytes.Clone(data)
	for i := int64(0); i < int64(len(buf)); i += ps {
		b.pages[(offset+i)/ps] = buf[i : i+ps : i+ps]
	}
	s.touch(b)
	return nil
}

// ClearPages implements blobstore.Store.
func (s *Store) ClearPages(ctx context.Context, name string, offset, length int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.writable(ctx, "clear pages", name, offset, length)
	if err != nil {
		return err
	}
	for i := offset / ps; i < (offset+length)/ps; i++ {
		delete(b.pages, i)
	}
	s.touch(b)
	return nil
}

func readPages(pg pages, offset int64, p []byte) {
	for i := int64(0); i < int64(len(p)); i += ps {
		if d, ok := pg[(offset+i)/ps]; ok {
			copy(p[i:i+ps], d)
		} else {
			clear(p[i : i+ps])
		}
	}
}

// ReadPages implements blobstore.Store.
func (s *Store) ReadPages(ctx context.Context, name, snap string, offset int64, p []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := blobstore.CheckPageRange(offset, int64(len(p))); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	size, pg, err := s.view(name, snap)
	if err != nil {
		return err
	}
	if err := checkWithin(offset, int64(len(p)), size); err != nil {
		return err
	}
	readPages(pg, offset, p)
	return nil
}

// GetPageRanges implements blobstore.Store.
func (s *Store) GetPageRanges(ctx context.Context, name, snap string, offset, length int64) ([]blobstore.PageRange, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := blobstore.CheckPageRange(offset, length); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	size, pg, err := s.view(name, snap)
	if err != nil {
		return nil, err
	}
	if length == 0 {
		length = max(size-offset, 0)
	}
	if err := checkWithin(offset, length, size); err != nil {
		return nil, err
	}
	first, end := offset/ps, (offset+length)/ps
	var idx []int64
	if end-first < int64(len(pg)) {
		for i := first; i < end; i++ {
			if _, ok := pg[i]; ok {
				idx = append(idx, i)
			}
		}
	} else {
		for i := range pg {
			if i >= first && i < end {
				idx = append(idx, i)
			}
		}
		slices.Sort(idx)
	}
	rs := make([]blobstore.PageRange, 0, len(idx))
	for _, i := range idx {
		rs = append(rs, blobstore.PageRange{Offset: i * ps, Length: ps})
	}
	return blobstore.CoalesceRanges(rs), nil
}

// ResizePageBlob implements blobstore.Store.
func (s *Store) ResizePageBlob(ctx context.Context, name string, size int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := blobstore.CheckPageBlobSize(size); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookupPage(name)
	if err != nil {
		return err
	}
	if err := checkFence(ctx, "resize page blob", name, b); err != nil {
		return err
	}
	if size < b.size {
		for i := range b.pages {
			if i >= size/ps {
				delete(b.pages, i)
			}
		}
	}
	b.size = size
	s.touch(b)
	return nil
}

// Snapshot implements blobstore.Store.
func (s *Store) Snapshot(ctx context.Context, name string, md blobstore.Metadata) (blobstore.SnapshotInfo, error) {
	if err := ctx.Err(); err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	if err := blobstore.CheckMetadata(md); err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookupPage(name)
	if err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	if err := checkFence(ctx, "snapshot", name, b); err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	// Azure snapshot IDs are timestamps with 100 ns resolution; keep them
	// unique and increasing like the service does.
	t := time.Now().UTC().Truncate(100 * time.Nanosecond)
	if !t.After(s.lastSnap) {
		t = s.lastSnap.Add(100 * time.Nanosecond)
	}
	s.lastSnap = t
	smd := blobstore.NormalizeMetadata(md)
	if smd == nil {
		smd = maps.Clone(b.md)
	}
	sn := &snapshot{
		info:  blobstore.SnapshotInfo{ID: t.Format("2006-01-02T15:04:05.0000000Z"), Time: t, Metadata: smd},
		size:  b.size,
		pages: maps.Clone(b.pages),
	}
	b.snaps = append(b.snaps, sn)
	return cloneInfo(sn.info), nil
}

func cloneInfo(i blobstore.SnapshotInfo) blobstore.SnapshotInfo {
	i.Metadata = maps.Clone(i.Metadata)
	return i
}

// ListSnapshots implements blobstore.Store.
func (s *Store) ListSnapshots(ctx context.Context, name string) ([]blobstore.SnapshotInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.container {
		return nil, notFound("container of blob", name)
	}
	b := s.blobs[name]
	if b == nil {
		return []blobstore.SnapshotInfo{}, nil
	}
	out := make([]blobstore.SnapshotInfo, 0, len(b.snaps))
	for _, sn := range b.snaps {
		out = append(out, cloneInfo(sn.info))
	}
	return out, nil
}

// DeleteSnapshot implements blobstore.Store.
func (s *Store) DeleteSnapshot(ctx context.Context, name, snap string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookup(name)
	if err != nil {
		return err
	}
	for i, sn := range b.snaps {
		if sn.info.ID == snap {
			b.snaps = slices.Delete(b.snaps, i, i+1)
			return nil
		}
	}
	return notFound("snapshot "+snap+" of blob", name)
}

// CopyFromSnapshot implements blobstore.Store.
func (s *Store) CopyFromSnapshot(ctx context.Context, src, snap, dst string, md blobstore.Metadata) error {
	if err := checkPut(ctx, dst, md); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookupPage(src)
	if err != nil {
		return err
	}
	var sn *snapshot
	for _, x := range b.snaps {
		if x.info.ID == snap {
			sn = x
		}
	}
	if sn == nil {
		return notFound("snapshot "+snap+" of blob", src)
	}
	dmd := blobstore.NormalizeMetadata(md)
	if dmd == nil {
		dmd = maps.Clone(sn.info.Metadata)
	}
	d := s.blobs[dst]
	if d == nil {
		d = &blob{}
		s.blobs[dst] = d
	}
	d.kind, d.data, d.size, d.pages, d.fence = blobstore.PageBlob, nil, sn.size, maps.Clone(sn.pages), 0
	d.md = dmd
	s.touch(d)
	return nil
}

// ClaimPageBlob implements blobstore.Store.
func (s *Store) ClaimPageBlob(ctx context.Context, name string, n int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := blobstore.CheckFence(name, n); err != nil {
		return fmt.Errorf("mem: claim %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := s.lookupPage(name)
	if err != nil {
		return err
	}
	switch {
	case b.fence > n:
		return blobstore.Fenced("mem", "claim page blob", name, n, b.fence)
	case b.fence < n:
		b.fence = n
		s.touch(b)
	}
	return nil
}
