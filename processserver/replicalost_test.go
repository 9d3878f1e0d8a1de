package processserver

import (
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// TestReplicaLostFullSync: a new generation records where it starts (the
// agent's resume sequence). When the applier reports that it found the
// replica of the current generation gone after applying to it (and
// recreated it empty, marked lost), the session ends and the next hello
// gets a full sync, though the applier has not caught up; once the new
// generation replaces it, the lost blob asks for nothing more.
func TestReplicaLostFullSync(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	const size = 1 << 20
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", wire.DiskState{Name: "sda", Size: size})
	g1 := ack.Disks[0].Generation
	a.waitAck(a.batch(1, 5))
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, store, "m1") == 10 })
	if man, _ := s.Manifest("m1"); man.Disks[0].GenerationStart != 1 {
		t.Fatalf("first generation starts at %d, want 1", man.Disks[0].GenerationStart)
	}

	// The applier (applied up to 5, behind durable 10) found the blob gone.
	md := blobstore.Metadata{layout.MetaGeneration: g1.String(), layout.MetaAppliedSeq: "5", layout.MetaLost: "true"}
	if err := store.CreatePageBlob(t.Context(), layout.DiskName("m1", "sda"), size, md); err != nil {
		t.Fatal(err)
	}
	s.ReplicaLost("m1", "sda", g1.String())
	if f := a.next(10 * time.Second); f.err == nil {
		t.Fatalf("session still open after the replica was lost: got %s", f.typ)
	}

	b := dialAgent(t, e, s, "m1")
	ack, _ = b.hello("m1", wire.DiskState{Name: "sda", Size: size, Generation: g1, LastAckedSeq: 10})
	d := ack.Disks[0]
	if d.Action != wire.SyncFull || d.Generation == g1 || d.ResumeFrom != 11 {
		t.Fatalf("hello after the replica was lost: %s, generation %s, resume %d; want a full sync on a new generation from 11", d.Action, d.Generation, d.ResumeFrom)
	}
	man, _ := s.Manifest("m1")
	gd := man.Disks[0]
	if gd.Generation != d.Generation.String() || gd.GenerationStart != 11 || len(gd.Previous) != 1 ||
		gd.Previous[0] != (layout.Generation{Generation: g1.String(), Size: size, Start: 1}) {
		t.Fatalf("manifest disk %+v: want the new generation from 11 after %s from 1", gd, g1)
	}
	// Reported lost again (an applier reloading the disk): a session
	// already on its full sync, or one not protecting it, goes on.
	s.ReplicaLost("m1", "sda", g1.String())
	s.ReplicaLost("m1", "sdz", g1.String())
	b.waitAck(b.batch(11, 2))
	b.conn.Close()

	c := dialAgent(t, e, s, "m1")
	ack, _ = c.hello("m1", wire.DiskState{Name: "sda", Size: size, Generation: d.Generation, LastAckedSeq: 10})
	if ack.Disks[0].Action != wire.SyncResume {
		t.Fatalf("hello on the new generation: %s, want resume (the lost blob is the old generation's)", ack.Disks[0].Action)
	}
}
