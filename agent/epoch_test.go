package agent

import (
	"bytes"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// A drain leaves no mark behind under steady writes. A drain that parked
// its data-mode device on the bitmap left the marks of the writes still
// in flight at its swap to the next drain, which parked again: one mark
// (here, a block the agent marks) kept the device draining every
// markDrainInterval and every crash-consistent marker reading back live
// blocks, for as long as the writes went on. Since a drain bumps the
// device's epoch instead, the writes go on into the ring, held back until
// the read-back, and the next markers find no mark.
func TestDrainLeavesNoMarks(t *testing.T) {
	testenv.RequireRoot(t)
	const size = 32 << 20
	d := loopdev.New(t, size, loopdev.Options{})
	tgt := newFileTarget(t)
	e, cancel, done := startEngine(t, Options{
		Sources:       []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes:     64 << 20,
		Target:        tgt,
		CrashInterval: 200 * time.Millisecond,
	})

	// fio at QD16, so that writes are in flight whenever a drain swaps
	// the bitmap; at a rate the agent keeps up with on a loaded host (the
	// ring must not fill: that marks the bitmap too).
	testenv.RequireTool(t, "fio")
	fioCmd := exec.Command("fio", "--name=steady", "--thread", "--filename="+d.Path, "--direct=1", "--ioengine=libaio",
		"--rw=randwrite", "--bs=4k", "--serialize_overlap=1", "--iodepth=16", "--time_based", "--runtime=600", "--rate=20m",
		"--offset=1m", "--size=31m") // not over the block marked below
	if err := fioCmd.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan struct{})
	var fioErr error
	go func() { fioErr = fioCmd.Wait(); close(fioDone) }()
	stopFio := func() {
		fioCmd.Process.Kill()
		<-fioDone // its writes in flight are waited for at its exit
	}
	defer stopFio()
	time.Sleep(300 * time.Millisecond)
	// A block written behind capture's back, then marked: its read-back
	// shows the drain ran.
	const marked = 5 * capture.BlockSize
	behind := filled(capture.BlockSize, 0x6d)
	writeBehind(t, d.File, marked, behind)
	e.cap.MarkBytes(0, marked, capture.BlockSize)
	waitMirrorAt(t, tgt.f, marked, behind, "the marked block was not read back")
	k0, err := e.cap.Counters()
	if err != nil {
		t.Fatal(err)
	}
	m0 := e.cap.Marks(0)
	time.Sleep(6 * markDrainInterval)
	k1, err := e.cap.Counters()
	if err != nil {
		t.Fatal(err)
	}
	m1 := e.cap.Marks(0)
	select {
	case <-fioDone:
		t.Fatalf("fio stopped early: %v", fioErr)
	default:
	}
	stopFio()
	if k1.Records == k0.Records {
		t.Fatal("no write was captured while the marks were watched")
	}
	if n := e.cap.OverflowEvents(0); n != 0 {
		t.Fatalf("the ring filled %d times: this host did not keep up with 20 MB/s, the test proves nothing", n)
	}
	if m1 != m0 || k1.OverflowBios != k0.OverflowBios {
		t.Errorf("under steady writes the device took %d marks (%d writes on the bitmap path) in %v after its drain: drains leave marks for the next one",
			m1-m0, k1.OverflowBios-k0.OverflowBios, 6*markDrainInterval)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s := e.Stats()
	if s.CrashMarkers == 0 {
		t.Fatal("no crash-consistent marker under writes")
	}
	if k := s.Kernel; k.OverflowBios != 0 {
		t.Errorf("%d writes took the bitmap path though the ring never filled: a drain parked them", k.OverflowBios)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// A drain takes the bitmap before it bumps the epochs: the marks it takes
// then are older than the records it holds back. Here, once a drain has
// bumped the epoch, R is written to X (a ring record of the new epoch,
// held back) and then W over it on the bitmap path (the device
// overflowing meanwhile). The drain's second swap takes W's mark; R,
// older, is applied over X (which it covers whole, so X is not read), and
// X is marked again for the next drain, which reads W back. Without, the
// copy would keep R for good.
func TestDrainHeldRecordNotOverMark(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	const x = 3 << 20
	write := directWriter(t, d.Path)
	rData, wData := filled(capture.BlockSize, 0x52), filled(capture.BlockSize, 0x57)
	tgt := newFileTarget(t)
	var once sync.Once
	hooked := make(chan struct{})
	e, cancel, done := startEngineWith(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
	}, func(e *Engine) {
		e.drainHook = func(stage string) {
			if stage != "bumped" || e.stats.Drains == 0 {
				return // the initial copy
			}
			once.Do(func() {
				write(x, rData)
				e.cap.SetOverflow(0, true)
				write(x, wData)
				e.cap.SetOverflow(0, false)
				close(hooked)
			})
		}
	})
	e.cap.MarkBytes(0, 5*capture.BlockSize, capture.BlockSize) // calls for a drain
	select {
	case <-hooked:
	case <-time.After(10 * time.Second):
		t.Fatal("no drain ran")
	}
	// The loop's next drain reads X again (not the stop's, which reads
	// whatever is marked).
	waitMirrorAt(t, tgt.f, x, wData, "X was not read back again after R")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s := e.Stats(); s.Held == 0 {
		t.Fatal("the drain held no record back: R was not captured in the new epoch")
	}
	got := make([]byte, capture.BlockSize)
	if _, err := tgt.f.ReadAt(got, x); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, wData) {
		t.Fatalf("the copy holds %#x at X, want W's %#x: the held record R was applied over W's read-back", got[0], wData[0])
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// A crash-consistent point that holds a record holds the writes completed
// before it. Here, in a marker's drain, once the bitmap has been taken, W
// is written on the bitmap path (the device overflowing) and then R, its
// dependent, as a ring record of the old epoch, which the drain's quiesce
// applies: the drain swaps the bitmap again once it has bumped the epoch
// (after every record of the old epoch was made), so that the point
// holding R holds W.
func TestMarkerHoldsWritesMarkedDuringItsDrain(t *testing.T) {
	const w, r = 1 << 20, 5 << 20
	wData, rData := filled(capture.BlockSize, 0x77), filled(capture.BlockSize, 0x52)
	e, tgt := inMarkerDrain(t, "swapped", false, func(e *Engine, write func(int64, []byte)) {
		bitmapThenRing(e, write, w, wData, r, rData)
	})
	pointsHoldBefore(t, tgt, [2]int64{0, r}, rData, [2]int64{0, w}, wData)
	if s := e.Stats(); s.MarkersSkipped != 0 {
		t.Fatalf("%d markers skipped: the drained point was not the one checked", s.MarkersSkipped)
	}
}

// inMarkerDrain runs an engine on a 16 MiB data-mode device whose first
// crash-consistent marker finds a mark (block 6) and drains; act writes to
// the device at stage of that drain (see Engine.drainHook). With retry,
// a marker that drained is taken once more (marker). It returns once
// the engine has stopped, a few markers later.
func inMarkerDrain(t *testing.T, stage string, retry bool, act func(e *Engine, write func(int64, []byte))) (*Engine, *blockTarget) {
	t.Helper()
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	write := directWriter(t, d.Path)
	tgt := &blockTarget{blocks: map[[2]int64][]byte{}, hooks: map[[2]int64]func(){}}
	var marked, once sync.Once
	var inMarker bool
	hooked := make(chan struct{})
	e, cancel, done := startEngineWith(t, Options{
		Sources:       []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes:     4 << 20,
		Target:        tgt,
		CrashInterval: 300 * time.Millisecond,
	}, func(e *Engine) {
		e.markerNoRetry = !retry // without, the drained point is the one looked at
		e.beforeMarkerDrain = func() {
			marked.Do(func() {
				e.cap.MarkBytes(0, 6*capture.BlockSize, capture.BlockSize)
				inMarker = true
			})
		}
		e.drainHook = func(s string) {
			if s != stage || !inMarker {
				return
			}
			once.Do(func() {
				act(e, write)
				close(hooked)
			})
		}
	})
	runUntilHooked(t, hooked, "no crash-consistent marker drained", cancel, done)
	return e, tgt
}

// A drain holds back the new epoch's records of every device, not only
// of those it drains: here the loop drains x alone (a mark on x), and
// after the bump J is written on x, then C, its dependent, on y. Were
// only x's records held, C would reach the target before J, and a stream
// (a time marker sent then, a crash) would hold C without J.
func TestDrainHoldsBackEveryDevice(t *testing.T) {
	testenv.RequireRoot(t)
	x := loopdev.New(t, 16<<20, loopdev.Options{})
	y := loopdev.New(t, 16<<20, loopdev.Options{})
	const j, c = 1 << 20, 5 << 20
	wx, wy := directWriter(t, x.Path), directWriter(t, y.Path)
	tgt := &eventTarget{hookDev: -1}
	opt := dataPair(x, y, nil)
	opt.Target, opt.CrashInterval = tgt, 0
	var once sync.Once
	hooked := make(chan struct{})
	from := 0 // the target's events before the hook: the copy's
	e, cancel, done := startEngineWith(t, opt, func(e *Engine) {
		e.drainHook = func(stage string) {
			if stage != "bumped" || e.stats.Drains == 0 {
				return // the initial copy
			}
			once.Do(func() {
				tgt.mu.Lock()
				from = len(tgt.events)
				tgt.mu.Unlock()
				wx(j, filled(capture.BlockSize, 0x4a))
				wy(c, filled(capture.BlockSize, 0x43))
				close(hooked)
			})
		}
	})
	e.cap.MarkBytes(0, 6*capture.BlockSize, capture.BlockSize) // a drain of x alone
	runUntilHooked(t, hooked, "no drain ran", cancel, done)
	tgt.mu.Lock()
	defer tgt.mu.Unlock()
	jAt, cAt := -1, -1
	for k, ev := range tgt.events {
		switch {
		case k < from:
		case ev.marker:
		case ev.dev == 0 && ev.off == j && jAt < 0:
			jAt = k
		case ev.dev == 1 && ev.off == c && cAt < 0:
			cAt = k
		}
	}
	if jAt < 0 || cAt < 0 {
		t.Fatalf("J at event %d, C at %d: not both reached the target", jAt, cAt)
	}
	if cAt < jAt {
		t.Fatalf("C reached the target (event %d) before J (event %d), written before it", cAt, jAt)
	}
	if s := e.Stats(); s.Held < 2 {
		t.Fatalf("%d records held back, want J and C", s.Held)
	}
}

// A drain holds back at most maxHeld bytes of records; the others are
// read back by the next drain, once their writes have landed.
func TestDrainHoldsBoundedRecords(t *testing.T) {
	testenv.RequireRoot(t)
	const size = 64 << 20
	d := loopdev.New(t, size, loopdev.Options{})
	f, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tgt := newFileTarget(t)
	var once sync.Once
	hooked := make(chan struct{})
	e, cancel, done := startEngineWith(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 64 << 20,
		Target:    tgt,
	}, func(e *Engine) {
		e.drainHook = func(stage string) {
			if stage != "bumped" || e.stats.Drains == 0 {
				return
			}
			once.Do(func() {
				// 1.5 × maxHeld in 1 MiB writes, twice over the same
				// blocks, the second pass with other bytes.
				buf := blockdev.AlignedBuffer(1 << 20)
				for pass := range 2 {
					for off := int64(0); off < maxHeld*3/2; off += 1 << 20 {
						for k := range buf {
							buf[k] = byte(off>>20) + byte(pass)*0x80 + byte(k)
						}
						if _, err := f.WriteAt(buf, off); err != nil {
							t.Error(err)
						}
					}
				}
				// Small enough to fit where the last big one did not:
				// left out all the same.
				if _, err := f.WriteAt(buf[:capture.BlockSize], 60<<20); err != nil {
					t.Error(err)
				}
				close(hooked)
			})
		}
	})
	e.cap.MarkBytes(0, 60<<20, capture.BlockSize) // calls for a drain
	select {
	case <-hooked:
	case <-time.After(10 * time.Second):
		t.Fatal("no drain ran")
	}
	// The loop's next drain reads back those not held (the last one
	// written surely was not).
	last := int64(maxHeld*3/2 - 1<<20)
	want := make([]byte, 1<<20)
	for k := range want {
		want[k] = byte(last>>20) + 0x80 + byte(k)
	}
	waitMirrorAt(t, tgt.f, last, want, "the records not held were not read back")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s := e.Stats()
	big := 2 * (maxHeld * 3 / 2) >> 20
	fit := maxHeld / (1<<20 + capture.HeaderSize + 4)
	if s.Held != uint64(fit) || s.HeldOut != uint64(big-fit+1) {
		t.Fatalf("held %d, read back for want of room %d: want the first %d, then none of the %d others", s.Held, s.HeldOut, fit, big-fit+1)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// A write that completes, on the bitmap path, right after a marker's drain
// bumped the epoch may depend on a record of the new epoch the drain holds
// back: here H is written (held back), then W over the bitmap path. Read
// back into the point, W would be in it without H; that marker is not
// taken.
func TestMarkerNotTakenOverHeldRecord(t *testing.T) {
	const h, w = 1 << 20, 5 << 20
	hData, wData := filled(capture.BlockSize, 0x48), filled(capture.BlockSize, 0x57)
	e, tgt := inMarkerDrain(t, "bumped", false, func(e *Engine, write func(int64, []byte)) {
		write(h, hData)
		e.cap.SetOverflow(0, true)
		write(w, wData)
		e.cap.SetOverflow(0, false)
	})
	pointsHoldBefore(t, tgt, [2]int64{0, w}, wData, [2]int64{0, h}, hData)
	if s := e.Stats(); s.MarkersSkipped == 0 {
		t.Fatal("no marker skipped")
	}
}

// waitMirrorAt waits until mirror holds want at off.
func waitMirrorAt(t *testing.T, mirror *os.File, off int64, want []byte, what string) {
	t.Helper()
	got := make([]byte, len(want))
	// Past the sweep of a ring-captured write whose completion the
	// kernel did not report (10 s), which a drain may wait for.
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := mirror.ReadAt(got, off); err == nil && bytes.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A marker that had to drain is taken once more: its drain read blocks
// back while they were being written, maybe newer than records it held
// back. Here, once the drain bumped the epoch, E is written, then L over
// the marked block, which the drain reads back (L): the point emitted
// after the drain would hold L without E. Taken again, the marker applies
// the held records first, finds no mark, and its point holds both.
func TestMarkerExactAfterDrain(t *testing.T) {
	const eOff, lOff = 1 << 20, 6 * capture.BlockSize
	eData, lData := filled(capture.BlockSize, 0x45), filled(capture.BlockSize, 0x4c)
	e, tgt := inMarkerDrain(t, "bumped", true, func(e *Engine, write func(int64, []byte)) {
		write(eOff, eData)
		write(lOff, lData)
	})
	pointsHoldBefore(t, tgt, [2]int64{0, lOff}, lData, [2]int64{0, eOff}, eData)
	if s := e.Stats(); s.Held < 2 {
		t.Fatalf("%d records held back: the test did not exercise the drain", s.Held)
	}
}
