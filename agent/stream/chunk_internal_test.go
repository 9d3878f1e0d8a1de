package stream

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

func chunkTarget(t *testing.T, flush, buffer int) *Target {
	dir := t.TempDir()
	tg := &Target{cfg: Config{FlushBytes: flush, BufferBytes: int64(buffer), StateDir: dir}, statePath: filepath.Join(dir, StateFile), nextSeq: 1, lease: 1 << 20}
	tg.cond.L = &tg.mu
	return tg
}

func mark(t *testing.T, tg *Target) error {
	t.Helper()
	return tg.add(wire.MarkerRecord(wire.Marker{UnixNano: time.Now().UnixNano(), Kind: wire.MarkerCrashConsistent}), nil, true)
}

// A failed save of the sequence lease leaves no empty segment behind
// whose arena, the tail of a chunk, is too short for the next record: the
// record after it lands whole in chunk memory, and sealing it works.
func TestFailedLeaseSaveLeavesNoShortSegment(t *testing.T) {
	tg := chunkTarget(t, 1<<20, 64<<20)
	big := bytes.Repeat([]byte{1}, 900<<10)
	if err := tg.add(wire.Record{Op: wire.OpWrite, Length: uint32(len(big))}, big, false); err != nil {
		t.Fatal(err)
	}
	if err := mark(t, tg); err != nil { // seals the segment: 124 KiB left in the chunk
		t.Fatal(err)
	}
	tg.lease = tg.nextSeq
	blocker := filepath.Join(tg.cfg.StateDir, StateFile+".tmp")
	if err := os.Mkdir(blocker, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := mark(t, tg); err == nil {
		t.Fatal("the lease was extended with its state file unwritable")
	}
	os.Remove(blocker)
	rec := bytes.Repeat([]byte{2}, 200<<10)
	if err := tg.add(wire.Record{Op: wire.OpWrite, Length: uint32(len(rec))}, rec, false); err != nil {
		t.Fatal(err)
	}
	if err := mark(t, tg); err != nil {
		t.Fatal(err)
	}
	last := tg.segs[len(tg.segs)-1]
	if !bytes.Equal(last.arena, rec) {
		t.Fatal("the record after the failed save is not its segment's data")
	}
}

// With batches smaller than minArena and a buffer of one batch, writers
// keep going as batches are acknowledged (chunks of FlushBytes are never
// taken for too short).
func TestSmallFlushBytesDoesNotDeadlock(t *testing.T) {
	tg := chunkTarget(t, 16<<10, 16<<10)
	rec := bytes.Repeat([]byte{3}, 4<<10)
	done := make(chan error, 1)
	go func() {
		for range 64 {
			if err := tg.add(wire.Record{Op: wire.OpWrite, Length: uint32(len(rec))}, rec, false); err != nil {
				done <- err
				return
			}
			if err := mark(t, tg); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	// Acknowledge everything sealed, as the process server would.
	deadline := time.After(5 * time.Second)
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			return
		case <-deadline:
			t.Fatalf("writer blocked: %d bytes buffered of %d", tg.Stats().BufferedBytes, tg.cfg.BufferBytes)
		default:
		}
		tg.mu.Lock()
		if n := len(tg.segs); n > 0 {
			tg.ackLocked(tg.segs[n-1].last)
		}
		tg.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
}

// An answer to the question the engine waits for is not dropped when the
// queue is full of answers to abandoned questions (after reconnects).
func TestSumsAnswerNotDroppedBehindStaleOnes(t *testing.T) {
	tg := chunkTarget(t, 1<<20, 64<<20)
	tg.sumsCh = make(chan wire.SumsReply, 4)
	tg.abort = make(chan struct{})
	for id := range uint16(cap(tg.sumsCh)) {
		tg.deliverSums(wire.SumsReply{ID: id + 1, Differs: []bool{true}})
	}
	q := &wire.Sums{ID: 9, Sums: make([][32]byte, 2)}
	tg.deliverSums(wire.SumsReply{ID: 9, Differs: []bool{false, true}})
	done := make(chan []bool, 1)
	go func() {
		d, err := tg.waitSums(q)
		if err != nil {
			t.Error(err)
		}
		done <- d
	}()
	select {
	case d := <-done:
		if len(d) != 2 || d[0] || !d[1] {
			t.Fatalf("answer %v, want [false true]", d)
		}
	case <-time.After(5 * time.Second):
		close(tg.abort)
		t.Fatal("the awaited answer was dropped behind stale ones")
	}
}

// A consistency marker that waited for room while a reconnect agreed a
// resync (ErrResyncPending) leaves no empty segment open whose arena, the
// tail of a chunk, is too short for the next record: that record lands in
// chunk memory, and sealing it works (it used to panic).
func TestResyncPendingMarkerLeavesNoShortSegment(t *testing.T) {
	tg := chunkTarget(t, 1<<20, 2<<20+100)
	a := bytes.Repeat([]byte{1}, 1<<20-100) // fills a chunk
	if err := tg.add(wire.Record{Op: wire.OpWrite, Length: uint32(len(a))}, a, true); err != nil {
		t.Fatal(err)
	}
	b := bytes.Repeat([]byte{2}, 900<<10) // 124 KiB left in the next
	if err := tg.add(wire.Record{Op: wire.OpWrite, Length: uint32(len(b))}, b, true); err != nil {
		t.Fatal(err)
	}
	tg.mu.Lock()
	full := tg.overLocked(0)
	tg.mu.Unlock()
	if !full {
		t.Fatal("the buffer is not full: the marker would not wait")
	}
	done := make(chan error, 1)
	go func() { done <- mark(t, tg) }()
	time.Sleep(50 * time.Millisecond)
	// The reconnect's agreement: a resync is owed, the first batch acked.
	tg.mu.Lock()
	tg.pointsHeld = true
	tg.ackLocked(tg.segs[0].last)
	tg.mu.Unlock()
	if err := <-done; !errors.Is(err, ErrResyncPending) {
		t.Fatalf("marker: %v, want ErrResyncPending", err)
	}
	tg.mu.Lock()
	tg.pointsHeld = false
	tg.mu.Unlock()
	rec := bytes.Repeat([]byte{3}, 200<<10)
	if err := tg.add(wire.Record{Op: wire.OpWrite, Length: uint32(len(rec))}, rec, false); err != nil {
		t.Fatal(err)
	}
	tg.mu.Lock()
	defer tg.mu.Unlock()
	s := tg.open
	if s == nil || s.ch == nil || !inChunk(s.ch, s.arena) {
		t.Fatal("the record's data is not in chunk memory")
	}
	tg.sealLocked()
}

// inChunk reports whether b's memory lies in chunk c's.
func inChunk(c *chunk, b []byte) bool {
	full := c.buf[:cap(c.buf)]
	lo := uintptr(unsafe.Pointer(unsafe.SliceData(full)))
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	return p >= lo && p+uintptr(cap(b)) <= lo+uintptr(len(full))
}
