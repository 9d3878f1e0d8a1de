package applier

import (
	"cmp"
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

// clockLead is how far past the storage service's time of the newest
// point retention's clock may run: further, it is taken for a clock
// stepped ahead. (A machine whose points stopped, its agent away, keeps
// its older points longer meanwhile.) A point's cut time is held within
// it of the service's time of its snapshot, either way.
const clockLead = time.Hour

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
// snapshot time for points cut before it was recorded), held within
// clockLead of the storage service's time of each snapshot, and never
// older than an earlier point's; never by the agent-dated marker time,
// which may be off by any amount.
func (a *Applier) prune(ctx context.Context, m *machine) error {
	if a.cfg.Retention < 0 {
		return nil
	}
	now := a.cfg.Now()
	if !m.lastPrune.IsZero() && now.Sub(m.lastPrune) < pruneEvery && !now.Before(m.lastPrune) {
		return nil
	}
	keepFrom := m.applied()               // segments ending at or before it may go
	oldestPoint := uint64(math.MaxUint64) // of the points left on any disk
	recorded, err := recovery.ListPointRecords(ctx, a.cfg.Store, m.name)
	if err != nil {
		return err
	}
	named, err := a.namedSnapshots(ctx, m, recorded)
	if err != nil {
		return err
	}
	type snap struct {
		id     string
		seq    uint64
		t      time.Time
		usable bool
	}
	type diskPoints struct {
		valid        []snap
		newest, base int // indexes in valid; -1 none
	}
	all := make([]diskPoints, len(m.disks))
	windowFrom := int64(-1) // the newest base of any disk: the window's times are past it
	listed := make([][]blobstore.SnapshotInfo, len(m.disks))
	var service time.Time // the newest snapshot's time, by the storage service's clock
	for i, d := range m.disks {
		snaps, err := a.cfg.Store.ListSnapshots(ctx, d.blob)
		if err != nil {
			return fmt.Errorf("list snapshots of %s: %w", d.blob, err)
		}
		listed[i] = snaps
		for _, s := range snaps {
			if s.Time.After(service) {
				service = s.Time
			}
		}
	}
	aged := now
	if !service.IsZero() && now.After(service.Add(clockLead)) {
		// This server's clock far ahead of the service's (or no point
		// cut for a while): aged by it, every point would look old.
		// The service's time of the newest point bounds the ages.
		aged = service.Add(clockLead)
	}
	cutoff := aged.Add(-a.cfg.Retention)
	for i, d := range m.disks {
		snaps := listed[i]
		dp := diskPoints{newest: -1, base: -1}
		for _, s := range snaps {
			seq, err := strconv.ParseUint(s.Metadata[layout.MetaSeq], 10, 64)
			if err != nil {
				continue // not a recovery point: not ours to delete
			}
			t, err := time.Parse(time.RFC3339Nano, s.Metadata[layout.MetaCut])
			if err != nil {
				t = s.Time
			}
			if !s.Time.IsZero() {
				// Cut while this server's clock ran ahead, or behind
				// (booted before its time was synchronised): the
				// service's clock bounds it both ways.
				t = later(t, s.Time.Add(-clockLead))
				if lead := s.Time.Add(clockLead); t.After(lead) {
					t = lead
				}
			}
			// A point a gap recorded later covers is one recovery
			// refuses, as is one no sealed record names (a snapshot
			// anyone with write access could make, with any metadata):
			// never the newest or the base (it ages out).
			_, gap := layout.DiskGapAt(m.gaps, d.name, seq)
			usable := !gap && named[namedSnapshot{seq, d.name, s.ID}]
			dp.valid = append(dp.valid, snap{s.ID, seq, t, usable})
		}
		// A point's age never exceeds an earlier point's: cut times
		// going back in sequence (this server's clock stepped back, or a
		// successor's runs behind) would make a later point the base
		// while an earlier one stays in the window with the journal after
		// it deleted.
		slices.SortStableFunc(dp.valid, func(x, y snap) int { return cmp.Compare(x.seq, y.seq) })
		for j := 1; j < len(dp.valid); j++ {
			dp.valid[j].t = later(dp.valid[j].t, dp.valid[j-1].t)
		}
		dp.newest = -1
		for j, s := range dp.valid {
			if s.usable {
				dp.newest = j
			}
		}
		// The newest point older than the cutoff stays: it is the base
		// from which the times just inside the window are recovered.
		// Of two snapshots of one point (a retried or repeated cut), the
		// later is the one its sealed record names; both stay.
		for j, s := range dp.valid {
			if s.usable && s.t.Before(cutoff) && (dp.base < 0 || s.seq >= dp.valid[dp.base].seq) {
				dp.base = j
			}
		}
		if dp.base >= 0 {
			windowFrom = max(windowFrom, int64(dp.valid[dp.base].seq))
		}
		all[i] = dp
	}
	for i, d := range m.disks {
		dp := &all[i]
		// A disk a gap's mending left out by the window's start is the
		// disk nowhere in the window until its full sync's generation
		// (if it came back): a base from before that would pin the
		// journal for nothing, and, while it does not come back, so
		// would its points.
		until, left := leftOutAt(m.gaps, d.name, windowFrom)
		released := left && until == 0
		if left && dp.base >= 0 && dp.valid[dp.base].seq < until {
			dp.base = -1
		}
		kept := func(j int) bool {
			if released {
				return false
			}
			return dp.newest >= 0 && dp.valid[j].seq == dp.valid[dp.newest].seq || dp.base >= 0 && dp.valid[j].seq == dp.valid[dp.base].seq
		}
		deleted := 0
		for j, s := range dp.valid {
			if !kept(j) && s.t.Before(cutoff) {
				if n, ok := blobstore.FenceOf(ctx); ok && deleted == 0 {
					// Deletes are not fenced: a server that lost the
					// machine, its view of the points behind the new
					// one's, stops here.
					if err := a.cfg.Store.ClaimPageBlob(ctx, d.blob, n); err != nil {
						return fmt.Errorf("claim %s before deleting its old points: %w", d.blob, err)
					}
				}
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
		switch {
		case released:
		case left && dp.base < 0:
			// Rebuilt from zeros at its full sync's start.
			keepFrom = min(keepFrom, until-1)
		case dp.base < 0:
			// The window starts before this disk's oldest point: its
			// first times are rebuilt from the journal.
			keepFrom = 0
		default:
			keepFrom = min(keepFrom, dp.valid[dp.base].seq)
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

// namedSnapshot is a snapshot a sealed point record names.
type namedSnapshot struct {
	seq      uint64
	disk, id string
}

// namedSnapshots opens the point records listed (those not opened before)
// and returns the snapshots they name. A record that fails to open stops
// retention: it keeps everything meanwhile.
func (a *Applier) namedSnapshots(ctx context.Context, m *machine, recorded map[uint64][]string) (map[namedSnapshot]bool, error) {
	seen := make(map[string]recovery.PointRecord, len(m.records))
	named := map[namedSnapshot]bool{}
	for seq, kinds := range recorded {
		for _, kind := range kinds {
			name := layout.PointRecordName(m.name, recovery.PointID(seq), kind)
			r, ok := m.records[name]
			if !ok {
				var err error
				r, err = recovery.ReadPointRecord(ctx, a.cfg.Store, m.keys, m.name, seq, kind)
				if blobstore.IsNotFound(err) {
					continue // deleted since the listing
				}
				if err != nil {
					return nil, err
				}
			}
			seen[name] = r
			for disk, s := range r.Snapshots {
				named[namedSnapshot{seq, disk, s.ID}] = true
			}
		}
	}
	m.records = seen // (a record rewritten by a repeated cut is read at the next start)
	return named, nil
}

// leftOutAt reports whether the newest gap of gaps from seq or before
// (seq ≥ 0) left disk out of its mending, and until where: the start of
// its full sync's generation, 0 if it has not come back. Such a disk is
// the disk at no sequence from there until then, so its states before
// the gap are of no use from seq on.
func leftOutAt(gaps []layout.Gap, disk string, seq int64) (until uint64, left bool) {
	if seq < 0 {
		return 0, false
	}
	var from uint64
	for _, g := range gaps {
		if g.From > uint64(seq) || (left && g.From < from) {
			continue
		}
		for _, u := range g.Unmended {
			if u.Name == disk {
				from, until, left = g.From, u.Until, true
			}
		}
	}
	return until, left
}

// later returns the later of two times.
func later(a, b time.Time) time.Time {
	if a.Before(b) {
		return b
	}
	return a
}
