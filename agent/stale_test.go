package agent

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// TestStaleCompletionReadBack: a write whose completion the kernel never
// reports (seen with loop on 6.18) is read back once its pending entry is
// stale. The write is made to the loop device's backing file, which
// capture cannot see, and announced by a stale pending entry, as if the
// kernel had queued it and then stayed silent. Without the sweep the
// mirror would miss it.
func TestStaleCompletionReadBack(t *testing.T) {
	for _, mode := range []capture.Mode{capture.ModeMetadata, capture.ModeData} {
		t.Run(mode.String(), func(t *testing.T) { staleCompletionReadBack(t, mode, false) })
	}
}

// TestUnreportedCompletionSettledAtStop: the same write, its entry fresh,
// and the agent stopped at once. The device has no write in flight, so
// the stop settles the entry instead of leaving it to a later run's sweep.
func TestUnreportedCompletionSettledAtStop(t *testing.T) {
	for _, mode := range []capture.Mode{capture.ModeMetadata, capture.ModeData} {
		t.Run(mode.String(), func(t *testing.T) { staleCompletionReadBack(t, mode, true) })
	}
}

func staleCompletionReadBack(t *testing.T, mode capture.Mode, atStop bool) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	tgt := newFileTarget(t)
	e, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: mode, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
	})
	mirror := tgt.f

	// 64 KiB of 0x5a at 8 MiB, behind capture's back.
	const off, n = 8 << 20, 64 << 10
	buf := filled(n, 0x5a)
	writeBehind(t, d.File, off, buf)
	age := 2 * staleAfter
	if atStop {
		age = 0
	}
	if err := e.cap.InjectPending(0, off, n, mode == capture.ModeMetadata, age); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * sweepInterval)
	for !atStop {
		got := make([]byte, n)
		if _, err := mirror.ReadAt(got, off); err == nil && string(got) == string(buf) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stale write was not read back into the mirror")
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, n)
	if _, err := mirror.ReadAt(got, off); err != nil || string(got) != string(buf) {
		t.Fatalf("after the stop the mirror misses the write whose completion went unreported (err %v)", err)
	}
	if s := e.Stats(); s.StaleCompletions != 1 {
		t.Errorf("stale completions = %d, want 1", s.StaleCompletions)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if s := e.Stats(); s.StaleCompletions != 1 { // the capture is gone: kept at Close
		t.Errorf("stale completions after Close = %d, want 1", s.StaleCompletions)
	}
	assertSameBytes(t, d.Path, mirror.Name())
}

// writeBehind writes p at off into a loop device's backing file, where
// capture does not see it, and syncs it.
func writeBehind(t *testing.T, file string, off int64, p []byte) {
	t.Helper()
	if err := writeBehindErr(file, off, p); err != nil {
		t.Fatal(err)
	}
}

// writeBehindErr is writeBehind for a goroutine other than the test's
// (t.Fatal must not be called there).
func writeBehindErr(file string, off int64, p []byte) error {
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		return err
	}
	return f.Sync()
}

// filled returns n bytes of b.
func filled(n int, b byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = b
	}
	return p
}

// newFileTarget is a mirror file target in the test's temporary directory.
func newFileTarget(t *testing.T) *fileTarget {
	t.Helper()
	dir := t.TempDir()
	mirror, err := os.Create(filepath.Join(dir, "mirror.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mirror.Close() })
	markers, err := os.Create(filepath.Join(dir, "markers.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { markers.Close() })
	return &fileTarget{f: mirror, markers: markers}
}

// startEngine creates an engine with opt and runs it until cancel; it
// returns once the initial copy is done. done receives Run's result.
func startEngine(t *testing.T, opt Options) (e *Engine, cancel context.CancelFunc, done chan error) {
	t.Helper()
	return startEngineWith(t, opt, nil)
}

// startEngineWith is startEngine, with made called on the engine before it
// runs (for options that need the engine, such as an OnSynced using it).
func startEngineWith(t *testing.T, opt Options, made func(*Engine)) (e *Engine, cancel context.CancelFunc, done chan error) {
	t.Helper()
	synced := make(chan struct{})
	onSynced := opt.OnSynced
	opt.OnSynced = func() {
		if onSynced != nil {
			onSynced()
		}
		close(synced)
	}
	e, err := New(opt)
	if err != nil {
		t.Fatal(err)
	}
	if made != nil {
		made(e)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done = make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		done <- e.Run(ctx)
		close(finished)
	}()
	// Also when the test fails half way: stop the engine before closing it
	// (capture's mappings go with it) and before the device goes.
	t.Cleanup(func() {
		cancel()
		<-finished
		e.Close()
	})
	select {
	case <-synced:
	case err := <-done:
		t.Fatalf("engine stopped before the initial copy: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("initial copy did not finish")
	}
	return e, cancel, done
}

// Bitmap marks on a data-mode device arriving without pause (each drain
// parks new writes on the bitmap for a moment, so steady writes keep
// marking) are drained at most every markDrainInterval, not at once each
// time: no drain storm. Every marked block is still read back.
func TestMarkDrainsSpaced(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	tgt := newFileTarget(t)
	e, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
	})
	// Blocks changed behind capture's back, then marked one by one.
	const n = 100
	blk := filled(capture.BlockSize, 0xc3)
	for i := range n {
		writeBehind(t, d.File, int64(i)*2*capture.BlockSize, blk)
	}
	start := time.Now()
	for i := range n {
		e.cap.MarkBytes(0, int64(i)*2*capture.BlockSize, capture.BlockSize)
		time.Sleep(10 * time.Millisecond)
	}
	elapsed := time.Since(start)
	time.Sleep(2 * markDrainInterval)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Besides those: the initial copy's drain and the clean stop's.
	drains := e.Stats().Drains
	if max := uint64(elapsed/markDrainInterval) + 4; drains > max {
		t.Errorf("%d drains for %d marks over %v, want at most %d", drains, n, elapsed.Round(time.Millisecond), max)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// markerTarget records, after the initial copy, when the block at watch
// was first handed over and when each marker came.
type markerTarget struct {
	*fileTarget
	watch     int64
	mu        sync.Mutex
	synced    bool
	delivered time.Time
	markers   [][2]time.Time // the marker's own time, when it was handed over
}

func (m *markerTarget) WriteAt(dev int, p []byte, off int64) error {
	m.mu.Lock()
	if m.synced && m.delivered.IsZero() && m.watch >= off && m.watch < off+int64(len(p)) {
		m.delivered = time.Now()
	}
	m.mu.Unlock()
	return m.fileTarget.WriteAt(dev, p, off)
}

func (m *markerTarget) Marker(mk Marker) error {
	m.mu.Lock()
	m.markers = append(m.markers, [2]time.Time{mk.Time, time.Now()})
	m.mu.Unlock()
	return m.fileTarget.Marker(mk)
}

// A crash-consistent marker holds the writes a data-mode device has in
// its bitmap, even while their drain waits for markDrainInterval: they may
// precede records already applied (a journal block parked during a drain,
// its commit captured after it).
func TestCrashMarkerHoldsMarks(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	const off = 40 * capture.BlockSize
	tgt := &markerTarget{fileTarget: newFileTarget(t), watch: off}
	e, cancel, done := startEngine(t, Options{
		Sources:       []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes:     4 << 20,
		Target:        tgt,
		CrashInterval: 20 * time.Millisecond,
		OnSynced: func() {
			tgt.mu.Lock()
			tgt.synced = true
			tgt.mu.Unlock()
		},
	})
	writeBehind(t, d.File, off, filled(capture.BlockSize, 0x6e))
	// A first mark drains at once; the second falls within the interval.
	e.cap.MarkBytes(0, 8*capture.BlockSize, capture.BlockSize)
	time.Sleep(50 * time.Millisecond)
	e.cap.MarkBytes(0, off, capture.BlockSize)
	marked := time.Now() // a marker dated before this may precede the mark
	// Markers dated after the mark (their quiesce began after it) must
	// hold the marked block: wait for one, then for the drain, however
	// slow the host.
	after := func() (n int) {
		tgt.mu.Lock()
		defer tgt.mu.Unlock()
		for _, m := range tgt.markers {
			if m[0].After(marked) {
				n++
			}
		}
		return n
	}
	for deadline := time.Now().Add(30 * time.Second); after() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no crash marker dated after the mark in 30 s")
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	if tgt.delivered.IsZero() {
		t.Fatal("the marked block was never read back")
	}
	for _, m := range tgt.markers {
		if m[0].After(marked) && m[1].Before(tgt.delivered) {
			t.Fatalf("crash marker dated %v, after the mark, handed over at %v, before the marked block was read back at %v", m[0], m[1], tgt.delivered)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// snapTarget is a fileTarget that keeps, at each app-consistent marker,
// what the copy holds at snapOff.
type snapTarget struct {
	*fileTarget
	snapOff, snapLen int64
	mu               sync.Mutex
	snaps            [][]byte
}

func (t *snapTarget) Marker(m Marker) error {
	if m.Kind == AppConsistent {
		b := make([]byte, t.snapLen)
		if _, err := t.f.ReadAt(b, t.snapOff); err != nil {
			return err
		}
		t.mu.Lock()
		t.snaps = append(t.snaps, b)
		t.mu.Unlock()
	}
	return t.fileTarget.Marker(m)
}

// TestAppPointSettlesUnreportedCompletion: a write whose completion the
// kernel did not report, not yet old enough for the sweep, is done: an
// app-consistent point (nothing in flight on its frozen devices) holds
// it, not the next sweep's read-back seconds later.
func TestAppPointSettlesUnreportedCompletion(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	const off, n = 8 << 20, 64 << 10
	tgt := &snapTarget{fileTarget: newFileTarget(t), snapOff: off, snapLen: n}
	e, cancel, done := startEngine(t, Options{
		Sources:       []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes:     4 << 20,
		Target:        tgt,
		CrashInterval: 0,
		PreScript:     "true", // nothing is mounted: the point quiesces through it
	})
	buf := filled(n, 0x5a)
	writeBehind(t, d.File, off, buf)
	if err := e.cap.InjectPending(0, off, n, false, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.AppConsistent(t.Context()); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	if len(tgt.snaps) != 1 || string(tgt.snaps[0]) != string(buf) {
		t.Fatalf("the app-consistent marker (%d taken) does not hold the write whose completion went unreported", len(tgt.snaps))
	}
}
