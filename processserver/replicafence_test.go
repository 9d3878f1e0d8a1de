package processserver

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// heldWrite, once armed, holds the next Put Page to blob until released,
// then sends it whatever became of its caller meanwhile: a request
// already on its way to the service lands even if its caller gives up.
type heldWrite struct {
	blobstore.Store
	blob    string
	armed   atomic.Bool
	held    chan struct{} // closed when the write is held
	release chan struct{}
	done    chan error // the held write's result
}

func (h *heldWrite) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	if name != h.blob || !h.armed.CompareAndSwap(true, false) {
		return h.Store.WritePages(ctx, name, offset, data)
	}
	close(h.held)
	<-h.release
	err := h.Store.WritePages(context.WithoutCancel(ctx), name, offset, data)
	h.done <- err
	return err
}

// TestReplicaFencedAgainstFormerServer: the applier of a process server
// that lost its machine to another (the agent re-pointed) may be in the
// middle of a Put Page when the other claims the machine. That write
// must not land over the other's later ones: the claim raised the
// replica's fence, and the former server's write fails on it.
func TestReplicaFencedAgainstFormerServer(t *testing.T) {
	store := mem.New()
	replica := layout.DiskName("m1", disk0.Name)
	held := &heldWrite{Store: store, blob: replica, held: make(chan struct{}), release: make(chan struct{}), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	discard := slog.New(slog.DiscardHandler)

	eA := newEnv(t, held, 1)
	eA.segAge = 20 * time.Millisecond
	eA.applier = StandardApplier(ctx, Config{Store: held}, eA.rk, time.Hour, -1, discard)
	eB := *eA
	eB.store, eB.cache, eB.logs, eB.name = store, []string{t.TempDir()}, &logBuf{}, "ps2"
	eB.applier = StandardApplier(ctx, Config{Store: store}, eB.rk, time.Hour, -1, discard)

	sA, a1, ackA := eA.serveFirst() // 1..5
	eventually(t, 10*time.Second, "A's applier at 5", func() bool { return appliedOf(t, store, replica) >= 5 })

	// A's applier is held in its Put Page of 6..8.
	held.armed.Store(true)
	a1.waitAck(a1.batch(6, 3))
	select {
	case <-held.held:
	case <-time.After(10 * time.Second):
		t.Fatal("A's applier did not write 6..8")
	}
	a1.conn.Close()

	// The agent goes on with B, overwriting what 6..8 wrote.
	b1 := dialAgent(t, &eB, eB.start(), "m1")
	ack, _ := b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ackA.Disks[0].Generation, LastAckedSeq: 8})
	if ack.Disks[0].Action != wire.SyncResume {
		t.Fatalf("B answered %v, want a resume", ack.Disks[0].Action)
	}
	var bb wire.BatchBuilder
	want := make([]byte, 3*4096)
	for i := range 3 {
		seq := uint64(9 + i)
		data := batchData(seq, i)
		copy(want[i*4096:], data)
		if err := bb.Add(wire.Record{Seq: seq, Op: wire.OpWrite, Offset: uint64(6+i) * 4096, Length: 4096, Data: data}); err != nil {
			t.Fatal(err)
		}
	}
	p, err := bb.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	b1.sendFrame(wire.TypeBatch, p)
	b1.waitAck(11)
	eventually(t, 20*time.Second, "B's applier at 11", func() bool { return appliedOf(t, store, replica) >= 11 })

	// A's write reaches the service now.
	close(held.release)
	select {
	case err := <-held.done:
		if !errors.Is(err, blobstore.ErrFenced) {
			t.Errorf("A's held write after B's claim: %v, want it fenced", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("A's held write did not end")
	}
	got := make([]byte, len(want))
	if err := store.ReadPages(context.Background(), replica, "", 6*4096, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the replica holds A's 6..8 over B's 9..11")
	}
	eventually(t, 10*time.Second, "A fenced", func() bool { return sA.machine("m1").isFenced() })
}

// appliedOf reads the applied_seq of replica blob (0 before it exists).
func appliedOf(t *testing.T, store blobstore.Store, blob string) uint64 {
	t.Helper()
	info, err := store.Stat(context.Background(), blob)
	if blobstore.IsNotFound(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.ParseUint(info.Metadata[layout.MetaAppliedSeq], 10, 64)
	return n
}

// TestReplicaFencedWhileClaimUnsure: a replica found claimed above the
// server's fence fences the server, but not while a claim of its own is
// unsure (its write failed, maybe after it landed: the applier, still
// under the fence before, may meet the replicas claimed by no other), nor
// for a fence it has left since.
func TestReplicaFencedWhileClaimUnsure(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segAge = 20 * time.Millisecond
	s, _, _ := e.serveFirst()
	m := s.machine("m1")
	m.mu.Lock()
	n := m.claimed
	m.man.Claim = layout.NextClaim(n) // written, reply lost
	m.mu.Unlock()
	err := blobstore.Fenced("test", "write pages", "m1/disks/sda", n, n+1)
	s.ReplicaFenced("m1", n, err)
	if m.isFenced() {
		t.Fatal("fenced while its own claim is unsure")
	}
	// The applier's pass, having read the manifest: a claim above the
	// server's in its own name is its own; in another's, the other's.
	ctx := context.Background()
	if got, err := s.Fence(ctx, "m1", &layout.Manifest{Claim: n + 1, Owner: "ps"}); err != nil || got != n {
		t.Fatalf("fence with its own unsure claim in the manifest: %d, %v; want %d", got, err, n)
	}
	if _, err := s.Fence(ctx, "m1", &layout.Manifest{Claim: n + 1, Owner: "ps2"}); !blobstore.NewerFence(err) {
		t.Fatalf("fence with another server's claim in the manifest: %v, want a newer writer's fence", err)
	}
	m.mu.Lock()
	m.man.Claim = n // the write settled: it had not landed
	m.mu.Unlock()
	s.ReplicaFenced("m1", n, blobstore.Fenced("test", "write pages", "m1/disks/sda", n, n-1))
	if m.isFenced() {
		t.Fatal("fenced by a replica it has not claimed yet")
	}
	s.ReplicaFenced("m1", n-1, err)
	if m.isFenced() {
		t.Fatal("fenced for a fence it has left")
	}
	s.ReplicaFenced("m1", n, err)
	if !m.isFenced() {
		t.Fatal("not fenced by a replica claimed above its fence")
	}
}

// TestReconnectKeepsClaim: the agent back at the server that serves its
// machine (a blip) claims nothing new: the applier would claim and reload
// every replica for nothing. Another server's takeover raises the claim.
func TestReconnectKeepsClaim(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s, a, ack := e.serveFirst()
	claim := func() int64 {
		t.Helper()
		_, _, man := journal(t, store, e.rk, "m1")
		return man.Claim
	}
	c1 := claim()
	if c1 == 0 {
		t.Fatal("the first claim of the machine set no claim")
	}
	a.conn.Close()
	back := wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 5}
	b := dialAgent(t, e, s, "m1")
	b.hello("m1", back)
	b.waitAck(b.batch(6, 2))
	eventually(t, 10*time.Second, "the upload of 6..7", func() bool { return durableSeq(t, store, "m1") == 7 })
	if c := claim(); c != c1 {
		t.Fatalf("claim %d after the agent came back, was %d", c, c1)
	}
	b.conn.Close()
	e2 := *e
	e2.cache, e2.logs, e2.name = []string{t.TempDir()}, &logBuf{}, "ps2"
	back.LastAckedSeq = 7
	c := dialAgent(t, &e2, e2.start(), "m1")
	c.hello("m1", back)
	eventually(t, 10*time.Second, "the takeover's claim", func() bool { return claim() > c1 })
}
