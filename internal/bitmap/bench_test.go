package bitmap

import (
	"math/rand/v2"
	"testing"
)

// 1 TiB device in 4 KiB blocks: 2^28 blocks, 32 MiB of bitmap.
const benchBlocks = 1 << 28

// sparse returns a bitmap with dirty runs of 1..256 blocks covering about
// 1% of the device, like a day of writes to a mostly idle volume.
func sparse(b *testing.B) *Bitmap {
	b.Helper()
	bm := New(benchBlocks)
	rng := rand.New(rand.NewPCG(1, 1))
	for range benchBlocks / 100 / 128 {
		n := 1 + rng.Uint64N(256)
		bm.SetRange(rng.Uint64N(benchBlocks-n), n)
	}
	return bm
}

func BenchmarkExtentsSparse1TiB(b *testing.B) {
	bm := sparse(b)
	b.SetBytes(benchBlocks / 8)
	b.ResetTimer()
	for b.Loop() {
		var n uint64
		for e := range bm.Extents(256) {
			n += e.Len
		}
		if n == 0 {
			b.Fatal("no extents")
		}
	}
}

func BenchmarkDrainAtomicSparse1TiB(b *testing.B) {
	src := sparse(b)
	dst := New(benchBlocks)
	words := make([]uint64, len(src.words))
	b.SetBytes(benchBlocks / 8)
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		copy(words, src.words)
		b.StartTimer()
		if _, err := dst.Drain(words); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMarkBytes64KiB(b *testing.B) {
	bm := New(benchBlocks)
	rng := rand.New(rand.NewPCG(2, 2))
	offs := make([]int64, 1024)
	for i := range offs {
		offs[i] = int64(rng.Uint64N(benchBlocks-16)) * 4096
	}
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		_ = bm.MarkBytes(offs[i%len(offs)], 65536)
	}
}
