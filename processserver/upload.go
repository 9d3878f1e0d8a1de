package processserver

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

const (
	uploadRetryMin = 500 * time.Millisecond
	uploadRetryMax = 30 * time.Second
)

// runUploader uploads the machine's cached segments in sequence order,
// forever: a failure (the store decorator already retried) is logged and
// retried with backoff while the cache keeps absorbing the stream.
func (m *machine) runUploader(ctx context.Context) {
	var sealBuf []byte
	wait := uploadRetryMin
	notified := false
	for {
		for ctx.Err() == nil {
			did, err := m.uploadStep(ctx, &sealBuf, &notified)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				m.log.Error("upload failed; will retry, the cache keeps the data", logErr, err, logWait, wait)
				select {
				case <-time.After(wait):
				case <-ctx.Done():
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

// uploadStep does one unit of work: drop applied segments, then upload
// the oldest segment not yet uploaded, or else advance recoverable_until
// from a marker. It reports whether it uploaded something.
func (m *machine) uploadStep(ctx context.Context, sealBuf *[]byte, notified *bool) (bool, error) {
	if err := m.ensureLoaded(ctx); err != nil {
		return false, err
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
	if err := m.dropApplied(ctx); err != nil {
		return false, err
	}

	m.mu.Lock()
	var next *segEntry
	for _, e := range m.segs {
		if !e.uploaded {
			next = e
			break
		}
	}
	m.mu.Unlock()
	if next == nil {
		return false, m.advanceFromMarker(ctx)
	}

	data, err := m.s.cache.Get(next.id)
	if err != nil {
		if errors.Is(err, cache.ErrUnrecoverable) || errors.Is(err, cache.ErrNotFound) {
			m.segmentLost(next, err)
			return true, nil
		}
		return false, fmt.Errorf("read cached segment %s: %w", next.id, err)
	}
	meta, err := scanSegment(data)
	if err != nil {
		m.segmentLost(next, fmt.Errorf("cached segment does not parse: %w", err))
		return true, nil
	}
	size := int64(len(data))
	m.mu.Lock()
	if next.size == 0 {
		next.size = size
		m.backlog += size
		m.s.cacheBytes.Add(size)
	}
	next.last = meta.last
	already := meta.last <= m.uploaded
	m.mu.Unlock()

	name := layout.SegmentName(m.name, meta.first, meta.last)
	if !already {
		key, err := m.ensureKey(ctx)
		if err != nil {
			return false, err
		}
		*sealBuf, err = seal.Seal((*sealBuf)[:0], data, key, []byte(name))
		if err != nil {
			return false, fmt.Errorf("seal %s: %w", name, err)
		}
		start := time.Now()
		if err := m.s.store.PutBlob(ctx, name, *sealBuf, meta.metadata()); err != nil {
			return false, fmt.Errorf("upload %s: %w", name, err)
		}
		m.s.metrics.uploadedBytes.Add(float64(len(*sealBuf)))
		m.log.Debug("segment uploaded", logBlob, name, logBytes, len(data), logSealed, len(*sealBuf), logDuration, time.Since(start))
	}

	m.mu.Lock()
	next.uploaded = true
	m.backlog -= next.size
	if !already {
		m.uploaded = meta.last
		m.man.DurableSeq = meta.last
		if meta.lastTime > 0 {
			if t := time.Unix(0, meta.lastTime).UTC(); t.After(m.man.RecoverableUntil) {
				m.man.RecoverableUntil = t
			}
		}
		close(m.progress)
		m.progress = make(chan struct{})
	}
	m.mu.Unlock()
	if !already {
		if err := m.writeManifest(ctx); err != nil {
			return false, err
		}
		m.s.metrics.durableSeq.WithLabelValues(m.name).Set(float64(meta.last))
		if m.s.applier != nil {
			m.s.applier.Notify(m.name, meta.last)
		}
	}
	if sess := m.current(); sess != nil {
		sess.updateBackpressure()
	}
	return true, nil
}

// dropApplied deletes uploaded segments the applier has applied (all
// uploaded ones when there is no applier) and records applied_seq.
func (m *machine) dropApplied(ctx context.Context) error {
	m.mu.Lock()
	var drop []*segEntry
	for _, e := range m.segs {
		if !e.uploaded || (m.s.applier != nil && e.last > m.applied) {
			break
		}
		drop = append(drop, e)
	}
	manDirty := m.applied > m.man.AppliedSeq
	if manDirty {
		m.man.AppliedSeq = m.applied
	}
	m.mu.Unlock()
	for _, e := range drop {
		if err := m.s.cache.Delete(e.id); err != nil {
			return fmt.Errorf("delete applied segment %s from the cache: %w", e.id, err)
		}
		m.mu.Lock()
		m.segs = m.segs[1:]
		m.mu.Unlock()
		m.s.cacheBytes.Add(-e.size)
	}
	if manDirty {
		return m.writeManifest(ctx)
	}
	return nil
}

// advanceFromMarker moves recoverable_until to the latest marker that
// arrived after its records were handed over; called when every cached
// segment is uploaded, so every record before that marker is in the
// journal.
func (m *machine) advanceFromMarker(ctx context.Context) error {
	m.mu.Lock()
	changed := false
	if m.hasNote {
		m.hasNote = false
		if t := time.Unix(0, m.note.UnixNano).UTC(); t.After(m.man.RecoverableUntil) && m.note.Seq <= m.uploaded {
			m.man.RecoverableUntil, changed = t, true
			if m.idle.Seq == m.note.Seq && m.idle.Seq > 0 {
				m.man.IdleSeq, m.man.IdleSince = m.idle.Seq, time.Unix(0, m.idle.UnixNano).UTC()
			}
		}
	}
	m.mu.Unlock()
	if changed {
		return m.writeManifest(ctx)
	}
	return nil
}

// segmentLost handles an acknowledged segment that can no longer be read:
// the data is gone from the server, so the agent must prove the replica
// with a checksum resync. The session is closed so that its next hello
// gets SyncChecksum.
func (m *machine) segmentLost(e *segEntry, err error) {
	m.log.Error("acknowledged segment lost from the cache; the agent will be asked for a checksum resync",
		logSegment, e.id.String(), logErr, err)
	_ = m.s.cache.Delete(e.id)
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
	m.lost = true
	sess := m.sess
	m.mu.Unlock()
	m.s.cacheBytes.Add(-e.size)
	if sess != nil {
		sess.abort(errors.New("acknowledged data lost from the cache"))
	}
}
