package wire

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Limits on control messages, enforced by both encoders and decoders.
const (
	MaxNameLen         = 255  // machine and disk names, bytes
	MaxDisks           = 1024 // disks per Hello/HelloAck
	MaxErrorMessageLen = 4096 // bytes; longer messages are truncated when encoded
)

// Generation identifies one continuous change-tracking history of a disk.
// The agent picks a new random Generation whenever it cannot prove that no
// write went untracked (first start, unclean shutdown, lost bitmap); a
// process server holding a different generation cannot simply resume.
type Generation [16]byte

// IsZero reports whether g is the zero ("none") generation.
func (g Generation) IsZero() bool { return g == Generation{} }

func (g Generation) String() string { return hex.EncodeToString(g[:]) }

// DiskState is an agent's view of one protected disk.
type DiskState struct {
	Name         string // stable disk name, e.g. "sda" or a volume id
	Size         uint64 // bytes
	Generation   Generation
	LastAckedSeq uint64 // highest sequence the PS acknowledged; 0 if none
}

// Hello opens a session, agent → process server.
//
// Payload: u16 protocol version, string machine, u16 disk count, then per
// disk: string name, u64 size, [16]byte generation, u64 last acked seq;
// then [16]byte run. A string is a u16 byte length followed by that many
// bytes of UTF-8.
type Hello struct {
	ProtocolVersion uint16 // message-level protocol the agent speaks
	Machine         string
	Disks           []DiskState
	// Run is random per agent process: the process server says which run
	// made its newest records durable (HelloAck.LastRun), so that an agent
	// sees records of another agent under its name for what they are.
	Run RunID
}

// RunID identifies one run of an agent.
type RunID [16]byte

// SyncAction is the process server's decision for one disk.
type SyncAction uint8

const (
	// SyncResume: generations agree; send records from ResumeFrom on.
	SyncResume SyncAction = 1
	// SyncFull: the PS has no usable replica; send the whole disk.
	SyncFull SyncAction = 2
	// SyncChecksum: a replica exists but its generation differs; compare
	// block checksums and send only the blocks that differ.
	SyncChecksum SyncAction = 3
)

func (a SyncAction) String() string {
	switch a {
	case SyncResume:
		return "resume"
	case SyncFull:
		return "full-sync"
	case SyncChecksum:
		return "checksum-resync"
	}
	return fmt.Sprintf("sync-action(%d)", uint8(a))
}

// DiskAgreement is the process server's answer for one disk of a Hello.
type DiskAgreement struct {
	Name       string
	Action     SyncAction
	Generation Generation // the generation the PS has on record (zero if none)
	ResumeFrom uint64     // SyncResume: first sequence the agent must send
}

// HelloAck answers a Hello, process server → agent.
//
// An agent told to resync a disk (full or checksum) sends no time Marker
// from then until the resync has ended and every disk is whole again: the
// process server takes its first time marker after such an answer as the
// end of a journal gap (layout.Gap).
//
// Payload: u16 protocol version, u16 disk count, then per disk: string
// name, u8 action, [16]byte generation, u64 resume-from seq; then [16]byte
// last run.
type HelloAck struct {
	ProtocolVersion uint16 // protocol the session will use
	Disks           []DiskAgreement
	// LastRun is the Hello.Run of the session that made the newest
	// durable records durable; zero when unknown (since a restart).
	LastRun RunID
}

// MarkerKind says what a Marker guarantees about the replica at that point.
type MarkerKind uint8

const (
	MarkerTime            MarkerKind = 1 // a point in time, for recovery-point reporting
	MarkerCrashConsistent MarkerKind = 2 // all disks are mutually crash consistent here
	MarkerAppConsistent   MarkerKind = 3 // applications were quiesced (e.g. fsfreeze)
	// MarkerWithdrawn is a consistency marker record the agent took back
	// before it was acknowledged: numbered before the agent learned that
	// a disk is to be copied again (a full sync or a checksum resync
	// agreed at a reconnect), it would date a replica being rebuilt. It
	// keeps its sequence number and dates nothing: no point, no time.
	// Records only (protocol 4), never a Marker message.
	MarkerWithdrawn MarkerKind = 4
)

func (k MarkerKind) valid() bool { return k >= MarkerTime && k <= MarkerAppConsistent }

func (k MarkerKind) String() string {
	switch k {
	case MarkerTime:
		return "time"
	case MarkerCrashConsistent:
		return "crash-consistent"
	case MarkerAppConsistent:
		return "app-consistent"
	case MarkerWithdrawn:
		return "withdrawn"
	}
	return fmt.Sprintf("marker-kind(%d)", uint8(k))
}

// Marker marks a point in the change stream: it applies after every record
// with a sequence lower than or equal to Seq.
//
// Payload: u64 seq, i64 unix nanoseconds, u8 kind.
type Marker struct {
	Seq      uint64
	UnixNano int64
	Kind     MarkerKind
}

// Recoverable tells the agent the machine's recoverable_until: the time
// before which every write is in the storage account (its manifest
// there says so), from which the agent reports its RPO. The process
// server sends it after its HelloAck and whenever it moves. Payload: i64
// unix nanoseconds (0: nothing recoverable yet).
type Recoverable struct{ UnixNano int64 }

// AppendBinary appends r's payload encoding to b.
func (r Recoverable) AppendBinary(b []byte) ([]byte, error) {
	return le.AppendUint64(b, uint64(r.UnixNano)), nil
}

// UnmarshalBinary decodes a Recoverable payload.
func (r *Recoverable) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	r.UnixNano = int64(d.u64())
	if d.err == nil && r.UnixNano < 0 {
		d.fail("negative time %d", r.UnixNano)
	}
	return d.finish(TypeRecoverable)
}

// Ack tells the agent that every record with a sequence up to and including
// Seq is durable at the process server. Payload: u64 seq.
type Ack struct{ Seq uint64 }

// Backpressure sets how many bytes of batch payload the agent may have sent
// but not yet had acknowledged. Window 0 means stop sending batches until a
// later Backpressure opens the window. Payload: u64 window.
type Backpressure struct{ Window uint64 }

// ErrorCode classifies an Error.
type ErrorCode uint16

const (
	CodeProtocol     ErrorCode = 1 // malformed or unexpected frame
	CodeVersion      ErrorCode = 2 // no common protocol version
	CodeUnknownAgent ErrorCode = 3 // machine or disk not registered
	CodeInternal     ErrorCode = 4 // failure on the sender's side; retry later
	CodeShuttingDown ErrorCode = 5 // sender is shutting down; reconnect later
)

func (c ErrorCode) String() string {
	switch c {
	case CodeProtocol:
		return "protocol error"
	case CodeVersion:
		return "version mismatch"
	case CodeUnknownAgent:
		return "unknown agent"
	case CodeInternal:
		return "internal error"
	case CodeShuttingDown:
		return "shutting down"
	}
	return fmt.Sprintf("error code %d", uint16(c))
}

// Error is sent before closing a stream because of a failure. It is also a Go
// error, so a decoded Error can be returned as is.
//
// Payload: u16 code, string message.
type Error struct {
	Code    ErrorCode
	Message string
}

func (e Error) Error() string { return fmt.Sprintf("peer reported %s: %s", e.Code, e.Message) }

// AppendBinary appends h's payload encoding to b.
func (h *Hello) AppendBinary(b []byte) ([]byte, error) {
	if len(h.Disks) > MaxDisks {
		return b, fmt.Errorf("hello lists %d disks, limit %d", len(h.Disks), MaxDisks)
	}
	b = le.AppendUint16(b, h.ProtocolVersion)
	b, err := appendName(b, "machine name", h.Machine)
	if err != nil {
		return b, err
	}
	b = le.AppendUint16(b, uint16(len(h.Disks)))
	for i := range h.Disks {
		d := &h.Disks[i]
		if b, err = appendName(b, "disk name", d.Name); err != nil {
			return b, err
		}
		b = le.AppendUint64(b, d.Size)
		b = append(b, d.Generation[:]...)
		b = le.AppendUint64(b, d.LastAckedSeq)
	}
	return append(b, h.Run[:]...), nil
}

// UnmarshalBinary decodes a Hello payload. The result does not alias data.
func (h *Hello) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	h.ProtocolVersion = d.u16()
	h.Machine = d.name("machine name")
	n := int(d.u16())
	const minDisk = 2 + 1 + 8 + 16 + 8
	d.checkCount("disk", n, MaxDisks, minDisk)
	h.Disks = nil
	if d.err == nil && n > 0 {
		h.Disks = make([]DiskState, n)
		for i := range h.Disks {
			ds := &h.Disks[i]
			ds.Name = d.name("disk name")
			ds.Size = d.u64()
			ds.Generation = d.generation()
			ds.LastAckedSeq = d.u64()
		}
	}
	h.Run = RunID(d.generation())
	return d.finish(TypeHello)
}

// AppendBinary appends a's payload encoding to b.
func (a *HelloAck) AppendBinary(b []byte) ([]byte, error) {
	if len(a.Disks) > MaxDisks {
		return b, fmt.Errorf("hello-ack lists %d disks, limit %d", len(a.Disks), MaxDisks)
	}
	b = le.AppendUint16(b, a.ProtocolVersion)
	b = le.AppendUint16(b, uint16(len(a.Disks)))
	var err error
	for i := range a.Disks {
		d := &a.Disks[i]
		if b, err = appendName(b, "disk name", d.Name); err != nil {
			return b, err
		}
		if d.Action < SyncResume || d.Action > SyncChecksum {
			return b, fmt.Errorf("disk %q: invalid sync action %d", d.Name, d.Action)
		}
		b = append(b, byte(d.Action))
		b = append(b, d.Generation[:]...)
		b = le.AppendUint64(b, d.ResumeFrom)
	}
	return append(b, a.LastRun[:]...), nil
}

// UnmarshalBinary decodes a HelloAck payload. The result does not alias data.
func (a *HelloAck) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	a.ProtocolVersion = d.u16()
	n := int(d.u16())
	const minDisk = 2 + 1 + 1 + 16 + 8
	d.checkCount("disk", n, MaxDisks, minDisk)
	a.Disks = nil
	if d.err == nil && n > 0 {
		a.Disks = make([]DiskAgreement, n)
		for i := range a.Disks {
			da := &a.Disks[i]
			da.Name = d.name("disk name")
			da.Action = SyncAction(d.u8())
			if d.err == nil && (da.Action < SyncResume || da.Action > SyncChecksum) {
				d.fail("disk %q: invalid sync action %d", da.Name, da.Action)
			}
			da.Generation = d.generation()
			da.ResumeFrom = d.u64()
		}
	}
	a.LastRun = RunID(d.generation())
	return d.finish(TypeHelloAck)
}

// AppendBinary appends m's payload encoding to b.
func (m Marker) AppendBinary(b []byte) ([]byte, error) {
	b = le.AppendUint64(b, m.Seq)
	b = le.AppendUint64(b, uint64(m.UnixNano))
	return append(b, byte(m.Kind)), nil
}

// UnmarshalBinary decodes a Marker payload.
func (m *Marker) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	m.Seq = d.u64()
	m.UnixNano = int64(d.u64())
	m.Kind = MarkerKind(d.u8())
	if d.err == nil && !m.Kind.valid() {
		d.fail("unknown marker kind %d", m.Kind)
	}
	return d.finish(TypeMarker)
}

// AppendBinary appends a's payload encoding to b.
func (a Ack) AppendBinary(b []byte) ([]byte, error) { return le.AppendUint64(b, a.Seq), nil }

// UnmarshalBinary decodes an Ack payload.
func (a *Ack) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	a.Seq = d.u64()
	return d.finish(TypeAck)
}

// AppendBinary appends p's payload encoding to b.
func (p Backpressure) AppendBinary(b []byte) ([]byte, error) {
	return le.AppendUint64(b, p.Window), nil
}

// UnmarshalBinary decodes a Backpressure payload.
func (p *Backpressure) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	p.Window = d.u64()
	return d.finish(TypeBackpressure)
}

// AppendBinary appends e's payload encoding to b. Invalid UTF-8 in the
// message is replaced and a message longer than MaxErrorMessageLen is
// truncated, because failing to report an error helps nobody.
func (e Error) AppendBinary(b []byte) ([]byte, error) {
	msg := strings.ToValidUTF8(e.Message, "\uFFFD")
	if len(msg) > MaxErrorMessageLen {
		cut := MaxErrorMessageLen
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut]
	}
	b = le.AppendUint16(b, uint16(e.Code))
	b = le.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...), nil
}

// UnmarshalBinary decodes an Error payload.
func (e *Error) UnmarshalBinary(data []byte) error {
	d := decoder{b: data}
	e.Code = ErrorCode(d.u16())
	n := int(d.u16())
	if d.err == nil && n > MaxErrorMessageLen {
		d.fail("error message of %d bytes, limit %d", n, MaxErrorMessageLen)
	}
	msg := d.bytes(n)
	if d.err == nil && !utf8.Valid(msg) {
		d.fail("error message is not valid UTF-8")
	}
	e.Message = string(msg)
	return d.finish(TypeError)
}

func appendName(b []byte, what, s string) ([]byte, error) {
	if err := checkName(what, s); err != nil {
		return b, err
	}
	b = le.AppendUint16(b, uint16(len(s)))
	return append(b, s...), nil
}

func checkName(what, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("empty %s", what)
	case len(s) > MaxNameLen:
		return fmt.Errorf("%s of %d bytes, limit %d", what, len(s), MaxNameLen)
	case !utf8.ValidString(s):
		return fmt.Errorf("%s %q is not valid UTF-8", what, s)
	}
	return nil
}

// decoder reads little-endian fields from a payload. After the first
// failure every read returns zero, so decoding code needs no error checks
// between fields; finish reports the first failure.
type decoder struct {
	b   []byte
	off int
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf(format, args...)
	}
}

func (d *decoder) bytes(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n > len(d.b)-d.off {
		d.fail("truncated: need %d bytes at offset %d, have %d", n, d.off, len(d.b)-d.off)
		return nil
	}
	p := d.b[d.off : d.off+n]
	d.off += n
	return p
}

func (d *decoder) u8() uint8 {
	if p := d.bytes(1); p != nil {
		return p[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if p := d.bytes(2); p != nil {
		return le.Uint16(p)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if p := d.bytes(8); p != nil {
		return le.Uint64(p)
	}
	return 0
}

func (d *decoder) generation() (g Generation) {
	copy(g[:], d.bytes(len(g)))
	return g
}

func (d *decoder) name(what string) string {
	n := int(d.u16())
	p := d.bytes(n)
	if d.err != nil {
		return ""
	}
	s := string(p)
	if err := checkName(what, s); err != nil {
		d.err = err
		return ""
	}
	return s
}

// checkCount rejects an element count that exceeds limit or that the rest
// of the payload cannot possibly hold, before anything is allocated for it.
func (d *decoder) checkCount(what string, n, limit, minSize int) {
	if d.err != nil {
		return
	}
	if n > limit {
		d.fail("%d %ss, limit %d", n, what, limit)
	} else if n*minSize > len(d.b)-d.off {
		d.fail("%d %ss cannot fit in %d remaining bytes", n, what, len(d.b)-d.off)
	}
}

func (d *decoder) finish(t Type) error {
	if d.err == nil && d.off != len(d.b) {
		d.fail("%d trailing bytes", len(d.b)-d.off)
	}
	if d.err != nil {
		return fmt.Errorf("%w: %s: %v", ErrMalformed, t, d.err)
	}
	return nil
}

// SegmentHeader opens a journal segment. Prev is the last sequence of the
// machine's previous segment (0 for its first), so that a reader of the
// journal sees a missing segment instead of replaying across it; being
// inside the sealed segment, it is authenticated with it.
//
// Payload: u64 prev.
type SegmentHeader struct{ Prev uint64 }

// SegmentHeaderSize is the encoded size of a SegmentHeader frame.
const SegmentHeaderSize = HeaderSize + 8

// AppendSegmentHeader appends h as a TypeSegment frame to dst.
func AppendSegmentHeader(dst []byte, h SegmentHeader) []byte {
	var p [8]byte
	le.PutUint64(p[:], h.Prev)
	dst, _ = AppendFrame(dst, TypeSegment, 0, p[:]) // 8 bytes: never too long
	return dst
}

// ParseSegmentHeader returns the header of the segment plaintext plain:
// its first frame, which must be a TypeSegment one.
func ParseSegmentHeader(plain []byte) (SegmentHeader, error) {
	var h SegmentHeader
	f, err := NewReader(bytes.NewReader(plain), 0).Next()
	if err != nil {
		return h, fmt.Errorf("segment header: %w", err)
	}
	if f.Type != TypeSegment {
		return h, fmt.Errorf("segment header: first frame is %s", f.Type)
	}
	return h, h.UnmarshalBinary(f.Payload)
}

// UnmarshalBinary decodes a SegmentHeader payload.
func (h *SegmentHeader) UnmarshalBinary(p []byte) error {
	if len(p) != 8 {
		return fmt.Errorf("segment header: payload of %d bytes, want 8", len(p))
	}
	h.Prev = le.Uint64(p)
	return nil
}
