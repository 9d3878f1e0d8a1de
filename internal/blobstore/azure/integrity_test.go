package azure_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
)

// corrupter flips one byte of request bodies (PUT) or response bodies (GET)
// after the SDK computed checksums: a network that damages data in transit.
type corrupter struct{ req, resp atomic.Bool }

func (c *corrupter) Do(req *policy.Request) (*http.Response, error) {
	raw := req.Raw()
	if c.req.Load() && raw.Method == http.MethodPut && req.Body() != nil {
		b, err := io.ReadAll(req.Body())
		if err != nil {
			return nil, err
		}
		if len(b) > 0 {
			b[len(b)/2] ^= 0x01
		}
		if err := req.SetBody(streaming.NopCloser(bytes.NewReader(b)), raw.Header.Get("Content-Type")); err != nil {
			return nil, err
		}
	}
	resp, err := req.Next()
	if err == nil && c.resp.Load() && raw.Method == http.MethodGet && resp.StatusCode/100 == 2 {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if len(b) > 0 {
			b[len(b)/2] ^= 0x01
		}
		resp.Body = io.NopCloser(bytes.NewReader(b))
	}
	return resp, err
}

func TestCorruptionInTransitIsDetected(t *testing.T) {
	srv := azurite.ForTest(t)
	c := &corrupter{}
	s, err := azure.New(azure.Config{
		ConnectionString: srv.ConnectionString(),
		Container:        fmt.Sprintf("lbcorrupt-%d", time.Now().UnixNano()%1e9),
		ClientOptions: &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
			Retry:            policy.RetryOptions{MaxRetries: -1},
			PerRetryPolicies: []policy.Policy{c},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { _ = s.DeleteContainer(ctx) })
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	good := blobstoretest.Random(1, 64<<10)
	if err := s.PutBlob(ctx, "seg", good, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.CreatePageBlob(ctx, "disk", 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.WritePages(ctx, "disk", 0, good); err != nil {
		t.Fatal(err)
	}

	c.req.Store(true)
	err = s.PutBlob(ctx, "seg", blobstoretest.Random(2, 64<<10), nil)
	if err == nil || blobstore.IsPermanent(err) {
		t.Fatalf("PutBlob with body corrupted in transit: err = %v, want a retryable error", err)
	}
	err = s.WritePages(ctx, "disk", 0, blobstoretest.Random(2, 64<<10))
	if err == nil || blobstore.IsPermanent(err) {
		t.Fatalf("WritePages with body corrupted in transit: err = %v, want a retryable error", err)
	}
	t.Logf("corrupted write error: %v", err)
	c.req.Store(false)

	got, err := s.GetBlob(ctx, "seg")
	if err != nil || !bytes.Equal(got, good) {
		t.Fatalf("block blob changed by a rejected upload (err %v)", err)
	}
	pg := make([]byte, len(good))
	if err := s.ReadPages(ctx, "disk", "", 0, pg); err != nil || !bytes.Equal(pg, good) {
		t.Fatalf("page blob changed by a rejected Put Page (err %v)", err)
	}

	c.resp.Store(true)
	if _, err := s.GetBlob(ctx, "seg"); !errors.Is(err, blobstore.ErrCorrupt) || blobstore.IsPermanent(err) {
		t.Fatalf("GetBlob with response corrupted in transit: err = %v, want retryable ErrCorrupt", err)
	}
}

func TestErrorsDoNotLeakKey(t *testing.T) {
	srv := azurite.ForTest(t)
	s := newStore(t, srv, azure.CopyAuto)
	_, err := s.GetBlob(context.Background(), "x") // container missing
	if !blobstore.IsNotFound(err) {
		t.Fatalf("err = %v, want not found", err)
	}
	if bytes.Contains([]byte(err.Error()), []byte(azurite.AccountKey)) {
		t.Fatal("error message contains the account key")
	}
	if _, err := azure.New(azure.Config{ConnectionString: "AccountName=a;AccountKey=c2VjcmV0;garbage", Container: "c"}); err == nil ||
		bytes.Contains([]byte(err.Error()), []byte("c2VjcmV0")) {
		t.Fatalf("bad connection string: err = %v (must fail and not echo the key)", err)
	}
}
