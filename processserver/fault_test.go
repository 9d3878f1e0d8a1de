package processserver

import (
	"errors"
	"io/fs"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// faultFS is the real file system with switchable fsync failures and a
// settable free fraction.
type faultFS struct {
	cache.OSFS
	failSync atomic.Bool
	freePct  atomic.Int64 // 0: real statfs
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
	wantWindow := func(want uint64) {
		t.Helper()
		for {
			f := a.next(10 * time.Second)
			var bp wire.Backpressure
			if f.err != nil {
				t.Fatal(f.err)
			}
			if f.typ == wire.TypeBackpressure && bp.UnmarshalBinary(f.payload) == nil && bp.Window == want {
				return
			}
		}
	}
	ffs.freePct.Store(28)
	eventually(t, 5*time.Second, "warning", func() bool { return strings.Contains(e.logs.String(), "cache filling up") })
	ffs.freePct.Store(5)
	wantWindow(0)
	if !strings.Contains(e.logs.String(), "level=ERROR msg=\"cache almost full") {
		t.Errorf("no error log for a full cache")
	}
	ffs.freePct.Store(60)
	wantWindow(DefaultWindow)
}
