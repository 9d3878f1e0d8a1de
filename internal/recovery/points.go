package recovery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
)

// Kinds of recovery points (metadata layout.MetaKind).
const (
	KindCrash = "crash" // all disks mutually crash consistent
	KindApp   = "app"   // applications were quiesced (app-consistent marker)
)

// Point is a recovery point: a snapshot of every disk of a machine at one
// sequence number.
type Point struct {
	ID   string    // shared by the snapshots of all disks of the point
	Seq  uint64    // every record ≤ Seq, and none after, is in the snapshots
	Time time.Time // time of the marker the point was cut at
	Kind string    // KindCrash or KindApp
	// Snapshots maps disk name to snapshot ID of layout.DiskName(machine, disk).
	Snapshots map[string]string
	// all holds, per disk, every snapshot of the point, oldest first (a
	// retried or repeated cut leaves more than one): Recover takes the
	// one its sealed record names.
	all map[string][]string
}

// PointID is the point id of a recovery point at seq: zero padded, so ids
// sort like sequences.
func PointID(seq uint64) string { return fmt.Sprintf("%020d", seq) }

// PointMetadata is the snapshot metadata of a recovery point, as the
// applier writes it and Points reads it.
func PointMetadata(seq uint64, t time.Time, kind, generation string) blobstore.Metadata {
	return blobstore.Metadata{
		layout.MetaSeq:        strconv.FormatUint(seq, 10),
		layout.MetaTime:       t.UTC().Format(time.RFC3339Nano),
		layout.MetaKind:       kind,
		layout.MetaPoint:      PointID(seq),
		layout.MetaGeneration: generation,
	}
}

// ReadManifest returns machine's manifest. A missing one (or container)
// wraps ErrNoMachine.
func ReadManifest(ctx context.Context, store blobstore.Store, machine string) (*layout.Manifest, error) {
	b, err := store.GetBlob(ctx, layout.ManifestName(machine))
	if blobstore.IsNotFound(err) {
		if _, lerr := store.ListDirs(ctx, ""); blobstore.IsNotFound(lerr) {
			return nil, fmt.Errorf("%w: the container does not exist in this storage account (a mistyped --container, or another account?)", ErrNoMachine)
		}
		return nil, fmt.Errorf("%w: no %s (was machine %q ever replicated to this container? lifeboat machines lists those it holds)", ErrNoMachine, layout.ManifestName(machine), machine)
	}
	if err != nil {
		return nil, fmt.Errorf("read manifest of machine %q: %w", machine, err)
	}
	m, err := layout.UnmarshalManifest(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", layout.ManifestName(machine), err)
	}
	if m.Machine != machine {
		// Its seal is over the name it holds: another machine's
		// manifest copied here would verify (they share a recovery key).
		return nil, fmt.Errorf("%s is the manifest of machine %q (%w)", layout.ManifestName(machine), m.Machine, ErrTampered)
	}
	return m, nil
}

// ListPoints returns the recovery points found on the page blobs of the
// given disks of machine, sorted by sequence. Snapshots without valid point
// metadata are ignored; a missing disk blob has no points.
func ListPoints(ctx context.Context, store blobstore.Store, machine string, disks []string) ([]Point, error) {
	byID := map[string]*Point{}
	for _, disk := range disks {
		snaps, err := store.ListSnapshots(ctx, layout.DiskName(machine, disk))
		if err != nil && !blobstore.IsNotFound(err) {
			return nil, fmt.Errorf("list recovery points of disk %q of machine %q: %w", disk, machine, err)
		}
		for _, s := range snaps {
			seq, err := strconv.ParseUint(s.Metadata[layout.MetaSeq], 10, 64)
			if err != nil {
				continue
			}
			t, err := time.Parse(time.RFC3339Nano, s.Metadata[layout.MetaTime])
			if err != nil {
				continue
			}
			// By sequence, as records are named: the point metadata
			// is not authenticated either.
			id := PointID(seq)
			p := byID[id]
			if p == nil {
				p = &Point{ID: id, Seq: seq, Time: t.UTC(), Kind: s.Metadata[layout.MetaKind], Snapshots: map[string]string{}, all: map[string][]string{}}
				byID[id] = p
			}
			// A retried Snapshot call may have left two snapshots of one
			// point; they are identical, list the first (recover takes the
			// one the point's sealed record names, from all). An app-consistent
			// marker at a crash point's sequence snapshots it again: the
			// state is the same, and it is app-consistent.
			if _, dup := p.Snapshots[disk]; !dup {
				p.Snapshots[disk] = s.ID
			}
			p.all[disk] = append(p.all[disk], s.ID)
			if s.Metadata[layout.MetaKind] == KindApp {
				p.Kind = KindApp
			}
		}
	}
	out := make([]Point, 0, len(byID))
	for _, p := range byID {
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b Point) int { return cmpU64(a.Seq, b.Seq) })
	return out, nil
}

// firstStart is where the journal of m begins: the earliest first
// generation of its disks (1 when unknown).
func firstStart(m *layout.Manifest) uint64 {
	lo := uint64(0)
	for i := range m.Disks {
		if s := max(m.Disks[i].Generations()[0].Start, 1); lo == 0 || s < lo {
			lo = s
		}
	}
	return max(lo, 1)
}

func diskNames(m *layout.Manifest) []string {
	names := make([]string, len(m.Disks))
	for i, d := range m.Disks {
		names[i] = d.Name
	}
	return names
}

// Points returns machine's recovery points, oldest first, and the time
// until which it is recoverable: every write made before that time is in
// the account (the newest of the manifest's recoverable_until, the last
// marker of the journal up to the durable sequence, and the newest point).
func Points(ctx context.Context, store blobstore.Store, machine string) (points []Point, recoverableUntil time.Time, err error) {
	st, err := loadState(ctx, store, machine)
	if err != nil {
		return nil, time.Time{}, err
	}
	return st.points, st.until, nil
}

// state is what recovery needs to know about a machine, from metadata
// only (no keys needed).
type state struct {
	manifest *layout.Manifest
	points   []Point
	segments []Segment
	until    time.Time
	latest   uint64 // newest recoverable sequence
	// journalUntil is until from the manifest and the journal alone.
	journalUntil time.Time
	// journalFrom: every record from journalFrom to latest is in segments
	// (retention deleted the ones before it).
	journalFrom uint64
	// startDeleted: the journal's start is gone, and not by a retention
	// (which deletes only what a point kept as a base covers).
	startDeleted bool
}

func loadState(ctx context.Context, store blobstore.Store, machine string) (*state, error) {
	if err := layout.CheckName("machine", machine); err != nil {
		return nil, err
	}
	m, err := ReadManifest(ctx, store, machine)
	if err != nil {
		return nil, err
	}
	points, err := ListPoints(ctx, store, machine, diskNames(m))
	if err != nil {
		return nil, err
	}
	segs, err := ListSegments(ctx, store, machine)
	if err != nil {
		return nil, err
	}
	// Retention raises journal_from before it deletes: one that deleted
	// segments before the listing above shows in the manifest now. Its
	// start counts (only to refuse more), or the listing's first segment
	// would follow a "missing" one, taken for tampering.
	var raised uint64
	if now, err := ReadManifest(ctx, store, machine); err == nil && now.JournalFrom > m.JournalFrom {
		raised = now.JournalFrom
	}
	st := &state{manifest: m, journalUntil: m.RecoverableUntil.UTC()}
	// Segments beyond the durable sequence may still have holes before
	// them (uploads in flight); recovery ignores them.
	segs = slices.DeleteFunc(segs, func(s Segment) bool { return s.Last > m.DurableSeq })
	st.segments = segs
	for _, s := range segs {
		if _, gap := m.GapAt(s.Last); s.LastTime.After(st.journalUntil) && !gap {
			st.journalUntil = s.LastTime
		}
	}
	st.usePoints(points)
	st.journalFrom = max(m.JournalFrom, raised, 1)
	switch {
	case len(segs) == 0:
		st.journalFrom = max(st.journalFrom, m.DurableSeq+1)
	case m.JournalFrom == 0 && segs[0].First > firstStart(m):
		// Pruned by a retention that did not record journal_from. The
		// first segment may begin with a marker at the last record of
		// the deleted one: only the records after First are sure. (A
		// recorded journal_from is sealed and trusted: a first segment
		// past it is a jump of the sequence, an agent restarting on its
		// lease, and the replay's chain check finds a missing one.)
		st.journalFrom = segs[0].First + 1
		// Such a retention deleted only segments its base point covers,
		// and kept the one after it: without a point there, the segments
		// were deleted by someone else.
		st.startDeleted = !slices.ContainsFunc(st.points, func(p Point) bool { return p.Seq+1 >= segs[0].First })
	}
	return st, nil
}

// checkEnd fails with ErrTampered when the journal ends before durable_seq:
// durable_seq only ever ends an uploaded segment or tombstone, so the
// segments after the last one listed were deleted. Without the check the
// newest state, and any time after the last marker left, would resolve
// to that marker: an older state, silently.
func (st *state) checkEnd() error {
	m := st.manifest
	if m.DurableSeq == 0 || m.DurableSeq < max(m.JournalFrom, 1) {
		return nil // nothing durable, or every segment pruned by retention
	}
	n := len(st.segments)
	if n == 0 {
		// A retention that did not record journal_from deleted every
		// segment only behind the newest point; today's raises
		// journal_from first.
		if p := len(st.points); m.JournalFrom == 0 && p > 0 && st.points[p-1].Seq >= m.DurableSeq {
			return nil
		}
		return fmt.Errorf("%w: machine %q's journal holds no segment, but its durable_seq is %d: the segments were deleted from the account",
			ErrTampered, m.Machine, m.DurableSeq)
	}
	if end := st.segments[n-1].Last; end < m.DurableSeq {
		return fmt.Errorf("%w: machine %q's journal ends at sequence %d, before its durable_seq %d: the segments holding the newest records were deleted from the account (a sequence up to %d can still be recovered)",
			ErrTampered, m.Machine, end, m.DurableSeq, end)
	}
	return nil
}

// usePoints makes points the state's, and what they tell of the newest
// recoverable sequence and time. Points in a gap (layout.Gap) are not the
// disks: not listed, not used.
func (st *state) usePoints(points []Point) {
	m := st.manifest
	st.points = slices.DeleteFunc(points, func(p Point) bool { _, gap := m.GapAt(p.Seq); return gap })
	st.until, st.latest = st.journalUntil, m.DurableSeq
	if n := len(st.points); n > 0 {
		newest := st.points[n-1]
		st.latest = max(st.latest, newest.Seq)
		if newest.Time.After(st.until) {
			st.until = newest.Time
		}
	}
}

// Machines returns the machines the container holds a manifest of,
// sorted by name, with their manifests as stored (unverified:
// VerifyManifest checks one under its machine's keys). A directory
// without a manifest is not a machine; one whose manifest cannot be
// read or parsed is left out with a line to warn saying why: the others
// are what an operator needs.
func Machines(ctx context.Context, store blobstore.Store, warn io.Writer) ([]*layout.Manifest, error) {
	dirs, err := store.ListDirs(ctx, "")
	if blobstore.IsNotFound(err) {
		return nil, fmt.Errorf("%w: the container does not exist in this storage account (a mistyped --container, or another account?)", ErrNoMachine)
	}
	if err != nil {
		return nil, fmt.Errorf("list the machines: %w", err)
	}
	var out []*layout.Manifest
	for _, d := range dirs {
		m, err := ReadManifest(ctx, store, strings.TrimSuffix(d, "/"))
		switch {
		case errors.Is(err, ErrNoMachine):
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case err != nil:
			fmt.Fprintf(warn, "machine %s left out: %v\n", strings.TrimSuffix(d, "/"), err)
		default:
			out = append(out, m)
		}
	}
	return out, nil
}
