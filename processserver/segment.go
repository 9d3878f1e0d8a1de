package processserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"strconv"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// maxFrame is the largest frame an agent may send.
const maxFrame = wire.HeaderSize + wire.MaxPayload

// markerFrameSize is the encoded size of a Marker frame.
const markerFrameSize = wire.HeaderSize + 17

// segMeta summarises a segment's content.
type segMeta struct {
	first, last         uint64 // record sequence range; first == 0: no record
	firstTime, lastTime int64  // unix nanos of the first and last marker, 0 if none
	// markSeq is the sequence of the marker dated lastTime (0: unknown, a
	// segment cached by a version before it was kept).
	markSeq uint64
	// prev is where the journal segment before it ends (its chain link;
	// 0: unknown, a version 1 or 2 header).
	prev       uint64
	crash, app bool
	// run is the agent run that sent the segment: after a restart the
	// newest cached segment tells the agents which run made it durable
	// (HelloAck.LastRun), which is how a clone learns the records are
	// not its own. Zero: unknown (a version 1 header).
	run wire.RunID
}

func (m *segMeta) marker(k wire.MarkerKind, nanos int64, seq uint64) {
	if m.firstTime == 0 {
		m.firstTime = nanos
	}
	if nanos >= m.lastTime {
		m.lastTime, m.markSeq = nanos, seq
	}
	switch k {
	case wire.MarkerCrashConsistent:
		m.crash = true
	case wire.MarkerAppConsistent:
		m.app = true
	}
}

// metadata is the blob metadata of a journal segment (see the contract).
func (m *segMeta) metadata() blobstore.Metadata {
	md := blobstore.Metadata{
		layout.MetaFirstSeq:  strconv.FormatUint(m.first, 10),
		layout.MetaLastSeq:   strconv.FormatUint(m.last, 10),
		layout.MetaFirstTime: strconv.FormatInt(m.firstTime, 10),
		layout.MetaLastTime:  strconv.FormatInt(m.lastTime, 10),
	}
	var kinds []string
	if m.crash {
		kinds = append(kinds, "crash")
	}
	if m.app {
		kinds = append(kinds, "app")
	}
	if len(kinds) > 0 {
		md[layout.MetaMarkers] = strings.Join(kinds, ",")
	}
	return md
}

// A cached segment is the sealed journal segment, exactly the bytes to
// upload, behind a clear header holding what the uploader needs without
// the key. The cache thus never holds plaintext, and uploading is a copy.
// The header is covered by the shards' CRCs; its sequence range is also
// bound into the sealed blob (the blob name is the AAD), so a header that
// lies yields a journal segment that recovery refuses.
const (
	cachedMagic      = "LBCS"
	cachedVersion    = 3
	cachedHeaderSize = 72 // magic, version, flags, 2 pad, first, last, first time, last time, run, mark seq, prev
	// cachedHeaderSizeV1 and V2 are the headers of versions 1 (no run)
	// and 2 (no mark seq), still read.
	cachedHeaderSizeV1 = 40
	cachedHeaderSizeV2 = 56
)

// appendCachedHeader appends m's cached-segment header to dst.
func appendCachedHeader(dst []byte, m segMeta) []byte {
	var flags byte
	if m.crash {
		flags |= 1
	}
	if m.app {
		flags |= 2
	}
	dst = append(dst, cachedMagic...)
	dst = append(dst, cachedVersion, flags, 0, 0)
	dst = binary.LittleEndian.AppendUint64(dst, m.first)
	dst = binary.LittleEndian.AppendUint64(dst, m.last)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(m.firstTime))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(m.lastTime))
	dst = append(dst, m.run[:]...)
	dst = binary.LittleEndian.AppendUint64(dst, m.markSeq)
	return binary.LittleEndian.AppendUint64(dst, m.prev)
}

// parseCached splits a cached segment into its summary and sealed blob.
func parseCached(b []byte) (segMeta, []byte, error) {
	var m segMeta
	if len(b) < cachedHeaderSizeV1 || string(b[:4]) != cachedMagic {
		return m, nil, errors.New("not a sealed cached segment (bad magic)")
	}
	size := cachedHeaderSize
	switch v := b[4]; {
	case v == 1:
		size = cachedHeaderSizeV1
	case v == 2:
		size = cachedHeaderSizeV2
	case v != cachedVersion:
		return m, nil, fmt.Errorf("cached segment version %d, want 1 to %d", v, cachedVersion)
	}
	if len(b) < size {
		return m, nil, errors.New("cached segment shorter than its header")
	}
	if b[4] >= 2 {
		copy(m.run[:], b[40:56])
	}
	if b[4] >= 3 {
		m.markSeq = binary.LittleEndian.Uint64(b[56:])
		m.prev = binary.LittleEndian.Uint64(b[64:])
	}
	m.crash, m.app = b[5]&1 != 0, b[5]&2 != 0
	m.first = binary.LittleEndian.Uint64(b[8:])
	m.last = binary.LittleEndian.Uint64(b[16:])
	m.firstTime = int64(binary.LittleEndian.Uint64(b[24:]))
	m.lastTime = int64(binary.LittleEndian.Uint64(b[32:]))
	if m.first == 0 || m.last < m.first {
		return m, nil, fmt.Errorf("cached segment header has sequence range %d..%d", m.first, m.last)
	}
	return m, b[size:], nil
}

// segPrefix is the room a segment buffer keeps in front of its frames:
// the cached-segment header and the seal header, so that the segment is
// sealed where it lies (sealInPlace).
const segPrefix = cachedHeaderSize + seal.HeaderSize

// segBuf is an open (then cut) segment: frames appended as received.
type segBuf struct {
	buf     []byte // backing: segPrefix bytes of room, then data
	data    []byte
	meta    segMeta
	started time.Time // arrival of the first record; zero while none

	// Markers that arrived while no record was pending.
	lastTimeOff int         // offset of a trailing time Marker frame, -1 if none
	idleTimes   int         // trailing time Marker frames while no record is pending
	note        wire.Marker // latest marker not yet reported to the machine
	hasNote     bool
}

func (b *segBuf) reset() {
	if len(b.buf) < segPrefix {
		b.buf = make([]byte, segPrefix, segPrefix+cap(b.data))
	}
	b.data = b.buf[segPrefix:segPrefix]
	b.meta = segMeta{}
	b.started = time.Time{}
	b.lastTimeOff = -1
	b.idleTimes = 0
	b.hasNote = false
}

// begin starts the segment's frames with its header: prev is the last
// sequence of the machine's previous segment (wire.SegmentHeader).
func (b *segBuf) begin(prev uint64) {
	b.data = wire.AppendSegmentHeader(b.data[:0], wire.SegmentHeader{Prev: prev})
	b.meta.prev = prev
}

func (b *segBuf) hasRecords() bool { return b.meta.first != 0 }

// appendBatch appends a validated batch frame covering first..last.
func (b *segBuf) appendBatch(f wire.Frame, first, last uint64, now time.Time) {
	b.data = f.AppendTo(b.data) // payload ≤ MaxPayload: checked by the reader
	if b.meta.first == 0 {
		b.meta.first = first
		b.started = now
	}
	b.meta.last = last
	b.lastTimeOff = -1
	b.idleTimes = 0
}

// appendMarker appends a Marker frame. While no record is pending, time
// markers all carry the same sequence, so only the first and the latest
// of a run are kept: an idle disk does not grow its next segment by one
// frame a second. The first must stay: it is the earliest time known to
// hold every record before it, and without it a recovery to a time
// between the last write and the latest marker would resolve to an older
// marker and miss the last writes.
func (b *segBuf) appendMarker(flags uint16, payload []byte, m wire.Marker) {
	idleTime := m.Kind == wire.MarkerTime && !b.hasRecords()
	if idleTime && b.idleTimes >= 2 {
		b.data = b.data[:b.lastTimeOff]
		b.idleTimes--
	}
	off := len(b.data)
	b.data, _ = wire.AppendFrame(b.data, wire.TypeMarker, flags, payload)
	b.lastTimeOff = -1
	if idleTime {
		b.lastTimeOff = off
		b.idleTimes++
	} else {
		b.idleTimes = 0
	}
	b.meta.marker(m.Kind, m.UnixNano, m.Seq)
	if !b.hasRecords() {
		b.note, b.hasNote = m, true
	}
}
