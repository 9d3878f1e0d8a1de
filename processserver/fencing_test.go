package processserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// TestManifestFencedAgainstAnotherServer: two process servers serve the
// same machine (its agent re-pointed to B while A, cut off from the agent
// but not from the account, still holds a session). B records a new
// generation; A's next manifest write must not erase it: A finds the
// manifest changed, stops serving the machine (session aborted, uploads
// stopped) and says why. When the agent comes back to A, its hello takes
// the machine back from the account's state, and B is fenced in turn.
//
// With a cache disk that cannot delete (down), A does not take the
// machine back while its superseded segments cannot go (a restart would
// take them for current ones): the hello fails, and the next one after
// the disk is back succeeds.
func TestManifestFencedAgainstAnotherServer(t *testing.T) {
	for _, undeletable := range []bool{false, true} {
		t.Run(fmt.Sprint("undeletable=", undeletable), func(t *testing.T) { fencedAgainstAnother(t, undeletable) })
	}
}

func fencedAgainstAnother(t *testing.T, undeletable bool) {
	store := mem.New()
	eA := newEnv(t, store, 1)
	eA.segAge = 20 * time.Millisecond
	ffs := &faultFS{}
	eA.cacheFS = ffs
	eB := *eA // same PKI, recovery key and account; its own cache and logs
	eB.cache, eB.logs, eB.name = []string{t.TempDir()}, &logBuf{}, "ps2"
	sA, a1, ackA := eA.serveFirst()

	// B: the agent comes back without its generation (say it was
	// reinstalled): a full sync, recorded in the manifest.
	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	ackB, _ := b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, LastAckedSeq: 5})
	if ackB.Disks[0].Action != wire.SyncFull || ackB.Disks[0].Generation == ackA.Disks[0].Generation {
		t.Fatalf("B answered %+v, want a full sync with a new generation", ackB.Disks[0])
	}
	genB := ackB.Disks[0].Generation.String()

	// A's session goes on: its next upload writes the manifest.
	a1.batch(6, 5)
	for f := a1.next(10 * time.Second); f.err == nil; f = a1.next(10 * time.Second) {
		if f.typ != wire.TypeAck && f.typ != wire.TypeBackpressure {
			t.Fatalf("A's session sent a %s frame, want acks until it ends", f.typ)
		}
	}
	eventually(t, 10*time.Second, "A's log to say it stopped serving m1", func() bool {
		l := eA.logs.String()
		return strings.Contains(l, "machine=m1") && strings.Contains(l, "another writer changed the manifest") &&
			strings.Contains(l, "uploads of the machine stopped")
	})

	_, _, man := journal(t, store, eA.rk, "m1")
	if d := man.Disk(disk0.Name); d == nil || d.Generation != genB {
		t.Fatalf("manifest disk %+v, want B's generation %s", d, genB)
	}
	if man.DurableSeq != 5 {
		t.Fatalf("manifest durable_seq %d, want 5 (A's later upload not published)", man.DurableSeq)
	}

	// The agent comes back to A, with B's generation and A's acks up to
	// 10: A serves the machine again, from the manifest B wrote. Its
	// cached 6..10, records of the generation B's full sync replaced, are
	// dropped, not published, and their upload (before A was fenced),
	// which no manifest vouched for, is deleted: 6..10 are a gap, which
	// the agent's checksum resync mends.
	seg := layout.SegmentName("m1", 6, 10)
	if _, err := store.Stat(context.Background(), seg); err != nil {
		t.Fatalf("A's upload of 6..10 before it was fenced: %v", err)
	}
	back := wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ackB.Disks[0].Generation, LastAckedSeq: 10}
	if undeletable {
		ffs.failRemove.Store(true)
		a := dialAgent(t, eA, sA, "m1")
		if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{back}}); err != nil {
			t.Fatal(err)
		}
		if f := a.next(30 * time.Second); f.typ != wire.TypeError {
			t.Fatalf("hello while the superseded segments cannot be deleted: got %s %v, want an error", f.typ, f.err)
		}
		if !sA.machine("m1").isFenced() || !strings.Contains(eA.logs.String(), "cannot delete cached segment") {
			t.Fatal("A took the machine back with its superseded segments still cached, or did not say why not")
		}
		ffs.failRemove.Store(false)
	}
	a2 := dialAgent(t, eA, sA, "m1")
	ack2, _ := a2.hello("m1", back)
	if d := ack2.Disks[0]; d.Action != wire.SyncChecksum || d.ResumeFrom != 11 || d.Generation != ackB.Disks[0].Generation {
		t.Fatalf("A answered %+v, want a checksum resync of B's generation from 11", d)
	}
	a2.waitAck(a2.batch(11, 3))
	a2.marker(13, wire.MarkerTime, time.Now())
	waitMended(t, store, 13)
	if !strings.Contains(eA.logs.String(), "dropped cached segments another process server's journal superseded") {
		t.Error("A did not say it dropped its superseded cached segments")
	}
	if _, err := store.Stat(context.Background(), seg); err == nil {
		t.Error("A's 6..10 of the replaced generation is still in the journal")
	}
	if _, f := sA.cache.Fenced("m1"); f {
		t.Error("A's fence record kept after it took the machine back")
	}

	// B, still writing, is the one fenced now.
	b1.marker(5, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "B fenced", func() bool { return strings.Contains(eB.logs.String(), "another writer changed the manifest") })
	_, _, man = journal(t, store, eA.rk, "m1")
	if d := man.Disk(disk0.Name); d == nil || d.Generation != genB || man.DurableSeq != 13 {
		t.Fatalf("manifest disk %+v durable_seq %d, want B's generation and A's 13", d, man.DurableSeq)
	}
}

// lostReplies, once armed, fails the next manifest writes with a
// transient error: the first one after writing it (its reply lost past
// every retry), the next ones without (an outage).
type lostReplies struct {
	blobstore.Store
	armed     atomic.Bool
	n         atomic.Int32 // manifest writes since armed
	fail      int32
	permanent bool // the lost reply's retry ends with a permanent error
}

func (s *lostReplies) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if !strings.HasSuffix(name, "manifest.json") || !s.armed.Load() {
		return s.Store.PutBlobIf(ctx, name, data, md, match)
	}
	switch n := s.n.Add(1); {
	case n == 1:
		if _, err := s.Store.PutBlobIf(ctx, name, data, md, match); err != nil {
			return "", err
		}
		if s.permanent {
			// Its retry then met a resolver that denies the host.
			return "", blobstore.Permanent(errors.New("reply lost, then the host did not resolve"))
		}
		return "", errors.New("reply lost")
	case n <= s.fail:
		return "", errors.New("storage account unreachable")
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// TestOwnLostManifestWriteNotFenced: an upload's manifest write that
// failed but happened, then others that failed for good, make the next
// one meet a changed manifest; it is this server's own, so the machine
// goes on being served.
func TestOwnLostManifestWriteNotFenced(t *testing.T) {
	for _, permanent := range []bool{false, true} {
		t.Run(fmt.Sprint("permanent=", permanent), func(t *testing.T) { ownLostManifestWrite(t, permanent) })
	}
}

func ownLostManifestWrite(t *testing.T, permanent bool) {
	store := &lostReplies{Store: mem.New(), fail: 3, permanent: permanent}
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	store.armed.Store(true)
	a.waitAck(a.batch(1, 5))
	// The lost write landed; the server retries until a write of its
	// own meets it.
	eventually(t, 30*time.Second, "the retries past the outage", func() bool {
		m := s.machine("m1")
		m.mu.Lock()
		defer m.mu.Unlock()
		return store.n.Load() > store.fail && m.savedDurable == 5
	})
	if strings.Contains(e.logs.String(), "another writer changed the manifest") || s.machine("m1").isFenced() {
		t.Fatal("the server fenced itself over its own write")
	}
	a.waitAck(a.batch(6, 2))
	eventually(t, 10*time.Second, "the next upload", func() bool { return durableSeq(t, store, "m1") == 7 })
}

// An empty list and none, as a manifest read back has it, are the same
// journal: a claim must not take the one for a change of the other.
func TestJournalOfEmptyLists(t *testing.T) {
	if journalOf(&layout.Manifest{DurableSeq: 5, Gaps: []layout.Gap{}, Disks: []layout.Disk{}}) != journalOf(&layout.Manifest{DurableSeq: 5}) {
		t.Fatal("empty gaps or disks differ from none")
	}
	if journalOf(&layout.Manifest{DurableSeq: 5}) == journalOf(&layout.Manifest{DurableSeq: 6}) {
		t.Fatal("durable_seq not in the journal")
	}
}

// A fenced process server that restarts while the other still serves the
// machine (its host rebooted, say) stays out of it: the fence is kept in
// its cache, and the segments it cached, a history the other superseded,
// are neither uploaded nor published over the other's manifest until the
// agent comes back to it.
func TestFencedServerRestartsDormant(t *testing.T) {
	store := mem.New()
	link := &slowLink{Store: store, manGate: make(chan struct{}), gates: map[string]chan struct{}{fmt.Sprintf("%020d-", 11): make(chan struct{})}}
	eA := newEnv(t, link, 1)
	eA.segAge = 20 * time.Millisecond
	eB := *eA
	eB.store, eB.cache, eB.logs, eB.name = store, []string{t.TempDir()}, &logBuf{}, "ps2"
	sA, a1, ack := eA.serveFirst()

	// The agent moves to B, which takes over with its next write.
	link.armed.Store(true) // A's manifest writes wait; its upload of 11.. never lands
	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 5})
	b1.waitAck(b1.batch(6, 5))
	eventually(t, 10*time.Second, "B's upload", func() bool { return durableSeq(t, store, "m1") == 10 })
	// A, cut off from the agent, still had 6..12 from it: 6..10 uploads
	// (the same records as B's), its manifest write fails: fenced.
	a1.waitAck(a1.batch(6, 5))
	a1.waitAck(a1.batch(11, 2))
	close(link.manGate)
	eventually(t, 10*time.Second, "A fenced", func() bool { return strings.Contains(eA.logs.String(), "another writer changed the manifest") })
	a1.conn.Close()
	sA.Close()
	ctx := context.Background()
	before, err := store.Stat(ctx, layout.ManifestName("m1"))
	if err != nil {
		t.Fatal(err)
	}

	link.armed.Store(false)
	eA.logs = &logBuf{}
	sA2 := eA.start()
	eventually(t, 10*time.Second, "A to say it waits for a hello", func() bool {
		return strings.Contains(eA.logs.String(), "nothing of it is uploaded from this cache")
	})
	time.Sleep(time.Second) // its uploader would have run by now
	if after, err := store.Stat(ctx, layout.ManifestName("m1")); err != nil || after.ETag != before.ETag {
		t.Fatalf("manifest written by the restarted fenced server (%v)", err)
	}
	b1.waitAck(b1.batch(11, 1)) // B goes on, unfenced
	b1.marker(11, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "B's upload of 11", func() bool { return durableSeq(t, store, "m1") == 11 })
	if strings.Contains(eB.logs.String(), "another writer changed the manifest") {
		t.Fatal("B fenced by the restarted server")
	}

	// The agent comes back to A: the machine is A's again, from the
	// journal B wrote. A's cached 6..12 continue the journal A knew (up to
	// 5), which B's superseded: dropped, not published. The agent had 12
	// acknowledged, which B's journal lacks: a gap, which its checksum
	// resync mends.
	b1.conn.Close()
	sB.Close()
	a2 := dialAgent(t, eA, sA2, "m1")
	ack2, _ := a2.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 12})
	if ack2.Disks[0].Action != wire.SyncChecksum || ack2.Disks[0].ResumeFrom != 13 {
		t.Fatalf("A answered %+v, want a checksum resync from 13", ack2.Disks[0])
	}
	a2.waitAck(a2.batch(13, 3))
	a2.marker(15, wire.MarkerTime, time.Now())
	waitMended(t, store, 15)
	if _, err := store.Stat(ctx, layout.SegmentName("m1", 11, 12)); err == nil {
		t.Error("A published its cached 11..12, which B's journal superseded")
	}
	img, err := recoverBlocks(t, store, eA.rk, "15", 16)
	if err != nil {
		t.Fatalf("recover 15: %v", err)
	}
	// 12 is what the resync brings back (this test's agent sends nothing).
	if want := batchBlocks(16, [2]uint64{1, 5}, [2]uint64{6, 10}, [2]uint64{11, 11}, [2]uint64{13, 15}); !bytes.Equal(img, want) {
		t.Fatal("recover 15 differs from the journal's records")
	}
}

// conflicting has another writer rewrite the manifest (the same bytes, a
// new ETag) just before each of the next n conditional manifest writes
// (n set with arm).
type conflicting struct {
	blobstore.Store
	n atomic.Int32
}

func (s *conflicting) arm(n int32) { s.n.Store(n) }

func (s *conflicting) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if strings.HasSuffix(name, "manifest.json") && match != "" && s.n.Add(-1) >= 0 {
		raw, err := s.Store.GetBlob(ctx, name)
		if err != nil {
			return "", err
		}
		if err := s.Store.PutBlob(ctx, name, raw, nil); err != nil {
			return "", err
		}
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// A process server taking a machine over at its agent's hello, while the
// one it takes it from still writes the manifest (draining its backlog,
// say), reads the manifest again and claims the machine instead of
// fencing itself; past maxClaims such writes, the hello fails and the
// agent's next one succeeds. The other server is fenced at its next
// write.
func TestTakeoverMeetsOtherWriter(t *testing.T) {
	for _, conflicts := range []int32{maxClaims - 1, maxClaims} {
		t.Run(fmt.Sprint(conflicts), func(t *testing.T) {
			store := mem.New()
			e1 := newEnv(t, store, 1)
			e1.segAge = 20 * time.Millisecond
			_, a, ack := e1.serveFirst()

			cs := &conflicting{Store: store}
			cs.arm(conflicts)
			e2 := *e1
			e2.store, e2.cache, e2.logs, e2.name = cs, []string{t.TempDir()}, &logBuf{}, "ps2"
			s2 := e2.start()
			back := wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 5}
			b := dialAgent(t, &e2, s2, "m1")
			if conflicts == maxClaims {
				if err := b.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{back}}); err != nil {
					t.Fatal(err)
				}
				var we wire.Error
				if f := b.next(30 * time.Second); f.typ != wire.TypeError || we.UnmarshalBinary(f.payload) != nil || we.Code != wire.CodeInternal {
					t.Fatalf("hello after %d conflicts: got %s %v, want an internal error", conflicts, f.typ, f.err)
				}
				b = dialAgent(t, &e2, s2, "m1") // the agent tries again
			}
			ackB, _ := b.hello("m1", back)
			if d := ackB.Disks[0]; d.Action != wire.SyncResume || d.ResumeFrom != 6 {
				t.Fatalf("PS2 answered %+v, want a resume from 6", d)
			}
			b.waitAck(b.batch(6, 5))
			eventually(t, 10*time.Second, "PS2's upload", func() bool { return durableSeq(t, store, "m1") == 10 })
			if strings.Contains(e2.logs.String(), "another writer changed the manifest") {
				t.Fatal("PS2 fenced itself")
			}

			// PS1, cut off from the agent, still holds its session.
			a.marker(5, wire.MarkerTime, time.Now())
			eventually(t, 10*time.Second, "PS1 fenced", func() bool {
				return strings.Contains(e1.logs.String(), "another writer changed the manifest")
			})
			img, err := recoverBlocks(t, store, e1.rk, "10", 11)
			if err != nil {
				t.Fatalf("recover 10: %v", err)
			}
			if want := batchBlocks(11, [2]uint64{1, 5}, [2]uint64{6, 10}); !bytes.Equal(img, want) {
				t.Fatal("recover 10 differs from the records the agent sent")
			}
		})
	}
}

// A server fenced by a write that changed nothing of the journal (another
// server's late record of its applier's progress, say) keeps its cache:
// when the agent says hello to it again, its cached segments, which
// continue the journal, are published, with no gap and no resync. So too
// after a restart in between: the fence record says what journal the
// cache continues.
func TestFencedServerKeepsCacheThatContinuesJournal(t *testing.T) {
	for _, restart := range []bool{false, true} {
		t.Run(fmt.Sprint("restart=", restart), func(t *testing.T) { keepsCache(t, restart) })
	}
}

func keepsCache(t *testing.T, restart bool) {
	cs := &conflicting{Store: mem.New()}
	e := newEnv(t, cs, 1)
	e.segAge = 20 * time.Millisecond
	s, a, ack := e.serveFirst()

	cs.arm(1)
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "fenced", func() bool { return strings.Contains(e.logs.String(), "another writer changed the manifest") })
	if got := durableSeq(t, cs, "m1"); got != 5 {
		t.Fatalf("durable_seq %d after the fenced write, want 5", got)
	}
	if restart {
		a.conn.Close()
		s.Close()
		s = e.start()
		if !s.machine("m1").isFenced() {
			t.Fatal("restarted unfenced")
		}
	}

	a2 := dialAgent(t, e, s, "m1")
	ack2, _ := a2.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 10})
	if d := ack2.Disks[0]; d.Action != wire.SyncResume || d.ResumeFrom != 11 {
		t.Fatalf("answered %+v, want a resume from 11", d)
	}
	eventually(t, 10*time.Second, "the cached 6..10 published", func() bool { return durableSeq(t, cs, "m1") == 10 })
	a2.waitAck(a2.batch(11, 2))
	eventually(t, 10*time.Second, "the upload of 11..12", func() bool { return durableSeq(t, cs, "m1") == 12 })
	img, err := recoverBlocks(t, cs, e.rk, "12", 13)
	if err != nil {
		t.Fatalf("recover 12: %v", err)
	}
	if want := batchBlocks(13, [2]uint64{1, 5}, [2]uint64{6, 10}, [2]uint64{11, 12}); !bytes.Equal(img, want) {
		t.Fatal("recover 12 differs from the records the agent sent")
	}
}

// A process server restarted with a cache of a machine another has
// claimed since (its host rebooted while the agent moved) uploads,
// applies and writes nothing of it: the manifest names the other, and
// what it cached may belong to a history the other's superseded. (Its
// cached 11..12, past the other's durable_seq, would have been published
// over the other's journal, and the other fenced.)
func TestRestartedServerLeavesClaimedMachine(t *testing.T) {
	h := newHandover(t, 6, 11)
	h.a1.waitAck(h.a1.batch(6, 5))
	h.a1.waitAck(h.a1.batch(11, 2))
	h.uploading() // PS1's uploads of 6..10 and 11..12 held: in its cache only
	h.a1.conn.Close()
	h.s1.Close() // its host goes down; the held uploads never land
	h.link.armed.Store(false)

	// The agent, which heard no ack past 5, moves to PS2 and resends.
	b := dialAgent(t, &h.ps2, h.ps2.start(), "m1")
	ack, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: h.gen, LastAckedSeq: 5})
	if ack.Disks[0].Action != wire.SyncResume || ack.Disks[0].ResumeFrom != 6 {
		t.Fatalf("PS2 answered %+v, want a resume from 6", ack.Disks[0])
	}
	b.waitAck(b.batch(6, 5))
	eventually(t, 10*time.Second, "PS2's upload of 6..10", func() bool { return durableSeq(t, h.store, "m1") == 10 })
	before, err := h.store.Stat(h.ctx, layout.ManifestName("m1"))
	if err != nil {
		t.Fatal(err)
	}

	h.ps1.logs = &logBuf{}
	h.ps1.start() // back, with 6..12 in its cache
	eventually(t, 10*time.Second, "PS1 to say another serves m1", func() bool {
		return strings.Contains(h.ps1.logs.String(), "the manifest names another process server as serving this machine")
	})
	time.Sleep(time.Second) // its uploader would have run by now
	if after, err := h.store.Stat(h.ctx, layout.ManifestName("m1")); err != nil || after.ETag != before.ETag {
		t.Fatalf("manifest written by the restarted server (%v)", err)
	}
	if _, err := h.store.Stat(h.ctx, layout.SegmentName("m1", 11, 12)); err == nil {
		t.Error("the restarted server uploaded its cached 11..12")
	}
	b.waitAck(b.batch(11, 1))
	eventually(t, 10*time.Second, "PS2's upload of 11", func() bool { return durableSeq(t, h.store, "m1") == 11 })
	if strings.Contains(h.ps2.logs.String(), "another writer changed the manifest") {
		t.Fatal("PS2 fenced by the restarted server")
	}
}

// manifestWrites records every manifest written.
type manifestWrites struct {
	blobstore.Store
	mu     sync.Mutex
	writes [][]byte
}

func (s *manifestWrites) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if strings.HasSuffix(name, "manifest.json") {
		s.mu.Lock()
		s.writes = append(s.writes, bytes.Clone(data))
		s.mu.Unlock()
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// A new machine's first manifest is sealed and names its owner: an
// unsealed one, next to a data key stored before a crash, would look
// stripped of its seal and stop the machine for good.
func TestNewMachineFirstManifestSealed(t *testing.T) {
	store := &manifestWrites{Store: mem.New()}
	e := newEnv(t, store, 1)
	a := dialAgent(t, e, e.start(), "m1")
	a.hello("m1", disk0)
	store.mu.Lock()
	defer store.mu.Unlock()
	if len(store.writes) == 0 {
		t.Fatal("no manifest written at the first hello")
	}
	man, err := layout.UnmarshalManifest(store.writes[0])
	if err != nil {
		t.Fatal(err)
	}
	if man.Seal == "" || man.KeyID == "" || man.Owner != "ps" {
		t.Fatalf("first manifest written: key %q, owner %q, sealed %v; want sealed, with its key and owner ps", man.KeyID, man.Owner, man.Seal != "")
	}
}

// restartingApplier records the Stop and Resume of its machines' loops.
type restartingApplier struct {
	fakeApplier
	restarts atomic.Int32 // Resume after Stop
	stopped  atomic.Bool
}

func (r *restartingApplier) Stop(string) { r.stopped.Store(true) }
func (r *restartingApplier) Resume(string) {
	if r.stopped.Swap(false) {
		r.restarts.Add(1)
	}
}

// A server that was not fenced, holding nothing outside the journal, finds
// at a hello that another writer changed the manifest since its last
// write (the agent served elsewhere meanwhile): its applier starts over
// from the account's state, which the other's applier may have moved.
func TestColdClaimRestartsApplier(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	ra := &restartingApplier{fakeApplier: fakeApplier{upTo: map[string]uint64{}}}
	e.applier = func(*Server) (Applier, error) { return ra, nil }
	s, a, ack := e.serveFirst()
	s.Applied("m1", 5)
	eventually(t, 10*time.Second, "nothing outside the journal", func() bool {
		m := s.machine("m1")
		m.mu.Lock()
		defer m.mu.Unlock()
		return len(m.segs) == 0 && m.savedApplied == 5
	})
	back := wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 5}
	a.conn.Close()

	// A reconnect with the manifest as this server wrote it: no restart.
	b := dialAgent(t, e, s, "m1")
	b.hello("m1", back)
	b.conn.Close()
	if n := ra.restarts.Load(); n != 0 {
		t.Fatalf("applier restarted %d times with the manifest unchanged", n)
	}
	// Another writer (same bytes, a new version), then a reconnect.
	ctx := context.Background()
	raw, err := store.GetBlob(ctx, layout.ManifestName("m1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := store.PutBlob(ctx, layout.ManifestName("m1"), raw, nil); err != nil {
		t.Fatal(err)
	}
	c := dialAgent(t, e, s, "m1")
	c.hello("m1", back)
	if n := ra.restarts.Load(); n != 1 {
		t.Fatalf("applier restarted %d times after another writer changed the manifest, want 1", n)
	}
	c.waitAck(c.batch(6, 2))
	eventually(t, 10*time.Second, "the upload of 6..7", func() bool { return durableSeq(t, store, "m1") == 7 })
}

// failingUploads fails the uploads of journal segments while armed.
type failingUploads struct {
	blobstore.Store
	armed atomic.Bool
}

func (s *failingUploads) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if s.armed.Load() && strings.Contains(name, "/journal/") {
		return "", errors.New("storage account unreachable")
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// An uploader waiting out its backoff after a failed upload parks as
// soon as the machine is fenced: the hello that claims the machine back
// waits for it, and must not wait out the backoff.
func TestFencedUploaderLeavesBackoff(t *testing.T) {
	old := uploadRetryMin
	uploadRetryMin = time.Hour
	t.Cleanup(func() { uploadRetryMin = old }) // after the server's Close
	mstore := mem.New()
	store := &failingUploads{Store: mstore}
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s, a, ack := e.serveFirst()

	store.armed.Store(true)
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "the failed upload", func() bool { return strings.Contains(e.logs.String(), "upload failed; will retry") })
	// Another writer, then this server's applier records its progress:
	// fenced, while the uploader waits an hour.
	ctx := context.Background()
	raw, err := mstore.GetBlob(ctx, layout.ManifestName("m1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := mstore.PutBlob(ctx, layout.ManifestName("m1"), raw, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.UpdateManifest(ctx, "m1", func(man *layout.Manifest) { man.AppliedSeq = 5 }); err == nil || !s.machine("m1").isFenced() {
		t.Fatalf("UpdateManifest over another writer's manifest: %v, fenced %v", err, s.machine("m1").isFenced())
	}
	store.armed.Store(false)
	a.conn.Close()

	b := dialAgent(t, e, s, "m1")
	ackB, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 10})
	if d := ackB.Disks[0]; d.Action != wire.SyncResume || d.ResumeFrom != 11 {
		t.Fatalf("answered %+v, want a resume from 11 (the cache continues the journal)", d)
	}
	eventually(t, 10*time.Second, "the cached 6..10 published", func() bool { return durableSeq(t, store, "m1") == 10 })
}

// vanishingRival creates the manifest just before this server's first,
// create-only, write of it (another server got there first), once.
type vanishingRival struct {
	manifestWrites
	done atomic.Bool
}

func (s *vanishingRival) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if strings.HasSuffix(name, "manifest.json") && match == "" && !s.done.Swap(true) {
		rival := layout.Manifest{Version: layout.ManifestVersion, Machine: "m1", JournalFrom: 1, Owner: "ps2"}
		raw, err := layout.MarshalManifest(&rival)
		if err != nil {
			return "", err
		}
		if err := s.Store.PutBlob(ctx, name, raw, nil); err != nil {
			return "", err
		}
	}
	return s.manifestWrites.PutBlobIf(ctx, name, data, md, match)
}

// A server fenced before it had a data key, whose rival's manifest is
// gone by the agent's next hello, takes the machine back without writing
// an unsealed manifest: next to the key it stored before it was fenced,
// one would look stripped of its seal, and a crash before the sealed
// write would stop the machine for good.
func TestFencedNewMachineClaimWritesSealed(t *testing.T) {
	store := &vanishingRival{manifestWrites: manifestWrites{Store: mem.New()}}
	e := newEnv(t, store, 1)
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{disk0}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the fence", func() bool { return strings.Contains(e.logs.String(), "another writer changed the manifest") })
	if err := store.Store.DeleteBlob(e.ctx, layout.ManifestName("m1")); err != nil {
		t.Fatal(err)
	}
	b := dialAgent(t, e, s, "m1")
	b.hello("m1", disk0)
	b.waitAck(b.batch(1, 5))
	eventually(t, 10*time.Second, "the upload of 1..5", func() bool { return durableSeq(t, e.store, "m1") == 5 })
	store.mu.Lock()
	defer store.mu.Unlock()
	for i, raw := range store.writes {
		man, err := layout.UnmarshalManifest(raw)
		if err != nil {
			t.Fatal(err)
		}
		if man.Seal == "" || man.KeyID == "" {
			t.Errorf("manifest write %d of %d unsealed (key %q, owner %q)", i+1, len(store.writes), man.KeyID, man.Owner)
		}
	}
}

// A claim whose fence record cannot be cleared fails, and the agent keeps
// what it has not had acknowledged: served with the record left "on", a
// restart took what the server acknowledged since for a superseded
// history and dropped it (a gap, and a resync).
func TestClaimClearsFenceRecord(t *testing.T) {
	up := &failingUploads{Store: mem.New()}
	cs := &conflicting{Store: up}
	e := newEnv(t, cs, 1)
	e.segAge = 20 * time.Millisecond
	ffs := &faultFS{}
	e.cacheFS = ffs
	s, a, ack := e.serveFirst()
	cs.arm(1)
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "fenced", func() bool { return strings.Contains(e.logs.String(), "another writer changed the manifest") })

	back := func(acked uint64) wire.DiskState {
		return wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: acked}
	}
	ffs.failFence.Store(true)
	a2 := dialAgent(t, e, s, "m1")
	if err := a2.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{back(10)}}); err != nil {
		t.Fatal(err)
	}
	if f := a2.next(30 * time.Second); f.typ != wire.TypeError {
		t.Fatalf("hello while the fence record cannot be cleared: got %s %v, want an error", f.typ, f.err)
	}
	if !s.machine("m1").isFenced() {
		t.Fatal("served with the fence record left on")
	}
	ffs.failFence.Store(false)

	a3 := dialAgent(t, e, s, "m1")
	if ack3, _ := a3.hello("m1", back(10)); ack3.Disks[0].Action != wire.SyncResume || ack3.Disks[0].ResumeFrom != 11 {
		t.Fatalf("answered %+v, want a resume from 11", ack3.Disks[0])
	}
	eventually(t, 10*time.Second, "the cached 6..10 published", func() bool { return durableSeq(t, cs, "m1") == 10 })
	up.armed.Store(true) // 11..15 stay in the cache only
	a3.waitAck(a3.batch(11, 5))
	a3.conn.Close()
	s.Close()
	up.armed.Store(false)
	s = e.start()

	a4 := dialAgent(t, e, s, "m1")
	if ack4, _ := a4.hello("m1", back(15)); ack4.Disks[0].Action != wire.SyncResume || ack4.Disks[0].ResumeFrom != 16 {
		t.Fatalf("after a restart, answered %+v, want a resume from 16 (the acknowledged 11..15 kept)", ack4.Disks[0])
	}
	eventually(t, 10*time.Second, "the cached 11..15 published", func() bool { return durableSeq(t, cs, "m1") == 15 })
	img, err := recoverBlocks(t, cs, e.rk, "15", 16)
	if err != nil {
		t.Fatalf("recover 15: %v", err)
	}
	if want := batchBlocks(16, [2]uint64{1, 5}, [2]uint64{6, 10}, [2]uint64{11, 15}); !bytes.Equal(img, want) {
		t.Fatal("recover 15 differs from the records the agent sent")
	}
}

// TestDeletedManifestRestored: a manifest (and data key) deleted from the
// account by someone else is written again from what the server holds,
// not retried against forever: the machine stays recoverable, and its
// journal opens with the key put back.
func TestDeletedManifestRestored(t *testing.T) {
	for _, withKey := range []bool{false, true} {
		t.Run(fmt.Sprint("key=", withKey), func(t *testing.T) {
			store := mem.New()
			e := newEnv(t, store, 1)
			e.segAge = 20 * time.Millisecond
			s, a, _ := e.serveFirst()
			ctx := context.Background()
			_, _, man := journal(t, store, e.rk, "m1")
			del := []string{layout.ManifestName("m1")}
			if withKey {
				del = append(del, layout.KeysPrefix("m1")+man.KeyID)
			}
			for _, name := range del {
				if err := store.DeleteBlob(ctx, name); err != nil {
					t.Fatal(err)
				}
			}
			a.waitAck(a.batch(6, 5))
			eventually(t, 10*time.Second, "the manifest written again with 6..10", func() bool {
				_, err := store.Stat(ctx, layout.ManifestName("m1"))
				return err == nil && durableSeq(t, store, "m1") == 10
			})
			if s.machine("m1").isFenced() {
				t.Fatal("the server fenced itself over a deleted manifest")
			}
			if !strings.Contains(e.logs.String(), "deleted from the account by someone else") {
				t.Fatalf("nothing logged of the deletion:\n%s", e.logs.String())
			}
			plain, _, got := journal(t, store, e.rk, "m1")
			if got.KeyID != man.KeyID || !bytes.Equal(plain, a.sent) {
				t.Fatalf("manifest key %s (want %s); journal equals what the agent sent: %v", got.KeyID, man.KeyID, bytes.Equal(plain, a.sent))
			}
		})
	}
}

// TestRolledBackManifestWrittenOver: an older, authentic copy of the
// manifest put back in the account (from a blob version, or by someone
// with write access and no key) is written over with the server's
// current state, whether the server's next write or the agent's next
// hello (a reconnect while the server had nothing to write) meets it
// first. Before, the server took it for another writer's, and the claim
// at the hello deleted the journal segments the old copy did not cover,
// authentic ones, sealing a manifest that made the loss look like a gap.
func TestRolledBackManifestWrittenOver(t *testing.T) {
	for _, first := range []string{"write", "hello"} {
		t.Run(first, func(t *testing.T) {
			ctx := context.Background()
			store := mem.New()
			e := newEnv(t, store, 1)
			e.segAge = 20 * time.Millisecond
			s, a, ack := e.serveFirst() // 1..5 in the journal
			old, err := store.GetBlob(ctx, layout.ManifestName("m1"))
			if err != nil {
				t.Fatal(err)
			}
			a.waitAck(a.batch(6, 5))
			eventually(t, 10*time.Second, "6..10 in the journal", func() bool { return durableSeq(t, store, "m1") == 10 })
			last := uint64(10)
			if first == "hello" {
				time.Sleep(200 * time.Millisecond)
				a.conn.Close()
				eventually(t, 10*time.Second, "the first session gone", func() bool { return s.known("m1").current() == nil })
			}
			if err := store.PutBlob(ctx, layout.ManifestName("m1"), old, nil); err != nil {
				t.Fatal(err)
			}
			if first == "write" {
				a.waitAck(a.batch(11, 5))
				last = 15
				eventually(t, 10*time.Second, "11..15 in the journal", func() bool { return durableSeq(t, store, "m1") == 15 })
				if s.machine("m1").isFenced() {
					t.Fatal("the server fenced itself over an older copy of its own manifest")
				}
				a.conn.Close()
			}
			// A hello (the agent reconnecting) finds the journal whole.
			a2 := dialAgent(t, e, s, "m1")
			a2.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: last})
			a2.marker(last, wire.MarkerTime, time.Now())
			s.Close()
			if !strings.Contains(e.logs.String(), "older copy") {
				t.Fatalf("nothing logged of the rollback:\n%s", e.logs.String())
			}
			plain, _, man := journal(t, store, e.rk, "m1")
			if man.DurableSeq != last || len(man.Gaps) != 0 || !bytes.Equal(plain, a.sent) {
				t.Fatalf("durable %d (want %d), gaps %v; the journal equals what the agent sent: %v", man.DurableSeq, last, man.Gaps, bytes.Equal(plain, a.sent))
			}
		})
	}
}

// TestKeyBlobRestored: the wrapped data key blob, written once and never
// again (the first blob an age-based lifecycle rule deletes), deleted or
// replaced by something the recovery key does not open while the server
// runs, is written back: losing the server then still leaves the
// machine recoverable.
func TestKeyBlobRestored(t *testing.T) {
	defer func(d time.Duration) { keyCheckEvery = d }(keyCheckEvery)
	keyCheckEvery = 0
	for _, how := range []string{"deleted", "replaced"} {
		t.Run(how, func(t *testing.T) {
			store := mem.New()
			e := newEnv(t, store, 1)
			e.segAge = 20 * time.Millisecond
			s, a, _ := e.serveFirst()
			ctx := context.Background()
			_, _, man := journal(t, store, e.rk, "m1")
			kname := layout.KeysPrefix("m1") + man.KeyID
			want, err := store.GetBlob(ctx, kname)
			if err != nil {
				t.Fatal(err)
			}
			if how == "deleted" {
				err = store.DeleteBlob(ctx, kname)
			} else {
				err = store.PutBlob(ctx, kname, bytes.Repeat([]byte{7}, len(want)), nil)
			}
			if err != nil {
				t.Fatal(err)
			}
			a.waitAck(a.batch(6, 5))
			eventually(t, 10*time.Second, "the data key blob written back", func() bool {
				got, err := store.GetBlob(ctx, kname)
				return err == nil && bytes.Equal(got, want) && durableSeq(t, store, "m1") == 10
			})
			if !strings.Contains(e.logs.String(), "data key") {
				t.Fatalf("nothing logged of the key blob:\n%s", e.logs.String())
			}
			s.Close()
			plain, _, got := journal(t, store, e.rk, "m1")
			if got.KeyID != man.KeyID || !bytes.Equal(plain, a.sent) {
				t.Fatalf("manifest key %s (want %s); journal equals what the agent sent: %v", got.KeyID, man.KeyID, bytes.Equal(plain, a.sent))
			}
		})
	}
}

// A manifest deleted with its journal (the machine's blobs removed) is
// not written back: it would name segments nobody can read.
func TestDeletedManifestAndJournalNotRestored(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	_, a, _ := e.serveFirst()
	ctx := context.Background()
	infos, err := store.ListBlobs(ctx, "m1/")
	if err != nil {
		t.Fatal(err)
	}
	for _, bi := range infos {
		if err := store.DeleteBlob(ctx, bi.Name); err != nil {
			t.Fatal(err)
		}
	}
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "the refusal logged", func() bool {
		return strings.Contains(e.logs.String(), "not writing it back")
	})
	if _, err := store.Stat(ctx, layout.ManifestName("m1")); !blobstore.IsNotFound(err) {
		t.Fatalf("manifest written back without its journal: %v", err)
	}
	// A replica left (retention may have pruned an idle machine's
	// journal up to durable_seq): written back.
	if err := store.CreatePageBlob(ctx, layout.DiskName("m1", disk0.Name), 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "the manifest written back beside the replica", func() bool {
		_, err := store.Stat(ctx, layout.ManifestName("m1"))
		return err == nil
	})
}
