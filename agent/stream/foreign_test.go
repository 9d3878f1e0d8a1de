package stream_test

import (
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/stream"
	"github.com/lifeboat-dr/lifeboat/agent/stream/streamtest"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// A reconnect to foreign sequences whose state save fails keeps the
// skipped-ahead nextSeq: the retry must still see them as foreign, not
// take the other agent's acks for ours.
func TestForeignDetectionSurvivesFailedSave(t *testing.T) {
	srv := streamtest.New(t)
	state := t.TempDir()
	cfg := config(t, srv, state, 1<<20)
	asked := countChecksumResyncs(&cfg)
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	blocker := filepath.Join(state, stream.StateFile+".tmp")
	if err := os.Mkdir(blocker, 0o700); err != nil {
		t.Fatal(err)
	}
	srv.Advance(100)
	waitFor(t, "a second hello", func() bool { return len(srv.Hellos()) >= 2 })
	time.Sleep(50 * time.Millisecond)
	os.Remove(blocker)
	waitFor(t, "the reconnect", func() bool { st := tg.Stats(); return st.Connected && st.Reconnects >= 1 })
	waitFor(t, "a checksum resync after reconnecting to a process server holding sequences 2..100 this run never numbered", func() bool { return asked.Load() > 0 })
}

// Another agent under the same name numbers fewer records than this one
// has queued (window closed): durable < nextSeq, but beyond anything this
// one sent, so its acks must not free our unsent records.
func TestForeignBelowNextSeqUnsentRecordsNotAcked(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	var asked atomic.Int32
	cfg.OnResync = func(_ int, a wire.SyncAction) { asked.Add(1) }
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil { // seq 1
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.SetWindow(0)
	waitFor(t, "the closed window", func() bool { return tg.Stats().Window == 0 })
	for i := range 10 { // seq 2..11, never sent
		b := make([]byte, 4096)
		b[0] = 0xAA
		if err := tg.WriteAt(0, b, int64(4096*(i+1))); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(50 * time.Millisecond)
	srv.Advance(5) // another agent sent 2..5
	waitFor(t, "the reconnect", func() bool { st := tg.Stats(); return st.Connected && st.Reconnects >= 1 })
	time.Sleep(100 * time.Millisecond)
	st := tg.Stats()
	if st.AckedSeq >= 5 && asked.Load() == 0 {
		img := srv.Image("d0")
		t.Fatalf("records 2..5 of ours were never sent, yet acked (acked %d) with no resync; server image byte at 4096 = %#x (want 0xaa)", st.AckedSeq, img[4096])
	}
}

// At Dial, a process server holding sequences beyond every number the
// state directory handed out (another agent streamed as this machine
// while this one was stopped) gets a checksum resync, not a resume.
func TestDialToForeignSequencesResyncs(t *testing.T) {
	srv := streamtest.New(t)
	state := t.TempDir()
	cfg := config(t, srv, state, 1<<20)
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := tg.Close(); err != nil {
		t.Fatal(err)
	}
	srv.Advance(1 << 30) // beyond the lease
	tg = dial(t, config(t, srv, state, 1<<20))
	if a := tg.Agreements()[0].Action; a != wire.SyncChecksum {
		t.Fatalf("Dial to a server holding foreign sequences: %v, want a checksum resync", a)
	}
}

// Another agent under the same name makes durable numbers this one has
// sent but that never became durable as its own (the server lost them):
// not beyond what this run sent, but the process server says another run
// made them durable, so their acks are not taken for ours.
func TestForeignRunWithinSentSequences(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	asked := countChecksumResyncs(&cfg)
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil { // seq 1
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.HoldAcks(true)
	for i := range 4 { // seq 2..5, sent, never acknowledged
		if err := tg.WriteAt(0, make([]byte, 4096), int64(4096*(i+1))); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "records 2..5 at the server", func() bool { return srv.Durable() >= 5 })
	srv.Lose(1)
	srv.Advance(4) // the other agent's 2..4
	srv.HoldAcks(false)
	waitFor(t, "a checksum resync", func() bool { return asked.Load() > 0 })
}

// Records held while the process server was away, which another agent
// under this name then numbered past: resent, they are dropped there as
// duplicates and never acknowledged. Held on to, they kept the buffer full
// for good and the writer blocked, before the resync it was asked for.
func TestForeignDuplicatesFreed(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.BufferBytes = 2 << 20
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.SetWindow(0)
	time.Sleep(20 * time.Millisecond)
	blocked := make(chan error, 1)
	go func() {
		for i := 1; ; i++ { // until the buffer is full and a write blocks
			if err := tg.WriteAt(0, make([]byte, 4096), int64(4096*(i%200))); err != nil {
				blocked <- err
				return
			}
			if i == 5000 {
				blocked <- nil
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond)
	srv.Advance(10_000) // another agent as this machine, far past our numbers
	waitFor(t, "the reconnect", func() bool { st := tg.Stats(); return st.Connected && st.Reconnects >= 1 })
	srv.SetWindow(8 << 20)
	select {
	case err := <-blocked:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("writer still blocked 10 s after the reconnect: %+v", tg.Stats())
	}
}

// After a reconnect that found another agent's sequences (and skipped
// ahead past them), Sync does not wait for acks of numbers this run let
// go: a stop there used to wait out its timeout and fail.
func TestSyncAfterForeignSequences(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	// Shorter than it takes the server's next acknowledgement of
	// anything to come (about 5 s in streamtest).
	cfg.SyncTimeout = 2 * time.Second
	asked := countChecksumResyncs(&cfg)
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.Advance(100) // another agent as this machine: 2..100
	waitFor(t, "the reconnect", func() bool { st := tg.Stats(); return st.Connected && st.Reconnects >= 1 })
	waitFor(t, "the checksum resync", func() bool { return asked.Load() > 0 })
	if err := tg.Sync(); err != nil {
		t.Fatalf("Sync with nothing of ours unacknowledged: %v", err)
	}
	if err := tg.WriteAt(0, make([]byte, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatalf("Sync of a record written after: %v", err)
	}
}
