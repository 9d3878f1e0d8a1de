package applier_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
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

// checkPoints compares the snapshots of every point with the model; size
// gives a disk's size at a sequence (it changes with a generation).
func checkPoints(t *testing.T, m *recoverytest.Machine, size func(disk int, seq uint64) uint64) []recovery.Point {
	t.Helper()
	points, _, err := recovery.Points(ctxT(t), m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range points {
		for d, disk := range m.Disks {
			want := m.Image(d, p.Seq)[:roundPage(size(d, p.Seq))]
			got := make([]byte, len(want))
			if err := m.Store.ReadPages(ctxT(t), layout.DiskName(m.Name, disk.Name), p.Snapshots[disk.Name], 0, got); err != nil {
				t.Fatalf("point %d disk %s: %v", p.Seq, disk.Name, err)
			}
			if off := firstDiff(got, want); off >= 0 {
				t.Fatalf("%s point at seq %d: disk %s differs from the disk at that seq at byte %d", p.Kind, p.Seq, disk.Name, off)
			}
		}
	}
	return points
}

// pointSeqSet is the set of the points' sequences.
func pointSeqSet(points []recovery.Point) map[uint64]bool {
	set := make(map[uint64]bool, len(points))
	for _, p := range points {
		set[p.Seq] = true
	}
	return set
}

func roundPage(n uint64) uint64 { return (n + blobstore.PageSize - 1) &^ (blobstore.PageSize - 1) }

// recoverSized is recoverAndCheck for a disk whose size at seq is size.
func recoverSized(t *testing.T, m *recoverytest.Machine, disk int, point string, seq, size uint64) recovery.Result {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	res, err := recovery.RecoverFile(ctxT(t), m.Store, recovery.Request{
		Machine: m.Name, Disk: m.Disks[disk].Name, Point: point, RecoveryKey: m.RecoveryKey,
	}, path)
	if err != nil {
		t.Fatalf("recover %s: %v", point, err)
	}
	if res.Seq != seq {
		t.Fatalf("recover %s: got seq %d, want %d", point, res.Seq, seq)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := m.Image(disk, seq)[:size]
	if off := firstDiff(got, want); off >= 0 {
		t.Fatalf("recover %s (seq %d, base %q at %d): differs from the disk at byte %d (len %d, want %d)", point, seq, res.BaseID, res.BaseSeq, off, len(got), len(want))
	}
	return res
}

// testNewGenerationWhileLagging: the ingest records a new generation (here
// with a bigger disk) while the applier still has segments of the old one
// to apply. Those must go to the old replica, and the points cut at their
// markers must be the disk at their sequence, not zeros plus a few
// records; recovery on either side of the generation start must agree.
func testNewGenerationWhileLagging(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(21, 22))
	m := recoverytest.New(t, store, "lag", 1<<20, 512<<10)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})

	workload(m, rng, c, 30)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	// Uploaded, not applied yet: the rest of the old generation.
	workload(m, rng, c, 20)
	old := m.Marker(wire.MarkerAppConsistent, c.next())
	workload(m, rng, c, 10)
	m.Cut()
	start := m.Seq() + 1
	m.NewGeneration(0, 2<<20)
	// The full sync leaves the upper half zero: an old base would show
	// through there.
	m.Write(0, 0, random(rng, 1<<20))
	mid := m.Write(1, 4096, random(rng, 8192))
	m.Write(0, 1<<20+8192, random(rng, 4096))
	fresh := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Write(0, 1<<20+4096, random(rng, 4096))
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	size := func(disk int, seq uint64) uint64 {
		if disk == 0 && seq < start {
			return 1 << 20
		}
		return m.Disks[disk].Size
	}
	points := checkPoints(t, m, size)
	seen := pointSeqSet(points)
	if !seen[old.Seq] || !seen[fresh.Seq] {
		t.Fatalf("points %+v, want ones at seq %d and %d", points, old.Seq, fresh.Seq)
	}

	recoverSized(t, m, 0, fmt.Sprint(old.Seq), old.Seq, 1<<20)
	recoverSized(t, m, 0, fmt.Sprint(start-1), start-1, 1<<20)
	// After the start, before the first point of the new generation: from
	// zeros, not from the old generation's point.
	res := recoverSized(t, m, 0, fmt.Sprint(mid), mid, 2<<20)
	if res.BaseID != "" || res.BaseSeq != start-1 {
		t.Fatalf("recover seq %d: base %q at %d, want zeros at the generation start %d", mid, res.BaseID, res.BaseSeq, start)
	}
	// latest is the last marker (the write after it is not yet covered).
	recoverSized(t, m, 0, "latest", fresh.Seq, 2<<20)
	recoverSized(t, m, 0, fmt.Sprint(m.Durable), m.Durable, 2<<20)
	recoverSized(t, m, 1, fmt.Sprint(mid), mid, 512<<10)
	recoverSized(t, m, 1, "latest", fresh.Seq, 512<<10)
}

// testReplicaLost: the replica page blob of a disk is deleted after the
// applier wrote to it. The applier recreates it, marked lost, tells the
// process server (which then asks the agent for a full sync), and cuts no
// point from it, even after a restart, until the new generation that the
// full sync brings starts.
func testReplicaLost(t *testing.T, store blobstore.Store) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(31, 32))
	m := recoverytest.New(t, store, "lost", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	var lost []string
	cfg := applier.Config{PointInterval: 1000 * time.Hour, ReplicaLost: func(machine, disk, _ string) { lost = append(lost, machine+"/"+disk) }}
	a := newApplier(t, m, cfg)
	workload(m, rng, c, 20)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	blob := layout.DiskName(m.Name, "d0")
	snaps, err := store.ListSnapshots(ctx, blob)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		if err := store.DeleteSnapshot(ctx, blob, s.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := store.DeleteBlob(ctx, blob); err != nil {
		t.Fatal(err)
	}
	workload(m, rng, c, 10)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	// A new Applier, as after a restart: it finds the blob gone.
	a = newApplier(t, m, cfg)
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if len(lost) != 1 || lost[0] != "lost/d0" {
		t.Fatalf("ReplicaLost calls %v, want one for lost/d0", lost)
	}
	info, err := store.Stat(ctx, blob)
	if err != nil || info.Metadata[layout.MetaLost] != "true" || info.Metadata[layout.MetaGeneration] != m.Disks[0].Generation {
		t.Fatalf("recreated replica: %+v, %v; want it marked lost, of the current generation", info.Metadata, err)
	}
	// Still lost after another restart: no point from an empty replica.
	workload(m, rng, c, 5)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if _, err := newApplier(t, m, cfg).Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	if points := checkPoints(t, m, func(d int, _ uint64) uint64 { return m.Disks[d].Size }); len(points) != 0 {
		t.Fatalf("points %+v cut from a lost replica", points)
	}
	// Reported again by the restarted applier: a session that resumed
	// without seeing the mark (its hello's check failed) must end.
	if len(lost) != 2 {
		t.Fatalf("ReplicaLost calls %v after a restart with the replica still lost, want two", lost)
	}
	// The agent's full sync on a new generation.
	m.NewGeneration(0, 0)
	m.Write(0, 0, random(rng, 1<<20))
	fresh := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if _, err := newApplier(t, m, cfg).Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	checkReplica(t, m, m.Durable)
	points := checkPoints(t, m, func(d int, _ uint64) uint64 { return m.Disks[d].Size })
	if len(points) != 1 || points[0].Seq != fresh.Seq {
		t.Fatalf("points %+v, want one at %d", points, fresh.Seq)
	}
	if info, err := store.Stat(ctx, blob); err != nil || info.Metadata[layout.MetaLost] != "" {
		t.Fatalf("replica of the new generation: %+v, %v; want it not marked lost", info.Metadata, err)
	}
	if len(lost) != 2 {
		t.Fatalf("ReplicaLost calls %v, want none once the new generation replaces the lost replica", lost)
	}
}

// A disk added while the applier lags gets a replica of zeros at its
// generation start, past the markers still to apply: those markers get
// their points all the same (the new disk is zeros there), and they
// recover.
func TestDiskAddedWhileLagging(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(31, 32))
	m := recoverytest.New(t, mem.New(), "added", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	workload(m, rng, c, 20)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")

	// Uploaded, not applied yet (an outage of the account, say).
	workload(m, rng, c, 20)
	lagged := m.Marker(wire.MarkerAppConsistent, c.next())
	workload(m, rng, c, 10)
	m.Cut()
	// The hello that adds the disk: its generation starts after all that.
	m.Disks = append(m.Disks, layout.Disk{Name: "d1", Size: 512 << 10, Generation: wire.Generation{1}.String(), GenerationStart: m.Seq() + 1})
	m.WriteManifest()
	m.Write(1, 4096, random(rng, 64<<10))
	fresh := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")

	points, _, err := recovery.Points(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, seq := range []uint64{lagged.Seq, fresh.Seq} {
		i := slices.IndexFunc(points, func(p recovery.Point) bool { return p.Seq == seq })
		if i < 0 {
			t.Fatalf("points %+v, want one at seq %d", points, seq)
		}
		for d, disk := range m.Disks {
			want := m.Image(d, seq)[:roundPage(disk.Size)]
			got := make([]byte, len(want))
			snap := points[i].Snapshots[disk.Name]
			if snap == "" {
				t.Fatalf("point at seq %d has no snapshot of disk %s", seq, disk.Name)
			}
			if err := m.Store.ReadPages(ctx, layout.DiskName(m.Name, disk.Name), snap, 0, got); err != nil {
				t.Fatal(err)
			}
			if off := firstDiff(got, want); off >= 0 {
				t.Fatalf("point at seq %d: disk %s differs from the disk at that seq at byte %d", seq, disk.Name, off)
			}
		}
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(lagged.Seq), lagged.Seq)
	recoverAndCheck(t, m, 1, "latest", fresh.Seq)
	// The point before d1 was protected holds zeros for it, not what it
	// held: recovering d1 there is refused.
	if _, err := recovery.Recover(ctx, m.Store, recovery.Request{Machine: m.Name, Disk: "d1", Point: fmt.Sprint(lagged.Seq), RecoveryKey: m.RecoveryKey}, discard{}); !errors.Is(err, recovery.ErrOutOfRange) || !strings.Contains(err.Error(), "not protected before") {
		t.Fatalf("recover d1 at %d, before it was protected: %v", lagged.Seq, err)
	}
}

// After a gap whose mending left a disk out (not in the resyncing hello),
// that disk's replica lacks the lost writes until its full sync's
// generation starts: points cut there leave it out (failing over from it
// would use that replica), and hold the other disks; once the new
// generation starts, points hold it again.
func TestPointLeavesUnmendedDiskOut(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(51, 52))
	m := recoverytest.New(t, mem.New(), "unmended", 1<<20, 512<<10)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	workload(m, rng, c, 20)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")

	leaveOut(m, rng, "d1")
	m.Write(0, 8192, random(rng, 4096))
	left := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")

	m.NewGeneration(1, 0) // d1's full sync
	m.Gaps[0].Unmended[0].Until = m.Disks[1].GenerationStart
	m.WriteManifest()
	m.Write(1, 0, random(rng, 512<<10))
	back := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, a, m, "")

	points, _, err := recovery.Points(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	byseq := map[uint64]recovery.Point{}
	for _, p := range points {
		byseq[p.Seq] = p
	}
	if p, ok := byseq[left.Seq]; !ok || p.Snapshots["d0"] == "" || p.Snapshots["d1"] != "" {
		t.Fatalf("points %+v: want one at seq %d holding d0 alone (d1 unmended)", points, left.Seq)
	}
	if p, ok := byseq[back.Seq]; !ok || p.Snapshots["d0"] == "" || p.Snapshots["d1"] == "" {
		t.Fatalf("points %+v: want one at seq %d holding both disks (after d1's full sync)", points, back.Seq)
	}
	if res := recoverAndCheck(t, m, 0, fmt.Sprint(left.Seq), left.Seq); res.BaseID != byseq[left.Seq].ID {
		t.Errorf("recover d0 at %d started from %q, not the point there", left.Seq, res.BaseID)
	}
	if _, err := recovery.Recover(ctx, m.Store, recovery.Request{Machine: m.Name, Disk: "d1", Point: fmt.Sprint(left.Seq), RecoveryKey: m.RecoveryKey}, discard{}); !errors.Is(err, recovery.ErrOutOfRange) || !strings.Contains(err.Error(), "did not cover this one") {
		t.Fatalf("recover d1 at %d, which its mending left out: %v, want out of range for that reason", left.Seq, err)
	}
	recoverAndCheck(t, m, 1, "latest", back.Seq)
}

// A disk left out of a gap's mending whose replica then goes missing
// (deleted, as a disk no longer protected may be) stops no point of the
// other disks either.
func TestLostLeftOutDiskStopsNoPoint(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(53, 54))
	m := recoverytest.New(t, mem.New(), "lostleft", 1<<20, 512<<10)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	cfg := applier.Config{PointInterval: 1000 * time.Hour}
	workload(m, rng, c, 20)
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	applyAll(t, ctx, newApplier(t, m, cfg), m, "")

	leaveOut(m, rng, "d1")
	left := m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if err := m.Store.DeleteBlob(ctx, layout.DiskName(m.Name, "d1")); err != nil {
		t.Fatal(err)
	}
	if _, err := newApplier(t, m, cfg).Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	points, _, err := recovery.Points(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if !pointSeqSet(points)[left.Seq] {
		t.Fatalf("points %+v: none at %d (d1 left out, its replica gone)", points, left.Seq)
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(left.Seq), left.Seq)
}

// leaveOut has the next segment (a write to disk 0) lost, and its gap
// mended by a resync that left disk out (not in the agent's hello): the
// resync sends disk 0's lost block back.
func leaveOut(m *recoverytest.Machine, rng *rand.Rand, disk string) {
	from := m.Seq() + 1
	m.Write(0, 0, random(rng, 4096))
	m.Cut()
	m.LoseSegment(len(m.Segments) - 1) // the journal holds its tombstone
	m.Gaps = []layout.Gap{{From: from, LostTo: from, Mended: from + 1, Unmended: []layout.UnmendedDisk{{Name: disk}}}}
	m.WriteManifest()
	m.Write(0, 0, m.Image(0, from)[:4096])
}
