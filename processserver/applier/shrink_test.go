package applier_test

import (
	"math/rand/v2"
	"strconv"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
)

// A disk shrinks (a new, smaller generation). After the switch, the
// segment holding old-generation writes beyond the new size is read again
// (here: a crash between the disks' SetMetadata calls): its old records,
// already applied, must not fail the new size's check, or the applier
// would refuse the segment forever.
func TestShrinkReapply(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(1, 2))
	m := recoverytest.New(t, mem.New(), "shrink", 1<<20, 512<<10)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour})
	m.Write(0, 0, random(rng, 4096))
	m.Write(1, 0, random(rng, 4096))
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	before := m.Durable
	m.Write(0, 900<<10, random(rng, 4096)) // old generation, beyond the new size
	m.NewGeneration(0, 512<<10)
	m.Write(0, 0, random(rng, 512<<10))
	m.Write(1, 8192, random(rng, 4096))
	m.Marker(wire.MarkerAppConsistent, c.next())
	m.Cut()
	if _, err := a.Apply(ctx, m.Name); err != nil {
		t.Fatal(err)
	}
	// crash between the SetMetadata of d0 and of d1
	blob := layout.DiskName(m.Name, "d1")
	info, err := m.Store.Stat(ctx, blob)
	if err != nil {
		t.Fatal(err)
	}
	md := info.Metadata
	md[layout.MetaAppliedSeq] = strconv.FormatUint(before, 10)
	if err := m.Store.SetMetadata(ctx, blob, md); err != nil {
		t.Fatal(err)
	}
	if _, err := newApplier(t, m, applier.Config{PointInterval: 1000 * time.Hour}).Apply(ctx, m.Name); err != nil {
		t.Fatalf("re-apply after restart: %v", err)
	}
	checkReplica(t, m, m.Durable)
	for i := range m.Disks {
		recoverAndCheck(t, m, i, "latest", m.Latest())
	}
}
