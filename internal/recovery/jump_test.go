package recovery_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// TestRecoverMarkerHeadingJumpedSegment: after an unclean stop the agent
// numbers on from its lease, and its first time marker dates the acked
// sequence: the process server stores it at the head of a segment named
// from the jumped sequence. Recovering to that marker's sequence (as a
// time resolves to it) must find it there.
func TestRecoverMarkerHeadingJumpedSegment(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 8))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "jumphead", size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	for range 5 {
		m.Write(0, uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
	}
	m.Marker(wire.MarkerTime, t0)
	for range 5 {
		m.Write(0, uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
	}
	m.Cut() // [1..10], its last marker at 5
	acked := m.Seq()
	// The new run's first segment, as the process server stores it: named
	// by its first record, the marker at acked ahead of it.
	const jump = 1 << 20
	t1 := t0.Add(time.Second)
	t2 := t0.Add(2 * time.Second)
	plain := wire.AppendSegmentHeader(nil, wire.SegmentHeader{Prev: acked})
	mk, _ := (wire.Marker{Seq: acked, UnixNano: t1.UnixNano(), Kind: wire.MarkerTime}).AppendBinary(nil)
	plain, _ = wire.AppendFrame(plain, wire.TypeMarker, 0, mk)
	var b wire.BatchBuilder
	for i := uint64(0); i < 3; i++ {
		if err := b.Add(wire.Record{Seq: jump + i, Op: wire.OpWrite, Offset: 4096 * i, Length: 512, Data: randBytes(rng, 512)}); err != nil {
			t.Fatal(err)
		}
	}
	p, _ := b.AppendBinary(nil)
	plain, _ = wire.AppendFrame(plain, wire.TypeBatch, 0, p)
	mk, _ = (wire.Marker{Seq: jump + 2, UnixNano: t2.UnixNano(), Kind: wire.MarkerTime}).AppendBinary(nil)
	plain, _ = wire.AppendFrame(plain, wire.TypeMarker, 0, mk)
	name := layout.SegmentName(m.Name, jump, jump+2)
	sealed, err := seal.Seal(nil, plain, m.Key, []byte(name))
	if err != nil {
		t.Fatal(err)
	}
	md := blobstore.Metadata{
		layout.MetaFirstSeq: fmt.Sprint(jump), layout.MetaLastSeq: fmt.Sprint(jump + 2),
		layout.MetaFirstTime: fmt.Sprint(t1.UnixNano()), layout.MetaLastTime: fmt.Sprint(t2.UnixNano()),
	}
	if err := m.Store.PutBlob(context.Background(), name, sealed, md); err != nil {
		t.Fatal(err)
	}
	m.Durable, m.Until = jump+2, t2
	m.WriteManifest()

	// By time: resolves to the marker at acked.
	got, res, err := recoverBytes(t, m, t1.Format(time.RFC3339Nano), m.RecoveryKey)
	if err != nil || res.Seq != acked || !bytes.Equal(got, m.Image(0, acked)[:size]) {
		t.Fatalf("recover time %s: seq %d, %v; want seq %d", t1, res.Seq, err, acked)
	}
	// By that marker's sequence, as the CLI does by default.
	path := filepath.Join(t.TempDir(), "out")
	if _, err := recovery.RecoverFile(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: fmt.Sprint(acked), RecoveryKey: m.RecoveryKey, MarkersOnly: true}, path); err != nil {
		t.Fatalf("recover --point %d (a marker's sequence, the one time %s resolved to): %v", acked, t1.Format(time.RFC3339Nano), err)
	}
}

// TestRecoverUnprotectedDisk: a disk its agent's hellos left out from
// some sequence on (manifest unprotected_from) is not recovered at or
// after it: its replica stayed as it was while the disk went on.
func TestRecoverUnprotectedDisk(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "left", size, size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	for d := range 2 {
		m.Write(d, uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
	}
	m.Marker(wire.MarkerCrashConsistent, t0)
	before := m.Seq()
	m.Write(0, 0, randBytes(rng, 4096)) // disk 1 left out from here on
	m.Marker(wire.MarkerCrashConsistent, t0.Add(time.Second))
	m.Cut()
	m.Disks[1].UnprotectedFrom = before + 1
	m.WriteManifest()
	recoverDisk := func(disk, point string) error {
		_, err := recovery.RecoverFile(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: disk, Point: point, RecoveryKey: m.RecoveryKey},
			filepath.Join(t.TempDir(), "out"))
		return err
	}
	if err := recoverDisk("d1", "latest"); !errors.Is(err, recovery.ErrOutOfRange) || !strings.Contains(err.Error(), "did not list it") {
		t.Fatalf("disk left out, at the latest point: %v, want refused as not protected", err)
	}
	if err := recoverDisk("d1", fmt.Sprint(before)); err != nil {
		t.Fatalf("disk left out, at a point before: %v", err)
	}
	if err := recoverDisk("d0", "latest"); err != nil {
		t.Fatalf("the disk still protected: %v", err)
	}
}

// TestRecoverPrunedMarkerSaysRetention: a marker's sequence whose journal
// retention deleted is refused as out of the window, not as "not at a
// consistency marker" (its segment, and the marker in it, are gone).
func TestRecoverPrunedMarkerSaysRetention(t *testing.T) {
	rng := rand.New(rand.NewPCG(10, 10))
	m := recoverytest.New(t, mem.New(), "pruned", 64<<10)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	m.Write(0, 0, randBytes(rng, 4096))
	m.Marker(wire.MarkerTime, t0)
	marker := m.Seq()
	m.Cut()
	m.Write(0, 4096, randBytes(rng, 4096))
	m.Marker(wire.MarkerTime, t0.Add(time.Second))
	m.Cut()
	ctx := context.Background()
	segs, err := m.Store.ListBlobs(ctx, layout.JournalPrefix(m.Name))
	if err != nil || len(segs) != 2 {
		t.Fatalf("journal %v, %v", segs, err)
	}
	m.EditManifest(func(man *layout.Manifest) { man.JournalFrom = marker + 1 })
	if err := m.Store.DeleteBlob(ctx, segs[0].Name); err != nil {
		t.Fatal(err)
	}
	_, err = recovery.RecoverFile(ctx, m.Store, recovery.Request{Machine: m.Name, Disk: "d0", Point: fmt.Sprint(marker), RecoveryKey: m.RecoveryKey, MarkersOnly: true},
		filepath.Join(t.TempDir(), "out"))
	if !errors.Is(err, recovery.ErrOutOfRange) || !strings.Contains(err.Error(), "retention") {
		t.Fatalf("a marker retention pruned: %v, want refused as out of the retention window", err)
	}
}
