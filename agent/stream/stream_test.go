package stream_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/stream"
	"github.com/lifeboat-dr/lifeboat/agent/stream/streamtest"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

const machine = "m1"

func config(t *testing.T, srv *streamtest.Server, stateDir string, sizes ...uint64) stream.Config {
	t.Helper()
	cfg := stream.Config{Addr: srv.Addr, TLS: srv.ClientTLS(t, machine), Machine: machine, StateDir: stateDir, SyncTimeout: 10 * time.Second}
	for i, n := range sizes {
		cfg.Disks = append(cfg.Disks, stream.Disk{Name: "d" + string(rune('0'+i)), Size: n})
	}
	return cfg
}

func dial(t *testing.T, cfg stream.Config) *stream.Target {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tg, err := stream.Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Close() })
	return tg
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// countChecksumResyncs counts the checksum resyncs cfg's target is asked
// for.
func countChecksumResyncs(cfg *stream.Config) *atomic.Int32 {
	var n atomic.Int32
	cfg.OnResync = func(_ int, a wire.SyncAction) {
		if a == wire.SyncChecksum {
			n.Add(1)
		}
	}
	return &n
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkStream asserts that the server stored records 1..last (or from..last)
// exactly once each, in order, with no protocol violation.
func checkStream(t *testing.T, srv *streamtest.Server, from, last uint64) {
	t.Helper()
	if v := srv.Violations(); len(v) > 0 {
		t.Fatalf("protocol violations: %v", v)
	}
	if d := srv.Durable(); d != last {
		t.Fatalf("server holds records up to %d, want %d", d, last)
	}
	// First arrivals of each sequence must be in order, without a gap.
	seen := map[uint64]bool{}
	next := from
	for _, r := range srv.Received() {
		if seen[r.Seq] {
			continue
		}
		seen[r.Seq] = true
		if r.Seq != next {
			t.Fatalf("record %d arrived when %d was due", r.Seq, next)
		}
		next++
	}
	if next != last+1 {
		t.Fatalf("records %d..%d arrived, want up to %d", from, next-1, last)
	}
}

// Records arrive in order, with no gap, across connections dropped before
// and after the server stored a batch; only unacknowledged batches are
// sent again.
func TestReconnectResendsOnlyUnacknowledged(t *testing.T) {
	srv := streamtest.New(t)
	srv.Fault = func(n int, first, last uint64) streamtest.Fault {
		switch n {
		case 5:
			return streamtest.DropBeforeStore
		case 12:
			return streamtest.DropAfterStore
		}
		return streamtest.Store
	}
	const size = 8 << 20
	cfg := config(t, srv, t.TempDir(), size, size)
	cfg.FlushBytes = 64 << 10
	tg := dial(t, cfg)
	if a := tg.Agreements(); a[0].Action != wire.SyncFull || a[1].Action != wire.SyncFull {
		t.Fatalf("first contact: %v, want full syncs", a)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	want := [2][]byte{make([]byte, size), make([]byte, size)}
	const n = 400
	for i := range n {
		dev := i % 2
		off := int64(rng.IntN(size/4096-8)) * 4096
		if i%37 == 0 {
			if err := tg.Zero(dev, off, 32<<10); err != nil {
				t.Fatal(err)
			}
			clear(want[dev][off : off+32<<10])
			continue
		}
		p := randBytes(rng, 4096*(1+rng.IntN(8)))
		if err := tg.WriteAt(dev, p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[dev][off:], p)
		if i%50 == 0 {
			time.Sleep(10 * time.Millisecond) // let batches go out between faults
		}
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	st := tg.Stats()
	if st.Reconnects != 2 || srv.Conns() != 3 {
		t.Fatalf("%d reconnects, %d connections; the faults were meant to cause 2", st.Reconnects, srv.Conns())
	}
	if st.ResentBatches == 0 {
		t.Fatal("nothing was resent after a batch was lost")
	}
	checkStream(t, srv, 1, n)
	for dev := range 2 {
		if !bytes.Equal(srv.Image(cfg.Disks[dev].Name), want[dev]) {
			t.Fatalf("disk %d: the server's image differs from what was written", dev)
		}
	}
	if st.PendingBytes != 0 || st.AckedSeq != n {
		t.Fatalf("after Sync: %+v", st)
	}
}

// An agent streams to a process server that predates records over plain
// TLS, and to one that has them in records, across a reconnect from the
// one to the other: nothing lost, nothing twice.
func TestPlainTLSThenRecords(t *testing.T) {
	srv := streamtest.New(t)
	srv.SetPlainTLS(true)
	srv.Fault = func(n int, first, last uint64) streamtest.Fault {
		if n == 6 {
			srv.SetPlainTLS(false) // the next connection gets records
			return streamtest.DropBeforeStore
		}
		return streamtest.Store
	}
	const size = 4 << 20
	cfg := config(t, srv, t.TempDir(), size)
	cfg.FlushBytes = 64 << 10
	tg := dial(t, cfg)
	rng := rand.New(rand.NewPCG(3, 4))
	want := make([]byte, size)
	const n = 200
	for i := range n {
		off := int64(rng.IntN(size/4096-16)) * 4096
		p := randBytes(rng, 4096*(1+rng.IntN(16)))
		if err := tg.WriteAt(0, p, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
		if i%20 == 0 {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := srv.Records(); len(got) != 2 || got[0] || !got[1] {
		t.Fatalf("connections carried records: %v, want [false true] (plain TLS, then records)", got)
	}
	checkStream(t, srv, 1, n)
	if !bytes.Equal(srv.Image(cfg.Disks[0].Name), want) {
		t.Fatal("the server's image differs from what was written")
	}
}

// The RPO is the process server's recoverable_until (every write before
// it in the storage account), not the acknowledgements (its cache): while
// its uploads fail it grows, acknowledged or not. A next run reports it
// from the state the last one saved until the process server says.
func TestRPOFollowsRecoverable(t *testing.T) {
	srv := streamtest.New(t)
	dir := t.TempDir()
	tg := dial(t, config(t, srv, dir, 1<<20))
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "recoverable_until from the process server", func() bool { return !tg.Stats().RecoverableUntil.IsZero() })
	waitFor(t, "an RPO under 1.5 s", func() bool { return tg.RPO() < 1500*time.Millisecond })

	srv.HoldRecoverable(true) // the account is down; the cache acknowledges
	held := tg.Stats()
	time.Sleep(2500 * time.Millisecond)
	if err := tg.WriteAt(0, make([]byte, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	st := tg.Stats()
	if !st.AckedUntil.After(held.RecoverableUntil) || st.AckedSeq != 2 {
		t.Fatalf("acknowledgements stopped too: acked until %v, seq %d", st.AckedUntil, st.AckedSeq)
	}
	if rpo := tg.RPO(); rpo < 2*time.Second {
		t.Fatalf("RPO %v while nothing reached the account for 2.5 s", rpo)
	}
	if err := tg.Close(); err != nil {
		t.Fatal(err)
	}

	saved := stream.SavedRecoverableUntil(dir, machine)
	if saved.IsZero() || saved.After(held.RecoverableUntil) {
		t.Fatalf("saved recoverable_until %v, want the last one heard, at most %v", saved, held.RecoverableUntil)
	}
	tg = dial(t, config(t, srv, dir, 1<<20))
	if rpo := tg.RPO(); rpo < 2*time.Second {
		t.Fatalf("RPO %v at the next run's start, before the process server said: want the saved one's", rpo)
	}
	srv.HoldRecoverable(false)
	waitFor(t, "an RPO under 1.5 s once uploads resume", func() bool { return tg.RPO() < 1500*time.Millisecond })
}

// Time markers flow at least every second on an idle stream, carry the
// last record's sequence, and make the RPO small.
func TestTimeMarkersOnIdleStream(t *testing.T) {
	srv := streamtest.New(t)
	tg := dial(t, config(t, srv, t.TempDir(), 1<<20))
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	// Markers are chosen and timed by the agent's clock (UnixNano), and
	// waited for: a loaded host delays them, which only lengthens waits.
	start := time.Now()
	since := func(from time.Time) []streamtest.Marker {
		var ms []streamtest.Marker
		for _, m := range srv.Markers() {
			if m.UnixNano >= from.UnixNano() {
				ms = append(ms, m)
			}
		}
		return ms
	}
	waitFor(t, "two time markers on an idle stream", func() bool { return len(since(start)) >= 2 })
	prev := start
	for _, m := range since(start) {
		if m.Kind != wire.MarkerTime || m.Seq != 1 {
			t.Fatalf("marker %+v: want a time marker for seq 1", m.Marker)
		}
		mt := time.Unix(0, m.UnixNano)
		if gap := mt.Sub(prev); gap > 2500*time.Millisecond {
			t.Fatalf("%v between time markers (MarkerInterval %v)", gap, stream.DefaultMarkerInterval)
		}
		if mt.After(m.At) {
			t.Fatalf("marker time %v is after its arrival %v", mt, m.At)
		}
		prev = mt
	}
	// Two seconds after the last write, an RPO that markers did not
	// advance would be over two seconds; theirs comes back under 1.5 s.
	time.Sleep(time.Until(start.Add(2 * time.Second)))
	waitFor(t, "an RPO under 1.5 s on an idle, fully acknowledged stream", func() bool { return tg.RPO() < 1500*time.Millisecond })

	// Held (during a resync), none flow; released, one goes at once.
	tg.HoldTimeMarkers(true)
	held := time.Now()
	time.Sleep(1200 * time.Millisecond)
	// A marker timed up to 100 ms after the hold may have been under way.
	if ms := since(held.Add(100 * time.Millisecond)); len(ms) != 0 {
		t.Fatalf("%d time markers sent while held", len(ms))
	}
	if rpo := tg.RPO(); rpo < time.Second {
		t.Fatalf("RPO %v while markers are held: it must grow", rpo)
	}
	released := time.Now()
	tg.HoldTimeMarkers(false)
	waitFor(t, "a time marker after the release", func() bool { return len(since(released)) > 0 })
	if ms := since(released); len(ms) > 1 && ms[1].UnixNano-ms[0].UnixNano < int64(100*time.Millisecond) {
		t.Fatalf("a burst of markers right after the release: %+v", ms)
	}
}

// Checksum resync sends only the chunks that differ, including a tail
// shorter than a chunk.
func TestChecksumResyncSendsOnlyDifferences(t *testing.T) {
	srv := streamtest.New(t)
	const size = 4 << 20
	tg := dial(t, config(t, srv, t.TempDir(), size))
	rng := rand.New(rand.NewPCG(3, 4))
	local := randBytes(rng, size)
	for off := 0; off < size; off += 1 << 20 {
		if err := tg.WriteAt(0, local[off:off+1<<20], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	base := len(srv.Received())

	// The device changed under the replica in three chunks...
	changed := map[int64]bool{}
	for _, c := range []int64{5, 17, 40} {
		copy(local[c*stream.ChunkSize+100:], randBytes(rng, 5000))
		changed[c*stream.ChunkSize] = true
	}
	var stored int64
	for off := 0; off < size; off += 1 << 20 {
		n, err := tg.Resync(0, local[off:off+1<<20], int64(off))
		if err != nil {
			t.Fatal(err)
		}
		stored += n
	}
	if stored != 3*stream.ChunkSize {
		t.Fatalf("resync stored %d bytes, want the 3 changed chunks (%d)", stored, 3*stream.ChunkSize)
	}
	// ...and in a range whose tail is shorter than a chunk.
	copy(local[2<<20+64<<10+100:], []byte("changed")) // in the 20 KiB tail of [2 MiB, 2 MiB+84 KiB)
	n, err := tg.Resync(0, local[2<<20:2<<20+84<<10], 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	if n != 20<<10 {
		t.Fatalf("tail resync stored %d bytes, want the 20 KiB tail", n)
	}
	changed[2<<20+64<<10] = true
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	for _, r := range srv.Received()[base:] {
		if r.Op != wire.OpWrite || !changed[int64(r.Offset)] {
			t.Fatalf("resync sent %s of %d bytes at %d, which did not change", r.Op, r.Length, r.Offset)
		}
	}
	if got := len(srv.Received()) - base; got != 4 {
		t.Fatalf("resync sent %d records, want 4", got)
	}
	if !bytes.Equal(srv.Image("d0"), local) {
		t.Fatal("replica differs from the device after the resync")
	}
	if st := tg.Stats(); st.SumDiffers != 4 || st.SumChunks != 4*16+2 {
		t.Fatalf("sums: %d chunks compared, %d differed", st.SumChunks, st.SumDiffers)
	}
}

// With the window closed nothing is sent; once the buffer is full WriteAt
// blocks, and it resumes when the window opens.
func TestClosedWindowBlocksWriteAt(t *testing.T) {
	srv := streamtest.New(t)
	srv.SetWindow(0)
	const size = 16 << 20
	cfg := config(t, srv, t.TempDir(), size)
	cfg.BufferBytes = 2 << 20
	cfg.FlushBytes = 256 << 10
	tg := dial(t, cfg)
	rng := rand.New(rand.NewPCG(5, 6))
	data := randBytes(rng, 8<<20)
	var written atomic.Int64
	done := make(chan error, 1)
	go func() {
		for off := 0; off < len(data); off += 64 << 10 {
			if err := tg.WriteAt(0, data[off:off+64<<10], int64(off)); err != nil {
				done <- err
				return
			}
			written.Store(int64(off + 64<<10))
		}
		done <- nil
	}()
	// The writer has stalled once it has filled most of the buffer and
	// the count holds still for half a second (waited for, not slept on:
	// a loaded CI host may not even have started it after 300 ms); a
	// writer that never blocks reaches the end instead.
	stalled, still := int64(-1), 0
	for deadline := time.Now().Add(10 * time.Second); still < 10 || stalled < 1<<20; {
		if time.Now().After(deadline) {
			t.Fatalf("WriteAt never settled with the window closed: %d bytes accepted so far", written.Load())
		}
		time.Sleep(50 * time.Millisecond)
		if w := written.Load(); w == stalled {
			still++
		} else {
			stalled, still = w, 0
		}
	}
	if stalled >= int64(len(data)) {
		t.Fatalf("WriteAt did not block with the window closed: all %d bytes accepted", stalled)
	}
	if stalled > 3<<20 {
		t.Fatalf("%d bytes accepted with a 2 MiB buffer", stalled)
	}
	if r := srv.Received(); len(r) != 0 {
		t.Fatalf("%d records sent through a closed window", len(r))
	}
	srv.SetWindow(1 << 20)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WriteAt still blocked after the window opened")
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(srv.Image("d0")[:len(data)], data) {
		t.Fatal("replica differs")
	}
	checkStream(t, srv, 1, uint64(len(data)/(64<<10)))
}

// Small batches (each cut short by a marker, as the flush timer does)
// share memory: unacknowledged, 200 batches of 4 KiB fit in a 2 MiB
// buffer, which whole 1 MiB arenas per batch would have filled after two.
// Then everything arrives, in order, and the replica equals the writes.
func TestSmallBatchesShareMemory(t *testing.T) {
	srv := streamtest.New(t)
	srv.HoldAcks(true)
	const size = 4 << 20
	cfg := config(t, srv, t.TempDir(), size)
	cfg.BufferBytes = 2 << 20
	cfg.FlushBytes = 1 << 20
	tg := dial(t, cfg)
	rng := rand.New(rand.NewPCG(7, 8))
	data := randBytes(rng, 200*4096)
	done := make(chan error, 1)
	go func() {
		for off := 0; off < len(data); off += 4096 {
			if err := tg.WriteAt(0, data[off:off+4096], int64(off)); err != nil {
				done <- err
				return
			}
			if err := tg.Mark(wire.MarkerCrashConsistent, time.Now()); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("writes blocked: 200 batches of 4 KiB did not fit a 2 MiB buffer (%d bytes buffered)", tg.Stats().BufferedBytes)
	}
	if b := tg.Stats().BufferedBytes; b > 2<<20 {
		t.Fatalf("%d bytes buffered for 800 KiB of data", b)
	}
	srv.HoldAcks(false)
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(srv.Image("d0")[:len(data)], data) {
		t.Fatal("replica differs")
	}
	checkStream(t, srv, 1, 400)
}

// Records without data (discards, write-zeroes) count against BufferBytes
// too: with nothing acknowledged, a discard storm blocks once the buffer
// is full, as writes do, instead of growing the agent's memory without
// bound (its records take no chunk memory). Released, it all arrives.
func TestDiscardsCountAgainstBuffer(t *testing.T) {
	srv := streamtest.New(t)
	const size = 4 << 20
	cfg := config(t, srv, t.TempDir(), size)
	cfg.BufferBytes = 2 << 20
	cfg.FlushBytes = 64 << 10
	tg := dial(t, cfg)
	rng := rand.New(rand.NewPCG(9, 10))
	data := randBytes(rng, size)
	if err := tg.WriteAt(0, data, 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.HoldAcks(true)
	const n = 200_000 // 12.8 MB of records at recordCost: six buffers
	var done atomic.Int64
	errc := make(chan error, 1)
	go func() {
		for i := range n {
			off := int64(i%(size/512)) * 512
			if err := tg.Zero(0, off, 512); err != nil {
				errc <- err
				return
			}
			done.Add(1)
		}
		errc <- nil
	}()
	time.Sleep(2 * time.Second)
	if d := done.Load(); d == n {
		t.Fatalf("all %d discards buffered with nothing acknowledged and a 2 MiB buffer", n)
	}
	if b := tg.Stats().BufferedBytes; b > 4<<20 {
		t.Fatalf("%d bytes buffered for a 2 MiB buffer", b)
	}
	srv.HoldAcks(false)
	select {
	case err := <-errc:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("discards still blocked after acknowledgements resumed (%d of %d done)", done.Load(), n)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(srv.Image("d0"), make([]byte, size)) {
		t.Fatal("replica is not all zeros after every block was discarded")
	}
}

// Generations and sequence numbers survive restarts; a crash may skip
// sequence numbers but never reuses one.
func TestStatePersistsAcrossRestarts(t *testing.T) {
	srv := streamtest.New(t)
	state := t.TempDir()
	cfg := config(t, srv, state, 1<<20)
	tg := dial(t, cfg)
	for i := range 10 {
		if err := tg.WriteAt(0, bytes.Repeat([]byte{byte(i)}, 4096), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	tg.Close()
	gen := srv.Generation("d0")

	// Clean restart: resume, same generation, numbering continues.
	tg = dial(t, cfg)
	if a := tg.Agreements()[0]; a.Action != wire.SyncResume || a.Generation != gen || a.ResumeFrom != 11 {
		t.Fatalf("after a clean restart: %+v, want resume from 11 with generation %s", a, gen)
	}
	h := srv.Hellos()
	if d := h[len(h)-1].Disks[0]; d.Generation != gen || d.LastAckedSeq != 10 {
		t.Fatalf("hello after restart: %+v", d)
	}
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	// A crash: the state file is as it was while running.
	crashed, err := os.ReadFile(filepath.Join(state, stream.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	tg.Close()
	if err := os.WriteFile(filepath.Join(state, stream.StateFile), crashed, 0o600); err != nil {
		t.Fatal(err)
	}
	tg = dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	r := srv.Received()
	if last := r[len(r)-1].Seq; last <= 11 {
		t.Fatalf("after a crash the next record got seq %d: reused", last)
	}
	if v := srv.Violations(); len(v) != 1 || !strings.Contains(v[0], "follows 11") {
		t.Fatalf("violations %v: want exactly the skipped numbers after the crash", v)
	}

	// Another process server (a new storage account) knows nothing:
	// full sync with a new generation.
	srv2 := streamtest.New(t)
	cfg2 := cfg
	cfg2.Addr, cfg2.TLS = srv2.Addr, srv2.ClientTLS(t, machine)
	tg.Close()
	tg = dial(t, cfg2)
	if a := tg.Agreements()[0]; a.Action != wire.SyncFull || a.Generation == gen {
		t.Fatalf("new process server: %+v, want a full sync with a new generation", a)
	}
}

// A reconnect that finds the replica gone asks the engine for a full sync.
func TestReconnectRequestsResync(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20, 1<<20)
	var mu sync.Mutex
	var asked []string
	cfg.OnResync = func(disk int, a wire.SyncAction) {
		mu.Lock()
		asked = append(asked, cfg.Disks[disk].Name+":"+a.String())
		mu.Unlock()
	}
	tg := dial(t, cfg)
	if err := tg.WriteAt(1, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.Forget("d1")
	srv.Drop()
	waitFor(t, "the resync request", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(asked) > 0
	})
	mu.Lock()
	defer mu.Unlock()
	if len(asked) != 1 || asked[0] != "d1:full-sync" {
		t.Fatalf("resync requests %v, want d1:full-sync", asked)
	}
	if st := tg.Stats(); st.Reconnects != 1 || st.Resyncs != 1 {
		t.Fatalf("%+v", st)
	}
}

// Sync waits for the acknowledgements, within its bound.
func TestSyncWaitsForAcks(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.SyncTimeout = 300 * time.Millisecond
	tg := dial(t, cfg)
	srv.HoldAcks(true)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	err := tg.Sync()
	if err == nil || !strings.Contains(err.Error(), "acknowledged records up to 0 of 1") || !strings.Contains(err.Error(), "--stop-timeout") {
		t.Fatalf("Sync with acks withheld: %v, want it to name the stop timeout", err)
	}
	// Past the bound, by a context that a loaded host cannot outrun.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv.HoldAcks(false)
	if err := tg.SyncContext(ctx); err != nil {
		t.Fatal(err)
	}
	if st := tg.Stats(); st.AckedSeq != 1 {
		t.Fatalf("acked %d", st.AckedSeq)
	}
	// Abort ends a blocked Sync at once.
	srv.HoldAcks(true)
	tg.WriteAt(0, make([]byte, 4096), 0)
	go func() {
		time.Sleep(50 * time.Millisecond)
		tg.Abort(errors.New("stopping"))
	}()
	if err := tg.SyncContext(ctx); err == nil || !strings.Contains(err.Error(), "stopping") {
		t.Fatalf("Sync after Abort: %v", err)
	}
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err == nil {
		t.Fatal("WriteAt after Abort succeeded")
	}
}

// Certificate problems fail Dial at once instead of retrying forever.
func TestRefusedCertificatesFailFast(t *testing.T) {
	srv := streamtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// The agent's certificate has the wrong role: the server refuses it.
	if err := pki.Issue(srv.PKIDir, "rogue", pki.RoleMasterTarget); err != nil {
		t.Fatal(err)
	}
	id, err := pki.Load(srv.PKIDir, "rogue")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.TLS = id.ClientTLS(srv.Addr, pki.RoleProcessServer)
	start := time.Now()
	if _, err := stream.Dial(ctx, cfg); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("wrong-role agent certificate: %v", err)
	} else {
		t.Logf("server refused: %v", err)
	}
	// The server's certificate is from another CA: the agent refuses it.
	other := streamtest.New(t)
	cfg.TLS = other.ClientTLS(t, machine)
	if _, err := stream.Dial(ctx, cfg); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a server from another CA: %v, want a certificate refusal", err)
	} else {
		t.Logf("agent refused: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatalf("refusals took %v: retried instead of failing", time.Since(start))
	}
}

// With Coverage, time markers wait for the engine's first Covered and
// never claim a time after the latest one, whatever was handed over.
func TestCoverageDatesTimeMarkers(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.Coverage = true
	cfg.MarkerInterval = 20 * time.Millisecond
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if ms := srv.Markers(); len(ms) != 0 {
		t.Fatalf("%d time markers before any Covered: %+v", len(ms), ms[0].Marker)
	}
	for _, c := range []time.Time{time.Now().Add(-time.Second), time.Now()} {
		tg.Covered(c)
		tg.Covered(c.Add(-time.Hour)) // never moves back
		waitFor(t, "a time marker dated at the covered time", func() bool {
			ms := srv.Markers()
			return len(ms) > 0 && ms[len(ms)-1].UnixNano == c.UnixNano()
		})
		for _, m := range srv.Markers() {
			if mt := time.Unix(0, m.UnixNano); mt.After(c) {
				t.Fatalf("marker dated %v, after the covered time %v", mt, c)
			}
		}
	}
}

// A reconnect whose new generations cannot be saved must not adopt them:
// the retry's hello would claim the new replica and get a resume, and the
// full sync the process server asked for would never be requested.
func TestAgreePersistFailureKeepsResync(t *testing.T) {
	srv := streamtest.New(t)
	state := t.TempDir()
	cfg := config(t, srv, state, 1<<20, 1<<20)
	var mu sync.Mutex
	var asked []string
	cfg.OnResync = func(disk int, a wire.SyncAction) {
		mu.Lock()
		asked = append(asked, cfg.Disks[disk].Name+":"+a.String())
		mu.Unlock()
	}
	tg := dial(t, cfg)
	if err := tg.WriteAt(1, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	// The state file cannot be saved for a while: its temporary file's
	// name is taken by a directory (ENOSPC or EIO do the same).
	blocker := filepath.Join(state, stream.StateFile+".tmp")
	if err := os.Mkdir(blocker, 0o700); err != nil {
		t.Fatal(err)
	}
	srv.Forget("d1") // the replica is gone: the next hello gets a full sync
	srv.Drop()
	// A third hello shows the second one's save failed (removing the
	// blocker after the second hello alone raced with that save).
	waitFor(t, "a retry after the failed save", func() bool { return len(srv.Hellos()) >= 3 })
	os.Remove(blocker)
	waitFor(t, "the reconnect", func() bool { st := tg.Stats(); return st.Connected && st.Reconnects >= 1 })
	mu.Lock()
	defer mu.Unlock()
	if len(asked) == 0 || asked[len(asked)-1] != "d1:full-sync" {
		t.Fatalf("resync requests %v after the process server started a new replica of d1, want d1:full-sync", asked)
	}
	// hs[0] is Dial's, hs[1] the failed reconnect's, hs[2] the retry's.
	hs := srv.Hellos()
	if len(hs) < 3 || hs[2].Disks[1].Generation != hs[1].Disks[1].Generation {
		t.Fatalf("the retry after the failed save claims generation %s of d1, not the saved %s",
			hs[len(hs)-1].Disks[1].Generation, hs[1].Disks[1].Generation)
	}
}

// With Coverage, a time marker is dated by the Covered calls whose records
// it carries, not by when records were handed over: a write that completed
// before a record was handed over may be handed over after it (the ring, a
// bitmap drain, a read-back delay), so a marker (Seq S, time T) must not
// leave out a write completed before T.
func TestMarkerCoverageFollowsSequence(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.Coverage = true
	cfg.MarkerInterval = 10 * time.Millisecond
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil { // seq 1
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	c1 := time.Now()
	tg.Covered(c1)
	waitFor(t, "a time marker dated at the first covered time", func() bool {
		ms := srv.Markers()
		return len(ms) > 0 && ms[len(ms)-1].UnixNano == c1.UnixNano()
	})
	srv.SetWindow(0) // a slow process server: nothing more is sent
	time.Sleep(50 * time.Millisecond)

	tA := time.Now() // write A completes on the device
	time.Sleep(20 * time.Millisecond)
	// Write X completed after A but is handed over first (seq 2).
	if err := tg.WriteAt(0, make([]byte, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if err := tg.WriteAt(0, make([]byte, 4096), 16384); err != nil { // A: seq 3
		t.Fatal(err)
	}
	c2 := time.Now()
	tg.Covered(c2) // true: every write completed before c2 is handed over

	check := func() {
		t.Helper()
		for _, m := range srv.Markers() {
			if m.UnixNano > tA.UnixNano() && m.Seq < 3 {
				t.Fatalf("time marker dated %v, after write A completed at %v, carries seq %d; A is record 3",
					time.Unix(0, m.UnixNano).Format(time.StampMicro), tA.Format(time.StampMicro), m.Seq)
			}
		}
		if st := tg.Stats(); st.AckedUntil.After(tA) && st.AckedSeq < 3 {
			t.Fatalf("recoverable until %v, after write A completed at %v, while record 3 (A) is not acknowledged (acked %d)",
				st.AckedUntil.Format(time.StampMicro), tA.Format(time.StampMicro), st.AckedSeq)
		}
	}
	time.Sleep(100 * time.Millisecond) // ten marker intervals
	check()

	// Once A is sent, markers reach the covered time.
	srv.SetWindow(1 << 20)
	waitFor(t, "a time marker dated at the second covered time", func() bool {
		ms := srv.Markers()
		return len(ms) > 0 && ms[len(ms)-1].UnixNano == c2.UnixNano()
	})
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	check()
	waitFor(t, "recoverable until the covered time", func() bool { return tg.Stats().AckedUntil.Equal(c2) })
}

// A process server that lost acknowledged records holds a gap until the
// checksum resync: time markers sent before the loss must not advance
// "recoverable until" when the records resent after it are acknowledged.
func TestLossDropsPendingTimeMarkers(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.MarkerInterval = 10 * time.Millisecond
	var tgp atomic.Pointer[stream.Target]
	var asked atomic.Int32
	cfg.OnResync = func(int, wire.SyncAction) {
		asked.Add(1)
		tgp.Load().HoldTimeMarkers(true) // as the agent does until the resync is done
	}
	tg := dial(t, cfg)
	tgp.Store(tg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil { // seq 1
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a time marker for seq 1 acknowledged", func() bool { return !tg.Stats().AckedUntil.IsZero() })
	srv.HoldAcks(true)
	if err := tg.WriteAt(0, make([]byte, 4096), 4096); err != nil { // seq 2, stored, not acknowledged
		t.Fatal(err)
	}
	waitFor(t, "time markers for seq 2", func() bool {
		ms := srv.Markers()
		return len(ms) > 0 && ms[len(ms)-1].Seq == 2
	})
	before := tg.Stats().AckedUntil
	srv.Lose(0) // record 1, acknowledged, is gone
	srv.HoldAcks(false)
	waitFor(t, "the resync request", func() bool { return asked.Load() > 0 })
	waitFor(t, "record 2 acknowledged again", func() bool { return tg.Stats().AckedSeq == 2 })
	if got := tg.Stats().AckedUntil; !got.Equal(before) {
		t.Fatalf("recoverable until moved from %v to %v across the loss of acknowledged record 1",
			before.Format(time.StampMicro), got.Format(time.StampMicro))
	}
}

// A reconnect to a process server holding sequences this run never
// numbered means another agent streams under the same name: its acks are
// not taken for ours, and a checksum resync is asked for.
func TestReconnectToForeignSequencesResyncs(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	asked := countChecksumResyncs(&cfg)
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.Advance(100)
	waitFor(t, "a checksum resync", func() bool { return asked.Load() > 0 })
	if err := tg.WriteAt(0, make([]byte, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if s := tg.Stats(); s.LastSeq <= 100 {
		t.Fatalf("the write after the reconnect got seq %d, a number the other agent used", s.LastSeq)
	}
}

// Time markers follow BusyMarkerInterval while records flow and
// MarkerInterval while none do: under load they ride in the journal and
// bound the RPO's sawtooth, idle each one costs a manifest write.
func TestBusyMarkerInterval(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.MarkerInterval = time.Second
	cfg.BusyMarkerInterval = 40 * time.Millisecond
	tg := dial(t, cfg)
	// Gaps between the markers' own times (the agent's clock), waited
	// for rather than counted in wall-clock windows: a loaded host only
	// stretches them, which the idle bound allows and the busy one
	// (half the idle interval) leaves room for.
	since := func(from time.Time) []int64 {
		var ts []int64
		for _, m := range srv.Markers() {
			if m.UnixNano >= from.UnixNano() {
				ts = append(ts, m.UnixNano)
			}
		}
		return ts
	}
	idleGap := func(what string, from time.Time) {
		t.Helper()
		waitFor(t, "two "+what+" markers", func() bool { return len(since(from)) >= 2 })
		if ts := since(from); ts[1]-ts[0] < int64(900*time.Millisecond) {
			t.Errorf("%v between time markers of an %s stream, want about MarkerInterval (1 s)", time.Duration(ts[1]-ts[0]), what)
		}
	}
	idleGap("idle", time.Now().Add(300*time.Millisecond)) // past the first marker, sent at once
	busy := time.Now()
	for len(since(busy)) < 6 {
		if time.Since(busy) > 10*time.Second {
			t.Fatalf("%d time markers in 10 s of writes", len(since(busy)))
		}
		if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ts := since(busy)
	var gaps []time.Duration
	for k := 1; k < len(ts); k++ {
		gaps = append(gaps, time.Duration(ts[k]-ts[k-1]))
	}
	slices.Sort(gaps)
	if g := gaps[len(gaps)/2]; g >= 500*time.Millisecond {
		t.Errorf("median gap %v between time markers while writing, want about BusyMarkerInterval (40 ms); gaps %v", g, gaps)
	}
	// Idle again once a marker covers the last write.
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	last := tg.Stats().AckedSeq
	waitFor(t, "a marker covering the last write", func() bool {
		ms := srv.Markers()
		return len(ms) > 0 && ms[len(ms)-1].Seq >= last
	})
	idleGap("idle again", time.Now())
}

// freezeConn stops taking writes once frozen (a process server that
// stopped reading: the socket buffer is full) until it is closed or the
// write deadline passes, as a real socket would.
type freezeConn struct {
	net.Conn
	frozen   *atomic.Bool
	closed   chan struct{}
	once     sync.Once
	deadline atomic.Int64 // write deadline, UnixNano; 0: none
}

func (c *freezeConn) Write(p []byte) (int, error) {
	if c.frozen.Load() {
		timeout := time.Hour
		if d := c.deadline.Load(); d != 0 {
			timeout = time.Until(time.Unix(0, d))
		}
		select {
		case <-c.closed:
			return 0, net.ErrClosed
		case <-time.After(timeout):
			return 0, os.ErrDeadlineExceeded
		}
	}
	return c.Conn.Write(p)
}

func (c *freezeConn) SetDeadline(t time.Time) error {
	c.setWrite(t)
	return c.Conn.SetDeadline(t)
}

func (c *freezeConn) SetWriteDeadline(t time.Time) error {
	c.setWrite(t)
	return c.Conn.SetWriteDeadline(t)
}

func (c *freezeConn) setWrite(t time.Time) {
	if t.IsZero() {
		c.deadline.Store(0)
	} else {
		c.deadline.Store(t.UnixNano())
	}
}

func (c *freezeConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// Close returns at once with the sender stuck writing to a process server
// that stopped reading, not after the write time-out (30 s).
func TestCloseWithStalledProcessServer(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	var frozen atomic.Bool
	cfg.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &freezeConn{Conn: c, frozen: &frozen, closed: make(chan struct{})}, nil
	}
	tg := dial(t, cfg)
	frozen.Store(true)
	if err := tg.WriteAt(0, make([]byte, 64<<10), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the sender is now blocked in its write
	done := make(chan error, 1)
	go func() { done <- tg.Close() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close still waiting 5 s after it was called, with the sender stuck on a stalled process server")
	}
}

// A Dial whose save of the generations the process server just started
// (a replica it lost, to be synced in full) fails past the rename, so
// that the file may hold them, says so: the last stop's cleanness must
// not be taken for the new replica's. A save that changed no generation
// fails plainly.
func TestDialUnsettledSave(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	tg := dial(t, cfg)
	if err := tg.Close(); err != nil {
		t.Fatal(err)
	}
	defer stream.SetSyncDir(func(string) error { return syscall.EIO })()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := stream.Dial(ctx, cfg); err == nil || errors.Is(err, stream.ErrStateUnsettled) {
		t.Fatalf("Dial with the same generations and a failing directory sync: %v, want a plain error", err)
	}
	srv.Forget("d0")
	if _, err := stream.Dial(ctx, cfg); !errors.Is(err, stream.ErrStateUnsettled) {
		t.Fatalf("Dial saving a new generation with a failing directory sync: %v, want ErrStateUnsettled", err)
	}
}

// A process server whose certificate is revoked during a session is
// dropped within the check interval, and not reconnected to: nothing more
// streams to it.
func TestRevokedProcessServerDropped(t *testing.T) {
	defer stream.SetPeerCheckEvery(50 * time.Millisecond)()
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	id, err := pki.Load(srv.PKIDir, machine)
	if err != nil {
		t.Fatal(err)
	}
	cfg.CheckPeer = func(c *x509.Certificate) error {
		if err := id.CheckRevoked(c); errors.Is(err, pki.ErrRevoked) {
			return err
		}
		return nil
	}
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := pki.Revoke(srv.PKIDir, "ps"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the session with the revoked process server ended", func() bool { return !tg.Stats().Connected })
	time.Sleep(time.Second) // reconnects are tried meanwhile, and refused
	if st := tg.Stats(); st.Connected || st.Reconnects != 0 {
		t.Fatalf("connected %v, %d reconnects to a revoked process server", st.Connected, st.Reconnects)
	}
}

// A process server of protocol 2 sends no recoverable_until: the RPO then
// counts from the acknowledged time markers, as it did.
func TestRPOWithProtocol2Server(t *testing.T) {
	srv := streamtest.New(t)
	srv.SpeakProtocol2()
	tg := dial(t, config(t, srv, t.TempDir(), 1<<20))
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	waitFor(t, "an RPO under 1.5 s from acknowledged markers", func() bool { return tg.RPO() < 1500*time.Millisecond })
	if st := tg.Stats(); !st.RecoverableUntil.IsZero() {
		t.Fatalf("recoverable_until %v from a protocol 2 server", st.RecoverableUntil)
	}
}

// While the process server says that nothing is recoverable yet (a first
// sync), the RPO counts from when it first said so, across a restart of
// the agent: not from each run's start.
func TestRPOWhileNothingRecoverable(t *testing.T) {
	srv := streamtest.New(t)
	dir := t.TempDir()
	cfg := config(t, srv, dir, 1<<20)
	cfg.HoldTimeMarkers = true // a first sync: no marker, nothing recoverable
	tg := dial(t, cfg)
	waitFor(t, "the process server's word", func() bool { return tg.Stats().Connected })
	time.Sleep(1500 * time.Millisecond)
	if rpo := tg.RPO(); rpo < time.Second {
		t.Fatalf("RPO %v with nothing recoverable for 1.5 s", rpo)
	}
	if err := tg.Close(); err != nil {
		t.Fatal(err)
	}
	tg = dial(t, cfg)
	if rpo := tg.RPO(); rpo < 1500*time.Millisecond {
		t.Fatalf("RPO %v after a restart, nothing recoverable since more than 1.5 s", rpo)
	}
}

// A consistency point numbered before a reconnect that agrees a full
// sync dates a replica being rebuilt: resent, it is withdrawn (no point,
// no time at the process server), and Mark takes none until the engine
// has taken the resync.
func TestResyncWithdrawsEarlierPoints(t *testing.T) {
	srv := streamtest.New(t)
	var drop atomic.Bool
	srv.Fault = func(int, uint64, uint64) streamtest.Fault {
		if drop.Swap(false) {
			return streamtest.DropBeforeStore
		}
		return streamtest.Store
	}
	cfg := config(t, srv, t.TempDir(), 1<<20)
	var asked atomic.Int32
	cfg.OnResync = func(int, wire.SyncAction) { asked.Add(1) }
	tg := dial(t, cfg)
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	srv.Forget("d0") // the replica lost: the next hello gets a full sync
	drop.Store(true) // the point's batch dies with the connection
	if err := tg.Mark(wire.MarkerCrashConsistent, time.Now()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the resync request", func() bool { return asked.Load() > 0 })
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	var withdrawn int
	for _, r := range srv.Received() {
		if r.Op != wire.OpMarker {
			continue
		}
		switch k := wire.MarkerKind(r.Flags); {
		case r.Conn >= 2 && k != wire.MarkerWithdrawn:
			t.Errorf("point %d resent on connection %d as %s, into the new generation", r.Seq, r.Conn, k)
		case r.Conn >= 2:
			withdrawn++
		}
	}
	if withdrawn != 1 {
		t.Errorf("%d withdrawn points resent, want 1", withdrawn)
	}
	if err := tg.Mark(wire.MarkerCrashConsistent, time.Now()); !errors.Is(err, stream.ErrResyncPending) {
		t.Errorf("point with the resync not taken: %v", err)
	}
	tg.ResyncsTaken(tg.ResyncEpoch())
	if err := tg.Mark(wire.MarkerCrashConsistent, time.Now()); err != nil {
		t.Errorf("point after the resync was taken: %v", err)
	}
}

// The engine's sequence around a resync agreed at a reconnect: Covered
// before the resync's drain (none during it: reportCover runs only in
// loop passes without a drain), the resync's records, the crash point at
// its end (Mark, dated then), the time markers released (pointReached),
// then the cover the pass that ran the resync asked for at its start. The
// first time marker after the point is not dated before it: it was dated
// at the resync's start, so that a time during the resync recovered to
// the state after it, with the writes made until its end (and recovery
// takes marker times to increase with sequence).
func TestTimeMarkerAfterResyncNotDatedBeforeIt(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.Coverage = true
	cfg.MarkerInterval = 20 * time.Millisecond
	asked := make(chan struct{}, 4)
	var hold func(bool)
	cfg.OnResync = func(int, wire.SyncAction) {
		hold(true) // resyncRequests.request
		asked <- struct{}{}
	}
	tg := dial(t, cfg)
	hold = tg.HoldTimeMarkers
	coveredWrite(t, srv, tg)
	srv.Forget("d0") // the next hello gets a full sync
	srv.Drop()
	<-asked
	waitFor(t, "the resync handed on", func() bool { return tg.ResyncEpoch() > 0 })
	tg.ResyncsTaken(tg.ResyncEpoch())
	tr := time.Now() // the loop pass that takes the request asks for a barrier now (requestCover)
	// The resync's drain: a while, records, no Covered.
	for i := range 8 {
		time.Sleep(50 * time.Millisecond)
		if err := tg.WriteAt(0, make([]byte, 64<<10), int64(i)*64<<10); err != nil {
			t.Fatal(err)
		}
	}
	tEnd := time.Now()
	if err := tg.Mark(wire.MarkerCrashConsistent, tEnd); err != nil {
		t.Fatal(err)
	}
	tg.HoldTimeMarkers(false) // pointReached
	tg.Covered(tr)            // the next pass without a drain reports the barrier asked for at tr (reportCover)
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	var point uint64
	for _, r := range srv.Received() {
		if r.Op == wire.OpMarker && wire.MarkerKind(r.Flags) == wire.MarkerCrashConsistent {
			point = r.Seq
		}
	}
	// The markers due meanwhile (every 20 ms) may not use that cover,
	// nor one from before the resync; a later one dates them.
	time.Sleep(300 * time.Millisecond)
	waitFor(t, "a time marker after the resync", func() bool {
		tg.Covered(time.Now()) // the engine's later passes
		ms := srv.Markers()
		return len(ms) > 0 && ms[len(ms)-1].Seq >= point
	})
	for _, m := range srv.Markers() {
		if m.Seq >= point && time.Unix(0, m.UnixNano).Before(tEnd) {
			t.Fatalf("time marker at seq %d (after the resync's crash point %d dated %v) is dated %v, %v before it: the post-resync state is dated at the resync's start",
				m.Seq, point, tEnd.Format(time.RFC3339Nano), time.Unix(0, m.UnixNano).Format(time.RFC3339Nano), tEnd.Sub(time.Unix(0, m.UnixNano)))
		}
	}
}

// No time marker is numbered inside a drain's records (DrainStarted),
// whenever they are sent: the replica there holds some blocks read back
// and not others, no state the device was in, and a marker dated by a
// cover from before the drain would offer it for that time. One goes at
// each end of the drain, also when its records are sent after the drain
// ended (the window closed meanwhile), and under overload when the next
// drain has begun by then.
func TestTimeMarkersHeldDuringDrain(t *testing.T) {
	srv := streamtest.New(t)
	cfg := config(t, srv, t.TempDir(), 1<<20)
	cfg.Coverage = true
	cfg.MarkerInterval = 10 * time.Millisecond
	cfg.BusyMarkerInterval = 10 * time.Millisecond
	tg := dial(t, cfg)
	coveredWrite(t, srv, tg)
	write := func(i int) {
		t.Helper()
		if err := tg.WriteAt(0, make([]byte, 64<<10), int64(i)*64<<10); err != nil {
			t.Fatal(err)
		}
	}
	// A drain sent as it goes, one whose records wait for the window,
	// and a drain begun before those are sent.
	var edges []uint64
	seq := func() uint64 { return tg.Stats().LastSeq }
	drain := func(from, n int) {
		tg.DrainStarted()
		edges = append(edges, seq())
		for i := range n {
			write(from + i)
			time.Sleep(15 * time.Millisecond) // markers due meanwhile
		}
		tg.DrainEnded(true)
		edges = append(edges, seq())
	}
	drain(0, 4)
	srv.SetWindow(0)
	time.Sleep(50 * time.Millisecond)
	drain(4, 4)
	tg.DrainStarted()
	edges = append(edges, seq())
	write(8)
	srv.SetWindow(1 << 20) // one batch at a time
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	tg.DrainEnded(true)
	edges = append(edges, seq())
	// A drain that stops half way: nothing after its start is a state
	// of the device until the next drain that is done ends it.
	tg.DrainStarted()
	edges = append(edges, seq())
	write(9)
	tg.DrainEnded(false)
	write(10)
	if err := tg.Sync(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // markers due meanwhile
	tg.DrainStarted()
	write(11)
	tg.DrainEnded(true)
	edges = append(edges, seq())
	waitFor(t, "markers at every drain's end", func() bool {
		marked := map[uint64]bool{}
		for _, m := range srv.Markers() {
			marked[m.Seq] = true
		}
		return marked[edges[1]] && marked[edges[3]] && marked[edges[7]]
	})
	for _, m := range srv.Markers() {
		for i := 0; i < len(edges); i += 2 {
			if m.Seq > edges[i] && m.Seq < edges[i+1] {
				t.Fatalf("time marker %+v numbered inside a drain's records (%d, %d); edges %v", m, edges[i], edges[i+1], edges)
			}
		}
	}
}

// coveredWrite hands tg a write, covers it and waits for the time marker
// that dates it.
func coveredWrite(t *testing.T, srv *streamtest.Server, tg *stream.Target) {
	t.Helper()
	if err := tg.WriteAt(0, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	tg.Covered(at)
	waitFor(t, "a time marker", func() bool {
		ms := srv.Markers()
		return len(ms) > 0 && ms[len(ms)-1].UnixNano == at.UnixNano()
	})
}
