package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// The shipped systemd unit's command line is one the agent accepts, with
// app-consistent points off: the unit grants no CAP_SYS_ADMIN for fsfreeze.
func TestServiceUnitCommandLine(t *testing.T) {
	f, err := os.Open("../../deploy/lifeboat-agent.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var exec []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "ExecStart="); ok {
			if strings.HasSuffix(v, "\\") {
				t.Fatal("ExecStart continues on the next line: keep it on one (this test reads one)")
			}
			exec = strings.Fields(v)
		}
	}
	if len(exec) < 3 || !strings.HasSuffix(exec[0], "/lifeboat") || exec[1] != "agent" {
		t.Fatalf("ExecStart %q: want /…/lifeboat agent …", exec)
	}
	var verbose bool
	cmd := agentCmd(&verbose)
	if err := cmd.ParseFlags(exec[2:]); err != nil {
		t.Fatalf("ExecStart flags: %v", err)
	}
	if err := cmd.ValidateRequiredFlags(); err != nil {
		t.Fatalf("ExecStart flags: %v", err)
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		t.Fatalf("ExecStart arguments: %v", err)
	}
	if got := cmd.Flags().Lookup("app-interval").Value.String(); got != "0s" {
		t.Errorf("unit takes app-consistent points every %s, but grants no CAP_SYS_ADMIN for fsfreeze", got)
	}
}

// Values the roles would silently replace by their defaults are refused,
// before anything else is looked at.
func TestFlagValuesRefused(t *testing.T) {
	var verbose bool
	base := []string{"--pki", "p", "--name", "n", "--cache", "c", "--recovery-key", "k"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{append(base, "--point-interval", "0"), "--point-interval 0s: must be at least 1s"},
		{append(base, "--point-interval", "-5s"), "--point-interval -5s: must be at least 1s"},
		{append(base, "--retention", "0"), "--retention 0"},
		{append(base, "--upload-limit", "-1"), "--upload-limit -1"},
		{append(base, "--metrics", ":9100", "--pprof"), "served without authentication"},
		{append(base, "--metrics", "10.0.0.1:9100", "--pprof"), "served without authentication"},
		{append(base, "--pprof"), "give one"},
		{[]string{"--pki", "p", "--name", "n", "--cache=", "--recovery-key", "k"}, `--cache ""`},
	} {
		if _, _, err := runCmd(t, processServerCmd(&verbose), tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("process-server %v: %v, want %q", tc.args, err, tc.want)
		}
	}
	agent := agentCmd(&verbose)
	if _, _, err := runCmd(t, agent, "--process-server", "ps:7070", "--pki", "p", "--name", "n", "--device", "/dev/null", "--stop-timeout", "0"); err == nil || !strings.Contains(err.Error(), "--stop-timeout 0s: must be positive") {
		t.Errorf("agent --stop-timeout 0: %v", err)
	}
	if _, _, err := runCmd(t, agentCmd(&verbose), "--process-server", "ps:7070", "--pki", "p", "--name", "n", "--device", "/dev/null", "--metrics", ":9101", "--pprof"); err == nil || !strings.Contains(err.Error(), "served without authentication") {
		t.Errorf("agent --pprof on all interfaces: %v", err)
	}
	if _, _, err := runCmd(t, agentCmd(&verbose), "--process-server", "ps:7070", "--pki", "p", "--name", "n", "--device", "/dev/null", "--crash-interval", "-1s"); err == nil || !strings.Contains(err.Error(), "must not be negative") {
		t.Errorf("agent --crash-interval -1s: %v", err)
	}
	if _, _, err := runCmd(t, agentCmd(&verbose), "mirror", "--device", "/dev/null", "--to", "x", "--app-interval", "-1m"); err == nil || !strings.Contains(err.Error(), "must not be negative") {
		t.Errorf("agent mirror --app-interval -1m: %v", err)
	}
	// pki issue: a name or role it cannot issue is a flag value (exit 2).
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"issue", "--dir", "p", "--name", "../x", "--role", "agent"}, "invalid name"},
		{[]string{"issue", "--dir", "p", "--name", "x", "--role", "config-server"}, "not built yet"},
	} {
		if _, _, err := runCmd(t, pkiCmd(), tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("pki %v: %v, want %q", tc.args, err, tc.want)
		}
	}
	// recover: an empty value (an unset shell variable) is refused before
	// anything is read; a target that is no file is named as such, not
	// sent to --force.
	rec := []string{"--machine", "m", "--disk", "d", "--point", "latest", "--recovery-key", "k"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{append([]string{"--to", ""}, rec...), "--to is empty"},
		{[]string{"--machine", "", "--disk", "d", "--point", "latest", "--recovery-key", "k", "--to", "x"}, "--machine is empty"},
		{[]string{"--machine", "m", "--disk", "", "--point", "latest", "--recovery-key", "k", "--to", "x"}, "--disk is empty"},
		{append([]string{"--to", "/dev/null"}, rec...), "not a regular file"},
		{append([]string{"--to", t.TempDir()}, rec...), "not a regular file"},
	} {
		if _, _, err := runCmd(t, recoverCmd(&verbose), tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("recover %v: %v, want %q", tc.args, err, tc.want)
		}
	}
}

// agent release refuses a machine name the agent itself would refuse.
func TestAgentReleaseRefusesBadName(t *testing.T) {
	testenv.RequireRoot(t)
	var verbose bool
	if _, _, err := runCmd(t, agentCmd(&verbose), "release", "--state-dir", t.TempDir(), "--name", "web/01"); err == nil || !strings.Contains(err.Error(), "without slashes") {
		t.Errorf("release --name web/01: %v", err)
	}
}

// agent release says what it released, and what to add when nothing was.
func TestAgentReleaseSaysWhatItDid(t *testing.T) {
	testenv.RequireRoot(t)
	var verbose bool
	dir := t.TempDir()
	out, _, err := runCmd(t, agentCmd(&verbose), "release", "--state-dir", dir)
	if err != nil || !strings.Contains(out, "nothing was pinned") || !strings.Contains(out, "add --name MACHINE") {
		t.Errorf("release of an unused state directory: %q, %v", out, err)
	}
	out, _, err = runCmd(t, agentCmd(&verbose), "release", "--state-dir", dir, "--name", "web1")
	if err != nil || !strings.Contains(out, "nothing was pinned for machine web1") {
		t.Errorf("release --name of an unused state directory: %q, %v", out, err)
	}
}

func TestExitCodes(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{errors.New("x"), 1},
		{fmt.Errorf("%w: recovery stopped", errInterrupted), 130},
		{fmt.Errorf("at 7: %w", recovery.ErrOutOfRange), 3},
		{fmt.Errorf("key: %w (%w)", recovery.ErrWrongRecoveryKey, recovery.ErrTampered), 4},
		{fmt.Errorf("segment: %w", recovery.ErrTampered), 5},
	} {
		if got := exitCode(c.err); got != c.want {
			t.Errorf("exitCode(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}

// A command line cobra refuses exits 2 and names the help to read; a
// command that ran and failed exits 1.
func TestUsageErrorsExit2(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want int
		help string
	}{
		{[]string{"nosuch"}, 2, "lifeboat --help"},
		{[]string{"recover", "--bogus"}, 2, "lifeboat recover --help"},
		{[]string{"pki", "issue", "--dir", dir}, 2, "lifeboat pki issue --help"},
		{[]string{"keys", "init", "--to", dir + "/k", "stray"}, 2, "lifeboat keys init --help"},
		{[]string{"pki", "issue", "--dir", dir + "/none", "--name", "a", "--role", "agent"}, 1, ""},
		// A mistyped subcommand of a group, and bad flag values.
		{[]string{"keys", "innit"}, 2, "lifeboat keys --help"},
		{[]string{"bench", "captur"}, 2, "lifeboat bench --help"},
		{[]string{"recover", "--machine", "m", "--disk", "d", "--to", dir + "/out", "--recovery-key", dir + "/k", "--point", "2026-11-25"}, 2, "lifeboat recover --help"},
		{[]string{"recover", "--machine", "m", "--disk", "d", "--to", dir + "/out", "--recovery-key", dir + "/k", "--point", ""}, 2, "lifeboat recover --help"},
		{[]string{"agent", "mirror", "--device", "/dev/null", "--to", dir + "/m", "--ring-mib", "3"}, 2, "lifeboat agent mirror --help"},
		{[]string{"agent", "mirror", "--device", "/dev/null", "--to", dir + "/m", "--ring-mib", "4096"}, 2, "lifeboat agent mirror --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "/dev/null", "--ring-mib", "4096"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "sda="}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "a/b=/dev/null"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "a=/dev/null", "--device", "a=/dev/zero"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "/dev/null", "--device", "/tmp/null"}, 2, "lifeboat agent --help"},
		{[]string{"points", "--machine", "a/b"}, 2, "lifeboat points --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "/dev/null", "--metrics", "bogus"}, 2, "lifeboat agent --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1", "--cache-write-quorum", "-1"}, 2, "lifeboat process-server --help"},
		{[]string{"recover", "--machine", "m", "--disk", "a/b", "--to", dir + "/out", "--recovery-key", dir + "/k"}, 2, "lifeboat recover --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1,"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1", "--retention", "0"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1", "--upload-limit", "20"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1", "--upload-limit", "NaN"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1", "--retention", "1m"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1", "--point-interval", "1ns"}, 2, "lifeboat process-server --help"},
		// Empty values (an unset shell variable) and an unknown role.
		{[]string{"pki", "init", "--dir", ""}, 2, "lifeboat pki init --help"},
		{[]string{"pki", "issue", "--dir", dir, "--name", "", "--role", "agent"}, 2, "lifeboat pki issue --help"},
		{[]string{"pki", "issue", "--dir", dir, "--name", "a", "--role", "bogus"}, 2, "lifeboat pki issue --help"},
		{[]string{"keys", "init", "--to", ""}, 2, "lifeboat keys init --help"},
		{[]string{"pki", "revoke", "--dir", "", "--name", "a"}, 2, "lifeboat pki revoke --help"},
		{[]string{"process-server", "--pki", dir, "--name", "", "--recovery-key", dir + "/k", "--cache", dir + "/c1"}, 2, "lifeboat process-server --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", "", "--name", "m", "--device", "/dev/null"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "/dev/null", "--state-dir", ""}, 2, "lifeboat agent --help"},
		{[]string{"agent", "mirror", "--device", "/dev/null", "--to", dir + "/m", "--state-dir", ""}, 2, "lifeboat agent mirror --help"},
		{[]string{"agent", "mirror", "--device", "", "--to", dir + "/m"}, 2, "lifeboat agent mirror --help"},
		{[]string{"recover", "--machine", "m", "--disk", "d", "--to", "", "--recovery-key", dir + "/k", "--point", "latest"}, 2, "lifeboat recover --help"},
		{[]string{"recover", "--machine", "m", "--disk", "d", "--to", dir + "/out", "--recovery-key", ""}, 2, "lifeboat recover --help"},
		{[]string{"recover", "--machine", "m", "--disk", "d", "--to", dir + "/out", "--recovery-key", dir + "/k", "--container", ""}, 2, "lifeboat recover --help"},
		{[]string{"points", "--machine", ""}, 2, "lifeboat points --help"},
		{[]string{"points", "--machine", "m", "--recovery-key", ""}, 2, "lifeboat points --help"},
		{[]string{"process-server", "--listen", "", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1"}, 2, "lifeboat process-server --help"},
		{[]string{"agent", "--process-server", "h", "--pki", dir, "--name", "m", "--device", "/dev/null"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "a/b", "--device", "/dev/null"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "--process-server", "h:1", "--pki", dir, "--name", "m", "--device", "/dev/null", "--readback-delay", "-1s"}, 2, "lifeboat agent --help"},
		{[]string{"agent", "mirror", "--device", "/dev/null", "--to", dir + "/m", "--readback-delay", "-1s"}, 2, "lifeboat agent mirror --help"},
		{[]string{"bench", "capture", "--variants", "bogus"}, 2, "lifeboat bench capture --help"},
		{[]string{"process-server", "--listen", "bogus", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--listen", "127.0.0.1:99999", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1"}, 2, "lifeboat process-server --help"},
		{[]string{"process-server", "--pki", dir, "--name", "ps", "--recovery-key", dir + "/k", "--cache", dir + "/c1," + dir + "/c2", "--cache-write-quorum", "3"}, 2, "lifeboat process-server --help"},
		{[]string{"pki", "issue", "--dir", dir, "--name", "a", "--role", "agent", "--host", "bad host"}, 2, "lifeboat pki issue --help"},
		{[]string{"bench", "pipeline", "--bs", "bogus"}, 2, "lifeboat bench pipeline --help"},
		// A mistyped subcommand followed by flags is named, not the
		// first flag its parent lacks.
		{[]string{"agent", "mirorr", "--device", "/dev/null", "--to", dir + "/m"}, 2, `unknown command "mirorr" for "lifeboat agent" (did you mean mirror?)`},
		{[]string{"keys", "ini", "--to", dir + "/k"}, 2, `unknown command "ini" for "lifeboat keys" (did you mean init?)`},
		{[]string{"pki", "isue", "--dir", dir, "--name", "a"}, 2, `unknown command "isue" for "lifeboat pki" (did you mean issue?)`},
	} {
		var verbose bool
		root := newRoot(&verbose)
		root.SetArgs(c.args)
		root.SetOut(io.Discard)
		root.SetErr(io.Discard)
		err := execute(context.Background(), root)
		if got := exitCode(err); got != c.want || err == nil || !strings.Contains(err.Error(), c.help) {
			t.Errorf("lifeboat %v: exit %d (%v), want %d naming %q", c.args, got, err, c.want, c.help)
		}
	}
}

// TestNoCoreDumps: every command turns core dumps and ptrace by its user
// off before it runs (keys live in its memory).
func TestNoCoreDumps(t *testing.T) {
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_DUMPABLE, 1, 0, 0, 0) })
	var verbose bool
	if _, _, err := runCmd(t, newRoot(&verbose), "keys", "init", "--to", filepath.Join(t.TempDir(), "rk")); err != nil {
		t.Fatal(err)
	}
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || d != 0 {
		t.Fatalf("dumpable %d (%v) after a command ran, want 0", d, err)
	}
}
