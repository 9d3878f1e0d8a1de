package stream

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// markerSession is a session whose frames go nowhere.
func markerSession(t *testing.T) *session {
	c1, c2 := net.Pipe()
	t.Cleanup(func() { c1.Close(); c2.Close() })
	return &session{conn: tls.Client(c1, &tls.Config{InsecureSkipVerify: true}), w: wire.NewWriter(io.Discard)}
}

// Time markers sent while acknowledgements are withheld keep one entry
// per sequence, the newest: the list must not grow with time.
func TestPendingTimeMarkersOnePerSeq(t *testing.T) {
	s := markerSession(t)
	tg := &Target{nextSeq: 3, sentSeq: 2, ackedSeq: 1}
	now := time.Now()
	for i := range 100 {
		if err := tg.sendMarker(s, now.Add(time.Duration(i)*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	last := now.Add(99 * time.Millisecond)
	if len(tg.markers) != 1 || tg.markers[0].seq != 2 || !tg.markers[0].at.Equal(last) {
		t.Fatalf("%d pending markers after 100 for seq 2, want one dated %v", len(tg.markers), last)
	}
	tg.ackLocked(2)
	if !tg.ackedMarker.Equal(last) || len(tg.markers) != 0 {
		t.Fatalf("after the ack: recoverable until %v, %d pending; want %v, none", tg.ackedMarker, len(tg.markers), last)
	}
}

// Covered points kept while the sender cannot move are bounded, keep the
// oldest (the only one a marker may be able to use) and the newest, and
// stay in order.
func TestCoveredPointsBounded(t *testing.T) {
	tg := &Target{nextSeq: 2, sentSeq: 1, ackedSeq: 1}
	start := time.Now()
	var at time.Time
	for i := range 5000 {
		at = start.Add(time.Duration(i) * time.Millisecond)
		tg.Covered(at)
		tg.nextSeq++
	}
	c := tg.covers
	if len(c) > maxCovers {
		t.Fatalf("%d covered points kept, want at most %d", len(c), maxCovers)
	}
	if c[0].seq != 1 || !c[0].at.Equal(start) || !c[len(c)-1].at.Equal(at) || c[len(c)-1].seq != 5000 {
		t.Fatalf("covered points from %+v to %+v, want the first and the last", c[0], c[len(c)-1])
	}
	for i := 1; i < len(c); i++ {
		if !c[i].at.After(c[i-1].at) || c[i].seq <= c[i-1].seq {
			t.Fatalf("covered points %d and %d out of order: %+v %+v", i-1, i, c[i-1], c[i])
		}
	}
	// A marker with only the first record sent takes the oldest point.
	tg.cfg.Coverage = true
	if err := tg.sendMarker(markerSession(t), time.Now()); err != nil {
		t.Fatal(err)
	}
	if !tg.ackedMarker.Equal(start) {
		t.Fatalf("marker for seq 1 dated %v, want %v", tg.ackedMarker, start)
	}
}

// Released after a resync, time markers wait until every record numbered
// before the release is sent: a marker before the resync's last records
// would date a replica still half resynced.
func TestReleasedMarkersWaitForRecordsBeforeRelease(t *testing.T) {
	s := markerSession(t)
	tg := &Target{nextSeq: 11, sentSeq: 4, ackedSeq: 1, holdMarkers: true}
	tg.HoldTimeMarkers(false) // records 5..10 still to send
	if err := tg.sendMarker(s, time.Now()); err != nil {
		t.Fatal(err)
	}
	if len(tg.markers) != 0 || !tg.ackedMarker.IsZero() {
		t.Fatalf("marker sent with seq %d before the records up to %d numbered at the release", tg.sentSeq, tg.releaseSeq)
	}
	tg.sentSeq = 10
	if err := tg.sendMarker(s, time.Now()); err != nil {
		t.Fatal(err)
	}
	if len(tg.markers) != 1 || tg.markers[0].seq != 10 {
		t.Fatalf("pending markers %+v once every record is sent, want one at seq 10", tg.markers)
	}
}

// Before a freeze the lease gets room for the point: taken during it, it
// writes the state file, which may be on a frozen file system, under the
// stream's lock.
func TestBeforeFreezeLeavesHalfALease(t *testing.T) {
	tg := &Target{nextSeq: 100, lease: 100 + seqLease/4, statePath: t.TempDir() + "/stream.json"}
	if err := tg.BeforeFreeze(); err != nil {
		t.Fatal(err)
	}
	if tg.lease-tg.nextSeq < seqLease/2 {
		t.Fatalf("lease %d at sequence %d: less than half a lease left", tg.lease, tg.nextSeq)
	}
	saved := tg.writtenVer
	tg.nextSeq += seqLease / 4
	if err := tg.BeforeFreeze(); err != nil || tg.writtenVer != saved {
		t.Fatalf("half a lease left: BeforeFreeze wrote the state again (%v)", err)
	}
}

// A reconnect's save waits for the thaw without holding the stream's
// lock: the engine's drain inside the freeze needs that lock, and the
// save may be to a frozen file system.
func TestSaveWaitsForThaw(t *testing.T) {
	tg := &Target{ctx: context.Background(), nextSeq: 100, lease: 100 + seqLease, statePath: t.TempDir() + "/stream.json"}
	if err := tg.BeforeFreeze(); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		err := tg.lockThawed()
		if err == nil {
			tg.mu.Unlock()
		}
		got <- err
	}()
	select {
	case <-got:
		t.Fatal("a save went ahead while the file systems were frozen")
	case <-time.After(100 * time.Millisecond):
	}
	// What the drain does meanwhile: the lock is free.
	if !tg.mu.TryLock() {
		t.Fatal("the stream's lock is held while a save waits for the thaw")
	}
	tg.mu.Unlock()
	tg.AfterThaw()
	awaitNil(t, got, "the save did not go on after the thaw")
}

// A once-a-second save under way when a freeze begins ends before it:
// written after, it would hold the save lock until the thaw.
func TestBeforeFreezeWaitsForSaveUnderWay(t *testing.T) {
	tg := &Target{ctx: context.Background(), nextSeq: 100, lease: 100 + seqLease, statePath: t.TempDir() + "/stream.json", saving: 1}
	tg.cond.L = &tg.mu
	done := make(chan error, 1)
	go func() { done <- tg.BeforeFreeze() }()
	select {
	case err := <-done:
		t.Fatalf("BeforeFreeze returned (%v) with a save under way", err)
	case <-time.After(100 * time.Millisecond):
	}
	tg.mu.Lock()
	tg.saving--
	tg.cond.Broadcast()
	tg.mu.Unlock()
	awaitNil(t, done, "BeforeFreeze still waiting after the save ended")
}

// awaitNil fails t unless ch delivers nil within 5 s (stuck: says so).
func awaitNil(t *testing.T, ch <-chan error, stuck string) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal(stuck)
	}
}
