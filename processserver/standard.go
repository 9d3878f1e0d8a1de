package processserver

import (
	"context"
	"log/slog"
	"time"

	"github.com/lifeboat-dr/lifeboat/processserver/applier"
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
		})
		if err != nil {
			return nil, err
		}
		return ManagedApplier(ps, a.NewManager(ctx, ps.Applied)), nil
	}
}
