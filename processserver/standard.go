package processserver

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/processserver/applier"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// StandardApplier is the NewApplier hook of a production process server:
// journal segments are applied to the replica page blobs as soon as they
// are durable in the account, recovery points are cut every pointInterval
// (and at every app-consistent marker), and retention prunes points and
// segments older than retention. The applier reads data keys from the
// account with the recovery key, like recovery does.
func StandardApplier(ctx context.Context, cfg Config, recoveryKey []byte, pointInterval, retention time.Duration, log *slog.Logger) func(*Server) (Applier, error) {
	return func(ps *Server) (Applier, error) {
		a, err := applier.New(applier.Config{
			Store:          cfg.Store,
			Keys:           applier.RecoveryKeys(cfg.Store, recoveryKey),
			Logger:         log,
			PointInterval:  pointInterval,
			Retention:      retention,
			UpdateManifest: ps.UpdateManifest,
			ReplicaLost:    ps.ReplicaLost,
			Fence:          ps.Fence,
			Fenced:         ps.ReplicaFenced,
			Local:          ps.LocalSegment,
			Yield:          ps.YieldToUploads,
		})
		if err != nil {
			return nil, err
		}
		return ManagedApplier(ps, a.NewManager(ctx, ps.Applied)), nil
	}
}

// yieldMax bounds how long YieldToUploads holds an apply pass back, so
// that the replica still advances under sustained overload.
const yieldMax = 2 * time.Second

// YieldToUploads blocks while more than one segment of journal uploads is
// waiting (across machines), for at most yieldMax: the journal sets RPO,
// the replica only apply lag, and both share the account.
func (s *Server) YieldToUploads(ctx context.Context) {
	deadline := time.Now().Add(yieldMax)
	for time.Now().Before(deadline) && s.uploadBacklog() > int64(s.cfg.SegmentBytes) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// uploadBacklog is the bytes cached and not yet uploaded, all machines
// but those whose uploads are failing.
func (s *Server) uploadBacklog() int64 {
	s.mu.Lock()
	ms := make([]*machine, 0, len(s.machines))
	for _, m := range s.machines {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	var n int64
	for _, m := range ms {
		if !m.uploadFailing.Load() {
			n += m.backlogBytes()
		}
	}
	return n
}

// LocalSegment appends to dst the plaintext of journal segment name from the
// sealed copy kept in memory or in the cache, which keep a segment until
// it is applied: opening it here is cheaper than downloading it. It checks that the cached
// segment is the one the name says (the name is the seal's AAD).
func (s *Server) LocalSegment(name string, dst []byte) ([]byte, bool) {
	machine, _, ok := strings.Cut(name, "/journal/")
	if !ok {
		return nil, false
	}
	first, last, err := layout.ParseSegmentName(name)
	if err != nil {
		return nil, false
	}
	key, ok := s.DataKey(machine)
	if !ok {
		return nil, false
	}
	var data []byte
	if h := s.hotSegment(machine, first); h != nil {
		defer h.release()
		data = h.b
	} else if data, err = s.cache.Get(cache.SegmentID{Stream: machine, Seq: first}); err != nil {
		return nil, false
	}
	meta, sealed, err := parseCached(data)
	if err != nil || meta.first != first || meta.last != last {
		return nil, false
	}
	plain, err := seal.Open(dst, sealed, key, []byte(name))
	if err != nil {
		return nil, false
	}
	return plain, true
}
