package recovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
)

// PointRecord is what the applier seals, under the machine's data key,
// once the snapshots of a recovery point exist (layout.PointRecordName).
// The storage service chooses snapshot ids and never changes a snapshot,
// so a record naming them vouches for what recover copies (as it was when
// the point was cut) and for the point's sequence, time and kind, which
// snapshot metadata alone does not: anyone who can write the account can
// snapshot a page blob with any metadata.
type PointRecord struct {
	Seq       uint64                   `json:"seq"`
	Time      time.Time                `json:"time"`
	Kind      string                   `json:"kind"`
	Snapshots map[string]PointSnapshot `json:"snapshots"` // by disk name
}

// PointSnapshot is one disk's snapshot in a PointRecord.
type PointSnapshot struct {
	ID         string `json:"id"`
	Generation string `json:"generation"`
}

// SealPointRecord returns the name and sealed content of r's record for
// machine (the blob name is the associated data: a record copied to
// another point's or machine's name fails to open).
func SealPointRecord(machine string, r PointRecord, key *seal.Key) (string, []byte, error) {
	name := layout.PointRecordName(machine, PointID(r.Seq), r.Kind)
	plain, err := json.Marshal(r)
	if err != nil {
		return "", nil, err
	}
	sealed, err := seal.Seal(nil, plain, key, []byte(name))
	return name, sealed, err
}

// ListPointRecords returns the kinds of the point records machine has in
// the account, by sequence (not opened; other blobs under the prefix are
// ignored).
func ListPointRecords(ctx context.Context, store blobstore.Store, machine string) (map[uint64][]string, error) {
	infos, err := store.ListBlobs(ctx, layout.PointsPrefix(machine))
	if err != nil {
		return nil, fmt.Errorf("list recovery point records of machine %q: %w", machine, err)
	}
	kinds := make(map[uint64][]string, len(infos))
	for _, bi := range infos {
		if seq, kind, err := layout.ParsePointRecordName(machine, bi.Name); err == nil {
			kinds[seq] = append(kinds[seq], kind)
		}
	}
	return kinds, nil
}

// verifyPoints keeps, of each point, the disks whose snapshot a sealed
// record of that point names, with the record's time and kind, and drops
// points with none: being cut right now, cut by a process server stopped
// before it wrote the record (it is cut again), or forged. What it drops
// is said on warn. A record that fails authentication is ErrTampered. The records
// are listed once and read parallelism at a time (a day of points is a
// few hundred).
func verifyPoints(ctx context.Context, store blobstore.Store, keys seal.Keyring, machine string, points []Point, parallelism int, warn io.Writer) ([]Point, error) {
	kinds, err := ListPointRecords(ctx, store, machine)
	if err != nil {
		return nil, err
	}
	records := make([][]PointRecord, len(points)) // per point, its records
	err = parallel(ctx, parallelism, len(points), func(ctx context.Context, i int) error {
		for _, kind := range kinds[points[i].Seq] {
			r, err := ReadPointRecord(ctx, store, keys, machine, points[i].Seq, kind)
			if blobstore.IsNotFound(err) {
				continue // retention deleted it since the listing
			}
			if err != nil {
				return err
			}
			records[i] = append(records[i], r)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := points[:0:0]
	for i, p := range points {
		v := Point{ID: p.ID, Seq: p.Seq, Snapshots: map[string]string{}}
		app := false // an app-consistent marker was at this sequence
		for _, r := range records[i] {
			app = app || r.Kind == KindApp
			for disk, ids := range p.all {
				if s, ok := r.Snapshots[disk]; ok && slices.Contains(ids, s.ID) {
					v.Snapshots[disk] = s.ID
					v.Time, v.Kind = r.Time.UTC(), r.Kind
				}
			}
		}
		if app && len(v.Snapshots) > 0 {
			// The disks were at this sequence when the app-consistent
			// marker came, whichever record names the snapshots used.
			v.Kind = KindApp
		}
		if len(v.Snapshots) < len(p.Snapshots) && warn != nil {
			fmt.Fprintf(warn, "recovery point at seq %d: %d of its %d snapshots not named by a sealed record (being cut now, cut before the process server stopped, or not Lifeboat's): not used\n",
				p.Seq, len(p.Snapshots)-len(v.Snapshots), len(p.Snapshots))
		}
		if len(v.Snapshots) > 0 {
			out = append(out, v)
		}
	}
	return out, nil
}

// ReadPointRecord reads and opens with keys the record of machine's kind
// point at seq: one that fails to open, or that is another point's, is
// ErrTampered.
func ReadPointRecord(ctx context.Context, store blobstore.Store, keys seal.Keyring, machine string, seq uint64, kind string) (PointRecord, error) {
	var r PointRecord
	name := layout.PointRecordName(machine, PointID(seq), kind)
	sealed, err := store.GetBlob(ctx, name)
	if err != nil {
		return r, fmt.Errorf("read recovery point record %s: %w", name, err)
	}
	plain, err := seal.Open(nil, sealed, keys, []byte(name))
	if err != nil {
		if errors.Is(err, seal.ErrTampered) {
			return r, fmt.Errorf("recovery point record %s %w; refusing to use it: %w", name, ErrTampered, err)
		}
		return r, fmt.Errorf("recovery point record %s: %w", name, err)
	}
	if err := json.Unmarshal(plain, &r); err != nil {
		return r, fmt.Errorf("recovery point record %s %w: %w", name, ErrTampered, err)
	}
	if r.Seq != seq || r.Kind != kind {
		return r, fmt.Errorf("recovery point record %s %w: it is not the record of a %s point at sequence %d", name, ErrTampered, kind, seq)
	}
	return r, nil
}

// VerifiedPoints is Points checked with the recovery key: the manifest
// must verify, and only the points recover would start from are listed
// (a sealed record names their snapshots), with their records' times and
// kinds; what it leaves out is said on warn.
// It returns the verified manifest too.
func VerifiedPoints(ctx context.Context, store blobstore.Store, machine string, recoveryKey []byte, warn io.Writer) ([]Point, time.Time, *layout.Manifest, error) {
	st, err := loadState(ctx, store, machine)
	if err != nil {
		return nil, time.Time{}, nil, err
	}
	keys, err := Keyring(ctx, store, machine, recoveryKey)
	if err != nil {
		return nil, time.Time{}, nil, err
	}
	keys.Warn(warn)
	if err := VerifyManifest(st.manifest, keys); err != nil {
		return nil, time.Time{}, nil, keys.Explain(err)
	}
	if err := st.checkEnd(); err != nil {
		return nil, time.Time{}, nil, err
	}
	points, err := verifyPoints(ctx, store, keys, machine, st.points, 0, warn)
	if err != nil {
		return nil, time.Time{}, nil, keys.Explain(err)
	}
	st.usePoints(points)
	until, err := st.verifiedUntil(ctx, store, keys)
	if err != nil {
		return nil, time.Time{}, nil, keys.Explain(err)
	}
	return st.points, until, st.manifest, nil
}

// verifiedUntil is st.until from authenticated data only: the sealed
// manifest's recoverable_until, the newest verified point, and the
// markers sealed in the newest journal segment, when segment metadata
// (not authenticated) says the journal goes further. A last_time set to
// a later time in the account then does not hide how far behind the
// journal is. (Idle markers the process server left out of a segment are
// not counted: it may show a little less than the account holds.)
func (st *state) verifiedUntil(ctx context.Context, store blobstore.Store, keys seal.Keyring) (time.Time, error) {
	until := st.manifest.RecoverableUntil.UTC()
	if n := len(st.points); n > 0 && st.points[n-1].Time.After(until) {
		until = st.points[n-1].Time
	}
	if !st.until.After(until) {
		return st.until, nil
	}
	for i := len(st.segments) - 1; i >= 0; i-- {
		s := st.segments[i]
		if _, gap := st.manifest.GapAt(s.Last); gap || s.FirstTime.IsZero() {
			continue
		}
		plain, err := ReadSegment(ctx, store, s.Name, keys, nil)
		if err != nil {
			return time.Time{}, err
		}
		var dec Decoder
		recs, err := dec.Decode(plain)
		if err != nil {
			return time.Time{}, fmt.Errorf("journal segment %s: %w", s.Name, err)
		}
		for j := range recs {
			if r := &recs[j]; r.Dates() {
				if t := time.Unix(0, r.Marker().UnixNano).UTC(); t.After(until) {
					until = t
				}
			}
		}
		break
	}
	return until, nil
}
