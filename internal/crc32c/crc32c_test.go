package crc32c

import (
	"hash/crc32"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// TestAccelerated checks, against the CPU flags Linux lists, that the
// folding path is on wherever the CPU has what it needs, so that the
// comparisons with hash/crc32 below test it, and off elsewhere.
func TestAccelerated(t *testing.T) {
	flags, err := testenv.CPUFlags()
	if err != nil {
		t.Skipf("no CPU flags to check against: %v", err)
	}
	want := runtime.GOARCH == "amd64" && !purego
	for _, f := range []string{"pclmulqdq", "avx512f", "avx512vl", "vpclmulqdq"} {
		want = want && slices.Contains(flags, f)
	}
	t.Logf("folding: %v", haveFold)
	if haveFold != want {
		t.Fatalf("folding %v, want %v from the CPU flags %v", haveFold, want, flags)
	}
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestMatchesHashCRC32: every length to 2100 bytes (around the folding
// threshold and its 256-byte steps) and large ones, from random states
// and at every start alignment, equal hash/crc32's Castagnoli.
func TestMatchesHashCRC32(t *testing.T) {
	if !haveFold {
		t.Log("no VPCLMULQDQ on 512-bit registers here: hash/crc32 is used")
	}
	r := rand.New(rand.NewPCG(1, 2))
	buf := randBytes(r, 1<<20+64)
	check := func(p []byte) {
		t.Helper()
		init := r.Uint32()
		if got, want := Update(init, p), crc32.Update(init, table, p); got != want {
			t.Fatalf("len %d init %#x: %#08x, want %#08x", len(p), init, got, want)
		}
	}
	for n := 0; n <= 2100; n++ {
		check(buf[:n])
	}
	for off := range 64 {
		check(buf[off : off+4096+off])
	}
	for _, n := range []int{1 << 16, 1<<16 + 15, 1 << 20, 1<<20 + 63} {
		check(buf[:n])
	}
	if got, want := Checksum(buf), crc32.Checksum(buf, table); got != want {
		t.Fatalf("Checksum: %#08x, want %#08x", got, want)
	}
}

// TestChained: a buffer checksummed in pieces of any sizes gives the
// checksum of the whole.
func TestChained(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	buf := randBytes(r, 300000)
	want := crc32.Checksum(buf, table)
	for range 50 {
		var crc uint32
		for p := buf; len(p) > 0; {
			n := min(len(p), r.IntN(70000))
			crc = Update(crc, p[:n])
			p = p[n:]
		}
		if crc != want {
			t.Fatalf("chained %#08x, want %#08x", crc, want)
		}
	}
}

func FuzzUpdate(f *testing.F) {
	f.Add(uint32(0), make([]byte, 1024))
	f.Add(uint32(0xdeadbeef), make([]byte, 5000))
	f.Fuzz(func(t *testing.T, init uint32, p []byte) {
		if got, want := Update(init, p), crc32.Update(init, table, p); got != want {
			t.Fatalf("len %d: %#08x, want %#08x", len(p), got, want)
		}
	})
}

func BenchmarkUpdate(b *testing.B) {
	for _, n := range []int{1024, 2048, 4096, 64 << 10} {
		p := make([]byte, n)
		b.Run("crc32c/"+itoa(n), func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				Update(0, p)
			}
		})
		b.Run("hash-crc32/"+itoa(n), func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				crc32.Update(0, table, p)
			}
		})
	}
}

func itoa(n int) string {
	if n >= 1024 {
		return string(rune('0'+n/1024/10%10)) + string(rune('0'+n/1024%10)) + "KiB"
	}
	return "<1KiB"
}

// TestFoldShort calls fold itself on the short lengths Update leaves to
// hash/crc32: one round (no loop), two, three and seven.
func TestFoldShort(t *testing.T) {
	if !haveFold {
		t.Skip("no VPCLMULQDQ on 512-bit registers here")
	}
	r := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{256, 512, 768, 1792} {
		p := randBytes(r, n+100)
		init := r.Uint32()
		var acc [16]byte
		fold(&p[0], n, ^init, &foldConsts, &acc)
		got := ^raw(rawBytes(0, &acc), p[n:])
		if want := crc32.Update(init, table, p); got != want {
			t.Fatalf("n %d: %#08x, want %#08x", n, got, want)
		}
	}
}
