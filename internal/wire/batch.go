package wire

import (
	"errors"
	"fmt"
	"math"
)

// Op is what a change record does to its disk range.
type Op uint8

const (
	// OpWrite: Data (Length bytes) was written at Offset.
	OpWrite Op = 1
	// OpZero: Length bytes at Offset now read as zeros. No data.
	OpZero Op = 2
	// OpDiscard: Length bytes at Offset were discarded (TRIM); their content
	// is undefined. No data.
	OpDiscard Op = 3
	// OpMarker: an in-stream Marker, ordered with the writes around it. No
	// data; Flags holds the MarkerKind, Offset the time in unix nanoseconds
	// and Length is 0. Use MarkerRecord and Record.Marker.
	OpMarker Op = 4
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpZero:
		return "zero"
	case OpDiscard:
		return "discard"
	case OpMarker:
		return "marker"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

const (
	batchHeaderSize = 12
	// RecordHeaderSize is the encoded size of a record without its data.
	RecordHeaderSize = 24
)

// Record is one change record.
//
// Encoding (RecordHeaderSize bytes, then Length bytes of data for OpWrite
// only): u64 seq, u16 disk, u8 op, u8 flags, u64 offset, u32 length.
type Record struct {
	Seq    uint64
	Disk   uint16 // index into Hello.Disks
	Op     Op
	Flags  uint8 // not interpreted by this package, except for OpMarker
	Offset uint64
	Length uint32
	Data   []byte // OpWrite only; len(Data) == Length
}

// MarkerRecord returns the OpMarker record for m.
func MarkerRecord(m Marker) Record {
	return Record{Seq: m.Seq, Op: OpMarker, Flags: uint8(m.Kind), Offset: uint64(m.UnixNano)}
}

// Marker returns the Marker an OpMarker record carries.
func (r *Record) Marker() Marker {
	return Marker{Seq: r.Seq, UnixNano: int64(r.Offset), Kind: MarkerKind(r.Flags)}
}

// Dates reports whether r is a marker that dates the stream (a time, a
// crash- or app-consistent point): a marker the agent withdrew does not.
func (r *Record) Dates() bool {
	return r.Op == OpMarker && MarkerKind(r.Flags) != MarkerWithdrawn
}

// check enforces the per-record rules shared by BatchBuilder.Add and
// DecodeBatch.
func (r *Record) check() error {
	switch r.Op {
	case OpWrite, OpZero, OpDiscard:
		if r.Length == 0 {
			return fmt.Errorf("empty %s at offset %d", r.Op, r.Offset)
		}
		if r.Offset > math.MaxUint64-uint64(r.Length) {
			return fmt.Errorf("%s of %d bytes at offset %d overflows", r.Op, r.Length, r.Offset)
		}
		if r.Op != OpWrite && len(r.Data) != 0 {
			return fmt.Errorf("%s carries %d bytes of data", r.Op, len(r.Data))
		}
	case OpMarker:
		if r.Length != 0 || len(r.Data) != 0 {
			return errors.New("marker with a length or data")
		}
		if k := MarkerKind(r.Flags); !k.valid() && k != MarkerWithdrawn {
			return fmt.Errorf("unknown marker kind %d", r.Flags)
		}
	default:
		return fmt.Errorf("unknown op %d", r.Op)
	}
	return nil
}

// BatchBuilder collects change records for one Batch frame. It does not
// copy record data: Data slices passed to Add must stay unchanged until the
// batch has been written (Writer.WriteBatch returned) or Reset.
//
// Payload: u64 first seq, u32 count, then count records (see Record).
// Sequences strictly increase and the first record's is the first seq.
//
// The zero value is an empty builder. Reuse one builder across batches
// (Reset) so that adding records does not allocate in steady state.
type BatchBuilder struct {
	hdr     []byte // batch header, then every record header back to back
	recs    []pendingRecord
	vec     [][]byte
	size    int
	first   uint64
	lastSeq uint64
}

type pendingRecord struct {
	hdrEnd int // end of this record's header in hdr
	data   []byte
}

var zeroBatchHeader [batchHeaderSize]byte

// Reset empties b, keeping its memory but dropping its references to
// record data.
func (b *BatchBuilder) Reset() {
	clear(b.recs)
	clear(b.vec)
	b.hdr, b.recs, b.vec = b.hdr[:0], b.recs[:0], b.vec[:0]
	b.size, b.first, b.lastSeq = 0, 0, 0
}

// Count returns the number of records added.
func (b *BatchBuilder) Count() int { return len(b.recs) }

// Len returns the payload size in bytes of the batch so far.
func (b *BatchBuilder) Len() int {
	if len(b.recs) == 0 {
		return 0
	}
	return b.size
}

// Add appends r. It returns ErrBatchFull, leaving b unchanged, if r would
// push the payload past MaxPayload (ErrTooLarge if r alone would), and an ErrMalformed error if r breaks
// the record rules (see Op) or its sequence does not exceed the previous
// record's.
func (b *BatchBuilder) Add(r Record) error {
	if r.Op == OpWrite && len(r.Data) != int(r.Length) {
		return fmt.Errorf("%w: write record %d: Length %d but %d bytes of data", ErrMalformed, r.Seq, r.Length, len(r.Data))
	}
	if err := r.check(); err != nil {
		return fmt.Errorf("%w: record %d: %v", ErrMalformed, r.Seq, err)
	}
	if len(b.recs) > 0 && r.Seq <= b.lastSeq {
		return fmt.Errorf("%w: record sequence %d after %d; sequences must increase", ErrMalformed, r.Seq, b.lastSeq)
	}
	size := b.size
	if len(b.recs) == 0 {
		size = batchHeaderSize
	}
	if size+RecordHeaderSize+len(r.Data) > MaxPayload {
		if len(b.recs) == 0 {
			return fmt.Errorf("%w: record %d with %d bytes of data cannot fit in any batch", ErrTooLarge, r.Seq, len(r.Data))
		}
		return ErrBatchFull
	}
	if len(b.recs) == 0 {
		b.hdr = append(b.hdr[:0], zeroBatchHeader[:]...)
		b.first = r.Seq
	}
	b.hdr = appendRecordHeader(b.hdr, &r)
	b.recs = append(b.recs, pendingRecord{hdrEnd: len(b.hdr), data: r.Data})
	b.size = size + RecordHeaderSize + len(r.Data)
	b.lastSeq = r.Seq
	return nil
}

func appendRecordHeader(b []byte, r *Record) []byte {
	b = le.AppendUint64(b, r.Seq)
	b = le.AppendUint16(b, r.Disk)
	b = append(b, byte(r.Op), r.Flags)
	b = le.AppendUint64(b, r.Offset)
	return le.AppendUint32(b, r.Length)
}

// WithdrawMarkers turns every crash- or app-consistent marker record with
// a sequence from from on into MarkerWithdrawn, in place, and returns how
// many it changed. (A batch is encoded from b's headers when written.)
func (b *BatchBuilder) WithdrawMarkers(from uint64) int {
	n := 0
	for _, r := range b.recs {
		h := b.hdr[r.hdrEnd-RecordHeaderSize : r.hdrEnd]
		k := MarkerKind(h[11])
		if Op(h[10]) == OpMarker && (k == MarkerCrashConsistent || k == MarkerAppConsistent) && le.Uint64(h) >= from {
			h[11] = byte(MarkerWithdrawn)
			n++
		}
	}
	return n
}

// parts returns the payload as slices in order: runs of headers from b.hdr
// alternating with record data. They stay valid until the next Add or Reset.
func (b *BatchBuilder) parts() [][]byte {
	le.PutUint64(b.hdr[0:], b.first)
	le.PutUint32(b.hdr[8:], uint32(len(b.recs)))
	vec := b.vec[:0]
	start := 0
	for _, r := range b.recs {
		if len(r.data) == 0 {
			continue // the next header follows directly; keep the run going
		}
		vec = append(vec, b.hdr[start:r.hdrEnd], r.data)
		start = r.hdrEnd
	}
	if start < len(b.hdr) {
		vec = append(vec, b.hdr[start:])
	}
	b.vec = vec
	return vec
}

// AppendBinary appends the batch payload to dst, copying the record data.
// It is for tests and spooling; Writer.WriteBatch avoids the copy.
func (b *BatchBuilder) AppendBinary(dst []byte) ([]byte, error) {
	if len(b.recs) == 0 {
		return dst, fmt.Errorf("%w: batch has no records", ErrMalformed)
	}
	for _, p := range b.parts() {
		dst = append(dst, p...)
	}
	return dst, nil
}

// Batch is a decoded, validated Batch payload. It aliases the payload, so it
// is valid only as long as the payload is (for a Frame from Reader.Next:
// until the next call to Next).
type Batch struct {
	FirstSeq uint64
	Count    uint32
	records  []byte
}

// DecodeBatch validates a Batch payload without copying or allocating. The
// whole batch is checked before it is returned, so a consumer never applies
// part of a malformed batch.
func DecodeBatch(p []byte) (Batch, error) {
	if len(p) < batchHeaderSize {
		return Batch{}, fmt.Errorf("%w: batch: %d bytes, shorter than the %d-byte batch header", ErrMalformed, len(p), batchHeaderSize)
	}
	b := Batch{FirstSeq: le.Uint64(p[0:]), Count: le.Uint32(p[8:]), records: p[batchHeaderSize:]}
	if b.Count == 0 {
		return Batch{}, fmt.Errorf("%w: batch: no records", ErrMalformed)
	}
	if uint64(b.Count) > uint64(len(b.records)/RecordHeaderSize) {
		return Batch{}, fmt.Errorf("%w: batch: %d records cannot fit in %d bytes", ErrMalformed, b.Count, len(b.records))
	}
	rest := b.records
	var prev uint64
	for i := uint32(0); i < b.Count; i++ {
		var r Record
		var err error
		if r, rest, err = parseRecord(rest); err == nil {
			err = r.check()
		}
		switch {
		case err != nil:
		case i == 0 && r.Seq != b.FirstSeq:
			err = fmt.Errorf("sequence %d, but the batch starts at %d", r.Seq, b.FirstSeq)
		case i > 0 && r.Seq <= prev:
			err = fmt.Errorf("sequence %d after %d; sequences must increase", r.Seq, prev)
		}
		if err != nil {
			return Batch{}, fmt.Errorf("%w: batch: record %d of %d: %v", ErrMalformed, i, b.Count, err)
		}
		prev = r.Seq
	}
	if len(rest) != 0 {
		return Batch{}, fmt.Errorf("%w: batch: %d trailing bytes after %d records", ErrMalformed, len(rest), b.Count)
	}
	return b, nil
}

// parseRecord splits the first record off p. Data aliases p.
func parseRecord(p []byte) (Record, []byte, error) {
	if len(p) < RecordHeaderSize {
		return Record{}, nil, fmt.Errorf("truncated header: %d of %d bytes", len(p), RecordHeaderSize)
	}
	r := Record{
		Seq:    le.Uint64(p[0:]),
		Disk:   le.Uint16(p[8:]),
		Op:     Op(p[10]),
		Flags:  p[11],
		Offset: le.Uint64(p[12:]),
		Length: le.Uint32(p[20:]),
	}
	p = p[RecordHeaderSize:]
	if r.Op == OpWrite {
		if uint64(r.Length) > uint64(len(p)) {
			return Record{}, nil, fmt.Errorf("write of %d bytes, but only %d bytes remain", r.Length, len(p))
		}
		r.Data = p[:r.Length:r.Length] // capped: appending must not clobber the next record
		p = p[r.Length:]
	}
	return r, p, nil
}

// Records returns an iterator over b's records, in order.
func (b Batch) Records() BatchIter {
	return BatchIter{rest: b.records, left: b.Count}
}

// BatchIter iterates over a Batch:
//
//	it := batch.Records()
//	for it.Next() {
//		rec := it.Record()
//		…
//	}
type BatchIter struct {
	rest []byte
	left uint32
	rec  Record
}

// Next advances to the next record and reports whether there is one.
func (it *BatchIter) Next() bool {
	if it.left == 0 {
		return false
	}
	// DecodeBatch validated every record, so this cannot fail.
	it.rec, it.rest, _ = parseRecord(it.rest)
	it.left--
	return true
}

// Record returns the current record. It and its Data are valid until the
// next call to Next, and Data aliases the frame payload.
func (it *BatchIter) Record() *Record { return &it.rec }
