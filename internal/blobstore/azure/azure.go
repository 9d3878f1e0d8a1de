// Package azure implements blobstore.Store on Azure Blob Storage (and
// Azurite) with the azblob SDK: journal segments are block blobs, replica
// disks page blobs, recovery points page-blob snapshots.
package azure

import (
	"bytes"
	"cmp"
	"context"
	"crypto/md5"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
)

// Config selects the account and container.
type Config struct {
	// ConnectionString of the storage account (contains the account key:
	// it is never logged or included in errors).
	ConnectionString string
	// Container holds all of Lifeboat's blobs (3-63 chars, [a-z0-9-]).
	Container string
	// ClientOptions tunes the SDK pipeline; nil selects Lifeboat's defaults
	// (2 quick SDK-level retries, 2 min per try). Long outages are handled
	// by blobstore.WithRetry, not here, so that the caller controls them.
	ClientOptions *azblob.ClientOptions
	// Copy selects how CopyFromSnapshot copies (default CopyAuto).
	Copy CopyMode
	// Checksum selects the transactional checksum of PutBlob (default
	// ChecksumAuto).
	Checksum ChecksumMode
	// MaxGetBlob bounds what GetBlob downloads (default MaxGetBlob): a
	// blob planted in the account is refused by its size before its
	// bytes are held in memory, let alone authenticated.
	MaxGetBlob int64
}

// MaxGetBlob is the default Config.MaxGetBlob: more than any blob
// Lifeboat puts (a sealed segment holds at most seal.MaxPlainSize, 1 GiB,
// plus its headers).
const MaxGetBlob = 1<<30 + 1<<20

// ChecksumMode selects the checksum PutBlob sends for the service to
// verify before it commits the blob (it rejects a body damaged in
// transit, and the upload is retried).
type ChecksumMode int

const (
	// ChecksumAuto sends CRC64, except to the storage emulator account
	// (devstoreaccount1), which gets MD5.
	ChecksumAuto ChecksumMode = iota
	// ChecksumCRC64 sends x-ms-content-crc64: 14 GB/s here, where
	// crypto/md5 runs at 0.6–0.8 GB/s (about 1.9 CPU-s per GB journaled,
	// an eighth of the process server's CPU at 20 MB/s).
	ChecksumCRC64
	// ChecksumMD5 sends Content-MD5. Azurite 3.37 computes a Put Blob's MD5
	// anyway, natively, but a CRC64 in JavaScript a byte at a time (78 MB/s,
	// on the one thread that serves every request): against it MD5 costs
	// the pipeline less overall (journal blobs with CRC64 raised RPO p99 at
	// 37 MB/s from 1.30–1.35 s to 1.97–2.52 s).
	ChecksumMD5
)

// CopyMode selects the implementation of CopyFromSnapshot.
type CopyMode int

const (
	// CopyAuto copies server-side, except on the storage emulator account
	// (devstoreaccount1) where it copies through the client.
	CopyAuto CopyMode = iota
	// CopyServer uses Copy Blob: no data passes through Lifeboat.
	CopyServer
	// CopyClient reads the snapshot's valid ranges and writes them to the
	// destination. Needed for Azurite 3.37.0, whose Copy Blob makes the
	// copy share page-range state with the source snapshot: writing the
	// copy then changes the recovery point (found by the conformance suite).
	CopyClient
)

// EmulatorAccount is the account name of Azurite and other emulators.
const EmulatorAccount = "devstoreaccount1"

// Store is a blobstore.Store on one Azure container. Safe for concurrent use.
type Store struct {
	c        *container.Client
	account  string
	name     string
	copy     CopyMode
	checksum ChecksumMode // never ChecksumAuto
	maxGet   int64
	retry    policy.RetryOptions // the pipeline's, for calls that override them
}

var _ blobstore.Store = (*Store)(nil)

// New returns a Store for cfg. It does not contact the service.
func New(cfg Config) (*Store, error) {
	if cfg.Container == "" {
		return nil, fmt.Errorf("azure: empty container name: %w", blobstore.ErrInvalid)
	}
	opts := cfg.ClientOptions
	if opts == nil {
		opts = &azblob.ClientOptions{ClientOptions: azcore.ClientOptions{
			Retry: policy.RetryOptions{
				MaxRetries:    2,
				RetryDelay:    200 * time.Millisecond,
				MaxRetryDelay: 2 * time.Second,
				// Generous: a 4 MiB Put Page must fit even on a slow link.
				TryTimeout: 2 * time.Minute,
			},
		}}
	}
	// The parse error of azblob never echoes the string, but be explicit
	// that we do not either: it holds the account key.
	account := "unknown-account"
	for _, kv := range strings.Split(cfg.ConnectionString, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.EqualFold(strings.TrimSpace(k), "AccountName") {
			account = v
		}
	}
	if account != "unknown-account" && !validAccountName(account) {
		// Fields run together (a newline or a comma for the ';'): the
		// value goes on to the key.
		account = "unreadable-account-name"
	}
	svc, err := azblob.NewClientFromConnectionString(cfg.ConnectionString, opts)
	if err != nil {
		return nil, fmt.Errorf("azure: invalid connection string for account %q (check %s): %w",
			account, "AZURE_STORAGE_CONNECTION_STRING or config", blobstore.ErrInvalid)
	}
	// A BlobEndpoint without its scheme fails every request as a transport
	// error, which is retried: a process server would cache for ever.
	if u, err := url.Parse(svc.URL()); err != nil || u.Host == "" || u.Scheme != "https" && u.Scheme != "http" {
		shown := "unparsable"
		if err == nil {
			u.RawQuery, u.User = "", nil // a SAS token
			shown = u.String()
		}
		return nil, fmt.Errorf("azure: the connection string's blob endpoint %q has no http(s) scheme or no host (BlobEndpoint=https://<account>.blob.core.windows.net): %w",
			shown, blobstore.ErrInvalid)
	}
	if u, _ := url.Parse(svc.URL()); u.Scheme == "http" && account != EmulatorAccount && !loopback(u.Hostname()) {
		// Signed requests, a SAS token and the replicas' pages would
		// cross the network in clear.
		return nil, fmt.Errorf("azure: the connection string's blob endpoint %s is plain http: use https (DefaultEndpointsProtocol=https); http is taken only for a loopback endpoint or the storage emulator's account: %w",
			u.Host, blobstore.ErrInvalid)
	}
	mode := cfg.Copy
	if mode == CopyAuto {
		mode = CopyServer
		if account == EmulatorAccount {
			mode = CopyClient
		}
	}
	sum := cfg.Checksum
	if sum == ChecksumAuto {
		sum = ChecksumCRC64
		if account == EmulatorAccount {
			sum = ChecksumMD5
		}
	}
	return &Store{c: svc.ServiceClient().NewContainerClient(cfg.Container), account: account, name: cfg.Container, copy: mode, checksum: sum,
		maxGet: cmp.Or(cfg.MaxGetBlob, MaxGetBlob), retry: opts.Retry}, nil
}

// String identifies the store without secrets, for logs.
func (s *Store) String() string { return "azure:" + s.account + "/" + s.name }

// DeleteContainer deletes the container and everything in it. Meant for
// test clean-up; not part of blobstore.Store on purpose.
func (s *Store) DeleteContainer(ctx context.Context) error {
	_, err := s.c.Delete(ctx, nil)
	return s.wrap("delete container", s.name, err)
}

// opError is a service error reduced to one readable line, classified with
// a blobstore sentinel (and/or permanent marker) and keeping the SDK error
// for errors.As.
type opError struct {
	msg   string
	kind  error // blobstore.ErrNotFound, ErrInvalid, ErrConflict or nil
	cause error
}

func (e *opError) Error() string { return e.msg }
func (e *opError) Unwrap() []error {
	if e.kind != nil {
		return []error{e.kind, e.cause}
	}
	return []error{e.cause}
}

func (s *Store) wrap(op, name string, err error) error {
	if err == nil {
		return nil
	}
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		// Transport errors (connection refused, reset, timeout): retryable.
		// Their text holds the request URL, whose query may be a SAS
		// token: only what follows it is shown.
		msg := err.Error()
		var ue *url.Error
		if errors.As(err, &ue) {
			msg = fmt.Sprintf("%s %s: %v", ue.Op, redactURL(ue.URL), ue.Err)
		}
		e := &opError{msg: fmt.Sprintf("azure: %s %q: %s", op, name, msg), cause: err}
		if de := (*net.DNSError)(nil); errors.As(err, &de) && de.IsNotFound {
			// The name does not exist (a mistyped AccountName or
			// endpoint): retried, a recovery would wait minutes to say so.
			// (Callers that must go on, the uploaders, retry all the same.)
			e.msg += " (the storage account's host name does not resolve: check AccountName or BlobEndpoint in the connection string)"
			return blobstore.Permanent(e)
		}
		return e
	}
	e := &opError{
		msg:   fmt.Sprintf("azure: %s %q: %s (HTTP %d)", op, name, re.ErrorCode, re.StatusCode),
		cause: err,
	}
	switch {
	case re.StatusCode == http.StatusNotFound:
		e.kind = blobstore.ErrNotFound
	case bloberror.HasCode(err, bloberror.SequenceNumberConditionNotMet):
		// A write under a fence (WithFence) that is not the blob's
		// (fenceFailed says whose).
		e.msg += ": the blob's fence is not this writer's"
		e.kind = blobstore.ErrFenced
	case bloberror.HasCode(err, bloberror.ConditionNotMet, bloberror.BlobAlreadyExists):
		// A conditional write lost to another writer (412, or 409 for
		// If-None-Match: *): permanent by its kind.
		e.kind = blobstore.ErrConflict
	case re.StatusCode == http.StatusRequestedRangeNotSatisfiable,
		bloberror.HasCode(err, bloberror.InvalidPageRange, bloberror.InvalidRange,
			bloberror.InvalidBlobType, bloberror.OutOfRangeInput, bloberror.InvalidHeaderValue):
		e.kind = blobstore.ErrInvalid
	case bloberror.HasCode(err, bloberror.MD5Mismatch, bloberror.CRC64Mismatch, bloberror.ContainerBeingDeleted,
		bloberror.SnapshotOperationRateExceeded),
		re.StatusCode == http.StatusRequestTimeout, re.StatusCode == http.StatusTooManyRequests:
		// Transient: corruption in transit, throttling (a 409 for
		// snapshots taken too fast), container recycling.
	case re.StatusCode >= 400 && re.StatusCode < 500:
		// Authorization, conflicts, bad requests: retrying will not help.
		return blobstore.Permanent(e)
	}
	return e
}

// redactURL drops a URL's query (a SAS token's signature travels there).
func redactURL(raw string) string {
	if i := strings.IndexByte(raw, '?'); i >= 0 {
		return raw[:i] + "?[redacted]"
	}
	return raw
}

func toAzure(md blobstore.Metadata) map[string]*string {
	if len(md) == 0 {
		return nil
	}
	out := make(map[string]*string, len(md))
	for k, v := range md {
		out[strings.ToLower(k)] = &v
	}
	return out
}

// fromAzure lower-cases names: GetProperties returns them canonicalised as
// HTTP headers ("Foo"), listings as stored.
func fromAzure(md map[string]*string) blobstore.Metadata {
	if len(md) == 0 {
		return nil
	}
	out := make(blobstore.Metadata, len(md))
	for k, v := range md {
		if v != nil {
			out[strings.ToLower(k)] = *v
		}
	}
	return out
}

func body(p []byte) io.ReadSeekCloser { return streaming.NopCloser(bytes.NewReader(p)) }

// EnsureContainer implements blobstore.Store.
func (s *Store) EnsureContainer(ctx context.Context) error {
	_, err := s.c.Create(ctx, nil)
	if bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		return nil
	}
	return s.wrap("create container", s.name, err)
}

// PutBlob implements blobstore.Store. The body's CRC64 or MD5 (see
// ChecksumMode) goes with it, and the service verifies it before
// committing (Crc64Mismatch or Md5Mismatch otherwise, retryable). The
// service also stores the MD5 of a blob put in one call as its
// Content-MD5 (computed when not given), which GetBlob verifies.
func (s *Store) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	_, err := s.put(ctx, s.retry, name, data, md, nil)
	return err
}

// PutBlobIf implements blobstore.Store: PutBlob with If-Match, or
// If-None-Match: * when match is "".
func (s *Store) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	cond := &blob.ModifiedAccessConditions{IfNoneMatch: to(azcore.ETagAny)}
	if match != "" {
		cond = &blob.ModifiedAccessConditions{IfMatch: to(azcore.ETag(match))}
	}
	// No retries inside the SDK: one after a lost reply meets the
	// condition failed by its own first try and looks like another
	// writer's. blobstore.WithRetry retries, reading the blob back.
	// The rest of the options stay: an override replaces them all, and
	// without TryTimeout a reply that never comes would hold the call
	// (and the manifest's lock) until TCP gives up.
	ro := s.retry
	ro.MaxRetries = -1
	etag, err := s.put(ctx, ro, name, data, md, &blob.AccessConditions{ModifiedAccessConditions: cond})
	if match != "" && blobstore.IsNotFound(err) && !bloberror.HasCode(err, bloberror.ContainerNotFound) {
		// The blob went since match was read: the condition failed.
		return "", fmt.Errorf("azure: put blob %q: gone since ETag %s was read: %w", name, match, blobstore.ErrConflict)
	}
	return etag, err
}

func to[T any](v T) *T { return &v }

// etagOf returns e as headers carry it, quoted: listings leave the
// quotes out, and the same version must compare equal either way.
func etagOf(e *azcore.ETag) string {
	v := string(deref(e))
	if v != "" && !strings.HasPrefix(v, `"`) {
		v = `"` + v + `"`
	}
	return v
}

// minUploadRate is the slowest upload a try of PutBlob is given time
// for: a segment's try timed out at the pipeline's TryTimeout (sized for
// a 4 MiB Put Page) restarts from its first byte, and on a crowded link
// none would ever finish.
const minUploadRate = 64 << 10 // bytes per second

// put is PutBlob on conditions cond (nil: none) with retry options ro,
// whose TryTimeout grows with data; it returns the new ETag.
func (s *Store) put(ctx context.Context, ro policy.RetryOptions, name string, data []byte, md blobstore.Metadata, cond *blob.AccessConditions) (string, error) {
	if err := checkPut(name, md); err != nil {
		return "", err
	}
	if need := time.Duration(len(data)) * time.Second / minUploadRate; ro.TryTimeout > 0 && need > ro.TryTimeout {
		ro.TryTimeout = need
	}
	ctx = policy.WithRetryOptions(ctx, ro)
	if len(data) > blobstore.MaxBlockBlobSize {
		return "", fmt.Errorf("azure: put blob %q: %d bytes exceeds the single-request limit: %w", name, len(data), blobstore.ErrInvalid)
	}
	opts := &blockblob.UploadOptions{Metadata: toAzure(md), AccessConditions: cond}
	if s.checksum == ChecksumMD5 {
		sum := md5.Sum(data)
		opts.TransactionalValidation = blob.TransferValidationTypeMD5(sum[:])
		opts.HTTPHeaders = &blob.HTTPHeaders{BlobContentMD5: sum[:]}
	} else {
		opts.TransactionalValidation = blob.TransferValidationTypeCRC64(crc64Of(data))
	}
	resp, err := s.c.NewBlockBlobClient(name).Upload(ctx, body(data), opts)
	if err != nil {
		return "", s.wrap("put blob", name, err)
	}
	return etagOf(resp.ETag), nil
}

func checkPut(name string, md blobstore.Metadata) error {
	if err := blobstore.CheckName(name); err != nil {
		return err
	}
	return blobstore.CheckMetadata(md)
}

// tooBig refuses blob name for its size, for good.
func (s *Store) tooBig(name string) error {
	return blobstore.Permanent(fmt.Errorf("azure: get blob %q: more than the %d bytes of any blob Lifeboat writes", name, s.maxGet))
}

// GetBlob implements blobstore.Store.
func (s *Store) GetBlob(ctx context.Context, name string) ([]byte, error) {
	resp, err := s.c.NewBlobClient(name).DownloadStream(ctx, nil)
	if err != nil {
		return nil, s.wrap("get blob", name, err)
	}
	defer resp.Body.Close()
	var buf []byte
	if resp.ContentLength != nil {
		if *resp.ContentLength > s.maxGet {
			return nil, s.tooBig(name)
		}
		buf = make([]byte, 0, *resp.ContentLength)
	}
	b := bytes.NewBuffer(buf)
	if _, err := b.ReadFrom(io.LimitReader(resp.Body, s.maxGet+1)); err != nil {
		return nil, s.wrap("get blob", name, err)
	}
	if int64(b.Len()) > s.maxGet {
		return nil, s.tooBig(name)
	}
	if len(resp.ContentMD5) == md5.Size {
		if sum := md5.Sum(b.Bytes()); !bytes.Equal(sum[:], resp.ContentMD5) {
			return nil, fmt.Errorf("azure: get blob %q: %w", name, blobstore.ErrCorrupt)
		}
	}
	return b.Bytes(), nil
}

// GetBlobRange implements blobstore.Store.
func (s *Store) GetBlobRange(ctx context.Context, name string, offset int64, p []byte) (int, error) {
	if offset < 0 {
		return 0, fmt.Errorf("azure: get blob range %q: negative offset: %w", name, blobstore.ErrInvalid)
	}
	if len(p) == 0 {
		return 0, nil
	}
	resp, err := s.c.NewBlobClient(name).DownloadStream(ctx, &blob.DownloadStreamOptions{
		Range: blob.HTTPRange{Offset: offset, Count: int64(len(p))},
	})
	if err != nil {
		var re *azcore.ResponseError
		if errors.As(err, &re) && re.StatusCode == http.StatusRequestedRangeNotSatisfiable {
			return 0, io.EOF // offset at or beyond the end
		}
		return 0, s.wrap("get blob range", name, err)
	}
	defer resp.Body.Close()
	n, err := io.ReadFull(resp.Body, p)
	switch {
	case err == nil:
		return n, nil
	case shortRange(err, resp.ContentLength, len(p)):
		return n, io.EOF
	case err == io.ErrUnexpectedEOF || err == io.EOF:
		return n, s.wrap("get blob range", name, cutShort(n, len(p)))
	}
	return n, s.wrap("get blob range", name, err)
}

// shortRange reports whether a ranged download ended early because the
// blob does: the service announced fewer bytes than asked for. A body cut
// short of what it announced is a connection that broke (retryable).
func shortRange(err error, contentLength *int64, want int) bool {
	return (err == io.ErrUnexpectedEOF || err == io.EOF) && contentLength != nil && *contentLength < int64(want)
}

func cutShort(n, want int) error {
	return fmt.Errorf("response body cut short after %d of %d bytes: %w", n, want, io.ErrUnexpectedEOF)
}

func kindOf(t *blob.BlobType) blobstore.Kind {
	if t != nil && *t == blob.BlobTypePageBlob {
		return blobstore.PageBlob
	}
	return blobstore.BlockBlob
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// ListBlobs implements blobstore.Store.
func (s *Store) ListBlobs(ctx context.Context, prefix string) ([]blobstore.BlobInfo, error) {
	pager := s.c.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{
		Prefix:  &prefix,
		Include: container.ListBlobsInclude{Metadata: true},
	})
	var out []blobstore.BlobInfo
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, s.wrap("list blobs", prefix, err)
		}
		for _, it := range page.Segment.BlobItems {
			if it == nil || it.Name == nil || it.Properties == nil {
				continue
			}
			out = append(out, blobstore.BlobInfo{
				Name:     *it.Name,
				Kind:     kindOf(it.Properties.BlobType),
				Size:     deref(it.Properties.ContentLength),
				Metadata: fromAzure(it.Metadata),
				Modified: deref(it.Properties.LastModified),
				ETag:     etagOf(it.Properties.ETag),
			})
		}
	}
	// The service lists in name order; sort anyway so the contract does not
	// depend on it (e.g. real accounts with hierarchical namespace).
	slices.SortFunc(out, func(a, b blobstore.BlobInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// ListDirs implements blobstore.Store.
func (s *Store) ListDirs(ctx context.Context, prefix string) ([]string, error) {
	pager := s.c.NewListBlobsHierarchyPager("/", &container.ListBlobsHierarchyOptions{Prefix: &prefix})
	var out []string
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, s.wrap("list directories", prefix, err)
		}
		for _, p := range page.Segment.BlobPrefixes {
			if p != nil && p.Name != nil {
				out = append(out, *p.Name)
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

// Stat implements blobstore.Store.
func (s *Store) Stat(ctx context.Context, name string) (blobstore.BlobInfo, error) {
	p, err := s.c.NewBlobClient(name).GetProperties(ctx, nil)
	if err != nil {
		return blobstore.BlobInfo{}, s.wrap("stat", name, err)
	}
	return blobstore.BlobInfo{
		Name:     name,
		Kind:     kindOf(p.BlobType),
		Size:     deref(p.ContentLength),
		Metadata: fromAzure(p.Metadata),
		Modified: deref(p.LastModified),
		ETag:     etagOf(p.ETag),
	}, nil
}

// SetMetadata implements blobstore.Store.
func (s *Store) SetMetadata(ctx context.Context, name string, md blobstore.Metadata) error {
	if err := checkPut(name, md); err != nil {
		return err
	}
	return s.underFence(ctx, "set metadata", name, false, func(cond *blob.AccessConditions) error {
		_, err := s.c.NewBlobClient(name).SetMetadata(ctx, toAzure(md), &blob.SetMetadataOptions{AccessConditions: cond})
		return err
	})
}

// DeleteBlob implements blobstore.Store.
func (s *Store) DeleteBlob(ctx context.Context, name string) error {
	include := blob.DeleteSnapshotsOptionTypeInclude
	_, err := s.c.NewBlobClient(name).Delete(ctx, &blob.DeleteOptions{DeleteSnapshots: &include})
	return s.wrap("delete blob", name, err)
}

// CreatePageBlob implements blobstore.Store.
func (s *Store) CreatePageBlob(ctx context.Context, name string, size int64, md blobstore.Metadata) error {
	if err := checkPut(name, md); err != nil {
		return err
	}
	if err := blobstore.CheckPageBlobSize(size); err != nil {
		return err
	}
	n, fenced := blobstore.FenceOf(ctx)
	if fenced {
		if err := blobstore.CheckFence(name, n); err != nil {
			return fmt.Errorf("azure: create %w", err)
		}
	}
	create := func(cond *blob.AccessConditions) error {
		opts := &pageblob.CreateOptions{Metadata: toAzure(md), AccessConditions: cond}
		if fenced {
			opts.SequenceNumber = &n
		}
		_, err := s.c.NewPageBlobClient(name).Create(ctx, size, opts)
		return err
	}
	return s.underFence(ctx, "create page blob", name, true, create)
}

// WritePages implements blobstore.Store. Each Put Page carries its own
// CRC64 (x-ms-content-crc64), verified by the service before the pages
// change: it costs half of what Content-MD5 did, and MD5 was a third of
// the applier's CPU.
func (s *Store) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	if err := blobstore.CheckPageRange(offset, int64(len(data))); err != nil {
		return err
	}
	pb := s.c.NewPageBlobClient(name)
	cond := seqCondition(ctx)
	for len(data) > 0 {
		n := min(len(data), blobstore.MaxPutPage)
		_, err := pb.UploadPages(ctx, body(data[:n]), blob.HTTPRange{Offset: offset, Count: int64(n)},
			&pageblob.UploadPagesOptions{TransactionalValidation: blob.TransferValidationTypeCRC64(crc64Of(data[:n])),
				SequenceNumberAccessConditions: cond})
		if err != nil {
			return s.fenceFailed(ctx, "write pages", name, s.wrap(fmt.Sprintf("write pages [%d, %d) of", offset, offset+int64(n)), name, err))
		}
		data, offset = data[n:], offset+int64(n)
	}
	return nil
}

// ClearPages implements blobstore.Store.
func (s *Store) ClearPages(ctx context.Context, name string, offset, length int64) error {
	if err := blobstore.CheckPageRange(offset, length); err != nil {
		return err
	}
	if length == 0 {
		return nil // Count 0 would mean "to the end of the blob" to the SDK.
	}
	_, err := s.c.NewPageBlobClient(name).ClearPages(ctx, blob.HTTPRange{Offset: offset, Count: length},
		&pageblob.ClearPagesOptions{SequenceNumberAccessConditions: seqCondition(ctx)})
	return s.fenceFailed(ctx, "clear pages", name, s.wrap("clear pages", name, err))
}

// fenceFailed returns err, or, for a Put or Clear Page that failed on its
// fence, a blobstore.FenceError naming the blob's fence (read now): the
// service's answer does not, and a fence below the writer's (not claimed
// yet) means another thing than one above it (a newer writer's).
func (s *Store) fenceFailed(ctx context.Context, op, name string, err error) error {
	n, ok := blobstore.FenceOf(ctx)
	if !ok || !errors.Is(err, blobstore.ErrFenced) {
		return err
	}
	got := int64(-1)
	if p, perr := s.c.NewBlobClient(name).GetProperties(ctx, nil); perr == nil {
		got = deref(p.BlobSequenceNumber)
	}
	return blobstore.Fenced("azure", op, name, n, got)
}

// seqCondition is the condition of a Put or Clear Page under ctx's fence
// (nil: none).
func seqCondition(ctx context.Context) *pageblob.SequenceNumberAccessConditions {
	if n, ok := blobstore.FenceOf(ctx); ok {
		return &pageblob.SequenceNumberAccessConditions{IfSequenceNumberEqualTo: &n}
	}
	return nil
}

// fenceTries bounds underFence's reads of a blob whose ETag moves under
// it while its fence stays (writes of the same writer's in flight).
const fenceTries = 4

// underFence runs do, which writes blob name, under ctx's fence if it
// carries one. The service has no sequence-number condition for these
// writes: the blob's properties are read, its fence checked, and do's
// write made conditional on the ETag read (any write, a claim included,
// changes it), or, for a create, on there being no blob.
func (s *Store) underFence(ctx context.Context, op, name string, create bool, do func(*blob.AccessConditions) error) error {
	n, ok := blobstore.FenceOf(ctx)
	if !ok {
		return s.wrap(op, name, do(nil))
	}
	for try := 1; ; try++ {
		var cond *blob.ModifiedAccessConditions
		p, err := s.c.NewBlobClient(name).GetProperties(ctx, nil)
		switch {
		case err == nil:
			// A create replaces a blob of another kind, which has no
			// fence, and an older writer's.
			got := deref(p.BlobSequenceNumber)
			if create && (got < n || kindOf(p.BlobType) != blobstore.PageBlob) {
				got = n
			}
			if got != n {
				return blobstore.Fenced("azure", op, name, n, got)
			}
			cond = &blob.ModifiedAccessConditions{IfMatch: p.ETag}
		case create && bloberror.HasCode(err, bloberror.BlobNotFound):
			cond = &blob.ModifiedAccessConditions{IfNoneMatch: to(azcore.ETagAny)}
		default:
			return s.wrap(op, name, err)
		}
		err = do(&blob.AccessConditions{ModifiedAccessConditions: cond})
		// A create whose blob went after it was read (If-Match on a
		// blob gone: not found) looks again, as after a changed ETag.
		gone := create && cond.IfMatch != nil && bloberror.HasCode(err, bloberror.BlobNotFound)
		if err == nil || !gone && !bloberror.HasCode(err, bloberror.ConditionNotMet, bloberror.BlobAlreadyExists) {
			return s.wrap(op, name, err)
		}
		if try == fenceTries {
			return fmt.Errorf("azure: %s %q under fence %d: the blob changed under each of %d tries: %w", op, name, n, try, blobstore.ErrConflict)
		}
	}
}

// ClaimPageBlob implements blobstore.Store: Set Blob Properties with
// x-ms-sequence-number-action: max.
func (s *Store) ClaimPageBlob(ctx context.Context, name string, n int64) error {
	if err := blobstore.CheckFence(name, n); err != nil {
		return fmt.Errorf("azure: claim %w", err)
	}
	resp, err := s.c.NewPageBlobClient(name).UpdateSequenceNumber(ctx, &pageblob.UpdateSequenceNumberOptions{
		ActionType: to(pageblob.SequenceNumberActionTypeMax), SequenceNumber: &n})
	if bloberror.HasCode(err, bloberror.InvalidBlobType, bloberror.InvalidOperation) {
		// Azurite says InvalidOperation of a block blob.
		return fmt.Errorf("azure: claim page blob %q: not a page blob: %w", name, blobstore.ErrInvalid)
	}
	if err != nil {
		return s.wrap("claim page blob", name, err)
	}
	if got := deref(resp.BlobSequenceNumber); got > n {
		return blobstore.Fenced("azure", "claim page blob", name, n, got)
	}
	return nil
}

func (s *Store) pageClient(name, snapshot string) (*pageblob.Client, error) {
	pb := s.c.NewPageBlobClient(name)
	if snapshot == "" {
		return pb, nil
	}
	pb, err := pb.WithSnapshot(snapshot)
	if err != nil {
		return nil, fmt.Errorf("azure: snapshot %q of %q: %w", snapshot, name, blobstore.ErrInvalid)
	}
	return pb, nil
}

// ReadPages implements blobstore.Store.
func (s *Store) ReadPages(ctx context.Context, name, snapshot string, offset int64, p []byte) error {
	if err := blobstore.CheckPageRange(offset, int64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil // Count 0 would mean "to the end of the blob" to the SDK.
	}
	pb, err := s.pageClient(name, snapshot)
	if err != nil {
		return err
	}
	resp, err := pb.DownloadStream(ctx, &blob.DownloadStreamOptions{
		Range: blob.HTTPRange{Offset: offset, Count: int64(len(p))},
	})
	if err != nil {
		return s.wrap("read pages", name, err)
	}
	defer resp.Body.Close()
	n, err := io.ReadFull(resp.Body, p)
	switch {
	case err == nil:
		return nil
	case shortRange(err, resp.ContentLength, len(p)):
		return fmt.Errorf("azure: read pages %q: range [%d, %d) beyond end of blob (%d bytes): %w",
			name, offset, offset+int64(len(p)), offset+int64(n), blobstore.ErrInvalid)
	case err == io.ErrUnexpectedEOF || err == io.EOF:
		err = cutShort(n, len(p))
	}
	return s.wrap("read pages", name, err)
}

// GetPageRanges implements blobstore.Store.
func (s *Store) GetPageRanges(ctx context.Context, name, snapshot string, offset, length int64) ([]blobstore.PageRange, error) {
	if err := blobstore.CheckPageRange(offset, length); err != nil {
		return nil, err
	}
	pb, err := s.pageClient(name, snapshot)
	if err != nil {
		return nil, err
	}
	size, err := s.pageSize(ctx, pb, name)
	if err != nil {
		return nil, err
	}
	if length == 0 {
		length = max(size-offset, 0)
	}
	// Checked here because the service silently clips out-of-range requests.
	if offset+length > size {
		return nil, fmt.Errorf("azure: page ranges of %q: [%d, %d) beyond blob size %d: %w",
			name, offset, offset+length, size, blobstore.ErrInvalid)
	}
	if length == 0 {
		return []blobstore.PageRange{}, nil
	}
	end := offset + length
	// Deliberately not the prevsnapshot diff API: Azurite answers it with 501.
	pager := pb.NewGetPageRangesPager(&pageblob.GetPageRangesOptions{
		Range: blob.HTTPRange{Offset: offset, Count: length},
	})
	out := []blobstore.PageRange{}
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, s.wrap("get page ranges", name, err)
		}
		for _, r := range page.PageRange {
			if r == nil || r.Start == nil || r.End == nil {
				continue
			}
			// End is inclusive; clip to the request.
			a, b := max(*r.Start, offset), min(*r.End+1, end)
			if a < b {
				out = append(out, blobstore.PageRange{Offset: a, Length: b - a})
			}
		}
	}
	slices.SortFunc(out, func(a, b blobstore.PageRange) int { return cmp.Compare(a.Offset, b.Offset) })
	return blobstore.CoalesceRanges(out), nil
}

func (s *Store) pageSize(ctx context.Context, pb *pageblob.Client, name string) (int64, error) {
	p, err := pb.GetProperties(ctx, nil)
	if err != nil {
		return 0, s.wrap("stat", name, err)
	}
	if kindOf(p.BlobType) != blobstore.PageBlob {
		return 0, fmt.Errorf("azure: %q is not a page blob: %w", name, blobstore.ErrInvalid)
	}
	return deref(p.ContentLength), nil
}

// ResizePageBlob implements blobstore.Store.
func (s *Store) ResizePageBlob(ctx context.Context, name string, size int64) error {
	if err := blobstore.CheckPageBlobSize(size); err != nil {
		return err
	}
	return s.underFence(ctx, "resize page blob", name, false, func(cond *blob.AccessConditions) error {
		_, err := s.c.NewPageBlobClient(name).Resize(ctx, size, &pageblob.ResizeOptions{AccessConditions: cond})
		return err
	})
}

func parseSnapshotTime(id string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, id)
	return t
}

// Snapshot implements blobstore.Store.
func (s *Store) Snapshot(ctx context.Context, name string, md blobstore.Metadata) (blobstore.SnapshotInfo, error) {
	if err := checkPut(name, md); err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	pb := s.c.NewPageBlobClient(name)
	var resp blob.CreateSnapshotResponse
	// No retries inside the SDK: a snapshot leaves the blob's ETag as it
	// was, so one after a lost reply would meet its condition and take a
	// second snapshot. blobstore.WithRetry retries (a lost reply's
	// snapshot is then the only extra one, as the contract says).
	ro := s.retry
	ro.MaxRetries = -1
	sctx := policy.WithRetryOptions(ctx, ro)
	err := s.underFence(ctx, "snapshot", name, false, func(cond *blob.AccessConditions) (err error) {
		resp, err = pb.CreateSnapshot(sctx, &blob.CreateSnapshotOptions{Metadata: toAzure(md), AccessConditions: cond})
		return err
	})
	if err != nil {
		return blobstore.SnapshotInfo{}, err
	}
	if resp.Snapshot == nil {
		return blobstore.SnapshotInfo{}, fmt.Errorf("azure: snapshot %q: service returned no snapshot id", name)
	}
	info := blobstore.SnapshotInfo{ID: *resp.Snapshot, Time: parseSnapshotTime(*resp.Snapshot), Metadata: blobstore.NormalizeMetadata(md)}
	if len(md) == 0 {
		// The service copied the blob's metadata; fetch it from the snapshot
		// itself rather than racing with SetMetadata on the live blob.
		sc, err := s.pageClient(name, info.ID)
		if err != nil {
			return blobstore.SnapshotInfo{}, err
		}
		p, err := sc.GetProperties(ctx, nil)
		if err != nil {
			return blobstore.SnapshotInfo{}, s.wrap("stat snapshot", name, err)
		}
		info.Metadata = fromAzure(p.Metadata)
	}
	return info, nil
}

// ListSnapshots implements blobstore.Store.
func (s *Store) ListSnapshots(ctx context.Context, name string) ([]blobstore.SnapshotInfo, error) {
	pager := s.c.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{
		Prefix:  &name,
		Include: container.ListBlobsInclude{Metadata: true, Snapshots: true},
	})
	out := []blobstore.SnapshotInfo{}
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, s.wrap("list snapshots", name, err)
		}
		for _, it := range page.Segment.BlobItems {
			if it == nil || deref(it.Name) != name || deref(it.Snapshot) == "" {
				continue
			}
			out = append(out, blobstore.SnapshotInfo{
				ID:       *it.Snapshot,
				Time:     parseSnapshotTime(*it.Snapshot),
				Metadata: fromAzure(it.Metadata),
			})
		}
	}
	slices.SortFunc(out, func(a, b blobstore.SnapshotInfo) int { return a.Time.Compare(b.Time) })
	return out, nil
}

// DeleteSnapshot implements blobstore.Store.
func (s *Store) DeleteSnapshot(ctx context.Context, name, snapshot string) error {
	if snapshot == "" {
		// An empty ID would address the live blob.
		return fmt.Errorf("azure: delete snapshot of %q: empty snapshot id: %w", name, blobstore.ErrInvalid)
	}
	pb, err := s.pageClient(name, snapshot)
	if err != nil {
		return err
	}
	_, err = pb.Delete(ctx, nil)
	return s.wrap("delete snapshot "+snapshot+" of", name, err)
}

// CopyFromSnapshot implements blobstore.Store, server-side or through the
// client depending on Config.Copy.
func (s *Store) CopyFromSnapshot(ctx context.Context, src, snapshot, dst string, md blobstore.Metadata) error {
	if err := checkPut(dst, md); err != nil {
		return err
	}
	if snapshot == "" {
		return fmt.Errorf("azure: copy from snapshot of %q: empty snapshot id: %w", src, blobstore.ErrInvalid)
	}
	sc, err := s.pageClient(src, snapshot)
	if err != nil {
		return err
	}
	if s.copy == CopyClient {
		return s.copyClientSide(blobstore.WithoutFence(ctx), sc, src, snapshot, dst, md)
	}
	return s.copyServerSide(ctx, sc, src, snapshot, dst, md)
}

// copyServerSide uses Copy Blob (no data passes through Lifeboat; sparse
// ranges are preserved) and polls until the asynchronous copy finishes.
func (s *Store) copyServerSide(ctx context.Context, sc *pageblob.Client, src, snapshot, dst string, md blobstore.Metadata) error {
	d := s.c.NewPageBlobClient(dst)
	resp, err := d.StartCopyFromURL(ctx, sc.URL(), &blob.StartCopyFromURLOptions{Metadata: toAzure(md)})
	if err != nil {
		return s.wrap("copy "+src+"@"+snapshot+" to", dst, err)
	}
	status, copyID := deref(resp.CopyStatus), deref(resp.CopyID)
	delay := 100 * time.Millisecond
	for status == blob.CopyStatusTypePending {
		select {
		case <-ctx.Done():
			// Do not leave a half-copied blob behind.
			_, _ = d.AbortCopyFromURL(context.WithoutCancel(ctx), copyID, nil)
			return fmt.Errorf("azure: copy to %q: %w", dst, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
		p, err := d.GetProperties(ctx, nil)
		if err != nil {
			return s.wrap("poll copy to", dst, err)
		}
		if deref(p.CopyID) != copyID {
			return fmt.Errorf("azure: copy to %q: superseded by another copy", dst)
		}
		status = deref(p.CopyStatus)
		if status != blob.CopyStatusTypePending && status != blob.CopyStatusTypeSuccess {
			return fmt.Errorf("azure: copy %s@%s to %q: status %s: %s", src, snapshot, dst, status, deref(p.CopyStatusDescription))
		}
	}
	if status != blob.CopyStatusTypeSuccess {
		return fmt.Errorf("azure: copy %s@%s to %q: status %q", src, snapshot, dst, status)
	}
	return nil
}

// copyClientSide copies only the snapshot's valid ranges, so a sparse disk
// costs what it holds, in MaxPutPage chunks through one reused buffer.
func (s *Store) copyClientSide(ctx context.Context, sc *pageblob.Client, src, snapshot, dst string, md blobstore.Metadata) error {
	p, err := sc.GetProperties(ctx, nil)
	if err != nil {
		return s.wrap("stat snapshot "+snapshot+" of", src, err)
	}
	if kindOf(p.BlobType) != blobstore.PageBlob {
		return fmt.Errorf("azure: copy from %q: not a page blob: %w", src, blobstore.ErrInvalid)
	}
	if len(md) == 0 {
		md = fromAzure(p.Metadata)
	}
	size := deref(p.ContentLength)
	ranges, err := s.GetPageRanges(ctx, src, snapshot, 0, 0)
	if err != nil {
		return err
	}
	if err := s.CreatePageBlob(ctx, dst, size, md); err != nil {
		return err
	}
	var buf []byte
	for _, r := range ranges {
		for off := r.Offset; off < r.End(); {
			n := min(r.End()-off, blobstore.MaxPutPage)
			if buf == nil {
				buf = make([]byte, blobstore.MaxPutPage)
			}
			if err := s.ReadPages(ctx, src, snapshot, off, buf[:n]); err != nil {
				return fmt.Errorf("azure: copy %s@%s to %q: %w", src, snapshot, dst, err)
			}
			if err := s.WritePages(ctx, dst, off, buf[:n]); err != nil {
				return fmt.Errorf("azure: copy %s@%s to %q: %w", src, snapshot, dst, err)
			}
			off += n
		}
	}
	return nil
}

// validAccountName reports whether name can be a storage account's name
// (3 to 24 lower-case letters and digits), so that an error may quote it.
func validAccountName(name string) bool {
	if len(name) < 3 || len(name) > 24 {
		return false
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

// loopback reports whether host names this machine (an emulator here).
func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
