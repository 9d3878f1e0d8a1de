package azure_test

import (
	"context"
	"crypto/md5"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
)

// BenchmarkPutPage measures raw 4 MiB Put Page throughput (azure.Store
// without decorators, CRC64 checksum included) with 1 and 4 parallel clients,
// each its own Store (container) writing its own page blob, against Azurite with disk
// persistence (as ForTest runs it) and with --inMemoryPersistence.
func BenchmarkPutPage(b *testing.B) {
	for _, persist := range []string{"disk", "memory"} {
		b.Run(persist, func(b *testing.B) {
			var srv *azurite.Server
			if persist == "disk" {
				srv = azurite.ForTest(b)
			} else {
				var err error
				srv, err = azurite.Start(context.Background(), azurite.Options{InMemory: true, Location: b.TempDir()})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = srv.Stop() })
			}
			for _, clients := range []int{1, 4} {
				b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) { benchPutPage(b, srv, clients) })
			}
		})
	}
}

func benchPutPage(b *testing.B, srv *azurite.Server, clients int) {
	const chunk = blobstore.MaxPutPage
	const blobSize = 64 * chunk // offsets wrap: measures writes, not growth of Azurite's extents
	ctx := context.Background()
	stores := make([]*azure.Store, clients)
	for i := range stores {
		stores[i] = newStore(b, srv, azure.CopyAuto)
		if err := stores[i].EnsureContainer(ctx); err != nil {
			b.Fatal(err)
		}
		if err := stores[i].CreatePageBlob(ctx, fmt.Sprintf("bench%d", i), blobSize, nil); err != nil {
			b.Fatal(err)
		}
	}
	data := blobstoretest.Random(1, chunk)
	var next atomic.Int64
	b.SetBytes(chunk)
	b.ResetTimer()
	var wg sync.WaitGroup
	errs := make([]error, clients)
	for c := range clients {
		wg.Go(func() {
			for i := int(next.Add(1)); i <= b.N; i = int(next.Add(1)) {
				off := int64(i%64) * chunk
				if err := stores[c].WritePages(ctx, fmt.Sprintf("bench%d", c), off, data); err != nil {
					errs[c] = err
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMD5 is the client-side checksum cost of PutBlob (the blob's
// stored Content-MD5); BenchmarkCRC64 is Put Page's.
func BenchmarkMD5(b *testing.B) {
	data := blobstoretest.Random(1, blobstore.MaxPutPage)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		md5.Sum(data)
	}
}
