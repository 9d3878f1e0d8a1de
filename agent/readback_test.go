package agent

import (
	"context"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// coverTarget is a fileTarget that records, after the initial copy, which
// extents it was handed and when, and the times the engine said were
// covered (Coverer).
type coverTarget struct {
	*fileTarget
	mu      sync.Mutex
	synced  bool
	writes  []coverWrite
	covered []coverCall
}

type coverWrite struct {
	off, n int64
	at     time.Time
}

type coverCall struct{ t, at time.Time }

func (c *coverTarget) WriteAt(dev int, p []byte, off int64) error {
	c.mu.Lock()
	if c.synced {
		c.writes = append(c.writes, coverWrite{off, int64(len(p)), time.Now()})
	}
	c.mu.Unlock()
	return c.fileTarget.WriteAt(dev, p, off)
}

func (c *coverTarget) Covered(t time.Time) {
	c.mu.Lock()
	c.covered = append(c.covered, coverCall{t, time.Now()})
	c.mu.Unlock()
}

// delivered is when the block at off was first handed over, or zero.
func (c *coverTarget) delivered(off int64) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.writes {
		if off >= w.off && off < w.off+w.n {
			return w.at
		}
	}
	return time.Time{}
}

// waitDelivered waits until the blocks at offs have been handed over, and
// fails (naming what) past deadline.
func (c *coverTarget) waitDelivered(t *testing.T, deadline time.Time, what string, offs ...int64) {
	t.Helper()
	for _, off := range offs {
		for c.delivered(off).IsZero() {
			if time.Now().After(deadline) {
				t.Fatalf("%s not read back", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// waitCoveredPast waits until a time after written is reported covered,
// and fails if one is reported before last, when the writes were handed
// over (time markers would then claim writes the target lacks).
func (c *coverTarget) waitCoveredPast(t *testing.T, written, last, deadline time.Time) {
	t.Helper()
	for {
		c.mu.Lock()
		calls := append([]coverCall(nil), c.covered...)
		c.mu.Unlock()
		past := false
		for _, cc := range calls {
			if cc.t.After(written) {
				past = true
				if cc.at.Before(last) {
					t.Fatalf("covered %v reported at %v, before the writes were handed over at %v", cc.t, cc.at, last)
				}
			}
		}
		if past {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("coverage never passed the writes (%d reports)", len(calls))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Metadata mode with a read-back delay: two blocks written one block
// apart are read back once the delay has passed, with one read through
// the clean block between them, which the target does not get; and the
// engine never reports as covered a time after their writes before it has
// handed them over (time markers would otherwise claim them).
func TestMetadataReadbackDelayAndCoverage(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	tgt := &coverTarget{fileTarget: newFileTarget(t)}
	const delay = time.Second
	_, cancel, done := startEngine(t, Options{
		Sources:       []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeMetadata, Sync: SyncFull}},
		RingBytes:     4 << 20,
		Target:        tgt,
		ReadbackDelay: delay,
		OnSynced: func() {
			tgt.mu.Lock()
			tgt.synced = true
			tgt.mu.Unlock()
		},
	})

	dev, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	const a, b = 100 * capture.BlockSize, 102 * capture.BlockSize
	blk := blockdev.AlignedBuffer(capture.BlockSize)
	start := time.Now()
	for i, off := range []int64{a, b} {
		for j := range blk {
			blk[j] = byte(0x30 + i)
		}
		if _, err := dev.WriteAt(blk, off); err != nil {
			t.Fatal(err)
		}
	}
	written := time.Now()

	deadline := time.Now().Add(10 * time.Second)
	tgt.waitDelivered(t, deadline, "the written blocks were", a, b)
	for _, off := range []int64{a, b} {
		if got := tgt.delivered(off).Sub(start); got < delay {
			t.Errorf("block at %d read back %v after its write, before the %v delay", off, got, delay)
		}
	}
	if at := tgt.delivered(101 * capture.BlockSize); !at.IsZero() {
		t.Error("the clean block between the two was handed to the target")
	}
	// Coverage moves past the writes, and only once they are handed over.
	last := tgt.delivered(a)
	if l := tgt.delivered(b); l.After(last) {
		last = l
	}
	tgt.waitCoveredPast(t, written, last, deadline)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// A write to the whole disk over a protected partition is read back from
// the partition once it completes; should the kernel not report its
// completion, only the sweep finds it, seconds later. The engine then
// dates coverage back far enough that no time after such a write is
// reported covered before the write is handed over. The unreported write
// goes to the loop device's backing file, announced by a pending entry
// that never completes; a real write to the whole disk beside it is what
// capture sees.
func TestCoverageWaitsForUnreportedDiskWrites(t *testing.T) {
	d, p1, _ := partitionedDisk(t)
	start := partitionStart(t, p1)
	tgt := &coverTarget{fileTarget: newFileTarget(t)}
	e, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "p1", Path: p1, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
		OnSynced: func() {
			tgt.mu.Lock()
			tgt.synced = true
			tgt.mu.Unlock()
		},
	})

	const seen, unseen, n = 1 << 20, 8 << 20, 64 << 10 // offsets in p1
	// The real write comes first: the unreported one, too, is counted
	// when it is queued, before it completes.
	disk, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	blk := blockdev.AlignedBuffer(capture.BlockSize)
	for i := range blk {
		blk[i] = 0x11
	}
	_, err = disk.WriteAt(blk, start+seen)
	disk.Close()
	if err != nil {
		t.Fatal(err)
	}
	written := time.Now()
	writeBehind(t, d.File, start+unseen, filled(n, 0x5a))
	if err := e.cap.InjectDiskPending(0, start+unseen, n); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(15 * time.Second)
	tgt.waitDelivered(t, deadline, "the unreported whole-disk write was", unseen)
	if tgt.delivered(seen).IsZero() {
		t.Error("the whole-disk write was not read back")
	}
	tgt.waitCoveredPast(t, written, tgt.delivered(unseen), deadline)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, p1, tgt.f.Name())
}

// TestReadbackPacing: under churn a metadata-mode pass waits for the
// delay and for readbackPause times the last pass's duration; markers and
// stops (unpaced) only for the delay.
func TestReadbackPacing(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const delay = time.Second
	s := &source{metaDirty: true, metaSince: t0, passEnd: t0.Add(500 * time.Millisecond), passTook: 400 * time.Millisecond}
	pacedFrom := s.passEnd.Add(readbackPause * s.passTook) // 3.7 s
	for _, c := range []struct {
		at          time.Duration
		paced, want bool
	}{
		{999 * time.Millisecond, false, false},
		{time.Second, false, true},
		{time.Second, true, false},
		{pacedFrom.Sub(t0) - time.Millisecond, true, false},
		{pacedFrom.Sub(t0), true, true},
	} {
		if got := s.readbackDue(t0.Add(c.at), delay, c.paced); got != c.want {
			t.Errorf("at %v paced=%v: due %v, want %v", c.at, c.paced, got, c.want)
		}
	}
	// A slow device's long pass: the wait is capped.
	s.passTook = 5 * time.Second
	if s.readbackDue(s.passEnd.Add(readbackMaxWait-time.Millisecond), delay, true) || !s.readbackDue(s.passEnd.Add(readbackMaxWait), delay, true) {
		t.Errorf("after a 5 s pass, the next should wait %v exactly", readbackMaxWait)
	}
	// A short pass leaves only the delay.
	s.passTook = time.Millisecond
	if !s.readbackDue(t0.Add(delay), delay, true) {
		t.Error("after a 1 ms pass, the delay alone should apply")
	}
	s.metaDirty = false
	if s.readbackDue(t0.Add(time.Hour), delay, false) {
		t.Error("nothing noted: no pass due")
	}
}

// Coverage does not stall when a device's mark count moves with no block
// left to read: a mark made while a pass was taking the bitmap has its
// bits taken by that pass, after the pass read the count. Coverage arms
// on the count having moved (reportCover), so a pass must follow even
// when it finds nothing; it used to wait, and with it every device's
// coverage, for the device's next write. A mark past the device's end
// moves the count without setting a bit, as that race leaves it.
func TestMovedMarksMakeAPass(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	e, err := New(Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeMetadata, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    newFileTarget(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	s := e.srcs[0]
	e.cap.MarkBytes(0, 64<<20, 1)
	gen := s.readGen
	if err := e.readbackMetadata(context.Background(), 0, false); err != nil {
		t.Fatal(err)
	}
	if s.readGen == gen {
		t.Fatal("the mark count moved but no read-back pass followed: coverage armed on it would wait for good")
	}
	if e.cap.Marks(0) != s.lastMarks {
		t.Error("the pass did not take the mark count")
	}
}

// A data-mode write queued while a drain parked its device is handed over
// once its completion is seen; the kernel may not report it, and then only
// the sweep finds it. Until then, no time after it is reported covered.
func TestCoverageWaitsForParkedUnreportedWrite(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	tgt := &coverTarget{fileTarget: newFileTarget(t)}
	e, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
		OnSynced: func() {
			tgt.mu.Lock()
			tgt.synced = true
			tgt.mu.Unlock()
		},
	})
	const off, n = 8 << 20, 64 << 10
	writeBehind(t, d.File, off, filled(n, 0x5a))
	// Stamped a second back: queued, and tracked, before written, whatever
	// second boundary falls in between (a cover taken before the entry
	// exists may well be dated after the write: the kernel would have
	// tracked it from its queueing).
	if err := e.cap.InjectPending(0, off, n, false, time.Second); err != nil {
		t.Fatal(err)
	}
	written := time.Now()
	deadline := time.Now().Add(15 * time.Second)
	tgt.waitDelivered(t, deadline, "the unreported write was", off)
	tgt.waitCoveredPast(t, written, tgt.delivered(off), deadline)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// A pending entry from long before (a capture pinned while no agent ran
// keeps those of writes made then, whose completion went unreported) is
// swept before a cover is dated by it: dated that far back, the first
// marker after a restart would have claimed a time long before the
// writes its sequence holds.
func TestCoverNotDatedBackByStaleEntry(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	tgt := &coverTarget{fileTarget: newFileTarget(t)}
	const off, n = 8 << 20, 64 << 10
	var e *Engine
	var injected time.Time
	_, cancel, done := startEngineWith(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
		OnSynced: func() {
			// In the engine's goroutine, before its loop's first cover.
			if err := writeBehindErr(d.File, off, filled(n, 0x5a)); err != nil {
				t.Error(err)
			}
			// A minute old (stamps are seconds since boot: an hour would
			// wrap on a machine up for less).
			if err := e.cap.InjectPending(0, off, n, false, time.Minute); err != nil {
				t.Error(err)
			}
			tgt.mu.Lock()
			tgt.synced = true
			injected = time.Now()
			tgt.mu.Unlock()
		},
	}, func(made *Engine) { e = made })
	deadline := time.Now().Add(15 * time.Second)
	tgt.waitDelivered(t, deadline, "the stale write was", off)
	tgt.waitCoveredPast(t, injected, tgt.delivered(off), deadline)
	tgt.mu.Lock()
	for _, c := range tgt.covered {
		if c.at.After(injected) && c.t.Before(injected.Add(-2*unreportedLag)) {
			t.Errorf("covered %v reported at %v: dated back by a stale entry", c.t, c.at)
		}
	}
	tgt.mu.Unlock()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}
