package processserver

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// faultFS is the real file system with switchable fsync and remove
// failures and a settable free fraction.
type faultFS struct {
	cache.OSFS
	failSync   atomic.Bool
	failRemove atomic.Bool
	freePct    atomic.Int64 // 0: real statfs
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
	file, err := f.OSFS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return faultFile{file, f}, nil
}

func (f *faultFS) Statfs(path string) (cache.FSStat, error) {
	if p := f.freePct.Load(); p > 0 {
		return cache.FSStat{Total: 100 << 30, Free: uint64(p) << 30, Avail: uint64(p) << 30}, nil
	}
	return f.OSFS.Statfs(path)
}

// TestNoAckWithoutDurableCache: when the cache cannot make a segment
// durable, the agent gets no ack but an error, and the connection closes
// so that it resends.
func TestNoAckWithoutDurableCache(t *testing.T) {
	e := newEnv(t, mem.New(), 2)
	e.segAge = 20 * time.Millisecond
	ffs := &faultFS{}
	e.cacheFS = ffs
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 2))
	ffs.failSync.Store(true)
	a.batch(3, 2)
	for {
		f := a.next(10 * time.Second)
		if f.err != nil {
			t.Fatalf("connection closed without an error frame: %v", f.err)
		}
		if f.typ == wire.TypeAck {
			t.Fatalf("ack %x although the cache write failed", f.payload)
		}
		var we wire.Error
		if f.typ == wire.TypeError && we.UnmarshalBinary(f.payload) == nil {
			if we.Code != wire.CodeInternal {
				t.Fatalf("error %v, want internal", we)
			}
			break
		}
	}
	if f := a.next(5 * time.Second); f.err == nil {
		t.Fatalf("connection still open: %s", f.typ)
	}
	if !strings.Contains(e.logs.String(), "cache write failed") {
		t.Errorf("cache failure not logged")
	}
}

// TestCacheFullPausesAgents: cache usage drives alerts and, above 90%,
// pauses agents until it drains.
func TestCacheFullPausesAgents(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	ffs := &faultFS{}
	ffs.freePct.Store(50)
	e.cacheFS = ffs
	s := e.start()
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
