package azurite

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
)

func TestInstallWithoutNode(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := Install(context.Background(), t.TempDir())
	if !errors.Is(err, ErrNoNode) {
		t.Fatalf("Install without node: err = %v, want ErrNoNode", err)
	}
}

// A Node.js older than MinNode is refused with the version found, as a
// missing one is (tests skip outside CI, fail in it).
func TestInstallWithOldNode(t *testing.T) {
	bin := t.TempDir()
	for name, script := range map[string]string{"node": "#!/bin/sh\necho v18.19.0\n", "npm": "#!/bin/sh\nexit 1\n"} {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", bin)
	_, err := Install(context.Background(), t.TempDir())
	if !errors.Is(err, ErrNoNode) || !strings.Contains(err.Error(), "v18.19.0") {
		t.Fatalf("Install with Node.js 18: err = %v, want ErrNoNode naming the version", err)
	}
	for v, want := range map[string]int{"v20.20.2\n": 20, "v22.1.0": 22, "": 0, "bogus": 0} {
		if got := nodeMajor(v); got != want {
			t.Errorf("nodeMajor(%q) = %d, want %d", v, got, want)
		}
	}
}

func TestDefaultDirHonoursEnv(t *testing.T) {
	t.Setenv("LIFEBOAT_CACHE", "/x/y")
	if got := DefaultDir(); got != "/x/y" {
		t.Fatalf("DefaultDir = %q", got)
	}
}

// Without LIFEBOAT_CACHE, HOME or XDG_CACHE_HOME, Azurite does not go to
// a fixed name under /tmp.
func TestDefaultDirWithoutHome(t *testing.T) {
	t.Setenv("LIFEBOAT_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "")
	if got := DefaultDir(); strings.HasPrefix(got, os.TempDir()) {
		t.Fatalf("DefaultDir = %q, under %s", got, os.TempDir())
	}
}

// The npm project Install runs npm ci on pins Version, and its lock file
// pins Azurite's dependencies (each with its integrity hash).
func TestNPMProjectPinsVersion(t *testing.T) {
	b, err := npmProject.ReadFile("npm/package.json")
	if err != nil {
		t.Fatal(err)
	}
	var pkg struct{ Dependencies map[string]string }
	if err := json.Unmarshal(b, &pkg); err != nil || pkg.Dependencies["azurite"] != Version {
		t.Fatalf("npm/package.json depends on azurite %q (%v), want %s", pkg.Dependencies["azurite"], err, Version)
	}
	b, err = npmProject.ReadFile("npm/package-lock.json")
	if err != nil {
		t.Fatal(err)
	}
	var lock struct {
		Packages map[string]struct{ Version, Integrity string }
	}
	if err := json.Unmarshal(b, &lock); err != nil {
		t.Fatal(err)
	}
	if got := lock.Packages["node_modules/azurite"].Version; got != Version {
		t.Fatalf("package-lock.json locks azurite %q, want %s", got, Version)
	}
	for name, p := range lock.Packages {
		if name != "" && (p.Version == "" || p.Integrity == "") {
			t.Errorf("package-lock.json: %s has no version or integrity", name)
		}
	}
}

func TestConnectionStringForRealAccount(t *testing.T) {
	t.Setenv(EnvConnectionString, "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k;")
	s := ForTest(t)
	if s.Emulated() || s.Pid() != 0 || s.ConnectionString() != "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k;" {
		t.Fatalf("ForTest with %s: emulated=%v pid=%d cs=%q", EnvConnectionString, s.Emulated(), s.Pid(), s.ConnectionString())
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := s.Restart(context.Background()); err == nil {
		t.Fatal("Restart of a real account succeeded")
	}
}

func TestStartRestartKeepsDataAndPort(t *testing.T) {
	t.Setenv(EnvConnectionString, "")
	s := ForTest(t)
	if !s.Emulated() {
		t.Skip("real account")
	}
	cs := s.ConnectionString()
	want := "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=" + AccountKey +
		";BlobEndpoint=http://127.0.0.1:" + strconv.Itoa(s.Port()) + "/devstoreaccount1;"
	if cs != want {
		t.Fatalf("ConnectionString = %q, want %q", cs, want)
	}
	if strings.Contains(s.String(), AccountKey) {
		t.Fatal("String() leaks the account key")
	}
	ctx := context.Background()
	c, err := azblob.NewClientFromConnectionString(cs, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateContainer(ctx, "restart", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UploadBuffer(ctx, "restart", "b", []byte("survives restart"), nil); err != nil {
		t.Fatal(err)
	}

	// Pid is Azurite's own (Node.js) process, not a shell around it.
	pid := s.Pid()
	if comm, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm"); pid == 0 || err != nil || !strings.HasPrefix(string(comm), "node") {
		t.Fatalf("Pid() = %d, comm %q, %v; want the running node process", pid, comm, err)
	}

	port := s.Port()
	if err := s.Down(); err != nil {
		t.Fatal(err)
	}
	if s.Pid() != 0 {
		t.Fatalf("Pid() = %d after Down, want 0", s.Pid())
	}
	if conn, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second); err == nil {
		conn.Close()
		t.Fatal("port still accepts connections after Down")
	}
	if err := s.Up(ctx); err != nil {
		t.Fatal(err)
	}
	if s.Port() != port {
		t.Fatalf("port changed across restart: %d -> %d", port, s.Port())
	}
	r, err := c.DownloadStream(ctx, "restart", "b", nil)
	if err != nil {
		t.Fatalf("download after restart: %v", err)
	}
	got, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if string(got) != "survives restart" {
		t.Fatalf("after restart got %q", got)
	}

	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := s.Up(ctx); err == nil {
		t.Fatal("Up after Stop succeeded")
	}
}

func TestInMemory(t *testing.T) {
	if _, err := Install(context.Background(), ""); errors.Is(err, ErrNoNode) && os.Getenv("CI") != "true" {
		t.Skip(err)
	}
	s, err := Start(context.Background(), Options{InMemory: true, Location: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	if s.Location() != "" {
		t.Fatalf("in-memory server has workspace %q", s.Location())
	}
	c, err := azblob.NewClientFromConnectionString(s.ConnectionString(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateContainer(context.Background(), "mem", nil); err != nil {
		t.Fatal(err)
	}
}

// A port taken by another server between its choice and Azurite's bind is
// not taken for Azurite's: Start fails with Azurite's own complaint.
func TestStartOnTakenPort(t *testing.T) {
	if _, err := Install(context.Background(), ""); errors.Is(err, ErrNoNode) && os.Getenv("CI") != "true" {
		t.Skip(err)
	}
	other := httptest.NewServer(http.NotFoundHandler())
	defer other.Close()
	port := other.Listener.Addr().(*net.TCPAddr).Port
	s, err := Start(context.Background(), Options{InMemory: true, Port: port})
	if err == nil {
		s.Stop()
		t.Fatalf("Start on port %d, held by another server: no error", port)
	}
	if !strings.Contains(err.Error(), "exited during start-up") {
		t.Fatalf("Start on a taken port: %v, want Azurite's exit reported", err)
	}
}
