// Package gf2 solves linear systems over GF(2): the CRC folding code
// (internal/crc32c, the CRC64 of internal/blobstore/azure) finds its
// constants with it from the CRC tables instead of deriving them by hand.
package gf2

// Solve returns x with g(x) = y, for g a linear, invertible map on
// vectors of the given number of bits (at most 64), by Gaussian
// elimination. It panics if g is singular.
func Solve(g func(uint64) uint64, y uint64, bits int) uint64 {
	// Rows of the augmented system: for each output bit r, the input bits
	// that reach it (a mask) and y's bit r.
	var rows, rhs [64]uint64
	for c := range bits {
		col := g(1 << c)
		for r := range bits {
			rows[r] |= (col >> r & 1) << c
		}
	}
	for r := range bits {
		rhs[r] = y >> r & 1
	}
	for c := range bits {
		p := -1
		for r := c; r < bits; r++ {
			if rows[r]>>c&1 == 1 {
				p = r
				break
			}
		}
		if p < 0 {
			panic("gf2: singular map")
		}
		rows[c], rows[p] = rows[p], rows[c]
		rhs[c], rhs[p] = rhs[p], rhs[c]
		for r := range bits {
			if r != c && rows[r]>>c&1 == 1 {
				rows[r] ^= rows[c]
				rhs[r] ^= rhs[c]
			}
		}
	}
	var x uint64
	for c := range bits {
		x |= rhs[c] << c
	}
	return x
}
