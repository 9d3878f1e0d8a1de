package wire

import (
	"crypto/sha256"
	"fmt"
)

// Checksum resync. After an unclean stop the agent does not know which
// blocks the replica lacks. Instead of copying the disk it sends the SHA-256
// of consecutive chunks; the process server compares them with the replica
// as of everything it has received (it applies its backlog first) and
// answers which chunks differ; the agent then sends those as ordinary
// write records.

// MaxSums bounds the chunks of one Sums message.
const MaxSums = 4096

// MaxChunkSize bounds a Sums chunk: the process server reads one chunk of
// its replica into memory at a time (agents ask for 64 KiB).
const MaxChunkSize = 4 << 20

// Sums asks which of Count chunks of ChunkSize bytes, starting at Offset of
// Disk, differ from the replica. The last chunk may be shorter (end of disk).
//
// Payload: u16 id, string disk, u64 offset, u32 chunk size, u16 count,
// count × 32-byte SHA-256.
type Sums struct {
	ID        uint16 // echoed in the reply
	Disk      string
	Offset    uint64
	ChunkSize uint32
	Sums      [][sha256.Size]byte
}

// SumsReply answers a Sums: Differs[i] tells whether chunk i differs.
//
// Payload: u16 id, u16 count, ceil(count/8) bytes of bits (LSB first).
type SumsReply struct {
	ID      uint16
	Differs []bool
}

// AppendBinary appends s's payload encoding to b.
func (s *Sums) AppendBinary(b []byte) ([]byte, error) {
	if len(s.Sums) > MaxSums {
		return b, fmt.Errorf("sums: %d chunks, limit %d", len(s.Sums), MaxSums)
	}
	if s.ChunkSize == 0 || s.ChunkSize%512 != 0 || s.ChunkSize > MaxChunkSize {
		return b, fmt.Errorf("sums: chunk size %d is not a positive multiple of 512 up to %d", s.ChunkSize, MaxChunkSize)
	}
	b = le.AppendUint16(b, s.ID)
	b, err := appendName(b, "disk name", s.Disk)
	if err != nil {
		return b, err
	}
	b = le.AppendUint64(b, s.Offset)
	b = le.AppendUint32(b, s.ChunkSize)
	b = le.AppendUint16(b, uint16(len(s.Sums)))
	for i := range s.Sums {
		b = append(b, s.Sums[i][:]...)
	}
	return b, nil
}

// UnmarshalBinary decodes a Sums payload. The result does not alias data.
func (s *Sums) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	s.ID = d.u16()
	s.Disk = d.name("disk name")
	s.Offset = d.u64()
	cs := d.bytes(4)
	if cs != nil {
		s.ChunkSize = le.Uint32(cs)
		if s.ChunkSize == 0 || s.ChunkSize%512 != 0 || s.ChunkSize > MaxChunkSize {
			d.fail("chunk size %d is not a positive multiple of 512 up to %d", s.ChunkSize, MaxChunkSize)
		}
	}
	n := int(d.u16())
	d.checkCount("sum", n, MaxSums, sha256.Size)
	s.Sums = nil
	if d.err == nil && n > 0 {
		s.Sums = make([][sha256.Size]byte, n)
		for i := range s.Sums {
			copy(s.Sums[i][:], d.bytes(sha256.Size))
		}
	}
	return d.finish(TypeSums)
}

// AppendBinary appends r's payload encoding to b.
func (r *SumsReply) AppendBinary(b []byte) ([]byte, error) {
	if len(r.Differs) > MaxSums {
		return b, fmt.Errorf("sums-reply: %d chunks, limit %d", len(r.Differs), MaxSums)
	}
	b = le.AppendUint16(b, r.ID)
	b = le.AppendUint16(b, uint16(len(r.Differs)))
	bits := make([]byte, (len(r.Differs)+7)/8)
	for i, d := range r.Differs {
		if d {
			bits[i/8] |= 1 << (i % 8)
		}
	}
	return append(b, bits...), nil
}

// UnmarshalBinary decodes a SumsReply payload.
func (r *SumsReply) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	r.ID = d.u16()
	n := int(d.u16())
	if n > MaxSums {
		d.fail("%d chunks, limit %d", n, MaxSums)
	}
	bits := d.bytes((n + 7) / 8)
	r.Differs = nil
	if d.err == nil && n%8 != 0 && bits[n/8]>>(n%8) != 0 {
		d.fail("bits set past the %d chunks", n) // canonical: one encoding per reply
	}
	if d.err == nil {
		r.Differs = make([]bool, n)
		for i := range r.Differs {
			r.Differs[i] = bits[i/8]&(1<<(i%8)) != 0
		}
	}
	return d.finish(TypeSumsReply)
}

// WriteSums writes a Sums frame.
func (w *Writer) WriteSums(s *Sums) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeMessage(TypeSums, s.AppendBinary)
}

// WriteSumsReply writes a SumsReply frame.
func (w *Writer) WriteSumsReply(r *SumsReply) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeMessage(TypeSumsReply, r.AppendBinary)
}
