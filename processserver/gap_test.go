package processserver

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// gapRig is a process server without network: hellos go to agree,
// segments straight into the cache as a session would store them.
type gapRig struct {
	t     *testing.T
	store blobstore.Store
	rk    []byte
	dirs  []string
	s     *Server
	m     *machine
	gen   wire.Generation
	last  uint64 // of the last segment put
}

func newGapRig(t *testing.T, store blobstore.Store) *gapRig {
	if err := store.EnsureContainer(context.Background()); err != nil {
		t.Fatal(err)
	}
	r := &gapRig{t: t, store: store, rk: seal.NewRecoveryKey(), dirs: []string{t.TempDir(), t.TempDir(), t.TempDir()}}
	r.restart()
	t.Cleanup(func() { r.s.cache.Close() })
	ack, _, _, _, err := r.m.agree(context.Background(), r.hello(0))
	if err != nil {
		t.Fatal(err)
	}
	r.gen = ack.Disks[0].Generation
	return r
}

// restart replaces the server by a new one on the same cache and account.
func (r *gapRig) restart() {
	if r.s != nil {
		r.s.cache.Close()
	}
	c, err := cache.Open(r.dirs, cache.Options{})
	if err != nil {
		r.t.Fatal(err)
	}
	r.s = &Server{cfg: Config{SegmentBytes: 1 << 20}, log: slog.New(slog.DiscardHandler), store: r.store,
		cache: c, recoveryKey: r.rk, machines: map[string]*machine{}, freeBufs: make(chan *segBuf, 8)}
	r.s.metrics = newMetrics(r.s, nil)
	if err := r.s.scanCache(); err != nil {
		r.t.Fatal(err)
	}
	r.m = r.s.machine("m1")
}

func (r *gapRig) hello(acked uint64) *wire.Hello {
	return &wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1",
		Disks: []wire.DiskState{{Name: "d0", Size: 1 << 20, Generation: r.gen, LastAckedSeq: acked}}}
}

// put stores and acknowledges a segment of records first..last (its
// frames stand in for records), chained to the one put before.
func (r *gapRig) put(first, last uint64) { r.putFrom(first, last, wire.RunID{}) }

// putFrom is put for a segment that agent run sent.
func (r *gapRig) putFrom(first, last uint64, run wire.RunID) {
	b := &segBuf{meta: segMeta{first: first, last: last, run: run}}
	b.begin(r.last)
	b.data = append(b.data, bytes.Repeat([]byte{byte(first)}, 50_000)...)
	r.last = last
	cached, err := r.m.sealSegment(nil, b)
	if err != nil {
		r.t.Fatal(err)
	}
	id := cache.SegmentID{Stream: "m1", Seq: first}
	if err := r.s.cache.Put(id, cached); err != nil {
		r.t.Fatal(err)
	}
	r.m.segmentDurable(id, int64(len(cached)), last, 0, nil, run)
}

// uploadNewest puts the newest cached segment in the journal by hand,
// as an upload whose manifest write a crash then took.
func (r *gapRig) uploadNewest() {
	e := r.m.segs[len(r.m.segs)-1]
	data, err := r.s.cache.Get(e.id)
	if err != nil {
		r.t.Fatal(err)
	}
	meta, sealed, err := parseCached(data)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := r.store.PutBlob(context.Background(), layout.SegmentName("m1", meta.first, meta.last), sealed, meta.metadata()); err != nil {
		r.t.Fatal(err)
	}
}

func (r *gapRig) upload() {
	notified := false
	for range 3 {
		if _, err := r.m.uploadStep(context.Background(), &notified); err != nil {
			r.t.Log("upload step:", err)
		}
	}
}

func (r *gapRig) manifest() *layout.Manifest {
	man, err := recovery.ReadManifest(context.Background(), r.store, "m1")
	if err != nil {
		r.t.Fatal(err)
	}
	return man
}

func (r *gapRig) agree(acked uint64) (wire.SyncAction, uint64) {
	ack, _, _, epoch, err := r.m.agree(context.Background(), r.hello(acked))
	if err != nil {
		r.t.Fatal(err)
	}
	return ack.Disks[0].Action, epoch
}

// An acknowledged segment lost from the cache opens a gap in the manifest
// before durable_seq passes it. Neither a restart nor a hello whose answer
// never reached the agent forgets it: every hello asks for a checksum
// resync until the agent's first time marker after one, once the journal
// holds it, mends the gap.
func TestLostSegmentGapSurvivesUntilMended(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	// Segment 1 loses two of its three shards (beyond parity).
	r.loseShards(1)
	r.upload()
	man := r.manifest()
	if len(man.Gaps) != 1 || !reflect.DeepEqual(man.Gaps[0], layout.Gap{From: 1, LostTo: 10}) {
		t.Fatalf("gaps %+v after losing segment 1..10, want one open from 1, lost to 10", man.Gaps)
	}
	if man.DurableSeq != 20 {
		t.Fatalf("durable_seq %d, want 20 (segment 11..20 uploaded past the recorded gap)", man.DurableSeq)
	}

	r.restart() // before the agent reconnected
	if a, epoch := r.agree(20); a != wire.SyncChecksum || epoch == 0 {
		t.Fatalf("after a restart the agent is told %v (mend epoch %d), want a checksum resync", a, epoch)
	}
	// That answer was lost (the connection dropped): ask again.
	a, epoch := r.agree(20)
	if a != wire.SyncChecksum {
		t.Fatalf("second hello told %v, want a checksum resync", a)
	}
	// The resync's records, then its first time marker at 25: the gap
	// stays open until the journal holds 25.
	r.m.mended(epoch, 25)
	r.upload()
	if g := r.manifest().Gaps; len(g) != 1 || g[0].Open() == false {
		t.Fatalf("gaps %+v: mended before the journal held the resync", g)
	}
	r.put(21, 25)
	r.upload()
	if g := r.manifest().Gaps; len(g) != 1 || !reflect.DeepEqual(g[0], layout.Gap{From: 1, LostTo: 10, Mended: 25}) {
		t.Fatalf("gaps %+v, want [1, 25) mended", g)
	}
	if a, _ := r.agree(25); a != wire.SyncResume {
		t.Fatalf("after the gap was mended the agent is told %v, want resume", a)
	}
}

// After a restart the process server still names the agent run that made
// its newest records durable (HelloAck.LastRun: how a clone streaming
// under the same name is recognised): from its cache, or, once the cache
// is empty, from the manifest.
func TestLastRunSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	r := newGapRig(t, mem.New())
	run := wire.RunID{0xc1, 15: 0x0e}
	r.putFrom(1, 10, wire.RunID{0xaa})
	r.putFrom(11, 20, run)
	lastRun := func(what string) {
		t.Helper()
		ack, _, _, _, err := r.m.agree(ctx, r.hello(20))
		if err != nil {
			t.Fatal(err)
		}
		if ack.LastRun != run {
			t.Fatalf("%s: HelloAck.LastRun %x, want %x", what, ack.LastRun, run)
		}
	}
	r.restart()
	lastRun("restarted with the segments cached")
	r.upload()
	if man := r.manifest(); man.DurableSeq != 20 || man.LastRun != hex.EncodeToString(run[:]) {
		t.Fatalf("manifest durable_seq %d, last_run %q", man.DurableSeq, man.LastRun)
	}
	// The cache's newest segment is older than the manifest's durable_seq
	// and another run's (as when the newest cached ones are unreadable):
	// the manifest, newer, says who sent 20.
	r.putFrom(1, 10, wire.RunID{0xaa})
	r.restart()
	lastRun("restarted with an older, other run's segment cached")
	for _, d := range r.dirs {
		if err := os.RemoveAll(filepath.Join(d, "m1")); err != nil {
			t.Fatal(err)
		}
	}
	r.restart()
	lastRun("restarted with an empty cache")
}

// A newest segment lost from the cache becomes a tombstone: who sent its
// records is still known in memory, so the manifest records it, and a
// restart names the same run.
func TestLastRunAfterTombstone(t *testing.T) {
	ctx := context.Background()
	r := newGapRig(t, mem.New())
	run := wire.RunID{0xb0, 15: 0x0b}
	r.putFrom(1, 10, wire.RunID{0xaa})
	r.putFrom(11, 20, run)
	r.loseShards(11)
	r.upload()
	man := r.manifest()
	if man.DurableSeq != 20 || len(man.Gaps) != 1 || man.LastRun != hex.EncodeToString(run[:]) {
		t.Fatalf("after the tombstone: durable_seq %d, gaps %+v, last_run %q", man.DurableSeq, man.Gaps, man.LastRun)
	}
	r.restart()
	ack, _, _, _, err := r.m.agree(ctx, r.hello(20))
	if err != nil {
		t.Fatal(err)
	}
	if ack.LastRun != run {
		t.Fatalf("after a restart: HelloAck.LastRun %x, want %x", ack.LastRun, run)
	}
}

// Once retention has deleted the journal up to a mended gap's end (no
// state inside it is recoverable any more), the manifest forgets the gap.
func TestRetentionForgetsMendedGap(t *testing.T) {
	ctx := context.Background()
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.loseShards(1)
	r.upload()
	_, epoch := r.agree(20)
	r.m.mended(epoch, 25)
	r.put(21, 25)
	r.upload()
	if g := r.manifest().Gaps; len(g) != 1 || g[0].Mended != 25 {
		t.Fatalf("gaps %+v, want [1, 25) mended", g)
	}
	// Journal kept from 25: the state at 24, inside the gap, is still
	// recoverable from a point there.
	if err := r.s.UpdateManifest(ctx, "m1", func(m *layout.Manifest) { m.JournalFrom = 25 }); err != nil {
		t.Fatal(err)
	}
	if g := r.manifest().Gaps; len(g) != 1 {
		t.Fatalf("gaps %+v with journal_from 25: the state at 24 is inside the gap", g)
	}
	if err := r.s.UpdateManifest(ctx, "m1", func(m *layout.Manifest) { m.JournalFrom = 26 }); err != nil {
		t.Fatal(err)
	}
	man := r.manifest()
	if len(man.Gaps) != 0 || man.JournalFrom != 26 {
		t.Fatalf("journal_from %d, gaps %+v: want 26 and none", man.JournalFrom, man.Gaps)
	}
	r.restart()
	if a, _ := r.agree(25); a != wire.SyncResume {
		t.Fatalf("after the gap was forgotten the agent is told %v, want resume", a)
	}
}

// An agent acknowledged past what the server holds (a cache restored from
// an old state, another server) opens a gap at the first record missing.
func TestAgentAheadOpensGap(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	a, epoch := r.agree(30)
	if a != wire.SyncChecksum || epoch == 0 {
		t.Fatalf("agent acked 30, server holds 10: told %v (mend epoch %d), want a checksum resync", a, epoch)
	}
	if g := r.manifest().Gaps; len(g) != 1 || !reflect.DeepEqual(g[0], layout.Gap{From: 11, LostTo: 30}) {
		t.Fatalf("gaps %+v, want one open from 11, lost to 30", g)
	}
	// A time marker from a session answered before a newer gap opened
	// does not mend either.
	if err := r.m.openGap(context.Background(), 5, 5); err != nil {
		t.Fatal(err)
	}
	r.m.mended(epoch, 10)
	r.upload()
	if g := r.manifest().Gaps; len(g) != 2 || !g[0].Open() || !g[1].Open() {
		t.Fatalf("gaps %+v, want both open", g)
	}
}

// A process server adopts and seals again the manifest it loads: it must
// refuse one edited without the data key, or the forgery would pass.
func TestLoadRefusesTamperedManifest(t *testing.T) {
	r := newGapRig(t, mem.New())
	man := r.manifest()
	if man.Seal == "" {
		t.Fatal("the process server wrote an unsealed manifest")
	}
	man.DurableSeq = 1000
	b, err := layout.MarshalManifest(man)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.store.PutBlob(context.Background(), layout.ManifestName("m1"), b, nil); err != nil {
		t.Fatal(err)
	}
	r.restart()
	if _, _, _, _, err := r.m.agree(context.Background(), r.hello(0)); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("hello with a tampered manifest: %v, want ErrTampered", err)
	}

	// With its seal stripped, it would be taken as a manifest written
	// before sealing, and sealed again with a new key: authentic.
	man.KeyID, man.Seal, man.Gaps = "", "", nil
	if b, err = layout.MarshalManifest(man); err != nil {
		t.Fatal(err)
	}
	if err := r.store.PutBlob(context.Background(), layout.ManifestName("m1"), b, nil); err != nil {
		t.Fatal(err)
	}
	r.restart()
	if _, _, _, _, err := r.m.agree(context.Background(), r.hello(0)); !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), "seal was stripped") {
		t.Fatalf("hello with a manifest whose seal was stripped: %v, want ErrTampered", err)
	}
}

// loseShards removes two of the three shards of the segment starting at
// seq (beyond the cache's parity).
func (r *gapRig) loseShards(seq uint64) {
	for _, d := range r.dirs[:2] {
		if err := os.Remove(filepath.Join(d, "m1", fmt.Sprintf("%016x.shard", seq))); err != nil {
			r.t.Fatal(err)
		}
	}
}

// A second segment lost while a gap is open is recorded as that gap: the
// segment after it, whose header names the lost one, is explained by it
// (the applier and recovery would otherwise refuse the journal for good).
func TestSecondLossWhileGapOpen(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.loseShards(11)
	r.upload()
	r.put(21, 30)
	r.upload()
	r.put(31, 40)
	r.put(41, 50)
	r.loseShards(31)
	r.upload()
	man := r.manifest()
	want := []layout.Gap{{From: 11, LostTo: 20}, {From: 31, LostTo: 40}}
	if man.DurableSeq != 50 || !reflect.DeepEqual(man.Gaps, want) {
		t.Fatalf("durable %d, gaps %+v; want 50 and %+v", man.DurableSeq, man.Gaps, want)
	}
	// Tombstones keep the chain of segment headers whole (journal checks
	// it); they hold nothing past their header.
	_, infos, _ := journal(t, r.store, r.rk, "m1")
	for _, lost := range []string{layout.SegmentName("m1", 11, 20), layout.SegmentName("m1", 31, 40)} {
		i := slices.IndexFunc(infos, func(bi blobstore.BlobInfo) bool { return bi.Name == lost })
		if i < 0 {
			t.Fatalf("no tombstone %s in the journal", lost)
		}
		if infos[i].Size > int64(seal.Overhead+wire.SegmentHeaderSize) {
			t.Errorf("tombstone %s holds %d bytes", lost, infos[i].Size)
		}
	}
}

// A mend point belongs to the session that reported it: session A reports
// its resync complete at 25, then dies before 21..25 are durable; session
// B, asked for a resync again, must not see the gap closed by its first
// records past 25 before its own resync ends.
func TestMendOnlyByLatestResyncSession(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.loseShards(1)
	r.upload()
	_, epochA := r.agree(20)
	r.m.mended(epochA, 25)
	if a, _ := r.agree(20); a != wire.SyncChecksum {
		t.Fatalf("session B told %v, want a checksum resync", a)
	}
	r.put(31, 40)
	r.upload()
	if g := r.manifest().Gaps; len(g) != 1 || !g[0].Open() {
		t.Fatalf("gaps %+v: mended by session A's report once B's first records were in", g)
	}
}

// The newest segment lost on an idle machine: its tombstone counts as its
// upload, so a checksum resync waiting for the journal to hold everything
// the server acknowledged does not wait forever.
func TestLostNewestSegmentDoesNotBlockResync(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.loseShards(1)
	r.upload()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.m.waitUploaded(ctx, 10); err != nil {
		t.Fatalf("waiting for the journal to reach 10 after its segment was lost: %v", err)
	}
	if d := r.manifest().DurableSeq; d != 10 {
		t.Fatalf("durable_seq %d, want 10 (the tombstone)", d)
	}
}

// A segment the journal holds is never a loss, whatever became of its
// cached copy: no gap, and above all no tombstone over the journal's copy
// (uploadOne takes an unreadable copy of such a segment as remains).
func TestUnreadableCopyOfUploadedSegmentIsNoLoss(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	r.restart()
	if err := r.m.ensureLoaded(context.Background()); err != nil {
		t.Fatal(err)
	}
	e := &segEntry{id: cache.SegmentID{Stream: "m1", Seq: 1}, last: 10}
	if err := r.m.segmentLost(context.Background(), e, errors.New("test")); err == nil {
		t.Fatal("segmentLost replaced a segment the journal holds")
	}
	plain, infos, man := journal(t, r.store, r.rk, "m1")
	if len(infos) != 1 || len(plain) != 50_000 || len(man.Gaps) != 0 {
		t.Fatalf("journal of %d segments, %d bytes past the header, gaps %+v: want the real segment 1..10 (50000 bytes) and no gap", len(infos), len(plain), man.Gaps)
	}
}

// An unreadable segment newer than every readable one after a restart is
// most likely a store a crash interrupted before its ack: left out, no gap
// and no tombstone; had the agent heard its ack, its hello says so and the
// gap is recorded then.
func TestUnreadableNewestSegmentAtStartIsNoLoss(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.loseShards(11) // the crash left one shard of three
	r.restart()
	r.upload()
	// Left out of the cache too: kept, it would come back after the next
	// restart (its disk back) as a segment with a hole before it.
	if ids, err := r.s.cache.List("m1"); err != nil || slices.ContainsFunc(ids, func(id cache.SegmentID) bool { return id.Seq == 11 }) {
		t.Fatalf("cache still lists %v (%v) after leaving 11 out", ids, err)
	}
	man := r.manifest()
	if len(man.Gaps) != 0 || man.DurableSeq != 10 {
		t.Fatalf("gaps %+v, durable %d; want none, 10", man.Gaps, man.DurableSeq)
	}
	if a, _ := r.agree(10); a != wire.SyncResume {
		t.Fatalf("agent acked 10: told %v, want resume", a)
	}
	if a, _ := r.agree(20); a != wire.SyncChecksum {
		t.Fatalf("agent acked 20: told %v, want a checksum resync", a)
	}
	if g := r.manifest().Gaps; len(g) != 1 || !reflect.DeepEqual(g[0], layout.Gap{From: 11, LostTo: 20}) {
		t.Fatalf("gaps %+v, want one open from 11, lost to 20", g)
	}
}

// A crash between a segment's upload and the manifest saying so, then its
// cached copy unreadable: the journal's copy is adopted, not overwritten
// by a tombstone, and no gap is recorded.
func TestLostCopyOfSegmentInAccountIsAdopted(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	r.put(11, 20)
	// Its upload, with the manifest write lost to a crash.
	r.uploadNewest()
	r.loseShards(11)
	r.upload()
	plain, infos, man := journal(t, r.store, r.rk, "m1")
	if len(man.Gaps) != 0 || man.DurableSeq != 20 || len(infos) != 2 || len(plain) != 100_000 {
		t.Fatalf("gaps %+v, durable %d, %d segments with %d bytes: want no gap, 20, the two real segments", man.Gaps, man.DurableSeq, len(infos), len(plain))
	}
}

// gapWithoutD1 makes a machine of two disks, d0 and d1, lose a cached
// segment, and answers a hello of d0 only with a checksum resync for the
// gap (at the epoch it returns); two is a hello of both disks.
func gapWithoutD1(t *testing.T) (*gapRig, *wire.Hello, uint64) {
	t.Helper()
	r := newGapRig(t, mem.New())
	two := &wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{
		{Name: "d0", Size: 1 << 20, Generation: r.gen}, {Name: "d1", Size: 1 << 20}}}
	ack, _, _, _, err := r.m.agree(context.Background(), two)
	if err != nil {
		t.Fatal(err)
	}
	two.Disks[1].Generation = ack.Disks[1].Generation
	r.put(1, 10)
	r.put(11, 20)
	r.loseShards(1)
	r.upload()
	a, epoch := r.agree(20) // d0 only
	if a != wire.SyncChecksum {
		t.Fatalf("told %v, want a checksum resync", a)
	}
	return r, two, epoch
}

// A disk missing from the hello answered for a gap is not resynced: the
// mend leaves it out (Unmended), and when it comes back it gets a full
// sync, not a resume onto a replica that lacks the lost records.
func TestGapMendedWithoutADisk(t *testing.T) {
	r, two, epoch := gapWithoutD1(t)
	ctx := context.Background()
	r.m.mended(epoch, 20)
	r.upload()
	g := r.manifest().Gaps
	if len(g) != 1 || g[0].Open() || !reflect.DeepEqual(g[0].Unmended, []layout.UnmendedDisk{{Name: "d1"}}) {
		t.Fatalf("gaps %+v, want one mended without d1", g)
	}
	for i := range two.Disks {
		two.Disks[i].LastAckedSeq = 20
	}
	ack, _, _, _, err := r.m.agree(ctx, two)
	if err != nil {
		t.Fatal(err)
	}
	if ack.Disks[0].Action != wire.SyncResume || ack.Disks[1].Action != wire.SyncFull {
		t.Fatalf("d0 told %v, d1 %v; want resume, full sync", ack.Disks[0].Action, ack.Disks[1].Action)
	}
	ack, _, _, _, err = r.m.agree(ctx, &wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{
		{Name: "d0", Size: 1 << 20, Generation: r.gen, LastAckedSeq: 20}, {Name: "d1", Size: 1 << 20, Generation: ack.Disks[1].Generation, LastAckedSeq: 20}}})
	if err != nil || ack.Disks[1].Action != wire.SyncResume {
		t.Fatalf("after its full sync, d1 told %v (%v), want resume", ack.Disks[1].Action, err)
	}
	if g := r.manifest().Gaps; !reflect.DeepEqual(g[0].Unmended, []layout.UnmendedDisk{{Name: "d1", Until: 21}}) {
		t.Fatalf("unmended %+v, want d1 until its full sync at 21", g[0].Unmended)
	}
}

// The hello-ack names the agent run that made the newest records durable,
// so that an agent can tell another run's records under its name.
func TestHelloAckNamesLastRun(t *testing.T) {
	r := newGapRig(t, mem.New())
	run := wire.RunID{1, 2, 3}
	r.m.segmentDurable(cache.SegmentID{Stream: "m1", Seq: 1}, 0, 1, 0, nil, run)
	ack, _, _, _, err := r.m.agree(context.Background(), r.hello(1))
	if err != nil || ack.LastRun != run {
		t.Fatalf("hello-ack last run %x (%v), want %x", ack.LastRun, err, run)
	}
}

// Two suspects at start, the first unreadable, the second readable: both
// are left out, or the journal would skip the first's records with no
// tombstone and no gap (the applier and recovery would stop there).
func TestSuspectsAfterAnUnreadableOneAreLeftOut(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.put(21, 30)
	// Make 1..10 the newest readable at start: 11 and 21 unreadable then;
	// 21 comes back (a cache disk remounted) before the uploader runs.
	r.loseShards(11)
	dir := t.TempDir()
	keep := filepath.Join(r.dirs[0], "m1", fmt.Sprintf("%016x.shard", 21))
	saved := filepath.Join(dir, "s21")
	if err := os.Rename(keep, saved); err != nil {
		t.Fatal(err)
	}
	keep1 := filepath.Join(r.dirs[1], "m1", fmt.Sprintf("%016x.shard", 21))
	saved1 := filepath.Join(dir, "s21b")
	if err := os.Rename(keep1, saved1); err != nil {
		t.Fatal(err)
	}
	r.restart()
	if err := os.Rename(saved, keep); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(saved1, keep1); err != nil {
		t.Fatal(err)
	}
	r.upload()
	_, infos, man := journal(t, r.store, r.rk, "m1") // checks the header chain
	if len(infos) != 1 || man.DurableSeq != 10 || len(man.Gaps) != 0 {
		t.Fatalf("%d segments, durable %d, gaps %+v; want only 1..10, 10, none", len(infos), man.DurableSeq, man.Gaps)
	}
}

// A suspect whose upload reached the account before a crash took the
// manifest write: adopted, not left out (which would cost the agent a
// checksum resync over data the journal holds).
func TestSuspectInAccountIsAdopted(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	r.put(11, 20)
	r.uploadNewest()
	r.loseShards(11)
	r.restart()
	r.upload()
	if man := r.manifest(); man.DurableSeq != 20 || len(man.Gaps) != 0 {
		t.Fatalf("durable %d, gaps %+v; want 20, none", man.DurableSeq, man.Gaps)
	}
	if a, _ := r.agree(20); a != wire.SyncResume {
		t.Fatalf("agent acked 20: told %v, want resume", a)
	}
}

// The agent's hello may come before the uploader reaches the suspects:
// they are settled before the answer, so its resend (under the same
// names) meets none of them, and a readable later suspect cannot be
// published past the records the resend brings.
func TestSuspectsSettledBeforeHello(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	r.put(11, 20)
	r.put(21, 30)
	r.loseShards(11)
	dir := t.TempDir()
	var moved [][2]string
	for i, d := range r.dirs[:2] {
		from := filepath.Join(d, "m1", fmt.Sprintf("%016x.shard", 21))
		to := filepath.Join(dir, fmt.Sprint(i))
		if err := os.Rename(from, to); err != nil {
			t.Fatal(err)
		}
		moved = append(moved, [2]string{to, from})
	}
	r.restart()
	for _, mv := range moved { // back before anything reads it
		if err := os.Rename(mv[0], mv[1]); err != nil {
			t.Fatal(err)
		}
	}
	if a, _ := r.agree(10); a != wire.SyncResume {
		t.Fatalf("agent acked 10: told %v, want resume", a)
	}
	r.last = 10
	r.put(11, 25) // the resend, cut differently
	r.upload()
	_, infos, man := journal(t, r.store, r.rk, "m1") // checks the header chain
	if len(infos) != 2 || man.DurableSeq != 25 || len(man.Gaps) != 0 {
		t.Fatalf("%d segments, durable %d, gaps %+v; want 1..10 and 11..25, 25, none", len(infos), man.DurableSeq, man.Gaps)
	}
}

// Adoption at start when the segment before the lost copy is cached but
// not uploaded yet (both uploads done before the crash took the manifest
// write): the account copy chains to that segment.
func TestSuspectAdoptedAfterUnuploadedSegment(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.uploadNewest()
	r.loseShards(11)
	r.restart()
	r.upload()
	if man := r.manifest(); man.DurableSeq != 20 || len(man.Gaps) != 0 {
		t.Fatalf("durable %d, gaps %+v; want 20, none", man.DurableSeq, man.Gaps)
	}
	journal(t, r.store, r.rk, "m1") // the chain holds
}

// Two suspects in a row whose uploads reached the account before a crash
// took the manifest write: both adopted. The second one's predecessor is
// the first one's end, which the start-up check must know once it has
// found the first in the account (else it leaves the second out, and the
// agent pays a checksum resync for records the journal holds).
func TestTwoSuspectsInAccountAreAdopted(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	r.put(11, 20)
	r.uploadNewest()
	r.put(21, 30)
	r.uploadNewest()
	r.loseShards(11)
	r.loseShards(21)
	r.restart()
	if a, _ := r.agree(30); a != wire.SyncResume {
		t.Fatalf("agent acked 30: told %v, want resume", a)
	}
	r.upload()
	_, infos, man := journal(t, r.store, r.rk, "m1") // checks the header chain
	if len(infos) != 3 || man.DurableSeq != 30 || len(man.Gaps) != 0 {
		t.Fatalf("%d segments, durable %d, gaps %+v; want 1..10, 11..20, 21..30, 30, none", len(infos), man.DurableSeq, man.Gaps)
	}
}

// A gap whose mending resync covered only some disks: a later hello that
// adds a disk must not take the gap for mended (the shortcut for a resync
// whose records are durable), or that disk would resume over its lost
// writes and be marked unmended until some later full sync.
func TestMendShortcutOnlyForDisksItCovered(t *testing.T) {
	r, two, epoch := gapWithoutD1(t)
	ctx := context.Background()
	r.m.mended(epoch, 20) // its resync is durable, not yet uploaded
	for i := range two.Disks {
		two.Disks[i].LastAckedSeq = 20
	}
	ack, _, _, _, err := r.m.agree(ctx, two)
	if err != nil {
		t.Fatal(err)
	}
	// (A full sync: the hello that left d1 out of the resync also left
	// it unprotected, TestHelloLeavingDiskOut.)
	if ack.Disks[1].Action != wire.SyncFull {
		t.Fatalf("d1, left out of the resync, told %v; want a full sync", ack.Disks[1].Action)
	}
}

// Journal segments past durable_seq that this server does not hold (an
// earlier server uploaded them, then its cache was lost): when the agent
// turns out to be ahead, they are in the gap, and the agent numbers its
// next records from durable+1. They are deleted, or recovery would replay
// two histories of the same sequences together.
func TestForeignSegmentsPastGapDeleted(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	ctx := context.Background()
	orphan := layout.SegmentName("m1", 11, 20)
	if err := r.store.PutBlob(ctx, orphan, []byte("sealed elsewhere"), nil); err != nil {
		t.Fatal(err)
	}
	kept := layout.SegmentName("m1", 1, 10)
	if a, _ := r.agree(20); a != wire.SyncChecksum {
		t.Fatalf("agent ahead told %v, want a checksum resync", a)
	}
	if _, err := r.store.GetBlob(ctx, orphan); !blobstore.IsNotFound(err) {
		t.Fatalf("segment past the gap still there (%v)", err)
	}
	if _, err := r.store.GetBlob(ctx, kept); err != nil {
		t.Fatalf("segment within durable_seq: %v", err)
	}
}

// A segment of a resync found lost after a restart (its end unknown) ends
// where the next cached segment begins, not where the gap the hello opened
// for the agent's acknowledged records ends: its tombstone covers what it
// held, and the journal stays contiguous.
func TestLostSegmentEndsAtNextCached(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	if a, _ := r.agree(20); a != wire.SyncChecksum { // the agent had 11..20 acknowledged elsewhere
		t.Fatalf("agent ahead told %v, want a checksum resync", a)
	}
	r.put(11, 25) // the resync's records
	r.put(26, 30)
	r.restart()
	r.loseShards(11)
	r.upload()
	r.upload()
	infos, err := r.store.ListBlobs(context.Background(), layout.JournalPrefix("m1"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, bi := range infos {
		names = append(names, bi.Name)
	}
	if !slices.Contains(names, layout.SegmentName("m1", 11, 25)) || slices.Contains(names, layout.SegmentName("m1", 11, 20)) ||
		!slices.Contains(names, layout.SegmentName("m1", 26, 30)) {
		t.Fatalf("journal %v: want the tombstone of 11..25 and 26..30", names)
	}
	if man := r.manifest(); man.DurableSeq != 30 {
		t.Fatalf("durable_seq %d, want 30", man.DurableSeq)
	}
}

// A gap whose resync found nothing to send is mended at lost_to + 1, and
// the resync's first marker sits at lost_to, inside it: recoverable_until
// and idle_seq must not move to it (recover --point latest would then name
// a state inside the gap, and be refused, until the next write).
func TestMarkerInsideMendedGapNotRecoverable(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	t0 := time.Now()
	r.m.noteMarker(wire.Marker{Seq: 10, UnixNano: t0.UnixNano(), Kind: wire.MarkerTime})
	r.upload()
	r.put(11, 20)
	r.loseShards(11)
	r.upload() // gap [11, 20], its tombstone
	if _, ep := r.agree(20); ep == 0 {
		t.Fatal("no resync asked for the gap")
	} else {
		r.m.mended(ep, 20) // nothing resent: its first marker at 20
	}
	r.m.noteMarker(wire.Marker{Seq: 20, UnixNano: t0.Add(time.Second).UnixNano(), Kind: wire.MarkerTime})
	r.upload()
	man := r.manifest()
	if len(man.Gaps) != 1 || man.Gaps[0].Open() {
		t.Fatalf("gaps %+v, want the one mended", man.Gaps)
	}
	if _, in := man.GapAt(man.IdleSeq); in && man.IdleSeq != 0 {
		t.Errorf("idle_seq %d inside the gap %+v", man.IdleSeq, man.Gaps[0])
	}
	if man.RecoverableUntil.After(t0) {
		t.Errorf("recoverable_until %v moved to a marker inside the gap %+v", man.RecoverableUntil, man.Gaps[0])
	}
}

// A manifest deleted from the account while the server was down, with
// segments still cached: the server, which has no data key of the machine
// in hand then, does not write it back unsealed with the state it holds
// (read back, it would be refused as one whose seal was stripped).
func TestDeletedManifestNotWrittenUnsealed(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	r.put(11, 20)
	if err := r.store.DeleteBlob(context.Background(), layout.ManifestName("m1")); err != nil {
		t.Fatal(err)
	}
	r.restart()
	r.upload()
	raw, err := r.store.GetBlob(context.Background(), layout.ManifestName("m1"))
	if blobstore.IsNotFound(err) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	man, err := layout.UnmarshalManifest(raw)
	if err != nil {
		t.Fatal(err)
	}
	if man.Seal == "" && (man.DurableSeq > 0 || len(man.Disks) > 0) {
		t.Fatalf("manifest written back unsealed with state: durable_seq %d, disks %v", man.DurableSeq, man.Disks)
	}
}

// A marker noted once the uploader has found nothing left to upload, but
// for records it has not uploaded (their segment made durable meanwhile),
// is kept until they are: recoverable_until then moves to it, not only to
// their segment's older time, even if the agent sends no marker after it.
func TestMarkerKeptUntilItsRecordsUploaded(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.upload()
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	r.m.noteMarker(wire.Marker{Seq: 20, UnixNano: t0.UnixNano(), Kind: wire.MarkerTime})
	r.upload() // nothing to upload: 11..20 are not durable yet
	r.put(11, 20)
	r.upload()
	if man := r.manifest(); man.DurableSeq != 20 || !man.RecoverableUntil.Equal(t0) {
		t.Fatalf("durable_seq %d, recoverable_until %v; want 20 and the marker's %v", man.DurableSeq, man.RecoverableUntil, t0)
	}
}

// putAfter holds the journal upload of the segment named hold until the
// upload of the one named after has ended (so that a later upload ends
// first), and fails the first tombstone put of a name ending in fail.
type putAfter struct {
	blobstore.Store
	hold, after string
	ended       chan struct{}
	once        sync.Once
	fail        atomic.Pointer[string]
}

func (s *putAfter) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if s.hold != "" && name == s.hold {
		select {
		case <-s.ended:
		case <-time.After(10 * time.Second):
			return "", errors.New("test: the later upload did not end")
		}
	}
	etag, err := s.Store.PutBlobIf(ctx, name, data, md, match)
	if s.after != "" && name == s.after {
		s.once.Do(func() { close(s.ended) })
	}
	return etag, err
}

func (s *putAfter) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if p := s.fail.Load(); p != nil && strings.HasSuffix(name, *p) {
		s.fail.Store(nil)
		return errors.New("test: injected outage")
	}
	return s.Store.PutBlob(ctx, name, data, md)
}

// vanish removes every shard of the cached segment starting at seq, as a
// crash or a wipe of every cache disk would, between restarts.
func (r *gapRig) vanish(seq uint64) {
	r.restart()
	for _, d := range r.dirs {
		if err := os.Remove(filepath.Join(d, "m1", fmt.Sprintf("%016x.shard", seq))); err != nil {
			r.t.Fatal(err)
		}
	}
	r.restart()
}

// wantChainWhole checks that every sequence up to durable_seq is in a
// journal segment or tombstone, and that those lost (lost: sequence
// ranges, first and last) are in gaps.
func (r *gapRig) wantChainWhole(lost ...[2]uint64) {
	r.t.Helper()
	man := r.manifest()
	segs, err := recovery.ListSegments(context.Background(), r.store, "m1")
	if err != nil {
		r.t.Fatal(err)
	}
	next := uint64(1)
	for _, s := range segs {
		if s.First != next { // (overlapping segments fail here too)
			r.t.Fatalf("journal holds nothing from %d to %d (segments %+v; durable_seq %d, gaps %+v)", next, s.First-1, segs, man.DurableSeq, man.Gaps)
		}
		next = s.Last + 1
	}
	if next <= man.DurableSeq {
		r.t.Fatalf("journal ends at %d, before durable_seq %d", next-1, man.DurableSeq)
	}
	for _, l := range lost {
		for seq := l[0]; seq <= l[1]; seq++ {
			if _, gap := man.GapAt(seq); !gap {
				r.t.Fatalf("lost sequence %d is in no gap (gaps %+v)", seq, man.Gaps)
			}
		}
	}
}

// A cached segment that vanished (every shard gone while the server was
// down) between two others is not published over when the one after it is
// uploaded before the one before it ends: its loss is recorded (a gap, a
// tombstone) and the agent resyncs.
func TestVanishedSegmentNotPublishedOver(t *testing.T) {
	st := &putAfter{Store: mem.New(), ended: make(chan struct{})}
	r := newGapRig(t, st)
	r.put(1, 5)
	r.upload()
	r.put(6, 10)
	r.put(11, 15)
	r.put(16, 20)
	r.vanish(11)
	st.hold, st.after = layout.SegmentName("m1", 6, 10), layout.SegmentName("m1", 16, 20)
	r.upload()
	r.upload()
	if man := r.manifest(); man.DurableSeq != 20 {
		t.Fatalf("durable_seq %d, want 20", man.DurableSeq)
	}
	r.wantChainWhole([2]uint64{11, 15})
	if a, _ := r.agree(20); a != wire.SyncChecksum {
		t.Fatalf("hello after the loss answered %v, want a checksum resync", a)
	}
}

// A segment that vanishes while a gap is open is a loss of its own: the
// open gap does not explain it.
func TestVanishedWhileGapOpenIsItsOwnGap(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 10)
	r.put(11, 20)
	r.loseShards(1)
	r.upload()
	r.put(21, 30)
	r.put(31, 40)
	r.vanish(21)
	r.upload()
	r.upload()
	r.wantChainWhole([2]uint64{1, 10}, [2]uint64{21, 30})
}

// A segment that vanished before one found lost is in the gap too: the
// lost one's tombstone does not chain over it.
func TestVanishedBeforeLostSegment(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.put(1, 5)
	r.upload()
	r.put(6, 10)
	r.put(11, 15)
	r.put(16, 20)
	r.restart()
	r.loseShards(11)
	r.vanish(6)
	r.upload()
	r.upload()
	r.wantChainWhole([2]uint64{6, 15})
}

// The tombstone of a vanished segment that fails to be written (an
// outage after its gap was recorded) is written at the next step: the
// gap holding the range does not let the segment after it be published
// over a hole in the journal.
func TestVanishedSegmentTombstoneRetried(t *testing.T) {
	st := &putAfter{Store: mem.New()}
	r := newGapRig(t, st)
	r.put(1, 5)
	r.upload()
	r.put(6, 10)
	r.put(11, 15)
	r.vanish(6)
	name := layout.SegmentName("m1", 6, 10)
	st.fail.Store(&name)
	r.upload()
	r.upload()
	if st.fail.Load() != nil {
		t.Fatal("the tombstone was never written")
	}
	r.wantChainWhole([2]uint64{6, 10})
}

// A segment sent after the agent restarted on its lease (its first
// sequence far past the journal's end, its header chained to it), in the
// journal but not the manifest (a crash), whose cached copy is then
// unreadable, is adopted: nothing was lost, no gap, no tombstone over it.
func TestSegmentAfterJumpAdopted(t *testing.T) {
	for _, newest := range []bool{true, false} {
		r := newGapRig(t, mem.New())
		r.put(1, 10)
		r.upload()
		r.put(1000, 1010)
		r.uploadNewest()
		if !newest {
			r.put(1011, 1020)
		}
		r.restart()
		r.loseShards(1000)
		r.upload()
		r.upload()
		if man := r.manifest(); len(man.Gaps) != 0 || man.DurableSeq < 1010 {
			t.Fatalf("newest %v: durable %d, gaps %+v; want the segment adopted, no gap", newest, man.DurableSeq, man.Gaps)
		}
		plain, _, _ := journal(t, r.store, r.rk, "m1")
		if want := 50_000 * (3 - map[bool]int{true: 1, false: 0}[newest]); len(plain) != want {
			t.Fatalf("newest %v: journal holds %d bytes, want %d (a tombstone over the adopted segment?)", newest, len(plain), want)
		}
	}
}

// Segments the journal holds past the manifest's end (uploaded, the
// manifest write lost to a crash) whose cached copies then vanished are
// adopted, following their headers' chain from the journal's end, before
// a segment found lost after them: only what the chain does not reach is
// a gap, and no tombstone is written beside (or over) them.
func TestVanishedSegmentsInJournalAdopted(t *testing.T) {
	for _, headInJournal := range []bool{false, true} {
		r := newGapRig(t, mem.New())
		r.put(1, 5)
		r.upload()
		r.put(6, 10)
		r.uploadNewest()
		r.put(11, 15)
		if headInJournal {
			r.uploadNewest()
		}
		r.put(16, 20)
		r.restart()
		r.loseShards(11)
		r.vanish(6)
		r.upload()
		r.upload()
		man := r.manifest()
		switch {
		case headInJournal && len(man.Gaps) != 0:
			t.Fatalf("11..15 in the journal: gaps %+v, want none", man.Gaps)
		case !headInJournal && !reflect.DeepEqual(man.Gaps, []layout.Gap{{From: 11, LostTo: 15}}):
			t.Fatalf("11..15 lost: gaps %+v, want only 11..15 (6..10 is in the journal)", man.Gaps)
		}
		r.wantChainWhole()
	}
	// Two in a row.
	r := newGapRig(t, mem.New())
	r.put(1, 5)
	r.upload()
	r.put(6, 10)
	r.uploadNewest()
	r.put(11, 15)
	r.uploadNewest()
	r.put(16, 20)
	r.vanish(6)
	r.vanish(11)
	r.upload()
	r.upload()
	if man := r.manifest(); len(man.Gaps) != 0 || man.DurableSeq != 20 {
		t.Fatalf("two vanished segments in the journal: durable %d, gaps %+v; want 20, none", man.DurableSeq, man.Gaps)
	}
	r.wantChainWhole()
}

// realSeg seals a segment of real write records first..last chained to
// prev (tag fills their data); cached: stored in the cache and
// acknowledged; journal: uploaded (its manifest write lost).
func (r *gapRig) realSeg(first, last, prev uint64, tag byte, cached, journal bool) {
	var bb wire.BatchBuilder
	for s := first; s <= last; s++ {
		if err := bb.Add(wire.Record{Seq: s, Op: wire.OpWrite, Offset: (s % 200) * 4096, Length: 4096, Data: bytes.Repeat([]byte{tag}, 4096)}); err != nil {
			r.t.Fatal(err)
		}
	}
	p, err := bb.AppendBinary(nil)
	if err != nil {
		r.t.Fatal(err)
	}
	b := &segBuf{meta: segMeta{first: first, last: last}}
	b.begin(prev)
	b.data, _ = wire.AppendFrame(b.data, wire.TypeBatch, 0, p)
	cached2, err := r.m.sealSegment(nil, b)
	if err != nil {
		r.t.Fatal(err)
	}
	if journal {
		meta, sealed, err := parseCached(cached2)
		if err != nil {
			r.t.Fatal(err)
		}
		if err := r.store.PutBlob(context.Background(), layout.SegmentName("m1", first, last), sealed, meta.metadata()); err != nil {
			r.t.Fatal(err)
		}
	}
	if cached {
		id := cache.SegmentID{Stream: "m1", Seq: first}
		if err := r.s.cache.Put(id, cached2); err != nil {
			r.t.Fatal(err)
		}
		r.m.segmentDurable(id, int64(len(cached2)), last, 0, nil, wire.RunID{})
	}
}

// A stale process server's segment that landed inside the gap a hello
// opened (chained to the journal's end, as this server's first is) is not
// adopted when this server's next segment is found lost: its loss is
// recorded from the journal's end, and once mended the journal applies
// and recovers to its end.
func TestStaleSegmentInHelloGapNotAdopted(t *testing.T) {
	for _, last := range []uint64{10, 40} { // the stale one: within the gap, or past it
		r := newGapRig(t, mem.New())
		r.realSeg(1, 5, 0, 1, true, false)
		r.upload()
		if a, _ := r.agree(10); a != wire.SyncChecksum {
			t.Fatalf("hello with 6..10 acknowledged elsewhere: %v", a)
		}
		r.realSeg(6, last, 5, 0xee, false, true) // the other server's late upload
		r.realSeg(11, 20, 5, 2, true, false)
		r.realSeg(21, 30, 20, 3, true, false)
		r.loseShards(11)
		r.upload()
		r.upload()
		man := r.manifest()
		if _, gap := man.GapAt(11); !gap || man.DurableSeq != 30 {
			t.Fatalf("stale 6..%d: durable %d, gaps %+v; want 30 and 11..20 in a gap", last, man.DurableSeq, man.Gaps)
		}
		_, epoch := r.agree(30)
		r.m.mended(epoch, 45)
		r.realSeg(41, 45, 30, 4, true, false)
		r.upload()
		applyFresh(t, r.store, r.rk, 45)
		if _, err := recovery.RecoverFile(context.Background(), r.store, recovery.Request{Machine: "m1", Disk: "d0", Point: "45", RecoveryKey: r.rk}, filepath.Join(t.TempDir(), "d0.img")); err != nil {
			t.Fatalf("stale 6..%d: recover 45: %v", last, err)
		}
	}
}

// A segment in the journal (its manifest write lost) whose cached copy is
// found lost, its end unknown (the next cached segment starts far on, the
// agent having restarted on its lease), is adopted whole: no gap.
func TestLostBeforeJumpAdopted(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.realSeg(1, 10, 0, 1, true, false)
	r.upload()
	r.realSeg(11, 20, 10, 2, true, true)
	r.realSeg(100000000, 100000010, 20, 3, true, false)
	r.restart()
	r.loseShards(11)
	r.upload()
	r.upload()
	if man := r.manifest(); len(man.Gaps) != 0 || man.DurableSeq != 100000010 {
		t.Fatalf("durable %d, gaps %+v; want 100000010, none", man.DurableSeq, man.Gaps)
	}
	applyFresh(t, r.store, r.rk, 100000010)
}

// A segment after a jump of the sequence (the agent restarted on its
// lease), in the journal but not the manifest (a crash), whose cached copy
// then vanished, is adopted when the next one is uploaded: no gap, no
// tombstone beside it.
func TestVanishedAfterJumpAdopted(t *testing.T) {
	r := newGapRig(t, mem.New())
	r.realSeg(1, 10, 0, 1, true, false)
	r.upload()
	r.realSeg(1000, 1010, 10, 2, true, true)
	r.realSeg(1011, 1020, 1010, 3, true, false)
	r.vanish(1000)
	r.upload()
	r.upload()
	if man := r.manifest(); len(man.Gaps) != 0 || man.DurableSeq != 1020 {
		t.Fatalf("durable %d, gaps %+v; want 1020, none", man.DurableSeq, man.Gaps)
	}
	applyFresh(t, r.store, r.rk, 1020)
}
