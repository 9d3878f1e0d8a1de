package agent

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/agent/stream"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/fsfreeze"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/sdnotify"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Defaults of `lifeboat agent`.
const (
	DefaultCrashInterval = 5 * time.Minute
	// DefaultReadbackDelay is the metadata-mode read-back delay of the
	// commands (Options.ReadbackDelay): under heavy random writes it
	// halves the agent's read-back I/O for a second of lag.
	DefaultReadbackDelay = time.Second
	DefaultAppInterval   = time.Hour
	DefaultStopTimeout   = time.Minute
)

// ProtectDevice is one device of the machine.
type ProtectDevice struct {
	Name string // the disk's name at the process server; "" = base name of Path
	Path string
}

// ProtectConfig configures `lifeboat agent`.
type ProtectConfig struct {
	ProcessServer string // host:port
	PKIDir        string // CA and the machine's agent certificate
	Name          string // machine name = certificate name
	Devices       []ProtectDevice
	Mode          capture.Mode
	RingBytes     int
	ReadbackDelay time.Duration // Options.ReadbackDelay (metadata mode)
	StateDir      string
	CrashInterval time.Duration // 0: off
	AppInterval   time.Duration // 0: off
	PreScript     string
	PostScript    string
	Metrics       string        // listen address of the Prometheus endpoint; "" = none
	Profiling     bool          // also serve Go's profiles there, under /debug/pprof/
	StopTimeout   time.Duration // how long a stop waits for the process server (default 1 min)
	Logger        *slog.Logger
	Progress      io.Writer     // initial sync progress
	Out           io.Writer     // the final counters line
	OnSynced      func()        // initial sync done (tests)
	Stats         *ProtectStats // filled in on return (tests)
}

// ProtectStats are the counters printed at exit.
type ProtectStats struct {
	Stats
	Stream stream.Stats `json:"stream"`
}

// protectState is what the agent remembers per machine between runs, next
// to the stream's own state (generations, sequence numbers).
type protectState struct {
	Version int               `json:"version"`
	Machine string            `json:"machine"`
	Devices []protectedDevice `json:"devices"`
}

type protectedDevice struct {
	Name     string `json:"name"`
	Path     string `json:"path"`
	Identity string `json:"identity"`
	// Stable is blockdev's StableID: the disk as a reboot or a re-attach
	// leaves it ("" if it has none).
	Stable string `json:"stable_id,omitempty"`
	Size   int64  `json:"size"`
	// Clean: the last run stopped with every captured write acknowledged
	// and capture pinned, so only the bitmap's blocks are to be copied.
	Clean bool `json:"clean"`
}

const protectStateFile = "protect.json"

// ScriptLogFile, in the state directory, holds the output of the last
// app-consistent point's pre and post scripts.
const ScriptLogFile = "scripts.log"

// MachineDir is where the agent keeps a machine's state under stateDir.
func MachineDir(stateDir, machine string) string {
	return filepath.Join(stateDir, "machines", machine)
}

// RunProtect streams the machine's devices to a process server until ctx
// is done: it agrees with the process server on each disk (resume, full
// copy or checksum resync), attaches capture to all devices at once (one
// capture, one sequence, so points are consistent across disks), sends
// READY=1 to NOTIFY_SOCKET once capture is attached, and on stop drains
// everything captured, waits for its acknowledgement and prints a counters
// line. A stop that could not get everything acknowledged within
// StopTimeout is unclean: the next run resyncs by checksum.
func RunProtect(ctx context.Context, cfg ProtectConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = DefaultStopTimeout
	}
	if os.Geteuid() != 0 {
		return errors.New("the agent needs root (it loads eBPF programs and reads block devices)")
	}
	if err := capture.CheckCapabilities(); err != nil {
		return err
	}
	if err := capture.CheckBTF(); err != nil {
		return err
	}
	if ok, err := capture.CanFreeze(); err == nil && !ok && cfg.AppInterval > 0 {
		log.Warn("app-consistent points are on but this process lacks CAP_SYS_ADMIN: freezing a file system will fail (add the capability, or --app-interval 0)", "app_interval", cfg.AppInterval)
	}
	if err := fsfreeze.CheckScripts(cfg.PreScript, cfg.PostScript); err != nil {
		return err
	}
	// The metrics port is taken first: a mistyped or busy address found
	// once capture is attached would end the run unclean (a checksum
	// resync at the next start), and a service restarting would loop.
	var metricsLn net.Listener
	if cfg.Metrics != "" {
		ln, err := net.Listen("tcp", cfg.Metrics)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		metricsLn = ln
		defer func() {
			if metricsLn != nil {
				metricsLn.Close()
			}
		}()
	}
	if cfg.ProcessServer == "" {
		return errors.New("no process server given")
	}
	if _, _, err := net.SplitHostPort(cfg.ProcessServer); err != nil {
		return fmt.Errorf("process server %q: want HOST:PORT: %w", cfg.ProcessServer, err)
	}
	if err := layout.CheckName("machine name", cfg.Name); err != nil {
		return err
	}
	if len(cfg.Devices) == 0 {
		return errors.New("no device to protect")
	}
	devs, err := inspectDevices(cfg.Devices)
	if err != nil {
		return err
	}
	dir := MachineDir(cfg.StateDir, cfg.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	for _, d := range []string{cfg.StateDir, dir} { // (machine directories could be swapped in the first)
		if err := checkPrivate(d); err != nil {
			return err
		}
	}
	lock, err := lockState(dir)
	if err != nil {
		return err
	}
	defer lock.Close()
	statePath := filepath.Join(dir, protectStateFile)
	prev, err := loadProtectState(statePath)
	if err != nil {
		log.Warn("ignoring unreadable state: every disk is resynced", "err", err)
	}

	id, err := pki.Load(cfg.PKIDir, cfg.Name)
	if err != nil {
		return err
	}
	if id.Role() != pki.RoleAgent {
		return fmt.Errorf("certificate %q in %s is for role %s; the agent needs an agent certificate", cfg.Name, cfg.PKIDir, id.Role())
	}
	if id.CAKeyNextTo() {
		log.Warn("the --pki directory holds ca.key: anyone who can read it on this host can issue certificates; keep ca.key where certificates are issued only", "dir", cfg.PKIDir)
	}
	if w := pki.Expiring("the agent's certificate "+cfg.Name+" (or its CA)", id.NotAfter(), time.Now()); w != "" {
		log.Warn(w)
	}
	scfg := stream.Config{
		Addr:        cfg.ProcessServer,
		TLS:         id.ClientTLS(cfg.ProcessServer, pki.RoleProcessServer),
		Machine:     cfg.Name,
		StateDir:    dir,
		SyncTimeout: cfg.StopTimeout,
		// Until the initial sync is done the replica is no point in
		// time: "recoverable until" must not advance.
		HoldTimeMarkers: true,
		// The engine dates them (Engine Coverer): a marker never claims
		// a write still in the ring, a bitmap or a read-back queue.
		Coverage: true,
		Logger:   log,
		// A process server whose certificate is revoked during a session
		// is dropped within peerCheckEvery, not at the next reconnect.
		CheckPeer: func(c *x509.Certificate) error {
			if err := id.CheckRevoked(c); errors.Is(err, pki.ErrRevoked) {
				return err
			}
			return nil // a list that cannot be read refuses new handshakes, ends no session
		},
	}
	for i, d := range devs {
		old := prev.device(d.Name)
		changed := old != nil && old.Identity != d.Identity
		// Back after a reboot or a re-attach (a new device number or
		// diskseq): compared with its replica, not copied anew.
		back := changed && old.Stable != "" && old.Stable == d.Stable
		forget := changed && !back
		switch {
		case forget:
			log.Warn("another device is behind this disk name now: new replica", keyDevice, d.Path, "disk", d.Name)
		case back:
			log.Warn("the disk is back under a new device number or sequence (a reboot, a re-attach): resync by checksum", keyDevice, d.Path, "disk", d.Name)
		}
		scfg.Disks = append(scfg.Disks, stream.Disk{Name: d.Name, Size: uint64(d.Size), Forget: forget})
		devs[i].Clean = old != nil && !changed && old.Clean
	}
	resync := &resyncRequests{pending: make([]SyncKind, len(devs))}
	scfg.OnResync = resync.request

	// From Dial on a crash is an unclean stop: Dial saves the generations
	// the process server answers with, and a new one is an empty replica
	// that a run resuming on the bitmap would never fill. (The previous
	// identities stay until the agreement: a device forgotten now is
	// forgotten again.)
	if prev.anyClean() {
		unclean := protectState{Version: prev.Version, Machine: prev.Machine, Devices: slices.Clone(prev.Devices)}
		for i := range unclean.Devices {
			unclean.Devices[i].Clean = false
		}
		if err := saveJSON(statePath, &unclean); err != nil {
			return err
		}
	}
	// Metrics are served from here on: while the process server cannot
	// be reached, they say so (connected 0) and the RPO grows from the
	// last run's recoverable_until.
	live := &liveSource{savedRU: stream.SavedRecoverableUntil(dir, cfg.Name), started: time.Now()}
	stopMetrics := func() {}
	if metricsLn != nil {
		stopMetrics = sync.OnceFunc(serveMetrics(metricsLn, protectMetrics(cfg.Name, live, live.overflowEvents, id.NotAfter()), cfg.Profiling, log))
		metricsLn = nil // the server closes it
		defer stopMetrics()
	}
	log.Info("connecting to the process server", "process_server", cfg.ProcessServer, "machine", cfg.Name)
	tgt, err := stream.Dial(ctx, scfg)
	if err != nil {
		// Dial adopts nothing unless it succeeds: the last stop's
		// cleanness still holds (a stop during Dial's retries must not
		// cost the next run a checksum resync), unless it saved new
		// generations it could not see through (their replicas would be
		// taken for synced).
		if prev.anyClean() && !errors.Is(err, stream.ErrStateUnsettled) {
			if serr := saveJSON(statePath, prev); serr != nil {
				log.Warn("could not restore the state of the last clean stop", "err", serr)
			}
		}
		if ctx.Err() != nil && errors.Is(err, context.Canceled) && !errors.Is(err, stream.ErrStateUnsettled) {
			// A stop asked for (systemctl stop, a reboot) while the
			// process server is away: a stop like any other.
			log.Warn("stopped before the process server answered; nothing was sent", "process_server", cfg.ProcessServer, "err", err)
			return nil
		}
		return err
	}
	defer tgt.Close()
	// Dial's retries have no end: a device resized, or another disk
	// attached behind its path, while the process server was away is not
	// the one whose state was agreed on (resuming would leave the old
	// disk's blocks in the replica). The next start protects it anew.
	now, err := inspectDevices(cfg.Devices)
	if err != nil {
		return err
	}
	for i, d := range now {
		if d.Identity != devs[i].Identity {
			return fmt.Errorf("%s changed while the agent waited for the process server (another disk behind the path, or resized): start the agent again to protect it as it is now", d.Path)
		}
	}
	live.tgt.Store(tgt)
	resync.attachTarget(tgt)
	var srcs []Source
	for i, a := range tgt.Agreements() {
		s := Source{Name: devs[i].Name, Path: devs[i].Path, Mode: cfg.Mode, Size: devs[i].Size}
		switch {
		case a.Action == wire.SyncFull:
			s.Sync = SyncFull
		case a.Action == wire.SyncChecksum:
			s.Sync = SyncCompare
		case devs[i].Clean:
			s.Sync = SyncResume
		default:
			log.Info("the last run did not stop cleanly: resync by checksum", keyDevice, s.Path)
			s.Sync = SyncCompare
		}
		srcs = append(srcs, s)
	}
	// The devices as agreed, unclean until a clean stop says otherwise.
	st := protectState{Version: stateVersion, Machine: cfg.Name}
	for _, d := range devs {
		d.Clean = false
		st.Devices = append(st.Devices, d)
	}
	if err := saveJSON(statePath, &st); err != nil {
		return err
	}

	// A stop waits for the process server at most StopTimeout, then gives
	// up on what is not acknowledged (the next run resyncs by checksum).
	var abortTimer, slowTimer *time.Timer
	var abortMu sync.Mutex
	stopWatch := context.AfterFunc(ctx, func() {
		abortMu.Lock()
		defer abortMu.Unlock()
		log.Info("stopping: draining capture and waiting for the process server to acknowledge every write",
			"unacknowledged_bytes", tgt.Stats().PendingBytes, "timeout", cfg.StopTimeout)
		// Said again while it lasts: a hung process server would
		// otherwise hold the stop silently for the whole timeout.
		slowTimer = time.AfterFunc(min(10*time.Second, cfg.StopTimeout/2), func() {
			log.Warn("stopping: still waiting for the process server to acknowledge the remaining writes",
				"unacknowledged_bytes", tgt.Stats().PendingBytes, "connected", tgt.Stats().Connected, "timeout", cfg.StopTimeout)
		})
		abortTimer = time.AfterFunc(cfg.StopTimeout, func() {
			tgt.Abort(fmt.Errorf("stopping: the process server did not take the remaining writes within %v", cfg.StopTimeout))
		})
	})
	defer func() {
		stopWatch()
		abortMu.Lock()
		for _, t := range []*time.Timer{abortTimer, slowTimer} {
			if t != nil {
				t.Stop()
			}
		}
		abortMu.Unlock()
	}()

	e, err := New(Options{
		Sources:       srcs,
		RingBytes:     cfg.RingBytes,
		PinDir:        PinDir(dir),
		Target:        streamTarget{tgt, resync},
		Logger:        log,
		Progress:      cfg.Progress,
		CrashInterval: cfg.CrashInterval,
		AppInterval:   cfg.AppInterval,
		ReadbackDelay: cfg.ReadbackDelay,
		PreScript:     cfg.PreScript,
		PostScript:    cfg.PostScript,
		ScriptLog:     filepath.Join(dir, ScriptLogFile),
		OnReady: func() {
			log.Info("capture attached", "devices", len(srcs))
			sdnotify.Notify("READY=1\nSTATUS=initial sync")
		},
		OnSynced: func() {
			log.Info("initial sync done; streaming", "process_server", cfg.ProcessServer)
			sdnotify.Notify("X-LIFEBOAT-SYNCED=1\nSTATUS=streaming")
			resync.synced()
			if cfg.OnSynced != nil {
				cfg.OnSynced()
			}
		},
	})
	if err != nil {
		return err
	}
	resync.attach(e)
	live.overflow.Store(e)

	runErr := e.Run(ctx)
	stopMetrics()
	stats := ProtectStats{Stats: e.Stats(), Stream: tgt.Stats()}
	if cfg.Stats != nil {
		*cfg.Stats = stats
	}
	// A resync the process server asked for and the engine did not get to
	// is owed to the next run. The target is closed first (Run has done
	// its final Sync): until then a reconnect could still ask for one,
	// after owed was taken, and the stop would be saved clean.
	tgtErr := tgt.Close()
	owed := make([]bool, len(devs))
	for i := range devs {
		owed[i] = e.syncReq[i].Load() != 0 || resync.unserved(i) || e.Unsettled(i)
	}
	closeErr := e.Close()
	switch {
	case runErr != nil && ctx.Err() != nil && errors.Is(runErr, context.Canceled):
		log.Warn("stopped before the initial sync finished; the next run resyncs by checksum")
		printProtectCounters(cfg.Out, stats)
		return nil
	case runErr != nil:
		return runErr
	case closeErr != nil:
		return closeErr
	case tgtErr != nil:
		return tgtErr
	}
	for i := range st.Devices {
		st.Devices[i].Clean = !owed[i]
	}
	if err := saveJSON(statePath, &st); err != nil {
		return err
	}
	printProtectCounters(cfg.Out, stats)
	return nil
}

// printProtectCounters writes the counters line a stop ends with.
func printProtectCounters(out io.Writer, stats ProtectStats) {
	if out != nil {
		b, _ := json.Marshal(stats)
		fmt.Fprintf(out, "counters: %s\n", b)
	}
}

// streamTarget adapts stream.Target's markers to Target.Marker (package
// stream cannot import this one).
type streamTarget struct {
	*stream.Target
	resync *resyncRequests
}

func (t streamTarget) Marker(m Marker) error {
	kind := wire.MarkerCrashConsistent
	if m.Kind == AppConsistent {
		kind = wire.MarkerAppConsistent
	}
	if err := t.Mark(kind, m.Time); err != nil {
		if errors.Is(err, stream.ErrResyncPending) {
			return fmt.Errorf("%w: %w", ErrResyncPending, err)
		}
		return err
	}
	// The engine emits markers only between drains: once the requested
	// resyncs have been taken, this one follows their end.
	t.resync.pointReached()
	return nil
}

var (
	_ Target      = streamTarget{}
	_ Resyncer    = streamTarget{}
	_ ResyncAsker = streamTarget{}
)

// resyncRequests forwards the process server's resync requests to the
// engine, keeping those that arrive before the engine exists, and holds
// time markers while a resync leaves the replica half-updated.
type resyncRequests struct {
	mu       sync.Mutex
	e        *Engine
	tgt      *stream.Target
	pending  []SyncKind // SyncResume = none
	resyncs  bool       // asked for since the last consistent point
	syncDone bool       // the initial sync is done
}

func (r *resyncRequests) request(disk int, a wire.SyncAction) {
	kind := SyncCompare
	if a == wire.SyncFull {
		kind = SyncFull
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.resyncs = true
	if r.tgt != nil {
		r.tgt.HoldTimeMarkers(true)
	}
	if r.e != nil {
		r.e.RequestSync(disk, kind)
		return
	}
	r.pending[disk] = max(r.pending[disk], kind)
}

func (r *resyncRequests) attach(e *Engine) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.e = e
	for i, k := range r.pending {
		e.RequestSync(i, k)
		r.pending[i] = SyncResume
	}
}

func (r *resyncRequests) attachTarget(t *stream.Target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tgt = t
}

// synced: the initial sync is done; time markers resume unless a resync
// was asked for meanwhile.
func (r *resyncRequests) synced() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.syncDone = true
	if !r.resyncs {
		r.tgt.HoldTimeMarkers(false)
	}
}

// pointReached: the engine emitted a consistency marker. If every resync
// asked for had been taken by the engine, they are complete now.
func (r *resyncRequests) pointReached() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.resyncs || !r.syncDone || r.e == nil {
		return
	}
	for i := range r.pending {
		if r.pending[i] != SyncResume || r.e.syncReq[i].Load() != 0 {
			return
		}
	}
	r.resyncs = false
	r.tgt.HoldTimeMarkers(false)
}

func (r *resyncRequests) unserved(disk int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pending[disk] != SyncResume
}

// overflowEvents sums the ring overflows of all devices. It reads kernel
// counters atomically, so it is safe from any goroutine while the engine
// is open.
func (e *Engine) overflowEvents() uint64 {
	var n uint64
	for i := range e.srcs {
		n += e.cap.OverflowEvents(i)
	}
	return n
}

func inspectDevices(in []ProtectDevice) ([]protectedDevice, error) {
	var out []protectedDevice
	var opened []openDev
	defer func() {
		for _, o := range opened {
			o.dev.Close()
		}
	}()
	seen := map[string]string{}
	for _, d := range in {
		name := d.Name
		if name == "" {
			name = filepath.Base(d.Path)
		}
		if err := layout.CheckName("disk name", name); err != nil {
			return nil, err
		}
		if p, ok := seen[name]; ok {
			return nil, fmt.Errorf("%s and %s are both named %q: name them with NAME=PATH", p, d.Path, name)
		}
		seen[name] = d.Path
		bd, err := blockdev.Open(d.Path)
		if err != nil {
			return nil, err
		}
		opened = append(opened, openDev{d.Path, bd})
		identity, err := bd.Identity()
		stable, terr := bd.StableID()
		size, serr := bd.Size()
		if err = cmp.Or(err, terr, serr); err != nil {
			return nil, err
		}
		out = append(out, protectedDevice{Name: name, Path: d.Path, Identity: identity, Stable: stable, Size: size})
	}
	// Refused here, before the hello: refused by the engine, after it,
	// a command line the agent cannot run would have given the process
	// server new disks to keep (and closed the running agent's session).
	if err := checkOverlap(opened); err != nil {
		return nil, err
	}
	return out, nil
}

func loadProtectState(path string) (*protectState, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st protectState
	if err := json.Unmarshal(b, &st); err != nil || st.Version != stateVersion {
		return nil, fmt.Errorf("state %s unreadable", path)
	}
	return &st, nil
}

func (st *protectState) anyClean() bool {
	return st != nil && slices.ContainsFunc(st.Devices, func(d protectedDevice) bool { return d.Clean })
}

func (st *protectState) device(name string) *protectedDevice {
	if st == nil {
		return nil
	}
	for i := range st.Devices {
		if st.Devices[i].Name == name {
			return &st.Devices[i]
		}
	}
	return nil
}

// saveJSON writes v atomically and durably.
func saveJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("save state: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// ReleaseMachine detaches the capture that a clean stop of `lifeboat
// agent` left pinned for machine and forgets that the stop was clean (the
// next run resyncs by checksum).
func ReleaseMachine(stateDir, machine string) error {
	// As the agent checks it: a name with a slash would reach outside the
	// machines' directory.
	if err := layout.CheckName("machine name", machine); err != nil {
		return err
	}
	dir := MachineDir(stateDir, machine)
	return release(dir, func() error {
		path := filepath.Join(dir, protectStateFile)
		st, err := loadProtectState(path)
		if err != nil || st == nil {
			return err
		}
		for i := range st.Devices {
			st.Devices[i].Clean = false
		}
		return saveJSON(path, st)
	})
}

// rpoSource is what the metrics read from the stream.
type rpoSource interface {
	Stats() stream.Stats
	RPO() time.Duration
}

// liveSource is what the metrics read, from before the stream and the
// capture exist: until Dial returns, nothing is connected and the RPO
// counts from the last run's recoverable_until (or from the start).
type liveSource struct {
	tgt      atomic.Pointer[stream.Target]
	overflow atomic.Pointer[Engine]
	savedRU  time.Time
	started  time.Time
}

func (l *liveSource) Stats() stream.Stats {
	if t := l.tgt.Load(); t != nil {
		return t.Stats()
	}
	return stream.Stats{}
}

func (l *liveSource) RPO() time.Duration {
	if t := l.tgt.Load(); t != nil {
		return t.RPO()
	}
	at := l.savedRU
	if at.IsZero() {
		at = l.started
	}
	return max(time.Since(at), 0)
}

func (l *liveSource) overflowEvents() uint64 {
	if e := l.overflow.Load(); e != nil {
		return e.overflowEvents()
	}
	return 0
}

// protectMetrics is the agent's Prometheus registry. Every value is read
// at scrape time; nothing is counted on the write path for it.
func protectMetrics(machine string, s rpoSource, overflow func() uint64, certEnd time.Time) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	labels := prometheus.Labels{"machine": machine}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help, ConstLabels: labels}, f)
	}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels}, f)
	}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		counter("lifeboat_agent_churn_bytes_total", "Bytes of writes handed to the stream (captured, read back or resynced).",
			func() float64 { return float64(s.Stats().ChurnBytes) }),
		gauge("lifeboat_agent_pending_bytes", "Batch payload bytes not yet acknowledged by the process server.",
			func() float64 { return float64(s.Stats().PendingBytes) }),
		gauge("lifeboat_agent_acked_seq", "Highest sequence number the process server acknowledged.",
			func() float64 { return float64(s.Stats().AckedSeq) }),
		counter("lifeboat_agent_overflow_events_total", "BPF ring overflows into the dirty bitmap.",
			func() float64 { return float64(overflow()) }),
		gauge("lifeboat_agent_rpo_seconds", "Seconds since recoverable_until, as the process server last said (every write before it is in the storage account); before it says, since the last run's value, or since the start.",
			func() float64 { return s.RPO().Seconds() }),
		counter("lifeboat_agent_reconnects_total", "Reconnections to the process server.",
			func() float64 { return float64(s.Stats().Reconnects) }),
		gauge(pki.ExpiryMetric, pki.ExpiryMetricHelp, func() float64 { return float64(certEnd.Unix()) }),
		gauge("lifeboat_agent_connected", "1 while connected to the process server.",
			func() float64 {
				if s.Stats().Connected {
					return 1
				}
				return 0
			}),
	)
	return reg
}

// serveMetrics serves reg on addr, and with profiling Go's profiles, until
// the returned stop is called.
func serveMetrics(ln net.Listener, reg *prometheus.Registry, profiling bool, log *slog.Logger) (stop func()) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	if profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint failed", "err", err)
		}
	}()
	log.Info("metrics", "listen", ln.Addr().String())
	return func() {
		// Shutdown waits for scrapes under way: they read the capture's
		// mapped state, which the caller unmaps next.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if srv.Shutdown(ctx) != nil {
			srv.Close()
		}
	}
}
