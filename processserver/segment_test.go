package processserver

import (
	"bytes"
	"slices"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// markersIn decodes the Marker frames of a segment buffer.
func markersIn(t *testing.T, data []byte) []wire.Marker {
	t.Helper()
	r := wire.NewReader(bytes.NewReader(data), 0)
	var out []wire.Marker
	for {
		f, err := r.Next()
		if err != nil {
			return out
		}
		if f.Type == wire.TypeMarker {
			var m wire.Marker
			if err := m.UnmarshalBinary(f.Payload); err != nil {
				t.Fatal(err)
			}
			out = append(out, m)
		}
	}
}

// An idle run of time markers keeps its first and latest marker: the first
// is the earliest time that covers the last writes, and recovery to a time
// inside the idle run depends on it.
func TestIdleTimeMarkersKeepFirstAndLatest(t *testing.T) {
	var b segBuf
	b.reset()
	for i := int64(1); i <= 5; i++ {
		m := wire.Marker{Seq: 42, UnixNano: i * 1e9, Kind: wire.MarkerTime}
		p, _ := m.AppendBinary(nil)
		b.appendMarker(0, p, m)
	}
	got := markersIn(t, b.data)
	if len(got) != 2 || got[0].UnixNano != 1e9 || got[1].UnixNano != 5e9 {
		t.Fatalf("idle markers kept: %+v; want the first (1 s) and the latest (5 s)", got)
	}
	// A crash marker ends the run; it and the markers after it stay.
	c := wire.Marker{Seq: 42, UnixNano: 6e9, Kind: wire.MarkerCrashConsistent}
	p, _ := c.AppendBinary(nil)
	b.appendMarker(0, p, c)
	for i := int64(7); i <= 9; i++ {
		m := wire.Marker{Seq: 42, UnixNano: i * 1e9, Kind: wire.MarkerTime}
		p, _ := m.AppendBinary(nil)
		b.appendMarker(0, p, m)
	}
	got = markersIn(t, b.data)
	want := []int64{1e9, 5e9, 6e9, 7e9, 9e9}
	if len(got) != len(want) {
		t.Fatalf("markers %+v, want times %v", got, want)
	}
	for i := range want {
		if got[i].UnixNano != want[i] {
			t.Fatalf("markers %+v, want times %v", got, want)
		}
	}
}

// Cached segment headers carry the agent run (version 2) and the
// sequence of the marker that dates the segment (version 3); version 1
// and 2 headers, without them, are still read.
func TestCachedHeaderVersions(t *testing.T) {
	m := segMeta{first: 7, last: 9, firstTime: 11, lastTime: 12, markSeq: 8, prev: 6, crash: true, run: wire.RunID{1, 2, 3, 15: 9}}
	b := append(appendCachedHeader(nil, m), "blob"...)
	got, blob, err := parseCached(b)
	if err != nil || got != m || string(blob) != "blob" {
		t.Fatalf("version 3: %+v, %q, %v; want %+v", got, blob, err, m)
	}
	v2 := slices.Clone(b[:cachedHeaderSizeV2])
	v2[4] = 2
	v2 = append(v2, "older blob"...)
	got, blob, err = parseCached(v2)
	m.markSeq, m.prev = 0, 0
	if err != nil || got != m || string(blob) != "older blob" {
		t.Fatalf("version 2: %+v, %q, %v; want %+v", got, blob, err, m)
	}
	v1 := slices.Clone(b[:cachedHeaderSizeV1])
	v1[4] = 1
	v1 = append(v1, "old blob"...)
	got, blob, err = parseCached(v1)
	m.run = wire.RunID{}
	if err != nil || got != m || string(blob) != "old blob" {
		t.Fatalf("version 1: %+v, %q, %v; want %+v", got, blob, err, m)
	}
	if _, _, err := parseCached(b[:cachedHeaderSize-1]); err == nil {
		t.Error("truncated version 3 header accepted")
	}
	b[4] = 4
	if _, _, err := parseCached(b); err == nil {
		t.Error("version 4 accepted")
	}
}
