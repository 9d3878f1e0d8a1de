package processserver

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
)

// TestSealSegmentSkipsCompression: a run of incompressible segments turns
// the compressor off for a while, compressible data turns it back on, and
// every sealed segment opens to its plaintext under its name.
func TestSealSegmentSkipsCompression(t *testing.T) {
	material, id := seal.NewDataKey()
	key, err := seal.NewKey(id, material)
	if err != nil {
		t.Fatal(err)
	}
	m := &machine{name: "m1", key: key}
	rng := rand.New(rand.NewPCG(1, 2))
	random := func() []byte {
		b := make([]byte, 256<<10)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	seq := uint64(1)
	// sealed reports whether segment data was stored compressed.
	compressed := func(data []byte) bool {
		t.Helper()
		b := &segBuf{data: data, meta: segMeta{first: seq, last: seq}}
		seq++
		out, err := m.sealSegment(nil, b)
		if err != nil {
			t.Fatal(err)
		}
		meta, sealed, err := parseCached(out)
		if err != nil || meta.first != b.meta.first {
			t.Fatalf("cached segment: %v, %+v", err, meta)
		}
		plain, err := seal.Open(nil, sealed, key, []byte(layout.SegmentName("m1", meta.first, meta.last)))
		if err != nil || !bytes.Equal(plain, data) {
			t.Fatalf("open: %v (equal %v)", err, bytes.Equal(plain, data))
		}
		return len(sealed) < len(data)
	}
	for range incompressibleRun {
		if compressed(random()) {
			t.Fatal("random data compressed")
		}
	}
	if m.skipCompress != incompressibleSkip {
		t.Fatalf("after %d incompressible segments skip = %d, want %d", incompressibleRun, m.skipCompress, incompressibleSkip)
	}
	zeros := make([]byte, 256<<10)
	for range incompressibleSkip {
		if compressed(zeros) {
			t.Fatal("compressed while the compressor should be skipped")
		}
	}
	if !compressed(zeros) {
		t.Error("compressor not back after the skipped segments")
	}
}
