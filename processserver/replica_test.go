package processserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"math"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Chunks are compared where they lie on the disk: one whose offset passes
// 2^64 used to wrap to the start of the replica, and a sum of those bytes
// made the agent skip a chunk it had to send.
func TestCompareReplicaChunksBeyondTheDisk(t *testing.T) {
	ctx := context.Background()
	store := mem.New()
	const size = 1 << 20
	name := layout.DiskName("m1", "sda")
	if err := store.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := store.CreatePageBlob(ctx, name, size, nil); err != nil {
		t.Fatal(err)
	}
	head := bytes.Repeat([]byte{7}, 512)
	if err := store.WritePages(ctx, name, 0, head); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(head)
	for _, s := range []wire.Sums{
		{Disk: "sda", Offset: 0, ChunkSize: 512, Sums: [][sha256.Size]byte{sum}},                         // the real chunk: same
		{Disk: "sda", Offset: math.MaxUint64 - 511, ChunkSize: 512, Sums: [][sha256.Size]byte{sum, sum}}, // the second wraps to 0
		{Disk: "sda", Offset: size, ChunkSize: 512, Sums: [][sha256.Size]byte{sum}},                      // just past the end
	} {
		reply, err := CompareReplica(ctx, store, "m1", size, "", &s)
		if err != nil {
			t.Fatal(err)
		}
		if len(reply.Differs) != len(s.Sums) {
			t.Fatalf("sums at %d: %d answers for %d chunks", s.Offset, len(reply.Differs), len(s.Sums))
		}
		for i, d := range reply.Differs {
			if want := s.Offset != 0; d != want {
				t.Errorf("chunk %d of the sums at %d: differs = %v, want %v", i, s.Offset, d, want)
			}
		}
	}
}

// TestCompareBeforeGenerationSwitch: a checksum resync asked before any
// record of a disk's new generation is applied is answered against a
// replica that still holds the generation before, which the first
// record of the new one recreates empty: every chunk must differ, or the
// agent skips chunks that end as zeros.
func TestCompareBeforeGenerationSwitch(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e.applier = StandardApplier(ctx, Config{Store: store}, e.rk, time.Hour, -1, slog.New(slog.DiscardHandler))
	s, a, _ := e.serveFirst() // records 1..5 at 4 KiB × seq, generation G1
	a.conn.Close()

	// The agent forgets its generation (a new full sync, G2 from 6 on)
	// and stops before sending anything of it.
	b := dialAgent(t, e, s, "m1")
	ackB, _ := b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, LastAckedSeq: 5})
	if ackB.Disks[0].Action != wire.SyncFull {
		t.Fatalf("hello without a generation answered %v, want a full sync", ackB.Disks[0].Action)
	}
	b.conn.Close()

	// Back with G2, unclean: it compares the device with the replica.
	c := dialAgent(t, e, s, "m1")
	ackC, _ := c.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: ackB.Disks[0].Generation, LastAckedSeq: 5})
	if ackC.Disks[0].Action != wire.SyncResume {
		t.Fatalf("hello with the new generation answered %v, want a resume", ackC.Disks[0].Action)
	}
	// The device holds what G1's replica does.
	chunk := make([]byte, 64<<10)
	for seq := uint64(1); seq <= 5; seq++ {
		copy(chunk[seq*4096:], batchData(seq, int(seq-1)))
	}
	q := wire.Sums{ID: 9, Disk: disk0.Name, Offset: 0, ChunkSize: uint32(len(chunk)), Sums: [][sha256.Size]byte{sha256.Sum256(chunk)}}
	p, err := q.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	c.sendFrame(wire.TypeSums, p)
	for {
		f := c.next(10 * time.Second)
		if f.err != nil {
			t.Fatal(f.err)
		}
		if f.typ != wire.TypeSumsReply {
			continue
		}
		var r wire.SumsReply
		if err := r.UnmarshalBinary(f.payload); err != nil {
			t.Fatal(err)
		}
		if len(r.Differs) != 1 || !r.Differs[0] {
			t.Fatalf("chunk 0 compared with the previous generation's replica: differs %v, want true", r.Differs)
		}
		return
	}
}

// countReads counts ReadPages calls.
type countReads struct {
	blobstore.Store
	n int
}

func (c *countReads) ReadPages(ctx context.Context, name, snapshot string, offset int64, p []byte) error {
	c.n++
	return c.Store.ReadPages(ctx, name, snapshot, offset, p)
}

// TestCompareReplicaReadsRanges: a question of many chunks is answered
// chunk by chunk, as their bytes are, from a few large reads (one per
// chunk made a checksum resync a round trip per 64 KiB on Azure, slower
// than a full copy), the disk's short last chunk too.
func TestCompareReplicaReadsRanges(t *testing.T) {
	ctx := context.Background()
	store := &countReads{Store: mem.New()}
	const cs = 64 << 10
	const size = 100*cs + 3*512 // 101 chunks, the last one short
	name := layout.DiskName("m1", "sda")
	if err := store.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := store.CreatePageBlob(ctx, name, size, nil); err != nil {
		t.Fatal(err)
	}
	disk := make([]byte, size)
	for i := range disk {
		disk[i] = byte(i / 512 * 7)
	}
	if err := store.WritePages(ctx, name, 0, disk); err != nil {
		t.Fatal(err)
	}
	s := wire.Sums{Disk: "sda", Offset: 0, ChunkSize: cs}
	var want []bool
	for i := 0; i*cs < size; i++ {
		c := disk[i*cs : min((i+1)*cs, size)]
		if i%3 == 1 { // the agent holds other bytes there
			c = bytes.Repeat([]byte{1}, len(c))
		}
		s.Sums = append(s.Sums, sha256.Sum256(c))
		want = append(want, i%3 == 1)
	}
	s.Sums = append(s.Sums, sha256.Sum256(nil)) // past the disk's end
	want = append(want, true)
	reply, err := CompareReplica(ctx, store, "m1", size, "", &s)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if reply.Differs[i] != want[i] {
			t.Fatalf("chunk %d: differs %v, want %v", i, reply.Differs[i], want[i])
		}
	}
	if max := (size+compareRead-1)/compareRead + 1; store.n > max {
		t.Fatalf("%d reads for %d chunks, want at most %d", store.n, len(s.Sums), max)
	}
}
