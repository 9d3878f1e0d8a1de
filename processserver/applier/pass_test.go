package applier_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
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

// listLog records the prefixes of ListBlobs calls.
type listLog struct {
	blobstore.Store
	mu       sync.Mutex
	prefixes []string
}

func (l *listLog) ListBlobs(ctx context.Context, prefix string) ([]blobstore.BlobInfo, error) {
	l.mu.Lock()
	l.prefixes = append(l.prefixes, prefix)
	l.mu.Unlock()
	return l.Store.ListBlobs(ctx, prefix)
}

func (l *listLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.prefixes
	l.prefixes = nil
	return p
}

// cutSegments cuts n segments of records each.
func cutSegments(m *recoverytest.Machine, rng *rand.Rand, c *clock, n, records int) {
	for range n {
		workload(m, rng, c, records)
		m.Cut()
	}
}

// applyAll applies everything m made durable and checks the replica.
func applyAll(t *testing.T, ctx context.Context, a *applier.Applier, m *recoverytest.Machine, what string) {
	t.Helper()
	if got, err := a.Apply(ctx, m.Name); err != nil || got != m.Durable {
		t.Fatalf("%sApply = %d, %v; want %d", what, got, err, m.Durable)
	}
	checkReplica(t, m, m.Durable)
}

// passYields counts the calls to yield in one pass over segs segments.
func passYields(t *testing.T, name string, segs int, yield func()) int {
	rng := rand.New(rand.NewPCG(23, 24))
	m := recoverytest.New(t, mem.New(), name, 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	n := 0
	a := newApplier(t, m, applier.Config{Yield: func(context.Context) { n++; yield() }})
	cutSegments(m, rng, c, segs, 10)
	applyAll(t, ctxT(t), a, m, "")
	return n
}

// After its first pass the applier lists only the journal past its
// cursor, not the whole journal (a day of it at ASR's rates is some
// 200 000 segments), and still applies every segment.
func TestApplyListsPastCursor(t *testing.T) {
	store := &listLog{Store: mem.New()}
	rng := rand.New(rand.NewPCG(21, 22))
	m := recoverytest.New(t, store, "ml", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{})
	ctx := ctxT(t)
	for pass := range 4 {
		cutSegments(m, rng, c, 3, 20)
		store.take()
		applyAll(t, ctx, a, m, fmt.Sprintf("pass %d: ", pass))
		for _, p := range store.take() {
			if pass > 0 && p == layout.JournalPrefix(m.Name) {
				t.Fatalf("pass %d listed the whole journal (%q)", pass, p)
			}
		}
	}
}

// A pass yields (Config.Yield) before each segment after its first, so
// that journal uploads falling behind during a long pass go first.
func TestApplyYieldsBetweenSegments(t *testing.T) {
	if n := passYields(t, "my", 3, func() {}); n != 2 {
		t.Fatalf("%d yields in a pass over 3 segments, want 2", n)
	}
}

// Retention lists the journal from the oldest segment its last prune
// kept, not the whole journal, and still deletes every segment the base
// point makes unnecessary.
func TestRetentionListsPastLastPrune(t *testing.T) {
	store := &listLog{Store: mem.New()}
	rng := rand.New(rand.NewPCG(25, 26))
	m := recoverytest.New(t, store, "mr", 1<<20)
	start := time.Date(2025, 3, 3, 12, 0, 0, 0, time.UTC)
	var now time.Time
	m.Store = serviceAt(m.Store, &now)
	a := newApplier(t, m, applier.Config{Retention: 2 * time.Hour, PointInterval: 1000 * time.Hour, Now: func() time.Time { return now }})
	c := &clock{}
	ctx := ctxT(t)
	var apps []wire.Marker
	for h := range 8 {
		now = start.Add(time.Duration(h) * time.Hour)
		c.t = now
		cutSegments(m, rng, c, 2, 15)
		apps = append(apps, m.Marker(wire.MarkerAppConsistent, c.next()))
		cutSegments(m, rng, c, 1, 5)
		store.take()
		applyAll(t, ctx, a, m, fmt.Sprintf("hour %d: ", h))
		for _, p := range store.take() {
			if h >= 4 && p == layout.JournalPrefix(m.Name) {
				t.Fatalf("hour %d: retention listed the whole journal", h)
			}
		}
		if h < 3 {
			continue
		}
		// The base is the newest point older than the cutoff (now - 2 h):
		// the one cut 3 hours ago.
		segs, err := recovery.ListSegments(ctx, store, m.Name)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range segs {
			if s.Last <= apps[h-3].Seq {
				t.Fatalf("hour %d: segment %s (last %d) kept, the base point is at %d", h, s.Name, s.Last, apps[h-3].Seq)
			}
		}
		if len(segs) < 9 {
			t.Fatalf("hour %d: %d segments kept, want the 3 hours after the base", h, len(segs))
		}
	}
	recoverAndCheck(t, m, 0, fmt.Sprint(apps[5].Seq+2), apps[5].Seq+2)
}

// A pass stops yielding once its yields have taken 2 s: under sustained
// overload the replica still advances.
func TestApplyYieldBounded(t *testing.T) {
	n := passYields(t, "mz", 6, func() { time.Sleep(700 * time.Millisecond) })
	if n < 2 || n > 3 {
		t.Fatalf("%d yields of 700 ms in a pass over 6 segments, want 3 (2 s budget)", n)
	}
}

// Segments the process server still holds are opened into one buffer the
// applier reuses (Config.Local appends to it), not into a fresh 8 MiB
// allocation each, and applied from there.
func TestLocalSegmentsReuseOneBuffer(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 26))
	m := recoverytest.New(t, mem.New(), "mb", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	ctx := ctxT(t)
	keys, err := applier.RecoveryKeys(m.Store, m.RecoveryKey)(ctx, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	var calls, reused int
	var last []byte
	local := func(name string, dst []byte) ([]byte, bool) {
		calls++
		if len(dst) != 0 {
			t.Errorf("Local got a buffer holding %d bytes, want an empty one", len(dst))
		}
		if last != nil && cap(dst) > 0 && &dst[:1][0] == &last[:1][0] {
			reused++
		}
		plain, err := recovery.ReadSegment(ctx, m.Store, name, keys, dst)
		if err != nil {
			t.Errorf("open %s: %v", name, err)
			return nil, false
		}
		last = plain
		return plain, true
	}
	a := newApplier(t, m, applier.Config{Local: local})
	cutSegments(m, rng, c, 4, 30)
	applyAll(t, ctx, a, m, "")
	if calls != 4 || reused != 3 {
		t.Fatalf("Local called %d times, %d of them with the buffer the call before returned; want 4 and 3", calls, reused)
	}
}

// The applier's own manifest update (no process server to do it) seals
// the manifest again: one changed in the account since is refused, not
// vouched for by a fresh seal.
func TestUpdateRefusesTamperedManifest(t *testing.T) {
	ctx := ctxT(t)
	rng := rand.New(rand.NewPCG(71, 72))
	m := recoverytest.New(t, mem.New(), "tampered", 1<<20)
	c := &clock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	a := newApplier(t, m, applier.Config{})
	cutSegments(m, rng, c, 2, 10)
	name := layout.ManifestName(m.Name)
	raw, err := m.Store.GetBlob(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	doc["journal_from"] = 2 // as if the journal's start had been pruned
	if raw, err = json.Marshal(doc); err != nil {
		t.Fatal(err)
	}
	if err := m.Store.PutBlob(ctx, name, raw, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Apply(ctx, m.Name); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("Apply over a tampered manifest: %v, want ErrTampered", err)
	}
	man, err := recovery.ReadManifest(ctx, m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := recovery.VerifyManifest(man, m.Keyring()); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("the tampered manifest verifies after the applier's update: %v", err)
	}
}
