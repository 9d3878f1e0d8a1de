// Package wire is the framing of the agent → process server replication
// stream. A stream is a sequence of frames:
//
//	offset size  field
//	0      4     magic "LBF1" (uint32 0x3146424c)
//	4      1     frame version (Version)
//	5      1     type (Type)
//	6      2     flags (reserved; passed through unchanged)
//	8      4     payload length in bytes (at most MaxPayload)
//	12     4     CRC-32C of bytes 0..11 followed by the payload
//	16     …     payload
//
// All integers are little endian. The CRC covers the header too, so a
// corrupted type or length is caught, not misinterpreted. Payload layouts are
// documented on each message type.
//
// The hot path (Writer.WriteBatch, Reader.Next, DecodeBatch and the batch
// iterator) does not allocate in steady state, and record data handed to a
// BatchBuilder is not copied unless it is small (see Writer).
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/lifeboat-dr/lifeboat/internal/crc32c"
)

const (
	// Magic starts every frame; on the wire it reads "LBF1".
	Magic uint32 = 0x3146424c
	// Version is the frame format version written and accepted.
	Version uint8 = 1
	// HeaderSize is the size of a frame header.
	HeaderSize = 16
	// MaxPayload is the largest payload a frame may carry. Readers may be
	// configured with a lower limit.
	MaxPayload = 16 << 20
)

// Type identifies a frame's payload.
type Type uint8

// Frame types. The values are part of the protocol; never renumber them.
const (
	TypeHello        Type = 1 // agent → PS: Hello
	TypeHelloAck     Type = 2 // PS → agent: HelloAck
	TypeBatch        Type = 3 // agent → PS: batch of change records
	TypeMarker       Type = 4 // agent → PS: Marker
	TypeAck          Type = 5 // PS → agent: Ack
	TypeBackpressure Type = 6 // PS → agent: Backpressure
	TypeError        Type = 7 // either direction: Error, then close
	TypeSums         Type = 8 // agent → PS: Sums (checksum resync)
	TypeSumsReply    Type = 9 // PS → agent: SumsReply
	// TypeSegment is never sent: the process server starts every journal
	// segment with one (SegmentHeader), which chains it to the previous.
	TypeSegment Type = 10
	// TypeRecoverable: PS → agent: Recoverable (protocol 3).
	TypeRecoverable Type = 11
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeHelloAck:
		return "hello-ack"
	case TypeBatch:
		return "batch"
	case TypeMarker:
		return "marker"
	case TypeAck:
		return "ack"
	case TypeBackpressure:
		return "backpressure"
	case TypeError:
		return "error"
	case TypeSums:
		return "sums"
	case TypeSumsReply:
		return "sums-reply"
	case TypeSegment:
		return "segment"
	case TypeRecoverable:
		return "recoverable"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Frame is one decoded frame. Payload aliases the Reader's buffer: it is
// valid only until the next call to Reader.Next or Reader.Reset.
type Frame struct {
	Type    Type
	Flags   uint16
	Payload []byte

	// crc is the checksum the Reader verified (valid when verified), which
	// AppendTo reuses: a frame stored as received is not checksummed twice.
	crc      uint32
	verified bool
}

// AppendTo appends f as a complete frame to dst. A frame as the Reader
// returned it keeps its verified checksum; build a new Frame after
// changing the payload. f.Payload must not exceed MaxPayload. A payload
// that already lies in dst's spare capacity right after room for the
// header (read there by Reader.NextInto) is not copied: only the header
// is written.
func (f Frame) AppendTo(dst []byte) []byte {
	off := len(dst)
	n := off + HeaderSize + len(f.Payload)
	inPlace := len(f.Payload) > 0 && cap(dst) >= n && &dst[:n][off+HeaderSize] == &f.Payload[0]
	if inPlace {
		dst = dst[:n]
	} else {
		dst = append(dst, make([]byte, HeaderSize)...)
	}
	crc := putHeader(dst[off:], f.Type, f.Flags, len(f.Payload))
	if f.verified {
		crc = f.crc
	} else {
		crc = crc32c.Update(crc, f.Payload)
	}
	le.PutUint32(dst[off+12:], crc)
	if inPlace {
		return dst
	}
	return append(dst, f.Payload...)
}

// Errors reported by Reader and the decoders; they are wrapped with detail,
// so test with errors.Is.
var (
	ErrBadMagic  = errors.New("wire: bad magic: not a Lifeboat stream, or frame sync lost")
	ErrVersion   = errors.New("wire: unsupported frame version")
	ErrChecksum  = errors.New("wire: corrupt frame: crc mismatch")
	ErrTooLarge  = errors.New("wire: frame payload too large")
	ErrTruncated = errors.New("wire: truncated frame")
	ErrMalformed = errors.New("wire: malformed payload")
	// ErrBatchFull is returned by BatchBuilder.Add when the record would
	// push the batch past MaxPayload; write the batch and start a new one.
	ErrBatchFull = errors.New("wire: batch full")
)

var le = binary.LittleEndian

// putHeader fills h[:HeaderSize] except the CRC and returns the CRC of
// h[:12], ready to be extended over the payload.
func putHeader(h []byte, t Type, flags uint16, n int) uint32 {
	le.PutUint32(h[0:], Magic)
	h[4] = Version
	h[5] = byte(t)
	le.PutUint16(h[6:], flags)
	le.PutUint32(h[8:], uint32(n))
	return crc32c.Update(0, h[:12])
}

// AppendFrame appends a complete frame to dst. It copies payload; it is meant
// for tests, tools and spooling, not for the streaming hot path (use Writer).
func AppendFrame(dst []byte, t Type, flags uint16, payload []byte) ([]byte, error) {
	if len(payload) > MaxPayload {
		return dst, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(payload), MaxPayload)
	}
	off := len(dst)
	dst = append(dst, make([]byte, HeaderSize)...)
	crc := putHeader(dst[off:], t, flags, len(payload))
	le.PutUint32(dst[off+12:], crc32c.Update(crc, payload))
	return append(dst, payload...), nil
}
