// Package recoverytest writes what the ingest side of a process server
// writes to the storage account for one machine — wrapped data key,
// manifest, sealed journal segments — from records a test chooses, and
// keeps a model of every disk so tests can compare replicas and recovered
// images byte for byte.
package recoverytest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Machine is one protected machine as seen in the account.
type Machine struct {
	tb          testing.TB
	Store       blobstore.Store
	Name        string
	RecoveryKey []byte
	Key         *seal.Key
	Disks       []layout.Disk
	Durable     uint64
	Until       time.Time
	Gaps        []layout.Gap // written into the manifest as they are
	// Segments are the names of the uploaded segments, in order.
	Segments []string

	seq     uint64
	ops     []op
	markers []wire.Marker

	frames   []byte
	batch    wire.BatchBuilder
	segFirst uint64
	segLast  uint64
	prevLast uint64 // last sequence of the previous segment
	segEmpty bool
	t0, t1   int64
	kinds    map[string]bool
}

type op struct {
	seq  uint64
	disk int
	kind wire.Op
	off  uint64
	n    uint32
	data []byte
}

func ctx() context.Context { return context.Background() }

// New creates machine name with disks of the given sizes (named d0, d1,
// …): a fresh recovery key, a data key wrapped by it, and a manifest.
func New(tb testing.TB, store blobstore.Store, name string, sizes ...uint64) *Machine {
	tb.Helper()
	if err := store.EnsureContainer(ctx()); err != nil {
		tb.Fatal(err)
	}
	m := &Machine{tb: tb, Store: store, Name: name, RecoveryKey: seal.NewRecoveryKey(), segEmpty: true}
	material, id := seal.NewDataKey()
	wrapped, err := seal.WrapKey(m.RecoveryKey, material, id)
	if err != nil {
		tb.Fatal(err)
	}
	if m.Key, err = seal.NewKey(id, material); err != nil {
		tb.Fatal(err)
	}
	if err := store.PutBlob(ctx(), layout.KeyName(name, id), wrapped,
		blobstore.Metadata{layout.MetaKeyFP: seal.Fingerprint(m.RecoveryKey)}); err != nil {
		tb.Fatal(err)
	}
	for i, s := range sizes {
		m.Disks = append(m.Disks, layout.Disk{Name: "d" + strconv.Itoa(i), Size: s, Generation: newGeneration(), GenerationStart: 1})
	}
	m.WriteManifest()
	return m
}

func newGeneration() string {
	var g wire.Generation
	rand.Read(g[:])
	return g.String()
}

// Keyring opens the machine's segments.
func (m *Machine) Keyring() seal.Keyring { return m.Key }

// Seq returns the last sequence used.
func (m *Machine) Seq() uint64 { return m.seq }

// Markers returns the markers sent so far.
func (m *Machine) Markers() []wire.Marker { return m.markers }

// Latest returns the sequence "latest" recovers to: the last marker in the
// account (at recoverable_until), 0 if none.
func (m *Machine) Latest() uint64 {
	var seq uint64
	for _, mk := range m.markers {
		if mk.Seq <= m.Durable && !m.Until.IsZero() && mk.UnixNano <= m.Until.UnixNano() {
			seq = mk.Seq
		}
	}
	return seq
}

// WriteManifest (re)writes the manifest from the fields of m, keeping
// applied_seq and journal_from as the applier last wrote them.
func (m *Machine) WriteManifest() {
	m.tb.Helper()
	man := &layout.Manifest{Version: layout.ManifestVersion, Machine: m.Name, Disks: m.Disks,
		KeyID: hex.EncodeToString(keyID(m.Key)), DurableSeq: m.Durable, RecoverableUntil: m.Until, Gaps: m.Gaps, Updated: time.Now().UTC()}
	if b, err := m.Store.GetBlob(ctx(), layout.ManifestName(m.Name)); err == nil {
		if old, err := layout.UnmarshalManifest(b); err == nil {
			man.AppliedSeq, man.JournalFrom = old.AppliedSeq, old.JournalFrom
		}
	}
	if err := recovery.SealManifest(man, m.Key); err != nil {
		m.tb.Fatal(err)
	}
	b, err := layout.MarshalManifest(man)
	if err != nil {
		m.tb.Fatal(err)
	}
	if err := m.Store.PutBlob(ctx(), layout.ManifestName(m.Name), b, nil); err != nil {
		m.tb.Fatal(err)
	}
}

// EditManifest rewrites the manifest in the account as edit changes it,
// sealed again (as a process server would write it).
func (m *Machine) EditManifest(edit func(*layout.Manifest)) {
	m.tb.Helper()
	man, err := recovery.ReadManifest(ctx(), m.Store, m.Name)
	if err != nil {
		m.tb.Fatal(err)
	}
	edit(man)
	if err := recovery.SealManifest(man, m.Key); err != nil {
		m.tb.Fatal(err)
	}
	b, err := layout.MarshalManifest(man)
	if err != nil {
		m.tb.Fatal(err)
	}
	if err := m.Store.PutBlob(ctx(), layout.ManifestName(m.Name), b, nil); err != nil {
		m.tb.Fatal(err)
	}
}

func keyID(k *seal.Key) []byte { id := k.ID(); return id[:] }

// NewGeneration gives disk a new generation and size (0: keep), starting
// at the next sequence, as the ingest does before a full sync, and
// rewrites the manifest. The model of the disk restarts from zeros there.
func (m *Machine) NewGeneration(disk int, size uint64) {
	if size == 0 {
		size = m.Disks[disk].Size
	}
	m.Disks[disk].NewGeneration(newGeneration(), size, m.seq+1)
	m.ops = append(m.ops, op{seq: m.seq + 1, disk: disk, kind: 0})
	m.WriteManifest()
}

// SkipTo makes seq the next record's sequence, as an agent restarting on
// its saved lease numbers past the records of its last run. Everything
// sent before is cut into a segment first: a batch holds consecutive
// records only.
func (m *Machine) SkipTo(seq uint64) {
	m.tb.Helper()
	if seq <= m.seq {
		m.tb.Fatalf("SkipTo(%d): sequence %d is used already", seq, m.seq)
	}
	m.Cut()
	m.seq = seq - 1
}

func (m *Machine) add(r wire.Record, disk int) uint64 {
	m.tb.Helper()
	m.seq++
	r.Seq = m.seq
	r.Disk = uint16(disk)
	if r.Op == wire.OpWrite {
		r.Data = append([]byte(nil), r.Data...)
	}
	if r.Op != wire.OpMarker {
		m.ops = append(m.ops, op{seq: r.Seq, disk: disk, kind: r.Op, off: r.Offset, n: r.Length, data: r.Data})
	}
	err := m.batch.Add(r)
	if err == wire.ErrBatchFull {
		m.flushBatch()
		err = m.batch.Add(r)
	}
	if err != nil {
		m.tb.Fatal(err)
	}
	m.note(r.Seq)
	if m.batch.Len() > 1<<20 {
		m.flushBatch()
	}
	return r.Seq
}

func (m *Machine) note(seq uint64) {
	if m.segEmpty {
		m.segFirst, m.segEmpty = seq, false
	}
	m.segLast = max(m.segLast, seq)
}

func (m *Machine) flushBatch() {
	m.tb.Helper()
	if m.batch.Count() == 0 {
		return
	}
	p, err := m.batch.AppendBinary(nil)
	if err != nil {
		m.tb.Fatal(err)
	}
	if m.frames, err = wire.AppendFrame(m.frames, wire.TypeBatch, 0, p); err != nil {
		m.tb.Fatal(err)
	}
	m.batch.Reset()
}

// Write records a write of data at off on disk and returns its sequence.
func (m *Machine) Write(disk int, off uint64, data []byte) uint64 {
	return m.add(wire.Record{Op: wire.OpWrite, Offset: off, Length: uint32(len(data)), Data: data}, disk)
}

// Zero records that [off, off+n) of disk reads as zeros.
func (m *Machine) Zero(disk int, off uint64, n uint32) uint64 {
	return m.add(wire.Record{Op: wire.OpZero, Offset: off, Length: n}, disk)
}

// Discard records a discard (TRIM) of [off, off+n), replicated as zeros.
func (m *Machine) Discard(disk int, off uint64, n uint32) uint64 {
	return m.add(wire.Record{Op: wire.OpDiscard, Offset: off, Length: n}, disk)
}

// Marker sends a Marker frame at the current sequence.
func (m *Machine) Marker(kind wire.MarkerKind, t time.Time) wire.Marker {
	m.tb.Helper()
	m.flushBatch()
	mk := wire.Marker{Seq: m.seq, UnixNano: t.UnixNano(), Kind: kind}
	p, _ := mk.AppendBinary(nil)
	var err error
	if m.frames, err = wire.AppendFrame(m.frames, wire.TypeMarker, 0, p); err != nil {
		m.tb.Fatal(err)
	}
	m.note(mk.Seq)
	m.noteMarker(mk)
	return mk
}

// InlineMarker sends a marker as an OpMarker record inside a batch; it
// takes a sequence of its own.
func (m *Machine) InlineMarker(kind wire.MarkerKind, t time.Time) wire.Marker {
	mk := wire.Marker{UnixNano: t.UnixNano(), Kind: kind}
	r := wire.MarkerRecord(mk)
	mk.Seq = m.add(r, 0)
	m.noteMarker(mk)
	return mk
}

func (m *Machine) noteMarker(mk wire.Marker) {
	if mk.Kind == wire.MarkerWithdrawn {
		return // dates nothing, as at the process server
	}
	m.markers = append(m.markers, mk)
	if m.t0 == 0 {
		m.t0 = mk.UnixNano
	}
	m.t1 = max(m.t1, mk.UnixNano) // as the process server: the latest, not the last
	if m.kinds == nil {
		m.kinds = map[string]bool{}
	}
	switch mk.Kind {
	case wire.MarkerCrashConsistent:
		m.kinds["crash"] = true
	case wire.MarkerAppConsistent:
		m.kinds["app"] = true
	}
}

// Cut seals everything sent since the last Cut into one segment, uploads
// it with its metadata and advances the manifest's durable_seq (and
// recoverable_until to the last marker). It returns the blob name, or ""
// if nothing was sent.
func (m *Machine) Cut() string {
	m.tb.Helper()
	m.flushBatch()
	if len(m.frames) == 0 {
		return ""
	}
	name := layout.SegmentName(m.Name, m.segFirst, m.segLast)
	plain := wire.AppendSegmentHeader(nil, wire.SegmentHeader{Prev: m.prevLast})
	sealed, err := seal.Seal(nil, append(plain, m.frames...), m.Key, []byte(name))
	if err != nil {
		m.tb.Fatal(err)
	}
	var kinds []string
	for _, k := range []string{"crash", "app"} {
		if m.kinds[k] {
			kinds = append(kinds, k)
		}
	}
	md := blobstore.Metadata{
		layout.MetaFirstSeq:  strconv.FormatUint(m.segFirst, 10),
		layout.MetaLastSeq:   strconv.FormatUint(m.segLast, 10),
		layout.MetaFirstTime: strconv.FormatInt(m.t0, 10),
		layout.MetaLastTime:  strconv.FormatInt(m.t1, 10),
	}
	if len(kinds) > 0 {
		md[layout.MetaMarkers] = strings.Join(kinds, ",")
	}
	if err := m.Store.PutBlob(ctx(), name, sealed, md); err != nil {
		m.tb.Fatal(err)
	}
	m.Segments = append(m.Segments, name)
	m.prevLast = m.segLast
	m.Durable = max(m.Durable, m.segLast)
	if m.t1 != 0 {
		m.Until = time.Unix(0, m.t1).UTC()
	}
	m.frames, m.segEmpty, m.segFirst, m.segLast, m.t0, m.t1, m.kinds = m.frames[:0], true, 0, 0, 0, 0, nil
	m.WriteManifest()
	return name
}

// Image returns disk as it was after every record ≤ seq, sized like the
// replica page blob (disk size rounded up to whole pages).
func (m *Machine) Image(disk int, seq uint64) []byte {
	size := (m.Disks[disk].Size + blobstore.PageSize - 1) &^ (blobstore.PageSize - 1)
	img := make([]byte, size)
	for _, o := range m.ops {
		if o.seq > seq {
			break
		}
		if o.disk != disk {
			continue
		}
		// Only an older generation, cleared by a later kind 0, can
		// reach beyond the disk's current size.
		end := min(o.off+uint64(o.n), uint64(len(img)))
		switch {
		case o.kind == 0: // new generation: the replica restarts from zeros
			clear(img)
		case o.off >= end:
		case o.kind == wire.OpWrite:
			copy(img[o.off:end], o.data)
		default:
			clear(img[o.off:end])
		}
	}
	return img
}

// Tamper flips one byte in the middle of blob name, keeping its metadata,
// as an attacker with write access to the account could.
func (m *Machine) Tamper(name string) {
	m.tb.Helper()
	b, err := m.Store.GetBlob(ctx(), name)
	if err != nil {
		m.tb.Fatal(err)
	}
	info, err := m.Store.Stat(ctx(), name)
	if err != nil {
		m.tb.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := m.Store.PutBlob(ctx(), name, b, info.Metadata); err != nil {
		m.tb.Fatal(err)
	}
}

// LoseSegment replaces the i-th segment by a tombstone, as a process
// server does when a cached segment is lost before its upload: a sealed
// segment of the same range holding only its header (the records are
// gone). The caller records the gap in m.Gaps.
func (m *Machine) LoseSegment(i int) {
	m.tb.Helper()
	name := m.Segments[i]
	first, last, err := layout.ParseSegmentName(name)
	if err != nil {
		m.tb.Fatal(err)
	}
	var prev uint64
	if i > 0 {
		if _, prev, err = layout.ParseSegmentName(m.Segments[i-1]); err != nil {
			m.tb.Fatal(err)
		}
	}
	sealed, err := seal.Seal(nil, wire.AppendSegmentHeader(nil, wire.SegmentHeader{Prev: prev}), m.Key, []byte(name))
	if err != nil {
		m.tb.Fatal(err)
	}
	md := blobstore.Metadata{
		layout.MetaFirstSeq: strconv.FormatUint(first, 10), layout.MetaLastSeq: strconv.FormatUint(last, 10),
		layout.MetaFirstTime: "0", layout.MetaLastTime: "0",
	}
	if err := m.Store.PutBlob(ctx(), name, sealed, md); err != nil {
		m.tb.Fatal(err)
	}
}

// Output is a disk image in memory that Recover can write (an io.WriterAt
// with Truncate).
type Output struct{ B []byte }

// WriteAt writes p at off, growing the image as needed.
func (w *Output) WriteAt(p []byte, off int64) (int, error) {
	if need := int(off) + len(p); need > len(w.B) {
		w.B = append(w.B, make([]byte, need-len(w.B))...)
	}
	copy(w.B[off:], p)
	return len(p), nil
}

// Truncate sizes the image to n bytes.
func (w *Output) Truncate(n int64) error {
	if int(n) > len(w.B) {
		w.B = append(w.B, make([]byte, int(n)-len(w.B))...)
	}
	w.B = w.B[:n]
	return nil
}
