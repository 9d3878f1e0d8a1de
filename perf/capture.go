// Package perf holds Lifeboat's benchmark harnesses.
//
// The capture benchmark (RunCapture) measures what the capture agent costs a
// protected workload: it runs fio write workloads on a fresh loop device with
// no agent, with the agent in metadata mode and with the agent in data mode,
// interleaving the variants round by round so machine drift (page cache,
// thermal, noisy neighbours) affects all of them equally.
package perf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent"
)

// Variant is what runs alongside fio in one sample.
type Variant string

const (
	// VariantNone runs fio without any agent: the baseline.
	VariantNone Variant = "none"
	// VariantMetadata runs the agent in metadata mode (block ranges only).
	VariantMetadata Variant = "metadata"
	// VariantData runs the agent in data mode (ranges and written data).
	VariantData Variant = "data"
)

// AllVariants returns every variant, baseline first.
func AllVariants() []Variant { return []Variant{VariantNone, VariantMetadata, VariantData} }

// ParseVariants parses a comma-separated list such as "none,data". Empty
// input yields AllVariants.
func ParseVariants(s string) ([]Variant, error) {
	if strings.TrimSpace(s) == "" {
		return AllVariants(), nil
	}
	var vs []Variant
	for f := range strings.SplitSeq(s, ",") {
		v := Variant(strings.TrimSpace(f))
		switch v {
		case VariantNone, VariantMetadata, VariantData:
			vs = append(vs, v)
		default:
			return nil, fmt.Errorf("unknown capture variant %q (want none, metadata or data)", f)
		}
	}
	return vs, nil
}

// CaptureConfig configures RunCapture. The zero value of every field selects
// its documented default.
type CaptureConfig struct {
	// AgentExe is the lifeboat binary run as "<AgentExe> agent mirror ...".
	// Default: os.Executable().
	AgentExe string
	// Dir holds the loop backing files, mirror files and agent state
	// directories (one private subdirectory per sample, removed after it).
	// Default: /var/tmp.
	Dir string
	// DeviceSize is the loop device size in bytes; the backing file is
	// sparse. Must be a multiple of 512. Default: 2 GiB.
	DeviceSize int64
	// Runtime is each fio run's duration (at least 1 s). Default: 10 s.
	Runtime time.Duration
	// Rounds is how many times every workload × variant runs. Default: 3.
	Rounds int
	// Variants selects and orders the variants. The order is rotated by one
	// each round. Default: AllVariants().
	Variants []Variant
	// Workloads are the fio jobs to run. Default: DefaultWorkloads().
	Workloads []Workload
	// IOEngine is fio's ioengine. Default: io_uring, or libaio when io_uring
	// is disabled by kernel.io_uring_disabled.
	IOEngine string
	// RingMiB is passed as --ring-mib to the agent; 0 leaves the agent's
	// default.
	RingMiB int
	// ReadbackDelay is passed as --readback-delay to metadata-mode agents.
	ReadbackDelay time.Duration
	// NullTarget makes the agent mirror into /dev/null: the cost of
	// capture alone, without keeping a copy.
	NullTarget bool
	// SharedCgroup runs the agent in the harness's (and fio's) block I/O
	// cgroup instead of one of its own, as a service has (see ioCgroup).
	SharedCgroup bool
	// AllowOtherCaptures runs the benchmark even when other capture
	// instances are attached (pinned under PinRoot), whose programs every
	// variant then pays for; without it the run is refused.
	AllowOtherCaptures bool
	// PinRoot is where agents pin their capture. Default: agent.PinRoot.
	PinRoot string
	// Fio is the fio binary. Default: "fio" from PATH.
	Fio string
	// ReadyTimeout bounds the wait for the agent's READY=1. Default: 60 s.
	ReadyTimeout time.Duration
	// SyncTimeout bounds the wait, after READY=1, for
	// X-LIFEBOAT-SYNCED=1 (initial copy done). Default: 10 min.
	SyncTimeout time.Duration
	// StopTimeout bounds the agent's drain after SIGTERM before it is
	// killed. Default: 60 s.
	StopTimeout time.Duration
}

// withDefaults returns cfg with defaults filled in and validates it.
func (cfg CaptureConfig) withDefaults() (CaptureConfig, error) {
	if cfg.Dir == "" {
		cfg.Dir = "/var/tmp"
	}
	if cfg.PinRoot == "" {
		cfg.PinRoot = agent.PinRoot
	}
	if cfg.DeviceSize == 0 {
		cfg.DeviceSize = 2 << 30
	}
	if cfg.Runtime == 0 {
		cfg.Runtime = 10 * time.Second
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 3
	}
	if len(cfg.Variants) == 0 {
		cfg.Variants = AllVariants()
	}
	if len(cfg.Workloads) == 0 {
		cfg.Workloads = DefaultWorkloads()
	}
	if cfg.IOEngine == "" {
		cfg.IOEngine = defaultIOEngine()
	}
	if cfg.Fio == "" {
		cfg.Fio = "fio"
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 60 * time.Second
	}
	if cfg.SyncTimeout == 0 {
		cfg.SyncTimeout = 10 * time.Minute
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 60 * time.Second
	}

	switch {
	case cfg.Runtime < time.Second:
		return cfg, fmt.Errorf("runtime %s is too short (minimum 1s)", cfg.Runtime)
	case cfg.Rounds < 1:
		return cfg, fmt.Errorf("rounds must be at least 1, got %d", cfg.Rounds)
	case cfg.DeviceSize < 64<<20 || cfg.DeviceSize%512 != 0:
		return cfg, fmt.Errorf("device size %d must be a multiple of 512 and at least 64 MiB", cfg.DeviceSize)
	case cfg.RingMiB < 0:
		return cfg, fmt.Errorf("ring size %d MiB is negative", cfg.RingMiB)
	}
	seen := map[Variant]bool{}
	for _, v := range cfg.Variants {
		if v != VariantNone && v != VariantMetadata && v != VariantData {
			return cfg, fmt.Errorf("unknown capture variant %q", v)
		}
		if seen[v] {
			return cfg, fmt.Errorf("variant %q listed twice", v)
		}
		seen[v] = true
	}
	names := map[string]bool{}
	for _, w := range cfg.Workloads {
		if w.Name == "" || w.RW == "" || w.BlockSize <= 0 || w.IODepth <= 0 || w.Rate < 0 {
			return cfg, fmt.Errorf("incomplete workload %+v", w)
		}
		if names[w.Name] {
			return cfg, fmt.Errorf("workload %q listed twice", w.Name)
		}
		names[w.Name] = true
	}
	return cfg, nil
}

// needsAgent reports whether any variant runs the agent.
func (cfg CaptureConfig) needsAgent() bool {
	for _, v := range cfg.Variants {
		if v != VariantNone {
			return true
		}
	}
	return false
}

// defaultIOEngine prefers io_uring (the modern submission path the agent
// must handle) unless the kernel has it disabled.
func defaultIOEngine() string {
	b, err := os.ReadFile("/proc/sys/kernel/io_uring_disabled")
	if err == nil && strings.TrimSpace(string(b)) == "2" {
		return "libaio"
	}
	return "io_uring"
}

// RunCapture runs the capture benchmark and returns its report. It needs
// root (loop devices) and fio. Progress lines ("[3/18] round 1/3 ...") go
// to progress, which may be io.Discard; diagnostics go to log.
//
// Every sample gets a fresh sparse backing file and loop device, and, for
// capture variants, a fresh agent process and mirror file; all of them are
// detached and removed before the next sample starts, also on error or
// cancellation. The first failing sample aborts the run.
func RunCapture(ctx context.Context, cfg CaptureConfig, log *slog.Logger, progress io.Writer) (*CaptureReport, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("capture benchmark: %w", err)
	}
	if progress == nil {
		progress = io.Discard
	}
	fio, err := exec.LookPath(cfg.Fio)
	if err != nil {
		return nil, fmt.Errorf("capture benchmark needs fio (install it with `apt-get install fio`): %w", err)
	}
	cfg.Fio = fio
	if os.Geteuid() != 0 {
		return nil, errors.New("capture benchmark must run as root (it attaches loop devices)")
	}
	if st, err := os.Stat(cfg.Dir); err != nil {
		return nil, fmt.Errorf("benchmark directory: %w", err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("benchmark directory %s is not a directory", cfg.Dir)
	}
	if cfg.needsAgent() {
		if cfg.AgentExe == "" {
			if cfg.AgentExe, err = os.Executable(); err != nil {
				return nil, fmt.Errorf("locate agent executable: %w", err)
			}
		}
		if _, err := os.Stat(cfg.AgentExe); err != nil {
			return nil, fmt.Errorf("agent executable: %w", err)
		}
	}

	others := otherCaptures(cfg.PinRoot)
	if others > 0 && !cfg.AllowOtherCaptures {
		return nil, fmt.Errorf("%d other capture instance(s) are attached (pinned under %s): their programs run on every write and every variant would pay for them; detach them with `lifeboat agent release --state-dir DIR [--name NAME]` (as the agents that left them ran), or pass --allow-other-captures", others, cfg.PinRoot)
	}
	if others > 0 {
		log.Warn("other capture instances are attached; their programs run on every bio and skew the results",
			"count", others, "dir", cfg.PinRoot)
	}
	var cg *ioCgroup
	if cfg.needsAgent() && !cfg.SharedCgroup {
		if cg, err = newIOCgroup(strconv.Itoa(os.Getpid())); err != nil {
			return nil, fmt.Errorf("%w (pass --shared-cgroup to run the agent in fio's cgroup)", err)
		}
		defer func() {
			if rmErr := cg.remove(); rmErr != nil {
				log.Warn("block I/O cgroup left behind", "dir", cg.dir, "err", rmErr)
			}
		}()
	}
	rep := &CaptureReport{
		Started:       time.Now().UTC(),
		Kernel:        kernelRelease(),
		FioVersion:    fioVersion(ctx, cfg.Fio),
		OtherCaptures: others,
		BPFStats:      bpfStatsEnabled(),
		Settings: CaptureSettings{
			RuntimeSeconds:  cfg.Runtime.Seconds(),
			Rounds:          cfg.Rounds,
			DeviceSizeBytes: cfg.DeviceSize,
			IOEngine:        cfg.IOEngine,
			Variants:        cfg.Variants,
			Workloads:       cfg.Workloads,
			AgentExe:        cfg.AgentExe,
			RingMiB:         cfg.RingMiB,
			ReadbackDelay:   cfg.ReadbackDelay.String(),
			AgentCgroup:     cg.path(),
		},
	}
	total := 0
	for _, wl := range cfg.Workloads {
		for _, v := range cfg.Variants {
			if wl.runs(v) {
				total += cfg.Rounds
			}
		}
	}
	log.Info("capture benchmark start", "samples", total, "runtime", cfg.Runtime,
		"engine", cfg.IOEngine, "fio", rep.FioVersion, "dir", cfg.Dir)
	i := 0
	for r := range cfg.Rounds {
		for _, wl := range cfg.Workloads {
			for _, v := range rotate(cfg.Variants, r) {
				if !wl.runs(v) {
					continue
				}
				i++
				fmt.Fprintf(progress, "[%d/%d] round %d/%d %s %s: ", i, total, r+1, cfg.Rounds, wl.Name, v)
				s, err := runSample(ctx, cfg, cg, r+1, wl, v, log)
				if err != nil {
					fmt.Fprintln(progress, "failed")
					return nil, fmt.Errorf("round %d, %s, %s: %w", r+1, wl.Name, v, err)
				}
				fmt.Fprintln(progress, s.summary())
				rep.Samples = append(rep.Samples, s)
			}
		}
	}
	rep.Results = summarize(cfg.Workloads, cfg.Variants, rep.Samples)
	rep.Goals = captureGoals(cfg.Workloads, rep.Results)
	return rep, nil
}

// rotate returns vs rotated left by r, so each variant takes each position
// (first after the previous sample's page cache state, last, ...) equally
// often over the rounds.
func rotate(vs []Variant, r int) []Variant {
	out := make([]Variant, len(vs))
	for i := range vs {
		out[i] = vs[(i+r)%len(vs)]
	}
	return out
}

// runSample runs one workload under one variant on a fresh loop device.
func runSample(ctx context.Context, cfg CaptureConfig, cg *ioCgroup, round int, wl Workload, v Variant, log *slog.Logger) (s CaptureSample, err error) {
	if err := ctx.Err(); err != nil {
		return s, err
	}
	log = log.With("round", round, "workload", wl.Name, "variant", string(v))
	// Flush dirty pages left by the previous sample so it does not tax
	// this one with its writeback.
	syscall.Sync()

	dir, err := os.MkdirTemp(cfg.Dir, "lifeboat-bench-")
	if err != nil {
		return s, fmt.Errorf("create sample directory: %w", err)
	}
	defer func() {
		if rmErr := os.RemoveAll(dir); rmErr != nil {
			err = errors.Join(err, fmt.Errorf("remove sample directory: %w", rmErr))
		}
	}()
	backing := filepath.Join(dir, "disk.img")
	dev, err := attachLoop(ctx, backing, cfg.DeviceSize)
	if err != nil {
		return s, err
	}
	log.Debug("loop device attached", "device", dev, "backing", backing)
	defer func() {
		if dErr := detachLoop(dev, backing); dErr != nil {
			log.Error("loop device cleanup failed", "device", dev, "err", dErr)
			err = errors.Join(err, dErr)
		}
	}()

	s = CaptureSample{Round: round, Workload: wl.Name, Variant: v}
	var agent *agentProc
	if v != VariantNone {
		// The notify socket lives in its own short temp path: Dir may be
		// too long for sun_path's 108 bytes.
		ndir, err := os.MkdirTemp("", "lifeboat-notify-")
		if err != nil {
			return s, fmt.Errorf("create notify directory: %w", err)
		}
		defer os.RemoveAll(ndir)
		stateDir := filepath.Join(dir, "state")
		if err := os.Mkdir(stateDir, 0o700); err != nil {
			return s, fmt.Errorf("create agent state directory: %w", err)
		}
		agent, err = startAgent(ctx, agentSpec{
			Exe:          cfg.AgentExe,
			Device:       dev,
			MirrorPath:   mirrorPath(cfg, dir),
			Mode:         v,
			RingMiB:      cfg.RingMiB,
			Delay:        cfg.ReadbackDelay,
			Cgroup:       cg,
			StateDir:     stateDir,
			NotifyDir:    ndir,
			ReadyTimeout: cfg.ReadyTimeout,
			SyncTimeout:  cfg.SyncTimeout,
			StopTimeout:  cfg.StopTimeout,
		}, log)
		if err != nil {
			return s, err
		}
		defer func() {
			if agent != nil { // error path: not stopped below
				if _, stopErr := agent.stop(); stopErr != nil {
					log.Warn("stop agent after failure", "err", stopErr)
				}
			}
		}()
	}

	var cpu0 float64
	if agent != nil {
		if cpu0, err = agent.cpuSeconds(); err != nil {
			return s, err
		}
	}
	start := time.Now()
	res, err := runFio(ctx, cfg.Fio, wl, dev, cfg.IOEngine, cfg.Runtime, dir)
	if err != nil {
		return s, err
	}
	wall := time.Since(start).Seconds()
	s.IOPS = res.IOPS
	s.BWBytes = res.BWBytes
	s.P99WriteUs = res.P99Ns / 1e3
	s.BytesWritten = res.IOBytes
	s.WallSeconds = wall
	s.FioUsrCPUPercent = res.UsrCPU
	s.FioSysCPUPercent = res.SysCPU

	if agent != nil {
		rss, err := agent.peakRSS()
		if err != nil {
			return s, err
		}
		counters, err := agent.stop()
		stopped := agent
		agent = nil
		if err != nil {
			return s, err
		}
		// Up to its exit, not fio's: what the writes cost it after fio
		// ended counts (metadata mode reads the last ones back a delay
		// later, and the stop drains what remains), and so does its
		// stop's own small cost.
		cpu := stopped.exitCPUSeconds() - cpu0
		perGB := cpu / (float64(res.IOBytes) / 1e9)
		pct := 100 * cpu / time.Since(start).Seconds()
		s.AgentCPUSeconds = &cpu
		s.AgentCPUSecondsPerGB = &perGB
		s.AgentCPUPercent = &pct
		s.AgentPeakRSSBytes = &rss
		s.AgentCounters = counters
		if n, ok := counterInt(counters, counterOverflowEvents); ok {
			s.OverflowEvents = &n
		}
		if n, ok := counterInt(counters, counterRecords); ok {
			s.Records = &n
		}
	}
	return s, nil
}

func kernelRelease() string {
	b, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func mirrorPath(cfg CaptureConfig, dir string) string {
	if cfg.NullTarget {
		return "/dev/null"
	}
	return filepath.Join(dir, "mirror.img")
}

// otherCaptures counts the capture instances pinned under root: `lifeboat
// agent release` detaches one.
func otherCaptures(root string) int {
	entries, err := os.ReadDir(root)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		// A directory without pinned programs is an empty leftover.
		if links, _ := filepath.Glob(filepath.Join(root, e.Name(), "link_*")); len(links) > 0 {
			n++
		}
	}
	return n
}

// bpfStatsEnabled reports kernel.bpf_stats_enabled.
func bpfStatsEnabled() bool {
	b, err := os.ReadFile("/proc/sys/kernel/bpf_stats_enabled")
	return err == nil && strings.TrimSpace(string(b)) == "1"
}
