package processserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// faultFS is the real file system with switchable fsync, remove and
// shard read failures and a settable free fraction.
type faultFS struct {
	cache.OSFS
	failSync   atomic.Bool
	failRemove atomic.Bool
	failReads  atomic.Bool            // reads of shard files fail with EIO
	failUnder  atomic.Pointer[string] // reads of shard files under this directory fail with EIO
	freePct    atomic.Int64           // 0: real statfs
	failStatfs atomic.Pointer[string] // statfs of this directory fails with EIO
	failFence  atomic.Bool            // fence records cannot be written
	readOnly   atomic.Pointer[string] // files cannot be created under this directory (EROFS)
	hung       atomic.Pointer[hang]   // opens and reads under a directory block
}

// hang blocks file operations under dir until released: a disk that
// neither answers nor fails.
type hang struct {
	dir     string
	release chan struct{}
}

// hangUnder makes operations under dir block, until the function it
// returns is called (by the test's cleanup at the latest).
func (f *faultFS) hangUnder(t *testing.T, dir string) (release func()) {
	h := &hang{dir: dir + string(filepath.Separator), release: make(chan struct{})}
	f.hung.Store(h)
	var once sync.Once
	release = func() {
		once.Do(func() {
			f.hung.Store(nil)
			close(h.release)
		})
	}
	t.Cleanup(release)
	return release
}

func (f *faultFS) block(name string) {
	if h := f.hung.Load(); h != nil && strings.HasPrefix(name, h.dir) {
		<-h.release
	}
}

func (f *faultFS) ReadFile(name string) ([]byte, error) {
	f.block(name)
	if f.failReads.Load() && strings.HasSuffix(name, ".shard") {
		return nil, &fs.PathError{Op: "read", Path: name, Err: syscall.EIO}
	}
	if d := f.failUnder.Load(); d != nil && strings.HasSuffix(name, ".shard") && strings.HasPrefix(name, *d+string(filepath.Separator)) {
		return nil, &fs.PathError{Op: "read", Path: name, Err: syscall.EIO}
	}
	return f.OSFS.ReadFile(name)
}

func (f *faultFS) Remove(name string) error {
	if f.failRemove.Load() {
		return &fs.PathError{Op: "remove", Path: name, Err: syscall.EIO}
	}
	return f.OSFS.Remove(name)
}

type faultFile struct {
	cache.File
	fs *faultFS
}

func (f faultFile) Sync() error {
	if f.fs.failSync.Load() {
		return errors.New("injected fsync failure")
	}
	return f.File.Sync()
}

func (f *faultFS) OpenFile(name string, flag int, perm fs.FileMode) (cache.File, error) {
	f.block(name)
	if f.failFence.Load() && strings.Contains(filepath.Base(name), ".fenced-") {
		return nil, &fs.PathError{Op: "open", Path: name, Err: syscall.EIO}
	}
	if d := f.readOnly.Load(); d != nil && flag&os.O_CREATE != 0 && strings.HasPrefix(name, *d+string(filepath.Separator)) {
		return nil, &fs.PathError{Op: "open", Path: name, Err: syscall.EROFS}
	}
	file, err := f.OSFS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return faultFile{file, f}, nil
}

func (f *faultFS) Statfs(path string) (cache.FSStat, error) {
	if d := f.failStatfs.Load(); d != nil && (path == *d || *d == "*") {
		return cache.FSStat{}, &fs.PathError{Op: "statfs", Path: path, Err: syscall.EIO}
	}
	if p := f.freePct.Load(); p > 0 {
		return cache.FSStat{Total: 100 << 30, Free: uint64(p) << 30, Avail: uint64(p) << 30}, nil
	}
	return f.OSFS.Statfs(path)
}

// cacheWriteFails starts a process server on dirs cache directories and
// an agent whose first batch is acked; then it sets fault and sends
// records 3 and 4. It returns once the agent got the error frame the
// failed cache write ends the session with, and no ack for them.
func cacheWriteFails(t *testing.T, dirs int, fault func(e *env, ffs *faultFS)) (*env, *Server, *agent) {
	t.Helper()
	e := newEnv(t, mem.New(), dirs)
	e.segAge = 20 * time.Millisecond
	ffs := &faultFS{}
	e.cacheFS = ffs
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 2))
	fault(e, ffs)
	a.batch(3, 2)
	for {
		f := a.next(10 * time.Second)
		if f.err != nil {
			t.Fatalf("connection closed without an error frame: %v", f.err)
		}
		var ack wire.Ack
		if f.typ == wire.TypeAck && ack.UnmarshalBinary(f.payload) == nil && ack.Seq >= 3 {
			t.Fatalf("ack %d although the cache write failed", ack.Seq)
		}
		var we wire.Error
		if f.typ == wire.TypeError && we.UnmarshalBinary(f.payload) == nil {
			if we.Code != wire.CodeInternal {
				t.Fatalf("error %v, want internal", we)
			}
			return e, s, a
		}
	}
}

// TestNoAckWithoutDurableCache: when the cache cannot make a segment
// durable, the agent gets no ack but an error, and the connection closes
// so that it resends.
func TestNoAckWithoutDurableCache(t *testing.T) {
	e, _, a := cacheWriteFails(t, 2, func(_ *env, ffs *faultFS) { ffs.failSync.Store(true) })
	if f := a.next(5 * time.Second); f.err == nil {
		t.Fatalf("connection still open: %s", f.typ)
	}
	if !strings.Contains(e.logs.String(), "cache write failed") {
		t.Errorf("cache failure not logged")
	}
}

// TestFailedCacheWriteLeavesNothing: a segment the cache could not make
// durable (one directory of three refused its shard) is not acked, and
// what its write left is removed: readable (two shards of three), it
// would be uploaded with records never acknowledged; unreadable, a
// restart would take it for an acknowledged segment lost (a gap, a
// resync).
func TestFailedCacheWriteLeavesNothing(t *testing.T) {
	_, s, _ := cacheWriteFails(t, 3, func(e *env, ffs *faultFS) { ffs.readOnly.Store(&e.cache[2]) })
	eventually(t, 10*time.Second, "the failed write's shards removed", func() bool {
		ids, err := s.cache.List("m1")
		return err == nil && !slices.ContainsFunc(ids, func(id cache.SegmentID) bool { return id.Seq == 3 })
	})
}

// TestCacheFullPausesAgents: cache usage drives alerts and, above 90%,
// pauses agents until it drains.
func TestCacheFullPausesAgents(t *testing.T) {
	e, ffs, s := startHalfFull(t, 1)
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	ffs.freePct.Store(28)
	eventually(t, 5*time.Second, "warning", func() bool { return strings.Contains(e.logs.String(), "cache filling up") })
	ffs.freePct.Store(5)
	a.waitWindow(10*time.Second, 0)
	if !strings.Contains(e.logs.String(), "level=ERROR msg=\"cache almost full") {
		t.Errorf("no error log for a full cache")
	}
	ffs.freePct.Store(60)
	a.waitWindow(10*time.Second, DefaultWindow)
}

// TestCacheLogSettles: the cache's log level steps down only once the
// free space is clear of its threshold: around 25 % free it alternated
// between the error and the warning every second.
func TestCacheLogSettles(t *testing.T) {
	e, ffs, _ := startHalfFull(t, 1)
	ffs.freePct.Store(24)
	eventually(t, 5*time.Second, "the error", func() bool { return strings.Contains(e.logs.String(), "cache almost full") })
	ffs.freePct.Store(26) // above 25 %, within the settling margin
	time.Sleep(2500 * time.Millisecond)
	if strings.Contains(e.logs.String(), "cache filling up") {
		t.Fatalf("the level stepped down at 26 %% free, just over the 25 %% threshold:\n%s", e.logs.String())
	}
	ffs.freePct.Store(24)
	time.Sleep(1500 * time.Millisecond)
	if n := strings.Count(e.logs.String(), "cache almost full"); n != 1 {
		t.Fatalf("the error logged %d times while free space wobbled around 25 %%", n)
	}
	ffs.freePct.Store(28)
	eventually(t, 5*time.Second, "the warning once clear of 25 %", func() bool { return strings.Contains(e.logs.String(), "cache filling up") })
}

// TestCacheFullPausesDespiteUnmeasurableDir: a cache directory whose
// usage cannot be read (statfs fails) does not turn backpressure off: the
// others, nearly full, still pause the agents.
func TestCacheFullPausesDespiteUnmeasurableDir(t *testing.T) {
	e, ffs, s := startHalfFull(t, 3)
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	ffs.failStatfs.Store(&e.cache[1])
	ffs.freePct.Store(5)
	a.waitWindow(10*time.Second, 0)
	if !strings.Contains(e.logs.String(), "cache usage unavailable") || !strings.Contains(e.logs.String(), e.cache[1]) {
		t.Errorf("the directory whose usage is unavailable is not logged")
	}
}

// TestFreeRatioUnknownWhenNoDirMeasurable: with no cache directory's
// usage readable, the free-space gauge says unknown (NaN) instead of
// keeping the last healthy value for dashboards and alerts.
func TestFreeRatioUnknownWhenNoDirMeasurable(t *testing.T) {
	_, ffs, s := startHalfFull(t, 3)
	gauge := func(g prometheus.Gauge) float64 {
		var m dto.Metric
		if err := g.Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetGauge().GetValue()
	}
	eventually(t, 10*time.Second, "free ratio 0.5", func() bool { return gauge(s.metrics.freeRatio) == 0.5 })
	all := "*"
	ffs.failStatfs.Store(&all)
	eventually(t, 10*time.Second, "free ratio unknown", func() bool { return math.IsNaN(gauge(s.metrics.freeRatio)) })
}

// TestUploadsGoOnWhileCacheCannotDelete: a cache disk that fails deletes
// (failing, or unmounted) must not hold back the uploads of what the
// cache still holds; the deletes happen once it recovers.
func TestUploadsGoOnWhileCacheCannotDelete(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 2)
	e.segAge = 20 * time.Millisecond
	ffs := &faultFS{}
	e.cacheFS = ffs
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 2))
	eventually(t, 10*time.Second, "first segment uploaded", func() bool { return durableSeq(t, store, "m1") >= 2 })
	ffs.failRemove.Store(true)
	// Each batch is a segment of its own (segAge), uploaded after the
	// step that fails to delete the one before.
	for first := uint64(3); first < 9; first += 2 {
		a.waitAck(a.batch(first, 2))
		eventually(t, 10*time.Second, fmt.Sprintf("segment %d uploaded while deletes fail", first),
			func() bool { return durableSeq(t, store, "m1") >= first+1 })
	}
	if !strings.Contains(e.logs.String(), "cannot delete an applied segment from the cache") {
		t.Errorf("failed delete not logged")
	}
	if n := shardFiles(t, e.cache[0]); n == 0 {
		t.Fatalf("no shard left in the cache although deletes failed")
	}
	ffs.failRemove.Store(false)
	a.waitAck(a.batch(9, 2)) // wakes the uploader
	eventually(t, 10*time.Second, "applied segments deleted once the cache can", func() bool { return shardFiles(t, e.cache[0]) <= 1 })
}

// gateJournal refuses the journal segments of m1, as an outage would,
// until opened.
type gateJournal struct {
	blobstore.Store
	open atomic.Bool
}

func (g *gateJournal) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if !g.open.Load() && strings.HasPrefix(name, layout.JournalPrefix("m1")) {
		return errors.New("injected outage")
	}
	return g.Store.PutBlob(ctx, name, data, md)
}

func (g *gateJournal) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if !g.open.Load() && strings.HasPrefix(name, layout.JournalPrefix("m1")) {
		return "", errors.New("injected outage")
	}
	return g.Store.PutBlobIf(ctx, name, data, md, match)
}

// cachedWhileDown has an agent's batch acknowledged (cached) while the
// journal refuses it, and stops the server: the next one reads the
// segment back from the cache to upload it.
func cachedWhileDown(t *testing.T) (*env, *gateJournal, *faultFS, *agent, uint64) {
	store := &gateJournal{Store: mem.New()}
	e := newEnv(t, store, 3)
	e.segAge = 20 * time.Millisecond
	ffs := &faultFS{}
	e.cacheFS = ffs
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	last := a.batch(1, 10)
	a.waitAck(last)
	a.conn.Close()
	s.Close()
	return e, store, ffs, a, last
}

// keptThenUploaded checks that the one cached segment is kept while the
// cache fails reads, and uploaded once it reads again.
func keptThenUploaded(t *testing.T, s *Server, e *env, ffs *faultFS, a *agent, last uint64) {
	t.Helper()
	if ids, err := s.cache.List("m1"); err != nil || len(ids) != 1 {
		t.Fatalf("cache holds %v (%v), want the segment kept", ids, err)
	}
	ffs.failReads.Store(false)
	wantUploaded(t, e, a, last)
}

// wantUploaded waits for the journal to hold everything a sent.
func wantUploaded(t *testing.T, e *env, a *agent, last uint64) {
	t.Helper()
	eventually(t, 20*time.Second, "the segment uploaded", func() bool { return durableSeq(t, e.store, "m1") >= last })
	if plain, _, _ := journal(t, e.store, e.rk, "m1"); !bytes.Equal(plain, a.sent) {
		t.Fatalf("journal holds %d bytes, want the %d acknowledged", len(plain), len(a.sent))
	}
}

// TestUnreadableCacheIsNotLost: a cached segment that cannot be read
// because the cache disks fail reads (EIO) is not declared lost (no gap,
// no tombstone, no resync, its shards kept) but retried, and uploaded
// once the reads succeed again.
func TestUnreadableCacheIsNotLost(t *testing.T) {
	e, store, ffs, a, last := cachedWhileDown(t)
	s := e.start()
	ffs.failReads.Store(true)
	const kept, lost = "cannot be read now", "acknowledged segment unreadable"
	eventually(t, 20*time.Second, "the read failure", func() bool {
		return strings.Contains(e.logs.String(), kept) || strings.Contains(e.logs.String(), lost)
	})
	notLost := func() {
		if strings.Contains(e.logs.String(), lost) {
			t.Fatal("a segment the cache could not read now was declared lost")
		}
	}
	notLost()
	store.open.Store(true)
	n := strings.Count(e.logs.String(), kept)
	eventually(t, 20*time.Second, "a retry with the journal up", func() bool { return strings.Count(e.logs.String(), kept) > n })
	notLost()
	if infos, err := store.ListBlobs(context.Background(), layout.JournalPrefix("m1")); err != nil || len(infos) != 0 {
		t.Fatalf("journal holds %v (%v) while the segment cannot be read: want nothing, no tombstone", infos, err)
	}
	keptThenUploaded(t, s, e, ffs, a, last)
}

// TestUnreadableSuspectIsKept: a segment unreadable at start because the
// cache disks fail reads is not left out and deleted as what a crash left
// of an unacknowledged store: it is kept, and uploaded once it can be
// read.
func TestUnreadableSuspectIsKept(t *testing.T) {
	e, store, ffs, a, last := cachedWhileDown(t)
	ffs.failReads.Store(true)
	store.open.Store(true)
	s := e.start()
	const kept, out = "cannot be read now", "leaving out an unreadable cached segment"
	eventually(t, 20*time.Second, "the suspect settled or kept", func() bool {
		return strings.Contains(e.logs.String(), kept) || strings.Contains(e.logs.String(), out)
	})
	if strings.Contains(e.logs.String(), out) {
		t.Fatal("a segment the cache could not read now was left out")
	}
	keptThenUploaded(t, s, e, ffs, a, last)
}

// TestSuspectDoesNotHoldBackOlderSegments: a suspect at start (what a
// crash left of a store) that cannot be read now, with one cache disk
// failing reads (within what the cache tolerates), waits to be settled;
// the older segments, readable from the other disks, are uploaded
// meanwhile. They used to wait for the disk too, and the machine's RPO
// with them.
func TestSuspectDoesNotHoldBackOlderSegments(t *testing.T) {
	e, store, ffs, a, last := cachedWhileDown(t)
	c, err := cache.Open(e.cache, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(cache.SegmentID{Stream: "m1", Seq: last + 1}, bytes.Repeat([]byte("x"), 100_000)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// The crash came before its second shard was written.
	if err := os.Remove(filepath.Join(e.cache[1], "m1", fmt.Sprintf("%016x.shard", last+1))); err != nil {
		t.Fatal(err)
	}
	ffs.failUnder.Store(&e.cache[2])
	store.open.Store(true)
	s := e.start()
	wantUploaded(t, e, a, last)
	if ids, err := s.cache.List("m1"); err != nil || !slices.Contains(ids, cache.SegmentID{Stream: "m1", Seq: last + 1}) {
		t.Errorf("cache holds %v (%v): the suspect was not kept", ids, err)
	}
}

// TestUnreadableRemainsDropped: what a crash left of an applied segment's
// delete, on a cache disk that now fails reads, is dropped as remains of
// a segment the journal holds. It used to wait for the disk, holding back
// every upload of the machine.
func TestUnreadableRemainsDropped(t *testing.T) {
	e, store, ffs, _, last := cachedWhileDown(t)
	store.open.Store(true)
	s := e.start()
	eventually(t, 30*time.Second, "upload and deletion from the cache", func() bool {
		ids, err := s.cache.List("m1")
		return err == nil && len(ids) == 0 && durableSeq(t, e.store, "m1") >= last
	})
	s.Close()
	c, err := cache.Open(e.cache, cache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Put(cache.SegmentID{Stream: "m1", Seq: 1}, bytes.Repeat([]byte("x"), 100_000)); err != nil {
		t.Fatal(err)
	}
	for _, dir := range e.cache[:2] {
		names, err := filepath.Glob(filepath.Join(dir, "m1", "*.shard"))
		if err != nil || len(names) != 1 {
			t.Fatalf("shards in %s: %v, %v", dir, names, err)
		}
		if err := os.Remove(names[0]); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	ffs.failReads.Store(true)
	s = e.start()
	eventually(t, 20*time.Second, "the remains dropped", func() bool {
		ids, err := s.cache.List("m1")
		return err == nil && len(ids) == 0
	})
}

// TestFailingCacheDiskScrubbedOnce: a cache directory that fails every
// write (read-only) while a lowered quorum acknowledges without it is
// found losing shards at every Put; the server must not scrub (read every
// cached segment from the other disks) back to back every second.
func TestFailingCacheDiskScrubbedOnce(t *testing.T) {
	e := newEnv(t, blobstoretest.NewFaulty(mem.New()), 4)
	e.segAge = 20 * time.Millisecond
	e.quorum = 3
	ffs := &faultFS{}
	e.cacheFS = ffs
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	ro := e.cache[3]
	ffs.readOnly.Store(&ro)
	seq := uint64(6)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); seq += 5 {
		a.waitAck(a.batch(seq, 5))
		time.Sleep(50 * time.Millisecond)
	}
	if n := strings.Count(e.logs.String(), "cache scrub"); n == 0 || n > 2 {
		t.Fatalf("%d scrubs while a cache disk failed writes for 5 s, want 1 (or 2, the follow-up)", n)
	}
}

// A cache disk that hangs (its writes neither end nor fail) does not hold
// the acks: where the write quorum allows, the agent's batches are
// acknowledged without it once the first put gave up on it, the journal
// receives them whole, and once the disk answers it is scrubbed for the
// shards it missed.
func TestHungCacheDiskDoesNotHoldAcks(t *testing.T) {
	e := newEnv(t, mem.New(), 4)
	e.segAge = 20 * time.Millisecond
	e.quorum = 3
	e.hangAfter = 200 * time.Millisecond
	ffs := &faultFS{}
	e.cacheFS = ffs
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	release := ffs.hangUnder(t, e.cache[3])
	seq := uint64(6)
	for range 10 {
		a.waitAck(a.batch(seq, 5))
		seq += 5
	}
	wantUploaded(t, e, a, seq-1)
	if !strings.Contains(e.logs.String(), "cache: directory does not answer") {
		t.Error("the hung cache disk was not reported")
	}
	release()
	eventually(t, 20*time.Second, "the scrub once the disk answers", func() bool {
		l := e.logs.String()
		i := strings.Index(l, "directory answers again")
		return i >= 0 && strings.Contains(l[i:], "cache scrub done")
	})
	if strings.Contains(e.logs.String(), "cache write failed") {
		t.Error("a put failed although the quorum was reached without the hung disk")
	}
	// What the cache still holds has its shard on the disk that hung.
	ids, err := s.cache.List("m1")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if n, err := s.cache.Repair(id); n != 0 || err != nil {
			t.Errorf("segment %s: %d shards missing after the scrub (%v)", id, n, err)
		}
	}
	t.Logf("%d cached segments checked", len(ids))
	s.Close()
}

// A cached segment whose every shard vanished while the server was down
// (one cache directory, a file deleted) is not published over: the
// segment after it names where it ended, so the hole is recorded as a
// loss (a gap and a tombstone), the agent's hello gets a checksum resync,
// and recoverable_until does not pass it.
func TestVanishedCachedSegmentIsALoss(t *testing.T) {
	store := &gateJournal{Store: mem.New()}
	store.open.Store(true)
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s, a, ack := e.serveFirst() // 1..5 in the journal
	store.open.Store(false)
	a.waitAck(a.batch(6, 5))
	a.waitAck(a.batch(11, 5))
	a.marker(15, wire.MarkerTime, time.Now())
	a.waitAck(a.batch(16, 1))
	a.conn.Close()
	s.Close()
	if err := os.Remove(filepath.Join(e.cache[0], "m1", fmt.Sprintf("%016x.shard", 6))); err != nil {
		t.Fatal(err)
	}
	store.open.Store(true)
	s = e.start()
	eventually(t, 20*time.Second, "the cached segments uploaded", func() bool { return durableSeq(t, store, "m1") >= 16 })
	man, err := recovery.ReadManifest(context.Background(), store, "m1")
	if err != nil {
		t.Fatal(err)
	}
	if _, gap := man.GapAt(6); !gap {
		t.Errorf("gaps %+v: the vanished segment 6..10 is not recorded lost", man.Gaps)
	}
	b := dialAgent(t, e, s, "m1")
	if ackB, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 16}); ackB.Disks[0].Action != wire.SyncChecksum {
		t.Errorf("hello after the loss answered %v, want a checksum resync", ackB.Disks[0].Action)
	}
}

// startHalfFull starts a process server on dirs cache directories of an
// in-memory store, whose file system (ffs) reports them half full.
func startHalfFull(t *testing.T, dirs int) (*env, *faultFS, *Server) {
	t.Helper()
	e := newEnv(t, mem.New(), dirs)
	ffs := &faultFS{}
	ffs.freePct.Store(50)
	e.cacheFS = ffs
	return e, ffs, e.start()
}
