package agent

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
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

// TestInterruptedDrainRemarks: a drain whose read-back stops half way
// (the engine survives this for an app-consistent point) puts the blocks
// it did not read back into the kernel bitmap, where the device's next
// drain takes them with the whole protocol; none stay behind in the
// agent's set, where a record applied meanwhile could be read over early.
func TestInterruptedDrainRemarks(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	tgt := &failAtTarget{fileTarget: newFileTarget(t)}
	tgt.failAt.Store(-1)
	e, err := New(Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.rd = capture.NewReader(e.cap)
	rdDone := make(chan error, 1)
	go func() { rdDone <- e.rd.Run(ctx) }()
	defer func() { e.rd.Stop(); <-rdDone }()
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
	words := e.cap.BitmapWords(0)
	for blk := int64(b / capture.BlockSize); blk < (b+n)/capture.BlockSize; blk++ {
		if atomic.LoadUint64(&words[blk/64])&(1<<(blk%64)) == 0 {
			t.Fatalf("block %d, not read back, is not marked in the kernel bitmap", blk)
		}
	}
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
