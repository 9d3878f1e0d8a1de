package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/agent"
	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver"
)

// Timing of every rig: short enough that the whole package runs in a few
// minutes, long enough to exercise segment cutting and point cutting.
const (
	segmentAge    = time.Second
	pointInterval = time.Second
	psName        = "ps"
)

// helperEnv makes the test binary a helper process (a process server or an
// agent to be SIGKILLed) instead of running tests; its value is the JSON
// helperSpec.
const helperEnv = "LIFEBOAT_E2E_HELPER"

func TestMain(m *testing.M) {
	if spec := os.Getenv(helperEnv); spec != "" {
		os.Exit(runHelper(spec))
	}
	code := m.Run()
	shared.stop()
	os.Exit(code)
}

// ---------------------------------------------------------------------------
// Storage account: one Azurite for the test binary.

var shared sharedAccount

type sharedAccount struct {
	once sync.Once
	srv  *azurite.Server
	cs   string
	err  error
}

func (a *sharedAccount) stop() {
	if a.srv != nil {
		a.srv.Stop()
	}
}

// account returns the connection string of the shared storage account:
// the one in AZURE_STORAGE_CONNECTION_STRING, or an Azurite started once.
func account(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t) // every test here needs it: no Azurite for nothing
	shared.once.Do(func() {
		if cs := os.Getenv(azurite.EnvConnectionString); cs != "" {
			shared.cs = cs
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		shared.srv, shared.err = azurite.Start(ctx, azurite.Options{})
		if shared.err == nil {
			shared.cs = shared.srv.ConnectionString()
		}
	})
	if errors.Is(shared.err, azurite.ErrNoNode) && !testenv.InCI() {
		t.Skipf("azurite: %v", shared.err)
	}
	if shared.err != nil {
		t.Fatalf("azurite: %v", shared.err)
	}
	return shared.cs
}

// ---------------------------------------------------------------------------
// Rig: PKI, recovery key, container and logs of one test.

type rig struct {
	t         *testing.T
	dir       string
	pki       string
	rkFile    string
	rk        []byte
	cs        string
	container string
	store     blobstore.Store // the test's own view of the container (no retries)
	psLog     *logBuf
	agentLog  *logBuf
}

var containerSeq atomic.Int64

// newRig prepares a test: a CA with the process server's certificate and
// one agent certificate per machine, a recovery key, and a fresh container
// in the account cs (deleted at the end).
func newRig(t *testing.T, cs string, machines ...string) *rig {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs.ext4")
	testenv.RequireTool(t, "fstrim")
	dir := t.TempDir()
	r := &rig{t: t, dir: dir, pki: filepath.Join(dir, "pki"), rkFile: filepath.Join(dir, "recovery.key"), cs: cs,
		psLog: &logBuf{}, agentLog: &logBuf{}}
	if err := pki.Init(r.pki); err != nil {
		t.Fatal(err)
	}
	if err := pki.Issue(r.pki, psName, pki.RoleProcessServer); err != nil {
		t.Fatal(err)
	}
	for _, m := range machines {
		if err := pki.Issue(r.pki, m, pki.RoleAgent); err != nil {
			t.Fatal(err)
		}
	}
	r.rk = seal.NewRecoveryKey()
	if err := seal.WriteRecoveryKey(r.rkFile, r.rk); err != nil {
		t.Fatal(err)
	}
	name := strings.ToLower(regexp.MustCompile(`[^A-Za-z0-9]+`).ReplaceAllString(t.Name(), "-"))
	r.container = fmt.Sprintf("e2e-%.30s-%d-%d", strings.Trim(name, "-"), os.Getpid()%100000, containerSeq.Add(1))
	s, err := azure.New(azure.Config{ConnectionString: cs, Container: r.container})
	if err != nil {
		t.Fatal(err)
	}
	r.store = s
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process server log (tail):\n%s", r.psLog.Tail(120))
			t.Logf("agent log (tail):\n%s", r.agentLog.Tail(80))
			return // keep the container for a post-mortem
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = s.DeleteContainer(ctx)
	})
	return r
}

func (r *rig) cacheDirs(n int) []string {
	var dirs []string
	for i := range n {
		dirs = append(dirs, filepath.Join(r.dir, fmt.Sprintf("cache%d", i)))
	}
	return dirs
}

// ---------------------------------------------------------------------------
// Process server, in-process.

type psOpts struct {
	Listen      string   // default 127.0.0.1:0
	Cache       []string // default 3 directories (2+1)
	UploadLimit float64  // bytes/s, 0 = unlimited
	// PointInterval spaces crash-consistent points (default pointInterval).
	PointInterval time.Duration
	// Store is the base store (default: the rig's container); it is
	// wrapped in blobstore.Stack with a retry bound of several minutes.
	Store blobstore.Store
}

type psRun struct {
	t      *testing.T
	srv    *processserver.Server
	cancel context.CancelFunc
	once   sync.Once
}

// psStack is the store stack of every process server of these tests:
// Azure outages are retried for minutes, and quickly once it is back.
func psStack(base blobstore.Store, limit float64, log *slog.Logger) blobstore.Store {
	return blobstore.Stack(base, blobstore.StackConfig{
		Retry: blobstore.RetryConfig{
			InitialInterval: 200 * time.Millisecond,
			MaxInterval:     2 * time.Second,
			MaxElapsed:      5 * time.Minute,
			Logger:          log,
		},
		WriteBytesPerSec: limit,
		Logger:           log,
	})
}

func (r *rig) startPS(o psOpts) *psRun {
	r.t.Helper()
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	if o.Cache == nil {
		o.Cache = r.cacheDirs(3)
	}
	if o.Store == nil {
		o.Store = r.store
	}
	if o.PointInterval == 0 {
		o.PointInterval = pointInterval
	}
	log := slog.New(slog.NewTextHandler(r.psLog, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, cancel := context.WithCancel(context.Background())
	cfg := processserver.Config{
		Listen: o.Listen, PKIDir: r.pki, Name: psName, CacheDirs: o.Cache, RecoveryKeyFile: r.rkFile,
		Store: psStack(o.Store, o.UploadLimit, log), Container: r.container,
		SegmentAge: segmentAge, Logger: log,
	}
	cfg.NewApplier = processserver.StandardApplier(ctx, cfg, r.rk, o.PointInterval, 0, log)
	srv, err := processserver.Start(ctx, cfg)
	if err != nil {
		cancel()
		r.t.Fatalf("start process server: %v", err)
	}
	p := &psRun{t: r.t, srv: srv, cancel: cancel}
	r.t.Cleanup(p.stop)
	r.t.Logf("process server listening on %s (cache %d dirs, container %s)", srv.Addr(), len(o.Cache), r.container)
	return p
}

func (p *psRun) addr() string { return p.srv.Addr().String() }

func (p *psRun) stop() {
	p.once.Do(func() {
		p.srv.Close()
		p.cancel()
	})
}

// ---------------------------------------------------------------------------
// Agent, in-process.

type agentRun struct {
	t       *testing.T
	name    string
	cancel  context.CancelFunc
	done    chan error
	stats   agent.ProtectStats
	out     bytes.Buffer
	stopped bool
}

// agentConfig is the configuration of machine's agent protecting devs
// (disk name → device path).
func (r *rig) agentConfig(machine, addr string, devs ...agent.ProtectDevice) agent.ProtectConfig {
	return agent.ProtectConfig{
		ProcessServer: addr, PKIDir: r.pki, Name: machine, Devices: devs,
		RingBytes: 16 << 20, StateDir: filepath.Join(r.dir, "state-"+machine),
		CrashInterval: 2 * time.Second, StopTimeout: time.Minute,
		Logger: slog.New(slog.NewTextHandler(r.agentLog, &slog.HandlerOptions{Level: slog.LevelInfo})).With("machine", machine),
	}
}

// startAgent runs agent.RunProtect in a goroutine (cancel = SIGTERM) and
// returns once the initial sync is done.
func (r *rig) startAgent(cfg agent.ProtectConfig) *agentRun {
	r.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	a := &agentRun{t: r.t, name: cfg.Name, cancel: cancel, done: make(chan error, 1)}
	synced := make(chan struct{})
	cfg.Out, cfg.Stats = &a.out, &a.stats
	cfg.OnSynced = func() { close(synced) }
	start := time.Now()
	go func() { a.done <- agent.RunProtect(ctx, cfg) }()
	r.t.Cleanup(func() { // a failed test must not leave devices open
		if !a.stopped {
			cancel()
			select {
			case <-a.done:
			case <-time.After(2 * time.Minute):
			}
		}
		agent.ReleaseMachine(cfg.StateDir, cfg.Name)
	})
	select {
	case <-synced:
	case err := <-a.done:
		a.stopped = true
		r.t.Fatalf("agent %s stopped before its initial sync: %v", cfg.Name, err)
	case <-time.After(3 * time.Minute):
		r.t.Fatalf("agent %s: initial sync did not finish in 3 minutes", cfg.Name)
	}
	r.t.Logf("agent %s: initial sync of %d device(s) done in %v", cfg.Name, len(cfg.Devices), time.Since(start).Round(time.Millisecond))
	return a
}

// stop stops the agent like SIGTERM and returns its counters.
func (a *agentRun) stop() agent.ProtectStats {
	a.t.Helper()
	a.cancel()
	a.stopped = true
	select {
	case err := <-a.done:
		if err != nil {
			a.t.Fatalf("agent %s: %v", a.name, err)
		}
	case <-time.After(2 * time.Minute):
		a.t.Fatalf("agent %s did not stop within 2 minutes", a.name)
	}
	a.t.Logf("agent %s stopped: %s", a.name, strings.TrimSpace(a.out.String()))
	return a.stats
}

// ---------------------------------------------------------------------------
// Helper processes (for SIGKILL): the test binary re-executed.

type helperSpec struct {
	Role  string // "process-server" or "agent"
	PS    *processServerSpec
	Agent *agentSpec
	// Prefix runs the helper under another program, e.g. setpriv.
	Prefix []string
}

type processServerSpec struct {
	Listen, PKI, RecoveryKey, ConnStr, Container string
	Cache                                        []string
}

type agentSpec struct {
	ProcessServer, PKI, Name, StateDir string
	Devices                            []agent.ProtectDevice
	CrashInterval                      time.Duration
}

// runHelper runs a helper process until it is killed (or SIGTERMed). It
// prints "READY <addr>" (process server) or "SYNCED" (agent) on stdout.
func runHelper(js string) int {
	var spec helperSpec
	if err := json.Unmarshal([]byte(js), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "helper spec:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	switch spec.Role {
	case "process-server":
		c := spec.PS
		base, err := azure.New(azure.Config{ConnectionString: c.ConnStr, Container: c.Container})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		cfg := processserver.Config{
			Listen: c.Listen, PKIDir: c.PKI, Name: psName, CacheDirs: c.Cache, RecoveryKeyFile: c.RecoveryKey,
			Store: psStack(base, 0, log), Container: c.Container, SegmentAge: segmentAge, Logger: log,
		}
		rk, err := seal.LoadRecoveryKey(c.RecoveryKey)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		cfg.NewApplier = processserver.StandardApplier(ctx, cfg, rk, pointInterval, 0, log)
		srv, err := processserver.Start(ctx, cfg)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Printf("READY %s\n", srv.Addr())
		<-ctx.Done()
		srv.Close()
		return 0
	case "agent":
		c := spec.Agent
		if err := printCapabilities(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		err := agent.RunProtect(ctx, agent.ProtectConfig{
			ProcessServer: c.ProcessServer, PKIDir: c.PKI, Name: c.Name, Devices: c.Devices,
			RingBytes: 16 << 20, StateDir: c.StateDir, CrashInterval: c.CrashInterval, StopTimeout: time.Minute,
			Logger: log, Out: os.Stdout, OnSynced: func() { fmt.Println("SYNCED") },
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, "agent:", err)
			return 1
		}
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown helper role", spec.Role)
	return 2
}

type helper struct {
	t    *testing.T
	what string
	caps string // what the helper printed after capsPrefix, if it did
	cmd  *exec.Cmd
	log  *logBuf
	done chan struct{}
}

// startHelper starts a helper process and waits (up to timeout) until it
// prints a line starting with ready; it returns the rest of that line.
func startHelper(t *testing.T, spec helperSpec, ready string, timeout time.Duration) (*helper, string) {
	t.Helper()
	js, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	argv := append(slices.Clone(spec.Prefix), os.Args[0], "-test.run=^$")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), helperEnv+"="+string(js))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // no orphan when the test binary dies
	h := &helper{t: t, what: spec.Role, cmd: cmd, log: &logBuf{}, done: make(chan struct{})}
	cmd.Stderr = h.log
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			fmt.Fprintf(h.log, "[stdout] %s\n", sc.Text())
			select {
			case lines <- sc.Text():
			default:
			}
		}
		close(lines)
		cmd.Wait()
		close(h.done)
	}()
	t.Cleanup(func() {
		h.kill()
		if t.Failed() {
			t.Logf("%s helper (pid %d) log (tail):\n%s", h.what, cmd.Process.Pid, h.log.Tail(120))
		}
	})
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("%s helper exited before it was ready:\n%s", spec.Role, h.log.Tail(60))
			}
			if rest, ok := strings.CutPrefix(l, capsPrefix); ok {
				h.caps = rest
			}
			if rest, ok := strings.CutPrefix(l, ready); ok {
				t.Logf("%s helper pid %d ready", spec.Role, cmd.Process.Pid)
				return h, strings.TrimSpace(rest)
			}
		case <-deadline:
			t.Fatalf("%s helper not ready within %v:\n%s", spec.Role, timeout, h.log.Tail(60))
		}
	}
}

// stopAgent stops an agent helper as SIGTERM does, waits for its drain
// and clean exit, and returns the counters it printed.
func (h *helper) stopAgent() agent.ProtectStats {
	h.t.Helper()
	h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.done:
	case <-time.After(2 * time.Minute):
		h.t.Fatalf("%s helper did not stop within 2 minutes:\n%s", h.what, h.log.Tail(60))
	}
	if st := h.cmd.ProcessState; st == nil || !st.Success() {
		h.t.Fatalf("%s helper: %v\n%s", h.what, st, h.log.Tail(60))
	}
	var s agent.ProtectStats
	for l := range strings.Lines(h.log.String()) {
		if js, ok := strings.CutPrefix(l, "[stdout] counters: "); ok {
			if err := json.Unmarshal([]byte(js), &s); err != nil {
				h.t.Fatalf("%s helper counters: %v", h.what, err)
			}
			h.t.Logf("%s helper stopped: counters: %s", h.what, strings.TrimSpace(js))
			return s
		}
	}
	h.t.Fatalf("%s helper printed no counters:\n%s", h.what, h.log.Tail(60))
	return s
}

// kill SIGKILLs the helper and waits for it to be gone.
func (h *helper) kill() {
	select {
	case <-h.done:
		return
	default:
	}
	h.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-h.done:
	case <-time.After(30 * time.Second):
		h.t.Errorf("%s helper did not die after SIGKILL", h.what)
	}
}

// freePort returns a TCP address on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// ---------------------------------------------------------------------------
// Devices and workloads.

// newDisk creates a loop device of size bytes, with ext4 on it if fs.
func newDisk(t *testing.T, size int64, fs bool) *loopdev.Device {
	t.Helper()
	d := loopdev.New(t, size, loopdev.Options{})
	if fs {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := loopdev.Mkfs(ctx, "ext4", d.Path); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

// mount mounts dev's ext4 on a temporary directory until unmount or the
// end of the test.
func mount(t *testing.T, dev string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := loopdev.Mount(dev, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmountQuiet(mnt) })
	return mnt
}

func unmountQuiet(mnt string) {
	var st, parent unix.Stat_t
	if unix.Stat(mnt, &st) == nil && unix.Stat(filepath.Dir(mnt), &parent) == nil && st.Dev != parent.Dev {
		loopdev.Unmount(mnt)
	}
}

func unmount(t *testing.T, mnt string) {
	t.Helper()
	if err := loopdev.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
}

// writtenFile is a file a workload wrote, with when its write returned.
type writtenFile struct {
	Path   string // relative to the mount point
	Data   []byte
	Closed time.Time
}

// fileWorkload churns a mounted file system like a user: copies a source
// tree in, writes random files, deletes part of both, syncs and trims. tag
// keeps the names of several phases apart. It returns the random files
// that remain.
func fileWorkload(mnt, tag string, seed uint64, files int) ([]writtenFile, error) {
	src, err := testenv.GoSource("src/net")
	if err != nil {
		return nil, err
	}
	tree := filepath.Join(mnt, "tree-"+tag)
	if err := os.CopyFS(tree, os.DirFS(src)); err != nil {
		return nil, fmt.Errorf("copy %s: %w", src, err)
	}
	rng := rand.New(rand.NewPCG(seed, 7))
	var kept []writtenFile
	for i := range files {
		b := make([]byte, 64<<10+rng.IntN(2<<20))
		for j := 0; j+8 <= len(b); j += 8 {
			v := rng.Uint64()
			for k := range 8 {
				b[j+k] = byte(v >> (8 * k))
			}
		}
		rel := fmt.Sprintf("rand-%s-%d", tag, i)
		if err := os.WriteFile(filepath.Join(mnt, rel), b, 0o644); err != nil {
			return nil, err
		}
		kept = append(kept, writtenFile{Path: rel, Data: b, Closed: time.Now()})
	}
	// Delete every other top-level entry of the tree and a third of the
	// random files: freed blocks for fstrim.
	entries, err := os.ReadDir(tree)
	if err != nil {
		return nil, err
	}
	for i, e := range entries {
		if i%2 == 0 {
			if err := os.RemoveAll(filepath.Join(tree, e.Name())); err != nil {
				return nil, err
			}
		}
	}
	var remain []writtenFile
	for i, f := range kept {
		if i%3 == 1 {
			if err := os.Remove(filepath.Join(mnt, f.Path)); err != nil {
				return nil, err
			}
			continue
		}
		remain = append(remain, f)
	}
	unix.Sync()
	if out, err := exec.Command("fstrim", mnt).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("fstrim %s: %v: %s", mnt, err, out)
	}
	return remain, nil
}

// workload runs fileWorkload and fails t on error (test goroutine only).
func workload(t *testing.T, mnt, tag string, seed uint64) []writtenFile {
	t.Helper()
	start := time.Now()
	files, err := fileWorkload(mnt, tag, seed, 10)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("workload %s done in %v", tag, time.Since(start).Round(time.Millisecond))
	return files
}

// churn keeps writing to a mounted file system until stopped: files of
// 64 KiB to 512 KiB, each fsync'd so that the device sees a steady stream,
// the oldest deleted so that the file system does not fill up.
type churn struct {
	stop  chan struct{}
	done  chan error
	files atomic.Int64
	start time.Time
}

// startChurn starts a churn on mnt. A test that fails before finish
// still stops it (the cleanup runs before the unmount registered earlier),
// so that the unmount does not race its writes.
func startChurn(t *testing.T, mnt, tag string, seed uint64, pause time.Duration) *churn {
	c := &churn{stop: make(chan struct{}), done: make(chan error, 1), start: time.Now()}
	go func() { c.done <- c.run(mnt, tag, seed, pause) }()
	t.Cleanup(func() {
		if c.halt() {
			<-c.done
		}
	})
	return c
}

// halt stops the churn; false if it was stopped already.
func (c *churn) halt() bool {
	select {
	case <-c.stop:
		return false
	default:
		close(c.stop)
		return true
	}
}

func (c *churn) run(mnt, tag string, seed uint64, pause time.Duration) error {
	rng := rand.New(rand.NewPCG(seed, 11))
	buf := make([]byte, 512<<10)
	const live = 24
	for i := 0; ; i++ {
		select {
		case <-c.stop:
			return nil
		default:
		}
		b := buf[:64<<10+rng.IntN(448<<10)]
		for j := 0; j+8 <= len(b); j += 8 {
			v := rng.Uint64()
			for k := range 8 {
				b[j+k] = byte(v >> (8 * k))
			}
		}
		f, err := os.Create(filepath.Join(mnt, fmt.Sprintf("churn-%s-%d", tag, i)))
		if err != nil {
			return err
		}
		_, err = f.Write(b)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		if i >= live {
			if err := os.Remove(filepath.Join(mnt, fmt.Sprintf("churn-%s-%d", tag, i-live))); err != nil {
				return err
			}
		}
		c.files.Add(1)
		time.Sleep(pause)
	}
}

// finish stops the churn and fails t if it failed.
func (c *churn) finish(t *testing.T) {
	t.Helper()
	c.halt()
	select {
	case err := <-c.done:
		if err != nil {
			t.Fatalf("churn: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("churn did not stop within 2 minutes")
	}
	t.Logf("churn: %d files in %v", c.files.Load(), time.Since(c.start).Round(time.Millisecond))
}

// fio writes randomly to a raw device.
func fio(t *testing.T, ioSize string, devs ...string) {
	t.Helper()
	testenv.RequireTool(t, "fio")
	args := []string{"--direct=1", "--ioengine=libaio", "--rw=randwrite",
		"--bssplit=512/10:4k/50:64k/25:256k/15", "--blockalign=512", "--serialize_overlap=1", "--iodepth=8", "--randrepeat=0",
		"--size=100%", "--io_size=" + ioSize, "--output-format=terse"}
	for i, d := range devs {
		args = append(args, fmt.Sprintf("--name=j%d", i), "--filename="+d)
	}
	if out, err := exec.Command("fio", args...).CombinedOutput(); err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
}

// ---------------------------------------------------------------------------
// Waiting for the account, recovering, comparing.

// waitRecoverable polls the account until machine's recoverable_until
// reaches at (every write made before at is in the journal).
func (r *rig) waitRecoverable(machine string, at time.Time, timeout time.Duration) {
	r.t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	var last time.Time
	var lastErr error
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, until, err := recovery.Points(ctx, r.store, machine)
		cancel()
		if err == nil && !until.Before(at) {
			r.t.Logf("%s recoverable until %s, %v after the target time (waited %v)", machine,
				until.Format("15:04:05.000"), until.Sub(at).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
			return
		}
		last, lastErr = until, err
		if time.Now().After(deadline) {
			r.t.Fatalf("%s: recoverable_until is %s (err %v) after %v; want ≥ %s", machine,
				last.Format(time.RFC3339Nano), lastErr, timeout, at.Format(time.RFC3339Nano))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// settle is how long after a workload's last write the tests ask for
// recoverable_until to pass: the agent reads completed writes from its ring
// a few milliseconds after they complete, and a time marker only covers
// what was handed to the stream.
const settle = 500 * time.Millisecond

// recover restores disk of machine at point into a new file.
func (r *rig) recover(machine, disk, point string) (string, recovery.Result) {
	r.t.Helper()
	path := filepath.Join(r.t.TempDir(), fmt.Sprintf("%s-%s-%s.img", machine, disk, strings.NewReplacer(":", "", ".", "").Replace(point)))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	// As the CLI asks: a sequence must be a consistency marker's.
	res, err := recovery.RecoverFile(ctx, r.store, recovery.Request{Machine: machine, Disk: disk, Point: point, RecoveryKey: r.rk, MarkersOnly: true}, path)
	if err != nil {
		r.t.Fatalf("recover %s/%s at %s: %v", machine, disk, point, err)
	}
	base := "zeros"
	if res.BaseID != "" {
		base = fmt.Sprintf("point %d", res.BaseSeq)
	}
	r.t.Logf("recovered %s/%s at %s: seq %d from %s + %d segments in %v", machine, disk, point, res.Seq, base, res.Segments,
		time.Since(start).Round(time.Millisecond))
	return path, res
}

// readImage reads a whole device (O_DIRECT, so no stale page cache of the
// block device can hide what the file system wrote) or file.
func readImage(t *testing.T, path string) []byte {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&fs.ModeDevice == 0 {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(int(size))
	for off := 0; off < len(buf); {
		n, err := f.ReadAt(buf[off:min(off+4<<20, len(buf))], int64(off))
		if n == 0 && err != nil {
			t.Fatalf("read %s at %d: %v", path, off, err)
		}
		off += n
	}
	return buf
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	const align = 4096
	b := make([]byte, n+align)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) % align); r != 0 {
		off = align - r
	}
	return b[off : off+n : off+n]
}

// sameBytes fails t unless got equals want, naming the first differing
// byte and how many 4 KiB blocks differ.
func sameBytes(t *testing.T, what string, want, got []byte) {
	t.Helper()
	if d := diffBytes(want, got); d != "" {
		t.Fatalf("%s: %s", what, d)
	}
	t.Logf("%s: %d bytes equal", what, len(got))
}

// diffBytes describes how got differs from want ("" if equal).
func diffBytes(want, got []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d bytes, want %d", len(got), len(want))
	}
	if bytes.Equal(got, want) {
		return ""
	}
	first, blocks := -1, 0
	for off := 0; off < len(want); off += 4096 {
		end := min(off+4096, len(want))
		if !bytes.Equal(want[off:end], got[off:end]) {
			blocks++
			if first < 0 {
				for i := off; i < end; i++ {
					if want[i] != got[i] {
						first = i
						break
					}
				}
			}
		}
	}
	return fmt.Sprintf("differs first at byte %d (4 KiB block %d: got %x…, want %x…); %d of %d blocks differ", first, first/4096,
		got[first:min(first+8, len(got))], want[first:min(first+8, len(want))], blocks, (len(want)+4095)/4096)
}

// assertRecovered recovers disk at point and compares it with want. When
// a recovery to a time differs, the journal's markers around that time
// are logged.
func (r *rig) assertRecovered(machine, disk, point string, want []byte, what string) recovery.Result {
	r.t.Helper()
	path, res := r.recover(machine, disk, point)
	got := readImage(r.t, path)
	os.Remove(path)
	if d := diffBytes(want, got); d != "" {
		if at, err := time.Parse(time.RFC3339Nano, point); err == nil {
			r.t.Logf("journal of %s around %s (resolved to seq %d at %s):\n%s", machine, at.Format("15:04:05.000"), res.Seq,
				res.Time.Format("15:04:05.000"), r.journalAround(machine, at))
		}
		r.t.Fatalf("%s: recovered %s/%s at %s (seq %d) %s", what, machine, disk, point, res.Seq, d)
	}
	r.t.Logf("%s: recovered %s/%s at %s (seq %d): %d bytes equal", what, machine, disk, point, res.Seq, len(got))
	return res
}

// journalAround lists the segments, records and markers of machine's
// journal within 3 s of at, for failure messages.
func (r *rig) journalAround(machine string, at time.Time) string {
	ctx := context.Background()
	keys, err := recovery.Keyring(ctx, r.store, machine, r.rk)
	if err != nil {
		return err.Error()
	}
	segs, err := recovery.ListSegments(ctx, r.store, machine)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	var dec recovery.Decoder
	for _, s := range segs {
		if !s.LastTime.IsZero() && s.LastTime.Before(at.Add(-3*time.Second)) || s.FirstTime.After(at.Add(3*time.Second)) {
			continue
		}
		fmt.Fprintf(&b, "segment %s (markers %s…%s)\n", s.Name, s.FirstTime.Format("15:04:05.000"), s.LastTime.Format("15:04:05.000"))
		plain, err := recovery.ReadSegment(ctx, r.store, s.Name, keys, nil)
		if err != nil {
			fmt.Fprintf(&b, "  %v\n", err)
			continue
		}
		recs, err := dec.Decode(plain)
		if err != nil {
			fmt.Fprintf(&b, "  %v\n", err)
			continue
		}
		var first, last uint64
		flush := func() {
			if first != 0 {
				fmt.Fprintf(&b, "  records %d-%d\n", first, last)
				first = 0
			}
		}
		for _, rec := range recs {
			if rec.Op == wire.OpMarker {
				flush()
				m := rec.Marker()
				fmt.Fprintf(&b, "  marker kind %d seq %d at %s\n", m.Kind, m.Seq, time.Unix(0, m.UnixNano).UTC().Format("15:04:05.000"))
				continue
			}
			if first == 0 {
				first = rec.Seq
			}
			last = rec.Seq
		}
		flush()
	}
	return b.String()
}

// manifest reads machine's manifest.
func (r *rig) manifest(machine string) *layout.Manifest {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := recovery.ReadManifest(ctx, r.store, machine)
	if err != nil {
		r.t.Fatal(err)
	}
	return m
}

// ---------------------------------------------------------------------------

// logBuf collects log output.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Len returns the number of bytes logged so far.
func (l *logBuf) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}

// Tail returns the last n lines.
func (l *logBuf) Tail(n int) string {
	lines := strings.Split(strings.TrimRight(l.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
