package processserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
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

// slowLink is PS1's view of the account: once armed, its manifest writes
// and the upload of the segment starting at holdSeg wait for release
// (a slow, backlogged link to the account).
type slowLink struct {
	blobstore.Store
	armed   atomic.Bool
	gates   map[string]chan struct{} // by segment first seq (20 digits)
	waiting atomic.Int32
	manGate chan struct{}
}

func (s *slowLink) hold(name string) {
	if !s.armed.Load() {
		return
	}
	if strings.HasSuffix(name, "manifest.json") {
		<-s.manGate
	}
	for first, g := range s.gates {
		if strings.Contains(name, "/journal/"+first) {
			s.waiting.Add(1)
			<-g
		}
	}
}

func (s *slowLink) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	s.hold(name)
	return s.Store.PutBlob(ctx, name, data, md)
}

func (s *slowLink) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	s.hold(name)
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// A process server cut off from its agent but not from the account keeps
// uploading what it cached after the agent moved to another (README,
// "Journal segment uploads are not fenced"). Readers skip those segments
// (recovery.StaleFilter) instead of failing on them or replaying them.

// TestStaleServerSegmentBreaksJournal: PS1, backlogged, has uploaded
// 6..10 (acked) but not yet written the manifest; 11..15 (cached, its ack
// lost) is still uploading. The agent moves to PS2: gap [6, 10], the
// orphan 6..10 deleted (dropForeignSegments). PS2 journals 11..20 with
// prev 5. Then PS1's upload of 11..15 (prev 10) lands; its manifest write
// fails and it fences itself, too late: recover and a fresh applier meet
// 11..15 before PS2's 11..20, and stopped at a "missing" segment ending
// at 10 before they skipped it.
func TestStaleServerSegmentBreaksJournal(t *testing.T) {
	mstore := mem.New()
	gate6, gate11 := make(chan struct{}), make(chan struct{})
	link := &slowLink{Store: mstore, manGate: make(chan struct{}), gates: map[string]chan struct{}{
		"00000000000000000006-": gate6, "00000000000000000011-": gate11}}
	eA := newEnv(t, link, 1)
	eA.segAge = 20 * time.Millisecond
	eB := *eA
	eB.store = mstore
	eB.cache, eB.logs = []string{t.TempDir()}, &logBuf{}
	sA := eA.start()

	a1 := dialAgent(t, eA, sA, "m1")
	ackA, _ := a1.hello("m1", disk0)
	gen := ackA.Disks[0].Generation
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "PS1's upload of 1..5", func() bool { return durableSeq(t, mstore, "m1") == 5 })

	link.armed.Store(true)
	a1.waitAck(a1.batch(6, 5))
	a1.waitAck(a1.batch(11, 5)) // cached by PS1; pretend this ack never reached the agent
	ctx := context.Background()
	eventually(t, 10*time.Second, "PS1 uploading both", func() bool { return link.waiting.Load() == 2 })
	close(gate6) // 6..10 lands; PS1's manifest write (durable 10) is slow
	eventually(t, 10*time.Second, "PS1's upload of 6..10", func() bool {
		_, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 6, 10))
		return err == nil
	})

	// The agent moves to PS2, having heard acks up to 10.
	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	ackB, _ := b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: 10})
	if ackB.Disks[0].Action != wire.SyncChecksum {
		t.Fatalf("PS2 answered %v, want a checksum resync", ackB.Disks[0].Action)
	}
	if _, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 6, 10)); !blobstore.IsNotFound(err) {
		t.Fatalf("6..10 not deleted by the hello: %v", err)
	}
	// The agent resends 11..15 (same records) and goes on.
	b1.waitAck(b1.batch(11, 10))
	b1.marker(20, wire.MarkerTime, time.Now())
	b1.waitAck(b1.batch(21, 5))
	b1.marker(25, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "PS2's uploads and the mend", func() bool {
		man, err := recovery.ReadManifest(ctx, mstore, "m1")
		return err == nil && man.DurableSeq == 25 && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})

	// The first 32 blocks: every record of the test writes there.
	rec := func(point string) ([]byte, error) {
		out := filepath.Join(t.TempDir(), "out.img")
		if _, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: point, RecoveryKey: eA.rk}, out); err != nil {
			return nil, err
		}
		f, err := os.Open(out)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		b := make([]byte, 32*4096)
		_, err = io.ReadFull(f, b)
		return b, err
	}
	before, err := rec("25")
	if err != nil {
		t.Fatalf("before PS1's late upload: recover 25: %v", err)
	}

	// PS1's late upload lands; its manifest write then fails: fenced.
	close(gate11)
	eventually(t, 10*time.Second, "PS1's upload of 11..15", func() bool {
		_, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 11, 15))
		return err == nil
	})
	close(link.manGate)
	eventually(t, 10*time.Second, "PS1 fenced", func() bool {
		return strings.Contains(eA.logs.String(), "another writer changed the manifest")
	})

	after, err := rec("25")
	if err != nil {
		t.Errorf("recover 25 after a stale server's late upload: %v", err)
	} else if !bytes.Equal(after, before) {
		t.Error("recover 25 after a stale server's late upload differs from before it")
	}
	// A fresh applier (a replica rebuilt, or PS2's if it had not passed 5).
	ap, err := applier.New(applier.Config{Store: mstore, Keys: applier.RecoveryKeys(mstore, eA.rk), Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ap.Apply(ctx, "m1"); err != nil || got != 25 {
		t.Errorf("fresh applier after a stale server's late upload: applied %d, %v; want 25", got, err)
	}
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
// and sends nothing for it. recover past the mend replays 6..8 and
// returns X = 0xAA, without error.
func TestStaleServerGapSegmentWrongBytes(t *testing.T) {
	mstore := mem.New()
	gate6, gate9 := make(chan struct{}), make(chan struct{})
	link := &slowLink{Store: mstore, manGate: make(chan struct{}), gates: map[string]chan struct{}{
		"00000000000000000006-": gate6, "00000000000000000009-": gate9}}
	eA := newEnv(t, link, 1)
	eA.segAge = 20 * time.Millisecond
	eB := *eA
	eB.store = mstore
	eB.cache, eB.logs = []string{t.TempDir()}, &logBuf{}
	sA := eA.start()
	ctx := context.Background()

	a1 := dialAgent(t, eA, sA, "m1")
	ackA, _ := a1.hello("m1", disk0)
	gen := ackA.Disks[0].Generation
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "PS1's upload of 1..5", func() bool { return durableSeq(t, mstore, "m1") == 5 })

	const X = 1000 * 4096
	v1 := strings.Repeat("\xaa", 4096)
	link.armed.Store(true)
	a1.waitAck(sendRecs(a1,
		wire.Record{Seq: 6, Op: wire.OpWrite, Offset: X, Length: 4096, Data: []byte(v1)},
		wire.Record{Seq: 7, Op: wire.OpWrite, Offset: 7 * 4096, Length: 4096, Data: []byte(v1)},
		wire.Record{Seq: 8, Op: wire.OpWrite, Offset: 8 * 4096, Length: 4096, Data: []byte(v1)}))
	a1.waitAck(sendRecs(a1,
		wire.Record{Seq: 9, Op: wire.OpZero, Offset: X, Length: 4096},
		wire.Record{Seq: 10, Op: wire.OpWrite, Offset: 10 * 4096, Length: 4096, Data: []byte(v1)}))
	eventually(t, 10*time.Second, "PS1 uploading both", func() bool { return link.waiting.Load() == 2 })
	close(gate9) // lands before the hello; 6..8, the head, is slow
	eventually(t, 10*time.Second, "PS1's upload of 9..10", func() bool {
		_, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 9, 10))
		return err == nil
	})

	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	ackB, _ := b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: 10})
	if ackB.Disks[0].Action != wire.SyncChecksum {
		t.Fatalf("PS2 answered %v, want a checksum resync", ackB.Disks[0].Action)
	}
	// The resync: X reads zeros on the agent and on PS2's replica (which
	// never had 6..10): nothing is sent for it.
	b1.waitAck(b1.batch(11, 10))
	b1.marker(20, wire.MarkerTime, time.Now())
	b1.waitAck(b1.batch(21, 5))
	b1.marker(25, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "PS2's uploads and the mend", func() bool {
		man, err := recovery.ReadManifest(ctx, mstore, "m1")
		return err == nil && man.DurableSeq == 25 && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})

	close(gate6)
	eventually(t, 10*time.Second, "PS1's upload of 6..8", func() bool {
		_, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 6, 8))
		return err == nil
	})
	close(link.manGate)
	eventually(t, 10*time.Second, "PS1 fenced", func() bool {
		return strings.Contains(eA.logs.String(), "another writer changed the manifest")
	})
	out := filepath.Join(t.TempDir(), "out.img")
	res, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "25", RecoveryKey: eA.rk}, out)
	if err != nil {
		t.Fatalf("recover 25: %v", err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, X); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 0 {
		t.Errorf("recover 25 (seq %d, %d segments, mended gap): block X reads %#x, the disk holds zeros", res.Seq, res.Segments, buf[0])
	}
}

// TestStaleServerSegmentUnderTakenName: PS1's late segment 11..20 has the
// very name of PS2's (the same first and last sequence). Uploaded blindly
// it replaced PS2's, and recovery past it stopped at a missing segment;
// PS1 now finds the name taken by other bytes, checks with a manifest
// write whether the machine is still its own, and is fenced instead.
func TestStaleServerSegmentUnderTakenName(t *testing.T) {
	mstore := mem.New()
	gate6, gate11 := make(chan struct{}), make(chan struct{})
	link := &slowLink{Store: mstore, manGate: make(chan struct{}), gates: map[string]chan struct{}{
		"00000000000000000006-": gate6, "00000000000000000011-": gate11}}
	eA := newEnv(t, link, 1)
	eA.segAge = 20 * time.Millisecond
	eB := *eA
	eB.store = mstore
	eB.cache, eB.logs = []string{t.TempDir()}, &logBuf{}
	sA := eA.start()
	ctx := context.Background()

	a1 := dialAgent(t, eA, sA, "m1")
	ackA, _ := a1.hello("m1", disk0)
	gen := ackA.Disks[0].Generation
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "PS1's upload of 1..5", func() bool { return durableSeq(t, mstore, "m1") == 5 })
	link.armed.Store(true)
	a1.waitAck(a1.batch(6, 5))
	a1.waitAck(a1.batch(11, 10)) // its ack lost on the way
	eventually(t, 10*time.Second, "PS1 uploading both", func() bool { return link.waiting.Load() == 2 })
	close(gate6)
	name := layout.SegmentName("m1", 11, 20)
	eventually(t, 10*time.Second, "PS1's upload of 6..10", func() bool {
		_, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 6, 10))
		return err == nil
	})

	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: 10})
	b1.waitAck(b1.batch(11, 10))
	b1.marker(20, wire.MarkerTime, time.Now())
	b1.waitAck(b1.batch(21, 5))
	b1.marker(25, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "PS2's uploads and the mend", func() bool {
		man, err := recovery.ReadManifest(ctx, mstore, "m1")
		return err == nil && man.DurableSeq == 25 && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
	ps2, err := mstore.GetBlob(ctx, name)
	if err != nil {
		t.Fatalf("PS2's segment %s: %v", name, err)
	}
	out := filepath.Join(t.TempDir(), "before.img")
	if _, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "25", RecoveryKey: eA.rk}, out); err != nil {
		t.Fatalf("recover 25: %v", err)
	}

	close(gate11)
	close(link.manGate)
	eventually(t, 10*time.Second, "PS1 fenced", func() bool {
		return strings.Contains(eA.logs.String(), "another writer changed the manifest")
	})
	if got, err := mstore.GetBlob(ctx, name); err != nil || !bytes.Equal(got, ps2) {
		t.Fatalf("PS2's segment %s replaced by the server it took the machine from (%v)", name, err)
	}
	if _, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "25", RecoveryKey: eA.rk}, filepath.Join(t.TempDir(), "after.img")); err != nil {
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

// A segment name found taken is this server's own earlier upload (kept)
// or, while the manifest is still this server's, another's (replaced):
// either way the journal ends up holding the segment, byte for byte.
func TestSegmentNameTaken(t *testing.T) {
	for _, foreign := range []bool{false, true} {
		t.Run(map[bool]string{false: "own", true: "foreign"}[foreign], func(t *testing.T) {
			mstore := mem.New()
			e := newEnv(t, &takenName{Store: mstore, foreign: foreign}, 1)
			e.segAge = 20 * time.Millisecond
			s := e.start()
			a := dialAgent(t, e, s, "m1")
			a.hello("m1", disk0)
			a.waitAck(a.batch(1, 5))
			a.marker(5, wire.MarkerTime, time.Now())
			eventually(t, 10*time.Second, "the upload of 1..5", func() bool { return durableSeq(t, mstore, "m1") == 5 })
			if strings.Contains(e.logs.String(), "another writer changed the manifest") {
				t.Fatal("fenced by its own manifest")
			}
			ctx := context.Background()
			out := filepath.Join(t.TempDir(), "out.img")
			if _, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "5", RecoveryKey: e.rk}, out); err != nil {
				t.Fatalf("recover 5: %v", err)
			}
			f, err := os.Open(out)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got := make([]byte, 6*4096)
			if _, err := io.ReadFull(f, got); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, 6*4096)
			for seq := 1; seq <= 5; seq++ { // as agent.batch writes them
				copy(want[seq*4096:], bytes.Repeat([]byte{byte(seq), 0, 0x5a, byte(seq - 1)}, 1024))
			}
			if !bytes.Equal(got, want) {
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
// after openGap, before the tombstone / the manifest's durable_seq), and
// the cache is gone at restart: durable is 5, the agent (acked 5) resends
// 6..10 legitimately. The new server's segment 6..15 has records inside
// the gap: recovery.Stale skips it and the journal past 5 is refused.
func TestResendInsideOpenGapNotTaken(t *testing.T) {
	mstore := mem.New()
	eA := newEnv(t, mstore, 1)
	eA.segAge = 20 * time.Millisecond
	sA := eA.start()
	ctx := context.Background()
	a1 := dialAgent(t, eA, sA, "m1")
	ackA, _ := a1.hello("m1", disk0)
	gen := ackA.Disks[0].Generation
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "upload of 1..5", func() bool { return durableSeq(t, mstore, "m1") == 5 })
	// segmentLost's first step for a lost cached 6..10; then the crash.
	if err := sA.machine("m1").openGap(ctx, 6, 10); err != nil {
		t.Fatal(err)
	}
	a1.conn.Close()
	sA.Close()

	eB := *eA
	eB.cache = []string{t.TempDir()} // the cache did not survive
	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	ackB, _ := b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: 5})
	if ackB.Disks[0].Action != wire.SyncChecksum {
		t.Fatalf("answered %v, want a checksum resync", ackB.Disks[0].Action)
	}
	if got := ackB.Disks[0].ResumeFrom; got != 11 {
		t.Fatalf("resume from %d, want 11: past the open gap", got)
	}
	b1.batch(6, 10) // the unacknowledged 6..10 resent anyway, and 11..15
	b1.waitAck(15)
	b1.marker(15, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "uploads and the mend", func() bool {
		man, err := recovery.ReadManifest(ctx, mstore, "m1")
		return err == nil && man.DurableSeq == 15 && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
	if _, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "15", RecoveryKey: eA.rk}, filepath.Join(t.TempDir(), "out.img")); err != nil {
		t.Errorf("recover 15: %v", err)
	}
	ap, err := applier.New(applier.Config{Store: mstore, Keys: applier.RecoveryKeys(mstore, eA.rk), Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ap.Apply(ctx, "m1"); err != nil || got != 15 {
		t.Errorf("fresh applier: applied %d, %v; want 15", got, err)
	}
}

// TestStaleServerTailOfTwoSegments: PS1 has cached 11..15 and 16..20
// (acks lost) when the agent, restarted (its held records gone, its lease
// numbering from 100), goes to PS2: gap [6, 10]. PS1's late uploads
// 11..15 (prev 10) and 16..20 (prev 15) land. recovery.Stale skips
// 11..15 (prev in the gap) but not 16..20 (prev 15 is outside the gap):
// recover and a fresh applier then stop at a "missing" segment.
func TestStaleServerTailOfTwoSegments(t *testing.T) {
	mstore := mem.New()
	gate6, gate11, gate16 := make(chan struct{}), make(chan struct{}), make(chan struct{})
	link := &slowLink{Store: mstore, manGate: make(chan struct{}), gates: map[string]chan struct{}{
		"00000000000000000006-": gate6, "00000000000000000011-": gate11, "00000000000000000016-": gate16}}
	eA := newEnv(t, link, 1)
	eA.segAge = 20 * time.Millisecond
	eB := *eA
	eB.store = mstore
	eB.cache, eB.logs = []string{t.TempDir()}, &logBuf{}
	sA := eA.start()

	a1 := dialAgent(t, eA, sA, "m1")
	ackA, _ := a1.hello("m1", disk0)
	gen := ackA.Disks[0].Generation
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "PS1's upload of 1..5", func() bool { return durableSeq(t, mstore, "m1") == 5 })

	link.armed.Store(true)
	a1.waitAck(a1.batch(6, 5))
	a1.waitAck(a1.batch(11, 5)) // acks lost on the way to the agent
	a1.waitAck(a1.batch(16, 5))
	ctx := context.Background()
	eventually(t, 10*time.Second, "PS1 uploading all three", func() bool { return link.waiting.Load() == 3 })
	close(gate6)
	eventually(t, 10*time.Second, "PS1's upload of 6..10", func() bool {
		_, err := mstore.GetBlob(ctx, layout.SegmentName("m1", 6, 10))
		return err == nil
	})

	// The agent, restarted, goes to PS2: acked 10, numbering from its lease.
	sB := eB.start()
	b1 := dialAgent(t, &eB, sB, "m1")
	ackB, _ := b1.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: 10})
	if ackB.Disks[0].Action != wire.SyncChecksum {
		t.Fatalf("PS2 answered %v, want a checksum resync", ackB.Disks[0].Action)
	}
	b1.waitAck(b1.batch(100, 10))
	b1.marker(109, wire.MarkerTime, time.Now())
	b1.waitAck(b1.batch(110, 5))
	b1.marker(114, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "PS2's uploads and the mend", func() bool {
		man, err := recovery.ReadManifest(ctx, mstore, "m1")
		return err == nil && man.DurableSeq == 114 && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
	rec := func() error {
		_, err := recovery.RecoverFile(ctx, mstore, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "114", RecoveryKey: eA.rk}, filepath.Join(t.TempDir(), "out.img"))
		return err
	}
	if err := rec(); err != nil {
		t.Fatalf("before PS1's late uploads: recover 114: %v", err)
	}

	close(gate11)
	close(gate16)
	eventually(t, 10*time.Second, "PS1's uploads of 11..15 and 16..20", func() bool {
		_, err1 := mstore.GetBlob(ctx, layout.SegmentName("m1", 11, 15))
		_, err2 := mstore.GetBlob(ctx, layout.SegmentName("m1", 16, 20))
		return err1 == nil && err2 == nil
	})
	close(link.manGate)
	eventually(t, 10*time.Second, "PS1 fenced", func() bool {
		return strings.Contains(eA.logs.String(), "another writer changed the manifest")
	})
	if err := rec(); err != nil {
		t.Errorf("recover 114 after PS1's late uploads of two segments: %v", err)
	}
	ap, err := applier.New(applier.Config{Store: mstore, Keys: applier.RecoveryKeys(mstore, eA.rk), Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ap.Apply(ctx, "m1"); err != nil || got != 114 {
		t.Errorf("fresh applier after PS1's late uploads: applied %d, %v; want 114", got, err)
	}
}

// TestIdleResyncPastAgentAheadGap: the agent acked 10, the server
// holds 5 (cache lost / another server): gap [6, 10], ResumeFrom 11. An
// idle agent's checksum question is then answered only once the manifest's
// durable_seq reaches 10 (waitUploaded(st.accepted)), which needs a new
// write; and its time marker at 10 mends the gap only once uploaded ≥ 10.
func TestIdleResyncPastAgentAheadGap(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0)
	gen := ack.Disks[0].Generation
	a.waitAck(a.batch(1, 5))
	eventually(t, 10*time.Second, "upload of 1..5", func() bool { return durableSeq(t, store, "m1") == 5 })
	a.conn.Close()

	b := dialAgent(t, e, s, "m1")
	ackB, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen, LastAckedSeq: 10})
	if ackB.Disks[0].Action != wire.SyncChecksum {
		t.Fatalf("answered %v, want checksum resync", ackB.Disks[0].Action)
	}
	if ackB.LastRun != (wire.RunID{}) {
		t.Errorf("last run %x past durable_seq: the agent would take its own records for another's", ackB.LastRun)
	}
	q := wire.Sums{ID: 7, Disk: disk0.Name, Offset: 0, ChunkSize: 65536, Sums: [][sha256.Size]byte{{}}}
	p, err := q.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	b.sendFrame(wire.TypeSums, p)
	got := false
	deadline := time.Now().Add(5 * time.Second)
	for !got && time.Now().Before(deadline) {
		select {
		case f := <-b.frames:
			if f.typ == wire.TypeSumsReply {
				got = true
			}
		case <-time.After(time.Until(deadline)):
		}
	}
	if !got {
		t.Errorf("idle agent's checksum question not answered in 5s (session accepted floor past durable_seq)")
	}
	// The resync found nothing to send; its first time marker at 10.
	b.marker(10, wire.MarkerTime, time.Now())
	ctx := context.Background()
	eventually(t, 10*time.Second, "the gap mended by the marker that ended the (empty) resync", func() bool {
		man, err := recovery.ReadManifest(ctx, store, "m1")
		return err == nil && len(man.Gaps) == 1 && !man.Gaps[0].Open()
	})
	// Writes go on past it; the journal is read across the marker.
	b.waitAck(b.batch(11, 5))
	b.marker(15, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "the upload of 11..15", func() bool { return durableSeq(t, store, "m1") == 15 })
	out := filepath.Join(t.TempDir(), "out.img")
	if _, err := recovery.RecoverFile(ctx, store, recovery.Request{Machine: "m1", Disk: disk0.Name, Point: "15", RecoveryKey: e.rk}, out); err != nil {
		t.Fatalf("recover 15: %v", err)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img := make([]byte, 16*4096)
	if _, err := io.ReadFull(f, img); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16*4096) // 6..10 lost: the resync found them unchanged
	for seq := 1; seq <= 15; seq++ {
		if seq < 6 || seq > 10 {
			first := map[bool]int{true: 1, false: 11}[seq < 6]
			copy(want[seq*4096:], bytes.Repeat([]byte{byte(seq), 0, 0x5a, byte(seq - first)}, 1024))
		}
	}
	if !bytes.Equal(img, want) {
		t.Fatal("recovered blocks differ from the records the journal holds")
	}
	ap, err := applier.New(applier.Config{Store: store, Keys: applier.RecoveryKeys(store, e.rk), Retention: -1})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := ap.Apply(ctx, "m1"); err != nil || n != 15 {
		t.Errorf("fresh applier: applied %d, %v; want 15", n, err)
	}
}
