package blobstore

import (
	"context"
	"errors"
	"testing"
	"time"
)

// flakyPut fails its first fails PutBlob calls, after the body was sent.
type flakyPut struct {
	Store
	fails, calls int
}

func (f *flakyPut) PutBlob(context.Context, string, []byte, Metadata) error {
	f.calls++
	if f.fails > 0 {
		f.fails--
		return errors.New("connection reset after the body")
	}
	return nil
}

// Each resend of an upload is charged to the write limit above the
// retries: the bytes of a try that failed mid-body did flow, and a limit
// meant to spare a WAN must hold exactly when the link struggles.
func TestWriteLimitChargesResends(t *testing.T) {
	f := &flakyPut{fails: 3}
	s := Stack(f, StackConfig{
		Retry:            RetryConfig{InitialInterval: time.Millisecond, MaxInterval: time.Millisecond, Jitter: -1},
		WriteBytesPerSec: 1 << 20,
		WriteBurst:       4 << 20,
	})
	if err := s.PutBlob(context.Background(), "seg", make([]byte, 1<<20), nil); err != nil || f.calls != 4 {
		t.Fatalf("PutBlob: %v after %d calls, want success on the 4th", err, f.calls)
	}
	// Four sends of 1 MiB from a 4 MiB bucket: about empty (it refills
	// at 1 MiB/s meanwhile).
	if left := s.(*limitStore).lim.Tokens(); left > 1.5*(1<<20) {
		t.Fatalf("%.0f bytes left in the bucket after four sends of 1 MiB, want about none", left)
	}
}
