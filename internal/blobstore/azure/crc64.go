package azure

import (
	"encoding/binary"
	"hash/crc64"
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

// crc64Of returns the CRC64 of p as Azure computes it.
func crc64Of(p []byte) uint64 {
	t := &crc64Tables
	crc := ^uint64(0)
	for len(p) >= 8 {
		crc ^= binary.LittleEndian.Uint64(p)
		crc = t[7][crc&0xff] ^ t[6][crc>>8&0xff] ^ t[5][crc>>16&0xff] ^ t[4][crc>>24&0xff] ^
			t[3][crc>>32&0xff] ^ t[2][crc>>40&0xff] ^ t[1][crc>>48&0xff] ^ t[0][crc>>56]
		p = p[8:]
	}
	for _, v := range p {
		crc = t[0][byte(crc)^v] ^ crc>>8
	}
	return ^crc
}
