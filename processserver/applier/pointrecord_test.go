package applier_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
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
	points, _, err := recovery.Points(ctx, store, m.Name)
	if err != nil || len(points) < 2 {
		t.Fatalf("points %+v, %v; want at least 2", points, err)
	}
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
