package processserver

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// holdFirstSegment holds the upload of the machine's first journal
// segment until released, and reports each segment upload that ends.
type holdFirstSegment struct {
	blobstore.Store
	release chan struct{}
	mu      sync.Mutex
	ended   []string
}

func (h *holdFirstSegment) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	_, err := h.put(ctx, name, func() (string, error) { return "", h.Store.PutBlob(ctx, name, data, md) })
	return err
}

// PutBlobIf: segments are uploaded under names no blob holds yet.
func (h *holdFirstSegment) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	return h.put(ctx, name, func() (string, error) { return h.Store.PutBlobIf(ctx, name, data, md, match) })
}

func (h *holdFirstSegment) put(ctx context.Context, name string, put func() (string, error)) (string, error) {
	journal := strings.HasPrefix(name, layout.JournalPrefix("m1"))
	if first, _, err := layout.ParseSegmentName(name); journal && err == nil && first == 1 {
		select {
		case <-h.release:
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	etag, err := put()
	if err == nil && journal {
		h.mu.Lock()
		h.ended = append(h.ended, name)
		h.mu.Unlock()
	}
	return etag, err
}

func (h *holdFirstSegment) uploaded() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.ended...)
}

// A segment cut while an earlier one is still being uploaded is uploaded
// at once, not after it; durable_seq still waits for the earlier one, and
// the journal ends up holding every frame in order.
func TestUploadsDoNotWaitForEarlierOnes(t *testing.T) {
	h := &holdFirstSegment{Store: azureStore(t), release: make(chan struct{})}
	e := newEnv(t, h, 3)
	e.segBytes = 64 << 10
	e.segAge = time.Hour
	s := e.start()

	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	t0 := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	last := a.batch(1, 20) // 80 KiB: cut on size, its upload held
	a.marker(last, wire.MarkerTime, t0)
	a.waitAck(last)
	time.Sleep(100 * time.Millisecond) // the held upload has started
	last = a.batch(21, 20)
	a.waitAck(last)
	second := layout.SegmentName("m1", 21, 40)
	eventually(t, 20*time.Second, "upload of the second segment while the first is held", func() bool {
		return len(h.uploaded()) == 1 && h.uploaded()[0] == second
	})
	time.Sleep(200 * time.Millisecond) // room for a manifest write it must not make
	if d := durableSeq(t, h, "m1"); d != 0 {
		t.Fatalf("durable_seq %d while the first segment is not in the journal, want 0", d)
	}
	last = a.batch(41, 3)
	a.marker(last, wire.MarkerCrashConsistent, t0.Add(time.Second)) // cut on marker
	a.waitAck(last)
	want := bytes.Clone(a.sent)
	close(h.release)

	eventually(t, 20*time.Second, "upload of seq 43", func() bool { return durableSeq(t, h, "m1") >= 43 })
	plain, infos, man := journal(t, h, e.rk, "m1")
	if !bytes.Equal(plain, want) {
		t.Fatalf("journal holds %d bytes, want exactly the %d bytes of frames sent", len(plain), len(want))
	}
	if len(infos) != 3 || man.DurableSeq != 43 {
		t.Fatalf("%d segments, durable_seq %d: want 3 and 43", len(infos), man.DurableSeq)
	}
}

// Segments whose uploads an outage failed together are retried together:
// once the account is back, no step fails on an error from the outage (in
// uploadLoop each would cost a backoff, doubled every time).
func TestUploadsFailedTogetherRetryTogether(t *testing.T) {
	f := blobstoretest.NewFaulty(mem.New())
	r := newGapRig(t, f)
	for i := range uint64(4) {
		r.put(10*i+1, 10*i+10)
	}
	f.FailFor(time.Hour)
	notified := false
	ctx := context.Background()
	for range 3 {
		if _, err := r.m.uploadStep(ctx, &notified); err == nil {
			t.Fatal("an upload step succeeded with the account down")
		}
	}
	f.FailFor(0)
	for i := 0; r.manifest().DurableSeq < 40; i++ {
		if i == 4 {
			t.Fatalf("durable_seq %d after 4 steps, want 40", r.manifest().DurableSeq)
		}
		if _, err := r.m.uploadStep(ctx, &notified); err != nil {
			t.Fatalf("step %d with the account back: %v", i+1, err)
		}
	}
}

// stallStore is an account that has gone dark: every call waits until its
// context ends (as the retry layer would keep retrying for many minutes).
type stallStore struct {
	blobstore.Store
	stalled chan struct{} // closed at the first stalled call
	once    sync.Once
}

func (s *stallStore) stall(ctx context.Context) error {
	s.once.Do(func() { close(s.stalled) })
	<-ctx.Done()
	return ctx.Err()
}

func (s *stallStore) GetBlob(ctx context.Context, name string) ([]byte, error) {
	return nil, s.stall(ctx)
}

func (s *stallStore) ListBlobs(ctx context.Context, prefix string) ([]blobstore.BlobInfo, error) {
	return nil, s.stall(ctx)
}

func (s *stallStore) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	return s.stall(ctx)
}

func (s *stallStore) Stat(ctx context.Context, name string) (blobstore.BlobInfo, error) {
	return blobstore.BlobInfo{}, s.stall(ctx)
}

func (s *stallStore) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	return "", s.stall(ctx)
}

// Close returns promptly while an agent's hello waits on a dead account:
// the work of sessions and uploaders is cancelled before Close waits for
// the connections (before, it waited for the hello's own time-out, or for
// an uploader's retries when the hello waited on the manifest lock).
func TestCloseDuringOutage(t *testing.T) {
	st := &stallStore{Store: mem.New(), stalled: make(chan struct{})}
	e := newEnv(t, st, 3)
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{disk0}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-st.stalled:
	case <-time.After(20 * time.Second):
		t.Fatal("the hello never reached the account")
	}
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waiting 10 s after it was called, with a hello stalled on the account")
	}
}

// Close also ends a connection whose session registers after Close
// looked for sessions to abort (its hello sent once Close began): the
// hello is not answered, and Close returns while the agent goes on
// sending (before, the session streamed and acked on, its timer gone
// with the server's context, and Close waited as long as the agent
// talked).
func TestCloseEndsSessionRegisteredLate(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 50 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0)
	a.waitAck(a.batch(1, 4))
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, store, "m1") == 4 })
	a.conn.Close()
	eventually(t, 10*time.Second, "the first session gone", func() bool { return s.known("m1").current() == nil })
	b := dialAgent(t, e, s, "m1") // its handshake done, its hello not sent
	time.Sleep(300 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	<-s.ctx.Done()
	if err := b.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1",
		Disks: []wire.DiskState{{Name: disk0.Name, Size: disk0.Size, Generation: ack.Disks[0].Generation, LastAckedSeq: 4}}}); err == nil {
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
			select {
			case f, ok := <-b.frames:
				if ok && f.typ == wire.TypeHelloAck {
					t.Fatal("a hello sent after Close began was answered")
				}
			case <-done:
				return
			case <-time.After(100 * time.Millisecond):
				b.w.WriteMarker(wire.Marker{Seq: 4, Kind: wire.MarkerTime, UnixNano: time.Now().UnixNano()})
			}
		}
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waiting 10 s after it was called, with a session registered after it began")
	}
}

// refuseJournal is an account that refuses journal segments for good (a
// policy or permission problem, not an outage).
type refuseJournal struct{ blobstore.Store }

func (r refuseJournal) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if strings.HasPrefix(name, layout.JournalPrefix("m1")) {
		return blobstore.Permanent(errors.New("AuthorizationPermissionMismatch (HTTP 403)"))
	}
	return r.Store.PutBlob(ctx, name, data, md)
}

func (r refuseJournal) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if strings.HasPrefix(name, layout.JournalPrefix("m1")) {
		return "", blobstore.Permanent(errors.New("AuthorizationPermissionMismatch (HTTP 403)"))
	}
	return r.Store.PutBlobIf(ctx, name, data, md, match)
}

// An upload the account refuses for good is still retried (the cache keeps
// the data), but the log says it needs someone to act, not that it will
// pass by itself; nothing reaches durable_seq.
func TestPermanentUploadFailureSaysSo(t *testing.T) {
	store := refuseJournal{mem.New()}
	e := newEnv(t, store, 3)
	e.segBytes = 64 << 10
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	last := a.batch(1, 20)
	a.waitAck(last)
	eventually(t, 20*time.Second, "the refusal logged as needing attention", func() bool {
		return strings.Contains(e.logs.String(), "upload refused by the storage account")
	})
	if d := durableSeq(t, store, "m1"); d != 0 {
		t.Fatalf("durable_seq %d with every journal upload refused, want 0", d)
	}
}

// downAtFirst is an account that does not answer until up is closed.
type downAtFirst struct {
	blobstore.Store
	up chan struct{}
}

func (d *downAtFirst) check() error {
	select {
	case <-d.up:
		return nil
	default:
		return errors.New("dial tcp: connection refused")
	}
}

func (d *downAtFirst) EnsureContainer(ctx context.Context) error {
	if err := d.check(); err != nil {
		return err
	}
	return d.Store.EnsureContainer(ctx)
}

func (d *downAtFirst) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if err := d.check(); err != nil {
		return err
	}
	return d.Store.PutBlob(ctx, name, data, md)
}

func (d *downAtFirst) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if err := d.check(); err != nil {
		return "", err
	}
	return d.Store.PutBlobIf(ctx, name, data, md, match)
}

func (d *downAtFirst) Stat(ctx context.Context, name string) (blobstore.BlobInfo, error) {
	if err := d.check(); err != nil {
		return blobstore.BlobInfo{}, err
	}
	return d.Store.Stat(ctx, name)
}

func (d *downAtFirst) GetBlob(ctx context.Context, name string) ([]byte, error) {
	if err := d.check(); err != nil {
		return nil, err
	}
	return d.Store.GetBlob(ctx, name)
}

// A process server first started while the account is down (its container
// not created yet) creates the container once the account is back, and
// the journal then fills: before, every write found ContainerNotFound
// until a restart.
func TestContainerCreatedWhenAccountComesBack(t *testing.T) {
	store := &downAtFirst{Store: mem.New(), up: make(chan struct{})}
	e := newEnv(t, store, 3)
	s := e.start()
	close(store.up)
	eventually(t, 10*time.Second, "the container created", func() bool {
		return strings.Contains(e.logs.String(), "container ready")
	})
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	last := a.batch(1, 20)
	a.marker(last, wire.MarkerCrashConsistent, time.Now())
	a.waitAck(last)
	eventually(t, 30*time.Second, "the journal to hold the records", func() bool {
		return durableSeq(t, store.Store, "m1") == last
	})
}
