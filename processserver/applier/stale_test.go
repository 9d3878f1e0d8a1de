package applier_test

import (
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
)

// A tombstone deleted from a recorded gap leaves the next segment chained
// into the gap, which the applier skips as a stale server's, and every
// later one with it: it must then say the journal is incomplete, as
// recover does, rather than stop at the gap without an error.
func TestDeletedTombstoneStopsApplier(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(7, 8))
	m := recoverytest.New(t, mem.New(), "tomb", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	workload(m, rng, c, 10)
	m.Cut()
	from := m.Seq() + 1
	workload(m, rng, c, 10)
	lost := m.Cut()
	m.LoseSegment(len(m.Segments) - 1) // its tombstone
	lostTo := m.Seq()
	workload(m, rng, c, 10) // the resync and after
	m.Cut()
	workload(m, rng, c, 10)
	m.Cut()
	m.Gaps = []layout.Gap{{From: from, LostTo: lostTo, Mended: lostTo + 1}}
	m.WriteManifest()
	if err := m.Store.DeleteBlob(ctx, lost); err != nil {
		t.Fatal(err)
	}
	a := newApplier(t, m, applier.Config{})
	for range 2 {
		if got, err := a.Apply(ctx, m.Name); !errors.Is(err, recovery.ErrTampered) {
			t.Fatalf("Apply with the gap's tombstone deleted = %d, %v; want ErrTampered", got, err)
		}
	}
}

// TestDeletedLastSegmentStopsApplier: the journal's newest segment
// deleted, the applier says so rather than wait forever for it.
func TestDeletedLastSegmentStopsApplier(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(9, 10))
	m := recoverytest.New(t, mem.New(), "last", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	workload(m, rng, c, 10)
	m.Cut()
	workload(m, rng, c, 10)
	last := m.Cut()
	m.WriteManifest()
	if err := m.Store.DeleteBlob(ctx, last); err != nil {
		t.Fatal(err)
	}
	a := newApplier(t, m, applier.Config{})
	if got, err := a.Apply(ctx, m.Name); !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), "incomplete") {
		t.Fatalf("Apply with the newest segment deleted = %d, %v; want ErrTampered", got, err)
	}
}
