package applier

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
)

// pruneEvery bounds how often retention lists snapshots when no new point
// was cut.
const pruneEvery = time.Minute

// prune deletes the snapshots of m's disks older than Retention, except
// each disk's newest, then the journal segments that end at or before the
// oldest snapshot every disk still has: recovering to any kept point, or
// to any sequence after the oldest one, never needs them.
func (a *Applier) prune(ctx context.Context, m *machine) error {
	if a.cfg.Retention < 0 {
		return nil
	}
	now := a.cfg.Now()
	if !m.lastPrune.IsZero() && now.Sub(m.lastPrune) < pruneEvery {
		return nil
	}
	cutoff := now.Add(-a.cfg.Retention)
	var keepFrom uint64    // oldest sequence every disk has a snapshot at or before
	var keptTime time.Time // time of that snapshot, the newest of the disks' oldest
	for i, d := range m.disks {
		snaps, err := a.cfg.Store.ListSnapshots(ctx, d.blob)
		if err != nil {
			return fmt.Errorf("list snapshots of %s: %w", d.blob, err)
		}
		type snap struct {
			id  string
			seq uint64
			t   time.Time
		}
		var valid []snap
		newest := -1
		for _, s := range snaps {
			seq, err1 := strconv.ParseUint(s.Metadata[layout.MetaSeq], 10, 64)
			t, err2 := time.Parse(time.RFC3339Nano, s.Metadata[layout.MetaTime])
			if err1 != nil || err2 != nil {
				continue // not a recovery point: not ours to delete
			}
			valid = append(valid, snap{s.ID, seq, t})
			if newest < 0 || seq >= valid[newest].seq {
				newest = len(valid) - 1
			}
		}
		// The newest point older than the cutoff stays: it is the base
		// from which the times just inside the window are recovered.
		base := -1
		for j, s := range valid {
			if s.t.Before(cutoff) && (base < 0 || s.seq > valid[base].seq) {
				base = j
			}
		}
		oldestKept := uint64(0)
		var oldestKeptTime time.Time
		kept := false
		deleted := 0
		for j, s := range valid {
			if j != newest && j != base && s.t.Before(cutoff) {
				if err := a.cfg.Store.DeleteSnapshot(ctx, d.blob, s.id); err != nil {
					return fmt.Errorf("delete recovery point at seq %d of %s: %w", s.seq, d.blob, err)
				}
				deleted++
				continue
			}
			if !kept || s.seq < oldestKept {
				oldestKept, oldestKeptTime, kept = s.seq, s.t, true
			}
		}
		if deleted > 0 {
			a.log.Info("retention deleted recovery points", logKeyMachine, m.name, logKeyDisk, d.name, logKeyCount, deleted)
		}
		if !kept {
			// A disk without points needs the whole journal.
			keepFrom = 0
			break
		}
		if i == 0 || oldestKept < keepFrom {
			keepFrom = oldestKept
		}
		if oldestKeptTime.After(keptTime) {
			keptTime = oldestKeptTime
		}
	}
	keepFrom = min(keepFrom, m.applied())
	// The journal before the oldest point is the only way to recover a
	// time between the window's start and that point (replayed from an
	// empty disk): keep it until the point itself has left the window.
	if !keptTime.Before(cutoff) {
		keepFrom = 0
	}
	if keepFrom > 0 {
		segs, err := recovery.ListSegments(ctx, a.cfg.Store, m.name)
		if err != nil {
			return err
		}
		deleted := 0
		for _, s := range segs {
			if s.Last > keepFrom {
				continue
			}
			if err := a.cfg.Store.DeleteBlob(ctx, s.Name); err != nil {
				return fmt.Errorf("delete journal segment %s: %w", s.Name, err)
			}
			deleted++
		}
		if deleted > 0 {
			a.log.Info("retention deleted journal segments", logKeyMachine, m.name, logKeyCount, deleted, logKeySeq, keepFrom)
		}
	}
	m.lastPrune = now
	return nil
}
