package processserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
)

// A process server cut off from its agent but not from the account keeps
// uploading what it cached after the agent moved to another (README,
// "Journal segment uploads are not fenced"). Readers skip those segments
// (recovery.StaleFilter) instead of failing on them or replaying them.

// slowLink is PS1's view of the account: once armed, its manifest writes
// and the uploads of the segments starting at the gated sequences wait
// for release (a slow, backlogged link to the account).
type slowLink struct {
	blobstore.Store
	armed   atomic.Bool
	gates   map[string]chan struct{} // by segment first seq (20 digits)
	waiting atomic.Int32
	manGate chan struct{}
}

func (s *slowLink) hold(ctx context.Context, name string) error {
	if !s.armed.Load() {
		return nil
	}
	var gate chan struct{}
	if strings.HasSuffix(name, "manifest.json") {
		gate = s.manGate
	}
	for first, g := range s.gates {
		if strings.Contains(name, "/journal/"+first) {
			s.waiting.Add(1)
			gate = g
		}
	}
	if gate == nil {
		return nil
	}
	select {
	case <-gate:
		return nil
	case <-ctx.Done(): // the server stops: this upload never lands
		return ctx.Err()
	}
}

func (s *slowLink) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if err := s.hold(ctx, name); err != nil {
		return err
	}
	return s.Store.PutBlob(ctx, name, data, md)
}

func (s *slowLink) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if err := s.hold(ctx, name); err != nil {
		return "", err
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// handover is the rig of the stale-server tests: PS1 serves m1 through a
// slowLink (armed once 1..5 is in the journal, its uploads of the
// segments starting at gated held), and PS2, with a cache of its own and
// the same account, takes the agent over.
type handover struct {
	t     *testing.T
	ctx   context.Context
	store *mem.Store
	link  *slowLink
	ps1   *env
	s1    *Server // PS1
	ps2   env
	a1    *agent // the agent, on PS1
	gen   wire.Generation
}

func newHandover(t *testing.T, gated ...uint64) *handover {
	t.Helper()
	store := mem.New()
	link := &slowLink{Store: store, manGate: make(chan struct{}), gates: map[string]chan struct{}{}}
	for _, first := range gated {
		link.gates[fmt.Sprintf("%020d-", first)] = make(chan struct{})
	}
	h := &handover{t: t, ctx: context.Background(), store: store, link: link, ps1: newEnv(t, link, 1)}
	h.ps1.segAge = 20 * time.Millisecond
	h.ps2 = *h.ps1
	h.ps2.store, h.ps2.cache, h.ps2.logs, h.ps2.name = store, []string{t.TempDir()}, &logBuf{}, "ps2"
	var ack wire.HelloAck
	h.s1, h.a1, ack = h.ps1.serveFirst()
	h.gen = ack.Disks[0].Generation
	link.armed.Store(true)
	return h
}

// uploading waits until PS1's uploads of every gated segment are held.
func (h *handover) uploading() {
	h.t.Helper()
	eventually(h.t, 10*time.Second, "PS1 uploading the gated segments", func() bool { return int(h.link.waiting.Load()) == len(h.link.gates) })
}

// land lets PS1's upload of segment first..last go and waits for it.
func (h *handover) land(first, last uint64) {
	h.t.Helper()
	close(h.link.gates[fmt.Sprintf("%020d-", first)])
	eventually(h.t, 10*time.Second, fmt.Sprintf("PS1's upload of %d..%d", first, last), func() bool {
		_, err := h.store.GetBlob(h.ctx, layout.SegmentName("m1", first, last))
		return err == nil
	})
}

// moveAgent has the agent, acknowledged up to acked, say hello to PS2,
// which asks for a checksum resync.
func (h *handover) moveAgent(acked uint64) *agent {
	h.t.Helper()
	b := dialAgent(h.t, &h.ps2, h.ps2.start(), "m1")
	ack, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: h.gen, LastAckedSeq: acked})
	if ack.Disks[0].Action != wire.SyncChecksum {
		h.t.Fatalf("PS2 answered %v, want a checksum resync", ack.Disks[0].Action)
	}
	return b
}

// onPS2 has the agent, acknowledged up to 10 and moved to PS2 (b), send
// 11..25 there with time markers at 20 and 25, and waits for the journal
// to hold them with the gap mended.
func (h *handover) onPS2(b *agent) {
	h.t.Helper()
	b.waitAck(b.batch(11, 10))
	b.marker(20, wire.MarkerTime, time.Now())
	b.waitAck(b.batch(21, 5))
	b.marker(25, wire.MarkerTime, time.Now())
	h.mended(25)
}

// mended waits for the journal to reach durable with its one gap mended.
func (h *handover) mended(durable uint64) {
	h.t.Helper()
	waitMended(h.t, h.store, durable)
}

// fence lets PS1's manifest writes go: the first fails, and fences it.
func (h *handover) fence() {
	h.t.Helper()
	close(h.link.manGate)
	eventually(h.t, 10*time.Second, "PS1 fenced", func() bool {
		return strings.Contains(h.ps1.logs.String(), "another writer changed the manifest")
	})
}

// unchangedBy checks that PS1's late uploads (late), then its fencing,
// change neither what recover returns at seq (its first blocks, up to
// seq's) nor how far a fresh applier gets.
func (h *handover) unchangedBy(seq uint64, late func()) {
	h.t.Helper()
	point, n := fmt.Sprint(seq), int(seq)+1
	before, err := recoverBlocks(h.t, h.store, h.ps1.rk, point, n)
	if err != nil {
		h.t.Fatalf("before PS1's late uploads: recover %s: %v", point, err)
	}
	late()
	h.fence()
	after, err := recoverBlocks(h.t, h.store, h.ps1.rk, point, n)
	if err != nil {
		h.t.Errorf("recover %s after PS1's late uploads: %v", point, err)
	} else if !bytes.Equal(after, before) {
		h.t.Errorf("recover %s after PS1's late uploads differs from before them", point)
	}
	applyFresh(h.t, h.store, h.ps1.rk, seq)
}

func waitMended(t *testing.T, store blobstore.Store, durable uint64) {
	t.Helper()
	eventually(t, 10*time.Second, "the journal and the gap's mend", func() bool {
		man, err := recovery.ReadManifest(context.Background(), store, "m1")
		return err == nil && man.DurableSeq == durable && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
}

// recoverBlocks recovers disk0 of m1 at point and returns its first n
// blocks of 4 KiB (the records of these tests write there).
func recoverBlocks(t *testing.T, store blobstore.Store, rk []byte, point string, n int) ([]byte, error) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.img")
	if _, err := recovery.RecoverFile(context.Background(), store, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: point, RecoveryKey: rk}, out); err != nil {
		return nil, err
	}
	f, err := os.Open(out)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n*4096)
	_, err = io.ReadFull(f, b)
	return b, err
}

// applyFresh runs a fresh applier (a replica rebuilt, or one that had not
// passed the gap) over the journal: it must apply up to want.
func applyFresh(t *testing.T, store blobstore.Store, rk []byte, want uint64) {
	t.Helper()
	ap, err := applier.New(applier.Config{Store: store, Keys: applier.RecoveryKeys(store, rk), Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ap.Apply(context.Background(), "m1"); err != nil || got != want {
		t.Errorf("fresh applier: applied %d, %v; want %d", got, err, want)
	}
}

// TestStaleServerSegmentBreaksJournal: PS1, backlogged, has uploaded
// 6..10 (acked) but not yet written the manifest; 11..15 (cached, its ack
// lost) is still uploading. The agent moves to PS2: gap [6, 10], the
// orphan 6..10 deleted (dropForeignSegments). PS2 journals 11..20 with
// prev 5. Then PS1's upload of 11..15 (prev 10) lands; its manifest write
// fails and it fences itself, too late: recover and a fresh applier meet
// 11..15 before PS2's 11..20, and stopped at a "missing" segment ending
// at 10 before they skipped it.
func TestStaleServerSegmentBreaksJournal(t *testing.T) {
	h := newHandover(t, 6, 11)
	h.a1.waitAck(h.a1.batch(6, 5))
	h.a1.waitAck(h.a1.batch(11, 5)) // its ack never reaches the agent
	h.uploading()
	h.land(6, 10) // PS1's manifest write (durable 10) is slow

	b := h.moveAgent(10)
	if _, err := h.store.GetBlob(h.ctx, layout.SegmentName("m1", 6, 10)); !blobstore.IsNotFound(err) {
		t.Fatalf("6..10 not deleted by the hello: %v", err)
	}
	h.onPS2(b) // 11..15 resent, the same records
	h.unchangedBy(25, func() { h.land(11, 15) })
}

// TestStaleServerTailOfTwoSegments: PS1 has cached 11..15 and 16..20
// (acks lost) when the agent, restarted (its held records gone, its lease
// numbering from 100), goes to PS2: gap [6, 10]. PS1's late uploads
// 11..15 (prev 10) and 16..20 (prev 15) land. Readers skipped 11..15
// (prev in the gap) but not 16..20 (prev 15, outside the gap), and
// stopped at a "missing" segment: a segment chained to a skipped one is
// skipped too.
func TestStaleServerTailOfTwoSegments(t *testing.T) {
	h := newHandover(t, 6, 11, 16)
	h.a1.waitAck(h.a1.batch(6, 5))
	h.a1.waitAck(h.a1.batch(11, 5)) // acks lost on the way to the agent
	h.a1.waitAck(h.a1.batch(16, 5))
	h.uploading()
	h.land(6, 10)

	b := h.moveAgent(10)
	b.waitAck(b.batch(100, 10))
	b.marker(109, wire.MarkerTime, time.Now())
	b.waitAck(b.batch(110, 5))
	b.marker(114, wire.MarkerTime, time.Now())
	h.mended(114)
	h.unchangedBy(114, func() { h.land(11, 15); h.land(16, 20) })
}

// sendRecs sends one batch of records.
func sendRecs(a *agent, recs ...wire.Record) uint64 {
	a.t.Helper()
	var b wire.BatchBuilder
	for _, r := range recs {
		if err := b.Add(r); err != nil {
			a.t.Fatal(err)
		}
	}
	p, err := b.AppendBinary(nil)
	if err != nil {
		a.t.Fatal(err)
	}
	a.sendFrame(wire.TypeBatch, p)
	return recs[len(recs)-1].Seq
}

// TestStaleServerGapSegmentWrongBytes: inside the gap, record 6 wrote
// block X and record 9 put it back (zeros). PS1 uploaded 9..10 before the
// hello (deleted by dropForeignSegments) and 6..8 after it. PS2's replica
// never had 6..10, so the checksum resync finds X equal (zeros on both)
// and sends nothing for it. recover past the mend replayed 6..8 and
// returned X = 0xAA, without error, before it skipped them.
func TestStaleServerGapSegmentWrongBytes(t *testing.T) {
	h := newHandover(t, 6, 9)
	const X = 1000 * 4096
	v1 := bytes.Repeat([]byte{0xaa}, 4096)
	h.a1.waitAck(sendRecs(h.a1,
		wire.Record{Seq: 6, Op: wire.OpWrite, Offset: X, Length: 4096, Data: v1},
		wire.Record{Seq: 7, Op: wire.OpWrite, Offset: 7 * 4096, Length: 4096, Data: v1},
		wire.Record{Seq: 8, Op: wire.OpWrite, Offset: 8 * 4096, Length: 4096, Data: v1}))
	h.a1.waitAck(sendRecs(h.a1,
		wire.Record{Seq: 9, Op: wire.OpZero, Offset: X, Length: 4096},
		wire.Record{Seq: 10, Op: wire.OpWrite, Offset: 10 * 4096, Length: 4096, Data: v1}))
	h.uploading()
	h.land(9, 10) // before the hello; 6..8, the head, is slow

	b := h.moveAgent(10) // the resync finds X zeros on both sides
	h.onPS2(b)

	h.land(6, 8)
	h.fence()
	img, err := recoverBlocks(t, h.store, h.ps1.rk, "25", 1001)
	if err != nil {
		t.Fatalf("recover 25: %v", err)
	}
	if x := img[X : X+4096]; !bytes.Equal(x, make([]byte, 4096)) {
		t.Errorf("recover 25 past the mended gap: block X reads %#x, the disk holds zeros", x[0])
	}
}

// TestStaleServerSegmentUnderTakenName: PS1's late segment 11..20 has the
// very name of PS2's (the same first and last sequence). Uploaded blindly
// it replaced PS2's, and recovery past it stopped at a missing segment;
// PS1 now finds the name taken by other bytes, checks with a manifest
// write whether the machine is still its own, and is fenced instead.
func TestStaleServerSegmentUnderTakenName(t *testing.T) {
	h := newHandover(t, 6, 11)
	h.a1.waitAck(h.a1.batch(6, 5))
	h.a1.waitAck(h.a1.batch(11, 10)) // its ack lost on the way
	h.uploading()
	h.land(6, 10)

	b := h.moveAgent(10)
	h.onPS2(b)
	name := layout.SegmentName("m1", 11, 20)
	ps2, err := h.store.GetBlob(h.ctx, name)
	if err != nil {
		t.Fatalf("PS2's segment %s: %v", name, err)
	}

	close(h.link.gates[fmt.Sprintf("%020d-", 11)])
	h.fence()
	if got, err := h.store.GetBlob(h.ctx, name); err != nil || !bytes.Equal(got, ps2) {
		t.Fatalf("PS2's segment %s replaced by the server it took the machine from (%v)", name, err)
	}
	if _, err := recoverBlocks(t, h.store, h.ps1.rk, "25", 32); err != nil {
		t.Fatalf("recover 25 after PS1's late upload: %v", err)
	}
}

// takenName puts, before the first journal segment upload, what lies
// under its name already: other bytes (foreign), or the segment itself,
// its reply lost (own).
type takenName struct {
	blobstore.Store
	foreign bool
	done    atomic.Bool
}

func (s *takenName) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if !strings.Contains(name, "/journal/") || s.done.Swap(true) {
		return s.Store.PutBlobIf(ctx, name, data, md, match)
	}
	if s.foreign {
		if err := s.Store.PutBlob(ctx, name, []byte("another server's segment"), md); err != nil {
			return "", err
		}
		return s.Store.PutBlobIf(ctx, name, data, md, match)
	}
	if _, err := s.Store.PutBlobIf(ctx, name, data, md, match); err != nil {
		return "", err
	}
	return "", errors.New("reply lost")
}

// takenAgain: a segment name found taken by another server's upload,
// and, just as this server replaces it, the machine is taken over: the
// new owner writes the manifest and uploads its own segment there.
type takenAgain struct {
	blobstore.Store
	step  atomic.Int32
	their []byte // the new owner's segment
}

func (s *takenAgain) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if err := s.before(ctx, name, md); err != nil {
		return "", err
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

func (s *takenAgain) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if err := s.before(ctx, name, md); err != nil {
		return err
	}
	return s.Store.PutBlob(ctx, name, data, md)
}

// before plays the other servers before this one's upload of name.
func (s *takenAgain) before(ctx context.Context, name string, md blobstore.Metadata) error {
	if !strings.Contains(name, "/journal/") {
		return nil
	}
	switch s.step.Add(1) {
	case 1:
		return s.Store.PutBlob(ctx, name, []byte("another server's segment"), md)
	case 2:
		man, err := s.Store.GetBlob(ctx, layout.ManifestName("m1"))
		if err != nil {
			return err
		}
		if err := s.Store.PutBlob(ctx, layout.ManifestName("m1"), man, nil); err != nil {
			return err
		}
		return s.Store.PutBlob(ctx, name, s.their, md)
	}
	return nil
}

// A segment replaced only while the blob is as found: the new owner's
// upload, landed between this server's manifest write and its
// replacement, stays, and this server is fenced at its next manifest
// write.
func TestSegmentReplacedOnlyAsFound(t *testing.T) {
	store := &takenAgain{Store: mem.New(), their: []byte("the new owner's segment")}
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	a := dialAgent(t, e, e.start(), "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	eventually(t, 20*time.Second, "the fence", func() bool { return strings.Contains(e.logs.String(), "another writer changed the manifest") })
	infos, err := store.ListBlobs(e.ctx, layout.JournalPrefix("m1"))
	if err != nil || len(infos) != 1 {
		t.Fatalf("journal: %v, %v; want the one segment", infos, err)
	}
	got, err := store.GetBlob(e.ctx, infos[0].Name)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, store.their) {
		t.Fatalf("the new owner's segment %s was overwritten", infos[0].Name)
	}
}

// batchBlocks is disk0's first n blocks after records first..last, sent
// in batches of agent.batch starting at starts.
func batchBlocks(n int, starts ...[2]uint64) []byte {
	b := make([]byte, n*4096)
	for _, s := range starts {
		for seq := s[0]; seq <= s[1]; seq++ {
			copy(b[seq*4096:], batchData(seq, int(seq-s[0])))
		}
	}
	return b
}

// A segment name found taken is this server's own earlier upload (kept)
// or, while the manifest is still this server's, another's (replaced):
// either way the journal ends up holding the segment, byte for byte.
func TestSegmentNameTaken(t *testing.T) {
	for _, foreign := range []bool{false, true} {
		t.Run(map[bool]string{false: "own", true: "foreign"}[foreign], func(t *testing.T) {
			store := mem.New()
			e := newEnv(t, &takenName{Store: store, foreign: foreign}, 1)
			e.segAge = 20 * time.Millisecond
			a := dialAgent(t, e, e.start(), "m1")
			a.hello("m1", disk0)
			a.waitAck(a.batch(1, 5))
			a.marker(5, wire.MarkerTime, time.Now())
			eventually(t, 10*time.Second, "the upload of 1..5", func() bool { return durableSeq(t, store, "m1") == 5 })
			if strings.Contains(e.logs.String(), "another writer changed the manifest") {
				t.Fatal("fenced by its own manifest")
			}
			img, err := recoverBlocks(t, store, e.rk, "5", 6)
			if err != nil {
				t.Fatalf("recover 5: %v", err)
			}
			if !bytes.Equal(img, batchBlocks(6, [2]uint64{1, 5})) {
				t.Fatal("recovered blocks differ from the records sent")
			}
			if foreign != strings.Contains(e.logs.String(), "replacing a journal segment") {
				t.Errorf("foreign %v: the replacement warning was logged %v", foreign, !foreign)
			}
		})
	}
}

// TestResendInsideOpenGapNotTaken: segmentLost recorded gap [6, 10] for a
// cached segment whose ack never reached the agent (the server crashed
// after openGap, before the tombstone and the manifest's durable_seq), and
// the cache is gone at restart: durable is 5, and the agent (acked 5)
// resends 6..10. Taken, they made a segment with writes inside the gap,
// which readers skip as a stale server's (recovery.StaleFilter), and the
// journal past 5 was refused. The hello now resumes the agent past the
// gap (its checksum resync brings back what 6..10 changed).
func TestResendInsideOpenGapNotTaken(t *testing.T) {
	store := mem.New()
	eA := newEnv(t, store, 1)
	eA.segAge = 20 * time.Millisecond
	sA, a1, ackA := eA.serveFirst()
	// segmentLost's first step for a lost cached 6..10; then the crash.
	if err := sA.machine("m1").openGap(context.Background(), 6, 10); err != nil {
		t.Fatal(err)
	}
	a1.conn.Close()
	sA.Close()

	eB := *eA
	eB.cache = []string{t.TempDir()} // the cache did not survive
	b := dialAgent(t, &eB, eB.start(), "m1")
	ack, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ackA.Disks[0].Generation, LastAckedSeq: 5})
	if ack.Disks[0].Action != wire.SyncChecksum || ack.Disks[0].ResumeFrom != 11 {
		t.Fatalf("answered %v from %d, want a checksum resync from 11: past the open gap", ack.Disks[0].Action, ack.Disks[0].ResumeFrom)
	}
	b.batch(6, 10) // the unacknowledged 6..10 resent anyway, and 11..15
	b.waitAck(15)
	b.marker(15, wire.MarkerTime, time.Now())
	waitMended(t, store, 15)
	img, err := recoverBlocks(t, store, eA.rk, "15", 16)
	if err != nil {
		t.Fatalf("recover 15: %v", err)
	}
	// 6..10 were not taken: the resync, finding them on the disk and not
	// on the replica, would send them again.
	if want := batchBlocks(16, [2]uint64{1, 5}); !bytes.Equal(img[:11*4096], want[:11*4096]) {
		t.Error("recover 15: blocks 0..10 differ from 1..5 alone")
	}
	applyFresh(t, store, eA.rk, 15)
}

// TestIdleResyncPastAgentAheadGap: the agent acked 10, the server holds 5
// (cache lost, or another server took them): gap [6, 10], resume from 11.
// The idle agent's checksum questions are answered at once (they waited
// for durable_seq to reach 10, which only a new write could do), its
// time marker at 10 mends the gap, and the journal then holds that
// marker inside the gap, which readers keep (only writes there are a
// stale server's).
// agentAhead serves m1's records 1..5, then has a second agent connection
// say hello with 10 acknowledged: a gap 6..10 and a checksum resync.
func agentAhead(t *testing.T) (store *mem.Store, e *env, s *Server, b *agent, ack, ackB wire.HelloAck) {
	store = mem.New()
	e = newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s, a, ack := e.serveFirst()
	a.conn.Close()
	b = dialAgent(t, e, s, "m1")
	ackB, _ = b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 10})
	if ackB.Disks[0].Action != wire.SyncChecksum {
		t.Fatalf("answered %v, want checksum resync", ackB.Disks[0].Action)
	}
	return store, e, s, b, ack, ackB
}

func TestIdleResyncPastAgentAheadGap(t *testing.T) {
	store, e, s, b, ack, ackB := agentAhead(t)
	if ackB.LastRun != (wire.RunID{}) {
		t.Errorf("last run %x past durable_seq: the agent would take its own records for another's", ackB.LastRun)
	}
	q := wire.Sums{ID: 7, Disk: disk0.Name, Offset: 0, ChunkSize: 65536, Sums: [][sha256.Size]byte{{}}}
	p, err := q.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	b.sendFrame(wire.TypeSums, p)
	answered := false
	for deadline := time.Now().Add(5 * time.Second); !answered && time.Now().Before(deadline); {
		select {
		case f := <-b.frames:
			answered = f.typ == wire.TypeSumsReply
		case <-time.After(time.Until(deadline)):
		}
	}
	if !answered {
		t.Errorf("idle agent's checksum question not answered in 5s")
	}
	// The resync found nothing to send; its first time marker at 10.
	b.marker(10, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "the gap mended by the marker that ended the resync", func() bool {
		man, err := recovery.ReadManifest(context.Background(), store, "m1")
		return err == nil && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
	// The agent reconnects before its next write: what it had acknowledged
	// is settled by the mended gap, not lost again (a new gap, and a
	// checksum resync of every disk at every reconnect).
	b.conn.Close()
	b = dialAgent(t, e, s, "m1")
	if again, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 10}); again.Disks[0].Action != wire.SyncResume || again.Disks[0].ResumeFrom != 11 {
		t.Fatalf("reconnect after the mend answered %+v, want a resume from 11", again.Disks[0])
	}
	if man, err := recovery.ReadManifest(context.Background(), store, "m1"); err != nil || len(man.Gaps) != 1 || man.Gaps[0].Open() {
		t.Fatalf("gaps after the reconnect: %+v (%v), want the one mended", man.Gaps, err)
	}
	// Writes go on past it; the journal is read across the marker.
	b.waitAck(b.batch(11, 5))
	b.marker(15, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "the upload of 11..15", func() bool { return durableSeq(t, store, "m1") == 15 })
	img, err := recoverBlocks(t, store, e.rk, "15", 16)
	if err != nil {
		t.Fatalf("recover 15: %v", err)
	}
	if !bytes.Equal(img, batchBlocks(16, [2]uint64{1, 5}, [2]uint64{11, 15})) { // 6..10 lost: the resync found them unchanged
		t.Fatal("recovered blocks differ from the records the journal holds")
	}
	applyFresh(t, store, e.rk, 15)
}

// The time marker that ended a resync which found nothing to send sits
// inside the gap it mends: recoverable_until must not move to it, neither
// from the marker alone nor when the next writes join it in a segment
// (recover latest would resolve into the gap, and be refused).
func TestMarkerInMendedGapDatesNoSegment(t *testing.T) {
	store, _, _, b, _, _ := agentAhead(t)
	inGap := time.Now()
	b.marker(10, wire.MarkerTime, inGap)
	eventually(t, 10*time.Second, "the gap mended by the marker that ended the resync", func() bool {
		man, err := recovery.ReadManifest(context.Background(), store, "m1")
		return err == nil && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
	b.waitAck(b.batch(11, 5))
	eventually(t, 10*time.Second, "the upload of 11..15", func() bool { return durableSeq(t, store, "m1") == 15 })
	man, err := recovery.ReadManifest(context.Background(), store, "m1")
	if err != nil {
		t.Fatal(err)
	}
	if !man.RecoverableUntil.Before(inGap) {
		t.Errorf("recoverable_until %v moved to the marker inside the mended gap %+v (at %v)", man.RecoverableUntil, man.Gaps[0], inGap)
	}
}
