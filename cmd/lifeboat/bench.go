package main

import (
	"io"
	"os"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent"
	"github.com/lifeboat-dr/lifeboat/perf"
	"github.com/spf13/cobra"
)

func benchCmd(verbose *bool) *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Benchmarks (see perf/)"}
	var (
		cfg      perf.CaptureConfig
		variants string
		jsonOut  string
	)
	capture := &cobra.Command{
		Use:   "capture",
		Short: "fio on a loop device with no capture, metadata mode and data mode, side by side",
		Args:  cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { // exit 2, as in agent mirror
			v, err := perf.ParseVariants(variants)
			cfg.Variants = v
			return err
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep, err := perf.RunCapture(cmd.Context(), cfg, logger(*verbose), os.Stderr)
			if err != nil {
				return err
			}
			if err := rep.WriteTable(os.Stdout); err != nil {
				return err
			}
			switch jsonOut {
			case "":
			case "-":
				return rep.WriteJSON(os.Stdout)
			default:
				f, err := os.Create(jsonOut)
				if err != nil {
					return err
				}
				defer f.Close()
				return rep.WriteJSON(f)
			}
			return nil
		},
	}
	f := capture.Flags()
	f.DurationVar(&cfg.Runtime, "runtime", 10*time.Second, "fio runtime per sample")
	f.IntVar(&cfg.Rounds, "rounds", 3, "rounds (variants alternate within each)")
	f.StringVar(&variants, "variants", "", "comma-separated subset of none,metadata,data")
	f.IntVar(&cfg.RingMiB, "ring-mib", 0, "agent ring size (0: agent default)")
	f.DurationVar(&cfg.ReadbackDelay, "readback-delay", agent.DefaultReadbackDelay, "run metadata-mode agents with this --readback-delay")
	f.BoolVar(&cfg.SharedCgroup, "shared-cgroup", false, "run the agent in fio's block I/O cgroup instead of one of its own (a service has its own)")
	f.BoolVar(&cfg.NullTarget, "null-target", false, "mirror into /dev/null: measure capture alone, without the copy's writes")
	f.BoolVar(&cfg.AllowOtherCaptures, "allow-other-captures", false, "run even when other agents' captures are attached (every variant pays for them)")
	f.StringVar(&cfg.Dir, "dir", "/var/tmp", "where the loop device's file and the mirror go")
	f.StringVar(&jsonOut, "json", "", "also write the report as JSON to this file (- for stdout)")
	cmd.AddCommand(capture)
	cmd.AddCommand(pipelineBenchCmd(verbose))
	return cmd
}

func pipelineBenchCmd(verbose *bool) *cobra.Command {
	var (
		cfg         perf.PipelineConfig
		rates       []float64
		search      bool
		blockSizes  []string
		deviceMiB   int64
		ceilingMB   int64
		jsonOut     string
		azuriteMem  bool
		compressPct int
	)
	cmd := &cobra.Command{
		Use:   "pipeline",
		Short: "Churn through agent → process server → Azurite: RPO, apply lag, CPU/GB, sustained churn vs raw Put Page",
		Long: `Starts Azurite, measures its ceiling (raw 4 MiB Put Page with 1 and 4
clients), then protects a loop device (in --dir) with "lifeboat agent"
streaming to a "lifeboat process-server" (both subprocesses of this binary)
and runs fio random writes at fixed rates: 20 MB/s (ASR's per-disk limit),
half the ceiling (or the --rate values), then searches for the highest churn
the pipeline sustains. Per level it reports RPO and apply lag (from the
manifest, every 250 ms), process server CPU per GB, the compression ratio and
throughput as a ratio to the ceiling, next to the goals. Needs root, fio and
Node.js; takes several minutes with the defaults.`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { // exit 2, as in agent mirror
			bs, err := perf.ParseBlockSizes(blockSizes)
			cfg.BlockSizes = bs
			return err
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.Rates = nil
			for _, r := range rates {
				cfg.Rates = append(cfg.Rates, r*1e6)
			}
			cfg.SkipSearch = !search
			cfg.DeviceSize = deviceMiB << 20
			cfg.CeilingBytes = ceilingMB * 1e6
			cfg.AzuriteInMemory = azuriteMem
			cfg.CompressiblePercent = compressPct
			rep, runErr := perf.RunPipeline(cmd.Context(), cfg, logger(*verbose), os.Stderr)
			if rep == nil {
				return runErr
			}
			if err := rep.WriteTable(os.Stdout); err != nil {
				return err
			}
			if err := writeReportJSON(jsonOut, rep.WriteJSON); err != nil {
				return err
			}
			return runErr
		},
	}
	f := cmd.Flags()
	f.DurationVar(&cfg.Runtime, "runtime", 20*time.Second, "fio runtime per level")
	f.Float64SliceVar(&rates, "rate", nil, "churn levels in MB/s instead of 20 MB/s and half the ceiling (comma-separated or repeated)")
	f.BoolVar(&search, "search", true, "search for the highest sustained churn after the levels")
	f.IntVar(&cfg.SearchLevels, "search-levels", 6, "at most this many search levels per block size")
	f.StringSliceVar(&blockSizes, "bs", []string{"64k"}, "fio block sizes, e.g. 64k,4k (every level runs with each)")
	f.IntVar(&cfg.IODepth, "iodepth", 8, "fio iodepth")
	f.IntVar(&compressPct, "compressible", 0, "fio buffer_compress_percentage (0: incompressible)")
	f.StringVar(&cfg.Dir, "dir", "/dev/shm", "where the loop device's sparse file goes")
	f.StringVar(&cfg.WorkDir, "work-dir", os.TempDir(), "where PKI, agent state and the process server's cache go")
	f.Int64Var(&deviceMiB, "device-mib", 1024, "loop device size in MiB")
	f.Int64Var(&ceilingMB, "ceiling-mb", 0, "MB each ceiling measurement writes (0: 20 MB/s × runtime, at least 64 MiB)")
	f.BoolVar(&azuriteMem, "azurite-memory", false, "run Azurite in memory instead of on disk")
	f.StringVar(&cfg.ProfileDir, "profile-dir", "", "keep each level's CPU profiles in this directory (level-N.pprof: process server, level-N-agent.pprof: agent)")
	f.IntVar(&cfg.CacheDirs, "cache-dirs", 3, "process server cache directories (Reed-Solomon: 3 → 2 data + 1 parity)")
	f.StringVar(&jsonOut, "json", "", "also write the report as JSON to this file (- for stdout)")
	return cmd
}

// writeReportJSON writes a report with write to path ("-": stdout, "":
// nowhere).
func writeReportJSON(path string, write func(io.Writer) error) error {
	switch path {
	case "":
		return nil
	case "-":
		return write(os.Stdout)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
