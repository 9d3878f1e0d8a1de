package processserver

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
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
