package applier_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
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

// Snapshot metadata alone does not make a recovery point: anyone who can
// write the account can snapshot a page blob with any. A point recover
// uses is one whose snapshots a record sealed under the data key names.
// Here the newest point's snapshot of disk 0 is replaced by a snapshot of
// garbage with the same metadata: recover skips it, says so, and rebuilds
// the state at that sequence from an older point and the journal. A record
// that fails to open fails the recovery.
func TestForgedPointNotUsed(t *testing.T) {
	ctx := ctxT(t)
	store := mem.New()
	rng := rand.New(rand.NewPCG(3, 4))
	m := recoverytest.New(t, store, "m1", 2<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: time.Second})
	for range 4 {
		workload(m, rng, c, 40)
		m.Marker(wire.MarkerTime, c.next())
		m.Marker(wire.MarkerTime, c.next())
		m.Cut()
		if _, err := a.Apply(ctx, m.Name); err != nil {
			t.Fatal(err)
		}
	}
	points := twoPoints(t, store, m.Name)
	for _, p := range points {
		if _, err := store.Stat(ctx, layout.PointRecordName(m.Name, p.ID, p.Kind)); err != nil {
			t.Fatalf("point at seq %d: no sealed record: %v", p.Seq, err)
		}
	}
	p := points[len(points)-1]
	res := recoverAndCheck(t, m, 0, fmt.Sprint(p.Seq), p.Seq)
	if res.BaseID != p.ID {
		t.Fatalf("recover at seq %d used base %q, want the point there", p.Seq, res.BaseID)
	}

	// The forgery: garbage in the base blob, snapshotted with the point's
	// metadata; the genuine snapshot deleted.
	blob := layout.DiskName(m.Name, m.Disks[0].Name)
	snaps, err := store.ListSnapshots(ctx, blob)
	if err != nil {
		t.Fatal(err)
	}
	var genuine blobstore.SnapshotInfo
	for _, s := range snaps {
		if s.ID == p.Snapshots[m.Disks[0].Name] {
			genuine = s
		}
	}
	if err := store.WritePages(ctx, blob, 0, bytes.Repeat([]byte{0xEE}, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Snapshot(ctx, blob, genuine.Metadata); err != nil {
		t.Fatal(err)
	}
	if err := store.DeleteSnapshot(ctx, blob, genuine.ID); err != nil {
		t.Fatal(err)
	}
	var progress strings.Builder
	path := filepath.Join(t.TempDir(), "disk.img")
	res, err = recovery.RecoverFile(ctx, store, recovery.Request{
		Machine: m.Name, Disk: m.Disks[0].Name, Point: fmt.Sprint(p.Seq), RecoveryKey: m.RecoveryKey, Progress: &progress,
	}, path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if res.BaseID == p.ID || !bytes.Equal(got, m.Image(0, p.Seq)[:m.Disks[0].Size]) {
		t.Fatalf("recover at seq %d over a forged snapshot: base %q, image equal to the disk: %v", p.Seq, res.BaseID, bytes.Equal(got, m.Image(0, p.Seq)[:m.Disks[0].Size]))
	}
	if !strings.Contains(progress.String(), fmt.Sprintf("recovery point at seq %d: 1 of its 1 snapshots not named by a sealed record", p.Seq)) {
		t.Fatalf("recover did not say it skipped the forged snapshot:\n%s", progress.String())
	}

	// A record edited without the key stops recovery.
	m.Tamper(layout.PointRecordName(m.Name, points[0].ID, points[0].Kind))
	_, err = recovery.RecoverFile(ctx, store, recovery.Request{
		Machine: m.Name, Disk: m.Disks[0].Name, Point: "latest", RecoveryKey: m.RecoveryKey,
	}, path)
	if !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("recover with a tampered point record: %v, want ErrTampered", err)
	}
}

// dupStore snapshots twice (a retried call whose first reply was lost)
// and, once, fails the write of a point record (a crash before it).
type dupStore struct {
	blobstore.Store
	failRecord bool
}

func (s *dupStore) Snapshot(ctx context.Context, name string, md blobstore.Metadata) (blobstore.SnapshotInfo, error) {
	if _, err := s.Store.Snapshot(ctx, name, md); err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	return s.Store.Snapshot(ctx, name, md)
}

func (s *dupStore) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if s.failRecord && strings.Contains(name, "/points/") {
		s.failRecord = false
		return "", errors.New("injected: process server stopped before the record")
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// A point with two snapshots of a disk is used through the one its record
// names, and retention keeps both; a point whose record was never written
// is cut again when its segment is applied again.
func TestPointRecordRetriedAndDuplicated(t *testing.T) {
	ctx := ctxT(t)
	store := &dupStore{Store: mem.New(), failRecord: true}
	rng := rand.New(rand.NewPCG(5, 6))
	m := recoverytest.New(t, store, "m1", 1<<20, 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: time.Second})
	workload(m, rng, c, 40)
	m.Marker(wire.MarkerTime, c.next())
	app := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Fatalf("first pass: %v, want the injected record failure", err)
	}
	a = newApplier(t, m, applier.Config{PointInterval: time.Second}) // restarted
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	// Every point has its record, the one whose record failed included.
	for _, p := range twoPoints(t, store, m.Name) {
		_, errC := store.Stat(ctx, layout.PointRecordName(m.Name, p.ID, recovery.KindCrash))
		_, errA := store.Stat(ctx, layout.PointRecordName(m.Name, p.ID, recovery.KindApp))
		if errC != nil && errA != nil {
			t.Fatalf("point at seq %d has no record: it was not cut again after its record failed", p.Seq)
		}
	}
	for d := range m.Disks {
		res := recoverAndCheck(t, m, d, fmt.Sprint(app.Seq), app.Seq)
		if res.BaseSeq != app.Seq || res.Segments != 0 {
			t.Fatalf("disk %d at the app point: base %d, %d segments replayed; want the point itself", d, res.BaseSeq, res.Segments)
		}
	}
}

// Retention keeps both snapshots of a base point cut twice: the older one
// alone, which no record names, would leave the times just inside the
// window without a base, their journal already pruned.
func TestRetentionKeepsRecordedDuplicate(t *testing.T) {
	m := recoverytest.New(t, &dupStore{Store: mem.New()}, "dup", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	apps := agedPoints(t, m, a, &now, start, 0, 30, 26, 2, 1)
	if _, err := a.Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	res := recoverAndCheck(t, m, 0, fmt.Sprint(apps[1].Seq+1), apps[1].Seq+1)
	if res.BaseSeq != apps[1].Seq {
		t.Fatalf("recover just after the window's base: base %d, want %d", res.BaseSeq, apps[1].Seq)
	}
}

// Points without a record (cut before records existed, or forged) are
// not retention's base either: it would prune the journal behind a point
// recover does not use, leaving the times after it unrecoverable.
// fourAgedPoints cuts app points 30, 26, 2 and 1 hours before a start,
// with retention off; now is left at the start.
func fourAgedPoints(t *testing.T, name string, now *time.Time) (*recoverytest.Machine, time.Time, []wire.Marker) {
	m := recoverytest.New(t, mem.New(), name, 1<<20)
	m.Store = serviceAt(m.Store, now)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	a := newApplier(t, m, applier.Config{Retention: -1, PointInterval: 1000 * time.Hour, Now: func() time.Time { return *now }})
	return m, start, agedPoints(t, m, a, now, start, 0, 30, 26, 2, 1)
}

func TestRetentionIgnoresUnrecordedPoints(t *testing.T) {
	ctx := ctxT(t)
	var now time.Time
	m, _, apps := fourAgedPoints(t, "old", &now)
	recs, err := recovery.ListPointRecords(ctx, m.Store, m.Name)
	if err != nil || len(recs) != len(apps) {
		t.Fatalf("records %v, %v; want %d", recs, err, len(apps))
	}
	for seq, kinds := range recs {
		for _, kind := range kinds {
			if err := m.Store.DeleteBlob(ctx, layout.PointRecordName(m.Name, recovery.PointID(seq), kind)); err != nil {
				t.Fatal(err)
			}
		}
	}
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if n := segmentCount(t, m); n != len(apps) {
		t.Fatalf("%d segments left of %d: retention pruned behind a point recover does not use", n, len(apps))
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(apps[1].Seq+1), apps[1].Seq+1)
	recoverAndCheck(t, m, 0, "latest", m.Latest())
}

// A snapshot anyone with write access to the account makes, with the
// metadata of an old point at the sequence of a real one, names no sealed
// record's snapshot: retention does not take it for the window's base
// (it would delete the journal and the real base, and seal journal_from
// past them: recovery inside the window refused as pruned).
func TestRetentionIgnoresForgedSnapshots(t *testing.T) {
	ctx := ctxT(t)
	var now time.Time
	m, start, apps := fourAgedPoints(t, "forged", &now)
	if _, err := m.Store.Snapshot(ctx, layout.DiskName(m.Name, "d0"), blobstore.Metadata{
		layout.MetaSeq: fmt.Sprint(apps[3].Seq),
		layout.MetaCut: start.Add(-48 * time.Hour).Format(time.RFC3339Nano),
	}); err != nil {
		t.Fatal(err)
	}
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(pointSeqs(t, m, "d0"), apps[1].Seq) {
		t.Errorf("points %v: the window's base (seq %d) deleted", pointSeqs(t, m, "d0"), apps[1].Seq)
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(apps[1].Seq+3), apps[1].Seq+3)
	recoverAndCheck(t, m, 0, "latest", m.Latest())
}

// twoPoints returns machine's recovery points, failing unless there are at
// least two.
func twoPoints(t *testing.T, store blobstore.Store, machine string) []recovery.Point {
	t.Helper()
	points, _, err := recovery.Points(ctxT(t), store, machine)
	if err != nil || len(points) < 2 {
		t.Fatalf("points %+v, %v; want at least 2", points, err)
	}
	return points
}

// failMetadata fails the next SetMetadata once armed: the end of a
// segment's apply, after its last flush.
type failMetadata struct {
	blobstore.Store
	armed bool
}

func (s *failMetadata) SetMetadata(ctx context.Context, name string, md blobstore.Metadata) error {
	if s.armed {
		s.armed = false
		return errors.New("injected: SetMetadata failed")
	}
	return s.Store.SetMetadata(ctx, name, md)
}

// A segment applied again after a pass that failed once its last flush
// was done gets the points it got then, no other: the blob holds the
// segment's later writes, so a point cut at one of its markers would hold
// them. Here the machine has no point yet, and the agent's clock steps
// back inside the segment: timed from a fresh anchor, that marker was due
// the second time only.
func TestReappliedSegmentCutsNoNewPoint(t *testing.T) {
	ctx := ctxT(t)
	store := &failMetadata{Store: mem.New()}
	m := recoverytest.New(t, store, "step", 1<<20)
	t0 := time.Date(2025, 3, 1, 10, 0, 0, 0, time.UTC)
	cfg := applier.Config{PointInterval: 5 * time.Minute}
	a := newApplier(t, m, cfg)
	m.Write(0, 0, bytes.Repeat([]byte{1}, 4096))
	m.Marker(wire.MarkerTime, t0)
	m.Cut()
	m.Write(0, 4096, bytes.Repeat([]byte{2}, 4096))
	m.Cut()
	for range 2 {
		if _, err := a.Apply(ctx, m.Name); err != nil {
			t.Fatal(err)
		}
	}
	m.Write(0, 0, bytes.Repeat([]byte{3}, 4096))
	m.Marker(wire.MarkerTime, t0.Add(4*time.Minute))
	back := m.Marker(wire.MarkerTime, t0.Add(3*time.Minute+30*time.Second))
	m.Write(0, 8192, bytes.Repeat([]byte{4}, 4096)) // past back: not in a point there
	m.Cut()
	store.armed = true
	if _, err := a.Apply(ctx, m.Name); err == nil {
		t.Fatal("apply with a failing SetMetadata succeeded")
	}
	if _, err := newApplier(t, m, cfg).Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	points, _, err := recovery.Points(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range points {
		if p.Seq == back.Seq {
			t.Errorf("a point was cut at seq %d on the second pass only", p.Seq)
		}
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(back.Seq), back.Seq)
}

// A pass that fails after its last flush leaves the replicas past the
// point it cut; a disk added before the segment is applied again has no
// snapshot in that point. The point must stand as recorded: not cut
// again from replicas holding later writes, with its record replaced to
// name those snapshots.
func TestPointNotRecutAfterDiskAdded(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(5, 6))
	st := &failMetadata{Store: mem.New()}
	m := recoverytest.New(t, st, "recut", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	m.Write(0, 0, random(rng, 8192))
	m.Marker(wire.MarkerTime, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")
	m.Write(0, 0, random(rng, 4096))
	mk := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Write(0, 4096, random(rng, 4096)) // after the point, where it wrote nothing
	m.Marker(wire.MarkerTime, c.next())
	m.Cut()
	st.armed = true
	if _, err := a.Apply(ctx, m.Name); err == nil {
		t.Fatal("the pass did not fail")
	}
	recoverAndCheck(t, m, 0, strconv.FormatUint(mk.Seq, 10), mk.Seq)
	m.Disks = append(m.Disks, layout.Disk{Name: "d1", Size: 1 << 20, Generation: "00112233445566778899aabbccddeeff", GenerationStart: m.Seq() + 1})
	m.WriteManifest()
	if _, err := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour}).Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	recoverAndCheck(t, m, 0, strconv.FormatUint(mk.Seq, 10), mk.Seq)
	if seqs := pointSeqs(t, m, "d0"); len(seqs) != 1 {
		t.Errorf("d0's snapshots at %v, want the point's one", seqs)
	}
}

// lostReplyStore writes point records and answers as a retry after a
// lost reply does: the record is there, ErrConflict.
type lostReplyStore struct{ blobstore.Store }

func (s lostReplyStore) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	etag, err := s.Store.PutBlobIf(ctx, name, data, md, match)
	if err == nil && strings.Contains(name, "/points/") {
		return "", fmt.Errorf("injected retry: %w", blobstore.ErrConflict)
	}
	return etag, err
}

// A point record whose write landed but whose reply was lost is the
// cut's own: its snapshots stay, and the point recovers.
func TestPointRecordLostReply(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(7, 8))
	m := recoverytest.New(t, lostReplyStore{mem.New()}, "lost", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	m.Write(0, 0, random(rng, 8192))
	app := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Write(0, 0, random(rng, 8192))
	m.Marker(wire.MarkerTime, c.next())
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	res := recoverAndCheck(t, m, 0, strconv.FormatUint(app.Seq, 10), app.Seq)
	if res.BaseSeq != app.Seq {
		t.Errorf("recovered from base %d, want the point's snapshot at %d", res.BaseSeq, app.Seq)
	}
}

// Every journal segment deleted from the account of a machine that
// retention never pruned (journal_from 0): the newest state, and a time
// after the last point, would resolve to that point, an older state,
// silently. The sealed durable_seq past it shows the deletion.
func TestRecoverWholeJournalDeleted(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(9, 10))
	m := recoverytest.New(t, mem.New(), "gone", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	m.Write(0, 0, random(rng, 8192))
	app := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	m.Write(0, 4096, random(rng, 8192))
	m.Marker(wire.MarkerTime, c.next())
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	recoverAndCheck(t, m, 0, "latest", m.Latest())
	if m.Latest() <= app.Seq {
		t.Fatalf("latest %d is not past the point at %d", m.Latest(), app.Seq)
	}
	segs, err := m.Store.ListBlobs(ctx, layout.JournalPrefix(m.Name))
	if err != nil || len(segs) == 0 {
		t.Fatalf("journal: %d blobs, %v", len(segs), err)
	}
	for _, b := range segs {
		if err := m.Store.DeleteBlob(ctx, b.Name); err != nil {
			t.Fatal(err)
		}
	}
	for _, point := range []string{"latest", m.Until.Format(time.RFC3339Nano)} {
		res, err := recovery.RecoverFile(ctx, m.Store, recovery.Request{Machine: m.Name, Disk: m.Disks[0].Name, Point: point, RecoveryKey: m.RecoveryKey}, filepath.Join(t.TempDir(), "disk.img"))
		if !errors.Is(err, recovery.ErrTampered) {
			t.Errorf("recover %s with the whole journal deleted: seq %d, %v; want ErrTampered", point, res.Seq, err)
		}
	}
	if _, _, _, err := recovery.VerifiedPoints(ctx, m.Store, m.Name, m.RecoveryKey, io.Discard); !errors.Is(err, recovery.ErrTampered) {
		t.Errorf("points --recovery-key with the whole journal deleted: %v, want ErrTampered", err)
	}
	// The point itself is still whole: recovered from its snapshot.
	recoverAndCheck(t, m, 0, strconv.FormatUint(app.Seq, 10), app.Seq)
}
