package main

import (
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/processserver"
	"github.com/spf13/cobra"
)

// envConnectionString holds the storage account's connection string (it
// contains the account key, so it is not a flag: flags show up in ps).
const envConnectionString = "AZURE_STORAGE_CONNECTION_STRING"

// minUploadLimit is the lowest --upload-limit taken (bytes per second).
const minUploadLimit = 100e3

func processServerCmd(verbose *bool) *cobra.Command {
	var (
		cfg           processserver.Config
		uploadLimit   float64
		machineCache  float64
		pointInterval time.Duration
		retention     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "process-server [--listen ADDR] --pki DIR --name NAME --cache DIR[,DIR...] --recovery-key FILE",
		Short: "Receive agents' change streams, cache them and upload them to Azure Blob Storage",
		Long: `Accepts agents over TLS 1.3 with client certificates (role agent, same CA),
makes every batch durable in the cache before acknowledging it, then
compresses, encrypts (a data key per machine, wrapped by the recovery key)
and uploads it to the storage account as journal segments.

The cache spans the --cache directories, one per disk, Reed-Solomon coded so
that losing a parity's worth of them loses nothing. The storage account is
taken from AZURE_STORAGE_CONNECTION_STRING. Outages are retried with backoff
while the cache absorbs the stream.`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { // flag values: exit 2, as in agent mirror
			if err := nonEmpty("listen", cfg.Listen, "pki", cfg.PKIDir, "name", cfg.Name, "recovery-key", cfg.RecoveryKeyFile); err != nil {
				return err
			}
			if err := checkPprof(cfg.Profiling, cfg.MetricsListen); err != nil {
				return err
			}
			if err := checkListen("--listen", cfg.Listen); err != nil {
				return err
			}
			if cfg.CacheOptions.WriteQuorum < 0 {
				return fmt.Errorf("--cache-write-quorum %d: must not be negative (0: every directory)", cfg.CacheOptions.WriteQuorum)
			}
			if q := cfg.CacheOptions.WriteQuorum; q > len(cfg.CacheDirs) {
				return fmt.Errorf("--cache-write-quorum %d: more than the %d cache directories", q, len(cfg.CacheDirs))
			}
			if uploadLimit < 0 || math.IsNaN(uploadLimit) || math.IsInf(uploadLimit, 0) {
				return fmt.Errorf("--upload-limit %v: give bytes per second, e.g. 20e6 (0: unlimited)", uploadLimit)
			}
			if machineCache < 0 || math.IsNaN(machineCache) || machineCache > 0 && machineCache < 2*float64(processserver.DefaultSegmentBytes) || machineCache > 1e18 {
				return fmt.Errorf("--machine-cache-limit %v: give bytes, at least two segments (%d) and at most 1e18, e.g. 20e9 (0: none)", machineCache, 2*processserver.DefaultSegmentBytes)
			}
			cfg.MaxMachineCacheBytes = int64(machineCache)
			if uploadLimit > 0 && uploadLimit < minUploadLimit {
				// 20 for 20 MB/s would take days per segment.
				return fmt.Errorf("--upload-limit %v: that is bytes per second, below the %v the stream needs to move at all (20 MB/s is 20e6)", uploadLimit, minUploadLimit)
			}
			if pointInterval < time.Second {
				return fmt.Errorf("--point-interval %v: must be at least 1s", pointInterval)
			}
			if retention == 0 {
				return errors.New("--retention 0: give a duration, or a negative one to keep everything")
			}
			if retention > 0 && retention < pointInterval {
				return fmt.Errorf("--retention %v is shorter than --point-interval %v: it would keep one recovery point at a time", retention, pointInterval)
			}
			if len(cfg.CacheDirs) == 0 {
				return errors.New(`--cache "": give the cache directories, one per cache disk`)
			}
			for _, d := range cfg.CacheDirs {
				if strings.TrimSpace(d) == "" {
					// Taken as is, it would be the working directory.
					return fmt.Errorf("--cache %s: an empty directory name (a stray comma?)", strings.Join(cfg.CacheDirs, ","))
				}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			cs := os.Getenv(envConnectionString)
			if cs == "" {
				return errors.New(envConnectionString + " is not set: export the storage account's connection string (or Azurite's)")
			}
			log := logger(*verbose)
			base, err := azure.New(azure.Config{ConnectionString: cs, Container: cfg.Container})
			if err != nil {
				return err
			}

			cfg.Store = blobstore.Stack(base, blobstore.StackConfig{WriteBytesPerSec: uploadLimit, Logger: log})
			cfg.Logger = log
			rk, err := seal.LoadRecoveryKey(cfg.RecoveryKeyFile)
			if err != nil {
				return err
			}
			cfg.NewApplier = processserver.StandardApplier(cmd.Context(), cfg, rk, pointInterval, retention, log)
			return processserver.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Listen, "listen", ":7070", "address agents connect to")
	f.StringVar(&cfg.PKIDir, "pki", "", "PKI directory (ca.crt, NAME.crt, NAME.key)")
	f.StringVar(&cfg.Name, "name", "", "this server's certificate name (role process-server)")
	f.StringSliceVar(&cfg.CacheDirs, "cache", nil, "cache directories, one per cache disk (comma-separated or repeated)")
	f.IntVar(&cfg.CacheOptions.WriteQuorum, "cache-write-quorum", 0,
		"shards a cache write makes durable before the agent is acked (0: one per cache directory); lower, more than the data and more than the parity shards, keeps agents streaming with a cache disk down, at reduced redundancy until its rebuild")
	f.StringVar(&cfg.RecoveryKeyFile, "recovery-key", "", "recovery key file (lifeboat keys init)")
	f.StringVar(&cfg.Container, "container", layout.DefaultContainer, "storage account container")
	f.StringVar(&cfg.MetricsListen, "metrics", "", "serve Prometheus metrics on ADDR/metrics (off when empty)")
	f.BoolVar(&cfg.Profiling, "pprof", false, "also serve Go profiles on the metrics address under /debug/pprof/ (CPU samples labelled by stage)")
	f.Float64Var(&uploadLimit, "upload-limit", 0, "upload bandwidth limit in bytes per second, e.g. 20e6 (0: unlimited)")
	f.Float64Var(&machineCache, "machine-cache-limit", 0,
		"pause a machine's agent while more than this many bytes of it are in the cache, not yet uploaded or applied, e.g. 20e9 (0: no per-machine bound; every agent pauses at 90% full)")
	f.DurationVar(&pointInterval, "point-interval", 5*time.Minute, "crash-consistent recovery point interval (app-consistent points follow the agents' markers)")
	f.DurationVar(&retention, "retention", 24*time.Hour, "how long recovery points and the journal between them are kept (negative: keep everything)")
	for _, n := range []string{"pki", "name", "cache", "recovery-key"} {
		cmd.MarkFlagRequired(n)
	}
	return cmd
}
