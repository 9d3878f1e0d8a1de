package cache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/lifeboat-dr/lifeboat/internal/crc32c"
)

// Shard file layout (little endian):
//
//	 0  4  magic "LBCS"
//	 4  1  version (2; 1 is still read)
//	 5  1  shard index (== position of the directory in Open's list)
//	 6  1  data shards k
//	 7  1  parity shards m
//	 8  8  segment number
//	16  8  generation (unique per Put; tells apart shards of overwrites)
//	24  8  segment length
//	32  4  shard data length
//	36  4  CRC32C of the shard data
//	40  4  CRC32C of the whole segment (checked after reconstruction)
//	44  2  stream name length n
//	46  2  reserved, zero
//	48  n  stream name
//	48+n 4 CRC32C of bytes [0, 48+n)
//	...    version 2: zeroes up to dataOffset (the next 4 KiB boundary)
//	       shard data (version 1: right after the header)
//
// Version 2 puts the data on a 4 KiB boundary and makes its length a
// multiple of 4 KiB (alignedShardLen): Put then writes the data shards
// with O_DIRECT straight from the segment, without copying them.
const (
	shardMagic   = "LBCS"
	shardVersion = 2
	fixedHdrLen  = 48
)

// dataOffset is where the shard data starts in a file of the version.
func dataOffset(version byte, hdrLen int) int {
	if version == 1 {
		return hdrLen
	}
	return alignUp(hdrLen)
}

// alignedShardLen is the shard length Put uses for a segment of segLen
// bytes over k data shards: each data shard starts on a directAlign
// boundary of the segment.
func alignedShardLen(segLen uint64, k uint8) uint64 {
	return uint64(alignUp(int((segLen + uint64(k) - 1) / uint64(k))))
}

func crc(b []byte) uint32 { return crc32c.Checksum(b) }

// crcCombine returns the CRC32C of A||B from crc(A), crc(B) and len(B)
// (zlib's crc32_combine), so that Put derives the segment's checksum from
// its shards' instead of reading the segment once more: crc(A) times
// x^(8·len(B)) modulo the polynomial, plus crc(B).
func crcCombine(crcA, crcB uint32, lenB int) uint32 {
	if lenB <= 0 {
		return crcA
	}
	return multModP(x8nModP(uint64(lenB)), crcA) ^ crcB
}

// multModP multiplies a and b modulo the Castagnoli polynomial, in the
// reflected bit order of the CRC (x^0 is the top bit).
func multModP(a, b uint32) uint32 {
	var p uint32
	for m := uint32(1) << 31; m != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
			if a&(m-1) == 0 {
				break
			}
		}
		if b&1 != 0 {
			b = b>>1 ^ crc32.Castagnoli
		} else {
			b >>= 1
		}
	}
	return p
}

// x2n[k] is x^(2^k) modulo the polynomial, for every k x8nModP needs.
var x2n = func() (t [64 + 3]uint32) {
	p := uint32(1) << 30 // x^1
	for k := range t {
		t[k] = p
		p = multModP(p, p)
	}
	return t
}()

// x8nModP returns x^(8n) modulo the polynomial: n zero bytes' operator.
func x8nModP(n uint64) uint32 {
	p := uint32(1) << 31 // x^0
	for k := 3; n != 0; n, k = n>>1, k+1 {
		if n&1 != 0 {
			p = multModP(x2n[k], p)
		}
	}
	return p
}

type shardHeader struct {
	index, k, m uint8
	seq         uint64
	gen         uint64
	segLen      uint64
	shardLen    uint32
	shardCRC    uint32
	segCRC      uint32
	stream      string
}

func (h *shardHeader) size() int { return fixedHdrLen + len(h.stream) + 4 }

// appendTo encodes h after b.
func (h *shardHeader) appendTo(b []byte) []byte {
	start := len(b)
	b = append(b, shardMagic...)
	b = append(b, shardVersion, h.index, h.k, h.m)
	b = binary.LittleEndian.AppendUint64(b, h.seq)
	b = binary.LittleEndian.AppendUint64(b, h.gen)
	b = binary.LittleEndian.AppendUint64(b, h.segLen)
	b = binary.LittleEndian.AppendUint32(b, h.shardLen)
	b = binary.LittleEndian.AppendUint32(b, h.shardCRC)
	b = binary.LittleEndian.AppendUint32(b, h.segCRC)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(h.stream)))
	b = append(b, 0, 0)
	b = append(b, h.stream...)
	return binary.LittleEndian.AppendUint32(b, crc(b[start:]))
}

// errCorruptShard marks a shard file that must be treated as an erasure.
var errCorruptShard = errors.New("corrupt shard")

// parseShard validates a whole shard file read for (stream, seq) from the
// directory at slot, and returns its header and data. Every check failure
// wraps errCorruptShard: the caller treats the shard as missing.
func parseShard(file []byte, stream string, seq uint64, slot int, maxSeg uint64) (shardHeader, []byte, error) {
	h, hl, err := parseHeader(file, stream, seq, slot, maxSeg)
	if err != nil {
		return h, nil, err
	}
	off := dataOffset(file[4], hl)
	if len(file)-off != int(h.shardLen) {
		return h, nil, fmt.Errorf("%w: %d data bytes, header says %d", errCorruptShard, len(file)-off, h.shardLen)
	}
	// No byte of a shard goes unchecked: the padding must be zero.
	for _, b := range file[hl:off] {
		if b != 0 {
			return h, nil, fmt.Errorf("%w: padding after the header is not zero", errCorruptShard)
		}
	}
	data := file[off:]
	if got := crc(data); got != h.shardCRC {
		return h, nil, fmt.Errorf("%w: data checksum %08x, want %08x", errCorruptShard, got, h.shardCRC)
	}
	return h, data, nil
}

// parseHeader validates the header at the start of a shard file (all of
// it, or only its first bytes) and returns it and its length.
func parseHeader(file []byte, stream string, seq uint64, slot int, maxSeg uint64) (shardHeader, int, error) {
	var h shardHeader
	if len(file) < fixedHdrLen+4 {
		return h, 0, fmt.Errorf("%w: file of %d bytes is shorter than a header", errCorruptShard, len(file))
	}
	if string(file[:4]) != shardMagic {
		return h, 0, fmt.Errorf("%w: bad magic %q", errCorruptShard, file[:4])
	}
	if file[4] != 1 && file[4] != shardVersion {
		return h, 0, fmt.Errorf("%w: unsupported version %d", errCorruptShard, file[4])
	}
	n := int(binary.LittleEndian.Uint16(file[44:46]))
	hl := fixedHdrLen + n + 4
	if len(file) < hl {
		return h, 0, fmt.Errorf("%w: truncated header", errCorruptShard)
	}
	if got, want := crc(file[:hl-4]), binary.LittleEndian.Uint32(file[hl-4:hl]); got != want {
		return h, 0, fmt.Errorf("%w: header checksum %08x, want %08x", errCorruptShard, got, want)
	}
	h = shardHeader{
		index:    file[5],
		k:        file[6],
		m:        file[7],
		seq:      binary.LittleEndian.Uint64(file[8:16]),
		gen:      binary.LittleEndian.Uint64(file[16:24]),
		segLen:   binary.LittleEndian.Uint64(file[24:32]),
		shardLen: binary.LittleEndian.Uint32(file[32:36]),
		shardCRC: binary.LittleEndian.Uint32(file[36:40]),
		segCRC:   binary.LittleEndian.Uint32(file[40:44]),
		stream:   string(file[fixedHdrLen : fixedHdrLen+n]),
	}
	// The header checksum passed, so a mismatch below is a misplaced file
	// (copied by hand, or a bug), not bit rot. Either way it is not this
	// segment's shard for this slot.
	switch {
	case h.stream != stream || h.seq != seq:
		return h, 0, fmt.Errorf("%w: holds segment %s/%d", errCorruptShard, h.stream, h.seq)
	case int(h.index) != slot:
		return h, 0, fmt.Errorf("%w: holds shard %d, expected %d", errCorruptShard, h.index, slot)
	case h.k == 0 || int(h.index) >= int(h.k)+int(h.m):
		return h, 0, fmt.Errorf("%w: invalid geometry %d+%d for shard %d", errCorruptShard, h.k, h.m, h.index)
	case h.segLen == 0 || h.segLen > maxSeg:
		return h, 0, fmt.Errorf("%w: segment length %d out of range", errCorruptShard, h.segLen)
	case uint64(h.shardLen) != (h.segLen+uint64(h.k)-1)/uint64(h.k) &&
		(file[4] == 1 || uint64(h.shardLen) != alignedShardLen(h.segLen, h.k)):
		// Version 2 takes both: Repair keeps a version 1 segment's length.
		return h, 0, fmt.Errorf("%w: shard length %d does not fit segment length %d over %d shards", errCorruptShard, h.shardLen, h.segLen, h.k)
	}
	return h, hl, nil
}
