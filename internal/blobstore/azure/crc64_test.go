package azure

import (
	"hash/crc64"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
)

func TestCRC64MatchesHashCRC64(t *testing.T) {
	tab := crc64.MakeTable(crc64Poly)
	data := blobstoretest.Random(7, 1<<20+13)
	for _, n := range []int{0, 1, 7, 8, 9, 2047, 2048, 65536, len(data)} {
		if got, want := crc64Of(data[:n]), crc64.Checksum(data[:n], tab); got != want {
			t.Errorf("%d bytes: %#016x, want %#016x", n, got, want)
		}
	}
}

func BenchmarkCRC64(b *testing.B) {
	data := blobstoretest.Random(1, 4<<20)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		crc64Of(data)
	}
}
