package azure

import (
	"encoding/binary"
	"hash/crc64"

	"github.com/lifeboat-dr/lifeboat/internal/gf2"
)

// Azure's transactional CRC64 (x-ms-content-crc64) uses this polynomial.
// hash/crc64 goes slicing-by-8 only for its own two tables and rebuilds
// the 16 KiB of slicing tables on every call for others, and azblob's
// TransferValidationTypeComputeCRC64 first copies the whole body with
// io.ReadAll: together they cost more than the checksum itself.
const crc64Poly = 0x9A6C9329AC4BC9B5

var crc64Tables = func() (t [8][256]uint64) {
	t[0] = *crc64.MakeTable(crc64Poly)
	for i := range 256 {
		crc := t[0][i]
		for j := 1; j < 8; j++ {
			crc = t[0][crc&0xff] ^ crc>>8
			t[j][i] = crc
		}
	}
	return t
}()

// crc64Of returns the CRC64 of p as Azure computes it. Where the CPU has
// carry-less multiplication, the bulk of p is folded 64 bytes at a time
// (about ten times the table's speed) and the table finishes.
func crc64Of(p []byte) uint64 {
	if haveCLMUL && len(p) >= foldMin {
		n := len(p) &^ 63
		var acc [16]byte
		fold(&p[0], n, ^uint64(0), &foldConsts, &acc)
		return ^rawUpdate(rawUpdate(0, acc[:]), p[n:])
	}
	return ^rawUpdate(^uint64(0), p)
}

// foldMin is the length from which folding pays.
const foldMin = 256

// rawUpdate runs the table over p from state crc, without the
// inversions the checksum adds at both ends.
func rawUpdate(crc uint64, p []byte) uint64 {
	t := &crc64Tables
	for len(p) >= 8 {
		crc ^= binary.LittleEndian.Uint64(p)
		crc = t[7][crc&0xff] ^ t[6][crc>>8&0xff] ^ t[5][crc>>16&0xff] ^ t[4][crc>>24&0xff] ^
			t[3][crc>>32&0xff] ^ t[2][crc>>40&0xff] ^ t[1][crc>>48&0xff] ^ t[0][crc>>56]
		p = p[8:]
	}
	for _, v := range p {
		crc = t[0][byte(crc)^v] ^ crc>>8
	}
	return crc
}

// foldConsts are, for folding distances of 64 and 16 bytes, the constants
// k_lo and k_hi such that a 16-byte block (a_lo, a_hi) followed by that
// many zero bytes has the CRC (from a zero state) of the 16-byte block
// a_lo·k_lo ⊕ a_hi·k_hi. They are solved for here from the table itself
// rather than derived by hand: with g(k) the CRC of k followed by 8 zero
// bytes, a linear map of k, k_lo solves g(k) = CRC(1, 0^8, 0^distance)
// and k_hi solves g(k) = CRC(0^8, 1, 0^distance). That the solution holds
// for every a follows from linearity (a shift of a by j bits is a shift
// of the product by j bits) and is checked by the tests against
// hash/crc64.
var foldConsts = func() (k [4]uint64) {
	g := func(v uint64) uint64 {
		var b [16]byte
		binary.LittleEndian.PutUint64(b[:], v)
		return rawUpdate(0, b[:])
	}
	target := func(hi bool, dist int) uint64 {
		b := make([]byte, 16+dist)
		if hi {
			b[8] = 1
		} else {
			b[0] = 1
		}
		return rawUpdate(0, b)
	}
	for i, dist := range []int{64, 16} {
		k[2*i] = gf2.Solve(g, target(false, dist), 64)
		k[2*i+1] = gf2.Solve(g, target(true, dist), 64)
	}
	return k
}()
