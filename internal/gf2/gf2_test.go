package gf2

import (
	"math/bits"
	"testing"
)

// TestSolve inverts invertible maps of 32 and 64 bits and refuses a
// singular one.
func TestSolve(t *testing.T) {
	g64 := func(v uint64) uint64 { return v ^ bits.RotateLeft64(v, 7) ^ bits.RotateLeft64(v, 19) }
	g32 := func(v uint64) uint64 { v32 := uint32(v); return uint64(v32 ^ v32<<3) }
	for _, y := range []uint64{0, 1, 0xdeadbeef, 0x8000000000000001} {
		if x := Solve(g64, y, 64); g64(x) != y {
			t.Fatalf("64 bits: g(%#x) = %#x, want %#x", x, g64(x), y)
		}
		y32 := y & 0xffffffff
		if x := Solve(g32, y32, 32); g32(x) != y32 || x>>32 != 0 {
			t.Fatalf("32 bits: g(%#x) = %#x, want %#x", x, g32(x), y32)
		}
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a singular map was solved")
		}
	}()
	Solve(func(v uint64) uint64 { return v &^ 1 }, 1, 64)
}
