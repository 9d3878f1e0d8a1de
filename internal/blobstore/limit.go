package blobstore

import (
	"context"
	"fmt"
	"time"

	"golang.org/x/time/rate"
)

// WithWriteLimit returns s with the bytes it uploads (PutBlob, PutBlobIf, WritePages)
// limited to bytesPerSec on average by a token bucket of burst bytes
// (default MaxPutPage). bytesPerSec <= 0 means unlimited.
//
// WritePages is split into requests of at most min(burst, MaxPutPage)
// bytes, each admitted by the bucket just before it is sent, so a large
// write is paced rather than sent in one burst after a long wait, and a
// decorator below (WithRetry in Stack) retries a failed chunk alone.
// Reads, metadata operations and server-side copies are not limited.
func WithWriteLimit(s Store, bytesPerSec float64, burst int) Store {
	if burst <= 0 {
		burst = MaxPutPage
	}
	burst = max(burst, PageSize)
	lim := rate.NewLimiter(rate.Inf, burst)
	if bytesPerSec > 0 {
		lim = rate.NewLimiter(rate.Limit(bytesPerSec), burst)
	}
	chunk := min(burst, MaxPutPage) / PageSize * PageSize
	return &limitStore{Store: s, lim: lim, chunk: chunk}
}

type limitStore struct {
	Store // pass-through for everything but uploads
	lim   *rate.Limiter
	chunk int
}

// Unmetered marks ctx's uploads as control writes (manifests, point
// records, data keys: small and few): a write limit sends them at once
// and charges them to its bucket all the same (the writes after them wait
// for it). Queued behind the segments being drained, a manifest write
// would hold recoverable_until back for as long, and fail a hello whose
// deadline the queue outlasts.
func Unmetered(ctx context.Context) context.Context {
	return context.WithValue(ctx, unmeteredKey{}, true)
}

type unmeteredKey struct{}

// resendKey holds, in the context of an upload a write limit admitted,
// how to charge a resend of n of its bytes (chargeResend).
type resendKey struct{}

// chargeResend takes n more bytes from the write limit that admitted the
// upload ctx belongs to, if any: a retry below it sends the bytes again,
// and on a link that failed mid-body (a timeout, a checksum mismatch, a
// lost reply) they did flow the first time.
func chargeResend(ctx context.Context, n int) error {
	if f, ok := ctx.Value(resendKey{}).(func(int) error); ok {
		return f(n)
	}
	return nil
}

// waitBlob is wait for a blob upload of n bytes, at once for an
// Unmetered one. (Not for Put Page: the applier's many small pages are
// the bulk of a replica's traffic.)
func (l *limitStore) waitBlob(ctx context.Context, n int) error {
	if ctx.Value(unmeteredKey{}) != nil {
		if r := l.lim.ReserveN(time.Now(), n); r.OK() {
			return nil
		}
		// More than the burst: paced as any write.
	}
	return l.wait(ctx, n)
}

// wait takes n tokens, in pieces no larger than the burst (WaitN rejects more).
func (l *limitStore) wait(ctx context.Context, n int) error {
	for n > 0 {
		k := min(n, l.lim.Burst())
		if err := l.lim.WaitN(ctx, k); err != nil {
			return fmt.Errorf("blobstore: bandwidth limiter: %w", err)
		}
		n -= k
	}
	return nil
}

func (l *limitStore) PutBlob(ctx context.Context, name string, data []byte, md Metadata) error {
	if err := l.waitBlob(ctx, len(data)); err != nil {
		return err
	}
	return l.Store.PutBlob(l.resends(ctx, l.waitBlob), name, data, md)
}

func (l *limitStore) PutBlobIf(ctx context.Context, name string, data []byte, md Metadata, match string) (string, error) {
	if err := l.waitBlob(ctx, len(data)); err != nil {
		return "", err
	}
	return l.Store.PutBlobIf(l.resends(ctx, l.waitBlob), name, data, md, match)
}

// resends returns ctx telling the decorators below how to charge a
// resend (chargeResend): as wait does.
func (l *limitStore) resends(ctx context.Context, wait func(context.Context, int) error) context.Context {
	return context.WithValue(ctx, resendKey{}, func(n int) error { return wait(ctx, n) })
}

func (l *limitStore) WritePages(ctx context.Context, name string, offset int64, data []byte) error {
	if err := CheckPageRange(offset, int64(len(data))); err != nil {
		return err
	}
	rctx := l.resends(ctx, l.wait)
	for len(data) > 0 {
		n := min(len(data), l.chunk)
		if err := l.wait(ctx, n); err != nil {
			return err
		}
		if err := l.Store.WritePages(rctx, name, offset, data[:n]); err != nil {
			return err
		}
		data, offset = data[n:], offset+int64(n)
	}
	return nil
}
