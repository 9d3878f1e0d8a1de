package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func tempDirs(t testing.TB, n int) []string {
	t.Helper()
	root := t.TempDir()
	dirs := make([]string, n)
	for i := range dirs {
		dirs[i] = filepath.Join(root, fmt.Sprintf("disk%d", i))
	}
	return dirs
}

func open(t testing.TB, dirs []string, opts Options) *Cache {
	t.Helper()
	c, err := Open(dirs, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// reopen closes c and opens its directories again, as a restart does.
func reopen(t testing.TB, c *Cache, opts Options) *Cache {
	t.Helper()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	return open(t, c.Dirs(), opts)
}

func payload(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 7))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func mustGet(t *testing.T, c *Cache, id SegmentID, want []byte) {
	t.Helper()
	got, err := c.Get(id)
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("get %s: %d bytes differ from the %d put", id, len(got), len(want))
	}
}

// wipe deletes everything in dir, as when a failed cache disk is replaced
// by an empty one.
func wipe(t *testing.T, dir string) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
}

func TestGeometry(t *testing.T) {
	for n, want := range map[int][2]int{1: {1, 0}, 2: {1, 1}, 3: {2, 1}, 4: {2, 2}, 6: {4, 2}} {
		c := open(t, tempDirs(t, n), Options{})
		if k, m := c.Geometry(); k != want[0] || m != want[1] {
			t.Errorf("%d dirs: %d+%d, want %d+%d", n, k, m, want[0], want[1])
		}
	}
	bad := []struct {
		n int
		o Options
	}{
		{4, Options{DataShards: 4, ParityShards: 0}}, // no parity with several dirs
		{4, Options{DataShards: 2, ParityShards: 1}}, // does not add up
		{4, Options{DataShards: 3, ParityShards: 1, WriteQuorum: 3}},
		// An overwrite on 2 of 3 would leave the old version whole in
		// the third directory.
		{3, Options{DataShards: 1, ParityShards: 2, WriteQuorum: 2}},
		{0, Options{}},
	}
	for _, b := range bad {
		if _, err := Open(tempDirs(t, b.n), b.o); err == nil {
			t.Errorf("Open(%d dirs, %+v) succeeded", b.n, b.o)
		}
	}
	d := tempDirs(t, 2)
	if _, err := Open([]string{d[0], d[0]}, Options{}); err == nil {
		t.Error("Open accepted the same directory twice")
	}
	// The same directory under another path: a new cache (created by
	// Open), and an existing one.
	d = tempDirs(t, 3)
	if err := os.Symlink(d[0], d[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(d, Options{}); err == nil || !strings.Contains(err.Error(), "same directory") ||
		!strings.Contains(err.Error(), d[0]) || !strings.Contains(err.Error(), d[1]) {
		t.Errorf("Open of a directory and a symlink to it: %v, want an error naming both", err)
	}
	if err := os.Remove(d[1]); err != nil {
		t.Fatal(err)
	}
	open(t, d, Options{})
	if err := os.RemoveAll(d[2]); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(d[1], d[2]); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(d, Options{}); err == nil || !strings.Contains(err.Error(), "same directory") {
		t.Errorf("Open of an existing cache with a directory replaced by a symlink to another: %v", err)
	}
	c := open(t, tempDirs(t, 4), Options{DataShards: 3, ParityShards: 1})
	if k, m := c.Geometry(); k != 3 || m != 1 {
		t.Errorf("configured 3+1, got %d+%d", k, m)
	}
}

func TestRoundTrip(t *testing.T) {
	sizes := []int{1, 2, 3, 4097, 1 << 20, 3*stripeLen + 5, 7*stripeLen - 1}
	for n := 1; n <= 5; n++ {
		t.Run(fmt.Sprintf("%ddirs", n), func(t *testing.T) {
			c := open(t, tempDirs(t, n), Options{})
			for i, size := range sizes {
				id := SegmentID{"machine-a", uint64(i)}
				data := payload(size, uint64(i))
				if err := c.Put(id, data); err != nil {
					t.Fatal(err)
				}
				mustGet(t, c, id, data)
				if n, err := c.Size(id); err != nil || n != int64(size) {
					t.Errorf("Size(%v) = %d, %v; want %d", id, n, err, size)
				}
			}
		})
	}
}

// Size reads the headers only: it answers with a directory gone and a
// shard whose data is corrupt, and tells an absent segment.
func TestSize(t *testing.T) {
	d := tempDirs(t, 3)
	c := open(t, d, Options{})
	id := SegmentID{"m", 7}
	if err := c.Put(id, payload(100_000, 7)); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(id, payload(50_000, 8)); err != nil { // a newer store
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(d[0], "m")); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Size(id); err != nil || n != 50_000 {
		t.Errorf("Size = %d, %v; want 50000", n, err)
	}
	if _, err := c.Size(SegmentID{"m", 8}); !errors.Is(err, ErrNotFound) {
		t.Errorf("Size of an absent segment: %v, want ErrNotFound", err)
	}
}

func TestPutValidates(t *testing.T) {
	c := open(t, tempDirs(t, 2), Options{MaxSegmentSize: 1000})
	for _, s := range []string{"", "..", "../etc", "a/b", ".hidden", strings.Repeat("x", 129), "sp ace", "lifeboat-cache.lock", "lifeboat-cache.fenced-m"} {
		if err := c.Put(SegmentID{s, 1}, []byte("x")); err == nil {
			t.Errorf("stream %q accepted", s)
		}
	}
	if err := c.Put(SegmentID{"m", 1}, nil); err == nil {
		t.Error("empty segment accepted")
	}
	if err := c.Put(SegmentID{"m", 1}, make([]byte, 1001)); err == nil {
		t.Error("oversized segment accepted")
	}
	if _, err := c.Get(SegmentID{"m", 1}); !errors.Is(err, ErrNotFound) {
		t.Errorf("get of absent segment: %v, want ErrNotFound", err)
	}
}

// The real thing: any m of 2+2 directories wiped, reopened, read back
// byte-equal; Scrub restores full redundancy; m+1 lost gives an error.
func TestSurvivesWipedDirectories(t *testing.T) {
	dirs := tempDirs(t, 4)
	c := open(t, dirs, Options{})
	segs := map[SegmentID][]byte{}
	for i := range 6 {
		id := SegmentID{fmt.Sprintf("machine-%d", i%2), uint64(i)}
		// Several stripes (stripeLen) per shard, the last one short.
		segs[id] = payload(300_000+i*333, uint64(i))
		if err := c.Put(id, segs[id]); err != nil {
			t.Fatal(err)
		}
	}
	for a := range 4 {
		for b := a + 1; b < 4; b++ {
			wipe(t, dirs[a])
			wipe(t, dirs[b])
			c = reopen(t, c, Options{})
			if got := c.Replaced(); len(got) != 2 || got[0] != dirs[a] || got[1] != dirs[b] {
				t.Fatalf("Replaced() = %v, want %s and %s", got, dirs[a], dirs[b])
			}
			for id, want := range segs {
				mustGet(t, c, id, want)
			}
			for _, s := range []string{"machine-0", "machine-1"} {
				if ids, err := c.List(s); err != nil || len(ids) != 3 {
					t.Fatalf("List(%s) = %v, %v; want 3 segments from the surviving dirs", s, ids, err)
				}
			}
			rep, err := c.Scrub(context.Background())
			if err != nil || rep.Segments != 6 || rep.RepairedShards != 12 {
				t.Fatalf("scrub after wiping %d,%d: %+v, %v", a, b, rep, err)
			}
			if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 0 {
				t.Fatalf("second scrub: %+v, %v", rep, err)
			}
		}
	}
	// Three of four gone: the error says so, no data.
	for _, d := range dirs[:3] {
		wipe(t, d)
	}
	c = reopen(t, c, Options{})
	for id := range segs {
		got, err := c.Get(id)
		if !errors.Is(err, ErrUnrecoverable) || got != nil {
			t.Fatalf("get with 3 of 4 dirs wiped: %d bytes, %v; want ErrUnrecoverable", len(got), err)
		}
		if !strings.Contains(err.Error(), "missing") {
			t.Errorf("error does not say what is missing: %v", err)
		}
	}
	rep, err := c.Scrub(context.Background())
	if !errors.Is(err, ErrUnrecoverable) || len(rep.Lost) != 6 {
		t.Fatalf("scrub: %+v, %v; want 6 lost", rep, err)
	}
}

// Directory content deleted while the cache is open (disk swapped under a
// running server): reads reconstruct, writes recreate, Scrub rebuilds.
func TestWipeWhileOpen(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	id := SegmentID{"m", 1}
	data := payload(50_000, 1)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	wipe(t, dirs[1])
	mustGet(t, c, id, data)
	id2 := SegmentID{"m", 2}
	if err := c.Put(id2, data[:777]); err != nil {
		t.Fatalf("put after wipe: %v", err)
	}
	if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 1 {
		t.Fatalf("scrub: %+v, %v", rep, err)
	}
	for _, d := range []string{dirs[0], dirs[2]} {
		wipe(t, d)
		mustGet(t, c, id, data)
		mustGet(t, c, id2, data[:777])
		if _, err := c.Scrub(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
}

// CheckDirs reports a directory that lost its shards while open, once:
// wiped whole (marker gone; it is rewritten) or with a stream directory
// gone under a write.
func TestCheckDirs(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	data := payload(50_000, 1)
	if err := c.Put(SegmentID{"m", 1}, data); err != nil {
		t.Fatal(err)
	}
	wantLost(t, c)
	wipe(t, dirs[1])
	wantLost(t, c, dirs[1])
	wantLost(t, c)
	// Lost again while being rebuilt (it has no marker then): reported
	// again.
	wipe(t, dirs[1])
	wantLost(t, c, dirs[1])
	wantLost(t, c)
	// A scrub stopped before it completes (the server closing) leaves the
	// directory unmarked: the next start finds it replaced and rebuilds.
	stopped, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Scrub(stopped); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled scrub: %v", err)
	}
	c = reopen(t, c, Options{})
	if r := c.Replaced(); !slices.Equal(r, dirs[1:2]) {
		t.Fatalf("reopened before the rebuild completed: replaced %v, want %v", r, dirs[1:2])
	}
	// A scrub that meets a problem anywhere (here a segment lost beyond
	// parity) leaves the directory pending; the next one marks it.
	if err := c.Put(SegmentID{"n", 1}, data); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dirs[0], dirs[2]} {
		if err := os.RemoveAll(filepath.Join(d, "n")); err != nil {
			t.Fatal(err)
		}
	}
	if rep, err := c.Scrub(context.Background()); !errors.Is(err, ErrUnrecoverable) || rep.RepairedShards != 1 || len(rep.Lost) != 1 {
		t.Fatalf("scrub: %+v, %v; want segment m/1 rebuilt and n/1 lost", rep, err)
	}
	wantPending(t, c, dirs[1])
	if err := c.Delete(SegmentID{"n", 1}); err != nil {
		t.Fatal(err)
	}
	if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 0 || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %+v, %v, pending %v", rep, err, c.Pending())
	}
	// The marker was rewritten: a reopened cache takes the directory as
	// its own, not as a replaced one.
	c = reopen(t, c, Options{})
	if r := c.Replaced(); len(r) != 0 {
		t.Fatalf("reopened cache: replaced %v", r)
	}

	// Only the stream directory goes once written to (known to exist):
	// the next write finds it gone.
	if err := c.Put(SegmentID{"m", 2}, data); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dirs[2], "m")); err != nil {
		t.Fatal(err)
	}
	wantLost(t, c)
	if err := c.Put(SegmentID{"m", 2}, data); err != nil {
		t.Fatal(err)
	}
	wantLost(t, c, dirs[2])
	wantLost(t, c)
	if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 1 {
		t.Fatalf("scrub: %+v, %v", rep, err)
	}
	// Both segments now survive the loss of any other directory.
	wipe(t, dirs[0])
	mustGet(t, c, SegmentID{"m", 1}, data)
	mustGet(t, c, SegmentID{"m", 2}, data)
}

// A cache directory recreated by a write after it was removed whole
// (rm -rf while in use) is fsync'd, and so is its parent, which names it:
// else a crash could take it away with the shards fsync'd in it.
func TestRecreatedDirectorySynced(t *testing.T) {
	dirs := tempDirs(t, 3)
	h := &hookFS{}
	c := open(t, dirs, Options{FS: h})
	data := payload(10_000, 1)
	if err := c.Put(SegmentID{"m", 1}, data); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(dirs[1]); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	opened := map[string]bool{} // the cache opens a directory only to fsync it
	h.onOpen = func(name string) error {
		mu.Lock()
		defer mu.Unlock()
		opened[name] = true
		return nil
	}
	if err := c.Put(SegmentID{"m", 2}, data); err != nil {
		t.Fatal(err)
	}
	h.onOpen = nil
	for _, d := range []string{filepath.Join(dirs[1], "m"), dirs[1], filepath.Dir(dirs[1])} {
		if !opened[d] {
			t.Errorf("%s not fsync'd after %s was recreated", d, dirs[1])
		}
	}
}

// wantLost checks that CheckDirs reports exactly want, without an error.
func wantLost(t *testing.T, c *Cache, want ...string) {
	t.Helper()
	if lost, err := c.CheckDirs(); err != nil || !slices.Equal(lost, want) {
		t.Fatalf("CheckDirs() = %v, %v; want %v", lost, err, want)
	}
}

// wantPending checks that exactly want are being rebuilt.
func wantPending(t *testing.T, c *Cache, want ...string) {
	t.Helper()
	if p := c.Pending(); !slices.Equal(p, want) {
		t.Fatalf("being rebuilt: %v, want %v", p, want)
	}
}

// rebuilding opens a cache of three directories through a hookFS, stores
// segments m/1..m/segments, and wipes the second directory, which
// CheckDirs then reports: it is being rebuilt.
func rebuilding(t *testing.T, segments int) (dirs []string, h *hookFS, c *Cache, data []byte) {
	t.Helper()
	dirs = tempDirs(t, 3)
	h = &hookFS{}
	c = open(t, dirs, Options{FS: h})
	data = payload(50_000, 1)
	for i := range segments {
		if err := c.Put(SegmentID{"m", uint64(i + 1)}, data); err != nil {
			t.Fatal(err)
		}
	}
	wipe(t, dirs[1])
	wantLost(t, c, dirs[1])
	return dirs, h, c, data
}

// hookFS runs hooks on reads, file opens and directory listings.
type hookFS struct {
	OSFS
	onRead    func(name string)
	onOpen    func(name string) error
	onReadDir func(name string) error
}

func (h *hookFS) ReadDir(name string) ([]fs.DirEntry, error) {
	if h.onReadDir != nil {
		if err := h.onReadDir(name); err != nil {
			return nil, err
		}
	}
	return h.OSFS.ReadDir(name)
}

// wipeQuietly is wipe for hooks, which may run on other goroutines.
func wipeQuietly(t *testing.T, dir string) {
	if err := os.RemoveAll(dir); err != nil {
		t.Error(err)
	}
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Error(err)
	}
}

// A scrub does not mark a directory that CheckDirs found lost again, or
// whose sentinel it could only write, while the scrub ran (the epoch
// moved), nor one when another directory could not be listed.
func TestScrubMarksOnlyUntouchedDirectory(t *testing.T) {
	dirs, h, c, data := rebuilding(t, 3)
	// midScrub runs fn while the scrub reads segment 2 (of 3).
	midScrub := func(fn func()) {
		var once sync.Once
		h.onRead = func(name string) {
			if strings.HasPrefix(name, filepath.Join(dirs[0], "m", "0000000000000002")) {
				once.Do(fn)
			}
		}
		if _, err := c.Scrub(context.Background()); err != nil {
			t.Fatalf("scrub: %v", err)
		}
		h.onRead = nil
	}

	// Lost again and noted by CheckDirs (a new sentinel) during the scrub.
	midScrub(func() {
		wipeQuietly(t, dirs[1])
		if lost, err := c.CheckDirs(); err != nil || !slices.Equal(lost, dirs[1:2]) {
			t.Errorf("CheckDirs() mid-scrub = %v, %v", lost, err)
		}
	})
	wantPending(t, c, dirs[1])

	// Its sentinel, unwritable until then, written during the scrub.
	h.onOpen = func(name string) error {
		if filepath.Base(name) == rebuildingName {
			return syscall.EIO
		}
		return nil
	}
	wipe(t, dirs[1])
	if _, err := c.CheckDirs(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("CheckDirs(): %v, want the sentinel's error", err)
	}
	midScrub(func() {
		h.onOpen = nil
		if lost, err := c.CheckDirs(); err != nil || len(lost) != 0 {
			t.Errorf("CheckDirs() mid-scrub = %v, %v: want the sentinel written, no new report", lost, err)
		}
	})
	wantPending(t, c, dirs[1])

	// Only a stream directory goes during the scrub: the repair of
	// segment 3 finds it gone.
	midScrub(func() {
		if err := os.RemoveAll(filepath.Join(dirs[1], "m")); err != nil {
			t.Error(err)
		}
	})
	wantPending(t, c, dirs[1])
	wantLost(t, c, dirs[1])

	// Wiped while the scrub turns its sentinel into the marker.
	if _, err := c.Scrub(context.Background()); err != nil || len(c.Pending()) != 0 {
		t.Fatalf("a clean scrub: %v, pending %v", err, c.Pending())
	}
	wipe(t, dirs[1])
	wantLost(t, c, dirs[1])
	var once sync.Once
	h.onOpen = func(name string) error {
		if name == filepath.Join(dirs[1], rebuildingName) {
			once.Do(func() { wipeQuietly(t, dirs[1]) })
		}
		return nil
	}
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.onOpen = nil
	wantPending(t, c, dirs[1])
	wantLost(t, c, dirs[1])

	// Another directory cannot be listed: segments may hide there.
	h.onReadDir = func(name string) error {
		if name == dirs[2] {
			return syscall.EIO
		}
		return nil
	}
	if _, err := c.Scrub(context.Background()); !errors.Is(err, syscall.EIO) || len(c.Pending()) != 1 {
		t.Fatalf("scrub with %s unlistable: %v, pending %v", dirs[2], err, c.Pending())
	}
	h.onReadDir = nil
	if rep, err := c.Scrub(context.Background()); err != nil || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %+v, %v, pending %v", rep, err, c.Pending())
	}
	wipe(t, dirs[0])
	for i := range 3 {
		mustGet(t, c, SegmentID{"m", uint64(i + 1)}, data)
	}
}

// A directory that cannot be listed does not hold back the rebuild of
// another: Scrub repairs what the others list, reports the listing error
// and leaves the rebuilt directory pending (segments may hide in the
// unlisted one).
func TestScrubRepairsPastUnlistableDirectory(t *testing.T) {
	dirs, h, c, data := rebuilding(t, 3)
	h.onReadDir = func(name string) error {
		if strings.HasPrefix(name, dirs[2]) {
			return syscall.EIO
		}
		return nil
	}
	rep, err := c.Scrub(context.Background())
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), dirs[2]) || rep.RepairedShards != 3 {
		t.Fatalf("scrub with %s unlistable: %+v, %v; want 3 shards rebuilt and the listing error", dirs[2], rep, err)
	}
	wantPending(t, c, dirs[1])
	h.onReadDir = nil
	if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 0 || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %+v, %v, pending %v", rep, err, c.Pending())
	}
	wipe(t, dirs[0])
	for i := range 3 {
		mustGet(t, c, SegmentID{"m", uint64(i + 1)}, data)
	}
}

func (h *hookFS) ReadFile(name string) ([]byte, error) {
	if h.onRead != nil {
		h.onRead(name)
	}
	return h.OSFS.ReadFile(name)
}

func (h *hookFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	if h.onOpen != nil {
		if err := h.onOpen(name); err != nil {
			return nil, err
		}
	}
	return h.OSFS.OpenFile(name, flag, perm)
}

// midScrub runs fn once, when a scrub of rebuilding's segments reads the
// third one (the first two are rebuilt by then).
func midScrub(h *hookFS, dirs []string, fn func()) {
	var once sync.Once
	h.onRead = func(name string) {
		if strings.HasPrefix(name, filepath.Join(dirs[0], "m", "0000000000000003")) {
			once.Do(fn)
		}
	}
}

// A directory lost again while a scrub rebuilds it is not marked complete
// by that scrub, and is reported again.
func TestScrubDoesNotMarkDirectoryLostMeanwhile(t *testing.T) {
	dirs, h, c, _ := rebuilding(t, 3)
	midScrub(h, dirs, func() { wipe(t, dirs[1]) })
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatalf("scrub: %v", err)
	}
	h.onRead = nil
	wantPending(t, c, dirs[1])
	wantLost(t, c, dirs[1])
	// Segments 1 and 2 were rebuilt before the second wipe, 3 after it.
	if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 2 || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %+v, %v, pending %v", rep, err, c.Pending())
	}
}

// A shard write that fails in a directory being rebuilt, while a scrub
// runs, keeps that scrub from marking the directory complete (the epoch
// moves on a failed write): what the failure left there is unknown. The
// Put itself fails, as every shard must be durable.
func TestFailedWriteDuringScrubKeepsPending(t *testing.T) {
	dirs, h, c, data := rebuilding(t, 3)
	var failing atomic.Bool
	h.onOpen = func(name string) error {
		if failing.Load() && strings.HasPrefix(name, filepath.Join(dirs[1], "n")+string(filepath.Separator)) {
			return syscall.EIO
		}
		return nil
	}
	// Another stream's segment, under its own lock: locks are striped by
	// a seeded hash, and the one the scrub holds (segment 3's, while the
	// hook runs) would wait for the hook to return.
	other := SegmentID{"n", 1}
	for c.lock(other) == c.lock(SegmentID{"m", 3}) {
		other.Seq++
	}
	midScrub(h, dirs, func() {
		failing.Store(true)
		if err := c.Put(other, data); err == nil || !strings.Contains(err.Error(), dirs[1]) {
			t.Errorf("put with a shard failing in %s: %v, want an error naming it", dirs[1], err)
		}
		failing.Store(false)
	})
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatalf("scrub: %v", err)
	}
	h.onRead, h.onOpen = nil, nil
	wantPending(t, c, dirs[1])
	// The next scrub, undisturbed, marks the directory. (It also
	// completes the two shards the failed Put left, taking them for a
	// segment: a known leftover, not asserted here.)
	if rep, err := c.Scrub(context.Background()); err != nil || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %+v, %v, pending %v", rep, err, c.Pending())
	}
}

// A directory wiped, and checked, while a scrub marks it rebuilt stays
// pending and is reported: CheckDirs waits its turn (the per-directory
// lock) instead of noting the loss with a new sentinel that the marking
// would then take for its own.
func TestCheckDuringMarking(t *testing.T) {
	dirs, h, c, _ := rebuilding(t, 1)
	var armed atomic.Bool // not a sync.Once: the hook may run again inside
	armed.Store(true)
	h.onOpen = func(name string) error {
		if name == filepath.Join(dirs[1], rebuildingName) && armed.CompareAndSwap(true, false) {
			wipeQuietly(t, dirs[1])
			if lost, err := c.CheckDirs(); len(lost) != 0 || err != nil {
				t.Errorf("CheckDirs() during the marking = %v, %v: want it skipped", lost, err)
			}
		}
		return nil
	}
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.onOpen = nil
	wantPending(t, c, dirs[1])
	wantLost(t, c, dirs[1])
	if rep, err := c.Scrub(context.Background()); err != nil || rep.RepairedShards != 1 || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %+v, %v, pending %v", rep, err, c.Pending())
	}
}

// A directory whose sentinel cannot be written is reported once, not on
// every check (each report costs a full scrub).
func TestSentinelWriteFailureReportedOnce(t *testing.T) {
	dirs := tempDirs(t, 3)
	h := &hookFS{}
	c := open(t, dirs, Options{FS: h})
	if err := c.Put(SegmentID{"m", 1}, payload(10_000, 1)); err != nil {
		t.Fatal(err)
	}
	h.onOpen = func(name string) error {
		if filepath.Base(name) == rebuildingName {
			return syscall.EIO
		}
		return nil
	}
	wipe(t, dirs[1])
	lost, err := c.CheckDirs()
	if !slices.Equal(lost, dirs[1:2]) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("CheckDirs() = %v, %v; want the directory and the sentinel's error", lost, err)
	}
	for range 3 {
		if lost, _ := c.CheckDirs(); len(lost) != 0 {
			t.Fatalf("reported again: %v", lost)
		}
	}
	// Without a sentinel the rebuild is not marked complete.
	if _, err := c.Scrub(context.Background()); err != nil || len(c.Pending()) != 1 {
		t.Fatalf("scrub: %v, pending %v", err, c.Pending())
	}
	h.onOpen = nil
	if lost, err := c.CheckDirs(); len(lost) != 0 || err != nil {
		t.Fatalf("CheckDirs() = %v, %v once the sentinel can be written", lost, err)
	}
	if _, err := c.Scrub(context.Background()); err != nil || len(c.Pending()) != 0 {
		t.Fatalf("scrub: %v, pending %v", err, c.Pending())
	}
}

// Every byte of one shard file corrupted in turn (header and data): Get
// still returns the original, and Repair rewrites exactly that shard.
func TestEveryByteFlipInOneShard(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	id := SegmentID{"m", 9}
	data := payload(300, 9)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	for slot := range dirs {
		p := c.shardPath(slot, id)
		orig, _ := os.ReadFile(p)
		for i := range orig {
			bad := bytes.Clone(orig)
			bad[i] ^= 1 << (i % 8)
			os.WriteFile(p, bad, 0o640)
			mustGet(t, c, id, data)
			if n, err := c.Repair(id); err != nil || n != 1 {
				t.Fatalf("slot %d byte %d: repair rewrote %d shards, %v; want 1", slot, i, n, err)
			}
			if now, _ := os.ReadFile(p); !bytes.Equal(now, orig) {
				t.Fatalf("slot %d byte %d: repaired shard differs from the original", slot, i)
			}
		}
	}
}

func TestCorruptBeyondParity(t *testing.T) {
	dirs := tempDirs(t, 4)
	c := open(t, dirs, Options{})
	id := SegmentID{"m", 1}
	data := payload(10_000, 3)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	flip := func(slot, off int) {
		p := c.shardPath(slot, id)
		b, _ := os.ReadFile(p)
		b[off] ^= 0x40
		os.WriteFile(p, b, 0o640)
	}
	flip(0, 4096+200) // data
	flip(3, 10)       // header
	mustGet(t, c, id, data)
	flip(1, 4096+2000)
	got, err := c.Get(id)
	if !errors.Is(err, ErrUnrecoverable) || got != nil {
		t.Fatalf("3 of 4 shards corrupt: %d bytes, %v", len(got), err)
	}
	t.Logf("get error: %v", err)
	if !strings.Contains(err.Error(), "checksum") {
		t.Errorf("error does not name the checksum failure: %v", err)
	}
}

// faultFS injects faults into chosen directories.
type faultFS struct {
	OSFS
	mu sync.Mutex
	// dirs are the cache directories the faults apply to.
	dirs []string
	// syncErr fails fsync of files, dirSyncErr of directories.
	syncErr, dirSyncErr error
	// writeErr fails writes after writing writeN bytes of each call.
	writeErr error
	writeN   int
	// tear silently persists only the first half of each write.
	tear bool
	// shortWrite reports writing half of each buffer, with no error.
	shortWrite bool
	stat       *FSStat
	// readErr fails reads of whole files (shards, markers).
	readErr error
	// dirSyncs counts the directory fsyncs that succeeded.
	dirSyncs int
}

func (f *faultFS) ReadFile(name string) ([]byte, error) {
	f.mu.Lock()
	err := f.readErr
	f.mu.Unlock()
	if err != nil && f.hit(name) {
		return nil, &fs.PathError{Op: "read", Path: name, Err: err}
	}
	return f.OSFS.ReadFile(name)
}

func (f *faultFS) hit(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.dirs {
		if strings.HasPrefix(name, d+string(filepath.Separator)) {
			return true
		}
	}
	return false
}

func (f *faultFS) set(fn func(f *faultFS)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *faultFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	file, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	isDir := flag == os.O_RDONLY
	if !f.hit(name) && !(isDir && f.hit(name+"/")) {
		return file, nil
	}
	return &faultFile{File: file, fs: f, isDir: isDir}, nil
}

func (f *faultFS) Statfs(path string) (FSStat, error) {
	f.mu.Lock()
	st := f.stat
	f.mu.Unlock()
	if st != nil && f.hit(path+"/") {
		return *st, nil
	}
	return f.OSFS.Statfs(path)
}

type faultFile struct {
	*os.File
	fs    *faultFS
	isDir bool
}

func (f *faultFile) Write(p []byte) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	switch {
	case f.fs.writeErr != nil:
		n, _ := f.File.Write(p[:min(f.fs.writeN, len(p))])
		return n, f.fs.writeErr
	case f.fs.tear:
		f.File.Write(p[:len(p)/2])
		return len(p), nil
	case f.fs.shortWrite:
		return f.File.Write(p[:len(p)/2])
	}
	return f.File.Write(p)
}

func (f *faultFile) Sync() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.fs.syncErr; err != nil && !f.isDir {
		return err
	}
	if err := f.fs.dirSyncErr; err != nil && f.isDir {
		return err
	}
	if f.isDir {
		f.fs.dirSyncs++
	}
	return f.File.Sync()
}

// A Delete whose removal landed but whose directory fsync failed is
// retried with the shard already gone: the retry must still make the
// removal durable, or a power loss brings the shard back.
func TestDeleteRetrySyncsDirectory(t *testing.T) {
	dirs := tempDirs(t, 3)
	ffs := &faultFS{dirs: dirs[:1]}
	c := open(t, dirs, Options{FS: ffs})
	id := SegmentID{"m", 1}
	if err := c.Put(id, payload(10_000, 3)); err != nil {
		t.Fatal(err)
	}
	ffs.set(func(f *faultFS) { f.dirSyncErr = syscall.EIO })
	if err := c.Delete(id); err == nil {
		t.Fatal("Delete with a failing directory fsync succeeded")
	}
	var before int
	ffs.set(func(f *faultFS) { f.dirSyncErr = nil; before = f.dirSyncs })
	if err := c.Delete(id); err != nil {
		t.Fatal(err)
	}
	ffs.mu.Lock()
	defer ffs.mu.Unlock()
	if ffs.dirSyncs == before {
		t.Fatal("the retried Delete did not fsync the directory its shard was removed from")
	}
}

// noTemps fails if a temporary file was left behind.
func noTemps(t *testing.T, dirs []string) {
	t.Helper()
	for _, d := range dirs {
		filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err == nil && strings.Contains(e.Name(), tmpInfix) {
				t.Errorf("temporary file left: %s", p)
			}
			return nil
		})
	}
}

func TestFaults(t *testing.T) {
	eio := fmt.Errorf("injected: %w", syscall.EIO)
	cases := []struct {
		name    string
		fault   func(f *faultFS)
		wantErr error  // from Put with quorum = all; nil = Put succeeds
		inMsg   string // must appear in Put's error
		repair  int    // shards Scrub must rewrite afterwards
	}{
		{"fsync", func(f *faultFS) { f.syncErr = eio }, syscall.EIO, "fsync shard", 1},
		{"dir-fsync", func(f *faultFS) { f.dirSyncErr = eio }, syscall.EIO, "fsync directory", 0},
		{"enospc", func(f *faultFS) { f.writeErr = syscall.ENOSPC; f.writeN = 10 }, syscall.ENOSPC, "no space left", 1},
		{"short-write", func(f *faultFS) { f.shortWrite = true }, nil, "short write", 1},
		// A torn write that the disk claims succeeded cannot be seen by
		// Put; the checksums catch it on read.
		{"torn-write", func(f *faultFS) { f.tear = true }, nil, "", 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dirs := tempDirs(t, 4)
			ffs := &faultFS{}
			c := open(t, dirs, Options{FS: ffs})
			id := SegmentID{"m", 5}
			old := payload(70_001, 1)
			if err := c.Put(id, old); err != nil {
				t.Fatal(err)
			}
			ffs.set(func(f *faultFS) { f.dirs = dirs[2:3]; tc.fault(f) })
			data := payload(70_001, 2)
			err := c.Put(id, data)
			switch {
			case tc.inMsg == "" && err != nil:
				t.Fatalf("put: %v", err)
			case tc.inMsg != "" && err == nil:
				t.Fatal("put succeeded despite the fault")
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Fatalf("put: %v, want errors.Is %v", err, tc.wantErr)
			case tc.inMsg != "" && (!strings.Contains(err.Error(), tc.inMsg) || !strings.Contains(err.Error(), dirs[2])):
				t.Fatalf("put error %q does not name %q and the directory", err, tc.inMsg)
			}
			t.Logf("put error: %v", err)
			noTemps(t, dirs)

			// Reads return one complete version, never a mix: here the
			// new one, which has at least 3 of 4 shards.
			got, err := c.Get(id)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("get after fault: err %v, equal to new %v, to old %v", err, bytes.Equal(got, data), bytes.Equal(got, old))
			}
			// Once the disk behaves, Scrub restores the shard.
			ffs.set(func(f *faultFS) { f.dirs = nil })
			rep, err := c.Scrub(context.Background())
			if err != nil || rep.RepairedShards != tc.repair {
				t.Fatalf("scrub: %+v, %v; want %d shards repaired", rep, err, tc.repair)
			}
			wipe(t, dirs[0])
			wipe(t, dirs[1])
			mustGet(t, c, id, data)
		})
	}
}

// Shards that cannot be read (EIO) are not corrupt: with m+1 directories
// failing reads, a segment is unavailable, not lost (the server would
// otherwise declare it lost and delete it), and reads back whole once the
// disks answer again.
func TestReadErrorsAreNotLoss(t *testing.T) {
	dirs := tempDirs(t, 4)
	ffs := &faultFS{}
	c := open(t, dirs, Options{FS: ffs})
	id := SegmentID{"m", 1}
	data := payload(70_001, 1)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	ffs.set(func(f *faultFS) { f.dirs = dirs[:3]; f.readErr = syscall.EIO })
	got, err := c.Get(id)
	if got != nil || !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnrecoverable) || errors.Is(err, ErrNotFound) {
		t.Fatalf("get with 3 of 4 directories failing reads: %d bytes, %v; want ErrUnavailable only", len(got), err)
	}
	if !strings.Contains(err.Error(), dirs[2]) || !strings.Contains(err.Error(), "input/output error") {
		t.Errorf("error does not name the directories and their errors: %v", err)
	}
	t.Logf("get error: %v", err)
	rep, err := c.Scrub(context.Background())
	if len(rep.Lost) != 0 || len(rep.Failed) != 1 || !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnrecoverable) {
		t.Fatalf("scrub with reads failing: %+v, %v; want the segment failed, not lost", rep, err)
	}
	ffs.set(func(f *faultFS) { f.dirs = nil })
	mustGet(t, c, id, data)
}

// With a write quorum below k+m, one failing disk does not stop Puts.
func TestWriteQuorum(t *testing.T) {
	dirs := tempDirs(t, 4)
	ffs := &faultFS{}
	c := open(t, dirs, Options{FS: ffs, WriteQuorum: 3})
	ffs.set(func(f *faultFS) { f.dirs = dirs[:1]; f.writeErr = syscall.ENOSPC })
	id := SegmentID{"m", 1}
	data := payload(5000, 1)
	if err := c.Put(id, data); err != nil {
		t.Fatalf("put with quorum 3 and one full disk: %v", err)
	}
	ffs.set(func(f *faultFS) { f.dirs = dirs[:2] }) // second disk fails too
	if err := c.Put(SegmentID{"m", 2}, data); !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "2 of 4 shards durable, need 3") {
		t.Fatalf("put with two full disks: %v", err)
	}
	ffs.set(func(f *faultFS) { f.dirs = nil })
	// The directory that missed a shard is reported, and the scrub that
	// calls for rebuilds the shard: the segment has its full redundancy.
	if lost, err := c.CheckDirs(); err != nil || !slices.Equal(lost, dirs[:1]) {
		t.Fatalf("CheckDirs after a put at reduced redundancy: lost %v (want %v), %v", lost, dirs[:1], err)
	}
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	wipe(t, dirs[1]) // one more loss is still tolerated thanks to the quorum
	wipe(t, dirs[2]) // and, rebuilt, a second one
	mustGet(t, c, id, data)
}

// An overwrite that reached fewer than k directories must not be mixed
// with the previous version's shards.
func TestFailedOverwriteReturnsOldVersion(t *testing.T) {
	dirs := tempDirs(t, 4)
	c := open(t, dirs, Options{})
	id := SegmentID{"m", 1}
	old := payload(9000, 1)
	if err := c.Put(id, old); err != nil {
		t.Fatal(err)
	}
	// Only shard 0 of the overwrite becomes durable.
	c2 := reopen(t, c, Options{FS: multiFault{dirs[1:]}})
	if err := c2.Put(id, payload(9000, 2)); err == nil {
		t.Fatal("put succeeded with 3 of 4 shards failing")
	}
	c = reopen(t, c2, Options{})
	reads := c.readShards(id, nil)
	if reads[0].err != nil || reads[1].err != nil || reads[0].hdr.gen <= reads[1].hdr.gen {
		t.Fatalf("setup: shard 0 should hold a newer version than shard 1: %+v %+v", reads[0].err, reads[1].err)
	}
	mustGet(t, c, id, old)
	if n, err := c.Repair(id); err != nil || n != 1 {
		t.Fatalf("repair: %d, %v; want the stray new shard replaced", n, err)
	}
	wipe(t, dirs[2])
	wipe(t, dirs[3])
	mustGet(t, c, id, old)
}

// multiFault fails every fsync below the given directories.
type multiFault struct{ dirs []string }

func (m multiFault) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	for _, d := range m.dirs {
		if strings.HasPrefix(name, d+"/") && flag != os.O_RDONLY {
			return &faultFile{File: f, fs: &faultFS{syncErr: syscall.EIO}}, nil
		}
	}
	return f, nil
}
func (multiFault) ReadFile(name string) ([]byte, error)       { return os.ReadFile(name) }
func (multiFault) ReadDir(name string) ([]fs.DirEntry, error) { return os.ReadDir(name) }
func (multiFault) Rename(o, n string) error                   { return os.Rename(o, n) }
func (multiFault) Remove(name string) error                   { return os.Remove(name) }
func (multiFault) MkdirAll(p string, perm fs.FileMode) error  { return os.MkdirAll(p, perm) }
func (multiFault) Statfs(p string) (FSStat, error)            { return OSFS{}.Statfs(p) }

func TestListDeleteStreams(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	seqs := []uint64{1 << 40, 3, 0, 17, 16}
	for _, s := range seqs {
		if err := c.Put(SegmentID{"b", s}, []byte{byte(s)}); err != nil {
			t.Fatal(err)
		}
	}
	c.Put(SegmentID{"a", 1}, []byte("x"))
	// A segment whose shard survives in one directory only is still listed.
	os.Remove(c.shardPath(0, SegmentID{"b", 17}))
	os.Remove(c.shardPath(1, SegmentID{"b", 17}))
	ids, err := c.List("b")
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	for _, id := range ids {
		got = append(got, id.Seq)
	}
	if fmt.Sprint(got) != fmt.Sprint([]uint64{0, 3, 16, 17, 1 << 40}) {
		t.Fatalf("List = %v", got)
	}
	if s, err := c.Streams(); err != nil || fmt.Sprint(s) != "[a b]" {
		t.Fatalf("Streams = %v, %v", s, err)
	}
	for _, s := range seqs {
		if err := c.Delete(SegmentID{"b", s}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Delete(SegmentID{"b", 3}); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if ids, _ := c.List("b"); len(ids) != 0 {
		t.Fatalf("after delete: %v", ids)
	}
	if _, err := c.Get(SegmentID{"b", 3}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if ids, err := c.List("never"); err != nil || len(ids) != 0 {
		t.Fatalf("List of unknown stream: %v, %v", ids, err)
	}
}

func TestOpenChecksDirectories(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	if err := c.Put(SegmentID{"m", 1}, []byte("abc")); err != nil {
		t.Fatal(err)
	}
	if _, err := Open([]string{dirs[1], dirs[0], dirs[2]}, Options{}); err == nil || !strings.Contains(err.Error(), "original order") {
		t.Errorf("reordered dirs: %v", err)
	}
	if _, err := Open(dirs[:2], Options{}); err == nil || !strings.Contains(err.Error(), "number of directories") {
		t.Errorf("fewer dirs: %v", err)
	}
	other := tempDirs(t, 3)
	open(t, other, Options{})
	if _, err := Open([]string{dirs[0], dirs[1], other[2]}, Options{}); err == nil || !strings.Contains(err.Error(), "different caches") {
		t.Errorf("mixed caches: %v", err)
	}
	// A stale temporary file from a crash is removed by Open.
	stale := c.shardPath(1, SegmentID{"m", 2}) + tmpInfix + "123"
	os.WriteFile(stale, []byte("partial"), 0o640)
	c = reopen(t, c, Options{})
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file survived Open: %v", err)
	}
	if len(c.Replaced()) != 0 {
		t.Errorf("Replaced = %v on a healthy cache", c.Replaced())
	}
}

// A second Open of a cache's directories while it is open (a process
// server started by hand while the service runs) fails, naming the
// directory, and removes none of the first one's temporary files; after
// Close it succeeds. (A crashed process's lock goes with it: flock.)
func TestOpenLocksDirectories(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	if err := c.Put(SegmentID{"m", 1}, []byte("abc")); err != nil {
		t.Fatal(err)
	}
	inFlight := c.shardPath(1, SegmentID{"m", 2}) + tmpInfix + "123"
	if err := os.WriteFile(inFlight, []byte("partial"), 0o640); err != nil {
		t.Fatal(err)
	}
	_, err := Open(dirs, Options{})
	if err == nil || !strings.Contains(err.Error(), "in use by another process server") || !strings.Contains(err.Error(), dirs[0]) {
		t.Fatalf("second Open: %v, want the directory in use", err)
	}
	if _, err := os.Stat(inFlight); err != nil {
		t.Fatalf("the refused Open removed a temporary file in flight: %v", err)
	}
	// Locked in part (one directory held elsewhere): nothing stays locked.
	other, err := os.OpenFile(filepath.Join(dirs[2], lockName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(other.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dirs, Options{}); err == nil || !strings.Contains(err.Error(), dirs[2]) {
		t.Fatalf("Open with %s locked: %v", dirs[2], err)
	}
	other.Close()
	c = open(t, dirs, Options{})
	mustGet(t, c, SegmentID{"m", 1}, []byte("abc"))
}

func TestUsage(t *testing.T) {
	dirs := tempDirs(t, 2)
	ffs := &faultFS{}
	c := open(t, dirs, Options{FS: ffs})
	ffs.set(func(f *faultFS) { f.dirs = dirs[1:]; f.stat = &FSStat{Total: 1000, Free: 60, Avail: 50} })
	u := c.Usage()
	if u[0].Dir != dirs[0] || u[0].Total == 0 || u[0].FreeFraction <= 0 || u[0].FreeFraction > 1 || u[0].Used > u[0].Total {
		t.Errorf("real dir usage: %+v", u[0])
	}
	if u[1] != (DirUsage{Dir: dirs[1], Total: 1000, Used: 940, Free: 50, FreeFraction: 0.05}) {
		t.Errorf("nearly full dir: %+v", u[1])
	}
	// Out of inodes with room to spare: as full (it was taken for 90 %
	// free, agents never paused while every shard write failed).
	ffs.set(func(f *faultFS) { f.stat = &FSStat{Total: 1000, Free: 990, Avail: 900, Files: 100, FilesFree: 2} })
	if u := c.Usage(); u[1].FreeFraction != 0.02 {
		t.Errorf("dir out of inodes: %+v, want free fraction 0.02", u[1])
	}
}

// BenchmarkPutGet: 4 MiB segments over 4 directories (2+2), Put (with all
// fsyncs) followed by Get. SetBytes counts the segment once.
func BenchmarkPutGet(b *testing.B) {
	c := open(b, tempDirs(b, 4), Options{})
	data := payload(4<<20, 1)
	b.SetBytes(int64(len(data)))
	var seq uint64
	for b.Loop() {
		id := SegmentID{"bench", seq % 8}
		seq++
		if err := c.Put(id, data); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Get(id); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkGetDegraded reads with two of four shards missing, the worst
// case the cache tolerates.
func BenchmarkGetDegraded(b *testing.B) {
	dirs := tempDirs(b, 4)
	c := open(b, dirs, Options{})
	data := payload(4<<20, 1)
	id := SegmentID{"bench", 1}
	if err := c.Put(id, data); err != nil {
		b.Fatal(err)
	}
	os.Remove(c.shardPath(0, id))
	os.Remove(c.shardPath(1, id))
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := c.Get(id); err != nil {
			b.Fatal(err)
		}
	}
}

func TestConcurrent(t *testing.T) {
	dirs := tempDirs(t, 4)
	c := open(t, dirs, Options{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			stream := fmt.Sprintf("m%d", w%2) // two workers share a stream
			for i := range 8 {
				id := SegmentID{stream, uint64(w*100 + i)}
				data := payload(3000+i, uint64(w*100+i))
				if err := c.Put(id, data); err != nil {
					t.Error(err)
					return
				}
				if got, err := c.Get(id); err != nil || !bytes.Equal(got, data) {
					t.Errorf("get %s: %v", id, err)
				}
				if i%2 == 0 {
					if err := c.Delete(id); err != nil {
						t.Error(err)
					}
				}
			}
		})
	}
	wg.Wait()
	for _, s := range []string{"m0", "m1"} {
		if ids, err := c.List(s); err != nil || len(ids) != 8 {
			t.Errorf("List(%s) = %d segments, %v; want 8", s, len(ids), err)
		}
	}
}

// Shards are written with O_DIRECT where the file system allows it, from
// aligned regions cut back to size: every header and segment length must
// come back byte for byte, whether or not the directory took O_DIRECT.
func TestPutShardSizes(t *testing.T) {
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	c, err := Open(dirs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	seq := uint64(0)
	for _, stream := range []string{"m", "machine-with-a-longer-name"} {
		for i, size := range []int{1, 511, 4096, 4097, 8100, 1<<20 + 3, 8<<20 - 5} {
			// Put writes an aligned segment without copying it, and
			// copies one that is not.
			for _, misalign := range []int{0, 1} {
				data := aligned(make([]byte, size+misalign+directAlign))[misalign : misalign+size]
				putShardSize(t, c, dirs, SegmentID{Stream: stream, Seq: seq + 1}, data, i)
				seq++
			}
		}
	}
	for slot := range dirs {
		t.Logf("directory %d: O_DIRECT %v", slot, !c.noDirect[slot].Load())
	}
}

func putShardSize(t *testing.T, c *Cache, dirs []string, id SegmentID, data []byte, seed int) {
	t.Helper()
	for j := range data {
		data[j] = byte(j*7 + seed)
	}
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	shardLen := alignUp((len(data) + 1) / 2)
	for slot := range dirs {
		st, err := os.Stat(c.shardPath(slot, id))
		if err != nil {
			t.Fatal(err)
		}
		if want := int64(alignUp(fixedHdrLen+len(id.Stream)+4) + shardLen); st.Size() != want {
			t.Errorf("%s shard %d: file of %d bytes, want %d", id, slot, st.Size(), want)
		}
	}
	got, err := c.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("%s: Get returned other bytes", id)
	}
}

// TestReadsVersion1Shards: shards written before the aligned layout
// (version 1: data right after the header, shard length ⌈len/k⌉) are
// still read, and Repair rebuilds a lost one next to them.
func TestReadsVersion1Shards(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	id := SegmentID{"m", 5}
	data := payload(100_003, 5)
	shardLen := (len(data) + 1) / 2
	shards := make([][]byte, 3)
	for i := range shards {
		shards[i] = make([]byte, shardLen)
		if i < 2 {
			copy(shards[i], data[min(len(data), i*shardLen):])
		}
	}
	enc, err := c.encoder(2, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := enc.Encode(shards); err != nil {
		t.Fatal(err)
	}
	h := shardHeader{k: 2, m: 1, seq: id.Seq, gen: 1, segLen: uint64(len(data)), shardLen: uint32(shardLen), segCRC: crc(data), stream: id.Stream}
	for i, sh := range shards {
		h.index, h.shardCRC = uint8(i), crc(sh)
		file := h.appendTo(nil)
		file[4] = 1
		binary.LittleEndian.PutUint32(file[len(file)-4:], crc(file[:len(file)-4]))
		if err := os.MkdirAll(filepath.Dir(c.shardPath(i, id)), 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(c.shardPath(i, id), append(file, sh...), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	mustGet(t, c, id, data)
	os.Remove(c.shardPath(0, id))
	if n, err := c.Repair(id); err != nil || n != 1 {
		t.Fatalf("repair rewrote %d shards, %v; want 1", n, err)
	}
	os.Remove(c.shardPath(1, id))
	mustGet(t, c, id, data)
}

func TestCRCCombine(t *testing.T) {
	data := make([]byte, 3<<20+17)
	for i := range data {
		data[i] = byte(i*131 + i>>9)
	}
	want := crc(data)
	for _, cut := range []int{0, 1, 511, 4096, 1 << 20, len(data) - 1, len(data)} {
		a, b := data[:cut], data[cut:]
		if got := crcCombine(crc(a), crc(b), len(b)); got != want {
			t.Errorf("cut at %d: combined %#08x, want %#08x", cut, got, want)
		}
	}
}

func BenchmarkCRCCombine(b *testing.B) {
	for b.Loop() {
		crcCombine(0x12345678, 0x9abcdef0, 4<<20+12345)
	}
}

// BenchmarkPut: 8 MiB segments over 3 directories (2+1), as the process
// server's defaults; the CPU of coding and writing a segment.
func BenchmarkPut(b *testing.B) {
	c := open(b, tempDirs(b, 3), Options{})
	data := payload(8<<20, 1)
	b.SetBytes(int64(len(data)))
	var seq uint64
	for b.Loop() {
		if err := c.Put(SegmentID{"bench", seq % 8}, data); err != nil {
			b.Fatal(err)
		}
		seq++
	}
}

// PutSummed with the checksums gathered piece by piece stores segments
// every shard of which verifies (Repair finds nothing to rebuild) and that
// read back whole with any directory lost; sums of other bytes make
// shards fail their checksums, and incomplete sums are refused.
func TestPutSummed(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{})
	for i, n := range []int{1, 100, 4096, 4097, 65536 + 3, 1<<20 + 777, 8<<20 + 36 + 12} {
		data := payload(n, uint64(i))
		sums := c.NewSums(len(data))
		for rest, step := data, 1; len(rest) > 0; step = step*7 + 1 {
			p := rest[:min(len(rest), step)]
			sums.Write(p)
			rest = rest[len(p):]
		}
		id := SegmentID{Stream: "m", Seq: uint64(i)}
		if _, err := c.PutSummed(id, data, sums); err != nil {
			t.Fatal(err)
		}
		if r, err := c.Repair(id); err != nil || r != 0 {
			t.Fatalf("%d bytes: Repair = %d, %v: the summed shards do not verify", n, r, err)
		}
		mustGet(t, c, id, data)
	}
	// One directory gone: the rest must verify and rebuild it.
	wipe(t, dirs[0])
	c = reopen(t, c, Options{})
	mustGet(t, c, SegmentID{Stream: "m", Seq: 6}, payload(8<<20+36+12, 6))

	data := payload(1<<20, 99)
	other := payload(1<<20, 98)
	sums := c.NewSums(len(data))
	sums.Write(other)
	id := SegmentID{Stream: "m", Seq: 99}
	if _, err := c.PutSummed(id, data, sums); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(id); err == nil {
		t.Fatal("segment stored with the checksums of other bytes reads back")
	}
	half := c.NewSums(len(data))
	half.Write(data[:len(data)/2])
	if _, err := c.PutSummed(id, data, half); err == nil {
		t.Fatal("sums of half the segment accepted")
	}
}

// Segments cached under a larger MaxSegmentSize stay readable after a
// restart with a smaller one (the process server derives it from its
// segment size, which an operator may lower).
func TestSmallerMaxSegmentSizeReadsOlderSegments(t *testing.T) {
	dirs := tempDirs(t, 3)
	c := open(t, dirs, Options{MaxSegmentSize: 4 << 20})
	id := SegmentID{"m", 1}
	data := payload(3<<20, 1)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	c = reopen(t, c, Options{MaxSegmentSize: 1 << 20})
	mustGet(t, c, id, data)
	if n, err := c.Repair(id); n != 0 || err != nil {
		t.Fatalf("Repair of an intact larger segment: %d rewritten, %v", n, err)
	}
}

// A shard renamed into place whose directory fsync failed (the Put went
// on under a lowered quorum) is valid, so Repair leaves it: the scrub
// must still make its entry durable.
func TestScrubSyncsStreamDirectories(t *testing.T) {
	dirs := tempDirs(t, 4)
	ffs := &faultFS{dirs: dirs[:1]}
	c := open(t, dirs, Options{FS: ffs, WriteQuorum: 3})
	if err := c.Put(SegmentID{"m", 1}, payload(10_000, 4)); err != nil {
		t.Fatal(err)
	}
	ffs.set(func(f *faultFS) { f.dirSyncErr = syscall.EIO })
	if err := c.Put(SegmentID{"m", 2}, payload(10_000, 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(c.shardPath(0, SegmentID{"m", 2})); err != nil {
		t.Fatalf("the shard whose directory fsync failed is not in place: %v", err)
	}
	var before int
	ffs.set(func(f *faultFS) { f.dirSyncErr = nil; before = f.dirSyncs })
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	ffs.mu.Lock()
	defer ffs.mu.Unlock()
	if ffs.dirSyncs == before {
		t.Fatal("the scrub did not fsync the stream directory whose fsync had failed")
	}
}

// Get reads the data shards alone when they are valid, and the parity
// shards only when one is not (missing, corrupt, or of another store).
func TestGetReadsParityOnlyWhenNeeded(t *testing.T) {
	dirs := tempDirs(t, 4)
	var parityReads atomic.Int32
	h := &hookFS{onRead: func(name string) {
		if strings.HasSuffix(name, shardExt) && (strings.HasPrefix(name, dirs[2]+"/") || strings.HasPrefix(name, dirs[3]+"/")) {
			parityReads.Add(1)
		}
	}}
	c := open(t, dirs, Options{FS: h})
	id := SegmentID{Stream: "m1", Seq: 1}
	data := payload(300_001, 1)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, id, data)
	if n := parityReads.Load(); n != 0 {
		t.Errorf("%d parity shards read with both data shards valid", n)
	}
	// A data shard of an older store: the newer one is rebuilt.
	if err := c.Put(id, payload(300_001, 2)); err != nil {
		t.Fatal(err)
	}
	old, err := os.ReadFile(c.shardPath(1, id))
	if err != nil {
		t.Fatal(err)
	}
	data = payload(300_001, 3)
	if err := c.Put(id, data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.shardPath(1, id), old, 0o640); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, id, data)
	if parityReads.Load() == 0 {
		t.Error("the parity shards were not read with a data shard of an older store")
	}
	// A corrupt data shard.
	parityReads.Store(0)
	if err := os.WriteFile(c.shardPath(0, id), []byte("garbage"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(c.shardPath(1, id)); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, id, data)
	if parityReads.Load() != 2 {
		t.Errorf("%d parity shards read with both data shards bad, want 2", parityReads.Load())
	}
}

// hangingDir is a hookFS on which every file operation under dir blocks
// while hang is set, until release: a disk that neither answers nor fails.
type hangingDir struct {
	*hookFS
	hang    atomic.Bool
	tries   atomic.Int32 // operations that blocked
	release func()       // ends the hang (once; also at cleanup)
}

func newHangingDir(t *testing.T, dir string) *hangingDir {
	h := &hangingDir{hookFS: &hookFS{}}
	ch := make(chan struct{})
	var once sync.Once
	h.release = func() { once.Do(func() { h.hang.Store(false); close(ch) }) }
	t.Cleanup(h.release)
	block := func(name string) {
		if h.hang.Load() && strings.HasPrefix(name, dir+"/") {
			h.tries.Add(1)
			<-ch
		}
	}
	h.onOpen = func(name string) error { block(name); return nil }
	h.onRead = block
	return h
}

// wantLogged waits for a log line holding all of parts.
func wantLogged(t *testing.T, logs *testenv.LogBuffer, parts ...string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		for line := range strings.Lines(logs.String()) {
			if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(line, p) }) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q; logs:\n%s", parts, logs.String())
		}
	}
}

// A directory that hangs (operations that neither end nor fail) is left
// behind after HangAfter: the put that met it is acknowledged without its
// shard where the quorum allows, and says that its buffer is still read;
// later puts, reads and deletes do not wait for it; the abandoned shard
// never lands; and once the disk answers, a scrub writes what it missed.
func TestHungDirectoryLeftBehind(t *testing.T) {
	dirs := tempDirs(t, 4)
	h := newHangingDir(t, dirs[3])
	var logs testenv.LogBuffer
	c := open(t, dirs, Options{FS: h, WriteQuorum: 3, HangAfter: 50 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	id1, id2 := SegmentID{Stream: "m1", Seq: 1}, SegmentID{Stream: "m1", Seq: 2}
	d1 := blockdev.AlignedBuffer(100_000) // written from as it is
	copy(d1, payload(len(d1), 1))
	d2 := payload(70_000, 2)

	h.hang.Store(true)
	held, err := c.PutSummed(id1, d1, nil)
	if err != nil {
		t.Fatalf("put with one directory hung and a quorum of 3 of 4: %v", err)
	}
	if !held {
		t.Error("the put left a write reading its buffer behind, and did not say so")
	}
	wantLogged(t, &logs, "directory does not answer", "dir="+dirs[3]+" ")
	tries := h.tries.Load()
	if err := c.Put(id2, d2); err != nil {
		t.Fatalf("second put: %v", err)
	}
	mustGet(t, c, id1, d1)
	mustGet(t, c, id2, d2)
	if _, err := c.Size(id2); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(id2); !errors.Is(err, ErrHung) {
		t.Errorf("delete with a hung directory: %v, want ErrHung", err)
	}
	if _, err := c.CheckDirs(); !errors.Is(err, ErrHung) {
		t.Errorf("CheckDirs: %v, want ErrHung", err)
	}
	if n := h.tries.Load(); n != tries {
		t.Errorf("%d more operations waited on the hung directory after it was found hung", n-tries)
	}

	h.release()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		lost, err := c.CheckDirs()
		if err == nil && slices.Contains(lost, dirs[3]) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the directory that answers again is not reported for a scrub: %v, %v", lost, err)
		}
	}
	if _, err := os.Stat(c.shardPath(3, id1)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the abandoned shard write landed (%v): its buffer may have been reused", err)
	}
	if err := c.Delete(id2); err != nil {
		t.Fatalf("delete retried once the directory answers: %v", err)
	}
	rep, err := c.Scrub(context.Background())
	if err != nil || rep.RepairedShards != 1 {
		t.Fatalf("scrub: %+v, %v; want the one shard missed rebuilt", rep, err)
	}
	if n, err := c.Repair(id1); n != 0 || err != nil {
		t.Fatalf("after the scrub, Repair rewrote %d shards (%v)", n, err)
	}
	mustGet(t, c, id1, d1)
}

// An abandoned write that returns right after it was abandoned (a slow
// disk rather than a dead one) still counts as failed: its shard was not
// renamed into place, so the put must not count it towards its quorum,
// whatever the hung count says by the time the put looks.
func TestAbandonedWriteEndingAtOnceFailsPut(t *testing.T) {
	dirs := tempDirs(t, 3)
	h := newHangingDir(t, dirs[2])
	answered := make(chan struct{})
	var once sync.Once
	logs := &hookHandler{fn: func(r slog.Record) {
		switch {
		case strings.Contains(r.Message, "does not answer"):
			// Let the write end before the put goes on, and wait for
			// its end to be counted.
			h.release()
			select {
			case <-answered:
			case <-time.After(10 * time.Second):
				t.Error("the abandoned write's end was not logged")
			}
		case strings.Contains(r.Message, "answers again"):
			once.Do(func() { close(answered) })
		}
	}}
	c := open(t, dirs, Options{FS: h, HangAfter: 50 * time.Millisecond, Logger: slog.New(logs)})
	id := SegmentID{Stream: "m1", Seq: 1}
	h.hang.Store(true)
	if err := c.Put(id, payload(100_000, 1)); !errors.Is(err, ErrHung) {
		t.Fatalf("put whose shard write was abandoned: %v, want ErrHung (the shard is not in place)", err)
	}
	if _, err := os.Stat(c.shardPath(2, id)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the abandoned shard landed: %v", err)
	}
}

// hookHandler is a slog.Handler calling fn for every record.
type hookHandler struct{ fn func(slog.Record) }

func (h *hookHandler) Enabled(context.Context, slog.Level) bool      { return true }
func (h *hookHandler) Handle(_ context.Context, r slog.Record) error { h.fn(r); return nil }
func (h *hookHandler) WithAttrs([]slog.Attr) slog.Handler            { return h }
func (h *hookHandler) WithGroup(string) slog.Handler                 { return h }

// With the default quorum (every shard), a hung directory fails puts
// instead of holding them: the first after HangAfter, the next at once,
// until it answers again.
func TestHungDirectoryFailsFullQuorum(t *testing.T) {
	dirs := tempDirs(t, 3)
	h := newHangingDir(t, dirs[1])
	c := open(t, dirs, Options{FS: h, HangAfter: 50 * time.Millisecond})
	id := SegmentID{Stream: "m1", Seq: 1}
	data := payload(100_000, 1)
	h.hang.Store(true)
	if err := c.Put(id, data); !errors.Is(err, ErrHung) {
		t.Fatalf("put with a directory hung: %v, want ErrHung", err)
	}
	tries := h.tries.Load()
	if err := c.Put(id, data); !errors.Is(err, ErrHung) {
		t.Fatalf("second put: %v, want ErrHung", err)
	}
	if n := h.tries.Load(); n != tries {
		t.Errorf("the second put waited on the hung directory")
	}
	h.release()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		err := c.Put(id, data)
		if err == nil {
			break
		}
		if !errors.Is(err, ErrHung) || time.Now().After(deadline) {
			t.Fatalf("put once the directory answers: %v", err)
		}
	}
	if n, err := c.Repair(id); n != 0 || err != nil {
		t.Fatalf("Repair rewrote %d shards (%v): the put was not whole", n, err)
	}
	mustGet(t, c, id, data)
}
