package processserver

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
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
			Local:          ps.LocalSegment,
		})
		if err != nil {
			return nil, err
		}
		return ManagedApplier(ps, a.NewManager(ctx, ps.Applied)), nil
	}
}

// LocalSegment returns the plaintext of journal segment name from the
// cache, which keeps a segment until it is applied. It checks that the
// cached segment is the one the name says.
func (s *Server) LocalSegment(name string) ([]byte, bool) {
	machine, _, ok := strings.Cut(name, "/journal/")
	if !ok {
		return nil, false
	}
	first, last, err := layout.ParseSegmentName(name)
	if err != nil {
		return nil, false
	}
	data, err := s.cache.Get(cache.SegmentID{Stream: machine, Seq: first})
	if err != nil {
		return nil, false
	}
	meta, err := scanSegment(data)
	if err != nil || meta.first != first || meta.last != last {
		return nil, false
	}
	return data, true
}
