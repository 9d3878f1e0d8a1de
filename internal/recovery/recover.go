package recovery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/progress"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Latest selects the newest recoverable state: the sequence of the last
// marker at or before recoverable_until (every record the journal holds
// up to that time).
const Latest = "latest"

// Request says which disk to recover, and to when.
type Request struct {
	Machine string
	Disk    string
	// Point is Latest, a sequence number, or an RFC 3339 time, which
	// selects the last marker at or before that time (the newest state
	// known to precede it).
	Point       string
	RecoveryKey []byte
	// Progress receives human-readable progress (nil: none).
	Progress io.Writer
	// Parallelism bounds concurrent snapshot reads (default 4).
	Parallelism int
	// Room, if set, is asked before the recovery point is copied whether
	// need more bytes fit where the output goes: a recovery that cannot
	// fit fails at once, not hours later on a full disk.
	Room func(need int64) error
	// NoReplace has RecoverFile leave a file that appeared at its path
	// meanwhile alone: it fails then, keeping the recovered image in its
	// temporary file, and says where.
	NoReplace bool
	// MarkersOnly refuses a sequence number (Point) that is not a
	// marker's: between markers the disks may be in the middle of a full
	// sync, a resync or a read-back, which the agent holds markers back
	// for. A time and Latest always resolve to a marker.
	MarkersOnly bool
}

// Result describes a completed recovery.
type Result struct {
	Seq    uint64    // every record ≤ Seq, and none after, is in the output
	Time   time.Time // time of the marker at Seq; zero if Seq was given as a number and is not a point
	BaseID string    // recovery point copied before replay; empty: started from zeros
	// BaseSeq: the journal was replayed after this sequence (the point's,
	// or with zeros the last before the disk's generation began).
	BaseSeq  uint64
	Segments int   // journal segments replayed
	Size     int64 // disk size in bytes (in the generation of Seq)
}

// Recover writes disk req.Disk of machine req.Machine, as it was at
// req.Point, to to: it copies the newest recovery point at or before the
// target (only the valid page ranges of its snapshot), then replays the
// journal records after that point up to the target. Only points of the
// disk's generation at the target count: with none, the disk is rebuilt
// from zeros and the journal from the generation's start.
//
// to must read as zeros wherever Recover does not write (a new or
// truncated file): holes of the snapshot are skipped, not written. If to
// has a Truncate(int64) method (like *os.File) it is sized to the disk.
//
// Every journal segment is authenticated before any of its records is
// written: a tampered segment stops the recovery with an error wrapping
// ErrTampered that names the blob, and to then holds a partial result that
// must not be used. A wrong recovery key fails with ErrWrongRecoveryKey
// before anything is written; a point outside the retention window with
// ErrOutOfRange.
func Recover(ctx context.Context, store blobstore.Store, req Request, to io.WriterAt) (Result, error) {
	if req.Progress != nil {
		// Listing a day's journal takes a while before anything else shows.
		fmt.Fprintf(req.Progress, "reading the manifest and journal of machine %s\n", req.Machine)
	}
	st, err := loadState(ctx, store, req.Machine)
	if err != nil {
		return Result{}, err
	}
	idx := -1
	for i, d := range st.manifest.Disks {
		if d.Name == req.Disk {
			idx = i
		}
	}
	if idx < 0 {
		return Result{}, fmt.Errorf("machine %q has no disk %q (disks: %s)", req.Machine, req.Disk, strings.Join(diskNames(st.manifest), ", "))
	}
	keys, err := Keyring(ctx, store, req.Machine, req.RecoveryKey)
	if err != nil {
		return Result{}, err
	}
	keys.Warn(req.Progress)
	res, err := st.recoverDisk(ctx, store, keys, idx, req, to)
	if t, ok := to.(interface{ Truncate(int64) error }); ok && errors.Is(err, errBaseGone) {
		// Retention deleted the point while it was copied, and kept the
		// journal (another disk had no older point): planned again, once,
		// from what the account holds now, into an emptied output.
		if req.Progress != nil {
			fmt.Fprintf(req.Progress, "the recovery point was deleted while it was copied (retention): starting again from the account as it is now\n")
		}
		if err = t.Truncate(0); err == nil {
			if st, err = loadState(ctx, store, req.Machine); err == nil {
				res, err = st.recoverDisk(ctx, store, keys, idx, req, to)
			}
		}
	}
	return res, keys.Explain(err)
}

// errBaseGone: the snapshot of the point a recovery started from was
// deleted while it was copied.
var errBaseGone = errors.New("the recovery point was deleted while it was copied")

func (st *state) recoverDisk(ctx context.Context, store blobstore.Store, keys Keys, idx int, req Request, to io.WriterAt) (Result, error) {
	if err := VerifyManifest(st.manifest, keys); err != nil {
		return Result{}, err
	}
	points, err := verifyPoints(ctx, store, keys, req.Machine, st.points, req.Parallelism, req.Progress)
	if err != nil {
		return Result{}, err
	}
	st.usePoints(points)
	var res Result
	if res.Seq, res.Time, err = st.resolve(ctx, store, keys, req.Point); err != nil {
		return Result{}, err
	}
	if g, ok := st.manifest.DiskGapAt(&st.manifest.Disks[idx], res.Seq); ok {
		return Result{}, fmt.Errorf("%w: disk %q of machine %q at sequence %d: writes from sequence %d on were lost before they reached the account, and the checksum resync that repaired the other disks did not cover this one (not protected then); it is recoverable again from its next full sync; recover to sequence %d or earlier",
			ErrOutOfRange, req.Disk, req.Machine, res.Seq, g.From, g.From-1)
	}
	// Asked by time (latest: recoverable_until), the state is the disk's
	// at that time, which a disk left out by then lacks even where the
	// other disks wrote nothing since (the sequence is older).
	at := time.Time{}
	if seq, t, _ := ParsePoint(req.Point); !t.IsZero() {
		at = t
	} else if seq == 0 {
		at = st.until
	}
	if g, ok := st.manifest.Disks[idx].UnprotectedAt(res.Seq, at); ok {
		since := "nothing was recoverable yet"
		if !g.UnprotectedSince.IsZero() {
			since = "the last time vouched for while it was protected: " + g.UnprotectedSince.UTC().Format(time.RFC3339Nano)
		}
		return Result{}, fmt.Errorf("%w: disk %q of machine %q at sequence %d: from sequence %d on its agent did not list it (it stopped protecting it, or was refused before it copied it; %s), so the account does not hold its state then; recover to an earlier sequence or time, or protect it again (a full copy)",
			ErrOutOfRange, req.Disk, req.Machine, res.Seq, g.UnprotectedFrom, since)
	}
	// Before the marker check: a sequence retention took is said so, not
	// "not at a marker" (its segments are gone).
	base, from, size, err := st.start(&st.manifest.Disks[idx], res.Seq)
	if err != nil {
		return Result{}, err
	}
	if seq, t, _ := ParsePoint(req.Point); req.MarkersOnly && seq > 0 && t.IsZero() {
		if err := st.checkMarkerSeq(ctx, store, keys, seq); err != nil {
			return Result{}, err
		}
	}
	res.Size, res.BaseSeq = size, from
	if base != nil {
		res.BaseID = base.ID
		if base.Seq == res.Seq && res.Time.IsZero() {
			res.Time = base.Time
		}
	}
	if req.Progress != nil {
		from := "zeros"
		if base != nil {
			from = fmt.Sprintf("%s point at seq %d (%s)", base.Kind, base.Seq, base.Time.Format(time.RFC3339))
		}
		fmt.Fprintf(req.Progress, "recovering disk %s of machine %s (%s) to seq %d from %s\n",
			req.Disk, req.Machine, progress.Bytes(size), res.Seq, from)
	}
	if t, ok := to.(interface{ Truncate(int64) error }); ok {
		if err := t.Truncate(size); err != nil {
			return Result{}, fmt.Errorf("size output: %w", err)
		}
	}
	if base != nil {
		if err := copySnapshot(ctx, store, layout.DiskName(req.Machine, req.Disk), base.Snapshots[req.Disk], size, to, req); err != nil {
			if err = st.pruned(ctx, store, err, res.BaseSeq); blobstore.IsNotFound(err) {
				err = fmt.Errorf("%w: %w", errBaseGone, err)
			}
			return Result{}, err
		}
	}
	if res.Segments, err = replay(ctx, store, keys, st.segments, st.manifest.Gaps, uint16(idx), size, res.BaseSeq, res.Seq, to, req.Progress); err != nil {
		return Result{}, st.pruned(ctx, store, err, res.BaseSeq)
	}
	return res, nil
}

// pruned explains err, a snapshot or segment gone while a recovery
// replaying the journal after sequence from read it, when retention moved
// the machine's window past from since the recovery started (a long copy
// of an old point): ErrOutOfRange then. Anything else gone stays as it
// is said.
func (st *state) pruned(ctx context.Context, store blobstore.Store, err error, from uint64) error {
	if !blobstore.IsNotFound(err) {
		return err
	}
	man, merr := ReadManifest(ctx, store, st.manifest.Machine)
	if merr != nil || man.JournalFrom <= st.manifest.JournalFrom || man.JournalFrom <= from+1 {
		return err
	}
	return fmt.Errorf("%w: retention moved machine %q's window on while this recovery read it (the journal now starts at sequence %d): recover a newer point: %v",
		ErrOutOfRange, st.manifest.Machine, man.JournalFrom, err)
}

// start decides where recovering disk d to seq begins: the newest point
// of d's generation at seq at or before seq, or else zeros at the start
// of that generation (the replica restarted from zeros there: a point of
// an earlier generation is not a base for it). It returns the base (nil:
// zeros), the sequence the journal is replayed after, and the disk's
// size in that generation. Zeros need the journal from the generation's
// start: without it the state is gone, which is ErrOutOfRange.
func (st *state) start(d *layout.Disk, seq uint64) (*Point, uint64, int64, error) {
	gens := d.Generations()
	k := d.GenerationAt(seq)
	g := gens[k]
	first := max(g.Start, 1) // the first record zeros are replayed from
	if seq < first {
		// Before its first generation (a disk added later): a point cut
		// then holds zeros for it, not what it held.
		return nil, 0, 0, fmt.Errorf("%w: disk %q was not protected before sequence %d (nothing of it is in the account at %d)",
			ErrOutOfRange, d.Name, first, seq)
	}
	var lo uint64 // the oldest point of the generation that is a base
	if k > 0 {
		lo = g.Start
	}
	var base *Point
	for i := range st.points {
		if p := &st.points[i]; p.Seq >= lo && p.Seq <= seq && p.Snapshots[d.Name] != "" {
			base = p
		}
	}
	// Deleted by someone else than retention, the journal's start is
	// tampering, not a window that moved on.
	gone, why := ErrOutOfRange, fmt.Sprintf("retention deleted the journal before sequence %d", st.journalFrom)
	if st.startDeleted {
		gone, why = ErrTampered, fmt.Sprintf("the journal before sequence %d was deleted from the account, not by retention (no recovery point covers what it held)", st.journalFrom)
	}
	if base != nil {
		if base.Seq < seq && base.Seq+1 < st.journalFrom {
			return nil, 0, 0, fmt.Errorf("%w: disk %q at sequence %d: the newest recovery point before it is at %d, and %s",
				gone, d.Name, seq, base.Seq, why)
		}
		return base, base.Seq, int64(g.Size), nil
	}
	if st.journalFrom > first {
		return nil, 0, 0, fmt.Errorf("%w: disk %q at sequence %d: no recovery point of its generation (which started at sequence %d) at or before it, and %s, which rebuilding it from zeros needs",
			gone, d.Name, seq, first, why)
	}
	return nil, first - 1, int64(g.Size), nil
}

// RecoverFile is Recover into a regular file at path, created with mode
// 0600 or replaced. It writes a new temporary file beside path (never one
// that exists: a symlink planted there is not followed) and renames it
// into place only once the recovery succeeded and is synced, so path
// never holds a partial or unverified disk.
func RecoverFile(ctx context.Context, store blobstore.Store, req Request, path string) (Result, error) {
	if fi, err := os.Stat(path); err == nil && !fi.Mode().IsRegular() {
		return Result{}, fmt.Errorf("%s is not a regular file: recovery writes disk images to files", path)
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".partial-*")
	if err != nil {
		return Result{}, fmt.Errorf("create output: %w", err)
	}
	tmp := f.Name()
	if req.Room == nil {
		req.Room = func(need int64) error { return roomIn(dir, need) }
	}
	res, err := Recover(ctx, store, req, f)
	if err == nil {
		if req.Progress != nil {
			// It may take a while, uninterruptible: say what it waits for.
			fmt.Fprintf(req.Progress, "syncing %s\n", tmp)
		}
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err == nil && req.NoReplace {
		// Whatever stops it, the recovered disk is complete: kept.
		if err = renameNoReplace(tmp, path); errors.Is(err, fs.ErrExist) {
			return Result{}, fmt.Errorf("%s appeared while the disk was recovered, and is left as it is: the recovered disk is in %s", path, tmp)
		} else if err != nil {
			return Result{}, fmt.Errorf("%w: the recovered disk is in %s", err, tmp)
		}
	} else if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		for _, full := range []error{unix.ENOSPC, unix.EDQUOT} {
			if errors.Is(err, full) {
				// The check before the copy counts the recovery point
				// alone: the journal replayed after it may need more.
				// (The error names the partial file, removed now.)
				return Result{}, fmt.Errorf("no room for the recovered disk in %s (%w): nothing was left there; free some space or recover elsewhere", dir, full)
			}
		}
		return Result{}, err
	}
	// The rename is durable with its directory.
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return Result{}, fmt.Errorf("sync %s: %w (the recovered disk is at %s, but a crash now could undo its rename)", dir, err, path)
		}
	}
	return res, nil
}

// resolve turns a point argument into a target sequence and, when known,
// the time of that point.
func (st *state) resolve(ctx context.Context, store blobstore.Store, keys seal.Keyring, point string) (uint64, time.Time, error) {
	seq, t, err := st.resolvePoint(ctx, store, keys, point)
	if err != nil {
		return 0, time.Time{}, err
	}
	if g, ok := st.manifest.GapAt(seq); ok {
		why := "its checksum resync has not completed yet"
		if !g.Open() {
			why = fmt.Sprintf("its checksum resync made the disks whole again at sequence %d", g.Mended)
		}
		return 0, time.Time{}, fmt.Errorf("%w: sequence %d of machine %q is in a journal gap: writes from sequence %d on were acknowledged to the agent but lost before they reached the account, and %s; recover to sequence %d or earlier",
			ErrOutOfRange, seq, st.manifest.Machine, g.From, why, g.From-1)
	}
	return seq, t, nil
}

// ParsePoint checks the syntax of a point (Latest, a sequence number or an
// RFC 3339 time) and returns its sequence number or time, whichever it
// names (both zero for Latest), without reading the account.
func ParsePoint(point string) (uint64, time.Time, error) {
	switch {
	case point == "" || point == Latest:
		return 0, time.Time{}, nil
	case point[0] >= '0' && point[0] <= '9' && !strings.ContainsAny(point, "-:T"):
		seq, err := strconv.ParseUint(point, 10, 64)
		if err != nil {
			return 0, time.Time{}, fmt.Errorf("point %q: not a sequence number: %w", point, err)
		}
		return seq, time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, point)
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("point %q: want %q, a sequence number or an RFC 3339 time (e.g. 2025-01-02T15:04:05Z)", point, Latest)
	}
	return 0, t, nil
}

// resolvePoint is resolve without the gap check.
func (st *state) resolvePoint(ctx context.Context, store blobstore.Store, keys seal.Keyring, point string) (uint64, time.Time, error) {
	machine := st.manifest.Machine
	seq, t, err := ParsePoint(point)
	switch {
	case err != nil:
		return 0, time.Time{}, err
	case point == "" || point == Latest:
		if err := st.checkEnd(); err != nil {
			return 0, time.Time{}, err
		}
		if st.latest == 0 {
			return 0, time.Time{}, fmt.Errorf("%w: machine %q has nothing durable in the account yet", ErrOutOfRange, machine)
		}
		// The newest consistent state is the last marker the account
		// holds (recoverable_until), not durable_seq: the records after
		// it may be a sync or resync under way, which the agent holds
		// markers back for (a half-copied disk is no point in time).
		if st.until.IsZero() {
			return 0, time.Time{}, fmt.Errorf("%w: machine %q has no consistent point in the account yet (its initial sync has not completed)", ErrOutOfRange, machine)
		}
		seq, at, err := st.resolveTime(ctx, store, keys, st.until)
		if err != nil {
			return 0, time.Time{}, err
		}
		// recoverable_until is sealed and is a marker's time: the marker
		// found should be that one, or the idle period's the manifest
		// names. Otherwise the segments after it that metadata said
		// hold no marker are opened: metadata cleared (no key needed)
		// would else steer latest back to an older state.
		if !at.Equal(st.until) && (st.manifest.IdleSeq == 0 || seq != st.manifest.IdleSeq) {
			if err := st.checkUndated(ctx, store, keys, seq); err != nil {
				return 0, time.Time{}, err
			}
		}
		return seq, at, nil
	case t.IsZero():
		if seq > st.latest {
			return 0, time.Time{}, fmt.Errorf("%w: sequence %d is beyond the newest durable sequence %d of machine %q", ErrOutOfRange, seq, st.latest, machine)
		}
		return seq, st.timeOf(seq), nil
	}
	if err := st.checkEnd(); err != nil {
		return 0, time.Time{}, err
	}
	return st.resolveTime(ctx, store, keys, t)
}

// timeOf returns the time of the point at seq, if there is one.
func (st *state) timeOf(seq uint64) time.Time {
	for _, p := range st.points {
		if p.Seq == seq {
			return p.Time
		}
	}
	return time.Time{}
}

// earliestTime is the oldest time that can be recovered, for messages.
func (st *state) earliestTime() time.Time {
	if st.journalFrom > 1 && len(st.points) > 0 {
		return st.points[0].Time
	}
	var t time.Time
	for _, s := range st.segments {
		if !s.FirstTime.IsZero() {
			t = s.FirstTime
			break
		}
	}
	if len(st.points) > 0 && (t.IsZero() || st.points[0].Time.Before(t)) {
		t = st.points[0].Time
	}
	return t
}

// resolveTime finds the last marker (journal marker or recovery point)
// with a time at or before t.
func (st *state) resolveTime(ctx context.Context, store blobstore.Store, keys seal.Keyring, t time.Time) (uint64, time.Time, error) {
	machine := st.manifest.Machine
	if st.until.IsZero() {
		return 0, time.Time{}, fmt.Errorf("%w: machine %q has no consistent point in the account yet (its initial sync has not completed)", ErrOutOfRange, machine)
	}
	if t.After(st.until) {
		return 0, time.Time{}, fmt.Errorf("%w: %s is after machine %q's recoverable_until %s: the account holds nothing newer (use %q or an earlier time)",
			ErrOutOfRange, t.UTC().Format(time.RFC3339Nano), machine, st.until.Format(time.RFC3339Nano), Latest)
	}
	var (
		seq   uint64
		at    time.Time
		found bool
	)
	for _, p := range st.points {
		if !p.Time.After(t) {
			seq, at, found = p.Seq, p.Time, true
		}
	}
	// Marker times increase with sequence, so the newest segment whose
	// first marker is not after t holds the last marker at or before t.
	// Segment metadata is not authenticated: it only picks the segment to
	// open, which must agree with it (checkMarkerTimes).
	var (
		dec   Decoder
		later []uint64 // sequences of the scanned segment's markers after t
	)
	for i := len(st.segments) - 1; i >= 0; i-- {
		s := st.segments[i]
		if s.FirstTime.IsZero() || s.FirstTime.After(t) {
			continue
		}
		if found && s.Last <= seq {
			break
		}
		recs, err := st.records(ctx, store, keys, s, &dec)
		if err != nil {
			return 0, time.Time{}, err
		}
		if err := checkMarkerTimes(s, recs); err != nil {
			return 0, time.Time{}, err
		}
		for j := range recs {
			if r := &recs[j]; r.Dates() {
				if m := r.Marker(); m.UnixNano <= t.UnixNano() && (!found || m.Seq >= seq) {
					seq, at, found = m.Seq, time.Unix(0, m.UnixNano).UTC(), true
				}
			}
		}
		for j := range recs {
			if r := &recs[j]; r.Dates() && r.Marker().UnixNano > t.UnixNano() {
				later = append(later, r.Seq)
			}
		}
		break
	}
	// Inside the current idle period the journal has no marker yet; the
	// manifest knows the seq that the period's first marker covers.
	if mf := st.manifest; mf.IdleSeq > 0 && mf.IdleSeq <= st.latest && !t.Before(mf.IdleSince) && (!found || mf.IdleSeq > seq) {
		seq, at, found = mf.IdleSeq, mf.IdleSince, true
	}
	if !found {
		return 0, time.Time{}, fmt.Errorf("%w: %s is before machine %q's oldest recoverable time %s",
			ErrOutOfRange, t.UTC().Format(time.RFC3339Nano), machine, st.earliestTime().Format(time.RFC3339Nano))
	}
	if t.After(at) {
		// A gap starting after the marker found, before any later marker
		// the account knows, may have lost markers at or before t: the
		// disk at t may hold writes the journal lost.
		for _, g := range st.manifest.Gaps {
			if g.From > seq && !st.before(g, seq, t, later) {
				return 0, time.Time{}, fmt.Errorf("%w: %s falls where machine %q's journal has a gap: writes from sequence %d on were acknowledged to the agent but lost before they reached the account, with whatever markers they held, so the disk at that time is not known; recover to %s (sequence %d) or earlier, or to a time after the gap",
					ErrOutOfRange, t.UTC().Format(time.RFC3339Nano), machine, g.From, at.Format(time.RFC3339Nano), seq)
			}
		}
	}
	return seq, at, nil
}

// before reports whether the account shows that time t, resolved to the
// marker at seq, came before gap g's lost records: a marker from seq on
// and before the gap (g.From) is at or after t (a point; one of the
// scanned segment's, later, the same seq after an idle time included;
// one of a segment wholly between seq and the gap, whose metadata says
// it holds one), or the gap is open and its machine was idle at seq up
// to recoverable_until, which stays, while the gap is, at or after t.
// (A marker before seq proves nothing: an agent's clock may step back.)
func (st *state) before(g layout.Gap, seq uint64, t time.Time, later []uint64) bool {
	mf := st.manifest
	if g.Open() && mf.IdleSeq >= seq && mf.IdleSeq < g.From && !t.After(mf.RecoverableUntil) {
		return true
	}
	for _, s := range later {
		if s >= seq && s < g.From {
			return true
		}
	}
	for _, p := range st.points {
		if p.Seq >= seq && p.Seq < g.From && !p.Time.Before(t) {
			return true
		}
	}
	for _, s := range st.segments {
		if s.First > seq && s.Last < g.From && !s.FirstTime.IsZero() {
			return true
		}
	}
	return false
}

// checkMarkerSeq refuses seq unless a consistency marker is at it: a
// point's, the idle period's, or a journal marker's, found in the
// segment holding record seq or at the head of the next (a marker that
// came when nothing was pending). The error names the nearest marker
// before it that those segments, the one before them or the points
// show.
func (st *state) checkMarkerSeq(ctx context.Context, store blobstore.Store, keys seal.Keyring, seq uint64) error {
	var before uint64
	for _, p := range st.points {
		if p.Seq == seq {
			return nil
		}
		if p.Seq < seq {
			before = max(before, p.Seq)
		}
	}
	if st.manifest.IdleSeq == seq {
		return nil
	}
	// The segments holding seq, the one before them (for the marker
	// before it) and the first one after, however far past seq it
	// starts: after a jump of the sequence (an agent restarting on its
	// lease) the marker dating seq heads the segment named from the
	// jumped sequence.
	lo, hi := -1, len(st.segments)
	for i, s := range st.segments {
		if s.Last < seq {
			lo = i
		}
		if s.First > seq && hi == len(st.segments) {
			hi = i
		}
	}
	var dec Decoder
	for i, s := range st.segments {
		// Metadata says which hold markers: a false "none" only refuses.
		if i < lo || i > hi || s.FirstTime.IsZero() {
			continue
		}
		recs, err := st.records(ctx, store, keys, s, &dec)
		if err != nil {
			return err
		}
		for i := range recs {
			if r := &recs[i]; r.Dates() {
				switch m := r.Marker(); {
				case m.Seq == seq:
					return nil
				case m.Seq < seq:
					before = max(before, m.Seq)
				}
			}
		}
	}
	near := ""
	if before > 0 {
		near = fmt.Sprintf(" (the nearest before it: %d)", before)
	}
	return fmt.Errorf("%w: sequence %d of machine %q is not at a consistency marker: between markers the disks may be in the middle of a full sync, a resync or a read-back; recover to a marker's sequence%s, a point's (lifeboat points) or a time, or take the sequence as given (--any-sequence)",
		ErrOutOfRange, seq, st.manifest.Machine, near)
}

// records reads and decodes segment s (with dec, whose records it
// returns); one retention deleted meanwhile is said so (pruned).
func (st *state) records(ctx context.Context, store blobstore.Store, keys seal.Keyring, s Segment, dec *Decoder) ([]wire.Record, error) {
	plain, err := ReadSegment(ctx, store, s.Name, keys, nil)
	if err != nil {
		return nil, st.pruned(ctx, store, err, s.First-1)
	}
	recs, err := dec.Decode(plain)
	if err != nil {
		return nil, fmt.Errorf("journal segment %s: %w", s.Name, err)
	}
	return recs, nil
}

// checkUndated opens the segments past seq whose metadata says they hold
// no marker, and refuses one that does (checkMarkerTimes).
func (st *state) checkUndated(ctx context.Context, store blobstore.Store, keys seal.Keyring, seq uint64) error {
	var dec Decoder
	for _, s := range st.segments {
		if s.Last <= seq || !s.FirstTime.IsZero() {
			continue
		}
		recs, err := st.records(ctx, store, keys, s, &dec)
		if err != nil {
			return err
		}
		if err := checkMarkerTimes(s, recs); err != nil {
			return err
		}
	}
	return nil
}

// checkMarkerTimes refuses a segment whose metadata first_time and
// last_time disagree with the markers sealed inside it (see resolveTime).
// The process server writes first_time as its first marker's time and
// last_time as the latest of all its markers' (idle markers it dropped
// from the content included).
func checkMarkerTimes(s Segment, recs []wire.Record) error {
	var first, last int64
	for i := range recs {
		if recs[i].Dates() {
			n := recs[i].Marker().UnixNano
			if first == 0 {
				first = n
			}
			last = max(last, n)
		}
	}
	if first != nanos(s.FirstTime) || last > nanos(s.LastTime) {
		return fmt.Errorf("journal segment %s %w: its metadata says its markers run from %s to %s, its sealed content from %s to %s; recover to a sequence number from `lifeboat points` to go without its times",
			s.Name, ErrTampered, timeString(nanos(s.FirstTime)), timeString(nanos(s.LastTime)), timeString(first), timeString(last))
	}
	return nil
}

func nanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func timeString(n int64) string {
	if n == 0 {
		return "none"
	}
	return time.Unix(0, n).UTC().Format(time.RFC3339Nano)
}

// copySnapshot copies the valid page ranges of a snapshot to to, at most
// MaxPutPage bytes per read, req.Parallelism reads at a time.
func copySnapshot(ctx context.Context, store blobstore.Store, blob, snapshot string, size int64, to io.WriterAt, req Request) error {
	ranges, err := store.GetPageRanges(ctx, blob, snapshot, 0, 0)
	if err != nil {
		return fmt.Errorf("page ranges of %s snapshot %s: %w", blob, snapshot, err)
	}
	var chunks []blobstore.PageRange
	var total int64
	for _, r := range ranges {
		for off := r.Offset; off < r.End(); off += blobstore.MaxPutPage {
			chunks = append(chunks, blobstore.PageRange{Offset: off, Length: min(blobstore.MaxPutPage, r.End()-off)})
		}
		total += r.Length
	}
	if req.Room != nil {
		if err := req.Room(total); err != nil {
			return err
		}
	}
	var bar *progress.Bar
	if req.Progress != nil {
		bar = progress.New(req.Progress, "copy recovery point", total)
		defer bar.Done()
	}
	bufs := sync.Pool{New: func() any { b := make([]byte, blobstore.MaxPutPage); return &b }}
	return parallel(ctx, req.Parallelism, len(chunks), func(ctx context.Context, i int) error {
		c := chunks[i]
		bp := bufs.Get().(*[]byte)
		defer bufs.Put(bp)
		buf := (*bp)[:c.Length]
		if err := store.ReadPages(ctx, blob, snapshot, c.Offset, buf); err != nil {
			return fmt.Errorf("read %s snapshot %s at %d: %w", blob, snapshot, c.Offset, err)
		}
		// The page blob is rounded up to whole pages; the disk may not be.
		if end := c.Offset + c.Length; end > size {
			buf = buf[:max(size-c.Offset, 0)]
		}
		if _, err := to.WriteAt(buf, c.Offset); err != nil {
			return fmt.Errorf("write output at %d: %w", c.Offset, err)
		}
		if bar != nil {
			bar.Add(c.Length)
		}
		return nil
	})
}

// replay applies the records of disk idx with from < seq ≤ to, verifying
// each segment before writing any of its records.
func replay(ctx context.Context, store blobstore.Store, keys seal.Keyring, segs []Segment, gaps []layout.Gap, idx uint16, size int64,
	from, target uint64, to io.WriterAt, w io.Writer) (int, error) {
	if target <= from {
		return 0, nil
	}
	var todo []Segment
	var total int64
	for _, s := range segs {
		if s.Last > from && s.First <= target {
			todo = append(todo, s)
			total += s.Size
		}
	}
	if len(todo) == 0 || todo[len(todo)-1].Last < target {
		// The target may lie in a jump of the sequence (an agent
		// restarting on its lease): the next segment's authenticated
		// predecessor then shows nothing is missing before it (checked
		// below; none of its records is applied).
		i := slices.IndexFunc(segs, func(s Segment) bool { return s.First > target })
		if i < 0 {
			end := from
			if len(todo) > 0 {
				end = todo[len(todo)-1].Last
			}
			// The sealed manifest vouches for the journal up to
			// durable_seq (targets never pass it): its end missing is a
			// deletion.
			return 0, fmt.Errorf("journal is incomplete: it ends at sequence %d, before the target %d, which the manifest says the account holds (segments deleted from the account?): %w", end, target, ErrTampered)
		}
		todo = append(todo, segs[i])
	}
	var bar *progress.Bar
	if w != nil {
		bar = progress.New(w, "replay journal", total)
		defer bar.Done()
	}
	var (
		dec   Decoder
		plain []byte
		done  = from
		// chain: the journal is known complete up to here; a segment
		// whose header names a later predecessor follows a missing one.
		chain = from
		stale = StaleFilter{Gaps: gaps}
	)
	for _, s := range todo {
		var err error
		if plain, err = ReadSegment(ctx, store, s.Name, keys, plain[:0]); err != nil {
			if errors.Is(err, ErrTampered) {
				err = fmt.Errorf("%w; a state before sequence %d does not need it: recover to a time, or a point's sequence (lifeboat points), before that", err, s.First)
			}
			return 0, err
		}
		recs, err := dec.Decode(plain)
		if err != nil {
			return 0, fmt.Errorf("journal segment %s: %w", s.Name, err)
		}
		if prev, ok := dec.Prev(); stale.Skip(s.Last, recs, prev, ok, chain) {
			if w != nil {
				fmt.Fprintf(w, "skipping journal segment %s: it continues a history the journal gave up (a process server that no longer served the machine wrote it), or follows a missing segment\n", s.Name)
			}
			continue
		}
		if prev, ok := dec.Prev(); ok && prev > chain {
			return 0, fmt.Errorf("journal segment %s %w: it follows a segment ending at sequence %d, which is missing from the account (the journal holds nothing between %d and %d); a state up to sequence %d does not need it: recover to a time, or a point's sequence (lifeboat points), before that",
				s.Name, ErrTampered, prev, chain, s.First, chain)
		}
		chain = max(chain, s.Last)
		for i := range recs {
			r := &recs[i]
			if r.Seq <= done || r.Op == wire.OpMarker {
				continue
			}
			if r.Seq > target {
				break
			}
			done = r.Seq
			if r.Disk != idx {
				continue
			}
			if end := r.Offset + uint64(r.Length); end > uint64(size) {
				return 0, fmt.Errorf("journal segment %s: record %d: %s of [%d, %d) beyond the disk size %d", s.Name, r.Seq, r.Op, r.Offset, end, size)
			}
			if r.Op == wire.OpWrite {
				_, err = to.WriteAt(r.Data, int64(r.Offset))
			} else {
				err = zeroRange(to, int64(r.Offset), int64(r.Length))
			}
			if err != nil {
				return 0, fmt.Errorf("write output at %d: %w", r.Offset, err)
			}
		}
		if bar != nil {
			bar.Add(s.Size)
		}
	}
	if chain < target {
		// Only a skipped segment reached it: what holds its records is
		// missing.
		return 0, fmt.Errorf("journal is incomplete: the segments chained from sequence %d end at %d, before the target %d (a deleted segment or tombstone?): %w", from, chain, target, ErrTampered)
	}
	return len(todo), nil
}

var zeros [64 << 10]byte

// zeroRange makes [off, off+n) of to read as zeros: a punched hole for a
// file (keeps the output sparse), written zeros otherwise.
func zeroRange(to io.WriterAt, off, n int64) error {
	if f, ok := to.(*os.File); ok {
		err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
	}
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if _, err := to.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// parallel calls fn(ctx, i) for i in [0, n) with at most workers calls at
// a time (default 4). The first error cancels the rest and is returned.
func parallel(ctx context.Context, workers, n int, fn func(ctx context.Context, i int) error) error {
	if workers <= 0 {
		workers = 4
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		wg   sync.WaitGroup
		next = make(chan int)
	)
	for range min(workers, n) {
		wg.Go(func() {
			for i := range next {
				if err := fn(ctx, i); err != nil {
					cancel(err)
				}
			}
		})
	}
	for i := 0; i < n && ctx.Err() == nil; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
		}
	}
	close(next)
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return ctx.Err()
}

// renameNoReplace renames from to to unless to exists (fs.ErrExist
// then): atomically where the file system can, else by a hard link.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	// Not supported here (a network or FUSE file system, a seccomp
	// profile that predates the call): a hard link.
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EPERM) {
		if err != nil {
			return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
		}
		return nil
	}
	if err := os.Link(from, to); err != nil {
		return err
	}
	os.Remove(from) // in place already: a leftover name at worst
	return nil
}

// roomIn fails unless the file system of dir has need bytes free (the
// output is sparse: need is what the recovery point holds).
func roomIn(dir string, need int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return nil // unknown: the writes will tell
	}
	if free := int64(st.Bavail) * blockdev.StatfsUnit(&st); free < need {
		return fmt.Errorf("%s has %s free; the recovery point alone needs %s: free some space or recover elsewhere", dir, progress.Bytes(free), progress.Bytes(need))
	}
	return nil
}
