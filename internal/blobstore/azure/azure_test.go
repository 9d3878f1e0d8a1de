package azure_test

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
)

var containerSeq atomic.Int64

// newStore returns a Store on a fresh container of srv, deleted on clean-up
// (matters for real accounts).
func newStore(t testing.TB, srv *azurite.Server, mode azure.CopyMode) *azure.Store {
	t.Helper()
	name := fmt.Sprintf("lbtest-%d-%d", time.Now().UnixNano()%1e9, containerSeq.Add(1))
	s, err := azure.New(azure.Config{ConnectionString: srv.ConnectionString(), Container: name, Copy: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = s.DeleteContainer(ctx)
	})
	return s
}

func TestConformance(t *testing.T) {
	srv := azurite.ForTest(t)
	blobstoretest.Run(t, func(t *testing.T) blobstore.Store { return newStore(t, srv, azure.CopyAuto) },
		blobstoretest.Options{LaxWriteBounds: srv.Emulated()})
}

// The conformance suite runs client-side copies on Azurite (see
// azure.CopyClient); exercise the server-side path here for what Azurite
// gets right: content, sparse ranges, metadata.
func TestServerSideCopy(t *testing.T) {
	srv := azurite.ForTest(t)
	s := newStore(t, srv, azure.CopyServer)
	ctx := context.Background()
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	data := blobstoretest.Random(1, 8192)
	if err := s.CreatePageBlob(ctx, "src", 8<<20, blobstore.Metadata{"disk": "0"}); err != nil {
		t.Fatal(err)
	}
	if err := s.WritePages(ctx, "src", 4<<20, data); err != nil {
		t.Fatal(err)
	}
	rp, err := s.Snapshot(ctx, "src", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.WritePages(ctx, "src", 4<<20, make([]byte, 8192)); err != nil {
		t.Fatal(err)
	}
	if err := s.CopyFromSnapshot(ctx, "src", rp.ID, "dst", nil); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if err := s.ReadPages(ctx, "dst", "", 4<<20, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("server-side copy: wrong content")
	}
	rs, err := s.GetPageRanges(ctx, "dst", "", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0] != (blobstore.PageRange{Offset: 4 << 20, Length: 8192}) {
		t.Fatalf("server-side copy: ranges %v", rs)
	}
	info, err := s.Stat(ctx, "dst")
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 8<<20 || info.Metadata["disk"] != "0" {
		t.Fatalf("server-side copy: %+v", info)
	}
	if blobstore.IsNotFound(s.CopyFromSnapshot(ctx, "src", "2001-01-01T00:00:00.0000000Z", "dst2", nil)) == false {
		t.Fatal("server-side copy of a missing snapshot is not NotFound")
	}
}
