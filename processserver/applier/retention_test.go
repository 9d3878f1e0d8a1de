package applier_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
)

// agedPoints cuts an app point in one segment per age (hours before
// start, by the applier's clock), the agent's clock skew behind it, and
// returns the app markers, with now left at start.
func agedPoints(t *testing.T, m *recoverytest.Machine, a *applier.Applier, now *time.Time, start time.Time, skew time.Duration, ages ...time.Duration) []wire.Marker {
	t.Helper()
	rng := rand.New(rand.NewPCG(5, 6))
	c := &clock{}
	var apps []wire.Marker
	for _, age := range ages {
		*now = start.Add(-age * time.Hour)
		c.t = now.Add(skew)
		workload(m, rng, c, 25)
		apps = append(apps, m.Marker(wire.MarkerAppConsistent, c.next()))
		workload(m, rng, c, 5)
		m.Cut()
		if _, err := a.Apply(ctxT(t), m.Name); err != nil {
			t.Fatal(err)
		}
	}
	*now = start
	return apps
}

func pointSeqs(t *testing.T, m *recoverytest.Machine, disk string) []uint64 {
	t.Helper()
	snaps, err := m.Store.ListSnapshots(ctxT(t), layout.DiskName(m.Name, disk))
	if err != nil {
		t.Fatal(err)
	}
	var seqs []uint64
	for _, s := range snaps {
		var seq uint64
		fmt.Sscan(s.Metadata[layout.MetaSeq], &seq)
		seqs = append(seqs, seq)
	}
	return seqs
}

func segmentCount(t *testing.T, m *recoverytest.Machine) int {
	t.Helper()
	segs, err := recovery.ListSegments(ctxT(t), m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	return len(segs)
}

// testRetentionAgentClock: the agent's clock is two days behind. Points
// cut an hour ago are an hour old, whatever their marker time says:
// retention keeps every one of them and the journal.
func testRetentionAgentClock(t *testing.T, store blobstore.Store) {
	m := recoverytest.New(t, store, "skew", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	agedPoints(t, m, a, &now, start, -48*time.Hour, 3, 2, 1)
	if _, err := a.Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	if seqs := pointSeqs(t, m, "d0"); len(seqs) != 3 {
		t.Fatalf("points %v left of 3 cut within the last 3 hours (agent clock 48 h behind)", seqs)
	}
	if n := segmentCount(t, m); n != 3 {
		t.Fatalf("%d segments left of 3", n)
	}
}

// testRetentionClockAhead: the process server's clock steps a year
// ahead of the storage service's. Aged by it, every point but the newest
// and the base would go; the service's time of the newest point bounds
// the ages, and the points of the last hours stay.
func testRetentionClockAhead(t *testing.T, store blobstore.Store) {
	m := recoverytest.New(t, store, "ahead", 1<<20)
	var now time.Time
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	agedPoints(t, m, a, &now, time.Now(), 0, 0, 0, 0) // points now, by both clocks
	before := pointSeqs(t, m, "d0")
	now = time.Now().Add(365 * 24 * time.Hour)
	if _, err := a.Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	if seqs := pointSeqs(t, m, "d0"); len(before) < 3 || len(seqs) != len(before) {
		t.Fatalf("points %v left of %v cut just now (the applier's clock a year ahead)", seqs, before)
	}
}

// testRetentionDiskWithoutPoints: disk d0 has no recovery points left (its
// snapshots were deleted). Retention still prunes the old points of d1,
// and keeps the whole journal, from which d0 is rebuilt.
func testRetentionDiskWithoutPoints(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	m := recoverytest.New(t, store, "nopts", 1<<20, 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: -1, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	apps := agedPoints(t, m, a, &now, start, 0, 30, 26, 2, 1)
	snaps, err := store.ListSnapshots(ctx, layout.DiskName(m.Name, "d0"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		if err := store.DeleteSnapshot(ctx, layout.DiskName(m.Name, "d0"), s.ID); err != nil {
			t.Fatal(err)
		}
	}
	a = newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if seqs := pointSeqs(t, m, "d1"); len(seqs) != 3 || seqs[0] != apps[1].Seq {
		t.Fatalf("d1 points %v, want the 30 h old one pruned (%d, %d, %d left)", seqs, apps[1].Seq, apps[2].Seq, apps[3].Seq)
	}
	if n := segmentCount(t, m); n != 4 {
		t.Fatalf("%d segments left of 4: d0 has no point to start from", n)
	}
	recoverAndCheck(t, m, 0, "latest", m.Latest())
	recoverAndCheck(t, m, 0, fmt.Sprint(apps[0].Seq), apps[0].Seq)
}

// testRecoverPrunedJournal: retention deleted the journal before the
// window's base point, then d0 lost its points. Rebuilding d0 from zeros
// over what is left of the journal would be wrong: recovery refuses,
// whether retention recorded journal_from or not; d1 still recovers.
func testRecoverPrunedJournal(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	m := recoverytest.New(t, store, "pruned", 1<<20, 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	apps := agedPoints(t, m, a, &now, start, 0, 30, 26, 2, 1)
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if n := segmentCount(t, m); n != 3 {
		t.Fatalf("%d segments left, want the first pruned", n)
	}
	// The pruned point's sealed record went with it; the others stay.
	for i, app := range apps {
		_, err := store.Stat(ctx, layout.PointRecordName(m.Name, recovery.PointID(app.Seq), recovery.KindApp))
		if gone := blobstore.IsNotFound(err); gone != (i == 0) || err != nil && !gone {
			t.Fatalf("record of point %d (seq %d) after retention: %v", i, app.Seq, err)
		}
	}
	snaps, err := store.ListSnapshots(ctx, layout.DiskName(m.Name, "d0"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		if err := store.DeleteSnapshot(ctx, layout.DiskName(m.Name, "d0"), s.ID); err != nil {
			t.Fatal(err)
		}
	}
	check := func() {
		t.Helper()
		for _, p := range []string{"latest", fmt.Sprint(apps[2].Seq)} {
			_, err := recovery.Recover(ctx, store, recovery.Request{Machine: m.Name, Disk: "d0", Point: p, RecoveryKey: m.RecoveryKey}, discard{})
			if !errors.Is(err, recovery.ErrOutOfRange) {
				t.Fatalf("recover d0 %s from zeros over a pruned journal: %v, want ErrOutOfRange", p, err)
			}
			t.Logf("recover d0 %s: %v", p, err)
		}
		recoverAndCheck(t, m, 1, "latest", m.Latest())
		recoverAndCheck(t, m, 1, fmt.Sprint(apps[1].Seq+3), apps[1].Seq+3)
	}
	check()
	// A manifest from before journal_from: the first segment tells.
	m.EditManifest(func(man *layout.Manifest) { man.JournalFrom = 0 })
	check()
}

// A point that a gap recorded after it was cut covers is refused by
// recovery, so retention must not keep it as the window's base (and
// delete the older base and the journal after it): the base is the
// newest usable point older than the window, and the gap's point goes.
func TestRetentionBaseSkipsPointInGap(t *testing.T) {
	m := recoverytest.New(t, mem.New(), "gapbase", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: -1, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	apps := agedPoints(t, m, a, &now, start, 0, 30, 26, 2, 1)
	m.Gaps = []layout.Gap{{From: apps[1].Seq, LostTo: apps[1].Seq + 1, Mended: apps[1].Seq + 2}}
	m.WriteManifest()
	a = newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	if _, err := a.Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	if seqs := pointSeqs(t, m, "d0"); !slices.Equal(seqs, []uint64{apps[0].Seq, apps[2].Seq, apps[3].Seq}) {
		t.Fatalf("points %v, want %d (the base), %d and %d: not the one in the gap (%d)", seqs, apps[0].Seq, apps[2].Seq, apps[3].Seq, apps[1].Seq)
	}
	if n := segmentCount(t, m); n != 4 {
		t.Fatalf("%d segments left of 4: the base's journal was pruned", n)
	}
	// Just inside the window, past the mended gap.
	after := apps[1].Seq + 3
	recoverAndCheck(t, m, 0, fmt.Sprint(after), after)
}

// An agent restarting on its saved lease numbers past its last run: the
// journal jumps. Retention records journal_from after the base point;
// when the first segment kept starts past it (the jump), nothing is
// missing, and the window recovers.
func TestRetentionAcrossSequenceJump(t *testing.T) {
	ctx := ctxT(t)
	m := recoverytest.New(t, mem.New(), "jump", 1<<20)
	rng := rand.New(rand.NewPCG(71, 72))
	c := &clock{t: time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	workload(m, rng, c, 20)
	base := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")
	jumped := m.Seq() + 1000
	m.SkipTo(jumped) // the agent restarted
	workload(m, rng, c, 20)
	m.Marker(wire.MarkerAppConsistent, c.next())
	workload(m, rng, c, 5)
	m.Cut()
	applyAll(t, ctx, a, m, "")
	// What retention does with base as the window's base: the journal up
	// to it goes, journal_from records where the kept one starts.
	segs, err := recovery.ListSegments(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range segs {
		if s.Last <= base.Seq {
			if err := m.Store.DeleteBlob(ctx, s.Name); err != nil {
				t.Fatal(err)
			}
		}
	}
	m.EditManifest(func(man *layout.Manifest) { man.JournalFrom = base.Seq + 1 })
	// Between the base and the next point: the base plus the journal
	// from the jump; and inside the jump, where nothing was written.
	recoverAndCheck(t, m, 0, fmt.Sprint(jumped+5), jumped+5)
	recoverAndCheck(t, m, 0, fmt.Sprint(jumped-10), jumped-10)
	recoverAndCheck(t, m, 0, "latest", m.Latest())
}

// deleteThenNotFound deletes and then answers "not found", as the SDK
// does when its own retry follows a delete whose reply was lost.
type deleteThenNotFound struct{ blobstore.Store }

func (s deleteThenNotFound) DeleteSnapshot(ctx context.Context, name, snapshot string) error {
	if err := s.Store.DeleteSnapshot(ctx, name, snapshot); err != nil {
		return err
	}
	return fmt.Errorf("retried delete of %s: %w", name, blobstore.ErrNotFound)
}

func (s deleteThenNotFound) DeleteBlob(ctx context.Context, name string) error {
	if err := s.Store.DeleteBlob(ctx, name); err != nil {
		return err
	}
	return fmt.Errorf("retried delete of %s: %w", name, blobstore.ErrNotFound)
}

// A point or segment already gone is pruned: retention used to fail the
// pass on the "not found" of a delete the service had done.
func TestRetentionDeleteAlreadyDone(t *testing.T) {
	m := recoverytest.New(t, mem.New(), "gone", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: -1, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	agedPoints(t, m, a, &now, start, 0, 30, 26, 2, 1)
	m.Store = deleteThenNotFound{m.Store}
	a = newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	if _, err := a.Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	if seqs := pointSeqs(t, m, "d0"); len(seqs) != 3 {
		t.Fatalf("points %v, want the 30 h old one pruned", seqs)
	}
	if n := segmentCount(t, m); n != 3 {
		t.Fatalf("%d segments left, want the first pruned", n)
	}
}

// A recovery whose recovery point does not fit where it goes fails before
// it writes, not hours later on a full disk.
func TestRecoverRefusedWithoutRoom(t *testing.T) {
	m := recoverytest.New(t, mem.New(), "room", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: -1, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	agedPoints(t, m, a, &now, start, 0, 1)
	var asked int64
	full := errors.New("no room")
	_, err := recovery.Recover(ctxT(t), m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey,
		Room: func(need int64) error { asked = need; return full }}, failWriter{t})
	if !errors.Is(err, full) || asked <= 0 {
		t.Fatalf("recover with no room: %v (asked for %d bytes), want the refusal", err, asked)
	}
}

// failWriter fails the test if written to.
type failWriter struct{ t *testing.T }

func (w failWriter) WriteAt(p []byte, off int64) (int, error) {
	w.t.Errorf("%d bytes written at %d", len(p), off)
	return len(p), nil
}

// A disk a gap's mending left out holds nothing recoverable in the window
// from the gap until its full sync (if it comes back: no longer
// protected, it never does) once the window starts past the gap: its
// points before the gap must not pin the journal nor keep the other
// disks' point records, and it must not stop the other disks' points.
func TestRetentionReleasesLeftOutDisk(t *testing.T) {
	for _, back := range []bool{false, true} {
		t.Run(fmt.Sprint("back=", back), func(t *testing.T) { releasesLeftOutDisk(t, back) })
	}
}

func releasesLeftOutDisk(t *testing.T, back bool) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(61, 62))
	m := recoverytest.New(t, mem.New(), "leftout", 1<<20, 512<<10)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	now := start.Add(-48 * time.Hour)
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	c := &clock{t: now}
	point := func(at time.Time) wire.Marker {
		now, c.t = at, at
		m.Write(0, uint64(rng.IntN(200))*4096, random(rng, 4096))
		mk := m.Marker(wire.MarkerAppConsistent, c.next())
		m.Cut()
		if _, err := a.Apply(ctx, m.Name); err != nil {
			t.Fatal(err)
		}
		return mk
	}
	m.Write(1, 0, random(rng, 64<<10))
	first := point(start.Add(-48 * time.Hour))

	// d1 leaves protection; a gap, mended without it.
	now = start.Add(-40 * time.Hour)
	leaveOut(m, rng, "d1")
	point(start.Add(-40 * time.Hour))
	base := point(start.Add(-30 * time.Hour))
	if back {
		// Its full sync, inside the window.
		now = start.Add(-20 * time.Hour)
		m.NewGeneration(1, 0)
		m.Gaps[0].Unmended[0].Until = m.Disks[1].GenerationStart
		m.WriteManifest()
		m.Write(1, 0, random(rng, 512<<10))
		point(now)
	}
	inside := point(start.Add(-2 * time.Hour))
	point(start)

	if seqs := pointSeqs(t, m, "d0"); !slices.Contains(seqs, inside.Seq) {
		t.Fatalf("d0 points %v: none at %d, cut while d1 was left out", seqs, inside.Seq)
	}
	segs, err := recovery.ListSegments(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if len(segs) == 0 || segs[0].First <= base.Seq {
		t.Fatalf("journal from segment %+v: the segments before the window's base at %d (d1's last point before its gap is at %d) were kept", segs[0], base.Seq, first.Seq)
	}
	recorded, err := recovery.ListPointRecords(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	for seq := range recorded {
		if seq < base.Seq {
			t.Errorf("the record of the point at %d, before the window's base at %d, was kept", seq, base.Seq)
		}
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(inside.Seq), inside.Seq)
	recoverAndCheck(t, m, 0, "latest", m.Latest())
	if back {
		recoverAndCheck(t, m, 1, "latest", m.Latest())
	}
}

// A machine whose manifest lists no disk yet (a hello that failed after
// the data key was stored) is applied, and pruned, without a fault.
func TestRetentionMachineWithoutDisks(t *testing.T) {
	m := recoverytest.New(t, mem.New(), "nodisks")
	before, err := recovery.ReadManifest(ctxT(t), m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour})
	if _, err := a.Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	// Nothing to prune: the sealed manifest still opens with the data key
	// and claims nothing new.
	if _, until, _, err := recovery.VerifiedPoints(ctxT(t), m.Store, m.Name, m.RecoveryKey, io.Discard); err != nil || !until.Equal(before.RecoverableUntil) {
		t.Fatalf("after apply: recoverable until %v (%v), want %v", until, err, before.RecoverableUntil)
	}
	after, err := recovery.ReadManifest(ctxT(t), m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if after.JournalFrom != before.JournalFrom || after.DurableSeq != before.DurableSeq {
		t.Fatalf("manifest went from journal_from %d durable %d to %d %d", before.JournalFrom, before.DurableSeq, after.JournalFrom, after.DurableSeq)
	}
}

// serviceAt dates store's snapshots by the time *now, the storage
// service's clock in a test whose clocks are simulated.
func serviceAt(store blobstore.Store, now *time.Time) *serviceClock {
	return &serviceClock{Store: store, now: now, at: map[string]time.Time{}}
}

// serviceClock dates snapshots by the time *now (see serviceAt).
type serviceClock struct {
	blobstore.Store
	now *time.Time
	at  map[string]time.Time // snapshot ID → service time
}

func (s *serviceClock) Snapshot(ctx context.Context, name string, md blobstore.Metadata) (blobstore.SnapshotInfo, error) {
	info, err := s.Store.Snapshot(ctx, name, md)
	if err == nil {
		info.Time = *s.now
		s.at[info.ID] = info.Time
	}
	return info, err
}

func (s *serviceClock) ListSnapshots(ctx context.Context, name string) ([]blobstore.SnapshotInfo, error) {
	snaps, err := s.Store.ListSnapshots(ctx, name)
	for i := range snaps {
		snaps[i].Time = s.at[snaps[i].ID]
	}
	return snaps, err
}

// testRetentionServerClock: the process server's clock runs behind the
// storage service's while it cuts some points (it stepped back, or it
// booted before its time was synchronised), then is right again. Every
// point cut within the retention window by the service's clock stays
// recoverable, and so does every sequence after it: the journal after a
// point kept is never deleted.
func testRetentionServerClock(t *testing.T, newStore func(t *testing.T) blobstore.Store) {
	type cut struct{ age, behind time.Duration } // hours before the end; the server's clock behind the service's
	for _, tc := range []struct {
		name string
		cuts []cut
	}{
		// A later point looks older than the one before: without ages
		// kept in sequence order it became the base, the earlier one
		// stayed, and the journal between them went.
		{"SteppedBack", []cut{{30 * time.Hour, 0}, {23*time.Hour + 30*time.Minute, 0}, {23*time.Hour + 10*time.Minute, 55 * time.Minute}, {time.Hour, 0}}},
		{"BehindThenRight", []cut{{30 * time.Hour, 0}, {10 * time.Hour, 0}, {5 * time.Hour, 48 * time.Hour}, {time.Hour, 48 * time.Hour}}},
		// Every point looked two days old: the service's clock bounds
		// the ages from below too.
		{"BehindFromTheStart", []cut{{5 * time.Hour, 48 * time.Hour}, {3 * time.Hour, 48 * time.Hour}, {time.Hour, 48 * time.Hour}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			end := time.Now().UTC()
			var service, now time.Time
			m := recoverytest.New(t, newStore(t), "clock", 1<<20)
			m.Store = serviceAt(m.Store, &service)
			a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
			rng := rand.New(rand.NewPCG(5, 6))
			c := &clock{}
			var kept []uint64 // the points inside the window, by the service's clock
			for _, p := range tc.cuts {
				service = end.Add(-p.age)
				now, c.t = service.Add(-p.behind), service
				workload(m, rng, c, 25)
				app := m.Marker(wire.MarkerAppConsistent, c.next())
				workload(m, rng, c, 5)
				m.Cut()
				if _, err := a.Apply(ctxT(t), m.Name); err != nil {
					t.Fatal(err)
				}
				if p.age < 24*time.Hour {
					kept = append(kept, app.Seq)
				}
			}
			service, now = end, end
			if _, err := a.Apply(ctxT(t), m.Name); err != nil {
				t.Fatal(err)
			}
			t.Logf("points left: %v; inside the window: %v", pointSeqs(t, m, "d0"), kept)
			for _, seq := range kept {
				recoverAndCheck(t, m, 0, fmt.Sprint(seq), seq)
				recoverAndCheck(t, m, 0, fmt.Sprint(seq+3), seq+3)
			}
		})
	}
}

// cappedSnapshots refuses a snapshot of a blob that has max already, as
// a premium page blob account does at 100.
type cappedSnapshots struct {
	blobstore.Store
	max int
}

func (s cappedSnapshots) Snapshot(ctx context.Context, name string, md blobstore.Metadata) (blobstore.SnapshotInfo, error) {
	snaps, err := s.Store.ListSnapshots(ctx, name)
	if err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	if len(snaps) >= s.max {
		return blobstore.SnapshotInfo{}, fmt.Errorf("SnapshotCountExceeded: %s has %d snapshots", name, len(snaps))
	}
	return s.Store.Snapshot(ctx, name, md)
}

// testRetentionAtSnapshotCap: a blob at the service's cap on snapshots
// fails every cut; retention still runs (a pass that fails at the cut
// used to end before it), deletes the points that aged out, and the cut
// then succeeds.
func testRetentionAtSnapshotCap(t *testing.T, store blobstore.Store) {
	m := recoverytest.New(t, store, "capped", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: -1, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	agedPoints(t, m, a, &now, start, 0, 30, 26, 2) // the 30 h old point is past the base
	m.Store = cappedSnapshots{m.Store, 3}
	a = newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	c := &clock{t: start}
	workload(m, rand.New(rand.NewPCG(9, 10)), c, 10)
	app := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	var err error
	for i := 0; i < 3 && !slices.Contains(pointSeqs(t, m, "d0"), app.Seq); i++ {
		now = start.Add(time.Duration(i) * 2 * time.Minute) // past pruneEvery
		_, err = a.Apply(ctxT(t), m.Name)
	}
	if seqs := pointSeqs(t, m, "d0"); !slices.Contains(seqs, app.Seq) {
		t.Fatalf("points %v: the new point at %d never cut (last error: %v)", seqs, app.Seq, err)
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(app.Seq), app.Seq)
}
