package processserver

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/stage"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// Backoff of the uploader after a failed step (variables for the tests).
var (
	uploadRetryMin = 500 * time.Millisecond
	uploadRetryMax = 30 * time.Second
)

// uploadParallel is how many segments of one machine are uploaded at
// once. One at a time left the journal waiting on each round trip;
// durable_seq still advances only over a contiguous prefix. A segment
// starts as soon as it is cut and a slot is free, not when the uploads
// before it have all ended: waiting for the slowest of a batch held the
// next segment back by up to one upload, which RPO under load paid for.
const uploadParallel = 4

// runUploader uploads the machine's cached segments in sequence order,
// forever: a failure (the store decorator already retried) is logged and
// retried with backoff while the cache keeps absorbing the stream.
func (m *machine) runUploader(ctx context.Context) {
	stage.Do(ctx, stage.Upload, m.uploadLoop)
}

func (m *machine) uploadLoop(ctx context.Context) {
	defer m.upWG.Wait() // no store call outlives the server
	wait := uploadRetryMin
	notified, parked := false, false
	for {
		for ctx.Err() == nil {
			if m.isFenced() {
				// Nothing more of it goes to the account until a hello
				// here claims the machine back; the cache keeps it. The
				// uploads under way end first (claim waits for them).
				m.endUploads()
				m.setParked(true)
				if !parked {
					parked = true
					m.log.Warn("uploads of the machine stopped: this process server no longer serves it, until its agent says hello here")
				}
				select { // claim kicks
				case <-m.wake:
				case <-ctx.Done():
				}
				continue
			}
			parked = false
			m.setParked(false)
			did, err := m.uploadStep(ctx, &notified)
			m.uploadFailing.Store(err != nil && ctx.Err() == nil && !errors.Is(err, errFenced))
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				if errors.Is(err, errFenced) {
					continue
				}
				var dnsErr *net.DNSError
				if m.nothingToUpload() && !blobstore.IsPermanent(err) && !errors.Is(err, recovery.ErrTampered) {
					// Nothing of it to upload (a machine known from its
					// stream directory): every one of them logging each
					// retry of an outage would drown the log.
					m.log.Debug("reading the manifest failed; will retry", logErr, err, logWait, wait)
				} else if errors.As(err, &dnsErr) {
					m.log.Error("upload failed: the storage account's host name does not resolve (a resolver not up yet, or a mistyped account); retrying, the cache keeps the data",
						logErr, err, logWait, wait)
				} else if blobstore.IsPermanent(err) {
					// Retrying will not help until someone acts (a key,
					// a permission, a policy on the account): say so.
					m.log.Error("upload refused by the storage account; retrying, but it needs attention (permissions, keys, account policy); the cache keeps the data, and RPO grows until it is fixed",
						logErr, err, logWait, wait)
				} else {
					m.log.Error("upload failed; will retry, the cache keeps the data", logErr, err, logWait, wait)
				}
				if !m.backoff(ctx, wait) {
					return
				}
				wait = min(2*wait, uploadRetryMax)
				continue
			}
			wait = uploadRetryMin
			if !did {
				break
			}
		}
		select {
		case <-m.wake:
		case <-ctx.Done():
			return
		}
	}
}

// backoff waits d after a failed step, or less once the machine is fenced
// (a claim waits for the uploader to park). It reports false once ctx is
// done. A kick taken meanwhile is not lost: the next step sees its work.
func (m *machine) backoff(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return true
		case <-m.wake:
			if m.isFenced() {
				return true
			}
		case <-ctx.Done():
			return false
		}
	}
}

// nothingToUpload reports whether the machine has nothing cached to upload and no
// agent connected.
func (m *machine) nothingToUpload() bool {
	m.mu.Lock()
	n := len(m.segs)
	m.mu.Unlock()
	return n == 0 && m.current() == nil
}

// endUploads waits for the uploads under way and forgets them: the
// machine is fenced, and what they did is done again, or not, once a
// claim has settled which cached segments still count.
func (m *machine) endUploads() {
	m.awaitUploads()
	m.mu.Lock()
	m.ups = nil
	m.mu.Unlock()
}

// awaitUploads waits until every upload under way has ended (uploader
// only).
func (m *machine) awaitUploads() {
	for _, u := range m.ups { // the uploader's own: no lock
		for !u.done {
			(<-m.upDone).done = true
		}
	}
}

// upload is one segment's upload, from its start to its publication.
type upload struct {
	e       *segEntry
	meta    segMeta
	already bool // in the journal already (uploaded before a restart)
	err     error
	done    bool // ended (uploader's goroutine only)
}

// startUploads starts the oldest segments not uploaded nor being
// uploaded, while fewer than uploadParallel are under way.
func (m *machine) startUploads(ctx context.Context) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fenced {
		return // nothing more goes to the account from here
	}
	for _, e := range m.segs {
		if len(m.ups) == uploadParallel {
			return
		}
		if e.suspect {
			return // unsettled: it and those after it wait (settleSuspects)
		}
		// By id: a segment resent under the same name waits for the
		// upload of the copy it replaced, or the two would race.
		if e.uploaded || slices.ContainsFunc(m.ups, func(u *upload) bool { return u.e.id == e.id }) {
			continue
		}
		u := &upload{e: e}
		m.ups = append(m.ups, u)
		m.upWG.Go(func() {
			m.uploadOne(ctx, u)
			m.upDone <- u // never blocks: at most uploadParallel under way
		})
	}
}

// headUpload returns the first segment not uploaded and its upload, if
// one is under way or ended; it drops the uploads of segments that are
// gone from the list (replaced by a resend under the same name).
func (m *machine) headUpload() (*segEntry, *upload) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ups = slices.DeleteFunc(m.ups, func(u *upload) bool {
		return u.done && !slices.Contains(m.segs, u.e)
	})
	for _, e := range m.segs {
		if e.uploaded {
			continue
		}
		if e.suspect {
			return nil, nil // unsettled (settleSuspects)
		}
		for _, u := range m.ups {
			if u.e == e {
				return e, u
			}
		}
		return e, nil
	}
	return nil, nil
}

// uploadStep does one unit of work: drop applied segments, then upload
// the oldest segments not yet uploaded (up to uploadParallel at once) and
// publish those that ended, in order, once the oldest has; or else
// advance recoverable_until from a marker. It reports whether it
// published something (or settled a lost segment).
func (m *machine) uploadStep(ctx context.Context, notified *bool) (bool, error) {
	if err := m.ensureLoaded(ctx); err != nil {
		return false, err
	}
	if m.isFenced() { // by the manifest just loaded (another server's)
		return false, errFenced
	}
	if !*notified {
		// After a restart the applier may be behind what is uploaded.
		*notified = true
		m.mu.Lock()
		up, ap := m.uploaded, m.applied
		m.mu.Unlock()
		if m.s.applier != nil && up > ap {
			m.s.applier.Notify(m.name, up)
		}
	}
	// A suspect that cannot be read now (a cache disk failing reads) is
	// settled later; the segments before it go up meanwhile.
	settleErr := m.settleSuspects(ctx)
	if settleErr != nil && !errors.Is(settleErr, cache.ErrUnavailable) {
		return false, settleErr
	}
	if err := m.dropApplied(ctx); err != nil {
		return false, err
	}

	// Wait for the oldest segment's upload to end, starting segments as
	// they are cut (wake) and collecting the later ones that end first.
	for {
		if m.isFenced() {
			return false, errFenced // the loop parks (uploads under way end first)
		}
		m.startUploads(ctx)
		head, hu := m.headUpload()
		if head == nil && settleErr != nil {
			return false, settleErr
		}
		if head == nil {
			return false, m.advanceFromMarker(ctx)
		}
		if hu != nil && hu.done {
			break
		}
		select {
		case u := <-m.upDone:
			u.done = true
		case <-m.wake:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
	for {
		select {
		case u := <-m.upDone:
			u.done = true
			continue
		default:
		}
		break
	}
	if done, err := m.checkChain(ctx); err != nil || done {
		return done, err
	}

	// Publish the contiguous prefix that made it; the rest is retried.
	// The manifest's change and its write hold manMu (see writeManifest).
	var last segMeta
	var failed *upload
	published := 0
	m.manMu.Lock()
	m.mu.Lock()
	for _, e := range m.segs {
		if e.uploaded {
			continue
		}
		i := slices.IndexFunc(m.ups, func(u *upload) bool { return u.e == e })
		if i < 0 || !m.ups[i].done {
			break
		}
		u := m.ups[i]
		if u.err == nil && !u.already && u.meta.prev > m.uploaded {
			// A segment before it is gone (every shard of it lost while
			// the server was down): not published over; the next step's
			// checkChain records the loss first.
			break
		}
		m.ups = slices.Delete(m.ups, i, i+1)
		if u.err != nil {
			failed = u
			break
		}
		published++
		u.e.uploaded = true
		m.backlog -= u.e.size
		if !u.already {
			m.uploaded = max(m.uploaded, u.meta.last)
			if u.meta.last > m.man.DurableSeq {
				m.man.DurableSeq, m.man.LastRun = u.meta.last, runHex(u.meta.run)
			}
			m.mendLocked()
			// While a gap is open, writes before the segment's markers
			// may be missing: recoverable_until stays where it was; so it
			// does for a marker inside a mended gap (its records were
			// lost).
			if u.meta.lastTime > 0 && !m.man.HasOpenGap() && !m.markInGapLocked(u.meta) {
				if t := time.Unix(0, u.meta.lastTime).UTC(); t.After(m.man.RecoverableUntil) {
					m.man.RecoverableUntil = t
				}
			}
			last = u.meta
		}
	}
	m.mu.Unlock()
	var werr error
	if last.last > 0 {
		werr = m.writeLocked(ctx)
	}
	m.manMu.Unlock()
	if failed != nil {
		// Those that fail with it (an outage) are retried with it, after
		// one backoff, not one backoff each in turn.
		m.awaitUploads()
		m.mu.Lock()
		m.ups = slices.DeleteFunc(m.ups, func(u *upload) bool { return u.err != nil })
		m.mu.Unlock()
	}
	if last.last > 0 {
		if werr != nil {
			return false, werr
		}
		if m.s.applier != nil {
			m.s.applier.Notify(m.name, last.last)
		}
	}
	if failed != nil && errors.Is(failed.err, errSegmentLost) {
		// Every segment before it is in the journal: it was the oldest.
		if err := m.segmentLost(ctx, failed.e, failed.err); err != nil {
			return published > 0, err
		}
		return true, nil
	}
	if sess := m.current(); sess != nil {
		sess.poke() // not waiting for the agent's socket
	}
	if failed != nil {
		return published > 0, failed.err
	}
	return true, nil
}

// checkChain checks that the oldest segment to publish follows the
// journal's end: its header says where the segment before it ended. A
// segment between them that is in neither the cache nor the manifest
// (every shard of it gone while the server was down) is a loss, recorded
// as a segment found lost is (segmentLost: adopted if the journal holds
// it, else a gap and a tombstone, and the agent resyncs). It reports
// whether it settled one.
func (m *machine) checkChain(ctx context.Context) (bool, error) {
	_, head := m.headUpload()
	if head == nil || !head.done || head.err != nil || head.already {
		return false, nil
	}
	m.mu.Lock()
	up := m.uploaded
	m.mu.Unlock()
	if head.meta.prev <= up {
		return false, nil
	}
	// Even where a gap holds the range: its tombstone may not have been
	// written (recorded again, the gap is merged and a tombstone there
	// adopted).
	missing := &segEntry{id: cache.SegmentID{Stream: m.name, Seq: up + 1}, last: head.meta.prev}
	err := m.segmentLost(ctx, missing, fmt.Errorf("segment %s follows one ending at %d, but the journal ends at %d and the cache holds nothing between", head.e.id, head.meta.prev, up))
	return err == nil, err
}

// markInGapLocked reports whether the marker that dates segment meta is
// in a gap of the manifest. For a segment cached without its marker's
// sequence, the record before its first stands for it.
func (m *machine) markInGapLocked(meta segMeta) bool {
	seq := meta.markSeq
	if seq == 0 {
		seq = meta.first - 1
	}
	_, gap := m.man.GapAt(seq)
	return gap
}

// inJournal reports whether the segment starting at seq is in the
// journal: segments do not overlap, so one that starts at or before
// durable_seq ends there too. Its cached copy is then only a convenience
// (the applier reads the journal when it is gone).
func (m *machine) inJournal(seq uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return seq <= m.uploaded
}

// settleSuspects settles, in order, the unreadable segments found at start
// after the newest readable one (scanCache), before the machine's first
// hello and before any upload: a resend under the same names must not
// meet them unsettled. A suspect is most likely what a crash left of a
// store never acknowledged. Readable after all (a cache disk back), it is
// a segment like any other; in the journal already (its upload done, the
// manifest write lost to the crash), it is kept, for the uploader to adopt
// in its turn; unreadable only for now (cache.ErrUnavailable: disks
// failing reads or not mounted), it is kept and settleSuspects fails, so
// the hello and the uploads wait and try again; otherwise it and
// every suspect after it are left out and deleted from the cache (kept,
// one would come back at the next restart as a segment after a hole),
// and no gap is recorded here, since had they
// been acknowledged, the agent's hello reports acks past durable and
// agree records the loss.
func (m *machine) settleSuspects(ctx context.Context) error {
	m.settleMu.Lock()
	defer m.settleMu.Unlock()
	for {
		m.mu.Lock()
		var e *segEntry
		for _, x := range m.segs {
			if x.suspect {
				e = x
				break
			}
		}
		key := m.key
		m.mu.Unlock()
		if e == nil {
			return nil
		}
		data, getErr := m.s.cache.Get(e.id)
		err := getErr
		if err == nil {
			var meta segMeta
			if meta, _, err = parseCached(data); err == nil && meta.first == e.id.Seq {
				m.mu.Lock()
				e.suspect, e.last = false, meta.last
				if meta.last > m.durable {
					m.durable, m.lastRun = meta.last, meta.run
				}
				m.mu.Unlock()
				continue
			}
		}
		if m.inJournal(e.id.Seq) {
			m.mu.Lock()
			e.suspect = false // uploadOne drops it as remains
			m.mu.Unlock()
			continue
		}
		if key != nil {
			last, ok, aerr := m.inAccount(ctx, key, e)
			if aerr != nil {
				return fmt.Errorf("cached segment %s unreadable; looking for it in the journal: %w", e.id, aerr)
			}
			if ok {
				// The uploader meets it unreadable in its turn and
				// adopts it then (adopt, or segmentLost), in order. Its end is
				// the predecessor of the next suspect's copy.
				m.mu.Lock()
				e.suspect, e.last = false, last
				if last > m.durable {
					m.durable, m.lastRun = last, wire.RunID{} // who sent it: unknown
				}
				m.mu.Unlock()
				continue
			}
		}
		if getErr != nil && !lostFromCache(getErr) {
			// Not known to be gone (cache disks failing reads or not
			// mounted): left out, an acknowledged segment would be
			// recorded lost at the hello. Settled when it can be read.
			return fmt.Errorf("cached segment %s %s; kept, and settled once it can be read: %w", e.id, unreadableNow, getErr)
		}
		m.log.Warn("leaving out an unreadable cached segment newer than every readable one, and any after it (a store a crash interrupted; a loss, if the agent had it acknowledged, is recorded at its hello)",
			logSegment, e.id.String(), logErr, err)
		m.mu.Lock()
		var out []cache.SegmentID
		m.segs = slices.DeleteFunc(m.segs, func(x *segEntry) bool {
			if x.suspect && x.id.Seq >= e.id.Seq {
				out = append(out, x.id)
				return true
			}
			return false
		})
		m.mu.Unlock()
		// Out of the cache too: the agent resends or resyncs what they
		// held, and one kept would come back at the next restart (its
		// disk back, its missing shards found) as a segment with a hole
		// before it.
		for _, id := range out {
			if err := m.s.cache.Delete(id); err != nil {
				m.log.Warn("cannot delete a cached segment left out; the next restart leaves it out again", logSegment, id.String(), logErr, err)
			}
		}
		return nil
	}
}

// remains reports whether u's unreadable cached copy (err) is of a
// segment the journal holds: what a crash left of a segment being deleted
// once applied (dropApplied), or a copy lost after its upload. Nothing is
// lost then; u is marked as uploaded already.
func (m *machine) remains(u *upload, err error) bool {
	if !m.inJournal(u.e.id.Seq) {
		return false
	}
	m.log.Info("dropping the unreadable cached copy of a segment already in the journal", logSegment, u.e.id.String(), logErr, err)
	u.already = true
	return true
}

// adopt reports whether the journal holds u's segment, which the cache
// cannot read now, although the manifest does not say so (a crash between
// its upload and the manifest write): u then publishes it as uploaded.
func (m *machine) adopt(ctx context.Context, u *upload) bool {
	m.mu.Lock()
	key := m.key
	m.mu.Unlock()
	last, ok, err := m.inAccount(ctx, key, u.e)
	if err != nil || !ok {
		return false
	}
	m.log.Info("the cached copy cannot be read now but the journal holds the segment: adopting it", logSegment, u.e.id.String())
	m.mu.Lock()
	u.e.last = last
	m.mu.Unlock()
	u.meta = segMeta{first: u.e.id.Seq, last: last}
	return true
}

// unreadableNow says why a cached segment waits.
const unreadableNow = "cannot be read now (cache disks failing reads or not mounted)"

// errSegmentLost marks a cached segment that can no longer be read.
var errSegmentLost = errors.New("cached segment lost")

// lostFromCache reports whether a cache read error says the segment is
// gone: not found, or too many shards missing or corrupt. Any other error
// (cache.ErrUnavailable: disks failing reads or not mounted) may pass.
func lostFromCache(err error) bool {
	return errors.Is(err, cache.ErrUnrecoverable) || errors.Is(err, cache.ErrNotFound)
}

// uploadOne puts u's sealed segment in the journal: from memory while it
// is still there, else read back from the cache.
func (m *machine) uploadOne(ctx context.Context, u *upload) {
	m.mu.Lock()
	h := u.e.hot.acquire()
	m.mu.Unlock()
	defer h.release()
	var data []byte
	var err error
	if h != nil {
		data = h.b
	} else {
		release, werr := m.s.acquireCold(ctx)
		if werr != nil {
			u.err = werr
			return
		}
		defer release() // data is read until the upload ends
		stage.Do(ctx, stage.Prepare, func(context.Context) { data, err = m.s.cache.Get(u.e.id) })
	}
	if err != nil {
		switch {
		case lostFromCache(err):
			if !m.remains(u, err) {
				u.err = fmt.Errorf("%w: %w", errSegmentLost, err)
			}
		case errors.Is(err, cache.ErrUnavailable):
			// A cache disk failing reads or not mounted: the segment may
			// well be intact. Unless the journal holds it, it is kept and
			// read again at the retry.
			if !m.remains(u, err) && !m.adopt(ctx, u) {
				u.err = fmt.Errorf("cached segment %s %s; kept and retried, not declared lost (a disk that is dead for good: replace it, or take it out of its mount, and the cache rebuilds or the loss is handled): %w",
					u.e.id, unreadableNow, err)
			}
		default:
			u.err = fmt.Errorf("read cached segment %s: %w", u.e.id, err)
		}
		return
	}
	meta, sealed, err := parseCached(data)
	if err == nil && meta.first != u.e.id.Seq {
		err = fmt.Errorf("header says it starts at %d", meta.first)
	}
	if err != nil {
		if !m.remains(u, err) {
			u.err = fmt.Errorf("%w: cached segment %s: %w", errSegmentLost, u.e.id, err)
		}
		return
	}
	size := int64(len(data))
	m.mu.Lock()
	if u.e.size == 0 {
		u.e.size = size
		m.backlog += size
		m.s.cacheBytes.Add(size)
	}
	u.e.last = meta.last
	u.already = meta.last <= m.uploaded
	m.mu.Unlock()
	u.meta = meta
	if u.already {
		return
	}
	name := layout.SegmentName(m.name, meta.first, meta.last)
	start := time.Now()
	if err := m.putSegment(ctx, name, sealed, meta.metadata()); err != nil {
		u.err = fmt.Errorf("upload %s: %w", name, err)
		return
	}
	m.s.metrics.uploadedBytes.Add(float64(len(sealed)))
	if m.s.hotBytes.Load() > hotLimit/2 {
		// Apply lags: keep the memory for uploads, which bound RPO; the
		// applier reads this segment back from the cache.
		m.mu.Lock()
		m.s.dropHot(u.e.hot)
		u.e.hot = nil
		m.mu.Unlock()
	}
	m.log.Debug("segment uploaded", logBlob, name, logSealed, len(sealed), logDuration, time.Since(start))
}

// putSegment uploads a sealed segment under a name no blob holds yet. One
// there already is this server's own upload (the same bytes: a retry, or
// an upload before a crash), or another process server's, which served
// the machine too (its agent re-pointed): then this one replaces it only
// once a write of the manifest shows the machine is still its own, and a
// server the other took the machine from is fenced there instead of
// writing over the other's journal. The replacement is conditional on
// the blob found: one uploaded since (by a server that took the machine
// meanwhile) is not overwritten.
func (m *machine) putSegment(ctx context.Context, name string, sealed []byte, md blobstore.Metadata) error {
	_, err := m.s.store.PutBlobIf(ctx, name, sealed, md, "")
	if !errors.Is(err, blobstore.ErrConflict) {
		return err
	}
	got, etag, err := blobstore.ReadBack(ctx, m.s.store, name)
	if err == nil && bytes.Equal(got, sealed) {
		return nil
	}
	if err != nil && !blobstore.IsNotFound(err) && !errors.Is(err, blobstore.ErrCorrupt) {
		return err // an outage, or refused: try again later (a damaged or vanished blob is replaced)
	}
	if etag == "" {
		// Unreadable: damaged, or gone since. Its ETag, read alone, is
		// still no newer than whatever made it so.
		info, err := m.s.store.Stat(ctx, name)
		if err != nil {
			return fmt.Errorf("journal segment %s found taken, then unreadable: %w", name, err)
		}
		etag = info.ETag
	}
	if err := m.writeManifest(ctx); err != nil {
		return err
	}
	m.log.Warn("replacing a journal segment another process server uploaded under the same name (it served this machine too)", logBlob, name)
	if _, err := m.s.store.PutBlobIf(ctx, name, sealed, md, etag); err != nil {
		return fmt.Errorf("replace journal segment %s: %w", name, err)
	}
	return nil
}

// dropApplied deletes uploaded segments the applier has applied (all
// uploaded ones when there is no applier) and records applied_seq.
func (m *machine) dropApplied(ctx context.Context) error {
	m.manMu.Lock()
	m.mu.Lock()
	// Also rewrite a manifest whose last write failed (UpdateManifest,
	// an upload step): until it is saved, nothing it covers is deleted.
	manDirty := m.applied > m.man.AppliedSeq || m.man.AppliedSeq > m.savedApplied || m.man.DurableSeq > m.savedDurable
	m.man.AppliedSeq = max(m.man.AppliedSeq, m.applied)
	m.mu.Unlock()
	// The manifest first: a crash part way through the deletes then leaves
	// shards only of segments it counts as applied, which a restart drops
	// (uploadOne) instead of taking them for acknowledged data lost. Hence
	// only segments the manifest in the account covers (saved*) go, not
	// those a write still in flight or failed (UpdateManifest) would cover.
	var err error
	if manDirty {
		err = m.writeLocked(ctx)
	}
	m.manMu.Unlock()
	if err != nil {
		return err
	}
	m.mu.Lock()
	var drop []*segEntry
	for _, e := range m.segs {
		if !e.uploaded || e.last > m.savedDurable || (m.s.applier != nil && e.last > m.savedApplied) {
			break
		}
		drop = append(drop, e)
	}
	for _, e := range drop {
		// Uploaded and applied: its memory goes now, even if its shards
		// cannot (below).
		m.s.dropHot(e.hot)
		e.hot = nil
	}
	m.mu.Unlock()
	for _, e := range drop {
		if err := m.s.cache.Delete(e.id); err != nil {
			// A cache disk that cannot delete (unmounted, failing) must
			// not hold back the uploads of the acknowledged segments the
			// cache still holds: this step goes on to them, and the
			// delete is tried again at the next one.
			if time.Since(m.dropWarned) >= dropWarnEvery {
				m.dropWarned = time.Now()
				m.log.Warn("cannot delete an applied segment from the cache; uploads go on, and the delete is retried (its space is not freed meanwhile)",
					logSegment, e.id.String(), logErr, err)
			}
			return nil
		}
		// By identity: a claim may have dropped entries meanwhile.
		m.mu.Lock()
		i := slices.Index(m.segs, e)
		if i >= 0 {
			m.segs = slices.Delete(m.segs, i, i+1)
		}
		m.mu.Unlock()
		if i >= 0 {
			m.s.cacheBytes.Add(-e.size)
		}
	}
	return nil
}

// dropWarnEvery spaces the warnings of a cache that keeps failing to
// delete applied segments (dropApplied is retried at every upload step).
const dropWarnEvery = time.Minute

// advanceFromMarker moves recoverable_until to the latest marker that
// arrived after its records were handed over; called when every cached
// segment is uploaded, so every record before that marker is in the
// journal.
func (m *machine) advanceFromMarker(ctx context.Context) error {
	m.manMu.Lock()
	defer m.manMu.Unlock()
	m.mu.Lock()
	changed := m.mendLocked()
	// A marker whose records are not all uploaded yet waits for them: it
	// came after this pass found nothing left to upload, its segment made
	// durable meanwhile, and it may be the agent's last for a while.
	if m.hasNote && m.note.Seq <= m.uploaded {
		m.hasNote = false
		// Nor one a gap covers (mended with nothing to send, its marker
		// sits at lost_to): recover would refuse the state it names.
		_, inGap := m.man.GapAt(m.note.Seq)
		if t := time.Unix(0, m.note.UnixNano).UTC(); t.After(m.man.RecoverableUntil) && !m.man.HasOpenGap() && !inGap {
			m.man.RecoverableUntil, changed = t, true
			if m.idle.Seq == m.note.Seq && m.idle.Seq > 0 {
				m.man.IdleSeq, m.man.IdleSince = m.idle.Seq, time.Unix(0, m.idle.UnixNano).UTC()
			}
		}
	}
	m.mu.Unlock()
	if changed {
		return m.writeLocked(ctx)
	}
	return nil
}

// segmentLost handles an acknowledged segment that can no longer be read:
// the data is gone from the server, so the agent must prove the replicas
// with a checksum resync. The gap is recorded in the manifest first, so
// that neither a restart nor a failed hello forgets it and durable_seq
// never passes it unrecorded; then a tombstone takes the segment's place
// in the journal. On error the segment stays, to be found lost again.
// The session is closed so that its next hello gets SyncChecksum.
func (m *machine) segmentLost(ctx context.Context, e *segEntry, err error) error {
	m.log.Error("acknowledged segment unreadable in the cache; unless the journal holds it, the agent will be asked for a checksum resync",
		logSegment, e.id.String(), logErr, err)
	// What it held: up to its last record, or (not read since a restart)
	// up to the next cached segment, as segments are contiguous; with none,
	// what the gap recorded before a crash said, else everything durable.
	// (A gap that starts there may be a hello's, opened for records the
	// agent had acknowledged, whose end says nothing of this segment's.)
	// Every segment before it is in the journal (uploads publish in
	// order), so its predecessor ends at uploaded.
	m.mu.Lock()
	lostTo := e.last
	if lostTo == 0 {
		for _, x := range m.segs {
			if x.id.Seq > e.id.Seq && (lostTo == 0 || x.id.Seq-1 < lostTo) {
				lostTo = x.id.Seq - 1
			}
		}
	}
	if lostTo == 0 {
		for _, g := range m.man.Gaps {
			if g.Open() && g.From == e.id.Seq {
				lostTo = g.LostTo
			}
		}
	}
	if lostTo == 0 {
		lostTo = m.durable
	}
	lostTo = max(lostTo, e.id.Seq)
	prev, key := m.uploaded, m.key
	m.mu.Unlock()
	if e.id.Seq <= prev {
		return fmt.Errorf("segment %s found lost but the journal holds it (durable_seq %d): refusing to replace it by a tombstone", e.id, prev)
	}
	// A crash between uploads and the manifest saying so leaves segments
	// in the account past its end (this one, those before it that
	// vanished from the cache): adopted rather than written over. What
	// the chain from the journal's end does not reach is lost (a segment
	// gone with all its shards while the server was down, or a jump of
	// the sequence, which holds nothing), from there: not chained over.
	chained, holdsE, err := m.journalChain(ctx, key, prev, lostTo, e)
	if err != nil {
		return err
	}
	// Holding e's start, the chain holds e whole (its end unknown, lostTo
	// was a guess).
	inJournal := chained >= lostTo || holdsE && e.last == 0
	if inJournal {
		m.log.Info("the cached copy is unreadable but the journal holds the segment: adopting it", logSegment, e.id.String())
		lostTo = chained
	} else {
		if chained > prev {
			m.log.Info("the journal holds segments past the manifest's end: adopting them", "from", prev+1, "to", chained)
		}
		from := chained + 1
		if err := m.openGap(ctx, from, lostTo); err != nil {
			return fmt.Errorf("record the journal gap at %d: %w", from, err)
		}
		if err := m.putTombstone(ctx, key, from, lostTo, chained); err != nil {
			return err
		}
	}
	// The tombstone (or the adopted copy) is the segment's upload: a
	// checksum resync waiting for the journal to reach the records it had
	// must not wait forever. Saved before the cached copy goes, so that a
	// restart finds it in durable_seq rather than the loss again.
	m.manMu.Lock()
	m.mu.Lock()
	m.uploaded = max(m.uploaded, lostTo)
	if lostTo > m.durable {
		m.durable, m.lastRun = lostTo, wire.RunID{} // who sent it: unknown
	}
	if lostTo > m.man.DurableSeq {
		// The newest durable records: who sent them, if known.
		m.man.DurableSeq, m.man.LastRun = lostTo, ""
		if lostTo == m.durable {
			m.man.LastRun = runHex(m.lastRun)
		}
	}
	m.mu.Unlock()
	werr := m.writeLocked(ctx)
	m.manMu.Unlock()
	if sess := m.current(); sess != nil && !inJournal {
		// The agent must resync, even if the write failed: a retry meets
		// the tombstone as the segment's upload, and would not end it.
		sess.abort(errors.New("acknowledged data lost from the cache"))
	}
	if werr != nil {
		return werr
	}
	if m.s.applier != nil {
		m.s.applier.Notify(m.name, lostTo)
	}
	if err := m.s.cache.Delete(e.id); err != nil && !errors.Is(err, cache.ErrNotFound) {
		// Recorded lost all the same; what is left of it comes back at a
		// restart as remains of a segment the journal holds, and is
		// dropped then.
		m.log.Warn("cannot delete a lost segment's remains from the cache; a scrub reports them until a restart drops them",
			logSegment, e.id.String(), logErr, err)
	}
	m.mu.Lock()
	for i, x := range m.segs {
		if x == e {
			m.segs = append(m.segs[:i], m.segs[i+1:]...)
			break
		}
	}
	if !e.uploaded {
		m.backlog -= e.size
	}
	m.s.dropHot(e.hot)
	e.hot = nil
	m.mu.Unlock()
	m.s.cacheBytes.Add(-e.size)
	return nil
}

// journalChain follows this history's segments in the journal on from
// sequence end (the journal's end as the manifest has it): at each link,
// the first (by first sequence) starting past the chain's end and ending
// by to whose header says it follows the chain's end, and that is not
// stale (a segment of another history, which readers skip:
// recovery.StaleFilter). A link may follow a jump of the sequence (an
// agent restarted on its lease). It returns where that chain ends (end
// when nothing follows it), and whether it holds e, the segment found
// lost.
func (m *machine) journalChain(ctx context.Context, key *seal.Key, end, to uint64, e *segEntry) (uint64, bool, error) {
	if to <= end {
		return end, false, nil
	}
	segs, err := recovery.ListSegmentsFrom(ctx, m.s.store, m.name, end+1, to)
	if err != nil {
		return 0, false, err
	}
	m.mu.Lock()
	stale := recovery.StaleFilter{Gaps: slices.Clone(m.man.Gaps)}
	m.mu.Unlock()
	var dec recovery.Decoder
	holdsE := false
	for _, sg := range segs { // by first sequence
		if sg.First <= end || sg.Last > to {
			continue
		}
		plain, h, ok, err := m.readChained(ctx, key, sg.Name)
		if err != nil {
			return 0, false, err
		}
		if !ok || h.Prev != end {
			continue
		}
		// Its records for the stale check (by its header alone if they
		// do not decode: readers refuse it then anyway).
		recs, _ := dec.Decode(plain)
		if stale.Skip(sg.Last, recs, h.Prev, true, end) {
			continue
		}
		end = sg.Last
		holdsE = holdsE || sg.First == e.id.Seq
	}
	return end, holdsE, nil
}

// readChained reads journal segment name and its header; false for a
// copy that is not authentic or has no header.
func (m *machine) readChained(ctx context.Context, key *seal.Key, name string) ([]byte, wire.SegmentHeader, bool, error) {
	plain, err := recovery.ReadSegment(ctx, m.s.store, name, key, nil)
	if errors.Is(err, recovery.ErrTampered) {
		return nil, wire.SegmentHeader{}, false, nil
	}
	if err != nil {
		return nil, wire.SegmentHeader{}, false, err
	}
	h, err := wire.ParseSegmentHeader(plain)
	return plain, h, err == nil, nil
}

// inAccount reports whether the journal holds an authentic segment (or
// tombstone) that is e: same first sequence, same last when e's is known,
// and chained to the segment before it. It returns where it ends.
func (m *machine) inAccount(ctx context.Context, key *seal.Key, e *segEntry) (uint64, bool, error) {
	segs, err := recovery.ListSegmentsFrom(ctx, m.s.store, m.name, e.id.Seq, e.id.Seq)
	if err != nil {
		return 0, false, err
	}
	// Its predecessor: the last segment before it, uploaded or not yet.
	m.mu.Lock()
	prev := m.uploaded
	for _, x := range m.segs {
		if x.id.Seq < e.id.Seq {
			prev = max(prev, x.last)
		}
	}
	m.mu.Unlock()
	for _, sg := range segs {
		if sg.First != e.id.Seq || (e.last != 0 && sg.Last != e.last) {
			continue
		}
		_, h, ok, err := m.readChained(ctx, key, sg.Name)
		if err != nil {
			return 0, false, err
		}
		if !ok || h.Prev != prev {
			continue // from another history of this sequence range
		}
		return sg.Last, true, nil
	}
	return 0, false, nil
}

// putTombstone puts in the journal, where the lost segment first..last
// would be, a segment holding only its header (wire.SegmentHeader: prev
// is its predecessor's last sequence). Readers of the journal then find
// the chain of segments unbroken where a loss is recorded (the manifest's
// gap refuses the states it left wrong), while a segment missing for any
// other reason still breaks it. Sealed under the data key, it cannot be
// forged to hide a deleted segment.
func (m *machine) putTombstone(ctx context.Context, key *seal.Key, first, last, prev uint64) error {
	name := layout.SegmentName(m.name, first, last)
	blob, err := seal.SealWith(seal.AlgNone, nil, wire.AppendSegmentHeader(nil, wire.SegmentHeader{Prev: prev}), key, []byte(name))
	if err != nil {
		return err
	}
	md := (&segMeta{first: first, last: last}).metadata()
	if err := m.s.store.PutBlob(ctx, name, blob, md); err != nil {
		return fmt.Errorf("put the tombstone of lost segment %d..%d: %w", first, last, err)
	}
	return nil
}

// runHex is a run id as the manifest's last_run: "" when unknown.
func runHex(r wire.RunID) string {
	if r == (wire.RunID{}) {
		return ""
	}
	return hex.EncodeToString(r[:])
}
