package processserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
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
// stopped, hellos refused) and says why.
func TestManifestFencedAgainstAnotherServer(t *testing.T) {
	store := mem.New()
	eA := newEnv(t, store, 1)
	eA.segAge = 20 * time.Millisecond
	eB := *eA // same PKI, recovery key and account; its own cache and logs
	eB.cache, eB.logs = []string{t.TempDir()}, &logBuf{}
	sA := eA.start()

	a1 := dialAgent(t, eA, sA, "m1")
	ackA, _ := a1.hello("m1", disk0)
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "A's upload", func() bool { return durableSeq(t, store, "m1") == 5 })

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

	// A refuses the machine from now on.
	a2 := dialAgent(t, eA, sA, "m1")
	if err := a2.w.WriteHello(&wire.Hello{ProtocolVersion: 2, Machine: "m1", Disks: []wire.DiskState{disk0}}); err != nil {
		t.Fatal(err)
	}
	f := a2.next(10 * time.Second)
	var we wire.Error
	if f.typ != wire.TypeError || we.UnmarshalBinary(f.payload) != nil || we.Code != wire.CodeInternal ||
		!strings.Contains(we.Message, "no longer serves machine") {
		t.Fatalf("hello to the fenced server: got %s %v %q, want an internal Error saying it no longer serves the machine", f.typ, f.err, we.Message)
	}

	// B's session is unaffected and writes on.
	b1.waitAck(b1.batch(6, 5))
	eventually(t, 10*time.Second, "B's upload", func() bool { return durableSeq(t, store, "m1") == 10 })
}

// lostReplies fails the first manifest writes with a transient error:
// the first one after writing it (its reply lost past every retry), the
// next ones without (an outage).
type lostReplies struct {
	blobstore.Store
	n    atomic.Int32 // manifest writes so far
	fail int32
}

func (s *lostReplies) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if !strings.HasSuffix(name, "manifest.json") {
		return s.Store.PutBlobIf(ctx, name, data, md, match)
	}
	switch n := s.n.Add(1); {
	case n == 1:
		if _, err := s.Store.PutBlobIf(ctx, name, data, md, match); err != nil {
			return "", err
		}
		return "", errors.New("reply lost")
	case n <= s.fail:
		return "", errors.New("storage account unreachable")
	}
	return s.Store.PutBlobIf(ctx, name, data, md, match)
}

// TestOwnLostManifestWriteNotFenced: a manifest write that failed but
// happened, then others that failed for good, make the next one meet a
// changed manifest; it is this server's own, so the machine goes on
// being served.
func TestOwnLostManifestWriteNotFenced(t *testing.T) {
	store := &lostReplies{Store: mem.New(), fail: 3}
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	for {
		a := dialAgent(t, e, s, "m1")
		if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: 2, Machine: "m1", Disks: []wire.DiskState{disk0}}); err != nil {
			t.Fatal(err)
		}
		if f := a.next(30 * time.Second); f.typ == wire.TypeError {
			continue // the lost write failed the hello: the agent retries
		} else if f.err != nil || f.typ != wire.TypeHelloAck {
			t.Fatalf("hello: %s %v", f.typ, f.err)
		}
		a.waitAck(a.batch(1, 5))
		break
	}
	eventually(t, 10*time.Second, "the upload", func() bool { return durableSeq(t, store, "m1") == 5 })
	if strings.Contains(e.logs.String(), "another writer changed the manifest") {
		t.Fatal("the server fenced itself over its own write")
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
	eB.store, eB.cache, eB.logs = store, []string{t.TempDir()}, &logBuf{}
	sA := eA.start()
	a1 := dialAgent(t, eA, sA, "m1")
	ack, _ := a1.hello("m1", disk0)
	a1.waitAck(a1.batch(1, 5))
	eventually(t, 10*time.Second, "A's upload", func() bool { return durableSeq(t, store, "m1") == 5 })

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

	// The agent comes back to A: the machine is A's again, cache and all
	// (its 11..12 hold the agent's records, the same as B's 11).
	b1.conn.Close()
	sB.Close()
	a2 := dialAgent(t, eA, sA2, "m1")
	ack2, _ := a2.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 12})
	if ack2.Disks[0].Action != wire.SyncResume || ack2.Disks[0].ResumeFrom != 13 {
		t.Fatalf("A answered %+v, want a resume from 13", ack2.Disks[0])
	}
	a2.waitAck(a2.batch(13, 3))
	a2.marker(15, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "A's uploads after the agent came back", func() bool { return durableSeq(t, store, "m1") == 15 })
	img, err := recoverBlocks(t, store, eA.rk, "15", 16)
	if err != nil {
		t.Fatalf("recover 15: %v", err)
	}
	if want := batchBlocks(16, [2]uint64{1, 5}, [2]uint64{6, 10}, [2]uint64{11, 12}, [2]uint64{13, 15}); !bytes.Equal(img, want) {
		t.Fatal("recover 15 differs from the records the agent sent")
	}
}
