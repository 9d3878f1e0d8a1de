// Package crc32c computes CRC-32C (Castagnoli) as hash/crc32 does, about
// twice as fast on large buffers where the CPU has VPCLMULQDQ on 512-bit
// registers (x86-64 with AVX-512): the bulk of a buffer is folded 256
// bytes a round in four 512-bit accumulators and hash/crc32 finishes.
// hash/crc32's SSE 4.2 code is bound by the CRC32 instruction, 8 bytes a
// cycle. Elsewhere, and for short buffers, it is hash/crc32.
package crc32c

import (
	"encoding/binary"
	"hash/crc32"

	"github.com/lifeboat-dr/lifeboat/internal/gf2"
)

var table = crc32.MakeTable(crc32.Castagnoli)

// Update returns the CRC-32C of the data whose CRC-32C is crc followed by
// p: crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), p).
func Update(crc uint32, p []byte) uint32 {
	if haveFold && len(p) >= foldMin {
		n := len(p) &^ 255
		var acc [16]byte
		fold(&p[0], n, ^crc, &foldConsts, &acc)
		return ^raw(rawBytes(0, &acc), p[n:])
	}
	return crc32.Update(crc, table, p)
}

// Checksum returns the CRC-32C of p.
func Checksum(p []byte) uint32 { return Update(0, p) }

// foldMin is the length from which folding pays (measured:
// BenchmarkUpdate).
const foldMin = 2048

// raw runs the CRC over p from state s, without the inversions the
// checksum adds at both ends.
func raw(s uint32, p []byte) uint32 { return ^crc32.Update(^s, table, p) }

// rawBytes is raw over the 16 bytes of acc, a byte at a time: passed to
// hash/crc32, which calls through a function value, acc would escape to
// the heap on every call.
func rawBytes(s uint32, acc *[16]byte) uint32 {
	for _, v := range acc {
		s = table[byte(s)^v] ^ s>>8
	}
	return s
}

// foldConsts are, for folding distances of 256, 64, 48, 32 and 16 bytes,
// the constants k_lo and k_hi such that a 16-byte block (a_lo, a_hi)
// followed by that many zero bytes has the CRC (from a zero state) of
// the 16-byte block a_lo·k_lo ⊕ a_hi·k_hi (carry-less products). As in
// internal/blobstore/azure's CRC64, they are solved for from the table
// rather than derived by hand: with g(k) the CRC of the 16-byte block
// holding k, a linear map of k, k_lo solves g(k) = CRC(1, 0^15, 0^dist)
// and k_hi solves g(k) = CRC(0^8, 1, 0^7, 0^dist). Both sides move alike
// when a moves by j bits (the product shifts by j), so the solution for
// a = 1 holds for every a; the tests check it against hash/crc32.
var foldConsts = func() (k [10]uint64) {
	g := func(v uint64) uint64 {
		var b [16]byte
		binary.LittleEndian.PutUint32(b[:], uint32(v))
		return uint64(raw(0, b[:]))
	}
	target := func(hi bool, dist int) uint32 {
		b := make([]byte, 16+dist)
		if hi {
			b[8] = 1
		} else {
			b[0] = 1
		}
		return raw(0, b)
	}
	for i, dist := range []int{256, 64, 48, 32, 16} {
		k[2*i] = gf2.Solve(g, uint64(target(false, dist)), 32)
		k[2*i+1] = gf2.Solve(g, uint64(target(true, dist)), 32)
	}
	return k
}()
