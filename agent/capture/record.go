package capture

import (
	"encoding/binary"
	"fmt"
	"unsafe"
)

// Op is the kind of change a record carries.
type Op uint8

const (
	OpWrite   Op = 1 // payload (data mode) or extent to read back
	OpZero    Op = 2 // write-zeroes
	OpDiscard Op = 3 // discard / secure erase; replicated as zeroes
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpZero:
		return "zero"
	case OpDiscard:
		return "discard"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Record flags.
const (
	FlagFUA      = 1
	FlagPreflush = 2
)

// HeaderSize is sizeof(struct lb_record).
const HeaderSize = int(unsafe.Sizeof(captureLbRecord{}))

// Record is one decoded ring record. Data aliases the buffer it was decoded
// from; it is nil for extent-only records.
type Record struct {
	Seq    uint64
	Offset int64 // bytes from the start of the device
	Len    uint32
	Dev    uint16
	Op     Op
	Flags  uint8
	Epoch  uint32 // the device's epoch at capture (Capture.BumpEpoch)
	Data   []byte
}

// Decode parses a ring record without allocating. It rejects records whose
// lengths disagree, so a corrupt record can never be applied at a wrong size.
func Decode(b []byte, r *Record) error {
	if len(b) < HeaderSize {
		return fmt.Errorf("record: %d bytes, shorter than the %d-byte header", len(b), HeaderSize)
	}
	le := binary.LittleEndian
	r.Seq = le.Uint64(b[0:])
	sector := le.Uint64(b[8:])
	r.Len = le.Uint32(b[16:])
	dataLen := le.Uint32(b[20:])
	r.Dev = le.Uint16(b[24:])
	r.Op = Op(b[26])
	r.Flags = b[27]
	r.Epoch = le.Uint32(b[28:])
	if sector >= 1<<54 { // offset must fit an int64
		return fmt.Errorf("record %d: sector %d out of range", r.Seq, sector)
	}
	r.Offset = int64(sector) << 9
	switch r.Op {
	case OpWrite, OpZero, OpDiscard:
	default:
		return fmt.Errorf("record %d: unknown op %d", r.Seq, r.Op)
	}
	if dataLen != 0 && (r.Op != OpWrite || dataLen != r.Len) {
		return fmt.Errorf("record %d: %s with %d payload bytes for a %d-byte extent", r.Seq, r.Op, dataLen, r.Len)
	}
	if uint64(len(b)-HeaderSize) < uint64(dataLen) {
		return fmt.Errorf("record %d: truncated payload (%d of %d bytes)", r.Seq, len(b)-HeaderSize, dataLen)
	}
	r.Data = nil
	if dataLen > 0 {
		r.Data = b[HeaderSize : HeaderSize+int(dataLen)]
	}
	return nil
}

// Encode appends the ring representation of r (used by tests and fuzzing).
func Encode(dst []byte, r *Record) []byte {
	var h [HeaderSize]byte
	le := binary.LittleEndian
	le.PutUint64(h[0:], r.Seq)
	le.PutUint64(h[8:], uint64(r.Offset>>9))
	le.PutUint32(h[16:], r.Len)
	le.PutUint32(h[20:], uint32(len(r.Data)))
	le.PutUint16(h[24:], r.Dev)
	h[26] = byte(r.Op)
	h[27] = r.Flags
	le.PutUint32(h[28:], r.Epoch)
	dst = append(dst, h[:]...)
	return append(dst, r.Data...)
}
