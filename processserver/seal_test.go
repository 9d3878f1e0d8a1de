package processserver

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// TestSealSegmentCompressesPerSegment: each segment is compressed when a
// sample of it compresses, from the first compressible segment after any
// run of incompressible ones, and every sealed segment opens to its
// plaintext under its name. Both ways of sealing: into a second buffer
// (sealSegment) and where the frames lie (sealInPlace).
func TestSealSegmentCompressesPerSegment(t *testing.T) {
	t.Run("copy", func(t *testing.T) { sealSegmentCompressesPerSegment(t, false) })
	t.Run("in place", func(t *testing.T) { sealSegmentCompressesPerSegment(t, true) })
}

func sealSegmentCompressesPerSegment(t *testing.T, inPlace bool) {
	material, id := seal.NewDataKey()
	key, err := seal.NewKey(id, material)
	if err != nil {
		t.Fatal(err)
	}
	m := &machine{name: "m1", key: key}
	c, err := cache.Open([]string{t.TempDir(), t.TempDir(), t.TempDir()}, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	random := func() []byte {
		b := make([]byte, 1<<20)
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
		var out []byte
		var err error
		if inPlace {
			b.buf = make([]byte, segPrefix, segPrefix+len(data)+seal.TagSize)
			b.data = append(b.buf[segPrefix:segPrefix], data...)
			data = bytes.Clone(data)
			var ok bool
			var sums *cache.Sums
			if out, sums, ok, err = m.sealInPlace(b, c); !ok {
				t.Fatal("a segment that fits its buffer was not sealed in place")
			}
			if err == nil && &out[0] != &b.buf[0] {
				t.Fatal("sealed elsewhere")
			}
			// The checksums gathered while sealing are those of out.
			id := cache.SegmentID{Stream: "m1", Seq: b.meta.first}
			if err == nil {
				if _, err := c.PutSummed(id, out, sums); err != nil {
					t.Fatal(err)
				}
				if n, err := c.Repair(id); n != 0 || err != nil {
					t.Fatalf("shards summed while sealing do not verify: %d rebuilt, %v", n, err)
				}
			}
		} else {
			out, err = m.sealSegment(nil, b)
		}
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
	zeros := make([]byte, 1<<20)
	for round := range 3 {
		for range 40 {
			if compressed(random()) {
				t.Fatalf("round %d: random data stored compressed", round)
			}
		}
		if !compressed(zeros) {
			t.Fatalf("round %d: compressible segment after 40 incompressible ones stored uncompressed", round)
		}
	}
}

// Frames that outgrew their segment buffer (a huge frame) are not sealed
// in place: the buffer no longer holds them, or lacks room for the tag.
func TestSealInPlaceRefusesOutgrownBuffer(t *testing.T) {
	material, id := seal.NewDataKey()
	key, err := seal.NewKey(id, material)
	if err != nil {
		t.Fatal(err)
	}
	m := &machine{name: "m1", key: key}
	b := &segBuf{buf: make([]byte, segPrefix, segPrefix+1000)}
	b.reset()
	b.meta = segMeta{first: 1, last: 1}
	b.data = append(b.data, make([]byte, 2000)...) // reallocated elsewhere
	if _, _, ok, err := m.sealInPlace(b, nil); ok || err != nil {
		t.Fatalf("outgrown buffer: ok %v, err %v; want a refusal", ok, err)
	}
	b.reset()
	b.data = append(b.data, make([]byte, 1000-seal.TagSize+1)...) // fits, but not the tag
	if _, _, ok, err := m.sealInPlace(b, nil); ok || err != nil {
		t.Fatalf("no room for the tag: ok %v, err %v; want a refusal", ok, err)
	}
}
