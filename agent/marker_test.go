package agent

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/fsfreeze"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// eventTarget logs which blocks it was handed and the markers, in order,
// and runs hook once when it is handed a block of device hookDev.
type eventTarget struct {
	mu      sync.Mutex
	events  []targetEvent
	hookDev int
	hook    func()
}

type targetEvent struct {
	dev    int
	off    int64
	marker bool
	kind   MarkerKind
	at     time.Time // the marker's time
}

func (t *eventTarget) WriteAt(dev int, p []byte, off int64) error {
	t.mu.Lock()
	t.events = append(t.events, targetEvent{dev: dev, off: off})
	var h func()
	if dev == t.hookDev {
		h, t.hook = t.hook, nil
	}
	t.mu.Unlock()
	if h != nil {
		h()
	}
	return nil
}

func (t *eventTarget) Zero(dev int, off, n int64) error                 { return t.WriteAt(dev, nil, off) }
func (t *eventTarget) ReadAt(dev int, p []byte, off int64) (int, error) { return len(p), nil }
func (t *eventTarget) Sync() error                                      { return nil }
func (t *eventTarget) Marker(m Marker) error {
	t.mu.Lock()
	t.events = append(t.events, targetEvent{marker: true, kind: m.Kind, at: m.Time})
	t.mu.Unlock()
	return nil
}

// A crash-consistent marker that holds a data-mode write holds every
// metadata-mode write completed before it. Here, while the marker reads
// the metadata device back, write A lands on it, then write B on the
// data device, whose marks then call for a drain. A marker that read the
// metadata device back before that drain's quiesce held B without A.
func TestMarkerHoldsMetadataWritesBeforeItsRecords(t *testing.T) {
	const y0, yA, xB = 3 * capture.BlockSize, 9 * capture.BlockSize, 7 * capture.BlockSize
	tgt := &eventTarget{hookDev: 1}
	r := newMarkerRig(t, tgt)
	fx, fy, blk, e := r.fx, r.fy, r.blk, r.e
	hooked := make(chan struct{})
	tgt.mu.Lock()
	tgt.hook = func() {
		defer close(hooked)
		if _, err := fy.WriteAt(blk, yA); err != nil { // A
			t.Error(err)
		}
		if _, err := fx.WriteAt(blk, xB); err != nil { // B, after A completed
			t.Error(err)
		}
		e.cap.MarkBytes(0, 12*capture.BlockSize, 1) // x must drain for the point
	}
	tgt.mu.Unlock()
	markerThenStop(t, tgt, fy, blk, y0, hooked, r.cancel, r.done)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	// The marker right after B must not come before A.
	iB, iA, iM := -1, -1, -1
	for i, ev := range tgt.events {
		if iB < 0 && !ev.marker && ev.dev == 0 && ev.off == xB {
			iB = i
		}
		if iA < 0 && !ev.marker && ev.dev == 1 && ev.off == yA {
			iA = i
		}
	}
	if iB < 0 || iA < 0 {
		t.Fatalf("writes handed over: B at %d, A at %d (want both)", iB, iA)
	}
	for i := iB + 1; i < len(tgt.events); i++ {
		if tgt.events[i].marker {
			iM = i
			break
		}
	}
	if iM < 0 {
		t.Fatalf("no marker was handed over after B (%d): nothing was checked", iB)
	}
	if iA > iM {
		t.Fatalf("the marker at %d holds B (handed over at %d) but not A (%d), written before B", iM, iB, iA)
	}
}

// A crash-consistent marker is dated before its quiesce: a write that
// completes while the marker drains or reads back is captured after it,
// so a marker dated when it is emitted would claim a write it does not
// hold. Here write C, on the data device, completes during the marker's
// read-back of the metadata device.
func TestMarkerDatedBeforeItsQuiesce(t *testing.T) {
	const y0, xC = 3 * capture.BlockSize, 5 * capture.BlockSize
	tgt := &eventTarget{hookDev: 1}
	r := newMarkerRig(t, tgt)
	fx, fy, blk := r.fx, r.fy, r.blk
	hooked := make(chan struct{})
	var cDone time.Time // C has completed by then
	tgt.mu.Lock()
	tgt.hook = func() {
		defer close(hooked)
		if _, err := fx.WriteAt(blk, xC); err != nil { // C
			t.Error(err)
		}
		cDone = time.Now()
	}
	tgt.mu.Unlock()
	markerThenStop(t, tgt, fy, blk, y0, hooked, r.cancel, r.done)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	iY, iC := -1, -1
	for i, ev := range tgt.events {
		if iY < 0 && !ev.marker && ev.dev == 1 && ev.off == y0 {
			iY = i
		}
		if iC < 0 && !ev.marker && ev.dev == 0 && ev.off == xC {
			iC = i
		}
	}
	if iY < 0 || iC < 0 {
		t.Fatalf("writes handed over: y0 at %d, C at %d (want both)", iY, iC)
	}
	// The marker that read y0 back comes between y0 and C, C having
	// completed during its read-back.
	between := 0
	for i := iY + 1; i < iC; i++ {
		ev := tgt.events[i]
		if !ev.marker {
			continue
		}
		between++
		if ev.at.After(cDone) {
			t.Fatalf("the marker at %d is dated %v, after write C completed (by %v), but C comes after it (%d)",
				i, ev.at.Format(time.StampMicro), cDone.Format(time.StampMicro), iC)
		}
	}
	if between == 0 {
		t.Fatalf("no marker between y0 (%d) and C (%d): nothing was checked", iY, iC)
	}
}

// markerRig starts an engine on two fresh loop devices, x in data mode and
// y in metadata mode read back by markers only, with a crash-consistent
// marker every 300 ms handed to tgt, and opens both for O_DIRECT writes.
type markerRig struct {
	fx, fy *os.File
	blk    []byte
	e      *Engine
	cancel context.CancelFunc
	done   chan error
}

func newMarkerRig(t *testing.T, tgt Target, opts ...func(*Options)) *markerRig {
	t.Helper()
	testenv.RequireRoot(t)
	x := loopdev.New(t, 16<<20, loopdev.Options{})
	y := loopdev.New(t, 16<<20, loopdev.Options{})
	open := func(path string) *os.File {
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	r := &markerRig{fx: open(x.Path), fy: open(y.Path), blk: blockdev.AlignedBuffer(capture.BlockSize)}
	opt := Options{
		Sources: []Source{
			{Name: "x", Path: x.Path, Mode: capture.ModeData, Sync: SyncFull},
			{Name: "y", Path: y.Path, Mode: capture.ModeMetadata, Sync: SyncFull},
		},
		RingBytes:     4 << 20,
		Target:        tgt,
		ReadbackDelay: time.Hour, // y is read back by markers only
		CrashInterval: 300 * time.Millisecond,
	}
	for _, o := range opts {
		o(&opt)
	}
	// Markers that drain are emitted as they stand: what these tests
	// look at.
	r.e, r.cancel, r.done = startEngineWith(t, opt, func(e *Engine) { e.markerNoRetry = true })
	return r
}

// stop stops the rig's engine, which must end cleanly.
func (r *markerRig) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	if err := <-r.done; err != nil {
		t.Fatal(err)
	}
}

// markerCount is how many markers the target was handed.
func (t *eventTarget) markerCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, ev := range t.events {
		if ev.marker {
			n++
		}
	}
	return n
}

// markerThenStop writes blk at y0 on the metadata device for a marker to
// read back, waits until one has (hooked), waits for that marker and the
// next to go out, then stops the engine (cancel) and checks its end (done).
func markerThenStop(t *testing.T, tgt interface{ markerCount() int }, fy *os.File, blk []byte, y0 int64, hooked <-chan struct{}, cancel func(), done <-chan error) {
	t.Helper()
	if _, err := fy.WriteAt(blk, y0); err != nil {
		t.Fatal(err)
	}
	select {
	case <-hooked:
	case <-time.After(10 * time.Second):
		t.Fatal("no marker read the metadata device back")
	}
	for n, deadline := tgt.markerCount(), time.Now().Add(30*time.Second); tgt.markerCount() < n+2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d markers handed over in 30 s after the hooked read-back, want 2", tgt.markerCount()-n)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// syncTarget is an eventTarget that records, with each marker, whether a
// resync was pending when the marker was handed over.
type syncTarget struct {
	eventTarget
	e       atomic.Pointer[Engine] // set once startEngine returned
	pending []bool
}

func (t *syncTarget) Marker(m Marker) error {
	p := false
	if e := t.e.Load(); e != nil { // nil: before startEngine returned, no request yet
		for i := range e.syncReq {
			p = p || e.syncReq[i].Load() != 0
		}
	}
	t.mu.Lock()
	t.pending = append(t.pending, p)
	t.mu.Unlock()
	return t.eventTarget.Marker(m)
}

// A resync asked for while a crash-consistent point is being taken (here:
// while the marker reads the metadata device back) means the target lacks
// writes the point would claim: no marker is handed over while the resync
// waits; the next round resyncs and then marks the target whole.
func TestNoMarkerWhileResyncPending(t *testing.T) {
	tgt := &syncTarget{eventTarget: eventTarget{hookDev: 1}}
	r := newMarkerRig(t, tgt)
	e := r.e
	tgt.e.Store(e)
	hooked := make(chan struct{})
	tgt.mu.Lock()
	tgt.hook = func() {
		defer close(hooked)
		e.RequestSync(0, SyncCompare) // inside the marker, after the loop took requests
	}
	tgt.mu.Unlock()
	markerThenStop(t, tgt, r.fy, r.blk, 3*capture.BlockSize, hooked, r.cancel, r.done)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	for i, p := range tgt.pending {
		if p {
			t.Fatalf("marker %d of %d handed over while a resync was pending", i+1, len(tgt.pending))
		}
	}
	if e.syncReq[0].Load() != 0 {
		t.Fatal("the resync asked for during the marker was never taken")
	}
}

// An app-consistent point whose drain outlives the freeze window is not
// one: the watchdog thawed the file systems, and the drain went on reading
// blocks that writers may have changed since. Its marker used to be handed
// over all the same.
func TestAppPointNotEmittedAfterWatchdog(t *testing.T) {
	const y0 = 3 * capture.BlockSize
	tgt := &eventTarget{hookDev: 1}
	r := newMarkerRig(t, tgt, func(o *Options) {
		o.FreezeTimeout = 200 * time.Millisecond
		o.CrashInterval = 0  // only the app point reads y back
		o.PreScript = "true" // nothing is mounted: the point quiesces through it
	})
	tgt.mu.Lock()
	tgt.hook = func() { time.Sleep(time.Second) } // the drain's read-back of y0
	tgt.mu.Unlock()
	if _, err := r.fy.WriteAt(r.blk, y0); err != nil {
		t.Fatal(err)
	}
	err := r.e.AppConsistent(t.Context())
	if !errors.Is(err, fsfreeze.ErrTimeout) {
		t.Fatalf("AppConsistent = %v, want the watchdog's ErrTimeout", err)
	}
	r.stop(t)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	read := false
	for _, ev := range tgt.events {
		read = read || !ev.marker && ev.dev == 1 && ev.off == y0
		if ev.marker && ev.kind == AppConsistent {
			t.Fatal("an app-consistent marker was handed over after the watchdog thawed")
		}
	}
	if !read {
		t.Fatal("y0 was not read back: the drain the test times out never ran")
	}
}

// With no file system mounted from the protected devices and no pre
// script, an app-consistent point would quiesce nothing: it is refused,
// and no marker claims it.
func TestAppPointNothingToFreeze(t *testing.T) {
	tgt := &eventTarget{hookDev: -1}
	r := newMarkerRig(t, tgt, func(o *Options) { o.CrashInterval = 0 })
	if err := r.e.AppConsistent(t.Context()); !errors.Is(err, errNothingToFreeze) {
		t.Fatalf("AppConsistent = %v, want errNothingToFreeze", err)
	}
	r.stop(t)
	if n := tgt.markerCount(); n != 0 {
		t.Fatalf("%d markers handed over, want none", n)
	}
}

// A file system thawed by someone else during the point (an operator's
// fsfreeze -u while the drain ran) makes no app-consistent marker: writes
// went on while the drain read the device.
func TestAppPointThawedByOthers(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs.ext4")
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	if err := loopdev.Mkfs(t.Context(), "ext4", d.Path); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := loopdev.Mount(d.Path, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	thawed := make(chan error, 1)
	tgt := &eventTarget{hookDev: 0}
	e, cancel, done := startEngine(t, Options{
		Sources:       []Source{{Name: "d", Path: d.Path, Mode: capture.ModeMetadata, Sync: SyncResume}},
		RingBytes:     4 << 20,
		Target:        tgt,
		ReadbackDelay: time.Hour, // read back by the point only
		CrashInterval: 0,
	})
	if err := os.WriteFile(filepath.Join(mnt, "f"), bytes.Repeat([]byte{7}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	tgt.mu.Lock()
	tgt.hook = func() { thawed <- fsfreeze.Thaw(mnt) } // at the point's first read-back
	tgt.mu.Unlock()
	err := e.AppConsistent(t.Context())
	select {
	case terr := <-thawed:
		if terr != nil {
			t.Fatalf("thawing from the drain: %v", terr)
		}
	default:
		t.Fatal("the point read nothing back: the thaw the test makes never happened")
	}
	if !errors.Is(err, fsfreeze.ErrThaw) {
		t.Fatalf("AppConsistent = %v, want ErrThaw", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	for _, ev := range tgt.events {
		if ev.marker && ev.kind == AppConsistent {
			t.Fatal("an app-consistent marker was handed over after someone else thawed")
		}
	}
}

// A pre script may take long (a database flushing its tables): records
// go on being applied while it runs, or the ring would overflow into a
// bitmap that the freeze must then read back within its window. Here the
// pre script waits for the test to see a write made meanwhile applied.
func TestRecordsAppliedDuringPreScript(t *testing.T) {
	dir := t.TempDir()
	seen, pre := filepath.Join(dir, "seen"), filepath.Join(dir, "pre")
	// Waits up to 20 s for the test's go-ahead.
	body := "#!/bin/sh\nfor i in $(seq 400); do [ -e " + seen + " ] && exit 0; sleep 0.05; done\nexit 1\n"
	if err := os.WriteFile(pre, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	tgt := &eventTarget{hookDev: -1}
	r := newMarkerRig(t, tgt, func(o *Options) {
		o.CrashInterval = 0
		o.PreScript = pre
	})
	point := make(chan error, 1)
	go func() { point <- r.e.AppConsistent(t.Context()) }()
	const x0 = 5 * capture.BlockSize
	time.Sleep(200 * time.Millisecond) // the pre script is running
	if _, err := r.fx.WriteAt(r.blk, x0); err != nil {
		t.Fatal(err)
	}
	applied := func() bool {
		tgt.mu.Lock()
		defer tgt.mu.Unlock()
		for _, ev := range tgt.events {
			if !ev.marker && ev.dev == 0 && ev.off == x0 {
				return true
			}
		}
		return false
	}
	for deadline := time.Now().Add(10 * time.Second); !applied(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			os.WriteFile(seen, nil, 0o644)
			<-point
			t.Fatal("a write made while the pre script ran was not applied before it ended")
		}
	}
	if err := os.WriteFile(seen, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := <-point; err != nil {
		t.Fatalf("AppConsistent: %v", err)
	}
	r.stop(t)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	if n := len(tgt.events); n == 0 || !tgt.events[n-1].marker || tgt.events[n-1].kind != AppConsistent {
		t.Fatalf("the point's marker is not the last event: %+v", tgt.events[max(0, n-3):])
	}
}

// A stop while a point's pre script runs ends the script, takes no
// point, still runs the post script (it may have to undo what the pre
// script began), and is a clean stop.
func TestStopDuringPreScript(t *testing.T) {
	dir := t.TempDir()
	started, ran := filepath.Join(dir, "started"), filepath.Join(dir, "post-ran")
	pre, post := filepath.Join(dir, "pre"), filepath.Join(dir, "post")
	if err := os.WriteFile(pre, []byte("#!/bin/sh\ntouch "+started+"\nsleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(post, []byte("#!/bin/sh\ntouch "+ran+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tgt := &eventTarget{hookDev: -1}
	r := newMarkerRig(t, tgt, func(o *Options) {
		o.CrashInterval = 0
		o.PreScript, o.PostScript = pre, post
	})
	point := make(chan error, 1)
	go func() { point <- r.e.AppConsistent(context.Background()) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(started); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pre script did not start")
		}
	}
	start := time.Now()
	r.cancel()
	if err := <-r.done; err != nil {
		t.Fatalf("stop during the pre script: %v", err)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("the stop waited %v for the pre script", took)
	}
	if err := <-point; err == nil {
		t.Error("the point interrupted by the stop succeeded")
	}
	if _, err := os.Stat(ran); err != nil {
		t.Errorf("the post script did not run: %v", err)
	}
	if n := tgt.markerCount(); n != 0 {
		t.Errorf("%d markers handed over", n)
	}
}

// A crash-consistent marker drains every data-mode device marked before
// its quiesce (whose records the point holds), including one marked after
// the marker looked at what the sweep of stale writes calls for. Here the
// mark comes just before the quiesce.
func TestMarkerDrainsEveryDataDevice(t *testing.T) {
	testenv.RequireRoot(t)
	x := loopdev.New(t, 16<<20, loopdev.Options{})
	y := loopdev.New(t, 16<<20, loopdev.Options{})
	const y0 = 6 * capture.BlockSize
	blk := filled(capture.BlockSize, 0x7c)
	tgt := &eventTarget{hookDev: -1}
	var once sync.Once
	hooked := make(chan struct{})
	_, cancel, done := startEngineWith(t, dataPair(x, y, tgt), func(e *Engine) {
		e.markerNoRetry = true
		e.beforeMarkerDrain = func() {
			once.Do(func() {
				// Changed behind capture's back and marked, as an
				// overflowed write is.
				if err := writeBehindErr(y.File, y0, blk); err != nil {
					t.Error(err)
				}
				e.cap.MarkBytes(1, y0, capture.BlockSize)
				close(hooked)
			})
		}
	})
	select {
	case <-hooked:
	case <-time.After(10 * time.Second):
		t.Fatal("no crash-consistent marker")
	}
	for deadline := time.Now().Add(10 * time.Second); tgt.markerCount() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the marker was not handed over")
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	for _, ev := range tgt.events {
		if ev.marker {
			t.Fatal("the first marker was handed over before y's marked block was read back")
		}
		if ev.dev == 1 && ev.off == y0 {
			return
		}
	}
	t.Fatal("y's marked block was never read back")
}

// blockTarget keeps the latest bytes written at each (device, offset),
// the state each marker was handed over in, and runs a hook, once, when
// an armed (device, offset) is written.
type blockTarget struct {
	mu     sync.Mutex
	blocks map[[2]int64][]byte
	points []map[[2]int64][]byte
	hooks  map[[2]int64]func()
}

func (t *blockTarget) WriteAt(dev int, p []byte, off int64) error {
	k := [2]int64{int64(dev), off}
	t.mu.Lock()
	t.blocks[k] = bytes.Clone(p)
	h := t.hooks[k]
	delete(t.hooks, k)
	t.mu.Unlock()
	if h != nil {
		h()
	}
	return nil
}

func (t *blockTarget) Zero(dev int, off, n int64) error { return t.WriteAt(dev, make([]byte, n), off) }
func (t *blockTarget) ReadAt(dev int, p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}
func (t *blockTarget) Sync() error { return nil }
func (t *blockTarget) Marker(m Marker) error {
	t.mu.Lock()
	t.points = append(t.points, maps.Clone(t.blocks))
	t.mu.Unlock()
	return nil
}

func (t *blockTarget) arm(dev int, off int64, h func()) {
	t.mu.Lock()
	t.hooks[[2]int64{int64(dev), off}] = h
	t.mu.Unlock()
}

// directWriter returns a function writing one block of p at off of path
// with O_DIRECT (so that it has landed when it returns).
func directWriter(t *testing.T, path string) func(off int64, p []byte) {
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return func(off int64, p []byte) {
		blk := blockdev.AlignedBuffer(capture.BlockSize)
		copy(blk, p)
		if _, err := f.WriteAt(blk, off); err != nil {
			t.Error(err)
		}
	}
}

// runUntilHooked runs the engine until hooked is closed, lets it take a
// few more markers and stops it cleanly.
func runUntilHooked(t *testing.T, hooked chan struct{}, what string, cancel context.CancelFunc, done chan error) {
	t.Helper()
	select {
	case <-hooked:
	case <-time.After(20 * time.Second):
		t.Fatal(what)
	}
	time.Sleep(time.Second) // more markers
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A crash-consistent marker on a data-mode device that took no mark
// parks none of its writes: a write parked by the marker's drain was read
// back after the device was unparked, in a state newer than the point.
// Here, while the marker applies Q, the application writes P1 and P2;
// while P1 is read back, it writes C, then P2 again. A point holding the
// second P2 without C is a state the disk was never in.
func TestMarkerParksNoWrite(t *testing.T) {
	testenv.RequireRoot(t)
	y := loopdev.New(t, 16<<20, loopdev.Options{})
	const q, p1, p2, c = 1 << 20, 4 << 20, 8 << 20, 12 << 20
	wy := directWriter(t, y.Path)
	write := func(off int64, b byte) { wy(off, filled(capture.BlockSize, b)) }
	tgt := &blockTarget{blocks: map[[2]int64][]byte{}, hooks: map[[2]int64]func(){}}
	var once sync.Once
	hooked := make(chan struct{})
	_, cancel, done := startEngineWith(t, Options{
		Sources:       []Source{{Name: "y", Path: y.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes:     4 << 20,
		Target:        tgt,
		CrashInterval: 300 * time.Millisecond,
	}, func(e *Engine) {
		e.markerNoRetry = true
		e.beforeMarkerDrain = func() {
			once.Do(func() {
				tgt.arm(0, q, func() {
					tgt.arm(0, p1, func() {
						write(c, 0xc1)
						write(p2, 0xb2)
						close(hooked)
					})
					write(p1, 0xa1)
					write(p2, 0xa2)
				})
				write(q, 0x51)
			})
		}
	})
	runUntilHooked(t, hooked, "the writes of the hooks were not made", cancel, done)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	second, wantC := filled(capture.BlockSize, 0xb2), filled(capture.BlockSize, 0xc1)
	for i, pt := range tgt.points {
		if bytes.Equal(pt[[2]int64{0, p2}], second) && !bytes.Equal(pt[[2]int64{0, c}], wantC) {
			t.Fatalf("point %d holds the second write of P2 but not C, written before it", i)
		}
	}
	if got := tgt.blocks[[2]int64{0, p2}]; !bytes.Equal(got, second) || !bytes.Equal(tgt.blocks[[2]int64{0, c}], wantC) {
		t.Fatal("the copy lacks the last writes of P2 and C")
	}
}

// A crash-consistent marker that found marks drains every data-mode
// device, not only the marked ones: its drain quiesces again, and the
// records that quiesce applies may follow a write another device marked
// after the marker looked. Here y is marked before the look; after it, W
// on x takes the bitmap path (x parked, as by an earlier drain) and R, its
// dependent, a ring record. A point holding R must hold W.
func TestMarkerDrainsDevicesMarkedLate(t *testing.T) {
	testenv.RequireRoot(t)
	x := loopdev.New(t, 16<<20, loopdev.Options{})
	y := loopdev.New(t, 16<<20, loopdev.Options{})
	const w, r = 1 << 20, 5 << 20
	wData, rData := filled(capture.BlockSize, 0x77), filled(capture.BlockSize, 0x52)
	write := directWriter(t, x.Path)
	tgt := &blockTarget{blocks: map[[2]int64][]byte{}, hooks: map[[2]int64]func(){}}
	var before, after sync.Once
	hooked := make(chan struct{})
	_, cancel, done := startEngineWith(t, dataPair(x, y, tgt), func(e *Engine) {
		e.markerNoRetry = true
		e.beforeMarkerDrain = func() {
			before.Do(func() { e.cap.MarkBytes(1, 6*capture.BlockSize, capture.BlockSize) })
		}
		e.afterMarkerLook = func() {
			after.Do(func() {
				bitmapThenRing(e, write, w, wData, r, rData)
				close(hooked)
			})
		}
	})
	runUntilHooked(t, hooked, "no crash-consistent marker found the marks", cancel, done)
	pointsHoldBefore(t, tgt, [2]int64{0, r}, rData, [2]int64{0, w}, wData)
}

// bitmapThenRing writes W at w on device 0 on the bitmap path (the device
// overflowing) and then R at r, its dependent, as a ring record.
func bitmapThenRing(e *Engine, write func(int64, []byte), w int64, wData []byte, r int64, rData []byte) {
	e.cap.SetOverflow(0, true)
	write(w, wData)
	e.cap.SetOverflow(0, false)
	write(r, rData)
}

// pointsHoldBefore fails t if a point holds rData at r (device and
// offset) without wData at w, written before it, or if no point holds
// rData at r.
func pointsHoldBefore(t *testing.T, tgt *blockTarget, r [2]int64, rData []byte, w [2]int64, wData []byte) {
	t.Helper()
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	held := 0
	for i, pt := range tgt.points {
		if bytes.Equal(pt[r], rData) {
			held++
			if !bytes.Equal(pt[w], wData) {
				t.Fatalf("point %d holds the write at %v but not the one at %v, written before it", i, r, w)
			}
		}
	}
	if held == 0 {
		t.Fatalf("no point holds the write at %v: the test did not exercise the marker", r)
	}
}

// dataPair is the options of an engine copying x and y, both in data
// mode, to tgt, with a crash-consistent marker every 300 ms.
func dataPair(x, y *loopdev.Device, tgt Target) Options {
	return Options{
		Sources: []Source{
			{Name: "x", Path: x.Path, Mode: capture.ModeData, Sync: SyncFull},
			{Name: "y", Path: y.Path, Mode: capture.ModeData, Sync: SyncFull},
		},
		RingBytes:     4 << 20,
		Target:        tgt,
		CrashInterval: 300 * time.Millisecond,
	}
}

// The file systems an app-consistent point freezes are looked up at the
// freeze, after the pre script: one mounted from a protected device
// while the script runs is frozen during the point's drain (before, the
// list was taken when the point started, and the point was emitted
// app-consistent with that file system writable).
func TestMountDuringPreScriptFrozen(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs.ext4")
	x := loopdev.New(t, 32<<20, loopdev.Options{})
	if err := loopdev.Mkfs(t.Context(), "ext4", x.Path); err != nil {
		t.Fatal(err)
	}
	y := loopdev.New(t, 16<<20, loopdev.Options{})
	dir := t.TempDir()
	started, goAhead := filepath.Join(dir, "started"), filepath.Join(dir, "go")
	pre := filepath.Join(dir, "pre")
	body := "#!/bin/sh\ntouch " + started + "\nfor i in $(seq 400); do [ -e " + goAhead + " ] && exit 0; sleep 0.05; done\nexit 1\n"
	if err := os.WriteFile(pre, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	tgt := &eventTarget{hookDev: -1}
	e, cancel, done := startEngineWith(t, Options{
		Sources: []Source{
			{Name: "x", Path: x.Path, Mode: capture.ModeData, Sync: SyncFull},
			{Name: "y", Path: y.Path, Mode: capture.ModeMetadata, Sync: SyncFull},
		},
		RingBytes: 4 << 20, Target: tgt, ReadbackDelay: time.Hour, PreScript: pre,
	}, nil)
	// A mark on y, so that the point's drain reads it back (the hook).
	fy, err := os.OpenFile(y.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fy.Close()
	if _, err := fy.WriteAt(blockdev.AlignedBuffer(capture.BlockSize), 3*capture.BlockSize); err != nil {
		t.Fatal(err)
	}
	var writable, hooked bool
	tgt.mu.Lock()
	tgt.hookDev = 1
	tgt.hook = func() { // inside the point's drain
		hooked = true
		if err := fsfreeze.Freeze(mnt); err == nil { // EBUSY when the point froze it
			writable = true
			fsfreeze.Thaw(mnt)
		}
	}
	tgt.mu.Unlock()
	point := make(chan error, 1)
	go func() { point <- e.AppConsistent(t.Context()) }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(started); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pre script did not start")
		}
	}
	if err := loopdev.Mount(x.Path, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fsfreeze.Thaw(mnt); loopdev.Unmount(mnt) })
	if err := os.WriteFile(goAhead, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	perr := <-point
	cancel()
	<-done
	switch {
	case perr != nil:
		t.Fatalf("app-consistent point: %v", perr)
	case !hooked:
		t.Fatal("the point's drain did not read y back")
	case writable:
		t.Fatalf("app-consistent point emitted with %s, mounted from protected %s during the pre script, not frozen during its drain", mnt, x.Path)
	}
}
