package agent

import (
	"context"
	"errors"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// failAtTarget is a fileTarget whose WriteAt at failAt fails once.
type failAtTarget struct {
	*fileTarget
	failAt atomic.Int64 // -1: never
}

var errInjected = errors.New("injected target failure")

func (t *failAtTarget) WriteAt(dev int, p []byte, off int64) error {
	if off == t.failAt.Load() {
		t.failAt.Store(-1)
		return errInjected
	}
	return t.fileTarget.WriteAt(dev, p, off)
}

// drainRig is an engine over a 32 MiB data-mode loop device whose
// target fails where told (failAt), with its capture reader running but
// no loop: the test drives the drains.
func drainRig(t *testing.T) (*loopdev.Device, *failAtTarget, *Engine, context.Context) {
	t.Helper()
	testenv.RequireRoot(t)
	tgt := &failAtTarget{fileTarget: newFileTarget(t)}
	tgt.failAt.Store(-1)
	d, e, ctx := drainRigWith(t, tgt)
	return d, tgt, e, ctx
}

// drainRigWith is drainRig with the target given.
func drainRigWith(t *testing.T, tgt Target) (*loopdev.Device, *Engine, context.Context) {
	t.Helper()
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	e, err := New(Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	e.rd = capture.NewReader(e.cap)
	rdDone := make(chan error, 1)
	go func() { rdDone <- e.rd.Run(ctx) }()
	t.Cleanup(func() { cancel(); e.rd.Stop(); <-rdDone }) // before Close
	return d, e, ctx
}

// assertKernelMarked fails unless every block of device 0's
// [off, off+n) is marked in its kernel bitmap (what: why it must be).
func assertKernelMarked(t *testing.T, e *Engine, off, n int64, what string) {
	t.Helper()
	words := e.cap.BitmapWords(0)
	for blk := off / capture.BlockSize; blk < (off+n)/capture.BlockSize; blk++ {
		if atomic.LoadUint64(&words[blk/64])&(1<<(blk%64)) == 0 {
			t.Fatalf("block %d, %s, is not marked in the kernel bitmap", blk, what)
		}
	}
}

// TestInterruptedDrainRemarks: a drain whose read-back stops half way
// (the engine survives this for an app-consistent point) puts the blocks
// it did not read back into the kernel bitmap, where the device's next
// drain takes them with the whole protocol; none stay behind in the
// agent's set, where a record applied meanwhile could be read over early.
func TestInterruptedDrainRemarks(t *testing.T) {
	d, tgt, e, ctx := drainRig(t)
	s := e.srcs[0]
	// The initial copy, as Run starts it.
	s.dirty.SetRange(0, s.dirty.Blocks())
	if err := e.drain(ctx, []int{0}, false, true, nil); err != nil {
		t.Fatal(err)
	}

	// Two regions written behind capture's back and marked as if they
	// had overflowed; the target refuses the second one's read-back.
	const a, b, n = 4 << 20, 20 << 20, 64 << 10
	writeBehind(t, d.File, a, filled(n, 0x11))
	writeBehind(t, d.File, b, filled(n, 0x22))
	e.cap.MarkBytes(0, a, n)
	e.cap.MarkBytes(0, b, n)
	tgt.failAt.Store(b)
	if err := e.drain(ctx, []int{0}, false, false, nil); !errors.Is(err, errInjected) {
		t.Fatalf("drain: %v, want the injected failure", err)
	}
	if s.draining || s.dirty.Any() {
		t.Fatalf("after the failed drain: draining %v, %d blocks left in the agent's set", s.draining, s.dirty.Count())
	}
	assertKernelMarked(t, e, b, n, "not read back")
	// The next drain reads it.
	if err := e.drain(ctx, []int{0}, false, true, nil); err != nil {
		t.Fatal(err)
	}
	for off, want := range map[int64]byte{a: 0x11, b: 0x22} {
		got := make([]byte, n)
		if _, err := tgt.f.ReadAt(got, off); err != nil || string(got) != string(filled(n, want)) {
			t.Errorf("region at %d not in the target after the next drain (err %v)", off, err)
		}
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// TestFailedRecordWriteRemarked: a record the target fails to write is
// taken from the ring all the same; its extent goes to the kernel bitmap,
// so that the next drain reads it back. An app-consistent point whose
// drain failed so lets the engine go on: the write must not be lost.
func TestFailedRecordWriteRemarked(t *testing.T) {
	d, tgt, e, ctx := drainRig(t)
	e.srcs[0].dirty.SetRange(0, e.srcs[0].dirty.Blocks())
	if err := e.drain(ctx, []int{0}, false, true, nil); err != nil {
		t.Fatal(err)
	}

	// A write through the device: a data-mode record in the ring, whose
	// application the target refuses.
	const x, n = 12 << 20, 64 << 10
	f, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := blockdev.AlignedBuffer(n)
	copy(buf, filled(n, 0x33))
	tgt.failAt.Store(x)
	if _, err := f.WriteAt(buf, x); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := e.drain(ctx, []int{0}, false, false, nil); !errors.Is(err, errInjected) {
		t.Fatalf("drain: %v, want the injected failure", err)
	}
	assertKernelMarked(t, e, x, n, "whose record the target refused")
	if err := e.drain(ctx, []int{0}, false, true, nil); err != nil {
		t.Fatal(err)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// slowTarget is a fileTarget that takes its time over every write, as a
// process server holding its agent back does.
type slowTarget struct {
	*fileTarget
	delay time.Duration
}

func (t *slowTarget) WriteAt(dev int, p []byte, off int64) error {
	time.Sleep(t.delay)
	return t.fileTarget.WriteAt(dev, p, off)
}

// TestStopUnderOverload: writes outrunning the target overflow the ring
// again during each drain; the loop still sees a stop (and its timers)
// between drains, instead of draining until the churn falls.
func TestStopUnderOverload(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	tgt := &slowTarget{fileTarget: newFileTarget(t), delay: time.Millisecond}
	_, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 64 << 10,
		Target:    tgt,
	})
	f, err := os.OpenFile(d.Path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	stop := make(chan struct{})
	writer := make(chan error, 1)
	go func() {
		buf := blockdev.AlignedBuffer(64 << 10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				writer <- nil
				return
			default:
			}
			copy(buf, filled(len(buf), byte(i)))
			if _, err := f.WriteAt(buf, int64(i%256)*int64(len(buf))); err != nil {
				writer <- err
				return
			}
		}
	}()
	time.Sleep(time.Second)
	cancel()
	select {
	case err := <-done:
		close(stop)
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second): // it stops within about a second
		close(stop)
		select {
		case <-done:
		case <-time.After(2 * time.Minute): // hung: fail now rather than at go test's timeout
		}
		t.Fatal("the engine did not stop within 10 s while writes went on")
	}
	if err := <-writer; err != nil {
		t.Fatal(err)
	}
}

// TestOverflowBiosCounted: every write bio that takes the bitmap path is
// counted (overflow_bios), not only the one that filled the ring: each
// bio is either a ring record or one of those.
func TestOverflowBiosCounted(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	tgt := &slowTarget{fileTarget: newFileTarget(t), delay: 2 * time.Millisecond}
	e, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 64 << 10,
		Target:    tgt,
	})
	before := e.Stats().Kernel
	const writes = 1000
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=4k", "count="+strconv.Itoa(writes), "oflag=direct", "status=none")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	k := e.Stats().Kernel
	records, overflowed := k.Records-before.Records, k.OverflowBios-before.OverflowBios
	t.Logf("%d writes: %d records, %d overflow bios, %d overflow events", writes, records, overflowed, e.Stats().OverflowEvents)
	if records == writes {
		t.Fatal("every write was recorded: the ring did not overflow, the test did not exercise the path")
	}
	if records+overflowed < writes {
		t.Errorf("%d writes, %d records and %d bios counted on the bitmap path: some went uncounted", writes, records, overflowed)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}

// holdTarget is a fileTarget that sends time markers on its own, as the
// stream does (DrainHolder): it counts the writes made during drains.
type holdTarget struct {
	*fileTarget
	held            bool
	inHold, outHold int
}

func (t *holdTarget) DrainStarted()        { t.held = true }
func (t *holdTarget) DrainEnded(done bool) { t.held = false }

func (t *holdTarget) WriteAt(dev int, p []byte, off int64) error {
	if t.held {
		t.inHold++
	} else {
		t.outHold++
	}
	return t.fileTarget.WriteAt(dev, p, off)
}

// A drain holds the target's time markers while it reads blocks back:
// until it ends the copy is in no state the device was in.
func TestDrainHoldsTimeMarkers(t *testing.T) {
	testenv.RequireRoot(t)
	tgt := &holdTarget{fileTarget: newFileTarget(t)}
	d, e, ctx := drainRigWith(t, tgt)
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=64k", "seek=16", "count=4", "oflag=direct", "status=none")
	e.cap.MarkBytes(0, 1<<20, 256<<10)
	if err := e.drain(ctx, []int{0}, false, false, nil); err != nil {
		t.Fatal(err)
	}
	if tgt.inHold == 0 || tgt.outHold != 0 || tgt.held {
		t.Fatalf("%d read-back writes under the hold, %d outside it, held after the drain: %v", tgt.inHold, tgt.outHold, tgt.held)
	}
}
