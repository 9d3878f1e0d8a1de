package azure_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
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

// Both checksums of PutBlob are verified by the service (Azurite checks
// them as Azure does); Put Page always sends CRC64.
func TestCorruptionInTransitIsDetected(t *testing.T) {
	srv := azurite.ForTest(t)
	for _, m := range []struct {
		name string
		mode azure.ChecksumMode
	}{{"auto", azure.ChecksumAuto}, {"md5", azure.ChecksumMD5}, {"crc64", azure.ChecksumCRC64}} {
		t.Run(m.name, func(t *testing.T) { corruptionInTransitIsDetected(t, srv, m.mode) })
	}
}

// storeThrough returns a store on a fresh container of srv whose requests
// pass through p, with the SDK's own retries off.
func storeThrough(t *testing.T, srv *azurite.Server, p policy.Policy, mode azure.ChecksumMode) *azure.Store {
	t.Helper()
	return storeThroughWith(t, srv, p, mode, policy.RetryOptions{MaxRetries: -1})
}

// storeThroughWith is storeThrough with the SDK's retry options ro.
func storeThroughWith(t *testing.T, srv *azurite.Server, p policy.Policy, mode azure.ChecksumMode, ro policy.RetryOptions) *azure.Store {
	t.Helper()
	s, err := azure.New(azure.Config{
		ConnectionString: srv.ConnectionString(),
		Container:        fmt.Sprintf("lbfault-%d", time.Now().UnixNano()%1e9),
		ClientOptions: &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
			Retry:            ro,
			PerRetryPolicies: []policy.Policy{p},
		}},
		Checksum: mode,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() { _ = s.DeleteContainer(ctx) })
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}

func corruptionInTransitIsDetected(t *testing.T, srv *azurite.Server, mode azure.ChecksumMode) {
	c := &corrupter{}
	s := storeThrough(t, srv, c, mode)
	ctx := context.Background()
	var err error
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

// headerCatcher records the checksum headers of a Put Blob and answers it
// without sending it anywhere.
type headerCatcher struct{ md5, crc64 string }

func (h *headerCatcher) Do(raw *http.Request) (*http.Response, error) {
	// The SDK sets some headers under non-canonical keys.
	for k, v := range raw.Header {
		switch strings.ToLower(k) {
		case "content-md5":
			h.md5 = v[0]
		case "x-ms-content-crc64":
			h.crc64 = v[0]
		}
	}
	return &http.Response{StatusCode: http.StatusCreated, Header: http.Header{}, Body: http.NoBody, Request: raw}, nil
}

// ChecksumAuto sends CRC64 (cheap here, native in Azure) except to the
// emulator account, whose CRC64 is slow JavaScript; the headers carry the
// body's checksum.
func TestPutBlobChecksumAuto(t *testing.T) {
	data := blobstoretest.Random(3, 100<<10)
	md5sum := md5.Sum(data)
	crc := make([]byte, 8)
	binary.LittleEndian.PutUint64(crc, crc64.Checksum(data, crc64.MakeTable(0x9A6C9329AC4BC9B5)))
	for _, c := range []struct {
		account          string
		mode             azure.ChecksumMode
		wantMD5, wantCRC string
	}{
		{"lbprod", azure.ChecksumAuto, "", base64.StdEncoding.EncodeToString(crc)},
		{azure.EmulatorAccount, azure.ChecksumAuto, base64.StdEncoding.EncodeToString(md5sum[:]), ""},
		{"lbprod", azure.ChecksumMD5, base64.StdEncoding.EncodeToString(md5sum[:]), ""},
		{azure.EmulatorAccount, azure.ChecksumCRC64, "", base64.StdEncoding.EncodeToString(crc)},
	} {
		h := &headerCatcher{}
		s, err := azure.New(azure.Config{
			ConnectionString: "DefaultEndpointsProtocol=https;AccountName=" + c.account + ";AccountKey=" + base64.StdEncoding.EncodeToString([]byte("not-a-real-key")) +
				";BlobEndpoint=https://127.0.0.1:1/" + c.account + ";",
			Container: "c",
			ClientOptions: &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
				Retry:     policy.RetryOptions{MaxRetries: -1},
				Transport: h,
			}},
			Checksum: c.mode,
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.PutBlob(context.Background(), "b", data, nil); err != nil {
			t.Fatalf("%s, mode %d: %v", c.account, c.mode, err)
		}
		if h.md5 != c.wantMD5 || h.crc64 != c.wantCRC {
			t.Errorf("%s, mode %d: Content-MD5 %q, x-ms-content-crc64 %q; want %q, %q", c.account, c.mode, h.md5, h.crc64, c.wantMD5, c.wantCRC)
		}
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
	// A blob endpoint without its scheme or host: refused at once, not
	// retried as an outage for ever.
	for _, ep := range []string{"foo.blob.core.windows.net", "ftp://foo.blob.core.windows.net"} {
		if _, err := azure.New(azure.Config{ConnectionString: "BlobEndpoint=" + ep + ";SharedAccessSignature=sig=TOPSECRET", Container: "c"}); !errors.Is(err, blobstore.ErrInvalid) ||
			strings.Contains(err.Error(), "TOPSECRET") {
			t.Errorf("blob endpoint %q: err = %v, want ErrInvalid without the signature", ep, err)
		}
	}
	// Plain http to a real account: signed requests and data in clear.
	// Loopback and the emulator's account are taken.
	for ep, ok := range map[string]bool{
		"DefaultEndpointsProtocol=http;AccountName=prod;AccountKey=c2VjcmV0;EndpointSuffix=core.windows.net":                                                     false,
		"BlobEndpoint=http://prod.blob.core.windows.net;SharedAccessSignature=sig=TOPSECRET":                                                                     false,
		"BlobEndpoint=http://127.0.0.1:10000/prod;SharedAccessSignature=sig=TOPSECRET":                                                                           true,
		"BlobEndpoint=http://localhost:10000/prod;SharedAccessSignature=sig=TOPSECRET":                                                                           true,
		"DefaultEndpointsProtocol=http;AccountName=" + azure.EmulatorAccount + ";AccountKey=c2VjcmV0;BlobEndpoint=http://azurite:10000/" + azure.EmulatorAccount: true,
	} {
		_, err := azure.New(azure.Config{ConnectionString: ep, Container: "c"})
		if ok && err != nil || !ok && (!errors.Is(err, blobstore.ErrInvalid) || !strings.Contains(err.Error(), "plain http") || strings.Contains(err.Error(), "TOPSECRET") || strings.Contains(err.Error(), "c2VjcmV0")) {
			t.Errorf("%s: err = %v, want taken: %v", ep, err, ok)
		}
	}
	// Fields run together: the account name's value goes on to the key.
	for _, sep := range []string{"\n", " ", ","} {
		if _, err := azure.New(azure.Config{ConnectionString: "AccountName=acct" + sep + "AccountKey=c2VjcmV0", Container: "c"}); err == nil ||
			strings.Contains(err.Error(), "c2VjcmV0") {
			t.Errorf("connection string with %q between its fields: err = %v (must fail and not echo the key)", sep, err)
		}
	}
	// A SAS token travels in the request URL, which transport errors quote.
	sas, err := azure.New(azure.Config{
		ConnectionString: "BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;SharedAccessSignature=sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&sig=TOPSECRET%3D",
		Container:        "c",
		ClientOptions:    &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{Retry: policy.RetryOptions{MaxRetries: -1}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = sas.GetBlob(context.Background(), "x")
	if err == nil || strings.Contains(err.Error(), "TOPSECRET") || !strings.Contains(err.Error(), "127.0.0.1:1") {
		t.Fatalf("dead endpoint with a SAS token: err = %v (must fail, name the endpoint, and not echo the signature)", err)
	}
}

// A blob larger than any Lifeboat writes (one planted in the account) is
// refused by its size, before it is held in memory, and not retried.
func TestGetBlobRefusesOversize(t *testing.T) {
	srv := azurite.ForTest(t)
	ctx := context.Background()
	container := fmt.Sprintf("lbtest-big-%d", time.Now().UnixNano()%1e9)
	open := func(max int64) *azure.Store {
		s, err := azure.New(azure.Config{ConnectionString: srv.ConnectionString(), Container: container, MaxGetBlob: max})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s, small := open(0), open(4<<10)
	t.Cleanup(func() { s.DeleteContainer(context.Background()) })
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.PutBlob(ctx, "big", blobstoretest.Random(4, 8<<10), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := small.GetBlob(ctx, "big"); err == nil || !strings.Contains(err.Error(), "more than the 4096") || !blobstore.IsPermanent(err) {
		t.Fatalf("GetBlob of 8 KiB with a 4 KiB bound: %v", err)
	}
	if b, err := s.GetBlob(ctx, "big"); err != nil || len(b) != 8<<10 {
		t.Fatalf("GetBlob within the bound: %d bytes, %v", len(b), err)
	}
}

// cutter ends GET response bodies early, as a connection that breaks
// mid-download does: the body stops short of its Content-Length.
type cutter struct{ on atomic.Bool }

type cutBody struct {
	io.ReadCloser
	left int
}

func (b *cutBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, io.ErrUnexpectedEOF
	}
	n, err := b.ReadCloser.Read(p[:min(len(p), b.left)])
	b.left -= n
	return n, err
}

func (c *cutter) Do(req *policy.Request) (*http.Response, error) {
	resp, err := req.Next()
	if err == nil && c.on.Load() && req.Raw().Method == http.MethodGet && resp.StatusCode/100 == 2 {
		resp.Body = &cutBody{ReadCloser: resp.Body, left: 1000}
	}
	return resp, err
}

// A download cut short was taken for a range beyond the end of the blob:
// ReadPages failed for good (ErrInvalid, not retried: a recovery or a
// checksum resync started over) and GetBlobRange returned a silent short
// read. It is a transient error now; a range that does pass the end is
// still told apart by the length the service announced.
func TestDownloadCutShortIsRetryable(t *testing.T) {
	c := &cutter{}
	s := storeThrough(t, azurite.ForTest(t), c, azure.ChecksumAuto)
	ctx := context.Background()
	var err error
	data := blobstoretest.Random(4, 64<<10)
	if err := s.CreatePageBlob(ctx, "disk", 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.WritePages(ctx, "disk", 0, data); err != nil {
		t.Fatal(err)
	}
	if err := s.PutBlob(ctx, "seg", data, nil); err != nil {
		t.Fatal(err)
	}

	c.on.Store(true)
	err = s.ReadPages(ctx, "disk", "", 0, make([]byte, 4096))
	if err == nil || errors.Is(err, blobstore.ErrInvalid) || blobstore.IsPermanent(err) {
		t.Errorf("ReadPages cut short: err = %v, want a retryable error", err)
	}
	if _, err := s.GetBlobRange(ctx, "seg", 0, make([]byte, 4096)); err == nil || err == io.EOF || blobstore.IsPermanent(err) {
		t.Errorf("GetBlobRange cut short: err = %v, want a retryable error", err)
	}
	c.on.Store(false)

	if err := s.ReadPages(ctx, "disk", "", 1<<20-512, make([]byte, 1024)); !errors.Is(err, blobstore.ErrInvalid) {
		t.Errorf("ReadPages past the end: err = %v, want ErrInvalid", err)
	}
	if n, err := s.GetBlobRange(ctx, "seg", 64<<10-100, make([]byte, 200)); n != 100 || err != io.EOF {
		t.Errorf("GetBlobRange past the end: %d, %v; want 100, io.EOF", n, err)
	}
}

// silentPuts holds every PUT until its context ends: a service that took
// the request and never answers.
type silentPuts struct{}

func (silentPuts) Do(req *policy.Request) (*http.Response, error) {
	if req.Raw().Method == http.MethodPut && strings.Contains(req.Raw().URL.Path, "/manifest") {
		<-req.Raw().Context().Done()
		return nil, req.Raw().Context().Err()
	}
	return req.Next()
}

// A conditional put that gets no reply ends with the per-try timeout, as
// every other call does: it turns SDK retries off for itself, and must not
// turn the timeout off with them (it held the process server's manifest
// lock for as long as TCP took to give up).
func TestPutBlobIfKeepsTryTimeout(t *testing.T) {
	srv := azurite.ForTest(t)
	s, err := azure.New(azure.Config{
		ConnectionString: srv.ConnectionString(),
		Container:        fmt.Sprintf("lbtry-%d", time.Now().UnixNano()%1e9),
		ClientOptions: &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
			Retry:            policy.RetryOptions{MaxRetries: -1, TryTimeout: 300 * time.Millisecond},
			PerRetryPolicies: []policy.Policy{silentPuts{}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Cleanup(func() { _ = s.DeleteContainer(context.Background()) })
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = s.PutBlobIf(ctx, "m/manifest.json", []byte("{}"), nil, "")
	if took := time.Since(start); err == nil || took > 10*time.Second || ctx.Err() != nil {
		t.Fatalf("PutBlobIf with no reply: %v after %v, want a failure after the 300 ms try timeout", err, took)
	}
	if errors.Is(err, blobstore.ErrConflict) || blobstore.IsPermanent(err) {
		t.Fatalf("PutBlobIf with no reply: %v, want a retryable error", err)
	}
}

// noSuchHost fails every request as a resolver does for a name that does
// not exist.
type noSuchHost struct{}

func (noSuchHost) Do(req *policy.Request) (*http.Response, error) {
	return nil, &url.Error{Op: "Get", URL: req.Raw().URL.String(), Err: &net.OpError{Op: "dial", Net: "tcp",
		Err: &net.DNSError{Err: "no such host", Name: req.Raw().URL.Host, IsNotFound: true}}}
}

// A storage account host name that does not resolve (a mistyped account)
// is a permanent error that says so: retried as an outage, a recovery
// waited minutes before failing.
func TestUnresolvableAccountPermanent(t *testing.T) {
	srv := azurite.ForTest(t)
	s, err := azure.New(azure.Config{
		ConnectionString: srv.ConnectionString(),
		Container:        "lbdns",
		ClientOptions: &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
			Retry:            policy.RetryOptions{MaxRetries: -1},
			PerRetryPolicies: []policy.Policy{noSuchHost{}},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Stat(context.Background(), "m/manifest.json")
	if !blobstore.IsPermanent(err) || !strings.Contains(err.Error(), "does not resolve") {
		t.Fatalf("stat through an unresolvable host: %v, want a permanent error naming the host name", err)
	}
}

// slowBody sends request bodies at about rate bytes a second.
type slowBody struct{ rate int }

func (p slowBody) Do(req *policy.Request) (*http.Response, error) {
	if b := req.Raw().Body; b != nil && req.Raw().ContentLength > 0 {
		req.Raw().Body = &throttled{ReadCloser: b, rate: p.rate}
	}
	return req.Next()
}

type throttled struct {
	io.ReadCloser
	rate int
}

func (r *throttled) Read(p []byte) (int, error) {
	p = p[:min(len(p), r.rate/20)]
	time.Sleep(50 * time.Millisecond)
	return r.ReadCloser.Read(p)
}

// A PutBlob on a slow link gets time for its size: each try cut at a
// TryTimeout sized for a Put Page restarts from the first byte, and a
// segment would never get through.
func TestSlowPutBlobNotCutShort(t *testing.T) {
	srv := azurite.ForTest(t)
	s := storeThroughWith(t, srv, slowBody{rate: 512 << 10}, azure.ChecksumAuto, policy.RetryOptions{MaxRetries: -1, TryTimeout: time.Second})
	ctx := context.Background()
	data := blobstoretest.Random(3, 1<<20) // about 2 s at 512 KiB/s
	if err := s.PutBlob(ctx, "seg", data, nil); err != nil {
		t.Fatalf("PutBlob of 1 MiB at 512 KiB/s with a 1 s try timeout: %v", err)
	}
	got, err := s.GetBlob(ctx, "seg")
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v (equal %v)", err, bytes.Equal(got, data))
	}
}

// loseSnapshotReply lets the first Create Snapshot reach the service and
// then loses its reply, as a network cut would.
type loseSnapshotReply struct{ lost atomic.Bool }

func (l *loseSnapshotReply) Do(req *policy.Request) (*http.Response, error) {
	resp, err := req.Next()
	if err == nil && req.Raw().URL.Query().Get("comp") == "snapshot" && !l.lost.Swap(true) {
		resp.Body.Close()
		return nil, errors.New("test: reply lost")
	}
	return resp, err
}

// A snapshot whose reply is lost is not taken again by the SDK's own
// retries (a snapshot leaves the blob's ETag as it was, so a retry meets
// its condition): one snapshot, and the error for blobstore.WithRetry.
func TestSnapshotLostReplyNotRetriedInside(t *testing.T) {
	srv := azurite.ForTest(t)
	lose := &loseSnapshotReply{}
	s := storeThroughWith(t, srv, lose, azure.ChecksumAuto, policy.RetryOptions{MaxRetries: 2, RetryDelay: 10 * time.Millisecond, TryTimeout: time.Minute})
	ctx := context.Background()
	if err := s.CreatePageBlob(ctx, "d", 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Snapshot(ctx, "d", blobstore.Metadata{"seq": "1"}); err == nil {
		t.Error("a snapshot whose reply was lost reported success (retried inside the SDK?)")
	}
	snaps, err := s.ListSnapshots(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 1 {
		t.Fatalf("%d snapshots after one lost reply, want 1", len(snaps))
	}
}
