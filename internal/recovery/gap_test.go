package recovery_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/recovery/recoverytest"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// A segment lost before it reached the journal leaves a gap the process
// server records in the manifest. Recovery must refuse every state inside
// it (the replayed journal lacks acknowledged writes there) and give the
// disk exactly before it and after the agent's resync mended it.
func TestRecoverRefusesJournalGap(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "gap", size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	_, ends := cutSegments(m, rng, t0, 3, 1)
	// The second segment never reached the account: its tombstone did.
	m.LoseSegment(1)
	// The process server recorded the gap and held recoverable_until.
	m.Gaps = []layout.Gap{{From: ends[0] + 1, LostTo: ends[1]}}
	m.Until = t0
	m.WriteManifest()

	for _, point := range []string{strconv.FormatUint(ends[0]+1, 10), strconv.FormatUint(ends[2], 10), t0.Add(2 * time.Second).Format(time.RFC3339Nano)} {
		if _, _, err := recoverBytes(t, m, point, m.RecoveryKey); !errors.Is(err, recovery.ErrOutOfRange) {
			t.Errorf("recover %s inside the open gap: err %v, want ErrOutOfRange", point, err)
		}
	}
	// latest is recoverable_until, held before the gap while it is open.
	if got, res, err := recoverBytes(t, m, "latest", m.RecoveryKey); err != nil || res.Seq != ends[0] || !bytes.Equal(got, m.Image(0, ends[0])[:size]) {
		t.Errorf("recover latest with the gap open: seq %d, %v; want the disk at %d, the last marker before the gap", res.Seq, err, ends[0])
	}
	got, res, err := recoverBytes(t, m, strconv.FormatUint(ends[0], 10), m.RecoveryKey)
	if err != nil {
		t.Fatalf("recover just before the gap: %v", err)
	}
	if res.Seq != ends[0] || !bytes.Equal(got, m.Image(0, ends[0])[:size]) {
		t.Fatalf("the disk just before the gap (seq %d, want %d) differs", res.Seq, ends[0])
	}
	points, until, err := recovery.Points(context.Background(), m.Store, m.Name)
	if err != nil {
		t.Fatal(err)
	}
	if !until.Equal(t0) {
		t.Errorf("recoverable_until %v with the gap open, want %v (the last marker before it)", until, t0)
	}
	if len(points) != 0 {
		t.Errorf("points %v: none was cut", points)
	}

	// The agent's checksum resync rewrites what differs (here: the whole
	// disk as it is now), then its first time marker mends the gap.
	m.Write(0, 0, m.Image(0, m.Seq())[:size])
	mended := m.Marker(wire.MarkerTime, t0.Add(3*time.Second)).Seq
	m.Cut()
	m.Gaps[0].Mended = mended
	m.WriteManifest()
	got, res, err = recoverBytes(t, m, "latest", m.RecoveryKey)
	if err != nil {
		t.Fatalf("recover latest after the gap was mended: %v", err)
	}
	if res.Seq != mended || !bytes.Equal(got, m.Image(0, mended)[:size]) {
		t.Fatalf("latest (seq %d) after the mended gap differs from the disk", res.Seq)
	}
	if _, _, err := recoverBytes(t, m, strconv.FormatUint(ends[2], 10), m.RecoveryKey); !errors.Is(err, recovery.ErrOutOfRange) {
		t.Errorf("recover inside the mended gap: err %v, want ErrOutOfRange", err)
	}
	// A time between the last marker before the gap and the first one
	// after it: the lost segment's marker (t0+1s) said where the disk
	// was then, and the one before it does not.
	if _, _, err := recoverBytes(t, m, t0.Add(1500*time.Millisecond).Format(time.RFC3339Nano), m.RecoveryKey); !errors.Is(err, recovery.ErrOutOfRange) {
		t.Errorf("recover to a time the gap lost: err %v, want ErrOutOfRange", err)
	}
	if got, res, err := recoverBytes(t, m, t0.Format(time.RFC3339Nano), m.RecoveryKey); err != nil || res.Seq != ends[0] || !bytes.Equal(got, m.Image(0, ends[0])[:size]) {
		t.Errorf("recover to the marker before the gap: seq %d, %v; want the disk at %d", res.Seq, err, ends[0])
	}
	if _, res, err := recoverBytes(t, m, t0.Add(3*time.Second).Format(time.RFC3339Nano), m.RecoveryKey); err != nil || res.Seq != mended {
		t.Errorf("recover to the mending marker's time: seq %d, %v; want %d", res.Seq, err, mended)
	}
}

// A journal segment missing with no gap recorded (deleted from the
// account) breaks the chain of segment headers: recovery across it fails
// instead of returning a disk without its writes; recovery before it
// still works.
func TestRecoverDetectsMissingSegment(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "chain", size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	segs, ends := cutSegments(m, rng, t0, 3, 1)
	if err := m.Store.DeleteBlob(context.Background(), segs[1]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := recoverBytes(t, m, "latest", m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("recover across a deleted segment: err %v, want ErrTampered", err)
	}
	got, res, err := recoverBytes(t, m, strconv.FormatUint(ends[0], 10), m.RecoveryKey)
	if err != nil || res.Seq != ends[0] || !bytes.Equal(got, m.Image(0, ends[0])[:size]) {
		t.Fatalf("recover before the deleted segment: seq %d, %v (or bytes differ)", res.Seq, err)
	}
}

// The manifest steers recovery (which disk is which, gaps, generations):
// edited by anyone without the data key, it fails verification.
func TestRecoverRefusesTamperedManifest(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	m := recoverytest.New(t, mem.New(), "swap", 64<<10, 64<<10)
	for range 20 {
		m.Write(rng.IntN(2), uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
	}
	m.Marker(wire.MarkerTime, time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC))
	m.Cut()
	for _, tamper := range []struct {
		what string
		edit func(*layout.Manifest)
	}{
		{"disks swapped", func(man *layout.Manifest) { man.Disks[0], man.Disks[1] = man.Disks[1], man.Disks[0] }},
		{"gap removed", func(man *layout.Manifest) { man.Gaps = nil }},
		{"seal removed", func(man *layout.Manifest) { man.Seal = "" }},
	} {
		m.Gaps = []layout.Gap{{From: 3, LostTo: 4, Mended: 5}}
		m.WriteManifest()
		man, err := recovery.ReadManifest(context.Background(), m.Store, m.Name)
		if err != nil {
			t.Fatal(err)
		}
		tamper.edit(man)
		b, err := layout.MarshalManifest(man)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Store.PutBlob(context.Background(), layout.ManifestName(m.Name), b, nil); err != nil {
			t.Fatal(err)
		}
		if _, _, err := recoverBytes(t, m, "latest", m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) {
			t.Errorf("%s: recover err %v, want ErrTampered", tamper.what, err)
		}
	}
}

// Segments of a history the journal gave up (recovery.StaleFilter) are skipped,
// but the rule never hides a missing segment: a tombstone deleted from a
// recorded gap leaves the segment after it chained into the gap, which is
// skipped, and the next one then follows nothing.
func TestRecoverSkipsStaleSegmentsOnly(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 11))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "stale", size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	segs, ends := cutSegments(m, rng, t0, 3, 1)
	m.Write(0, 0, m.Image(0, m.Seq())[:size]) // the resync
	mended := m.Marker(wire.MarkerTime, t0.Add(3*time.Second)).Seq
	m.Cut()
	m.LoseSegment(1)
	m.Gaps = []layout.Gap{{From: ends[0] + 1, LostTo: ends[1], Mended: mended}}
	m.WriteManifest()
	got, res, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if err != nil || res.Seq != mended || !bytes.Equal(got, m.Image(0, mended)[:size]) {
		t.Fatalf("recover latest across the tombstone: seq %d, %v (or bytes differ)", res.Seq, err)
	}
	if err := m.Store.DeleteBlob(context.Background(), segs[1]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := recoverBytes(t, m, "latest", m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("recover with the gap's tombstone deleted: %v, want ErrTampered", err)
	}

	// The same with the skipped segment the last one the target needs.
	m = recoverytest.New(t, mem.New(), "stale2", size)
	segs, ends = cutSegments(m, rng, t0, 2, 1)
	m.Write(0, 0, m.Image(0, m.Seq())[:size]) // the resync
	mended = m.Marker(wire.MarkerTime, t0.Add(3*time.Second)).Seq
	m.Cut()
	m.LoseSegment(1)
	m.Gaps = []layout.Gap{{From: ends[0] + 1, LostTo: ends[1], Mended: mended}}
	m.WriteManifest()
	target := strconv.FormatUint(mended, 10)
	if got, res, err := recoverBytes(t, m, target, m.RecoveryKey); err != nil || res.Seq != mended || !bytes.Equal(got, m.Image(0, mended)[:size]) {
		t.Fatalf("recover %s after the tombstone: seq %d, %v (or bytes differ)", target, res.Seq, err)
	}
	if err := m.Store.DeleteBlob(context.Background(), segs[1]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := recoverBytes(t, m, target, m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("recover %s, its last segment chained to a deleted tombstone: %v, want ErrTampered", target, err)
	}
}

func TestStaleFilter(t *testing.T) {
	gaps := []layout.Gap{{From: 6, LostTo: 10, Mended: 30}}
	writes := func(first, last uint64) []wire.Record {
		var recs []wire.Record
		for seq := first; seq <= last; seq++ {
			recs = append(recs, wire.Record{Seq: seq, Op: wire.OpWrite, Length: 512, Data: make([]byte, 512)})
		}
		return recs
	}
	marker := []wire.Record{{Seq: 10, Op: wire.OpMarker}}
	for _, c := range []struct {
		name        string
		recs        []wire.Record
		prev, chain uint64
		want        bool
	}{
		{"writes inside the gap", writes(6, 8), 5, 5, true},
		{"straddling the gap's end", writes(9, 12), 8, 5, true},
		{"tombstone inside the gap", nil, 5, 5, false},
		{"time marker inside the gap", marker, 5, 5, false},
		{"old history after the gap", writes(11, 15), 10, 5, true},
		{"old history after its marker in the gap", writes(11, 15), 10, 8, true},
		{"new owner after the gap", writes(11, 20), 5, 5, false},
		{"after the gap's tombstone", writes(11, 15), 10, 10, false},
		{"missing segment outside any gap", writes(31, 35), 25, 20, false},
		{"before the gap", writes(1, 5), 0, 0, false},
	} {
		f := recovery.StaleFilter{Gaps: gaps}
		if got := f.Skip(99, c.recs, c.prev, true, c.chain); got != c.want {
			t.Errorf("%s: Skip = %v, want %v", c.name, got, c.want)
		}
	}
	// The rest of a history skipped: chained to a skipped segment.
	f := recovery.StaleFilter{Gaps: gaps}
	if !f.Skip(15, writes(11, 15), 10, true, 5) || !f.Skip(20, writes(16, 20), 15, true, 5) || f.Skip(110, writes(100, 110), 5, true, 5) {
		t.Error("the second segment of an old history, or the new owner's first, misjudged")
	}
}

// Two segments lost while a gap was open (two gaps, two tombstones):
// recovery past the mend crosses both, but not a segment deleted between.
func TestRecoverAcrossSecondLossInGap(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "gap2", size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	segs, ends := cutSegments(m, rng, t0, 4, 1)
	m.Write(0, 0, m.Image(0, m.Seq())[:size]) // the resync
	m.Marker(wire.MarkerTime, t0.Add(4*time.Second))
	segs = append(segs, m.Cut())
	ends = append(ends, m.Seq())
	m.LoseSegment(1)
	m.LoseSegment(3)
	m.Gaps = []layout.Gap{{From: ends[0] + 1, LostTo: ends[1], Mended: ends[4]}, {From: ends[2] + 1, LostTo: ends[3], Mended: ends[4]}}
	m.WriteManifest()
	got, res, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if err != nil {
		t.Fatalf("recover latest after the mended gaps: %v", err)
	}
	if res.Seq != m.Latest() || !bytes.Equal(got, m.Image(0, res.Seq)[:size]) {
		t.Fatalf("latest after the mended gaps (seq %d, want %d) differs from the disk", res.Seq, m.Latest())
	}
	// A segment missing between the losses (the resync's, say) is not
	// one of them: refused.
	if err := m.Store.DeleteBlob(context.Background(), segs[2]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := recoverBytes(t, m, "latest", m.RecoveryKey); !errors.Is(err, recovery.ErrTampered) {
		t.Fatalf("recover across a segment deleted between two recorded losses: %v, want ErrTampered", err)
	}
}

// A disk the mending resync did not cover (not in the agent's hello then)
// stays inside the gap after the mend, until a generation of its own
// starts after the gap (a full sync); the other disks recover past it.
func TestRecoverRefusesUnmendedDisk(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	const size = 64 << 10
	m := recoverytest.New(t, mem.New(), "unmended", size, size)
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	_, ends := cutSegments(m, rng, t0, 3, 2)
	m.LoseSegment(1)
	// d0 resynced (the whole disk rewritten), d1 not: left unmended.
	m.Write(0, 0, m.Image(0, m.Seq())[:size])
	mended := m.Marker(wire.MarkerTime, t0.Add(3*time.Second)).Seq
	m.Cut()
	m.Gaps = []layout.Gap{{From: ends[0] + 1, LostTo: ends[1], Mended: mended, Unmended: []layout.UnmendedDisk{{Name: "d1"}}}}
	m.WriteManifest()
	got, res, err := recoverBytes(t, m, "latest", m.RecoveryKey)
	if err != nil || res.Seq != mended || !bytes.Equal(got, m.Image(0, mended)[:size]) {
		t.Fatalf("recover d0 latest past the mended gap: seq %d, %v (or bytes differ)", res.Seq, err)
	}
	_, err = recovery.Recover(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d1", Point: "latest", RecoveryKey: m.RecoveryKey}, discardWriter{})
	if !errors.Is(err, recovery.ErrOutOfRange) {
		t.Fatalf("recover d1 latest, left out of the resync: %v, want ErrOutOfRange", err)
	}
	// Its full sync (a new generation) makes it recoverable from there.
	m.NewGeneration(1, 0)
	m.Write(1, 0, randBytes(rng, size))
	m.Marker(wire.MarkerTime, t0.Add(4*time.Second))
	m.Cut()
	m.Disks[1].GenerationStart = m.Seq() - 1
	m.Gaps[0].Unmended[0].Until = m.Disks[1].GenerationStart
	m.WriteManifest()
	path := filepath.Join(t.TempDir(), "d1.img")
	res, err = recovery.RecoverFile(context.Background(), m.Store, recovery.Request{Machine: m.Name, Disk: "d1", Point: "latest", RecoveryKey: m.RecoveryKey}, path)
	if err != nil {
		t.Fatalf("recover d1 latest after its full sync: %v", err)
	}
	if b, err := os.ReadFile(path); err != nil || res.Seq != m.Latest() || !bytes.Equal(b, m.Image(1, res.Seq)[:size]) {
		t.Fatalf("d1 latest after its full sync differs from the disk (%v)", err)
	}
}

type discardWriter struct{}

func (discardWriter) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

// cutSegments makes n journal segments of ten random writes each over the
// first disks disks of m, each ending with a time marker a second after
// the last (from t0); it returns their names and last sequences.
func cutSegments(m *recoverytest.Machine, rng *rand.Rand, t0 time.Time, n, disks int) (segs []string, ends []uint64) {
	for s := range n {
		for range 10 {
			m.Write(rng.IntN(disks), uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
		}
		m.Marker(wire.MarkerTime, t0.Add(time.Duration(s)*time.Second))
		segs = append(segs, m.Cut())
		ends = append(ends, m.Seq())
	}
	return segs, ends
}

// A time the account shows came before a gap's lost records is not
// refused: an idle marker at the same sequence later than it (the disk
// unchanged until then), or, while the gap is open, recoverable_until
// (held at a marker before the gap) at or after it.
func TestRecoverTimeProvenBeforeGap(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 13))
	const size = 64 << 10
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	check := func(m *recoverytest.Machine, point string, want uint64) {
		t.Helper()
		got, res, err := recoverBytes(t, m, point, m.RecoveryKey)
		if err != nil || res.Seq != want || !bytes.Equal(got, m.Image(0, want)[:size]) {
			t.Fatalf("recover %s: seq %d, %v; want the disk at %d", point, res.Seq, err, want)
		}
	}

	// Idle: markers at t0 and t0+10s at one sequence; the next segment lost.
	m := recoverytest.New(t, mem.New(), "idle", size)
	for range 10 {
		m.Write(0, uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
	}
	e0 := m.Marker(wire.MarkerTime, t0).Seq
	m.Marker(wire.MarkerTime, t0.Add(10*time.Second))
	m.Cut()
	loseAndMend(m, rng, size, e0, t0.Add(20*time.Second), t0.Add(40*time.Second))
	check(m, t0.Add(5*time.Second).Format(time.RFC3339Nano), e0)
	if _, _, err := recoverBytes(t, m, t0.Add(15*time.Second).Format(time.RFC3339Nano), m.RecoveryKey); !errors.Is(err, recovery.ErrOutOfRange) {
		t.Errorf("recover to a time after the idle marker, before the gap's end: %v, want ErrOutOfRange", err)
	}

	// Open gap after an idle period the manifest records.
	m = recoverytest.New(t, mem.New(), "open", size)
	_, ends := cutSegments(m, rng, t0, 2, 1)
	m.LoseSegment(1)
	m.Gaps = []layout.Gap{{From: ends[0] + 1, LostTo: ends[1]}}
	m.Until = t0.Add(time.Hour)
	m.WriteManifest()
	m.EditManifest(func(man *layout.Manifest) { man.IdleSeq, man.IdleSince = ends[0], t0.Add(time.Second) })
	check(m, "latest", ends[0])
}

// An agent's clock that stepped back: a marker before the one a time
// resolves to, later than the time, proves nothing of the gap after it.
func TestRecoverTimeAfterClockStepBackBeforeGap(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 17))
	const size = 64 << 10
	t0 := time.Date(2025, 5, 1, 0, 0, 0, 0, time.UTC)
	m := recoverytest.New(t, mem.New(), "stepback", size)
	write := func() {
		for range 5 {
			m.Write(0, uint64(rng.IntN(60<<10)), randBytes(rng, 1+rng.IntN(4000)))
		}
	}
	write()
	m.Marker(wire.MarkerTime, t0.Add(10*time.Second))
	write()
	m.Marker(wire.MarkerTime, t0.Add(100*time.Second))
	write()
	e := m.Marker(wire.MarkerTime, t0.Add(50*time.Second)).Seq // the clock stepped back
	m.Cut()
	loseAndMend(m, rng, size, e, t0.Add(55*time.Second), t0.Add(200*time.Second))
	if _, res, err := recoverBytes(t, m, t0.Add(60*time.Second).Format(time.RFC3339Nano), m.RecoveryKey); !errors.Is(err, recovery.ErrOutOfRange) {
		t.Fatalf("recover to a time the gap's lost marker (t0+55s) covers: seq %d, %v; want ErrOutOfRange", res.Seq, err)
	}
}

// loseAndMend cuts a segment after last (its marker at lost), loses it,
// and mends the gap with a resync whose marker is at mend: segment 1 of m
// is lost, recorded as a gap from last+1, mended.
func loseAndMend(m *recoverytest.Machine, rng *rand.Rand, size int, last uint64, lost, mend time.Time) {
	_, ends := cutSegments(m, rng, lost, 1, 1)
	m.LoseSegment(1)
	m.Write(0, 0, m.Image(0, m.Seq())[:size]) // the resync
	mended := m.Marker(wire.MarkerTime, mend).Seq
	m.Cut()
	m.Gaps = []layout.Gap{{From: last + 1, LostTo: ends[0], Mended: mended}}
	m.Until = mend
	m.WriteManifest()
}
