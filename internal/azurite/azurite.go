// Package azurite installs and runs Azurite, the Azure Storage emulator
// distributed through npm, for tests and demos of the Azure blob sink.
//
// Only the blob service is started. The harness pins one Azurite version so
// results are reproducible, installs it into a per-user cache on first use,
// and can stop and restart the emulator on the same port and workspace to
// simulate an Azure outage.
package azurite

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Version is the Azurite release installed by Install. Pinned so that emulator
// behaviour (supported API versions, 501 responses) does not drift under us.
const Version = "3.37.0"

// Well-known development account of every Azure Storage emulator. The key is
// public (documented by Microsoft) and grants access to the emulator only.
const (
	AccountName = "devstoreaccount1"
	AccountKey  = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// EnvConnectionString names the variable that makes ForTest use a real
// storage account instead of Azurite.
const EnvConnectionString = "AZURE_STORAGE_CONNECTION_STRING"

// ErrNoNode is returned by Install and Start when node or npm is not in
// PATH, or node is older than MinNode.
var ErrNoNode = errors.New("azurite: needs Node.js 20 or later and npm in PATH")

// MinNode is the oldest Node.js major version the pinned Azurite is run
// with here (its package declares 22, and runs on 20: the tests and the
// demo run it so).
const MinNode = 20

const binName = "azurite-blob"

// npmProject pins Azurite and, through its lock file, every package it
// depends on: npm ci installs exactly those. (make demo installs from the
// same files.)
//
//go:embed npm/package.json npm/package-lock.json
var npmProject embed.FS

// DefaultDir is where Install puts Azurite when given an empty dir:
// $LIFEBOAT_CACHE if set, else $XDG_CACHE_HOME/lifeboat/azurite (by
// default ~/.cache/lifeboat/azurite), else /var/cache/lifeboat/azurite
// (never a fixed name under /tmp, where another user could plant the
// code that root then runs).
func DefaultDir() string {
	if d := os.Getenv("LIFEBOAT_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "lifeboat", "azurite")
	}
	return "/var/cache/lifeboat/azurite"
}

// installed reports whether dir holds the pinned Version of Azurite,
// installed from this package's lock file (anything else, such as an
// older version left by a build before Version moved, is installed over).
func installed(dir, bin string) bool {
	if _, err := os.Stat(bin); err != nil {
		return false
	}
	b, err := os.ReadFile(filepath.Join(dir, "node_modules", "azurite", "package.json"))
	if err != nil {
		return false
	}
	var pkg struct{ Version string }
	if json.Unmarshal(b, &pkg) != nil || pkg.Version != Version {
		return false
	}
	have, err := os.ReadFile(filepath.Join(dir, "package-lock.json"))
	want, _ := npmProject.ReadFile("npm/package-lock.json")
	return err == nil && bytes.Equal(have, want)
}

// Install makes sure the pinned Azurite is installed under dir (DefaultDir
// when empty) and returns the path of the azurite-blob executable. It runs
// npm only when the executable is missing or of another version;
// concurrent callers (parallel test binaries) are serialised by a lock
// file in dir.
func Install(ctx context.Context, dir string) (binPath string, err error) {
	if dir == "" {
		dir = DefaultDir()
	}
	bin := filepath.Join(dir, "node_modules", ".bin", binName)
	if installed(dir, bin) {
		return bin, nil
	}
	node, err := exec.LookPath("node")
	if err != nil {
		return "", ErrNoNode
	}
	if v, err := exec.CommandContext(ctx, node, "--version").Output(); err != nil {
		return "", fmt.Errorf("%w: %s --version: %v", ErrNoNode, node, err)
	} else if major := nodeMajor(string(v)); major < MinNode {
		return "", fmt.Errorf("%w: found Node.js %s", ErrNoNode, strings.TrimSpace(string(v)))
	}
	npm, err := exec.LookPath("npm")
	if err != nil {
		return "", ErrNoNode
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("azurite: create install dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".install.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("azurite: open install lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("azurite: lock install dir: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	// Another process may have finished the install while we waited.
	if installed(dir, bin) {
		return bin, nil
	}
	for _, name := range []string{"package.json", "package-lock.json"} {
		b, err := npmProject.ReadFile("npm/" + name)
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return "", fmt.Errorf("azurite: %w", err)
		}
	}
	cmd := exec.CommandContext(ctx, npm, "ci", "--no-audit", "--no-fund", "--prefix", dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("azurite: npm ci of azurite@%s and its locked dependencies into %s: %w\n%s", Version, dir, err, tail(out, 4096))
	}
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("azurite: npm ci succeeded but %s is missing: %w", bin, err)
	}
	return bin, nil
}

// nodeMajor is the major version in node --version's "v20.20.2"; 0 if
// there is none.
func nodeMajor(v string) int {
	v, _, _ = strings.Cut(strings.TrimPrefix(strings.TrimSpace(v), "v"), ".")
	n, _ := strconv.Atoi(v)
	return n
}

// Options configure Start. The zero value is usable.
type Options struct {
	// InstallDir is passed to Install (DefaultDir when empty).
	InstallDir string
	// Location is Azurite's workspace. When empty a temporary directory is
	// created and removed by Stop. Ignored with InMemory.
	Location string
	// Port to listen on (127.0.0.1). Zero picks a free port.
	Port int
	// InMemory starts Azurite with --inMemoryPersistence (and no
	// --location, which Azurite rejects in that mode): Restart loses all data.
	InMemory bool
	// StartTimeout bounds how long Start waits for the port to accept
	// connections. Default 60 s (first start of node on a loaded machine is slow).
	StartTimeout time.Duration
	// Output, if set, receives Azurite's stdout and stderr.
	Output io.Writer
}

// Server is a running Azurite blob service, or (from ForTest with
// AZURE_STORAGE_CONNECTION_STRING set) a handle on a real storage account.
type Server struct {
	connStr string

	// Empty for a real account.
	bin     string
	opts    Options
	ownsLoc bool
	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{} // closed when cmd has been waited for
	waitErr error
	out     *tailBuffer
	stopped bool
}

// Start installs Azurite if needed and starts the blob service. It returns
// once the service accepts TCP connections.
func Start(ctx context.Context, opts Options) (*Server, error) {
	bin, err := Install(ctx, opts.InstallDir)
	if err != nil {
		return nil, err
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 60 * time.Second
	}
	s := &Server{bin: bin, opts: opts}
	if s.opts.InMemory {
		s.opts.Location = ""
	} else if s.opts.Location == "" {
		loc, err := os.MkdirTemp("", "azurite-")
		if err != nil {
			return nil, fmt.Errorf("azurite: create workspace: %w", err)
		}
		s.opts.Location, s.ownsLoc = loc, true
	}
	if s.opts.Port == 0 {
		p, err := freePort()
		if err != nil {
			s.removeLocation()
			return nil, err
		}
		s.opts.Port = p
	}
	s.connStr = fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=http://127.0.0.1:%d/%s;",
		AccountName, AccountKey, s.opts.Port, AccountName)
	if err := s.start(ctx); err != nil {
		s.removeLocation()
		return nil, err
	}
	return s, nil
}

// ConnectionString returns a full connection string for the server's
// account, suitable for azblob.NewClientFromConnectionString. It contains
// the account key: never log it.
func (s *Server) ConnectionString() string { return s.connStr }

// Emulated reports whether s is an Azurite process (false for a real
// account), i.e. whether Restart can simulate an outage.
func (s *Server) Emulated() bool { return s.bin != "" }

// Port returns the TCP port of the blob service (0 for a real account).
func (s *Server) Port() int { return s.opts.Port }

// Pid returns the process ID of the running Azurite (its Node.js
// process), or 0 for a real account or a stopped server: benchmarks read
// its CPU time to show when the emulator, not the code measured, is the
// bottleneck.
func (s *Server) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil || !s.running() {
		return 0
	}
	return s.cmd.Process.Pid
}

// Location returns Azurite's workspace directory.
func (s *Server) Location() string { return s.opts.Location }

// String describes the server without secrets.
func (s *Server) String() string {
	if !s.Emulated() {
		return "azure storage account (from " + EnvConnectionString + ")"
	}
	return fmt.Sprintf("azurite %s on 127.0.0.1:%d", Version, s.opts.Port)
}

// Stop terminates Azurite with SIGTERM (SIGKILL after 10 s), waits for it and
// removes a workspace that Start created. It is idempotent and a no-op for a
// real account. A stopped server cannot be restarted.
func (s *Server) Stop() error {
	if !s.Emulated() {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopped = true
	err := s.stopProcess()
	s.removeLocation()
	return err
}

// Down terminates Azurite like Stop but keeps the workspace and port so that
// Up can bring the same data back: together they simulate an outage.
func (s *Server) Down() error {
	if !s.Emulated() {
		return errors.New("azurite: cannot take a real storage account down")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errors.New("azurite: server was stopped")
	}
	return s.stopProcess()
}

// Up starts Azurite again after Down, on the same port and workspace. It is
// a no-op if the process is running.
func (s *Server) Up(ctx context.Context) error {
	if !s.Emulated() {
		return errors.New("azurite: cannot restart a real storage account")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return errors.New("azurite: server was stopped")
	}
	if s.running() {
		return nil
	}
	return s.start(ctx)
}

// Restart is Down followed by Up: same port and workspace, so data survives
// unless Options.InMemory was set.
func (s *Server) Restart(ctx context.Context) error {
	if err := s.Down(); err != nil {
		return err
	}
	return s.Up(ctx)
}

func (s *Server) running() bool {
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

// start launches the process; callers hold s.mu (or own s exclusively).
func (s *Server) start(ctx context.Context) error {
	args := []string{
		"--blobHost", "127.0.0.1",
		"--blobPort", strconv.Itoa(s.opts.Port),
		// The Go SDK sends a newer x-ms-version than Azurite knows.
		"--skipApiVersionCheck",
		"--disableTelemetry",
		"--silent",
	}
	if s.opts.InMemory {
		args = append(args, "--inMemoryPersistence")
	} else {
		args = append(args, "--location", s.opts.Location)
	}
	// Not CommandContext: ctx bounds the start-up, not the server's lifetime.
	cmd := exec.Command(s.bin, args...)
	s.out = &tailBuffer{max: 16 << 10}
	var w io.Writer = s.out
	if s.opts.Output != nil {
		w = io.MultiWriter(s.out, s.opts.Output)
	}
	cmd.Stdout, cmd.Stderr = w, w
	// Azurite dies with its parent: a test binary killed by its timeout
	// runs no cleanup.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return ErrNoNode
		}
		return fmt.Errorf("azurite: start %s: %w", s.bin, err)
	}
	exited := make(chan struct{})
	s.cmd, s.exited = cmd, exited
	go func() {
		err := cmd.Wait()
		s.waitErr = err
		close(exited)
	}()

	ctx, cancel := context.WithTimeout(ctx, s.opts.StartTimeout)
	defer cancel()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(s.opts.Port))
	for {
		// Azurite's own answer, not any listener's: the port was free
		// when chosen, not necessarily when Azurite came to bind it (it
		// then exits, and its output says so).
		if isAzurite(ctx, addr) {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("azurite: exited during start-up (%v):\n%s", s.waitErr, s.out.String())
		case <-ctx.Done():
			_ = s.stopProcess()
			return fmt.Errorf("azurite: not accepting connections on %s after %v: %w\n%s",
				addr, s.opts.StartTimeout, ctx.Err(), s.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// isAzurite reports whether an Azurite blob service answers on addr.
func isAzurite(ctx context.Context, addr string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return strings.HasPrefix(resp.Header.Get("Server"), "Azurite-Blob")
}

func (s *Server) stopProcess() error {
	if !s.running() {
		return nil
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	// Azurite exits non-zero on SIGTERM on some versions; that is expected.
	return nil
}

func (s *Server) removeLocation() {
	if s.ownsLoc {
		_ = os.RemoveAll(s.opts.Location)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("azurite: find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// tailBuffer keeps the last max bytes written, for start-up error messages.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > b.max {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-b.max:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(bytes.TrimSpace(b.buf))
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
