package blobstore

import "log/slog"

// StackConfig configures Stack.
type StackConfig struct {
	Retry RetryConfig
	// WriteBytesPerSec limits upload bandwidth (0: unlimited); WriteBurst is
	// the token bucket size in bytes (0: MaxPutPage).
	WriteBytesPerSec float64
	WriteBurst       int
	// Logger for per-call Debug records and retry warnings (nil: none).
	Logger *slog.Logger
}

// Stack wraps base with Lifeboat's decorators. This is the one place that
// decides their order, from the caller inwards:
//
//	limit -> retry -> logging -> base
//
// The limiter is outermost so it splits WritePages into MaxPutPage chunks
// and paces them; retry sits below it so that a failed chunk is retried on
// its own rather than re-sending the whole write (and charges the limit
// again for each resend: bytes of a try that failed mid-body did flow).
// Logging is innermost so every attempt, including failed ones, is
// recorded.
func Stack(base Store, cfg StackConfig) Store {
	if cfg.Retry.Logger == nil {
		cfg.Retry.Logger = cfg.Logger
	}
	s := WithLogging(base, cfg.Logger)
	s = WithRetry(s, cfg.Retry)
	return WithWriteLimit(s, cfg.WriteBytesPerSec, cfg.WriteBurst)
}
