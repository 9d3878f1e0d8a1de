package applier_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
)

func TestMem(t *testing.T) {
	runScenarios(t, func(t *testing.T) blobstore.Store { return mem.New() })
}

var containerSeq atomic.Int64

func TestAzurite(t *testing.T) {
	srv := azurite.ForTest(t)
	runScenarios(t, func(t *testing.T) blobstore.Store {
		name := fmt.Sprintf("lbapply-%d-%d", time.Now().UnixNano()%1e9, containerSeq.Add(1))
		s, err := azure.New(azure.Config{ConnectionString: srv.ConnectionString(), Container: name})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_ = s.DeleteContainer(ctx)
		})
		return s
	})
}

func runScenarios(t *testing.T, newStore func(t *testing.T) blobstore.Store) {
	t.Run("ApplyPointsRecover", func(t *testing.T) { testApplyPointsRecover(t, newStore(t)) })
	t.Run("Tampered", func(t *testing.T) { testTampered(t, newStore(t)) })
	t.Run("MissingSegment", func(t *testing.T) { testMissingSegment(t, newStore(t)) })
	t.Run("JunkKeyBlob", func(t *testing.T) { testJunkKeyBlob(t, newStore(t)) })
	t.Run("Retention", func(t *testing.T) { testRetention(t, newStore(t)) })
	t.Run("RetentionAgentClock", func(t *testing.T) { testRetentionAgentClock(t, newStore(t)) })
	t.Run("RetentionClockAhead", func(t *testing.T) { testRetentionClockAhead(t, newStore(t)) })
	t.Run("RetentionServerClock", func(t *testing.T) { testRetentionServerClock(t, newStore) })
	t.Run("RetentionAtSnapshotCap", func(t *testing.T) { testRetentionAtSnapshotCap(t, newStore(t)) })
	t.Run("RetentionDiskWithoutPoints", func(t *testing.T) { testRetentionDiskWithoutPoints(t, newStore(t)) })
	t.Run("RecoverPrunedJournal", func(t *testing.T) { testRecoverPrunedJournal(t, newStore(t)) })
	t.Run("NewGeneration", func(t *testing.T) { testNewGeneration(t, newStore(t)) })
	t.Run("NewGenerationWhileLagging", func(t *testing.T) { testNewGenerationWhileLagging(t, newStore(t)) })
	t.Run("ReplicaLost", func(t *testing.T) { testReplicaLost(t, newStore(t)) })
	t.Run("Manager", func(t *testing.T) { testManager(t, newStore(t)) })
	t.Run("Fence", func(t *testing.T) { testFence(t, newStore(t)) })
	t.Run("WithdrawnMarker", func(t *testing.T) { testWithdrawnMarker(t, newStore(t)) })
}

// testWithdrawnMarker: a consistency point the agent withdrew (numbered
// before a resync it learned of) is no point, and no time a recovery by
// time resolves to: the time before it goes to the marker before it.
func testWithdrawnMarker(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(31, 32))
	m := recoverytest.New(t, store, "m1", 1<<20)
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	a := newApplier(t, m, applier.Config{PointInterval: time.Second})
	m.Write(0, 0, random(rng, 64<<10))
	before := m.InlineMarker(wire.MarkerCrashConsistent, t0.Add(time.Second))
	m.Write(0, 4096, random(rng, 8192))
	withdrawn := m.InlineMarker(wire.MarkerWithdrawn, t0.Add(10*time.Second))
	m.Write(0, 8192, random(rng, 8192))
	m.Marker(wire.MarkerTime, t0.Add(20*time.Second))
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	points, until, err := recovery.Points(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if !until.Equal(t0.Add(20 * time.Second)) {
		t.Errorf("recoverable until %s, want the time marker's", until)
	}
	for _, p := range points {
		if p.Seq == withdrawn.Seq {
			t.Errorf("a %s point cut at the withdrawn marker (seq %d)", p.Kind, p.Seq)
		}
	}
	if len(points) == 0 {
		t.Error("no point cut")
	}
	recoverAndCheck(t, m, 0, t0.Add(15*time.Second).Format(time.RFC3339Nano), before.Seq)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func newApplier(t *testing.T, m *recoverytest.Machine, cfg applier.Config) *applier.Applier {
	t.Helper()
	cfg.Store = m.Store
	cfg.Keys = applier.RecoveryKeys(m.Store, m.RecoveryKey)
	if cfg.PointInterval == 0 {
		cfg.PointInterval = 10 * time.Second
	}
	if cfg.Retention == 0 {
		cfg.Retention = -1
	}
	a, err := applier.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func random(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// clock hands out marker times one second apart.
type clock struct{ t time.Time }

func (c *clock) next() time.Time { c.t = c.t.Add(time.Second); return c.t }

// workload sends n records of every kind to m: aligned and unaligned
// writes, overlapping writes, zeros and discards (aligned and not), writes
// holding long zero runs, with a time marker every few records.
func workload(m *recoverytest.Machine, rng *rand.Rand, c *clock, n int) {
	for i := 0; i < n; i++ {
		disk := rng.IntN(len(m.Disks))
		size := m.Disks[disk].Size
		switch k := rng.IntN(10); {
		case k < 4: // aligned 4 KiB-ish writes
			l := uint64(512 * (1 + rng.IntN(16)))
			off := uint64(rng.IntN(int(size-l)/512)) * 512
			m.Write(disk, off, random(rng, int(l)))
		case k < 6: // unaligned write, maybe ending at the disk's unaligned end
			l := uint64(1 + rng.IntN(3000))
			off := uint64(rng.IntN(int(size - l)))
			if rng.IntN(8) == 0 {
				off = size - l
			}
			m.Write(disk, off, random(rng, int(l)))
		case k < 7: // a write with a 128 KiB hole of zeros inside
			data := random(rng, 256<<10)
			clear(data[64<<10 : 192<<10])
			off := uint64(rng.IntN(int(size-uint64(len(data)))/512)) * 512
			m.Write(disk, off, data)
		case k < 8: // overwrite part of the previous range of the same disk
			off := uint64(rng.IntN(int(size - 5000)))
			m.Write(disk, off, random(rng, 5000))
			m.Write(disk, off+uint64(rng.IntN(4000)), random(rng, 700))
		case k < 9:
			l := uint32(1 + rng.IntN(200<<10))
			off := uint64(rng.IntN(int(size - uint64(l))))
			m.Zero(disk, off, l)
		default:
			l := uint32(512 * (1 + rng.IntN(300)))
			off := uint64(rng.IntN(int(size-uint64(l))/512)) * 512
			m.Discard(disk, off, l)
		}
		if rng.IntN(4) == 0 {
			m.Marker(wire.MarkerTime, c.next())
		}
	}
}

// checkReplica compares every disk's page blob with the model at seq.
func checkReplica(t *testing.T, m *recoverytest.Machine, seq uint64) {
	t.Helper()
	for i, d := range m.Disks {
		want := m.Image(i, seq)
		got := make([]byte, len(want))
		if err := m.Store.ReadPages(ctxT(t), layout.DiskName(m.Name, d.Name), "", 0, got); err != nil {
			t.Fatal(err)
		}
		if off := firstDiff(got, want); off >= 0 {
			t.Fatalf("replica of disk %s differs from the model at seq %d at byte %d", d.Name, seq, off)
		}
	}
}

func firstDiff(a, b []byte) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// recoverAndCheck recovers disk at point into a file and compares it with
// the model at seq (cut to the disk size).
func recoverAndCheck(t *testing.T, m *recoverytest.Machine, disk int, point string, seq uint64) recovery.Result {
	t.Helper()
	return recoverSized(t, m, disk, point, seq, m.Disks[disk].Size)
}

func testApplyPointsRecover(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(1, 2))
	// Disk 1 has a size that is not a multiple of 512; disk 0 is bigger
	// than two Put Page calls.
	m := recoverytest.New(t, store, "m1", 9<<20, 3<<20+1000)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 10 * time.Second, Parallelism: 3})

	// Segment 1: a write larger than 4 MiB (split into several Put Pages)
	// plus a random workload.
	m.Write(0, 512, random(rng, 5<<20+512))
	workload(m, rng, c, 60)
	m.Cut()
	workload(m, rng, c, 60)
	app := m.Marker(wire.MarkerAppConsistent, c.next())
	workload(m, rng, c, 60)
	m.Cut()
	mid := m.Seq()
	workload(m, rng, c, 40)
	crash := m.InlineMarker(wire.MarkerCrashConsistent, c.next())
	workload(m, rng, c, 40)
	m.Marker(wire.MarkerTime, c.next())
	m.Cut()

	got, err := a.Apply(ctx, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if got != m.Durable {
		t.Fatalf("Apply returned %d, durable is %d", got, m.Durable)
	}
	checkReplica(t, m, m.Durable)
	man, err := recovery.ReadManifest(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if man.AppliedSeq != m.Durable || man.DurableSeq != m.Durable {
		t.Fatalf("manifest applied_seq %d durable_seq %d, want both %d", man.AppliedSeq, man.DurableSeq, m.Durable)
	}
	info, err := store.Stat(ctx, layout.DiskName(m.Name, "d1"))
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 3<<20+1024 || info.Metadata[layout.MetaAppliedSeq] != fmt.Sprint(m.Durable) || info.Metadata[layout.MetaGeneration] != m.Disks[1].Generation {
		t.Fatalf("replica d1: size %d metadata %v", info.Size, info.Metadata)
	}
	// A second pass has nothing to do.
	if got, err := a.Apply(ctx, m.Name); err != nil || got != m.Durable {
		t.Fatalf("second Apply: %d, %v", got, err)
	}

	points, until, err := recovery.Points(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if !until.Equal(time.Unix(0, m.Markers()[len(m.Markers())-1].UnixNano)) {
		t.Fatalf("recoverable until %s, want the last marker's time", until)
	}
	var sawApp, sawCrash bool
	for i, p := range points {
		if len(p.Snapshots) != 2 {
			t.Fatalf("point %d has snapshots of %d disks", p.Seq, len(p.Snapshots))
		}
		if i > 0 && p.Kind == recovery.KindCrash && p.Time.Sub(points[i-1].Time) < 10*time.Second {
			t.Fatalf("crash point at %s only %s after the previous one", p.Time, p.Time.Sub(points[i-1].Time))
		}
		switch {
		case p.Seq == app.Seq && p.Kind == recovery.KindApp:
			sawApp = true
		case p.Seq == crash.Seq && p.Kind == recovery.KindCrash:
			sawCrash = true
		}
		for d, disk := range m.Disks {
			want := m.Image(d, p.Seq)
			got := make([]byte, len(want))
			if err := store.ReadPages(ctx, layout.DiskName(m.Name, disk.Name), p.Snapshots[disk.Name], 0, got); err != nil {
				t.Fatal(err)
			}
			if off := firstDiff(got, want); off >= 0 {
				t.Fatalf("%s point at seq %d: disk %s differs from the model at byte %d", p.Kind, p.Seq, disk.Name, off)
			}
		}
	}
	if !sawApp {
		t.Fatalf("no app point at seq %d in %+v", app.Seq, points)
	}
	if len(points) < 4 {
		t.Fatalf("only %d points for %d markers 1 s apart and a 10 s interval", len(points), len(m.Markers()))
	}
	_ = sawCrash // a crash marker is a candidate, not a forced point

	recoverAndCheck(t, m, 0, "latest", m.Latest())
	recoverAndCheck(t, m, 1, "latest", m.Latest())
	recoverAndCheck(t, m, 1, fmt.Sprint(mid), mid)
	recoverAndCheck(t, m, 0, fmt.Sprint(points[0].Seq-1), points[0].Seq-1) // before any point: from zeros
	res := recoverAndCheck(t, m, 0, fmt.Sprint(app.Seq), app.Seq)
	if res.BaseSeq != app.Seq || res.Segments != 0 {
		t.Fatalf("recover at the app point: base %d, %d segments replayed; want the point itself", res.BaseSeq, res.Segments)
	}
	// A time between two markers selects the earlier one.
	mk := m.Markers()[len(m.Markers())/2]
	at := time.Unix(0, mk.UnixNano).Add(500 * time.Millisecond).UTC()
	res = recoverAndCheck(t, m, 1, at.Format(time.RFC3339Nano), mk.Seq)
	if !res.Time.Equal(time.Unix(0, mk.UnixNano)) {
		t.Fatalf("recover at %s: point time %s, want %s", at, res.Time, time.Unix(0, mk.UnixNano))
	}

	// Out of range times and sequences fail clearly.
	for _, p := range []string{
		c.t.Add(time.Hour).Format(time.RFC3339),
		time.Unix(0, m.Markers()[0].UnixNano).Add(-time.Second).Format(time.RFC3339Nano),
		fmt.Sprint(m.Durable + 1),
	} {
		_, err := recovery.Recover(ctx, store, recovery.Request{Machine: m.Name, Disk: "d0", Point: p, RecoveryKey: m.RecoveryKey}, discard{})
		if !errors.Is(err, recovery.ErrOutOfRange) {
			t.Fatalf("recover %s: %v, want ErrOutOfRange", p, err)
		}
		t.Logf("recover %s: %v", p, err)
	}

	// Wrong recovery key.
	_, err = recovery.Recover(ctx, store, recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: seal.NewRecoveryKey()}, discard{})
	if !errors.Is(err, recovery.ErrWrongRecoveryKey) || !strings.Contains(err.Error(), seal.Fingerprint(m.RecoveryKey)) {
		t.Fatalf("wrong recovery key: %v", err)
	}
	t.Logf("wrong key: %v", err)
}

type discard struct{}

func (discard) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

func testTampered(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(3, 4))
	m := recoverytest.New(t, store, "m2", 2<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{})
	workload(m, rng, c, 30)
	m.Cut()
	workload(m, rng, c, 30)
	good := m.Cut()
	goodSeq := m.Durable
	workload(m, rng, c, 30)
	bad := m.Cut()
	workload(m, rng, c, 30)
	m.Cut()
	m.Tamper(bad)

	got, err := a.Apply(ctx, m.Name)
	if !errors.Is(err, recovery.ErrTampered) || !errors.Is(err, seal.ErrTampered) || !strings.Contains(err.Error(), bad) {
		t.Fatalf("Apply over a tampered segment: %v; want ErrTampered naming %s", err, bad)
	}
	t.Logf("apply: %v", err)
	if got != goodSeq {
		t.Fatalf("Apply returned %d, want %d (end of %s)", got, goodSeq, good)
	}
	checkReplica(t, m, goodSeq) // nothing of the tampered segment, nor after it
	if got, err := a.Apply(ctx, m.Name); err == nil || got != goodSeq {
		t.Fatalf("second Apply: %d, %v; want it stuck at %d", got, err, goodSeq)
	}
	checkReplica(t, m, goodSeq)

	path := filepath.Join(t.TempDir(), "out.img")
	_, err = recovery.RecoverFile(ctx, store, recovery.Request{Machine: m.Name, Disk: "d0", Point: "latest", RecoveryKey: m.RecoveryKey}, path)
	if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), bad) {
		t.Fatalf("recover over a tampered segment: %v", err)
	}
	if _, serr := os.Stat(path); !os.IsNotExist(serr) {
		t.Fatalf("failed recovery left %s: %v", path, serr)
	}
	if left, _ := filepath.Glob(path + ".partial*"); len(left) != 0 {
		t.Fatalf("failed recovery left %v", left)
	}
	// Everything before the tampered segment still recovers.
	recoverAndCheck(t, m, 0, fmt.Sprint(goodSeq), goodSeq)
}

// testJunkKeyBlob: a key blob that does not unwrap, beside the machine's
// own, does not stop the applier.
func testJunkKeyBlob(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(5, 6))
	m := recoverytest.New(t, store, "m4", 2<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	if err := store.PutBlob(ctx, layout.KeyName(m.Name, [8]byte{9, 9, 9, 9, 9, 9, 9, 9}), []byte("junk"), nil); err != nil {
		t.Fatal(err)
	}
	a := newApplier(t, m, applier.Config{})
	workload(m, rng, c, 40)
	m.Cut()
	if got, err := a.Apply(ctx, m.Name); err != nil || got != m.Durable {
		t.Fatalf("Apply beside a junk key blob: %d, %v; want %d", got, err, m.Durable)
	}
	checkReplica(t, m, m.Durable)
}

// testMissingSegment: a segment deleted from the account (no gap
// recorded) stops the applier before the segment after it: the replica
// and its points never go on without its writes.
func testMissingSegment(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(5, 6))
	m := recoverytest.New(t, store, "m3", 2<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{})
	workload(m, rng, c, 30)
	m.Cut()
	goodSeq := m.Durable
	workload(m, rng, c, 30)
	gone := m.Cut()
	workload(m, rng, c, 30)
	after := m.Cut()
	if err := store.DeleteBlob(ctx, gone); err != nil {
		t.Fatal(err)
	}
	got, err := a.Apply(ctx, m.Name)
	if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), after) {
		t.Fatalf("Apply over a missing segment: %v; want ErrTampered naming %s", err, after)
	}
	if got != goodSeq {
		t.Fatalf("Apply returned %d, want %d (before the missing segment)", got, goodSeq)
	}
	checkReplica(t, m, goodSeq)
}

func testRetention(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(5, 6))
	m := recoverytest.New(t, store, "m3", 1<<20, 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	c := &clock{}
	// App points cut at -30 h, -26 h, -2 h, -1 h, one segment each.
	var apps []wire.Marker
	for _, age := range []time.Duration{30, 26, 2, 1} {
		now = start.Add(-age * time.Hour)
		c.t = now
		workload(m, rng, c, 25)
		apps = append(apps, m.Marker(wire.MarkerAppConsistent, c.next()))
		workload(m, rng, c, 5)
		m.Cut()
		if _, err := a.Apply(ctx, m.Name); err != nil {
			t.Fatal(err)
		}
	}
	now = start
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	points, _, err := recovery.Points(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	// -30 h goes; -26 h stays as the base of the window's first hours.
	if len(points) != 3 || points[0].Seq != apps[1].Seq || points[1].Seq != apps[2].Seq || points[2].Seq != apps[3].Seq {
		t.Fatalf("after retention: points %+v, want the app points at seq %d, %d and %d", points, apps[1].Seq, apps[2].Seq, apps[3].Seq)
	}
	segs, err := recovery.ListSegments(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range segs {
		if s.Last <= apps[1].Seq {
			t.Fatalf("segment %s (last %d) kept though the oldest point is at %d", s.Name, s.Last, apps[1].Seq)
		}
	}
	if len(segs) != 3 {
		t.Fatalf("%d segments kept, want 3", len(segs))
	}
	// Kept points and anything after the oldest still recover (a time
	// 10 h ago included); before it not.
	recoverAndCheck(t, m, 1, fmt.Sprint(apps[2].Seq), apps[2].Seq)
	recoverAndCheck(t, m, 0, fmt.Sprint(apps[1].Seq+3), apps[1].Seq+3)
	recoverAndCheck(t, m, 0, "latest", m.Latest())
	_, err = recovery.Recover(ctx, store, recovery.Request{Machine: m.Name, Disk: "d0", Point: fmt.Sprint(apps[0].Seq), RecoveryKey: m.RecoveryKey}, discard{})
	if !errors.Is(err, recovery.ErrOutOfRange) {
		t.Fatalf("recover a pruned point: %v", err)
	}

	man, err := recovery.ReadManifest(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if man.JournalFrom != apps[1].Seq+1 {
		t.Fatalf("journal_from %d after pruning up to the point at %d", man.JournalFrom, apps[1].Seq)
	}

	// Much later, every point but a new one is past retention: the one
	// before it stays, the base of the window. (While no point is cut,
	// the storage service's time of the newest bounds the ages.)
	now = now.Add(72 * time.Hour)
	c.t = now
	workload(m, rng, c, 25)
	newest := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	a2 := newApplier(t, m, applier.Config{Retention: 24 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	if _, err := a2.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	points, _, err = recovery.Points(ctx, store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if len(points) != 2 || points[0].Seq != apps[3].Seq || points[1].Seq != newest.Seq {
		t.Fatalf("points %+v, want the base (seq %d) and the newest (seq %d)", points, apps[3].Seq, newest.Seq)
	}
	recoverAndCheck(t, m, 0, "latest", m.Latest())
	recoverAndCheck(t, m, 1, fmt.Sprint(apps[3].Seq), apps[3].Seq)
}

func testNewGeneration(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(7, 8))
	m := recoverytest.New(t, store, "m4", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{})
	workload(m, rng, c, 40)
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	// Full sync onto a new generation with a bigger disk: the replica is
	// recreated, then rewritten.
	m.NewGeneration(0, 2<<20+512)
	m.Write(0, 0, random(rng, 1<<20))
	workload(m, rng, c, 20)
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	info, err := store.Stat(ctx, layout.DiskName(m.Name, "d0"))
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 2<<20+512 || info.Metadata[layout.MetaGeneration] != m.Disks[0].Generation {
		t.Fatalf("replica after new generation: size %d metadata %v", info.Size, info.Metadata)
	}
}

func testManager(t *testing.T, store blobstore.Store) {
	rng := rand.New(rand.NewPCG(9, 10))
	m := recoverytest.New(t, store, "m5", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PollInterval: time.Hour})
	ctx, cancel := context.WithCancel(ctxT(t))
	var notified atomic.Uint64
	mg := a.NewManager(ctx, func(machine string, seq uint64) {
		if machine == m.Name {
			notified.Store(seq)
		}
	})
	defer func() { cancel(); mg.Wait() }()
	for range 3 {
		workload(m, rng, c, 20)
		m.Cut()
		mg.Durable(m.Name, m.Durable)
		if err := mg.WaitApplied(ctx, m.Name, m.Durable); err != nil {
			t.Fatal(err)
		}
		checkReplica(t, m, m.Durable)
		if mg.Applied(m.Name) != m.Durable || notified.Load() != m.Durable {
			t.Fatalf("Applied %d, callback %d, want %d", mg.Applied(m.Name), notified.Load(), m.Durable)
		}
	}
	// Stopped (its process server no longer serves the machine), the
	// machine's loop ends: Wait returns with the Manager's context live.
	mg.Stop(m.Name)
	waited := make(chan struct{})
	go func() { mg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("the machine's loop still runs after Stop")
	}
	// Stopped, it stays so: no notification brings it back.
	workload(m, rng, c, 20)
	m.Marker(wire.MarkerAppConsistent, c.next())
	workload(m, rng, c, 5)
	m.Cut()
	mg.Durable(m.Name, m.Durable)
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	if err := mg.WaitApplied(short, m.Name, m.Durable); err == nil {
		t.Fatal("a stopped machine's segments were applied")
	}
	cancelShort()
	// Meanwhile another process server applies the machine, and cuts the
	// app-consistent point.
	if _, err := newApplier(t, m, applier.Config{}).Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	snaps := func() int {
		l, err := m.Store.ListSnapshots(ctx, layout.DiskName(m.Name, m.Disks[0].Name))
		if err != nil {
			t.Fatal(err)
		}
		return len(l)
	}
	before := snaps()
	// Served here again (its agent's hello claimed it back), the machine
	// gets a new loop, which goes on from the account's state: nothing
	// applied again over the newer replica, no point cut again.
	mg.Resume(m.Name)
	mg.Durable(m.Name, m.Durable)
	if err := mg.WaitApplied(ctx, m.Name, m.Durable); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	if after := snaps(); after != before {
		t.Fatalf("%d snapshots after the machine's loop resumed, %d before: it cut points the other server had cut", after, before)
	}
}

// TestCrashAnywhere fails one store call of an Apply (before it reaches
// the store, or after, losing the reply), then applies again with a fresh
// Applier, as after a process server restart: the replica and every
// recovery point must equal the model. The last segment starts a new,
// bigger generation of disk 1, which that Apply reaches mid-segment.
func TestCrashAnywhere(t *testing.T) {
	var genStart uint64
	build := func(f *blobstoretest.Faulty) *recoverytest.Machine {
		rng := rand.New(rand.NewPCG(13, 14))
		m := recoverytest.New(t, f, "mc", 1<<20, 1<<20+512)
		c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
		for i := range 3 {
			if i == 2 {
				workload(m, rng, c, 3)
				genStart = m.Seq() + 1
				m.NewGeneration(1, 2<<20)
				m.Write(1, 0, random(rng, 1<<20))
			}
			workload(m, rng, c, 8)
			m.Marker(wire.MarkerAppConsistent, c.next())
			workload(m, rng, c, 4)
			m.Cut()
		}
		return m
	}
	// A clean run counts the calls an Apply makes.
	f := blobstoretest.NewFaulty(mem.New())
	m := build(f)
	before := f.Calls()
	if _, err := newApplier(t, m, applier.Config{Parallelism: 1, PointInterval: 1000 * time.Hour}).Apply(ctxT(t), m.Name); err != nil {
		t.Fatal(err)
	}
	total := f.Calls() - before
	runs, failed := 0, 0
	defer func() {
		if !t.Failed() && failed < runs*3/4 {
			t.Fatalf("only %d of %d runs with an injected fault failed", failed, runs)
		}
	}()
	for n := 1; n <= total; n++ {
		for _, lose := range []bool{false, true} {
			f := blobstoretest.NewFaulty(mem.New())
			m := build(f)
			runs++
			if lose {
				f.LoseReplyNth(f.Calls() + n)
			} else {
				f.FailNth(f.Calls() + n)
			}
			// (Losing the reply of a call that failed anyway, or of one
			// whose error is only logged, e.g. retention, fails nothing.)
			if _, err := newApplier(t, m, applier.Config{Parallelism: 1, PointInterval: 1000 * time.Hour}).Apply(ctxT(t), m.Name); err != nil {
				failed++
			}
			got, err := newApplier(t, m, applier.Config{Parallelism: 2, PointInterval: 1000 * time.Hour}).Apply(ctxT(t), m.Name)
			if err != nil || got != m.Durable {
				t.Fatalf("call %d/%d (lose reply %v): Apply after restart: %d, %v", n, total, lose, got, err)
			}
			checkReplica(t, m, m.Durable)
			points, _, err := recovery.Points(ctxT(t), f, m.Name)
			if err != nil {
				t.Fatal(err)
			}
			if len(points) != 3 {
				t.Fatalf("call %d/%d (lose reply %v): %d points, want one per app marker", n, total, lose, len(points))
			}
			for _, p := range points {
				for d, disk := range m.Disks {
					want := m.Image(d, p.Seq)
					if d == 1 && p.Seq < genStart {
						want = want[:1<<20+512]
					}
					got := make([]byte, len(want))
					if err := f.ReadPages(ctxT(t), layout.DiskName(m.Name, disk.Name), p.Snapshots[disk.Name], 0, got); err != nil {
						t.Fatalf("call %d/%d (lose reply %v): point %d disk %s: %v", n, total, lose, p.Seq, disk.Name, err)
					}
					if off := firstDiff(got, want); off >= 0 {
						t.Fatalf("call %d/%d (lose reply %v): point %d disk %s differs at byte %d", n, total, lose, p.Seq, disk.Name, off)
					}
				}
			}
		}
	}
}

// Crash-consistent points go on when the agent's clock steps back (set a
// day ahead, then corrected): the markers after the step are dated before
// the last point, and waiting for the clock to catch up would cut none.
func TestPointsAfterClockStepsBack(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(41, 42))
	m := recoverytest.New(t, mem.New(), "clock", 1<<20)
	a := newApplier(t, m, applier.Config{PointInterval: 10 * time.Second})
	ahead := &clock{t: time.Date(2025, 3, 2, 12, 0, 0, 0, time.UTC)}
	for range 30 { // a point one interval after the first marker
		m.Write(0, uint64(rng.IntN(255))*4096, random(rng, 4096))
		m.Marker(wire.MarkerTime, ahead.next())
	}
	m.Cut()
	applyAll(t, ctx, a, m, "")
	points, _, err := recovery.Points(ctx, m.Store, m.Name)
	if err != nil || len(points) == 0 {
		t.Fatalf("points with the clock ahead: %v, %v", points, err)
	}
	before := len(points)

	corrected := &clock{t: ahead.t.Add(-24 * time.Hour)}
	for range 30 {
		m.Write(0, uint64(rng.IntN(255))*4096, random(rng, 4096))
		m.Marker(wire.MarkerTime, corrected.next())
	}
	m.Cut()
	applyAll(t, ctx, a, m, "")
	points = checkPoints(t, m, func(int, uint64) uint64 { return 1 << 20 })
	if after := len(points) - before; after < 2 {
		t.Fatalf("%d crash-consistent points in 30 s of markers after the clock stepped back, want one at the step and one every 10 s", after)
	}
}

// An app-consistent marker at the sequence of a crash-consistent point
// (the freeze wrote nothing: idle or read-only file systems) makes that
// point app-consistent instead of being dropped.
func TestAppMarkerOnCrashPoint(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(61, 62))
	m := recoverytest.New(t, mem.New(), "appcrash", 1<<20)
	a := newApplier(t, m, applier.Config{PointInterval: 10 * time.Second})
	c := &clock{t: time.Date(2025, 3, 2, 12, 0, 0, 0, time.UTC)}
	for range 11 {
		m.Write(0, uint64(rng.IntN(255))*4096, random(rng, 4096))
		m.Marker(wire.MarkerTime, c.next())
	}
	app := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")
	points := checkPoints(t, m, func(int, uint64) uint64 { return 1 << 20 })
	if len(points) != 1 || points[0].Seq != app.Seq || points[0].Kind != recovery.KindApp {
		t.Fatalf("points %+v, want one app-consistent point at seq %d", points, app.Seq)
	}
	// A restart replaying the segment does not cut it a third time.
	m.Write(0, 0, random(rng, 4096))
	m.Cut()
	applyAll(t, ctx, newApplier(t, m, applier.Config{PointInterval: 10 * time.Second}), m, "after a restart: ")
	if snaps, err := m.Store.ListSnapshots(ctx, layout.DiskName(m.Name, "d0")); err != nil || len(snaps) != 2 {
		t.Fatalf("%d snapshots (%v), want the crash and the app one", len(snaps), err)
	}
}

// testFence: two appliers of one machine under different fences (a
// process server that lost the machine, and the one that claimed it).
// Once the newer has claimed the replicas, the older writes nothing,
// not even a point, and is told why; the newer's replicas stay right.
func testFence(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(11, 12))
	m := recoverytest.New(t, store, "m9", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	type report struct {
		n   int64
		err error
	}
	base := layout.NextClaim(0) // as large as the process server's
	var fenceA atomic.Int64
	fenceA.Store(base + 5)
	reports := make(chan report, 4)
	a := newApplier(t, m, applier.Config{
		Fence:  func(context.Context, string, *layout.Manifest) (int64, error) { return fenceA.Load(), nil },
		Fenced: func(_ string, n int64, err error) { reports <- report{n, err} },
	})
	b := newApplier(t, m, applier.Config{Fence: func(context.Context, string, *layout.Manifest) (int64, error) { return base + 6, nil }})
	apply := func(ap *applier.Applier) error {
		_, err := ap.Apply(ctx, m.Name)
		return err
	}
	points := func() int {
		snaps, err := store.ListSnapshots(ctx, layout.DiskName(m.Name, "d0"))
		if err != nil {
			t.Fatal(err)
		}
		return len(snaps)
	}

	workload(m, rng, c, 30)
	m.Cut()
	if err := apply(a); err != nil {
		t.Fatal(err)
	}
	workload(m, rng, c, 30)
	m.Cut()
	if err := apply(b); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	at, npoints := m.Durable, points()

	workload(m, rng, c, 30)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if err := apply(a); !errors.Is(err, blobstore.ErrFenced) {
		t.Fatalf("apply under the older fence: %v, want it fenced", err)
	}
	select {
	case r := <-reports:
		if r.n != base+5 || !errors.Is(r.err, blobstore.ErrFenced) {
			t.Fatalf("Fenced told fence %d, %v; want %d and ErrFenced", r.n, r.err, base+5)
		}
	default:
		t.Fatal("Fenced not told")
	}
	checkReplica(t, m, at)
	if n := points(); n != npoints {
		t.Fatalf("%d points after the fenced pass, %d before", n, npoints)
	}
	if err := apply(b); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)

	// Claimed back (a newer fence still), the first goes on; a manifest
	// claimed above its fence does not stop it (its own claim, whose
	// write failed after it landed, say): the replicas' fences decide.
	fenceA.Store(base + 7)
	m.NewGeneration(0, 0)
	workload(m, rng, c, 20)
	m.Cut()
	if err := apply(a); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	workload(m, rng, c, 20)
	m.Cut()
	m.EditManifest(func(man *layout.Manifest) { man.Claim = base + 9 })
	if err := apply(a); err != nil {
		t.Fatalf("apply under a fence below the manifest's claim: %v", err)
	}
	checkReplica(t, m, m.Durable)
	if len(reports) != 0 {
		t.Fatal("Fenced told of a pass that was not fenced")
	}

	// A former server whose pass writes nothing (nothing new to apply)
	// still prunes: not the new owner's points. Its clock far ahead,
	// every point but the newest and the base is past its retention.
	now := time.Now()
	c2 := newApplier(t, m, applier.Config{
		Fence:     func(context.Context, string, *layout.Manifest) (int64, error) { return base + 10, nil },
		Retention: time.Hour,
		Now:       func() time.Time { return now },
	})
	workload(m, rng, c, 10)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if err := apply(c2); err != nil { // nothing old enough to prune yet
		t.Fatal(err)
	}
	b2 := newApplier(t, m, applier.Config{Fence: func(context.Context, string, *layout.Manifest) (int64, error) { return base + 11, nil }})
	if err := apply(b2); err != nil { // claims the replicas
		t.Fatal(err)
	}
	before := points()
	if before < 3 {
		t.Fatalf("%d points: too few for retention to delete one", before)
	}
	now = now.Add(48 * time.Hour)
	if err := apply(c2); err != nil { // its prune fails, logged
		t.Fatal(err)
	}
	if n := points(); n != before {
		t.Fatalf("a former server's retention deleted %d of the new owner's %d points", before-n, before)
	}
}
