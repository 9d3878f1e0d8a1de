package processserver

import (
	"bytes"
	"errors"
	"fmt"
	"io"
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
	crash, app          bool
}

func (m *segMeta) record(seq uint64) {
	if m.first == 0 {
		m.first = seq
	}
	m.last = seq
}

func (m *segMeta) marker(k wire.MarkerKind, nanos int64) {
	if m.firstTime == 0 {
		m.firstTime = nanos
	}
	m.lastTime = max(m.lastTime, nanos)
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

// scanSegment verifies a segment's frames and summarises them. It runs
// once per segment, at upload time, so it may copy.
func scanSegment(data []byte) (segMeta, error) {
	var m segMeta
	r := wire.NewReader(bytes.NewReader(data), 0)
	for {
		f, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return m, err
		}
		switch f.Type {
		case wire.TypeBatch:
			b, err := wire.DecodeBatch(f.Payload)
			if err != nil {
				return m, err
			}
			for it := b.Records(); it.Next(); {
				rec := it.Record()
				m.record(rec.Seq)
				if rec.Op == wire.OpMarker {
					mk := rec.Marker()
					m.marker(mk.Kind, mk.UnixNano)
				}
			}
		case wire.TypeMarker:
			var mk wire.Marker
			if err := mk.UnmarshalBinary(f.Payload); err != nil {
				return m, err
			}
			m.marker(mk.Kind, mk.UnixNano)
		default:
			return m, fmt.Errorf("unexpected %s frame in a segment", f.Type)
		}
	}
	if m.first == 0 {
		return m, errors.New("segment holds no record")
	}
	return m, nil
}

// segBuf is an open (then cut) segment: frames appended as received.
type segBuf struct {
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
	b.data = b.data[:0]
	b.meta = segMeta{}
	b.started = time.Time{}
	b.lastTimeOff = -1
	b.idleTimes = 0
	b.hasNote = false
}

func (b *segBuf) hasRecords() bool { return b.meta.first != 0 }

// appendBatch appends a validated batch covering first..last.
func (b *segBuf) appendBatch(flags uint16, payload []byte, first, last uint64, now time.Time) {
	b.data, _ = wire.AppendFrame(b.data, wire.TypeBatch, flags, payload) // payload ≤ MaxPayload: checked by the reader
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
	b.meta.marker(m.Kind, m.UnixNano)
	if !b.hasRecords() {
		b.note, b.hasNote = m, true
	}
}
