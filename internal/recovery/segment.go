// Package recovery reads what the process server keeps in the storage
// account — journal segments, wrapped data keys, recovery points — and
// rebuilds a disk as it was at any sequence number or time inside the
// retention window, from the account and the recovery key alone.
//
// The process server's applier (processserver/applier) writes the replica
// page blobs and recovery points with the helpers of this package
// (Decoder, PointMetadata), so that writer and reader cannot disagree.
package recovery

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Errors callers may test for with errors.Is. They are wrapped with the
// blob, machine or point concerned.
var (
	// ErrTampered: a journal segment or wrapped key failed authentication.
	// It wraps seal.ErrTampered too. Nothing of that blob was used.
	ErrTampered = errors.New("failed verification (tampered, truncated or sealed under another name or key)")
	// ErrWrongRecoveryKey: the recovery key does not unwrap the machine's
	// data key.
	ErrWrongRecoveryKey = errors.New("wrong recovery key")
	// ErrMalformedSegment: an authentic segment does not hold a valid
	// sequence of frames (a process server bug, not tampering).
	ErrMalformedSegment = errors.New("malformed journal segment")
	// ErrOutOfRange: the requested point lies outside what the account
	// can recover (before the oldest point or after recoverable_until).
	ErrOutOfRange = errors.New("point not recoverable")
	// ErrNoMachine: the account holds no manifest for the machine.
	ErrNoMachine = errors.New("machine not found in the storage account")
	// ErrNoDataKey: the account holds no data key for the machine (its
	// key blobs were deleted, or never stored): nothing of it can be read.
	ErrNoDataKey = errors.New("no data key in the storage account")
)

// Segment describes one journal segment blob, from its name and metadata
// (not authenticated: only the content is, when opened).
type Segment struct {
	Name        string
	First, Last uint64    // sequence range, from the blob name
	FirstTime   time.Time // of the first marker inside; zero if none or unknown
	LastTime    time.Time // of the last marker inside; zero if none or unknown
	Size        int64     // sealed size in bytes
	// App: its metadata says it holds an app-consistent marker (not
	// authenticated: a hint).
	App bool
}

// ListSegments returns machine's journal segments sorted by sequence
// (first, then last). Blobs under the journal prefix whose names are not
// segment names are ignored.
func ListSegments(ctx context.Context, store blobstore.Store, machine string) ([]Segment, error) {
	infos, err := store.ListBlobs(ctx, layout.JournalPrefix(machine))
	if err != nil {
		return nil, fmt.Errorf("list journal of machine %q: %w", machine, err)
	}
	return segments(infos), nil
}

// listBlockDigits sets the span of first sequences ListSegmentsFrom lists
// with one name prefix (10^5: the segment name's first 15 of 20 digits),
// and listBlocksMax how many such listings it makes before one listing of
// the whole journal is likely cheaper: 64 blocks cover five minutes of 4 KiB
// writes at 37 MB/s (retention's usual step), and the whole journal of a
// day then takes some 80 list calls.
const (
	listBlockDigits = 5
	listBlocksMax   = 64
)

// ListSegmentsFrom returns, as ListSegments, at least every segment whose
// first sequence lies in [from, to]: those of the 10⁵-sequence blocks
// that range touches, listed by name prefix. A journal kept for a day
// holds hundreds of thousands of segments; the applier, which lists after
// every upload, needs the few past its cursor.
func ListSegmentsFrom(ctx context.Context, store blobstore.Store, machine string, from, to uint64) ([]Segment, error) {
	const block = 100_000 // 10^listBlockDigits
	if to < from || to/block-from/block >= listBlocksMax {
		return ListSegments(ctx, store, machine)
	}
	var infos []blobstore.BlobInfo
	for b := from / block; b <= to/block; b++ {
		prefix := fmt.Sprintf("%s%0*d", layout.JournalPrefix(machine), 20-listBlockDigits, b)
		l, err := store.ListBlobs(ctx, prefix)
		if err != nil {
			return nil, fmt.Errorf("list journal of machine %q from sequence %d: %w", machine, b*block, err)
		}
		infos = append(infos, l...)
	}
	return segments(infos), nil
}

// segments parses and sorts journal blob listings.
func segments(infos []blobstore.BlobInfo) []Segment {
	segs := make([]Segment, 0, len(infos))
	for _, bi := range infos {
		first, last, err := layout.ParseSegmentName(bi.Name)
		if err != nil {
			continue
		}
		segs = append(segs, Segment{
			Name: bi.Name, First: first, Last: last, Size: bi.Size,
			FirstTime: metaTime(bi.Metadata[layout.MetaFirstTime]),
			LastTime:  metaTime(bi.Metadata[layout.MetaLastTime]),
			App:       slices.Contains(strings.Split(bi.Metadata[layout.MetaMarkers], ","), "app"),
		})
	}
	slices.SortFunc(segs, func(a, b Segment) int {
		if a.First != b.First {
			return cmpU64(a.First, b.First)
		}
		return cmpU64(a.Last, b.Last)
	})
	return segs
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// metaTime parses unix nanoseconds; "0", empty or garbage is the zero time.
func metaTime(s string) time.Time {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// ReadSegment downloads segment name, authenticates it with keys (the
// additional data is the blob name, so a renamed segment fails too) and
// appends its plaintext to dst. A segment that fails authentication
// returns an error wrapping ErrTampered and seal.ErrTampered, naming the
// blob; nothing is appended then.
func ReadSegment(ctx context.Context, store blobstore.Store, name string, keys seal.Keyring, dst []byte) ([]byte, error) {
	sealed, err := store.GetBlob(ctx, name)
	if err != nil {
		if errors.Is(err, blobstore.ErrCorrupt) {
			return dst, fmt.Errorf("journal segment %s: %w: %w", name, ErrTampered, err)
		}
		return dst, fmt.Errorf("read journal segment %s: %w", name, err)
	}
	out, err := seal.Open(dst, sealed, keys, []byte(name))
	if err != nil {
		if errors.Is(err, seal.ErrTampered) {
			return dst, fmt.Errorf("journal segment %s %w; refusing to use it: %w", name, ErrTampered, err)
		}
		return dst, fmt.Errorf("journal segment %s: %w", name, err)
	}
	return out, nil
}

// A StaleFilter tells the segments of a history the journal gave up. A
// process server cut off from its agent but not from the account (the
// agent went to another) may still upload segments after the new owner
// recorded the gap of what it never received (layout.Gap, From to
// LostTo). No segment of the journal starts with a write inside a gap (a
// process server takes no record at or below an open gap's end; only
// tombstones and time markers lie there), so one that does is the old
// history's: applied, it would undo what the mending resync left alone.
// A segment chained to a predecessor inside a gap that the chain has not
// reached, or to a segment skipped before, continues that history, while
// the new owner's first segment chains to the gap's start. Readers skip
// such segments: every segment they accept is still chained to the one
// before, and a reader whose chain ends short of the journal's end
// refuses it, so a skip never hides a missing segment (it fails later).
type StaleFilter struct {
	Gaps []layout.Gap // the manifest's
	ends map[uint64]bool
}

// Skip reports whether a segment, authentic and just decoded (recs, and
// its header's prev if it has one), is stale, when the journal is known
// complete up to chain; it remembers the segments it skips.
func (f *StaleFilter) Skip(last uint64, recs []wire.Record, prev uint64, hasPrev bool, chain uint64) bool {
	if !f.stale(recs, prev, hasPrev, chain) {
		return false
	}
	if f.ends == nil {
		f.ends = make(map[uint64]bool)
	}
	f.ends[last] = true
	return true
}

// Skipped reports whether Skip has skipped a segment.
func (f *StaleFilter) Skipped() bool { return len(f.ends) > 0 }

func (f *StaleFilter) stale(recs []wire.Record, prev uint64, hasPrev bool, chain uint64) bool {
	after := hasPrev && prev > chain // follows what the chain has not reached
	if after && f.ends[prev] {
		return true
	}
	// Its first write: a segment of the journal starts past the one
	// before, and a gap starts past the journal's end when recorded.
	first := uint64(0)
	for i := range recs {
		if recs[i].Op != wire.OpMarker {
			first = recs[i].Seq
			break
		}
	}
	for _, g := range f.Gaps {
		if after && prev >= g.From && prev <= g.LostTo {
			return true
		}
		if first >= g.From && first <= g.LostTo {
			return true
		}
	}
	return false
}

// Decoder turns segment plaintexts into records. Reuse one Decoder so that
// decoding does not allocate in steady state. Not safe for concurrent use.
type Decoder struct {
	r     *wire.Reader
	arena []byte
	recs  []wire.Record
	// prev, hasPrev: the last decoded segment's header (Prev).
	prev    uint64
	hasPrev bool
}

// Prev returns the Prev of the last decoded segment's header
// (wire.SegmentHeader), and false if it had none (written before the
// process server chained segments).
func (d *Decoder) Prev() (uint64, bool) { return d.prev, d.hasPrev }

// Decode parses plain, the plaintext of one segment: a sequence of Batch
// and Marker frames. It returns every record in order; Marker frames are
// returned as OpMarker records (see wire.MarkerRecord), so callers see one
// ordered stream. The whole plaintext is validated before anything is
// returned, so a caller never acts on part of a bad segment; an error
// wraps ErrMalformedSegment.
//
// The records and their Data are valid until the next call to Decode.
// Record sequences must strictly increase; a Marker frame carries the
// sequence of the record it follows, so it may equal the previous one.
func (d *Decoder) Decode(plain []byte) ([]wire.Record, error) {
	if d.r == nil {
		d.r = wire.NewReader(bytes.NewReader(plain), 0)
	} else {
		d.r.Reset(bytes.NewReader(plain))
	}
	// Record data must outlive the reader's frame buffer: copy payloads
	// into an arena sized so that it never reallocates (payloads are
	// smaller than the plaintext holding them).
	if cap(d.arena) < len(plain) {
		d.arena = make([]byte, 0, len(plain))
	}
	arena := d.arena[:0]
	recs := d.recs[:0]
	d.prev, d.hasPrev = 0, false
	var prev uint64
	for i := 0; ; i++ {
		f, err := d.r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: frame %d: %w", ErrMalformedSegment, i, err)
		}
		switch f.Type {
		case wire.TypeBatch:
			start := len(arena)
			arena = append(arena, f.Payload...)
			b, err := wire.DecodeBatch(arena[start:])
			if err != nil {
				return nil, fmt.Errorf("%w: frame %d: %w", ErrMalformedSegment, i, err)
			}
			it := b.Records()
			for it.Next() {
				r := *it.Record()
				if len(recs) > 0 && r.Seq <= prev {
					return nil, fmt.Errorf("%w: frame %d: record %d after %d; sequences must increase", ErrMalformedSegment, i, r.Seq, prev)
				}
				prev = r.Seq
				recs = append(recs, r)
			}
		case wire.TypeMarker:
			var m wire.Marker
			if err := m.UnmarshalBinary(f.Payload); err != nil {
				return nil, fmt.Errorf("%w: frame %d: %w", ErrMalformedSegment, i, err)
			}
			if len(recs) > 0 && m.Seq < prev {
				return nil, fmt.Errorf("%w: frame %d: marker at %d after record %d", ErrMalformedSegment, i, m.Seq, prev)
			}
			prev = m.Seq
			recs = append(recs, wire.MarkerRecord(m))
		case wire.TypeSegment:
			var h wire.SegmentHeader
			if i != 0 {
				return nil, fmt.Errorf("%w: frame %d: segment header not first", ErrMalformedSegment, i)
			}
			if err := h.UnmarshalBinary(f.Payload); err != nil {
				return nil, fmt.Errorf("%w: frame %d: %w", ErrMalformedSegment, i, err)
			}
			d.prev, d.hasPrev = h.Prev, true
		default:
			return nil, fmt.Errorf("%w: frame %d: unexpected %s frame", ErrMalformedSegment, i, f.Type)
		}
	}
	d.arena, d.recs = arena[:0], recs[:0]
	return recs, nil
}
