package bitmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// On-disk format, all integers little-endian:
//
//	offset size
//	0      4    magic "LBBM"
//	4      2    version (1)
//	6      2    flags (0)
//	8      4    block size in bytes
//	12     4    reserved (0)
//	16     8    number of blocks
//	24     8*W  words, W = ceil(blocks/64)
//	24+8W  4    CRC-32C of all preceding bytes
const (
	magic         = "LBBM"
	formatVersion = 1
	headerSize    = 24
	trailerSize   = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt reports persisted bitmap data that fails validation.
var ErrCorrupt = errors.New("bitmap: corrupt data")

// MarshalBinary encodes the bitmap with a header and a CRC-32C trailer.
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	buf := make([]byte, headerSize+8*len(b.words)+trailerSize)
	copy(buf, magic)
	binary.LittleEndian.PutUint16(buf[4:], formatVersion)
	binary.LittleEndian.PutUint32(buf[8:], b.blockSize)
	binary.LittleEndian.PutUint64(buf[16:], b.blocks)
	p := buf[headerSize:]
	for i, w := range b.words {
		binary.LittleEndian.PutUint64(p[8*i:], w)
	}
	end := len(buf) - trailerSize
	putCRC(buf[end:], buf[:end])
	return buf, nil
}

// UnmarshalBinary replaces b with the bitmap encoded in data by
// MarshalBinary. Errors wrap ErrCorrupt, except for an unsupported
// version; on error b is unchanged.
func (b *Bitmap) UnmarshalBinary(data []byte) error {
	if len(data) < headerSize+trailerSize {
		return fmt.Errorf("%w: %d bytes is shorter than the header", ErrCorrupt, len(data))
	}
	if string(data[:4]) != magic {
		return fmt.Errorf("%w: bad magic %q", ErrCorrupt, data[:4])
	}
	end := len(data) - trailerSize
	if got, want := crc32.Checksum(data[:end], castagnoli), binary.LittleEndian.Uint32(data[end:]); got != want {
		return fmt.Errorf("%w: checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	// Version is checked after the CRC so a flipped bit reads as
	// corruption rather than as a file from the future.
	if v := binary.LittleEndian.Uint16(data[4:]); v != formatVersion {
		return fmt.Errorf("bitmap: unsupported format version %d (want %d)", v, formatVersion)
	}
	bs := binary.LittleEndian.Uint32(data[8:])
	if err := checkBlockSize(bs); err != nil {
		return fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	blocks := binary.LittleEndian.Uint64(data[16:])
	nw := uint64(end-headerSize) / 8
	if (end-headerSize)%8 != 0 || blocks > nw*64 || (blocks+63)/64 != nw {
		return fmt.Errorf("%w: %d blocks do not match %d bytes of words", ErrCorrupt, blocks, end-headerSize)
	}
	words := make([]uint64, nw)
	for i := range words {
		words[i] = binary.LittleEndian.Uint64(data[headerSize+8*i:])
	}
	if r := blocks % 64; r != 0 && words[nw-1]>>r != 0 {
		return fmt.Errorf("%w: bits set beyond block %d", ErrCorrupt, blocks)
	}
	*b = Bitmap{words: words, blocks: blocks, blockSize: bs}
	return nil
}

func putCRC(dst, data []byte) {
	binary.LittleEndian.PutUint32(dst, crc32.Checksum(data, castagnoli))
}
