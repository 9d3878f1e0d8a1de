package processserver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"math"
	"testing"

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
		reply, err := CompareReplica(ctx, store, "m1", size, &s)
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
