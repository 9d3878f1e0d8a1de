package agent

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// askerTarget is a file target that asks for resyncs as the stream does:
// its epoch moves when a request has been handed on.
type askerTarget struct {
	*fileTarget
	epoch   atomic.Uint64
	taken   atomic.Uint64
	held    atomic.Bool  // Marker refuses, as the stream's while a resync is not taken
	refused atomic.Int32 // markers refused
	marked  atomic.Int32 // markers taken
}

func (t *askerTarget) Marker(m Marker) error {
	if t.held.Load() {
		t.refused.Add(1)
		return ErrResyncPending
	}
	t.marked.Add(1)
	return t.fileTarget.Marker(m)
}

func (t *askerTarget) ResyncEpoch() uint64       { return t.epoch.Load() }
func (t *askerTarget) ResyncsTaken(epoch uint64) { t.taken.Store(epoch) }

// A request the engine took in a pass that read the epoch before the
// target moved it (the target hands the request on, then counts it) is
// still said taken at a later pass: else the target would hold every
// consistency point, and the time markers behind them, for good.
// runAsker runs an engine over a 16 MiB data-mode loop device into tgt
// until the test ends; the channel closes once the initial copy is done.
// setup, if any, runs before the engine does.
func runAsker(t *testing.T, tgt *askerTarget, setup ...func(*Engine)) (*Engine, <-chan struct{}) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	synced := make(chan struct{})
	e, err := New(Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 4 << 20,
		Target:    tgt,
		OnSynced:  func() { close(synced) },
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range setup {
		f(e)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		e.Close()
	})
	return e, synced
}

func TestResyncsTakenAfterEpochMoves(t *testing.T) {
	tgt := &askerTarget{fileTarget: newFileTarget(t)}
	runAsker(t, tgt)
	tgt.epoch.Store(1) // its request already taken, by a pass that read 0
	for deadline := time.Now().Add(10 * time.Second); tgt.taken.Load() != 1; {
		if time.Now().After(deadline) {
			t.Fatal("the engine never said the resyncs of epoch 1 taken")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The point after a resync that the target refused (its epoch had not
// moved yet when the pass that took the request read it) is made once
// the target has the resync taken: with no crash interval, nothing else
// would release the target's time markers.
func TestPointAfterResyncOwedUntilTaken(t *testing.T) {
	tgt := &askerTarget{fileTarget: newFileTarget(t)}
	e, synced := runAsker(t, tgt)
	<-synced
	tgt.held.Store(true)
	e.RequestSync(0, SyncCompare)
	for deadline := time.Now().Add(10 * time.Second); tgt.refused.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("no point attempted after the resync")
		}
		time.Sleep(10 * time.Millisecond)
	}
	before := tgt.marked.Load()
	tgt.held.Store(false)
	tgt.epoch.Store(1) // the request handed on: taken already
	for deadline := time.Now().Add(10 * time.Second); tgt.marked.Load() == before; {
		if time.Now().After(deadline) {
			t.Fatal("the point the target refused after the resync was never made")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The point after a resync whose markers are skipped (writes completing
// as each drain began), more times than the loop retries at once, is
// tried again a little later, crash points off: else the target would
// hold its time markers, and recoverable_until stand still, for good.
func TestPointAfterResyncRetried(t *testing.T) {
	was := pointRetry
	t.Cleanup(func() { pointRetry = was }) // after the engine stops
	pointRetry = 300 * time.Millisecond
	tgt := &askerTarget{fileTarget: newFileTarget(t)}
	var armed atomic.Bool
	var skipped atomic.Int32
	e, synced := runAsker(t, tgt, func(e *Engine) {
		e.skipMarker = func() bool {
			return armed.Load() && skipped.Add(1) <= 2*(maxMarkerRetries+1)
		}
	})
	<-synced
	before := tgt.marked.Load()
	armed.Store(true)
	e.RequestSync(0, SyncCompare)
	for deadline := time.Now().Add(20 * time.Second); tgt.marked.Load() == before; {
		if time.Now().After(deadline) {
			t.Fatalf("no point after the resync (%d markers skipped)", skipped.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := skipped.Load(); n <= 2*(maxMarkerRetries+1) {
		t.Fatalf("point made after %d markers skipped, want the skips exhausted first", n)
	}
}

// A drain that goes on past captured writes still in flight (their
// completion never came within inflightTimeout) leaves the device
// unsettled: the stop is then saved unclean (mirror and protect), and the
// next run compares instead of resuming over a target that may lack them.
func TestDrainPastInflightUnsettles(t *testing.T) {
	was := inflightTimeout
	t.Cleanup(func() { inflightTimeout = was }) // after the engine stops
	inflightTimeout = 200 * time.Millisecond
	tgt := &askerTarget{fileTarget: newFileTarget(t)}
	var stuck atomic.Bool
	e, synced := runAsker(t, tgt, func(e *Engine) {
		real := e.cap.RingInflight
		e.ringInflight = func(i int, p uint32) int64 {
			if stuck.Load() {
				return 1
			}
			return real(i, p)
		}
	})
	<-synced
	if e.Unsettled(0) {
		t.Fatal("unsettled after a clean initial copy")
	}
	stuck.Store(true)
	e.RequestSync(0, SyncCompare)
	for deadline := time.Now().Add(20 * time.Second); !e.Unsettled(0); {
		if time.Now().After(deadline) {
			t.Fatal("a drain waited past inflightTimeout for writes in flight, or went on and left the device settled")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stuck.Store(false)
}
