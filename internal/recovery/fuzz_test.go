package recovery_test

import (
	"errors"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// FuzzDecodeSegment feeds arbitrary plaintexts to the segment decoder
// that recovery and the applier use after authentication. It must never
// panic, must fail only with ErrMalformedSegment, and what it accepts
// keeps its contract: a header only first, record sequences increasing,
// markers not before the record they follow.
func FuzzDecodeSegment(f *testing.F) {
	var b wire.BatchBuilder
	for i, seq := range []uint64{5, 6, 9} {
		if err := b.Add(wire.Record{Seq: seq, Op: wire.OpWrite, Disk: uint16(i % 2), Offset: uint64(i) * 4096, Length: 4, Data: []byte{1, 2, 3, 4}}); err != nil {
			f.Fatal(err)
		}
	}
	batch, err := b.AppendBinary(nil)
	if err != nil {
		f.Fatal(err)
	}
	seg := wire.AppendSegmentHeader(nil, wire.SegmentHeader{Prev: 4})
	seg, _ = wire.AppendFrame(seg, wire.TypeBatch, 0, batch)
	mk, _ := (&wire.Marker{Seq: 9, UnixNano: 1, Kind: wire.MarkerCrashConsistent}).AppendBinary(nil)
	seg, _ = wire.AppendFrame(seg, wire.TypeMarker, 0, mk)
	f.Add(seg)
	f.Add(seg[wire.SegmentHeaderSize:])
	f.Add(append(seg[wire.SegmentHeaderSize:len(seg):len(seg)], seg[:wire.SegmentHeaderSize]...))
	f.Fuzz(func(t *testing.T, plain []byte) {
		var d recovery.Decoder
		recs, err := d.Decode(plain)
		if err != nil {
			if !errors.Is(err, recovery.ErrMalformedSegment) {
				t.Fatalf("error not ErrMalformedSegment: %v", err)
			}
			return
		}
		var prev uint64
		for i, r := range recs {
			if i > 0 && (r.Seq < prev || (r.Seq == prev && r.Op != wire.OpMarker)) {
				t.Fatalf("record %d: seq %d after %d", i, r.Seq, prev)
			}
			prev = r.Seq
		}
		if _, ok := d.Prev(); ok && (len(plain) < wire.SegmentHeaderSize || wire.Type(plain[5]) != wire.TypeSegment) {
			t.Fatal("a header reported that is not the first frame")
		}
	})
}
