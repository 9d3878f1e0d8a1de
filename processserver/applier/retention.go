package applier

import (
	"context"
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
)

// pruneEvery bounds how often retention lists snapshots when no new point
// was cut.
const pruneEvery = time.Minute

// prune deletes the snapshots of m's disks older than Retention, except
// those of each disk's newest point and of the newest point older than
// Retention (the base of the window), then the journal segments that end
// at or before the base of every disk: recovering to any kept point, or
// to any sequence after the oldest one, never needs them. A disk without
// a base needs the journal that rebuilds it from zeros: then no segment
// is deleted. Only points with a sealed record count as newest or base
// (recover uses no other); then the records of the points deleted go.
//
// Ages are by the applier's clock (layout.MetaCut, or the storage's
// snapshot time for points cut before it was recorded), never by the
// agent-dated marker time, which may be off by any amount.
func (a *Applier) prune(ctx context.Context, m *machine) error {
	if a.cfg.Retention < 0 {
		return nil
	}
	now := a.cfg.Now()
	if !m.lastPrune.IsZero() && now.Sub(m.lastPrune) < pruneEvery {
		return nil
	}
	cutoff := now.Add(-a.cfg.Retention)
	keepFrom := m.applied()               // segments ending at or before it may go
	oldestPoint := uint64(math.MaxUint64) // of the points left on any disk
	recorded, err := recovery.ListPointRecords(ctx, a.cfg.Store, m.name)
	if err != nil {
		return err
	}
	bases := make([]int64, len(m.disks)) // per disk, its base's seq; -1 none
	for i, d := range m.disks {
		snaps, err := a.cfg.Store.ListSnapshots(ctx, d.blob)
		if err != nil {
			return fmt.Errorf("list snapshots of %s: %w", d.blob, err)
		}
		type snap struct {
			id     string
			seq    uint64
			t      time.Time
			usable bool
		}
		var valid []snap
		newest := -1
		for _, s := range snaps {
			seq, err := strconv.ParseUint(s.Metadata[layout.MetaSeq], 10, 64)
			if err != nil {
				continue // not a recovery point: not ours to delete
			}
			t, err := time.Parse(time.RFC3339Nano, s.Metadata[layout.MetaCut])
			if err != nil {
				t = s.Time
			}
			// A point a gap recorded later covers is one recovery
			// refuses, as is one without a record: never the newest or
			// the base (it ages out).
			_, gap := layout.DiskGapAt(m.gaps, d.name, seq)
			usable := !gap && len(recorded[seq]) > 0
			valid = append(valid, snap{s.ID, seq, t, usable})
			if usable && (newest < 0 || seq >= valid[newest].seq) {
				newest = len(valid) - 1
			}
		}
		// The newest point older than the cutoff stays: it is the base
		// from which the times just inside the window are recovered.
		// Of two snapshots of one point (a retried or repeated cut), the
		// later is the one its sealed record names; both stay.
		base := -1
		for j, s := range valid {
			if s.usable && s.t.Before(cutoff) && (base < 0 || s.seq >= valid[base].seq) {
				base = j
			}
		}
		kept := func(j int) bool {
			return newest >= 0 && valid[j].seq == valid[newest].seq || base >= 0 && valid[j].seq == valid[base].seq
		}
		deleted := 0
		for j, s := range valid {
			if !kept(j) && s.t.Before(cutoff) {
				// Gone already: a delete the service did before a lost
				// reply, retried inside the SDK.
				if err := a.cfg.Store.DeleteSnapshot(ctx, d.blob, s.id); err != nil && !blobstore.IsNotFound(err) {
					return fmt.Errorf("delete recovery point at seq %d of %s: %w", s.seq, d.blob, err)
				}
				deleted++
			} else {
				oldestPoint = min(oldestPoint, s.seq)
			}
		}
		if deleted > 0 {
			a.log.Info("retention deleted recovery points", logKeyMachine, m.name, logKeyDisk, d.name, logKeyCount, deleted)
		}
		bases[i] = -1
		if base >= 0 {
			bases[i] = int64(valid[base].seq)
		}
	}
	windowFrom := slices.Max(bases) // the window's times are past it
	for i, d := range m.disks {
		switch {
		case windowFrom >= 0 && leftOutSince(m.gaps, d.name, uint64(windowFrom)):
			// Not recoverable anywhere in the window (its blob lacks
			// writes a gap lost, and its full sync has not come): its
			// old base would pin the journal for good.
		case bases[i] < 0:
			// The window starts before this disk's oldest point: its
			// first times are rebuilt from the journal.
			keepFrom = 0
		default:
			keepFrom = min(keepFrom, uint64(bases[i]))
		}
	}
	if keepFrom > 0 {
		// From the oldest segment the last prune kept: the journal of a
		// day is some 200 000 segments, of which a prune drops minutes.
		var segs []recovery.Segment
		var err error
		if m.pruneFrom > 0 {
			segs, err = recovery.ListSegmentsFrom(ctx, a.cfg.Store, m.name, m.pruneFrom, keepFrom)
		} else {
			segs, err = recovery.ListSegments(ctx, a.cfg.Store, m.name)
		}
		if err != nil {
			return err
		}
		var drop []recovery.Segment
		oldestKept := keepFrom + 1 // unless a segment straddles keepFrom
		for _, s := range segs {
			if s.Last <= keepFrom {
				drop = append(drop, s)
			} else {
				oldestKept = min(oldestKept, s.First)
			}
		}
		if len(drop) > 0 {
			// Recorded first: recovery must not take a journal with its
			// start deleted for a complete one (rebuilding a disk from
			// zeros over it).
			if err := a.updateManifest(ctx, m.name, func(man *layout.Manifest) {
				man.JournalFrom = max(man.JournalFrom, keepFrom+1)
			}); err != nil {
				return err
			}
		}
		for _, s := range drop {
			if err := a.cfg.Store.DeleteBlob(ctx, s.Name); err != nil && !blobstore.IsNotFound(err) {
				return fmt.Errorf("delete journal segment %s: %w", s.Name, err)
			}
		}
		if len(drop) > 0 {
			a.log.Info("retention deleted journal segments", logKeyMachine, m.name, logKeyCount, len(drop), logKeySeq, keepFrom)
		}
		m.pruneFrom = max(m.pruneFrom, oldestKept)
	}
	// The records of points older than every point left on any disk
	// (disks' bases differ: a gap, a disk added later): none while no
	// point is left, as a record is written after its snapshots.
	for seq, kinds := range recorded {
		if seq >= oldestPoint {
			continue
		}
		for _, kind := range kinds {
			name := layout.PointRecordName(m.name, recovery.PointID(seq), kind)
			if err := a.cfg.Store.DeleteBlob(ctx, name); err != nil && !blobstore.IsNotFound(err) {
				return fmt.Errorf("delete recovery point record %s: %w", name, err)
			}
		}
	}
	m.lastPrune = now
	return nil
}

// leftOutSince reports whether a gap's mending left disk out from seq or
// before, with no full sync of it since: it is the disk at no sequence
// from seq on.
func leftOutSince(gaps []layout.Gap, disk string, seq uint64) bool {
	for _, g := range gaps {
		for _, u := range g.Unmended {
			if u.Name == disk && u.Until == 0 && g.From <= seq {
				return true
			}
		}
	}
	return false
}
