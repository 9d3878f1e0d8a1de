package azure

import (
	"hash/crc64"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
)

// crc64Of, folded or not, equals hash/crc64 with Azure's polynomial for
// every length to 1100 bytes (around the folding threshold and its
// 64-byte steps), large ones, and at every start alignment.
func TestCRC64MatchesHashCRC64(t *testing.T) {
	tab := crc64.MakeTable(crc64Poly)
	data := blobstoretest.Random(7, 4<<20+13)
	lengths := []int{2047, 2048, 65536, 1<<20 + 5, len(data) - 64}
	for n := 0; n <= 1100; n++ {
		lengths = append(lengths, n)
	}
	for _, n := range lengths {
		for _, off := range []int{0, 1, 7, 13} {
			p := data[off : off+n]
			if got, want := crc64Of(p), crc64.Checksum(p, tab); got != want {
				t.Fatalf("%d bytes at offset %d: %#016x, want %#016x", n, off, got, want)
			}
		}
	}
	t.Logf("folding with carry-less multiplication: %v", haveCLMUL)
}

func BenchmarkCRC64(b *testing.B) {
	data := blobstoretest.Random(1, 4<<20)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		crc64Of(data)
	}
}

func FuzzCRC64(f *testing.F) {
	f.Add(blobstoretest.Random(3, 300))
	tab := crc64.MakeTable(crc64Poly)
	f.Fuzz(func(t *testing.T, p []byte) {
		if got, want := crc64Of(p), crc64.Checksum(p, tab); got != want {
			t.Fatalf("%d bytes: %#016x, want %#016x", len(p), got, want)
		}
	})
}
