// Package processserver is the ingest and upload side of the Lifeboat
// process server: agents stream their change records over TLS 1.3 mTLS,
// the server seals them (compresses and encrypts with a per-machine data
// key), makes them durable in the erasure-coded cache (processserver/cache)
// before acknowledging them, then uploads them to the storage account as
// journal segments, keeping the machine's manifest current. The cache
// holds only sealed data.
//
// Applying segments to replica page blobs, recovery points and retention
// belong to an Applier (see Applier), which this package drives but does
// not implement.
//
// # Segments
//
// Frames received from an agent (Batch and Marker, re-framed with
// wire.AppendFrame exactly as received) are appended to the session's open
// segment. The segment is cut when it reaches Config.SegmentBytes, when its
// first record is Config.SegmentAge old, or right after a crash- or
// app-consistent marker. Cutting means sealing, cache.Put (durable,
// Reed-Solomon coded) and only then Ack{last seq} to the agent. A segment is named by
// the sequence range of its records (layout.SegmentName), so a segment
// always holds at least one record: markers that arrive while no record is
// pending stay at the head of the open segment (a run of time markers
// collapsed to its first and latest) and advance the manifest's
// recoverable_until directly once every earlier record is uploaded.
package processserver

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// Defaults for Config fields left zero.
const (
	DefaultSegmentBytes = 8 << 20
	DefaultSegmentAge   = time.Second
	DefaultWindow       = 64 << 20
)

// Cache fullness thresholds (fraction of the cache file systems free).
const (
	freeWarn   = 0.30 // warning log below this
	freeError  = 0.25 // error log below this
	freePause  = 0.10 // Backpressure{0} below this (cache over 90% full)
	freeResume = 0.15 // window reopened above this
	// freeSettle: a cache log level steps down only once this much more
	// is free than its threshold, not at every second's wobble across it.
	freeSettle = 0.02
)

// Config configures a process server.
type Config struct {
	// Listen is the TCP address agents connect to, e.g. ":7070" or
	// "127.0.0.1:0".
	Listen string
	// PKIDir and Name select the server's identity (pki.Load); only
	// certificates of role agent from the same CA are accepted.
	PKIDir, Name string
	// CacheDirs are the cache directories, one per cache disk
	// (cache.Open). CacheOptions tunes the cache (geometry, quorum);
	// its Logger defaults to Logger.
	CacheDirs    []string
	CacheOptions cache.Options
	// RecoveryKeyFile is the recovery key (seal.LoadRecoveryKey) that
	// wraps every machine's data key in the storage account.
	RecoveryKeyFile string
	// Store is the storage account container, already decorated
	// (blobstore.Stack: retries, bandwidth limit, logging). Container is
	// its name, for logs only.
	Store     blobstore.Store
	Container string

	// SegmentBytes and SegmentAge bound an open segment (defaults 8 MiB,
	// 1 s): the acknowledgement latency, and so the agent's memory and the
	// RPO, follow from them.
	SegmentBytes int
	SegmentAge   time.Duration
	// Window is the Backpressure window granted to agents (default 64 MiB).
	Window uint64
	// MaxMachineCacheBytes pauses a machine's agent (Backpressure{0})
	// while more than this many bytes of it are in the cache, waiting for
	// their upload or for the applier: one machine that cannot upload, or
	// whose replica cannot be written, then stops alone, before the cache
	// is 90% full, which pauses every agent. 0 means no per-machine bound.
	MaxMachineCacheBytes int64

	// NewApplier, if set, is called once by Start, before any segment is
	// uploaded, to build the applier the server notifies; the applier
	// reports progress back with Server.Applied. Without it, segments are
	// deleted from the cache as soon as they are uploaded and checksum
	// resyncs are answered "everything differs".
	NewApplier func(*Server) (Applier, error)

	// Logger receives the server's logs (nil: discard).
	Logger *slog.Logger
	// Metrics registers the lifeboat_ps_* and lifeboat_rpo_seconds metrics
	// (nil: not registered). MetricsListen, if set, serves Metrics (or a
	// fresh registry with the Go and process collectors when Metrics is
	// nil) on http://MetricsListen/metrics.
	Metrics       *prometheus.Registry
	MetricsListen string
	// Profiling also serves Go's profiles on http://MetricsListen/debug/pprof/,
	// CPU samples labelled by pipeline stage (internal/stage). Profiles
	// hold code locations and sizes, never data, but keep the address local.
	Profiling bool
}

func (c *Config) withDefaults() (Config, error) {
	cfg := *c
	var errs []error
	if cfg.Listen == "" {
		errs = append(errs, errors.New("no listen address"))
	}
	if cfg.PKIDir == "" || cfg.Name == "" {
		errs = append(errs, errors.New("no PKI directory or name"))
	}
	if len(cfg.CacheDirs) == 0 {
		errs = append(errs, errors.New("no cache directory"))
	}
	if cfg.RecoveryKeyFile == "" {
		errs = append(errs, errors.New("no recovery key file"))
	}
	if cfg.Store == nil {
		errs = append(errs, errors.New("no blob store"))
	}
	if len(errs) > 0 {
		return cfg, fmt.Errorf("process server config: %w", errors.Join(errs...))
	}
	if cfg.SegmentBytes <= 0 {
		cfg.SegmentBytes = DefaultSegmentBytes
	}
	if cfg.SegmentAge <= 0 {
		cfg.SegmentAge = DefaultSegmentAge
	}
	if cfg.Window == 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CacheOptions.Logger == nil {
		cfg.CacheOptions.Logger = cfg.Logger
	}
	if cfg.CacheOptions.MaxSegmentSize == 0 {
		// A segment is cut after the frame that reaches SegmentBytes, and
		// one frame may carry up to wire.MaxPayload; cached, it has its
		// header and the seal's overhead too.
		cfg.CacheOptions.MaxSegmentSize = max(cache.DefaultMaxSegmentSize, cfg.SegmentBytes+maxFrame+cachedHeaderSize+seal.Overhead)
	}
	return cfg, nil
}
