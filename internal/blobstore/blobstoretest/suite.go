// Package blobstoretest holds the conformance suite that every
// blobstore.Store implementation must pass, and a fault-injecting Store
// wrapper for testing code that must survive storage failures.
package blobstoretest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
)

const ps = blobstore.PageSize

// NewStore returns a Store on a fresh, empty container that does not exist
// yet (the suite calls EnsureContainer). Clean-up is the factory's job
// (t.Cleanup).
type NewStore func(t *testing.T) blobstore.Store

// Options declares known, accepted deviations of a store from the contract.
// Each one relaxes exactly one assertion; keep them rare and documented.
type Options struct {
	// LaxWriteBounds: a WritePages that starts inside the blob but ends
	// beyond it may succeed. Azurite 3.37.0 only checks the start offset;
	// Azure rejects such writes (InvalidPageRange).
	LaxWriteBounds bool
}

// Run runs the conformance suite against the stores made by newStore.
func Run(t *testing.T, newStore NewStore, opts Options) {
	tests := []struct {
		name string
		fn   func(*testing.T, blobstore.Store)
	}{
		{"Container", testContainer},
		{"BlockBlob", testBlockBlob},
		{"PutBlobIf", testPutBlobIf},
		{"GetBlobRange", testGetBlobRange},
		{"List", testList},
		{"Metadata", testMetadata},
		{"PageBlob", func(t *testing.T, s blobstore.Store) { testPageBlob(t, s, opts) }},
		{"PageBlobLargeWrite", testPageBlobLargeWrite},
		{"PageRanges", testPageRanges},
		{"Resize", testResize},
		{"Snapshots", testSnapshots},
		{"CopyFromSnapshot", testCopyFromSnapshot},
		{"ConcurrentWrites", testConcurrentWrites},
		{"Fences", testFences},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			if tc.name != "Container" {
				if err := s.EnsureContainer(context.Background()); err != nil {
					t.Fatalf("EnsureContainer: %v", err)
				}
			}
			tc.fn(t, s)
		})
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func ok(t *testing.T, err error, what string, args ...any) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", fmt.Sprintf(what, args...), err)
	}
}

func wantErr(t *testing.T, err, target error, what string, args ...any) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s: err = %v, want %v", fmt.Sprintf(what, args...), err, target)
	}
}

func wantNotFound(t *testing.T, err error, what string, args ...any) {
	t.Helper()
	if !blobstore.IsNotFound(err) {
		t.Fatalf("%s: err = %v, want not found", fmt.Sprintf(what, args...), err)
	}
}

// Random returns n pseudo-random bytes from seed.
func Random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

func testContainer(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	wantNotFound(t, s.PutBlob(ctx, "a", []byte("x"), nil), "PutBlob before EnsureContainer")
	_, err := s.PutBlobIf(ctx, "a", []byte("x"), nil, "")
	wantNotFound(t, err, "PutBlobIf before EnsureContainer")
	_, err = s.ListBlobs(ctx, "")
	wantNotFound(t, err, "ListBlobs before EnsureContainer")
	_, err = s.ListDirs(ctx, "")
	wantNotFound(t, err, "ListDirs before EnsureContainer")
	ok(t, s.EnsureContainer(ctx), "EnsureContainer")
	ok(t, s.EnsureContainer(ctx), "EnsureContainer on existing container")
	ok(t, s.PutBlob(ctx, "a", []byte("x"), nil), "PutBlob")
}

func testBlockBlob(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	_, err := s.GetBlob(ctx, "journal/missing")
	wantNotFound(t, err, "GetBlob of missing blob")
	_, err = s.Stat(ctx, "journal/missing")
	wantNotFound(t, err, "Stat of missing blob")
	wantNotFound(t, s.DeleteBlob(ctx, "journal/missing"), "DeleteBlob of missing blob")

	data := Random(1, 100_000)
	ok(t, s.PutBlob(ctx, "journal/0001", data, blobstore.Metadata{"seq": "1"}), "PutBlob")
	got, err := s.GetBlob(ctx, "journal/0001")
	ok(t, err, "GetBlob")
	if !bytes.Equal(got, data) {
		t.Fatalf("GetBlob returned %d bytes differing from the %d put", len(got), len(data))
	}
	info, err := s.Stat(ctx, "journal/0001")
	ok(t, err, "Stat")
	if info.Kind != blobstore.BlockBlob || info.Size != int64(len(data)) || info.Metadata["seq"] != "1" || info.Name != "journal/0001" {
		t.Fatalf("Stat = %+v", info)
	}
	if time.Since(info.Modified) > time.Hour || time.Until(info.Modified) > time.Hour {
		t.Fatalf("Stat.Modified = %v, not close to now", info.Modified)
	}

	// Overwrite replaces content and metadata.
	ok(t, s.PutBlob(ctx, "journal/0001", []byte("short"), nil), "PutBlob overwrite")
	got, err = s.GetBlob(ctx, "journal/0001")
	ok(t, err, "GetBlob after overwrite")
	if string(got) != "short" {
		t.Fatalf("after overwrite got %q", got)
	}
	info, err = s.Stat(ctx, "journal/0001")
	ok(t, err, "Stat after overwrite")
	if len(info.Metadata) != 0 {
		t.Fatalf("metadata survived overwrite: %v", info.Metadata)
	}

	ok(t, s.PutBlob(ctx, "journal/empty", nil, nil), "PutBlob empty")
	got, err = s.GetBlob(ctx, "journal/empty")
	ok(t, err, "GetBlob empty")
	if len(got) != 0 {
		t.Fatalf("empty blob read back as %d bytes", len(got))
	}

	ok(t, s.DeleteBlob(ctx, "journal/0001"), "DeleteBlob")
	_, err = s.GetBlob(ctx, "journal/0001")
	wantNotFound(t, err, "GetBlob after DeleteBlob")

	wantErr(t, s.PutBlob(ctx, "", []byte("x"), nil), blobstore.ErrInvalid, "PutBlob with empty name")
}

func testPutBlobIf(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	const name = "m1/manifest.json"
	e1, err := s.PutBlobIf(ctx, name, []byte("v1"), blobstore.Metadata{"v": "1"}, "")
	ok(t, err, "PutBlobIf create")
	if e1 == "" {
		t.Fatal("PutBlobIf create returned no ETag")
	}
	info, err := s.Stat(ctx, name)
	ok(t, err, "Stat")
	if info.ETag != e1 || info.Metadata["v"] != "1" {
		t.Fatalf("Stat after create: ETag %q metadata %v, want ETag %q (the one PutBlobIf returned)", info.ETag, info.Metadata, e1)
	}
	_, err = s.PutBlobIf(ctx, name, []byte("again"), nil, "")
	wantErr(t, err, blobstore.ErrConflict, "PutBlobIf create of an existing blob")
	if !blobstore.IsPermanent(err) {
		t.Fatalf("conflict %v is not permanent", err)
	}

	e2, err := s.PutBlobIf(ctx, name, []byte("v2"), nil, e1)
	ok(t, err, "PutBlobIf with the current ETag")
	if e2 == "" || e2 == e1 {
		t.Fatalf("PutBlobIf update returned ETag %q (was %q), want a new one", e2, e1)
	}
	_, err = s.PutBlobIf(ctx, name, []byte("stale"), nil, e1)
	wantErr(t, err, blobstore.ErrConflict, "PutBlobIf with a stale ETag")
	got, err := s.GetBlob(ctx, name)
	ok(t, err, "GetBlob")
	info, serr := s.Stat(ctx, name)
	ok(t, serr, "Stat")
	if string(got) != "v2" || info.ETag != e2 || len(info.Metadata) != 0 {
		t.Fatalf("after a refused update: content %q ETag %q metadata %v, want v2, %q, none", got, info.ETag, info.Metadata, e2)
	}
	l, err := s.ListBlobs(ctx, "m1/")
	ok(t, err, "ListBlobs")
	if len(l) != 1 || l[0].ETag != e2 {
		t.Fatalf("ListBlobs = %+v, want one blob with ETag %q", l, e2)
	}

	// Any other change is a new version too.
	ok(t, s.SetMetadata(ctx, name, blobstore.Metadata{"x": "y"}), "SetMetadata")
	_, err = s.PutBlobIf(ctx, name, []byte("v3"), nil, e2)
	wantErr(t, err, blobstore.ErrConflict, "PutBlobIf after SetMetadata with the ETag before it")
	ok(t, s.PutBlob(ctx, name, []byte("v3"), nil), "PutBlob")
	_, err = s.PutBlobIf(ctx, name, []byte("v4"), nil, e2)
	wantErr(t, err, blobstore.ErrConflict, "PutBlobIf after PutBlob with the ETag before it")

	// Gone since its ETag was read: the condition fails too.
	info, err = s.Stat(ctx, name)
	ok(t, err, "Stat")
	ok(t, s.DeleteBlob(ctx, name), "DeleteBlob")
	_, err = s.PutBlobIf(ctx, name, []byte("v5"), nil, info.ETag)
	wantErr(t, err, blobstore.ErrConflict, "PutBlobIf of a deleted blob")
	_, err = s.Stat(ctx, name)
	wantNotFound(t, err, "Stat after a refused PutBlobIf of a deleted blob")
	_, err = s.PutBlobIf(ctx, name, []byte("v6"), nil, "")
	ok(t, err, "PutBlobIf create after delete")
}

func testGetBlobRange(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	data := Random(2, 10_000)
	ok(t, s.PutBlob(ctx, "r", data, nil), "PutBlob")
	p := make([]byte, 1000)
	n, err := s.GetBlobRange(ctx, "r", 4321, p)
	if err != nil || n != 1000 || !bytes.Equal(p, data[4321:5321]) {
		t.Fatalf("GetBlobRange middle: n=%d err=%v equal=%v", n, err, bytes.Equal(p, data[4321:5321]))
	}
	n, err = s.GetBlobRange(ctx, "r", 9500, p)
	if err != io.EOF || n != 500 || !bytes.Equal(p[:n], data[9500:]) {
		t.Fatalf("GetBlobRange across end: n=%d err=%v, want 500, io.EOF", n, err)
	}
	for _, off := range []int64{10_000, 20_000} {
		n, err = s.GetBlobRange(ctx, "r", off, p)
		if err != io.EOF || n != 0 {
			t.Fatalf("GetBlobRange at %d (size 10000): n=%d err=%v, want 0, io.EOF", off, n, err)
		}
	}
	_, err = s.GetBlobRange(ctx, "missing", 0, p)
	wantNotFound(t, err, "GetBlobRange of missing blob")
}

func testList(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	l, err := s.ListBlobs(ctx, "")
	ok(t, err, "ListBlobs on empty container")
	if len(l) != 0 {
		t.Fatalf("empty container lists %v", l)
	}
	names := []string{"seg/b", "seg/a", "seg/c/d", "segment", "disk/0"}
	for i, n := range names {
		ok(t, s.PutBlob(ctx, n, make([]byte, i), blobstore.Metadata{"idx": fmt.Sprint(i)}), "PutBlob %s", n)
	}
	ok(t, s.CreatePageBlob(ctx, "seg/page", 4096, blobstore.Metadata{"idx": "p"}), "CreatePageBlob")
	_, err = s.Snapshot(ctx, "seg/page", nil)
	ok(t, err, "Snapshot")

	l, err = s.ListBlobs(ctx, "seg/")
	ok(t, err, "ListBlobs")
	var got []string
	for _, b := range l {
		got = append(got, b.Name)
	}
	if want := []string{"seg/a", "seg/b", "seg/c/d", "seg/page"}; !slices.Equal(got, want) {
		t.Fatalf("ListBlobs(seg/) = %v, want %v (sorted, recursive, no snapshots)", got, want)
	}
	if l[0].Metadata["idx"] != "1" || l[0].Size != 1 || l[0].Kind != blobstore.BlockBlob {
		t.Fatalf("ListBlobs entry %+v", l[0])
	}
	if p := l[3]; p.Kind != blobstore.PageBlob || p.Size != 4096 || p.Metadata["idx"] != "p" {
		t.Fatalf("ListBlobs page blob entry %+v", p)
	}
	l, err = s.ListBlobs(ctx, "")
	ok(t, err, "ListBlobs all")
	if len(l) != 6 {
		t.Fatalf("ListBlobs(\"\") returned %d blobs, want 6", len(l))
	}
	for _, c := range []struct {
		prefix string
		want   []string
	}{
		{"", []string{"disk/", "seg/"}},
		{"seg/", []string{"seg/c/"}},
		{"se", []string{"seg/"}},
		{"nothing/", nil},
	} {
		dirs, err := s.ListDirs(ctx, c.prefix)
		ok(t, err, "ListDirs(%q)", c.prefix)
		if !slices.Equal(dirs, c.want) {
			t.Fatalf("ListDirs(%q) = %q, want %q", c.prefix, dirs, c.want)
		}
	}
}

func testMetadata(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	wantNotFound(t, s.SetMetadata(ctx, "missing", blobstore.Metadata{"a": "b"}), "SetMetadata of missing blob")
	ok(t, s.PutBlob(ctx, "m", []byte("x"), blobstore.Metadata{"Keep": "no", "Disk_ID": "disk-7"}), "PutBlob")
	info, err := s.Stat(ctx, "m")
	ok(t, err, "Stat")
	if info.Metadata["disk_id"] != "disk-7" || info.Metadata["keep"] != "no" || len(info.Metadata) != 2 {
		t.Fatalf("metadata %v, want lower-cased names", info.Metadata)
	}
	ok(t, s.SetMetadata(ctx, "m", blobstore.Metadata{"state": "applied"}), "SetMetadata")
	info, err = s.Stat(ctx, "m")
	ok(t, err, "Stat")
	if len(info.Metadata) != 1 || info.Metadata["state"] != "applied" {
		t.Fatalf("after SetMetadata: %v, want exactly state=applied", info.Metadata)
	}
	got, err := s.GetBlob(ctx, "m")
	ok(t, err, "GetBlob")
	if string(got) != "x" {
		t.Fatalf("SetMetadata changed content to %q", got)
	}
	for _, bad := range []blobstore.Metadata{
		{"1abc": "x"}, {"a-b": "x"}, {"": "x"}, {"a": " lead"}, {"a": "tab\t"}, {"a": "nl\nx"}, {"a": "é"}, {"a": "1", "A": "2"}, {"Ab": "1", "aB": "2"},
		{"big": string(bytes.Repeat([]byte("x"), blobstore.MaxMetadataSize))},
	} {
		wantErr(t, s.SetMetadata(ctx, "m", bad), blobstore.ErrInvalid, "SetMetadata(%q)", bad)
		wantErr(t, s.PutBlob(ctx, "m2", nil, bad), blobstore.ErrInvalid, "PutBlob with metadata %q", bad)
	}
}

func testPageBlob(t *testing.T, s blobstore.Store, opts Options) {
	ctx := ctxT(t)
	for _, size := range []int64{1000, -512, blobstore.MaxPageBlobSize + ps} {
		wantErr(t, s.CreatePageBlob(ctx, "bad", size, nil), blobstore.ErrInvalid, "CreatePageBlob(size %d)", size)
	}
	wantNotFound(t, s.WritePages(ctx, "missing", 0, make([]byte, ps)), "WritePages to missing blob")
	wantNotFound(t, s.ReadPages(ctx, "missing", "", 0, make([]byte, ps)), "ReadPages of missing blob")

	const size = 1 << 20
	ok(t, s.CreatePageBlob(ctx, "disk", size, blobstore.Metadata{"disk": "0"}), "CreatePageBlob")
	info, err := s.Stat(ctx, "disk")
	ok(t, err, "Stat")
	if info.Kind != blobstore.PageBlob || info.Size != size || info.Metadata["disk"] != "0" {
		t.Fatalf("Stat = %+v", info)
	}
	buf := make([]byte, 8192)
	ok(t, s.ReadPages(ctx, "disk", "", 0, buf), "ReadPages of fresh blob")
	if !allZero(buf) {
		t.Fatal("fresh page blob does not read as zeros")
	}

	data := Random(3, 8192)
	ok(t, s.WritePages(ctx, "disk", 4096, data), "WritePages")
	got := make([]byte, 16384)
	ok(t, s.ReadPages(ctx, "disk", "", 0, got), "ReadPages")
	if !allZero(got[:4096]) || !bytes.Equal(got[4096:12288], data) || !allZero(got[12288:]) {
		t.Fatal("ReadPages does not return written data surrounded by zeros")
	}
	// Last page of the blob.
	ok(t, s.WritePages(ctx, "disk", size-ps, data[:ps]), "WritePages last page")
	ok(t, s.ReadPages(ctx, "disk", "", size-ps, got[:ps]), "ReadPages last page")
	if !bytes.Equal(got[:ps], data[:ps]) {
		t.Fatal("last page mismatch")
	}

	for _, c := range []struct{ off, n int64 }{{100, ps}, {0, 100}, {-ps, ps}} {
		wantErr(t, s.WritePages(ctx, "disk", c.off, make([]byte, c.n)), blobstore.ErrInvalid, "WritePages(off %d, len %d)", c.off, c.n)
		wantErr(t, s.ReadPages(ctx, "disk", "", c.off, make([]byte, c.n)), blobstore.ErrInvalid, "ReadPages(off %d, len %d)", c.off, c.n)
		wantErr(t, s.ClearPages(ctx, "disk", c.off, c.n), blobstore.ErrInvalid, "ClearPages(off %d, len %d)", c.off, c.n)
	}
	if !opts.LaxWriteBounds {
		wantErr(t, s.WritePages(ctx, "disk", size-ps, make([]byte, 2*ps)), blobstore.ErrInvalid, "WritePages across end")
	}
	wantErr(t, s.WritePages(ctx, "disk", size, make([]byte, ps)), blobstore.ErrInvalid, "WritePages at end")
	wantErr(t, s.ReadPages(ctx, "disk", "", size-ps, make([]byte, 2*ps)), blobstore.ErrInvalid, "ReadPages beyond end")
	wantErr(t, s.ReadPages(ctx, "disk", "", size, make([]byte, ps)), blobstore.ErrInvalid, "ReadPages at end")

	ok(t, s.ClearPages(ctx, "disk", 4096+ps, 2*ps), "ClearPages")
	ok(t, s.ReadPages(ctx, "disk", "", 4096, got[:8192]), "ReadPages after clear")
	if !bytes.Equal(got[:ps], data[:ps]) || !allZero(got[ps:3*ps]) || !bytes.Equal(got[3*ps:8192], data[3*ps:]) {
		t.Fatal("ClearPages did not zero exactly the cleared range")
	}

	// A page blob may be created at the 8 TiB limit; it is sparse.
	ok(t, s.CreatePageBlob(ctx, "huge", blobstore.MaxPageBlobSize, nil), "CreatePageBlob(8 TiB)")
	ok(t, s.WritePages(ctx, "huge", blobstore.MaxPageBlobSize-4096, data[:4096]), "WritePages at end of 8 TiB blob")
	ok(t, s.ReadPages(ctx, "huge", "", blobstore.MaxPageBlobSize-8192, got[:8192]), "ReadPages at end of 8 TiB blob")
	if !allZero(got[:4096]) || !bytes.Equal(got[4096:8192], data[:4096]) {
		t.Fatal("8 TiB blob: wrong data near the end")
	}

	// CreatePageBlob replaces an existing blob.
	ok(t, s.CreatePageBlob(ctx, "disk", size, nil), "CreatePageBlob over existing")
	ok(t, s.ReadPages(ctx, "disk", "", 4096, got[:8192]), "ReadPages after re-create")
	if !allZero(got[:8192]) {
		t.Fatal("re-created page blob kept old data")
	}

	ok(t, s.DeleteBlob(ctx, "disk"), "DeleteBlob page blob")
	wantNotFound(t, s.ReadPages(ctx, "disk", "", 0, got[:ps]), "ReadPages after delete")
}

func testPageBlobLargeWrite(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	const size = 16 << 20
	ok(t, s.CreatePageBlob(ctx, "big", size, nil), "CreatePageBlob")
	// Crosses two MaxPutPage boundaries and starts unaligned to them.
	data := Random(4, 2*blobstore.MaxPutPage+3*ps)
	off := int64(blobstore.MaxPutPage - ps)
	ok(t, s.WritePages(ctx, "big", off, data), "WritePages %d bytes", len(data))
	got := make([]byte, len(data))
	ok(t, s.ReadPages(ctx, "big", "", off, got), "ReadPages")
	if !bytes.Equal(got, data) {
		t.Fatal("large write does not read back")
	}
	rs, err := s.GetPageRanges(ctx, "big", "", 0, 0)
	ok(t, err, "GetPageRanges")
	if want := []blobstore.PageRange{rng(off, int64(len(data)))}; !slices.Equal(rs, want) {
		t.Fatalf("GetPageRanges after large write = %v, want %v (coalesced)", rs, want)
	}
}

func testPageRanges(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	_, err := s.GetPageRanges(ctx, "missing", "", 0, 0)
	wantNotFound(t, err, "GetPageRanges of missing blob")
	const size = 1 << 30 // sparse: nothing is transferred for unwritten pages
	ok(t, s.CreatePageBlob(ctx, "sparse", size, nil), "CreatePageBlob")
	rs, err := s.GetPageRanges(ctx, "sparse", "", 0, 0)
	ok(t, err, "GetPageRanges empty")
	if len(rs) != 0 {
		t.Fatalf("fresh blob has ranges %v", rs)
	}
	page := Random(5, 64<<10)
	// Two adjacent writes (must coalesce), one distant, one zero-filled
	// (zeros written are still valid pages).
	ok(t, s.WritePages(ctx, "sparse", 1<<20, page), "WritePages")
	ok(t, s.WritePages(ctx, "sparse", 1<<20+64<<10, page), "WritePages adjacent")
	ok(t, s.WritePages(ctx, "sparse", 512<<20, page[:ps]), "WritePages distant")
	ok(t, s.WritePages(ctx, "sparse", size-ps, make([]byte, ps)), "WritePages zeros")
	rs, err = s.GetPageRanges(ctx, "sparse", "", 0, 0)
	ok(t, err, "GetPageRanges")
	want := []blobstore.PageRange{rng(1<<20, 128<<10), rng(512<<20, ps), rng(size-ps, ps)}
	if !slices.Equal(rs, want) {
		t.Fatalf("GetPageRanges = %v, want %v", rs, want)
	}
	// Sub-range: clipped at both ends.
	rs, err = s.GetPageRanges(ctx, "sparse", "", 1<<20+4096, 512<<20)
	ok(t, err, "GetPageRanges sub-range")
	want = []blobstore.PageRange{rng(1<<20+4096, 128<<10-4096), rng(512<<20, ps)}
	if !slices.Equal(rs, want) {
		t.Fatalf("GetPageRanges(sub-range) = %v, want %v", rs, want)
	}
	rs, err = s.GetPageRanges(ctx, "sparse", "", 1<<20+8192, 4096)
	ok(t, err, "GetPageRanges inside one range")
	if want := []blobstore.PageRange{rng(1<<20+8192, 4096)}; !slices.Equal(rs, want) {
		t.Fatalf("GetPageRanges(inside) = %v, want %v", rs, want)
	}
	// Clearing the middle splits the range.
	ok(t, s.ClearPages(ctx, "sparse", 1<<20+32<<10, 64<<10), "ClearPages")
	rs, err = s.GetPageRanges(ctx, "sparse", "", 0, 2<<20)
	ok(t, err, "GetPageRanges after clear")
	want = []blobstore.PageRange{rng(1<<20, 32<<10), rng(1<<20+96<<10, 32<<10)}
	if !slices.Equal(rs, want) {
		t.Fatalf("GetPageRanges after ClearPages = %v, want %v", rs, want)
	}
	_, err = s.GetPageRanges(ctx, "sparse", "", size-ps, 2*ps)
	wantErr(t, err, blobstore.ErrInvalid, "GetPageRanges beyond end")
	_, err = s.GetPageRanges(ctx, "sparse", "", 100, ps)
	wantErr(t, err, blobstore.ErrInvalid, "GetPageRanges misaligned")
}

func testResize(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	wantNotFound(t, s.ResizePageBlob(ctx, "missing", 4096), "ResizePageBlob of missing blob")
	ok(t, s.CreatePageBlob(ctx, "d", 8192, nil), "CreatePageBlob")
	data := Random(6, 8192)
	ok(t, s.WritePages(ctx, "d", 0, data), "WritePages")
	wantErr(t, s.ResizePageBlob(ctx, "d", 1000), blobstore.ErrInvalid, "ResizePageBlob unaligned")

	ok(t, s.ResizePageBlob(ctx, "d", 4096), "shrink")
	wantErr(t, s.ReadPages(ctx, "d", "", 4096, make([]byte, ps)), blobstore.ErrInvalid, "ReadPages beyond shrunk end")
	ok(t, s.ResizePageBlob(ctx, "d", 16384), "grow")
	info, err := s.Stat(ctx, "d")
	ok(t, err, "Stat")
	if info.Size != 16384 {
		t.Fatalf("size after resize = %d", info.Size)
	}
	got := make([]byte, 16384)
	ok(t, s.ReadPages(ctx, "d", "", 0, got), "ReadPages after grow")
	if !bytes.Equal(got[:4096], data[:4096]) || !allZero(got[4096:]) {
		t.Fatal("shrink+grow must keep the head and zero the discarded tail")
	}
	rs, err := s.GetPageRanges(ctx, "d", "", 0, 0)
	ok(t, err, "GetPageRanges")
	if want := []blobstore.PageRange{rng(0, 4096)}; !slices.Equal(rs, want) {
		t.Fatalf("ranges after shrink+grow = %v, want %v", rs, want)
	}
}

func testSnapshots(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	_, err := s.Snapshot(ctx, "missing", nil)
	wantNotFound(t, err, "Snapshot of missing blob")
	l, err := s.ListSnapshots(ctx, "missing")
	ok(t, err, "ListSnapshots of missing blob")
	if len(l) != 0 {
		t.Fatalf("ListSnapshots(missing) = %v", l)
	}

	const size = 64 << 10
	ok(t, s.CreatePageBlob(ctx, "vm/disk0", size, blobstore.Metadata{"owner": "vm"}), "CreatePageBlob")
	// A blob whose name extends ours must not show up in our snapshots.
	ok(t, s.CreatePageBlob(ctx, "vm/disk01", size, nil), "CreatePageBlob sibling")
	_, err = s.Snapshot(ctx, "vm/disk01", nil)
	ok(t, err, "Snapshot sibling")

	v1 := Random(7, 8192)
	ok(t, s.WritePages(ctx, "vm/disk0", 0, v1), "WritePages v1")
	rp1, err := s.Snapshot(ctx, "vm/disk0", blobstore.Metadata{"rp": "1", "Consistency": "crash"})
	ok(t, err, "Snapshot 1")
	if rp1.ID == "" || rp1.Metadata["rp"] != "1" || rp1.Metadata["consistency"] != "crash" || len(rp1.Metadata) != 2 {
		t.Fatalf("Snapshot 1 = %+v", rp1)
	}
	if d := time.Since(rp1.Time); d > time.Hour || d < -time.Hour {
		t.Fatalf("snapshot time %v not close to now", rp1.Time)
	}
	v2 := Random(8, 4096)
	ok(t, s.WritePages(ctx, "vm/disk0", 4096, v2), "WritePages v2")
	ok(t, s.ClearPages(ctx, "vm/disk0", 0, ps), "ClearPages")
	ok(t, s.WritePages(ctx, "vm/disk0", 32<<10, v2), "WritePages v2 elsewhere")
	rp2, err := s.Snapshot(ctx, "vm/disk0", nil) // inherits blob metadata
	ok(t, err, "Snapshot 2")
	if len(rp2.Metadata) != 1 || rp2.Metadata["owner"] != "vm" {
		t.Fatalf("Snapshot without metadata carries %v, want the blob's {owner: vm}", rp2.Metadata)
	}
	if rp2.ID == rp1.ID || !rp2.Time.After(rp1.Time) {
		t.Fatalf("snapshot ids/times not increasing: %+v then %+v", rp1, rp2)
	}
	// Change the live blob after the last snapshot.
	ok(t, s.WritePages(ctx, "vm/disk0", 0, make([]byte, 8192)), "WritePages zeros")

	got := make([]byte, 8192)
	ok(t, s.ReadPages(ctx, "vm/disk0", rp1.ID, 0, got), "ReadPages at rp1")
	if !bytes.Equal(got, v1) {
		t.Fatal("snapshot 1 content changed by later writes")
	}
	ok(t, s.ReadPages(ctx, "vm/disk0", rp2.ID, 0, got), "ReadPages at rp2")
	want := slices.Concat(make([]byte, ps), v1[ps:4096], v2)
	if !bytes.Equal(got, want) {
		t.Fatal("snapshot 2 content wrong")
	}
	rs, err := s.GetPageRanges(ctx, "vm/disk0", rp1.ID, 0, 0)
	ok(t, err, "GetPageRanges at rp1")
	if w := []blobstore.PageRange{rng(0, 8192)}; !slices.Equal(rs, w) {
		t.Fatalf("ranges at rp1 = %v, want %v", rs, w)
	}
	rs, err = s.GetPageRanges(ctx, "vm/disk0", rp2.ID, 0, 0)
	ok(t, err, "GetPageRanges at rp2")
	if w := []blobstore.PageRange{rng(ps, 8192-ps), rng(32<<10, 4096)}; !slices.Equal(rs, w) {
		t.Fatalf("ranges at rp2 = %v, want %v", rs, w)
	}

	l, err = s.ListSnapshots(ctx, "vm/disk0")
	ok(t, err, "ListSnapshots")
	if len(l) != 2 || l[0].ID != rp1.ID || l[1].ID != rp2.ID || l[0].Metadata["rp"] != "1" || l[1].Metadata["owner"] != "vm" {
		t.Fatalf("ListSnapshots = %+v, want [rp1 rp2] with metadata", l)
	}
	if !l[0].Time.Equal(rp1.Time) {
		t.Fatalf("listed time %v != created time %v", l[0].Time, rp1.Time)
	}

	ok(t, s.DeleteSnapshot(ctx, "vm/disk0", rp1.ID), "DeleteSnapshot")
	wantNotFound(t, s.DeleteSnapshot(ctx, "vm/disk0", rp1.ID), "DeleteSnapshot twice")
	wantNotFound(t, s.ReadPages(ctx, "vm/disk0", rp1.ID, 0, got), "ReadPages of deleted snapshot")
	l, err = s.ListSnapshots(ctx, "vm/disk0")
	ok(t, err, "ListSnapshots")
	if len(l) != 1 || l[0].ID != rp2.ID {
		t.Fatalf("after delete ListSnapshots = %+v", l)
	}
	// Snapshot of another blob is not found under this name.
	sib, err := s.ListSnapshots(ctx, "vm/disk01")
	ok(t, err, "ListSnapshots sibling")
	if len(sib) != 1 {
		t.Fatalf("sibling has %d snapshots", len(sib))
	}

	ok(t, s.DeleteBlob(ctx, "vm/disk0"), "DeleteBlob with snapshots")
	l, err = s.ListSnapshots(ctx, "vm/disk0")
	ok(t, err, "ListSnapshots after DeleteBlob")
	if len(l) != 0 {
		t.Fatalf("DeleteBlob left snapshots %v", l)
	}
}

func testCopyFromSnapshot(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	const size = 4 << 20
	ok(t, s.CreatePageBlob(ctx, "replica", size, blobstore.Metadata{"disk": "0"}), "CreatePageBlob")
	a, b := Random(9, 8192), Random(10, 4096)
	ok(t, s.WritePages(ctx, "replica", 0, a), "WritePages")
	ok(t, s.WritePages(ctx, "replica", 2<<20, b), "WritePages")
	rp, err := s.Snapshot(ctx, "replica", blobstore.Metadata{"rp": "7"})
	ok(t, err, "Snapshot")
	ok(t, s.WritePages(ctx, "replica", 0, make([]byte, 8192)), "WritePages after snapshot")

	wantNotFound(t, s.CopyFromSnapshot(ctx, "replica", "2001-01-01T00:00:00.0000000Z", "x", nil), "CopyFromSnapshot of missing snapshot")

	ok(t, s.CopyFromSnapshot(ctx, "replica", rp.ID, "failover/disk0", blobstore.Metadata{"test_failover": "1"}), "CopyFromSnapshot")
	info, err := s.Stat(ctx, "failover/disk0")
	ok(t, err, "Stat copy")
	if info.Kind != blobstore.PageBlob || info.Size != size || len(info.Metadata) != 1 || info.Metadata["test_failover"] != "1" {
		t.Fatalf("copy Stat = %+v", info)
	}
	got := make([]byte, 8192)
	ok(t, s.ReadPages(ctx, "failover/disk0", "", 0, got), "ReadPages copy")
	if !bytes.Equal(got, a) {
		t.Fatal("copy does not hold the snapshot's content")
	}
	ok(t, s.ReadPages(ctx, "failover/disk0", "", 2<<20, got[:4096]), "ReadPages copy")
	if !bytes.Equal(got[:4096], b) {
		t.Fatal("copy does not hold the snapshot's content (second range)")
	}
	rs, err := s.GetPageRanges(ctx, "failover/disk0", "", 0, 0)
	ok(t, err, "GetPageRanges copy")
	if w := []blobstore.PageRange{rng(0, 8192), rng(2<<20, 4096)}; !slices.Equal(rs, w) {
		t.Fatalf("copy ranges = %v, want %v (sparse preserved)", rs, w)
	}
	// The copy is independent of the source.
	ok(t, s.WritePages(ctx, "failover/disk0", 0, make([]byte, ps)), "WritePages copy")
	ok(t, s.ReadPages(ctx, "replica", rp.ID, 0, got), "ReadPages snapshot")
	if !bytes.Equal(got, a) {
		t.Fatal("writing the copy changed the snapshot")
	}
	// Without metadata the copy carries the snapshot's.
	ok(t, s.CopyFromSnapshot(ctx, "replica", rp.ID, "failover/disk0", nil), "CopyFromSnapshot over existing")
	info, err = s.Stat(ctx, "failover/disk0")
	ok(t, err, "Stat copy")
	if len(info.Metadata) != 1 || info.Metadata["rp"] != "7" {
		t.Fatalf("copy without metadata carries %v, want the snapshot's {rp: 7}", info.Metadata)
	}
	ok(t, s.ReadPages(ctx, "failover/disk0", "", 0, got), "ReadPages copy")
	if !bytes.Equal(got, a) {
		t.Fatal("re-copy did not replace the content")
	}
}

func testConcurrentWrites(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	const workers, chunk = 4, 64 << 10
	ok(t, s.CreatePageBlob(ctx, "conc", workers*chunk, nil), "CreatePageBlob")
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		wg.Go(func() {
			errs[w] = s.WritePages(ctx, "conc", int64(w*chunk), Random(uint64(100+w), chunk))
		})
	}
	wg.Wait()
	for _, err := range errs {
		ok(t, err, "concurrent WritePages")
	}
	got := make([]byte, workers*chunk)
	ok(t, s.ReadPages(ctx, "conc", "", 0, got), "ReadPages")
	for w := range workers {
		if !bytes.Equal(got[w*chunk:(w+1)*chunk], Random(uint64(100+w), chunk)) {
			t.Fatalf("worker %d's range is wrong", w)
		}
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func rng(off, n int64) blobstore.PageRange { return blobstore.PageRange{Offset: off, Length: n} }

// testFences: writes under an older fence fail, change nothing, and none
// lands once a newer writer has claimed the blob.
func testFences(t *testing.T, s blobstore.Store) {
	ctx := ctxT(t)
	const name = "fenced"
	old, cur := blobstore.WithFence(ctx, 5), blobstore.WithFence(ctx, 6)
	wantNotFound(t, s.ClaimPageBlob(ctx, name, 5), "claim a missing blob")
	ok(t, s.CreatePageBlob(old, name, 4*ps, blobstore.Metadata{"v": "old"}), "create under fence 5")
	a, b := Random(1, 2*ps), Random(2, 2*ps)
	ok(t, s.WritePages(old, name, 0, a), "write under the blob's own fence")
	ok(t, s.ClaimPageBlob(ctx, name, 5), "claim again with the same fence")
	err := s.WritePages(cur, name, 0, b)
	wantErr(t, err, blobstore.ErrFenced, "write under a fence not claimed yet")
	if blobstore.NewerFence(err) {
		t.Fatalf("write under a fence not claimed yet said a newer writer claimed the blob: %v", err)
	}

	ok(t, s.ClaimPageBlob(ctx, name, 6), "claim with a newer fence")
	// (A refused claim may still change the ETag: Azure's max action
	// succeeds, leaving the number.)
	wantErr(t, s.ClaimPageBlob(ctx, name, 5), blobstore.ErrFenced, "claim with an older fence")
	info, err := s.Stat(ctx, name)
	ok(t, err, "stat")
	err = s.WritePages(old, name, 0, b)
	var fe *blobstore.FenceError
	if !errors.As(err, &fe) || fe.N != 5 || fe.Got != 6 || !blobstore.NewerFence(err) {
		t.Fatalf("write pages under the old fence: %v, want a FenceError of fence 5 against 6", err)
	}
	if err := s.ClearPages(old, name, 0, ps); !blobstore.NewerFence(err) {
		t.Fatalf("clear pages under the old fence: %v, want a newer writer's fence", err)
	}
	wantErr(t, s.ResizePageBlob(old, name, 8*ps), blobstore.ErrFenced, "resize under the old fence")
	wantErr(t, s.SetMetadata(old, name, blobstore.Metadata{"v": "older"}), blobstore.ErrFenced, "set metadata under the old fence")
	_, err = s.Snapshot(old, name, nil)
	wantErr(t, err, blobstore.ErrFenced, "snapshot under the old fence")
	wantErr(t, s.CreatePageBlob(old, name, 4*ps, nil), blobstore.ErrFenced, "create over the blob under the old fence")
	after, err := s.Stat(ctx, name)
	ok(t, err, "stat")
	if after.ETag != info.ETag || after.Size != 4*ps || after.Metadata["v"] != "old" {
		t.Fatalf("writes under the old fence changed the blob: %+v, was %+v", after, info)
	}
	snaps, err := s.ListSnapshots(ctx, name)
	ok(t, err, "list snapshots")
	if len(snaps) != 0 {
		t.Fatalf("a snapshot under the old fence was taken: %v", snaps)
	}
	got := make([]byte, 2*ps)
	ok(t, s.ReadPages(ctx, name, "", 0, got), "read")
	if !bytes.Equal(got, a) {
		t.Fatal("pages written under the old fence after the claim")
	}

	// The newer writer goes on; unfenced writes are not checked.
	ok(t, s.WritePages(cur, name, 0, b), "write under the new fence")
	ok(t, s.ClearPages(cur, name, ps, ps), "clear under the new fence")
	ok(t, s.ResizePageBlob(cur, name, 8*ps), "resize under the new fence")
	ok(t, s.SetMetadata(cur, name, blobstore.Metadata{"v": "new"}), "set metadata under the new fence")
	sn, err := s.Snapshot(cur, name, nil)
	ok(t, err, "snapshot under the new fence")
	if sn.Metadata["v"] != "new" {
		t.Fatalf("snapshot metadata %v", sn.Metadata)
	}
	ok(t, s.WritePages(ctx, name, 2*ps, a[:ps]), "write without a fence")
	ok(t, s.ReadPages(ctx, name, sn.ID, 0, got), "read the snapshot")
	if want := append(b[:ps:ps], make([]byte, ps)...); !bytes.Equal(got, want) {
		t.Fatal("the snapshot does not hold the new writer's pages")
	}

	// A create under a fence sets it; one where no blob is needs none.
	ok(t, s.CreatePageBlob(cur, name, 2*ps, nil), "create over the blob under its fence")
	wantErr(t, s.WritePages(old, name, 0, a), blobstore.ErrFenced, "write under the old fence after the create")
	ok(t, s.WritePages(cur, name, 0, b), "write under the fence the create set")
	ok(t, s.CreatePageBlob(blobstore.WithFence(ctx, 3), "other", 2*ps, nil), "create a new blob under any fence")
	wantErr(t, s.WritePages(cur, "other", 0, a), blobstore.ErrFenced, "write under another fence than the create's")
	ok(t, s.CreatePageBlob(ctx, "other", 2*ps, nil), "unfenced create")
	ok(t, s.WritePages(blobstore.WithFence(ctx, 0), "other", 0, a), "write under fence 0 of a blob created unfenced")
	wantErr(t, s.ClaimPageBlob(ctx, name, -1), blobstore.ErrInvalid, "claim with a negative fence")

	// A block blob has no fence to claim; a fenced create replaces it.
	ok(t, s.PutBlob(ctx, "block", []byte("x"), nil), "put a block blob")
	wantErr(t, s.ClaimPageBlob(ctx, "block", 6), blobstore.ErrInvalid, "claim a block blob")
	ok(t, s.CreatePageBlob(cur, "block", 2*ps, nil), "create a page blob under a fence over a block blob")
	ok(t, s.WritePages(cur, "block", 0, a), "write under the fence the create set")

	// A newer writer's create replaces an older one's blob (made where
	// none was, say, after the newer's claim found nothing).
	ok(t, s.CreatePageBlob(blobstore.WithFence(ctx, 7), "block", 2*ps, nil), "create under a newer fence")
	wantErr(t, s.WritePages(cur, "block", 0, a), blobstore.ErrFenced, "write under the replaced blob's fence")

	// Fences up to MaxFence are kept exactly (Azurite keeps doubles).
	const top = blobstore.MaxFence
	ok(t, s.CreatePageBlob(blobstore.WithFence(ctx, top-2), "big", 2*ps, nil), "create under fence MaxFence-2")
	ok(t, s.ClaimPageBlob(ctx, "big", top-1), "claim with fence MaxFence-1")
	wantErr(t, s.WritePages(blobstore.WithFence(ctx, top-2), "big", 0, a), blobstore.ErrFenced, "write under fence MaxFence-2")
	ok(t, s.SetMetadata(blobstore.WithFence(ctx, top-1), "big", blobstore.Metadata{"v": "top"}), "set metadata under fence MaxFence-1")
	ok(t, s.ClaimPageBlob(ctx, "big", top), "claim with MaxFence")
	wantErr(t, s.ClaimPageBlob(ctx, "big", top+1), blobstore.ErrInvalid, "claim beyond MaxFence")
	wantErr(t, s.CreatePageBlob(blobstore.WithFence(ctx, top+1), "big", 2*ps, nil), blobstore.ErrInvalid, "create beyond MaxFence")
}
