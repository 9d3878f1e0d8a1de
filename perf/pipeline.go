package perf

// The pipeline benchmark (RunPipeline) measures replication end to end:
// fio churn on a loop device → `lifeboat agent` → `lifeboat process-server`
// → Azurite, and, in the same run and against the same Azurite, the raw
// Put Page throughput every result is compared with (the ceiling).

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/processserver"
)

// ASRChurnLimit is Azure Site Recovery's per-disk churn limit (20 MB/s),
// the first standard level of the pipeline benchmark.
const ASRChurnLimit = 20e6

// Labels of pipeline levels: why a level ran.
const (
	LevelASR         = "asr-20MB/s"   // ASRChurnLimit
	LevelHalfCeiling = "half-ceiling" // half the ceiling measured in the run
	LevelRate        = "rate"         // a rate given in PipelineConfig.Rates
	LevelSearch      = "search"       // a step of the search for the highest sustained churn
)

// Names the benchmark gives its machine, disk and certificates.
const (
	pipelineMachine  = "bench"
	pipelineDisk     = "disk"
	pipelinePSName   = "ps"
	ceilingContainer = "lifeboat-ceiling"
)

// PipelineConfig configures RunPipeline. The zero value of every field
// selects its documented default.
type PipelineConfig struct {
	// Exe is the lifeboat binary run as "<Exe> agent ...", "<Exe>
	// process-server ...", "<Exe> pki ..." and "<Exe> keys init ...".
	// Default: os.Executable().
	Exe string
	// Dir holds the loop device's sparse backing file. Default: /dev/shm,
	// so the protected disk itself is never the bottleneck.
	Dir string
	// WorkDir holds PKI, recovery key, agent state and the process
	// server's cache directories (one private subdirectory, removed at
	// the end). Default: os.TempDir(), a real disk like a process
	// server's cache.
	WorkDir string
	// DeviceSize is the loop device size in bytes (multiple of 512, at
	// least 16 MiB); fio writes at random offsets across all of it.
	// Default: 1 GiB.
	DeviceSize int64
	// Runtime is each level's fio duration (at least 1 s). Default: 20 s.
	Runtime time.Duration
	// Rates are churn levels in bytes/s to run instead of the standard
	// ones (ASRChurnLimit and half the ceiling).
	Rates []float64
	// SkipSearch skips the search for the highest sustained churn that
	// follows the levels.
	SkipSearch bool
	// SearchLevels bounds the levels the search may run per block size.
	// Default: 6.
	SearchLevels int
	// BlockSizes are the fio block sizes; every level runs with each, in
	// order. Default: 64 KiB.
	BlockSizes []int64
	// IODepth is fio's iodepth. Default: 8.
	IODepth int
	// CompressiblePercent is fio's buffer_compress_percentage (0-99).
	// Default 0: incompressible data, the worst case for throughput.
	CompressiblePercent int
	// CeilingBytes is how many bytes each ceiling measurement writes with
	// 4 MiB Put Pages (rounded up to 4 MiB). Default: the bytes of one
	// level at ASRChurnLimit (20 MB/s × Runtime), at least 64 MiB.
	CeilingBytes int64
	// AzuriteInMemory runs Azurite with --inMemoryPersistence instead of
	// on disk (the default, as a storage account persists).
	AzuriteInMemory bool
	// CacheDirs is how many cache directories the process server gets
	// (cache.DefaultGeometry: 3 → 2 data + 1 parity). Default: 3.
	CacheDirs int
	// ProfileDir, if set, keeps each level's CPU profiles there, for go
	// tool pprof: the process server's (level-N.pprof) and the agent's
	// (level-N-agent.pprof).
	ProfileDir string
	// SampleInterval is how often the manifest is read for RPO and apply
	// lag. Default: 250 ms.
	SampleInterval time.Duration
	// IOEngine is fio's ioengine. Default as in CaptureConfig.
	IOEngine string
	// Fio is the fio binary. Default: "fio" from PATH.
	Fio string
	// ReadyTimeout bounds the start of the process server and the agent's
	// READY=1. Default: 60 s.
	ReadyTimeout time.Duration
	// SyncTimeout bounds the initial sync (agent start until the replica
	// holds the whole device). Default: 10 min.
	SyncTimeout time.Duration
	// DrainTimeout bounds the wait after each level until the journal and
	// the replica hold all of its writes. Default: 5 min.
	DrainTimeout time.Duration
	// StopTimeout bounds each child's exit after SIGTERM before it is
	// killed. Default: 90 s (the agent waits up to 1 min for its last
	// acknowledgement).
	StopTimeout time.Duration
}

func (cfg PipelineConfig) withDefaults() (PipelineConfig, error) {
	if cfg.Dir == "" {
		cfg.Dir = "/dev/shm"
	}
	if cfg.WorkDir == "" {
		cfg.WorkDir = os.TempDir()
	}
	if cfg.DeviceSize == 0 {
		cfg.DeviceSize = 1 << 30
	}
	if cfg.Runtime == 0 {
		cfg.Runtime = 20 * time.Second
	}
	if cfg.SearchLevels == 0 {
		cfg.SearchLevels = 6
	}
	if len(cfg.BlockSizes) == 0 {
		cfg.BlockSizes = []int64{64 << 10}
	}
	if cfg.IODepth == 0 {
		cfg.IODepth = 8
	}
	if cfg.CeilingBytes == 0 {
		cfg.CeilingBytes = max(int64(ASRChurnLimit*cfg.Runtime.Seconds()), 64<<20)
	}
	cfg.CeilingBytes = (cfg.CeilingBytes + blobstore.MaxPutPage - 1) / blobstore.MaxPutPage * blobstore.MaxPutPage
	if cfg.CacheDirs == 0 {
		cfg.CacheDirs = 3
	}
	if cfg.SampleInterval == 0 {
		cfg.SampleInterval = 250 * time.Millisecond
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
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 5 * time.Minute
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = 90 * time.Second
	}
	switch {
	case cfg.Runtime < time.Second:
		return cfg, fmt.Errorf("runtime %s is too short (minimum 1s)", cfg.Runtime)
	case cfg.DeviceSize < 16<<20 || cfg.DeviceSize%512 != 0:
		return cfg, fmt.Errorf("device size %d must be a multiple of 512 and at least 16 MiB", cfg.DeviceSize)
	case cfg.SearchLevels < 1:
		return cfg, fmt.Errorf("search levels must be at least 1, got %d", cfg.SearchLevels)
	case cfg.IODepth < 1:
		return cfg, fmt.Errorf("iodepth must be at least 1, got %d", cfg.IODepth)
	case cfg.CompressiblePercent < 0 || cfg.CompressiblePercent > 99:
		return cfg, fmt.Errorf("compressible percentage %d must be 0-99", cfg.CompressiblePercent)
	case cfg.CeilingBytes < 0:
		return cfg, fmt.Errorf("ceiling bytes %d is negative", cfg.CeilingBytes)
	case cfg.CacheDirs < 1:
		return cfg, fmt.Errorf("cache directories must be at least 1, got %d", cfg.CacheDirs)
	case cfg.SampleInterval < 10*time.Millisecond:
		return cfg, fmt.Errorf("sample interval %s is too short (minimum 10ms)", cfg.SampleInterval)
	}
	for _, r := range cfg.Rates {
		if !(r >= 1e5) { // also rejects NaN
			return cfg, fmt.Errorf("churn rate %v bytes/s is below 0.1 MB/s", r)
		}
	}
	seen := map[int64]bool{}
	for _, bs := range cfg.BlockSizes {
		// Not past a segment: the as-stored ceiling writes a segment's
		// bytes as Put Pages of bs.
		if bs < 512 || bs%512 != 0 || bs > processserver.DefaultSegmentBytes {
			return cfg, fmt.Errorf("block size %d must be a multiple of 512 between 512 and %d MiB (a journal segment)", bs, processserver.DefaultSegmentBytes>>20)
		}
		if seen[bs] {
			return cfg, fmt.Errorf("block size %d listed twice", bs)
		}
		seen[bs] = true
	}
	return cfg, nil
}

// ParseBlockSizes parses block sizes such as "64k", "4K", "1m" or "65536".
func ParseBlockSizes(ss []string) ([]int64, error) {
	var out []int64
	for _, s := range ss {
		s = strings.TrimSpace(s)
		mult := int64(1)
		switch {
		case strings.HasSuffix(strings.ToLower(s), "k"):
			mult, s = 1<<10, s[:len(s)-1]
		case strings.HasSuffix(strings.ToLower(s), "m"):
			mult, s = 1<<20, s[:len(s)-1]
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("block size %q: want a positive number with optional k or m suffix", s)
		}
		out = append(out, n*mult)
	}
	return out, nil
}

// RunPipeline runs the pipeline benchmark and returns its report. It needs
// root (loop device, eBPF), fio, Node.js for Azurite, and a lifeboat
// binary. Progress lines go to progress (may be io.Discard); diagnostics to
// log.
//
// One run starts Azurite once, measures the ceiling (raw 4 MiB Put Page
// with 1 and 4 clients), then starts a process server and an agent
// protecting a fresh loop device, waits for the initial sync and runs the
// levels: each fio rate (Rates, or ASRChurnLimit and half the ceiling) for
// each block size, then the search for the highest sustained churn. After
// every level it waits until the journal and the replica hold all of the
// level's writes, so levels do not inherit each other's backlog.
//
// Everything is torn down before it returns, also on error or
// cancellation: agent stopped and released, process server stopped, loop
// device detached, Azurite stopped, directories removed. On error the
// report (nil if the ceiling was not measured) holds what was measured
// before it.
func RunPipeline(ctx context.Context, cfg PipelineConfig, log *slog.Logger, progress io.Writer) (rep *PipelineReport, err error) {
	defer func() {
		if err != nil && rep != nil {
			rep.Error = err.Error() // a partial report says so
		}
	}()
	cfg, err = cfg.withDefaults()
	if err != nil {
		return nil, fmt.Errorf("pipeline benchmark: %w", err)
	}
	if progress == nil {
		progress = io.Discard
	}
	if cfg.Fio, err = exec.LookPath(cfg.Fio); err != nil {
		return nil, fmt.Errorf("pipeline benchmark needs fio (install it with `apt-get install fio`): %w", err)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("pipeline benchmark must run as root (it attaches a loop device and runs the agent)")
	}
	if cfg.Exe == "" {
		if cfg.Exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("locate lifeboat executable: %w", err)
		}
	}
	if _, err := os.Stat(cfg.Exe); err != nil {
		return nil, fmt.Errorf("lifeboat executable: %w", err)
	}
	if cfg.ProfileDir != "" {
		if err := os.MkdirAll(cfg.ProfileDir, 0o755); err != nil {
			return nil, fmt.Errorf("profile directory: %w", err)
		}
	}
	for _, d := range []string{cfg.Dir, cfg.WorkDir} {
		if st, err := os.Stat(d); err != nil {
			return nil, fmt.Errorf("benchmark directory: %w", err)
		} else if !st.IsDir() {
			return nil, fmt.Errorf("benchmark directory %s is not a directory", d)
		}
	}

	p := &pipeline{cfg: cfg, log: log, progress: progress}
	defer func() {
		if cErr := p.cleanup(); cErr != nil {
			err = errors.Join(err, cErr)
		}
	}()
	rep = &PipelineReport{
		Started:    time.Now().UTC(),
		Kernel:     kernelRelease(),
		FioVersion: fioVersion(ctx, cfg.Fio),
		Settings: PipelineSettings{
			Exe:                 cfg.Exe,
			Dir:                 cfg.Dir,
			DeviceSizeBytes:     cfg.DeviceSize,
			RuntimeSeconds:      cfg.Runtime.Seconds(),
			Rates:               cfg.Rates,
			Search:              !cfg.SkipSearch,
			BlockSizes:          cfg.BlockSizes,
			IODepth:             cfg.IODepth,
			IOEngine:            cfg.IOEngine,
			CompressiblePercent: cfg.CompressiblePercent,
			CeilingBytes:        cfg.CeilingBytes,
			AzuriteInMemory:     cfg.AzuriteInMemory,
			CacheDirs:           cfg.CacheDirs,
			SampleIntervalMs:    cfg.SampleInterval.Milliseconds(),
		},
	}
	if err := p.startAzurite(ctx); err != nil {
		return nil, err
	}
	rep.Azurite = p.azurite.String()
	if !cfg.AzuriteInMemory {
		rep.Azurite += " (disk)"
	} else {
		rep.Azurite += " (memory)"
	}
	for _, clients := range []int{1, 4} {
		fmt.Fprintf(progress, "ceiling: %d MB with %d client(s): ", cfg.CeilingBytes/1e6, clients)
		cpu0, t0 := p.azuriteCPU(), time.Now()
		run, err := measureCeiling(ctx, p.azurite.ConnectionString(), clients, cfg.CeilingBytes)
		if err != nil {
			fmt.Fprintln(progress, "failed")
			return nil, err
		}
		// Over the whole call (set-up included), as the CPU reading is.
		run.AzuriteCPU = cpuShare(cpu0, p.azuriteCPU(), time.Since(t0).Seconds())
		fmt.Fprintf(progress, "%.1f MB/s%s\n", run.MBPerSec, fmtAzuriteCPU(run.AzuriteCPU))
		rep.Ceiling.Runs = append(rep.Ceiling.Runs, run)
		rep.Ceiling.MBPerSec = max(rep.Ceiling.MBPerSec, run.MBPerSec)
	}
	for _, bs := range cfg.BlockSizes {
		fmt.Fprintf(progress, "ceiling as stored (journal blob + %s Put Pages of the same bytes), %d MB: ", fmtSize(bs), cfg.CeilingBytes/2e6)
		cpu0, t0 := p.azuriteCPU(), time.Now()
		run, err := measureStored(ctx, p.azurite.ConnectionString(), bs, cfg.CeilingBytes/2, cfg.DeviceSize)
		if err != nil {
			fmt.Fprintln(progress, "failed")
			return nil, err
		}
		run.AzuriteCPU = cpuShare(cpu0, p.azuriteCPU(), time.Since(t0).Seconds())
		run.CeilingRatio = run.MBPerSec / rep.Ceiling.MBPerSec
		fmt.Fprintf(progress, "%.1f MB/s = %.2f × ceiling%s\n", run.MBPerSec, run.CeilingRatio, fmtAzuriteCPU(run.AzuriteCPU))
		rep.Ceiling.Stored = append(rep.Ceiling.Stored, run)
	}
	if err := p.dropCeilingContainer(ctx); err != nil {
		log.Warn("delete ceiling container", "err", err)
	}

	// One line after the fact: the agent's STATUS logs interleave.
	syncSecs, err := p.start(ctx)
	if err != nil {
		return rep, err
	}
	fmt.Fprintf(progress, "initial sync of %d MiB: %.1f s\n", cfg.DeviceSize>>20, syncSecs)
	rep.InitialSyncSeconds = syncSecs

	ceiling := rep.Ceiling.MBPerSec * 1e6
	for _, bs := range cfg.BlockSizes {
		type planned struct {
			label string
			rate  float64
		}
		var plan []planned
		if len(cfg.Rates) > 0 {
			for _, r := range cfg.Rates {
				plan = append(plan, planned{LevelRate, r})
			}
		} else {
			plan = []planned{{LevelASR, ASRChurnLimit}, {LevelHalfCeiling, ceiling / 2}}
		}
		var tried []ratePoint
		run := func(label string, rate float64) error {
			n := len(rep.Levels) + 1
			fmt.Fprintf(progress, "[%d] %s, %s at %.1f MB/s: ", n, label, fmtSize(bs), rate/1e6)
			l, err := p.runLevel(ctx, label, rate, bs, ceiling)
			if err != nil {
				fmt.Fprintln(progress, "failed")
				return fmt.Errorf("level %d (%s, %s at %.1f MB/s): %w", n, label, fmtSize(bs), rate/1e6, err)
			}
			fmt.Fprintln(progress, l.summary())
			rep.Levels = append(rep.Levels, l)
			tried = append(tried, ratePoint{Rate: rate, Sustained: l.Sustained})
			return nil
		}
		for _, pl := range plan {
			if err := run(pl.label, pl.rate); err != nil {
				return rep, err
			}
		}
		if cfg.SkipSearch {
			continue
		}
		for range cfg.SearchLevels {
			next, ok := nextSearchRate(tried, 2*ceiling)
			if !ok {
				break
			}
			if err := run(LevelSearch, next); err != nil {
				return rep, err
			}
		}
	}
	rep.finish()
	return rep, nil
}

// pipeline is the state of one RunPipeline: what is running and what must
// be torn down.
type pipeline struct {
	cfg      PipelineConfig
	log      *slog.Logger
	progress io.Writer

	azurite  *azurite.Server
	store    blobstore.Store // the process server's container
	work     string          // private directory under WorkDir
	loopDir  string          // private directory under Dir
	dev      string
	backing  string
	ps       *child
	psAddr   string
	metrics  string // process server metrics URL
	agent    *child
	agentURL string // agent metrics and profiles, with ProfileDir
	notify   *notifyListener
	stateDir string
	sampler  *manifestSampler
	stopSamp context.CancelFunc
	sampDone chan struct{}
	levels   int // levels run so far
}

// azuriteCPU returns the CPU seconds Azurite has used, or a negative
// number when they cannot be read (a real account has no process here).
func (p *pipeline) azuriteCPU() float64 {
	pid := p.azurite.Pid()
	if pid == 0 {
		return -1
	}
	s, err := procCPUSeconds(pid)
	if err != nil {
		return -1
	}
	return s
}

// cpuShare is the cores used between two CPU readings secs apart, or nil
// when either reading failed.
func cpuShare(cpu0, cpu1, secs float64) *float64 {
	if cpu0 < 0 || cpu1 < cpu0 || secs <= 0 {
		return nil
	}
	v := (cpu1 - cpu0) / secs
	return &v
}

func (p *pipeline) startAzurite(ctx context.Context) error {
	srv, err := azurite.Start(ctx, azurite.Options{InMemory: p.cfg.AzuriteInMemory})
	if err != nil {
		return fmt.Errorf("start azurite: %w", err)
	}
	p.azurite = srv
	p.log.Debug("azurite started", "server", srv.String(), "location", srv.Location())
	return nil
}

func (p *pipeline) dropCeilingContainer(ctx context.Context) error {
	st, err := azure.New(azure.Config{ConnectionString: p.azurite.ConnectionString(), Container: ceilingContainer})
	if err != nil {
		return err
	}
	return st.DeleteContainer(ctx)
}

// start sets up PKI and recovery key, starts the process server, attaches
// the loop device and starts the agent. It returns once the initial sync
// is in the journal and the replica, and how long that took since the
// agent started.
func (p *pipeline) start(ctx context.Context) (float64, error) {
	var err error
	if p.work, err = os.MkdirTemp(p.cfg.WorkDir, "lifeboat-pipeline-"); err != nil {
		return 0, fmt.Errorf("create work directory: %w", err)
	}
	pkiDir := filepath.Join(p.work, "pki")
	keyFile := filepath.Join(p.work, "recovery.key")
	p.stateDir = filepath.Join(p.work, "agent-state")
	for _, args := range [][]string{
		{"pki", "init", "--dir", pkiDir},
		{"pki", "issue", "--dir", pkiDir, "--name", pipelinePSName, "--role", "process-server"},
		{"pki", "issue", "--dir", pkiDir, "--name", pipelineMachine, "--role", "agent"},
		{"keys", "init", "--to", keyFile},
	} {
		if out, err := exec.CommandContext(ctx, p.cfg.Exe, args...).CombinedOutput(); err != nil {
			return 0, fmt.Errorf("%s %s: %w: %s", filepath.Base(p.cfg.Exe), strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	var caches []string
	for i := range p.cfg.CacheDirs {
		d := filepath.Join(p.work, fmt.Sprintf("cache%d", i))
		if err := os.Mkdir(d, 0o700); err != nil {
			return 0, fmt.Errorf("create cache directory: %w", err)
		}
		caches = append(caches, d)
	}
	if err := os.Mkdir(p.stateDir, 0o700); err != nil {
		return 0, fmt.Errorf("create agent state directory: %w", err)
	}

	// Ports are picked free and released for the child to bind: a small
	// race with other programs, acceptable for a benchmark.
	listen, err := freeLocalAddr()
	if err != nil {
		return 0, err
	}
	metricsAddr, err := freeLocalAddr()
	if err != nil {
		return 0, err
	}
	p.psAddr, p.metrics = listen, "http://"+metricsAddr+"/metrics"
	psArgs := []string{"process-server",
		"--listen", listen,
		"--pki", pkiDir,
		"--name", pipelinePSName,
		"--cache", strings.Join(caches, ","),
		"--recovery-key", keyFile,
		"--metrics", metricsAddr,
		"--pprof",
	}
	env := append(envWithout(os.Environ(), azurite.EnvConnectionString), azurite.EnvConnectionString+"="+p.azurite.ConnectionString())
	if p.ps, err = startChild("process server", p.cfg.Exe, psArgs, env, p.log); err != nil {
		return 0, err
	}
	if err := p.waitMetrics(ctx); err != nil {
		return 0, err
	}
	if p.store, err = azure.New(azure.Config{ConnectionString: p.azurite.ConnectionString(), Container: layout.DefaultContainer}); err != nil {
		return 0, err
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p.sampler = newManifestSampler(p.store, pipelineMachine, p.cfg.SampleInterval, p.log)
	p.stopSamp, p.sampDone = cancel, make(chan struct{})
	go func() {
		defer close(p.sampDone)
		p.sampler.run(sctx)
	}()

	if p.loopDir, err = os.MkdirTemp(p.cfg.Dir, "lifeboat-pipeline-"); err != nil {
		return 0, fmt.Errorf("create loop directory: %w", err)
	}
	p.backing = filepath.Join(p.loopDir, "disk.img")
	if p.dev, err = attachLoop(ctx, p.backing, p.cfg.DeviceSize); err != nil {
		p.backing = ""
		return 0, err
	}

	// The notify socket lives in its own short temp path: WorkDir may be
	// too long for sun_path's 108 bytes.
	ndir, err := os.MkdirTemp("", "lifeboat-notify-")
	if err != nil {
		return 0, fmt.Errorf("create notify directory: %w", err)
	}
	defer os.RemoveAll(ndir)
	if p.notify, err = listenNotify(ndir, p.log); err != nil {
		return 0, err
	}
	agentArgs := []string{"agent",
		"--process-server", listen,
		"--pki", pkiDir,
		"--name", pipelineMachine,
		"--device", pipelineDisk + "=" + p.dev,
		"--state-dir", p.stateDir,
		// fsfreeze of a device without a file system is not what is
		// measured here.
		"--app-interval", "0",
	}
	if p.cfg.ProfileDir != "" {
		addr, err := freeLocalAddr()
		if err != nil {
			return 0, err
		}
		p.agentURL = "http://" + addr
		agentArgs = append(agentArgs, "--metrics", addr, "--pprof")
	}
	started := time.Now()
	env = append(envWithout(os.Environ(), "NOTIFY_SOCKET"), "NOTIFY_SOCKET="+p.notify.path)
	if p.agent, err = startChild("agent", p.cfg.Exe, agentArgs, env, p.log); err != nil {
		return 0, err
	}
	if err := p.notify.wait(ctx, readyMsg, p.cfg.ReadyTimeout, p.agent.exited); err != nil {
		return 0, p.agent.failed(fmt.Errorf("agent %s: %w", readyMsg, err))
	}
	if err := p.notify.wait(ctx, syncedMsg, p.cfg.SyncTimeout, p.agent.exited); err != nil {
		return 0, p.agent.failed(fmt.Errorf("agent %s: %w", syncedMsg, err))
	}
	synced := time.Now()
	p.log.Debug("agent synced", "pid", p.agent.pid(), "seconds", synced.Sub(started).Seconds())
	_, applied, err := p.settle(ctx, synced, p.cfg.SyncTimeout)
	if err != nil {
		return 0, fmt.Errorf("initial sync: %w", err)
	}
	return applied.Sub(started).Seconds(), nil
}

// freeLocalAddr returns a 127.0.0.1 address with a port free right now.
func freeLocalAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// waitMetrics waits until the process server serves metrics, which it does
// only once its agent listener is up.
func (p *pipeline) waitMetrics(ctx context.Context) error {
	deadline := time.Now().Add(p.cfg.ReadyTimeout)
	for {
		if _, err := p.scrape(ctx); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return p.ps.failed(fmt.Errorf("process server not serving %s within %s: %w", p.metrics, p.cfg.ReadyTimeout, err))
		}
		select {
		case <-p.ps.exited:
			return p.ps.failed(errors.New("process server exited during start-up"))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// metricReceived is the process server's count of bytes received from
// agents: the raw side of the compression ratio and of CPU per GB.
const metricReceived = "lifeboat_ps_received_bytes_total"

var metricsClient = &http.Client{Timeout: 5 * time.Second}

// scrape reads the process server's metrics.
func (p *pipeline) scrape(ctx context.Context) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.metrics, nil)
	if err != nil {
		return nil, err
	}
	resp, err := metricsClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", p.metrics, resp.Status)
	}
	return parseMetrics(resp.Body)
}

// parseMetrics reads unlabelled samples of the Prometheus text format
// (labelled series and comments are skipped: the benchmark needs only the
// process server's global counters).
func parseMetrics(r io.Reader) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok || strings.ContainsRune(name, '{') {
			continue
		}
		val, _, _ = strings.Cut(strings.TrimSpace(val), " ") // drop a timestamp
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return nil, fmt.Errorf("metric %s: %w", name, err)
		}
		out[name] = v
	}
	return out, sc.Err()
}

// counters are the cumulative figures a level is the difference of.
type counters struct {
	at         time.Time
	received   float64
	psCPU      float64
	agentCPU   float64
	azuriteCPU float64 // negative: not available
	durableSeq uint64
}

func (p *pipeline) readCounters(ctx context.Context) (counters, error) {
	var c counters
	m, err := p.scrape(ctx)
	if err != nil {
		return c, fmt.Errorf("read process server metrics: %w", err)
	}
	c.received = m[metricReceived]
	if c.psCPU, err = procCPUSeconds(p.ps.pid()); err != nil {
		return c, err
	}
	if c.agentCPU, err = procCPUSeconds(p.agent.pid()); err != nil {
		return c, err
	}
	c.azuriteCPU = p.azuriteCPU()
	if s, ok := p.sampler.latest(); ok {
		c.durableSeq = s.Durable
	}
	c.at = time.Now()
	return c, nil
}

// runLevel runs fio at rate with block size bs, waits until the journal
// and the replica hold everything, and evaluates the level.
func (p *pipeline) runLevel(ctx context.Context, label string, rate float64, bs int64, ceiling float64) (PipelineLevel, error) {
	l := PipelineLevel{Label: label, BlockSize: bs, RateMBPerSec: rate / 1e6}
	if err := p.alive(); err != nil {
		return l, err
	}
	syscall.Sync()
	c0, err := p.readCounters(ctx)
	if err != nil {
		return l, err
	}
	start := time.Now()
	type profResult struct {
		cpu  map[string]float64
		recv int64 // bytes received over the profile's window
		err  error
	}
	profCh := make(chan profResult, 1)
	agentProf := make(chan error, 1)
	go func() {
		keep := ""
		if p.cfg.ProfileDir != "" {
			keep = filepath.Join(p.cfg.ProfileDir, fmt.Sprintf("level-%d.pprof", p.levels+1))
		}
		// The bytes are counted around the profile, not around fio: the
		// profile lasts whole seconds, fio its runtime plus its start.
		r0, err := p.readCounters(ctx)
		if err != nil {
			profCh <- profResult{err: err}
			return
		}
		cpu, err := profileStages(ctx, strings.TrimSuffix(p.metrics, "/metrics"), p.cfg.Runtime, keep)
		if err != nil {
			profCh <- profResult{err: err}
			return
		}
		r1, err := p.readCounters(ctx)
		profCh <- profResult{cpu, int64(r1.received - r0.received), err}
	}()
	go func() {
		var err error
		if p.agentURL != "" {
			keep := filepath.Join(p.cfg.ProfileDir, fmt.Sprintf("level-%d-agent.pprof", p.levels+1))
			_, err = fetchProfile(ctx, "agent", p.agentURL, p.cfg.Runtime, keep)
		}
		agentProf <- err
	}()
	res, err := runPipelineFio(ctx, p.cfg, p.dev, bs, rate, p.work)
	if err != nil {
		return l, err
	}
	end := time.Now()
	cEnd, err := p.readCounters(ctx)
	if err != nil {
		return l, err
	}
	prof := <-profCh
	if prof.err != nil {
		return l, prof.err
	}
	if err := <-agentProf; err != nil {
		return l, err
	}
	l.setStages(prof.cpu, prof.recv)
	p.levels++
	durableAt, appliedAt, err := p.settle(ctx, end, p.cfg.DrainTimeout)
	if err != nil {
		return l, err
	}
	c1, err := p.readCounters(ctx)
	if err != nil {
		return l, err
	}
	sealed, segs, err := p.sealedBytes(ctx, c0.durableSeq, c1.durableSeq)
	if err != nil {
		return l, err
	}

	l.WindowSeconds = end.Sub(start).Seconds()
	l.BytesWritten = res.IOBytes
	l.ChurnMBPerSec = res.BWBytes / 1e6
	l.P99WriteUs = res.P99Ns / 1e3
	l.JournalCatchUpSeconds = durableAt.Sub(end).Seconds()
	l.ReplicaCatchUpSeconds = appliedAt.Sub(end).Seconds()
	l.ReceivedBytes = int64(c1.received - c0.received)
	l.SealedBytes = sealed
	l.Segments = segs
	l.PSCPUSeconds = c1.psCPU - c0.psCPU
	l.AgentCPUSeconds = c1.agentCPU - c0.agentCPU
	l.AzuriteCPU = cpuShare(c0.azuriteCPU, cEnd.azuriteCPU, cEnd.at.Sub(c0.at).Seconds())
	evaluateLevel(&l, p.sampler.between(start, appliedAt), start, end, durableAt, appliedAt, ceiling)
	return l, nil
}

// sealedBytes sums the sizes of the journal segments holding records
// after..upTo.
func (p *pipeline) sealedBytes(ctx context.Context, after, upTo uint64) (int64, int, error) {
	blobs, err := p.store.ListBlobs(ctx, layout.JournalPrefix(pipelineMachine))
	if err != nil {
		return 0, 0, fmt.Errorf("list journal segments: %w", err)
	}
	var sum int64
	n := 0
	for _, b := range blobs {
		first, last, err := layout.ParseSegmentName(b.Name)
		if err != nil {
			continue
		}
		if first > after && last <= upTo {
			sum += b.Size
			n++
		}
	}
	return sum, n, nil
}

// alive reports an error when the agent or the process server has exited.
func (p *pipeline) alive() error {
	for _, c := range []*child{p.ps, p.agent} {
		if c != nil && !c.running() {
			return c.failed(fmt.Errorf("%s exited unexpectedly", c.name))
		}
	}
	return nil
}

// settle waits until the journal holds every write made before t
// (recoverable_until ≥ t) and then until the replica has applied what the
// journal held at that moment. It returns the times of the manifest
// samples that first showed each.
func (p *pipeline) settle(ctx context.Context, t time.Time, timeout time.Duration) (durableAt, appliedAt time.Time, err error) {
	deadline := time.Now().Add(timeout)
	var target uint64
	next := p.sampler.firstAt(t)
	for {
		samples := p.sampler.since(next)
		next += len(samples)
		for _, s := range samples {
			if durableAt.IsZero() && !s.RecoverableUntil.Before(t) {
				durableAt, target = s.At, s.Durable
			}
			if !durableAt.IsZero() && s.Applied >= target {
				return durableAt, s.At, nil
			}
		}
		if err := p.alive(); err != nil {
			return durableAt, appliedAt, err
		}
		if time.Now().After(deadline) {
			last, _ := p.sampler.latest()
			what := "the journal to hold every write"
			if !durableAt.IsZero() {
				what = fmt.Sprintf("the replica to apply up to seq %d", target)
			}
			return durableAt, appliedAt, fmt.Errorf("waited %s for %s made before %s; manifest: durable_seq %d, applied_seq %d, recoverable_until %s (%d manifest reads failed)",
				timeout, what, t.UTC().Format(time.RFC3339Nano), last.Durable, last.Applied,
				last.RecoverableUntil.Format(time.RFC3339Nano), p.sampler.failures.Load())
		}
		select {
		case <-ctx.Done():
			return durableAt, appliedAt, ctx.Err()
		case <-time.After(p.cfg.SampleInterval / 2):
		}
	}
}

// cleanup tears everything down in dependency order. It ignores
// cancellation: it must run after it too.
func (p *pipeline) cleanup() error {
	var errs []error
	if p.agent != nil {
		if err := p.agent.stop(p.cfg.StopTimeout); err != nil {
			errs = append(errs, err)
		}
		// A clean stop leaves capture pinned on the device.
		out, err := exec.Command(p.cfg.Exe, "agent", "release", "--state-dir", p.stateDir, "--name", pipelineMachine).CombinedOutput()
		if err != nil {
			errs = append(errs, fmt.Errorf("agent release: %w: %s", err, strings.TrimSpace(string(out))))
		}
	}
	if p.notify != nil {
		p.notify.Close()
	}
	if p.stopSamp != nil {
		p.stopSamp()
		<-p.sampDone
	}
	if p.ps != nil {
		if err := p.ps.stop(p.cfg.StopTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	if p.dev != "" {
		if err := detachLoop(p.dev, p.backing); err != nil {
			errs = append(errs, err)
		}
	}
	if p.loopDir != "" {
		if err := os.RemoveAll(p.loopDir); err != nil {
			errs = append(errs, fmt.Errorf("remove loop directory: %w", err))
		}
	}
	if p.work != "" {
		if err := os.RemoveAll(p.work); err != nil {
			errs = append(errs, fmt.Errorf("remove work directory: %w", err))
		}
	}
	if p.azurite != nil {
		if err := p.azurite.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// child is a lifeboat subprocess (agent or process server).
type child struct {
	name    string
	log     *slog.Logger
	cmd     *exec.Cmd
	stderr  *tailBuffer
	exited  chan struct{} // closed when cmd.Wait returns
	waitErr error         // valid once exited is closed
}

func startChild(name, exe string, args, env []string, log *slog.Logger) (*child, error) {
	c := &child{name: name, log: log, stderr: newTailBuffer(outputTail), exited: make(chan struct{})}
	cmd := exec.Command(exe, args...)
	cmd.Env = env
	cmd.Stdout = c.stderr // only the agent's counters line; keep it with the logs
	cmd.Stderr = c.stderr
	// Own process group: a terminal ^C reaches only the harness, which
	// then stops the children in order; never leave them (and the agent's
	// BPF programs) behind if the harness dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	cmd.WaitDelay = 5 * time.Second
	c.cmd = cmd
	log.Debug("start "+name, "exe", exe, "args", strings.Join(args, " "))
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s %s: %w", name, exe, err)
	}
	go func() {
		c.waitErr = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

func (c *child) running() bool {
	select {
	case <-c.exited:
		return false
	default:
		return true
	}
}

// failed wraps err with the child's exit status, if it exited, and the
// tail of its output.
func (c *child) failed(err error) error {
	if !c.running() {
		err = fmt.Errorf("%w (%s: %v)", err, c.name, c.waitErr)
	}
	out := strings.TrimSpace(c.stderr.String())
	if out == "" {
		out = "(no output)"
	}
	return fmt.Errorf("%w; %s output: %s", err, c.name, out)
}

// stop sends SIGTERM, waits up to timeout (then SIGKILLs) and reports an
// exit status other than 0. Idempotent.
func (c *child) stop(timeout time.Duration) error {
	if !c.running() {
		if c.waitErr != nil {
			return c.failed(fmt.Errorf("%s had exited", c.name))
		}
		return nil
	}
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		c.log.Warn("signal "+c.name, "err", err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-c.exited:
		if c.waitErr != nil {
			return c.failed(fmt.Errorf("stop %s", c.name))
		}
		return nil
	case <-timer.C:
		_ = c.cmd.Process.Kill()
		<-c.exited
		return c.failed(fmt.Errorf("%s did not exit within %s of SIGTERM; killed", c.name, timeout))
	}
}

// measureCeiling writes total bytes with 4 MiB Put Pages (azure.Store
// WritePages, CRC64 checksum included, no decorators) from clients parallel
// clients, each its own Store and page blob, and returns the throughput.
func measureCeiling(ctx context.Context, connStr string, clients int, total int64) (CeilingRun, error) {
	const chunk = blobstore.MaxPutPage
	const blobSize = 64 * chunk // offsets wrap: measures writes, not growth of Azurite's extents
	run := CeilingRun{Clients: clients}
	stores := make([]*azure.Store, clients)
	for i := range stores {
		st, err := azure.New(azure.Config{ConnectionString: connStr, Container: ceilingContainer})
		if err != nil {
			return run, err
		}
		if err := st.EnsureContainer(ctx); err != nil {
			return run, fmt.Errorf("ceiling: %w", err)
		}
		if err := st.CreatePageBlob(ctx, ceilingBlob(clients, i), blobSize, nil); err != nil {
			return run, fmt.Errorf("ceiling: %w", err)
		}
		stores[i] = st
	}
	data := make([]byte, chunk)
	rand.Read(data) // incompressible, like the benchmark's default churn
	n := (total + chunk - 1) / chunk
	var next atomic.Int64
	errs := make([]error, clients)
	var wg sync.WaitGroup
	start := time.Now()
	for c := range clients {
		wg.Go(func() {
			for i := next.Add(1); i <= n; i = next.Add(1) {
				if err := stores[c].WritePages(ctx, ceilingBlob(clients, c), (i%64)*chunk, data); err != nil {
					errs[c] = err
					return
				}
			}
		})
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	if err := errors.Join(errs...); err != nil {
		return run, fmt.Errorf("ceiling with %d client(s): %w", clients, err)
	}
	run.Bytes = n * chunk
	run.Seconds = secs
	run.MBPerSec = float64(run.Bytes) / 1e6 / secs
	return run, nil
}

// storedClients is measureStored's parallelism per kind of request, as in
// the process server: up to 4 journal uploads (uploadParallel) and 4 Put
// Pages of the applier at once, 8 requests in flight.
const storedClients = 4

// measureStored writes total bytes as the pipeline stores them: each
// segment (processserver.DefaultSegmentBytes) once as a journal block blob
// and once as Put Pages of bs bytes at random offsets of a page blob as
// big as the device, storedClients journal blobs and storedClients Put
// Pages at a time, until both are done.
func measureStored(ctx context.Context, connStr string, bs, total, device int64) (StoredRun, error) {
	seg := int64(processserver.DefaultSegmentBytes)
	run := StoredRun{BlockSize: bs, CeilingRun: CeilingRun{Clients: 2 * storedClients}}
	st, err := azure.New(azure.Config{ConnectionString: connStr, Container: ceilingContainer})
	if err != nil {
		return run, err
	}
	if err := st.EnsureContainer(ctx); err != nil {
		return run, fmt.Errorf("stored ceiling: %w", err)
	}
	replica := fmt.Sprintf("stored-%d", bs)
	if err := st.CreatePageBlob(ctx, replica, device, nil); err != nil {
		return run, fmt.Errorf("stored ceiling: %w", err)
	}
	data := make([]byte, seg)
	rand.Read(data)
	n := (total + seg - 1) / seg
	slots := device / bs
	pages := n * (seg / bs)
	var nextBlob, nextPage atomic.Int64
	errs := make([]error, 2*storedClients)
	var wg sync.WaitGroup
	start := time.Now()
	for c := range storedClients {
		wg.Go(func() {
			for i := nextBlob.Add(1); i <= n; i = nextBlob.Add(1) {
				if err := st.PutBlob(ctx, fmt.Sprintf("stored-journal/%d-%d", bs, i), data, nil); err != nil {
					errs[c] = err
					return
				}
			}
		})
		wg.Go(func() {
			rng := mrand.New(mrand.NewPCG(uint64(c), uint64(bs)))
			for i := nextPage.Add(1); i <= pages; i = nextPage.Add(1) {
				off := (i - 1) % (seg / bs) * bs
				if err := st.WritePages(ctx, replica, rng.Int64N(slots)*bs, data[off:off+bs]); err != nil {
					errs[storedClients+c] = err
					return
				}
			}
		})
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	if err := errors.Join(errs...); err != nil {
		return run, fmt.Errorf("stored ceiling (%s): %w", fmtSize(bs), err)
	}
	run.Bytes = n * seg
	run.Seconds = secs
	run.MBPerSec = float64(run.Bytes) / 1e6 / secs
	return run, nil
}

func ceilingBlob(clients, i int) string { return fmt.Sprintf("ceiling-%d-%d", clients, i) }

// pipelineFioArgs is the fio command line of one level: random writes at
// a fixed rate.
func pipelineFioArgs(cfg PipelineConfig, device string, bs int64, rate float64, out string) []string {
	a := []string{
		"--name=churn",
		"--filename=" + device,
		"--rw=randwrite",
		"--bs=" + strconv.FormatInt(bs, 10),
		"--iodepth=" + strconv.Itoa(cfg.IODepth),
		"--ioengine=" + cfg.IOEngine,
		"--direct=1",
		"--numjobs=1",
		"--thread", // see fioArgs
		"--time_based",
		"--runtime=" + strconv.FormatInt(cfg.Runtime.Milliseconds(), 10) + "ms",
		"--rate=" + strconv.FormatInt(int64(math.Round(rate)), 10),
		"--norandommap",
		"--randrepeat=0",
		// New content for every write: by default fio fills its iodepth
		// buffers once, and the journal's compressor finds the repeats
		// (about 10:1), which no real disk churn offers.
		"--refill_buffers",
		"--lat_percentiles=1",
		"--output-format=json",
		"--output=" + out,
	}
	if cfg.CompressiblePercent > 0 {
		a = append(a, "--buffer_compress_percentage="+strconv.Itoa(cfg.CompressiblePercent))
	}
	return a
}

func runPipelineFio(ctx context.Context, cfg PipelineConfig, device string, bs int64, rate float64, tmpDir string) (fioResult, error) {
	out := filepath.Join(tmpDir, "fio-churn.json")
	defer os.Remove(out)
	cmd := exec.CommandContext(ctx, cfg.Fio, pipelineFioArgs(cfg, device, bs, rate, out)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fioResult{}, ctx.Err()
		}
		return fioResult{}, fmt.Errorf("fio on %s: %w: %s", device, err, strings.TrimSpace(stderr.String()))
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return fioResult{}, fmt.Errorf("read fio output: %w", err)
	}
	res, err := parseFio(data)
	if err != nil {
		return fioResult{}, fmt.Errorf("fio on %s: %w", device, err)
	}
	return res, nil
}

// manifestSample is the manifest as read at At.
type manifestSample struct {
	At               time.Time // when the read returned: RPO at At is at most At − RecoverableUntil
	Durable, Applied uint64
	RecoverableUntil time.Time
}

// manifestSampler reads the machine's manifest every interval, for the
// whole run, and keeps every sample.
type manifestSampler struct {
	store    blobstore.Store
	machine  string
	interval time.Duration
	log      *slog.Logger
	failures atomic.Int64

	mu      sync.Mutex
	samples []manifestSample
}

func newManifestSampler(store blobstore.Store, machine string, interval time.Duration, log *slog.Logger) *manifestSampler {
	return &manifestSampler{store: store, machine: machine, interval: interval, log: log}
}

func (s *manifestSampler) run(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		m, err := recovery.ReadManifest(rctx, s.store, s.machine)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, recovery.ErrNoMachine):
		case err != nil:
			s.failures.Add(1)
			s.log.Debug("read manifest", "err", err)
		default:
			s.mu.Lock()
			s.samples = append(s.samples, manifestSample{At: time.Now(), Durable: m.DurableSeq, Applied: m.AppliedSeq, RecoverableUntil: m.RecoverableUntil})
			s.mu.Unlock()
		}
		// A ticker drops ticks while a slow read runs: samples stay
		// spaced by at least interval.
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// since returns the samples from index i on.
func (s *manifestSampler) since(i int) []manifestSample {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i >= len(s.samples) {
		return nil
	}
	return append([]manifestSample(nil), s.samples[i:]...)
}

// firstAt returns the index of the first sample taken at or after t
// (samples are in time order).
func (s *manifestSampler) firstAt(t time.Time) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, _ := slices.BinarySearchFunc(s.samples, t, func(x manifestSample, t time.Time) int { return x.At.Compare(t) })
	return i
}

// between returns the samples taken in [from, to].
func (s *manifestSampler) between(from, to time.Time) []manifestSample {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []manifestSample
	for _, x := range s.samples {
		if !x.At.Before(from) && !x.At.After(to) {
			out = append(out, x)
		}
	}
	return out
}

func (s *manifestSampler) latest() (manifestSample, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) == 0 {
		return manifestSample{}, false
	}
	return s.samples[len(s.samples)-1], true
}
