package processserver

import (
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
)

// TestCacheKeepsSegmentsUntilAppliedIsSaved: the applier's progress
// reaches memory before the manifest. While the manifest write fails,
// the applied segments stay in the cache (a crash would otherwise leave
// remains of segments the manifest does not count as applied, taken for
// acknowledged data lost); once it succeeds, they go.
func TestCacheKeepsSegmentsUntilAppliedIsSaved(t *testing.T) {
	faulty := blobstoretest.NewFaulty(mem.New())
	e := newEnv(t, faulty, 1)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, faulty, "m1") == 10 })

	faulty.FailFor(time.Hour)
	err := s.UpdateManifest(t.Context(), "m1", func(man *layout.Manifest) { man.AppliedSeq = 10 })
	if err == nil {
		t.Fatal("UpdateManifest succeeded with the store failing")
	}
	time.Sleep(300 * time.Millisecond) // the uploader's passes
	if ids, _ := s.cache.List("m1"); len(ids) != 2 {
		t.Fatalf("cache holds %v while applied_seq 10 is not in the manifest, want both segments", ids)
	}

	faulty.FailFor(0)
	s.Applied("m1", 10)
	eventually(t, 10*time.Second, "applied segments dropped once saved", func() bool {
		ids, _ := s.cache.List("m1")
		return len(ids) == 0
	})
	if _, _, man := journal(t, faulty, e.rk, "m1"); man.AppliedSeq != 10 {
		t.Fatalf("manifest applied_seq %d, want 10", man.AppliedSeq)
	}
}
