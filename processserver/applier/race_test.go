package applier_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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

// Recoveries racing retention: the store runs a retention pass (once)
// when a recovery first lists snapshots or reads page ranges.

type onceStore struct {
	blobstore.Store
	onList, onRanges func()
}

func (s *onceStore) ListSnapshots(ctx context.Context, name string) ([]blobstore.SnapshotInfo, error) {
	if f := s.onList; f != nil {
		s.onList = nil
		f()
	}
	return s.Store.ListSnapshots(ctx, name)
}

func (s *onceStore) GetPageRanges(ctx context.Context, name, snap string, off, n int64) ([]blobstore.PageRange, error) {
	if f := s.onRanges; f != nil {
		s.onRanges = nil
		f()
	}
	return s.Store.GetPageRanges(ctx, name, snap, off, n)
}

// retained is a machine with 20 cut segments, applied with 100 s of
// retention on a clock of 5 s per segment; retain moves that clock a
// minute on and applies again (a retention pass that prunes).
func retained(t *testing.T, name string, addDisk bool) (m *recoverytest.Machine, retain func()) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 7))
	m = recoverytest.New(t, mem.New(), name, 1<<20)
	m.EditManifest(func(man *layout.Manifest) { man.JournalFrom = 1 })
	now := time.Now()
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 3 * time.Second, Retention: 100 * time.Second, Now: func() time.Time { return now }})
	for i := range 20 {
		if addDisk && i == 15 {
			// A disk with no point older than the cutoff: retention keeps
			// the whole journal, and deletes the old points all the same.
			m.Disks = append(m.Disks, layout.Disk{Name: "d1", Size: 1 << 20, Generation: "00112233445566778899aabbccddeeff", GenerationStart: m.Seq() + 1})
			m.WriteManifest()
		}
		workload(m, rng, c, 10)
		m.Marker(wire.MarkerTime, c.next())
		m.Cut()
		now = now.Add(5 * time.Second)
		if _, err := a.Apply(ctx, m.Name); err != nil {
			t.Fatal(err)
		}
	}
	return m, func() {
		now = now.Add(time.Minute)
		if _, err := a.Apply(ctx, m.Name); err != nil {
			t.Error(err)
		}
	}
}

// A recovery that read the manifest before a retention pass and listed
// the journal after it is refused as out of the window (exit 3), not as
// tampered (exit 5): the listing's first segment follows one retention
// deleted, which the manifest's journal_from, read again, says.
func TestRecoverRacingRetentionIsOutOfRange(t *testing.T) {
	m, retain := retained(t, "rr", false)
	target := m.Markers()[10].Seq
	s := &onceStore{Store: m.Store, onList: retain}
	before, err := recovery.ReadManifest(context.Background(), m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	_, err = recovery.Recover(context.Background(), s, recovery.Request{Machine: m.Name, Disk: "d0", Point: fmt.Sprint(target), RecoveryKey: m.RecoveryKey}, &recoverytest.Output{})
	after, _ := recovery.ReadManifest(context.Background(), m.Store, m.Name)
	if after.JournalFrom <= max(before.JournalFrom, target+1) {
		t.Fatalf("retention did not prune past the target (journal_from %d, then %d; target %d)", before.JournalFrom, after.JournalFrom, target)
	}
	if !errors.Is(err, recovery.ErrOutOfRange) || errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("recover of sequence %d while retention pruned it: %v; want ErrOutOfRange, not ErrTampered", target, err)
	}
}

// A recovery whose base point retention deleted while it was copied, the
// journal kept (another disk had no older point), starts again from the
// account as it is and recovers the right bytes.
func TestRecoverRestartsWhenItsPointIsDeleted(t *testing.T) {
	m, retain := retained(t, "rs", true)
	target := m.Markers()[3].Seq + 1
	var deleted bool
	s := &onceStore{Store: m.Store, onRanges: func() {
		points, _ := recovery.ListPoints(context.Background(), m.Store, m.Name, []string{"d0", "d1"})
		retain()
		after, _ := recovery.ListPoints(context.Background(), m.Store, m.Name, []string{"d0", "d1"})
		deleted = len(after) < len(points)
	}}
	out := &recoverytest.Output{}
	res, err := recovery.Recover(context.Background(), s, recovery.Request{Machine: m.Name, Disk: "d0", Point: fmt.Sprint(target), RecoveryKey: m.RecoveryKey}, out)
	if !deleted {
		t.Fatal("retention deleted no point during the recovery")
	}
	if err != nil {
		t.Fatalf("recover of sequence %d while retention deleted its point: %v", target, err)
	}
	if want := m.Image(0, target)[:m.Disks[0].Size]; res.Seq != target || !bytes.Equal(out.B, want) {
		t.Fatalf("recovered sequence %d (%d bytes), want %d: bytes differ from the disk then", res.Seq, len(out.B), target)
	}
}

// failMeta fails the SetMetadata calls fail picks while on (a pass that
// dies there: a crash, a stop, an outage, a fence), and counts them all.
type failMeta struct {
	blobstore.Store
	on   bool
	fail func(blobstore.Metadata) bool
	sets int
}

func (s *failMeta) SetMetadata(ctx context.Context, name string, md blobstore.Metadata) error {
	s.sets++
	if s.on && s.fail(md) {
		return errors.New("test: injected failure")
	}
	return s.Store.SetMetadata(ctx, name, md)
}

// failedPassThenShorter applies a first segment, then a second holding a
// write to disk, a crash marker not due at 5 min and a later write, in a
// pass that fails where fail says; then a pass with a 1 min interval, for
// which that marker is due. No point at it may hold the later write.
func failedPassThenShorter(t *testing.T, disks int, disk int, fail func(m *recoverytest.Machine) func(blobstore.Metadata) bool) {
	t.Helper()
	ctx := ctxT(t)
	store := mem.New()
	fs := &failMeta{Store: store}
	sizes := make([]uint64, disks)
	for i := range sizes {
		sizes[i] = 1 << 20
	}
	m := recoverytest.New(t, store, "m1", sizes...)
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	for i := range disks {
		m.Write(i, 0, make([]byte, 4096))
	}
	m.Marker(wire.MarkerTime, t0) // the first: times the points
	m.Cut()
	cfg := applier.Config{Store: fs, Keys: applier.RecoveryKeys(store, m.RecoveryKey), PointInterval: 5 * time.Minute, Retention: -1}
	a1, err := applier.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a1.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	m.Write(disk, 0, bytes.Repeat([]byte{0xAA}, 8192))
	mk := m.InlineMarker(wire.MarkerCrashConsistent, t0.Add(2*time.Minute))
	m.Write(disk, 65536, bytes.Repeat([]byte{0xBB}, 8192))
	m.Cut()
	fs.fail, fs.on = fail(m), true
	if _, err := a1.Apply(ctx, m.Name); err == nil {
		t.Fatal("the pass did not fail")
	}
	fs.on = false
	cfg.PointInterval = time.Minute
	a2, err := applier.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a2.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	recoverAndCheck(t, m, disk, fmt.Sprint(mk.Seq), mk.Seq)
	// A clean pass leaves no writing_to behind.
	for _, d := range m.Disks {
		info, err := store.Stat(ctx, layout.DiskName(m.Name, d.Name))
		if err != nil {
			t.Fatal(err)
		}
		if w, ok := info.Metadata[layout.MetaWritingTo]; ok {
			t.Errorf("disk %s: writing_to %s left after a clean pass", d.Name, w)
		}
	}
}

// A pass that failed past its flush left a replica's pages ahead of its
// applied_seq; the next one, with a shorter point interval, finds due a
// marker the first did not, inside what the pages already hold: it must
// not cut a point there (its snapshot would hold the writes after it):
// failing when applied_seq is recorded, when writing_to is (before the
// pages: a mark recorded after them would fail there too), and with two
// disks, the second written.
func TestNoPointBelowWhatAFailedPassWrote(t *testing.T) {
	atApplied := func(m *recoverytest.Machine) func(blobstore.Metadata) bool {
		seq := fmt.Sprint(m.Seq())
		return func(md blobstore.Metadata) bool { return md[layout.MetaAppliedSeq] == seq }
	}
	atWritingTo := func(*recoverytest.Machine) func(blobstore.Metadata) bool {
		return func(md blobstore.Metadata) bool { _, ok := md[layout.MetaWritingTo]; return ok }
	}
	t.Run("applied", func(t *testing.T) { failedPassThenShorter(t, 1, 0, atApplied) })
	t.Run("writing_to", func(t *testing.T) { failedPassThenShorter(t, 1, 0, atWritingTo) })
	t.Run("second disk", func(t *testing.T) { failedPassThenShorter(t, 2, 1, atApplied) })
}

// Recording writing_to costs no metadata write a segment beyond the one of
// its applied_seq, but for the first segment of a pass.
func TestWritingToRidesOnAppliedSeq(t *testing.T) {
	ctx := ctxT(t)
	store := mem.New()
	fs := &failMeta{Store: store}
	m := recoverytest.New(t, store, "m1", 1<<20, 1<<20)
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	const n = 20
	for i := range n {
		m.Write(0, uint64(i)*4096, bytes.Repeat([]byte{byte(i)}, 4096))
		m.Write(1, uint64(i)*4096, bytes.Repeat([]byte{byte(i)}, 4096))
		m.Marker(wire.MarkerTime, t0.Add(time.Duration(i)*time.Second))
		m.Cut()
	}
	a, err := applier.New(applier.Config{Store: fs, Keys: applier.RecoveryKeys(store, m.RecoveryKey), PointInterval: 5 * time.Minute, Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if want := 2*n + 2; fs.sets != want {
		t.Errorf("%d metadata writes for %d segments on 2 disks, want %d", fs.sets, n, want)
	}
}
