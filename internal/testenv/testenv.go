// Package testenv gates tests on the privileges and host facilities they
// need (root, BTF, external tools).
//
// The rule is the same for every check: when the requirement is missing the
// test is skipped with a message saying why, unless the environment variable
// CI is "true". In CI a missing requirement is a failure, so that a
// misconfigured runner cannot silently turn the privileged tests into skips.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// BTFPath is where the kernel exposes its own BTF type information.
const BTFPath = "/sys/kernel/btf/vmlinux"

// InCI reports whether the tests run in CI (CI=true), where missing
// requirements fail instead of skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// RequireRoot skips t (or fails it when InCI) unless the effective uid is 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	if euid := os.Geteuid(); euid != 0 {
		unmet(t, fmt.Sprintf("test requires root (euid is %d)", euid))
	}
}

// RequireBTF skips t (or fails it when InCI) unless the running kernel
// exposes BTF at BTFPath.
func RequireBTF(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(BTFPath); err != nil {
		unmet(t, fmt.Sprintf("test requires kernel BTF (%v)", err))
	}
}

// RequireTool skips t (or fails it when InCI) unless the executable name is
// found in $PATH. It returns the tool's full path.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		unmet(t, fmt.Sprintf("test requires the %q tool (%v)", name, err))
	}
	return path
}

// unmet ends the test: Skip normally, Fatal in CI. Both stop the calling
// test goroutine, so callers need no return after it.
func unmet(t testing.TB, why string) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s; CI=true so this must run", why)
	}
	t.Skipf("%s; skipping (with CI=true this would fail)", why)
}

// GoSource returns a directory of the Go source tree (e.g. "src/net"),
// which every machine that runs the tests has: a tree of small files for
// file system workloads. It asks `go env GOROOT` (runtime.GOROOT is
// deprecated) and falls back to GOROOT from the environment.
func GoSource(rel string) (string, error) {
	root := os.Getenv("GOROOT")
	if out, err := exec.Command("go", "env", "GOROOT").Output(); err == nil && len(out) > 1 {
		root = string(out[:len(out)-1])
	}
	if root == "" {
		return "", fmt.Errorf("testenv: no Go tree found (go env GOROOT failed and GOROOT is unset)")
	}
	return filepath.Join(root, rel), nil
}

// CPUFlags returns the CPU flags Linux lists in /proc/cpuinfo (of its
// first processor): what tests of a fast path check it against.
func CPUFlags() ([]string, error) {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return nil, err
	}
	for line := range strings.Lines(string(info)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
			return strings.Fields(v), nil
		}
	}
	return nil, errors.New("no flags line in /proc/cpuinfo")
}
