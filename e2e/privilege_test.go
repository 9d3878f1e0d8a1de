package e2e

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// agentUnit is the systemd unit the project ships for the agent. Helper
// agents run with its CapabilityBoundingSet, so the tests prove that set
// enough to protect a disk (attach, initial copy, stream).
const agentUnit = "../deploy/lifeboat-agent.service"

// capsPrefix starts the line where a helper reports its effective
// capabilities (CapEff of /proc/self/status, hex).
const capsPrefix = "CAPS "

// capabilityBits are the capabilities the unit may name.
var capabilityBits = map[string]int{
	"CAP_BPF":       unix.CAP_BPF,
	"CAP_PERFMON":   unix.CAP_PERFMON,
	"CAP_SYS_ADMIN": unix.CAP_SYS_ADMIN,
}

// unitCapabilities returns the agent unit's CapabilityBoundingSet.
func unitCapabilities(t *testing.T) []string {
	t.Helper()
	f, err := os.Open(agentUnit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var caps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "CapabilityBoundingSet="); ok {
			caps = append(caps, strings.Fields(v)...)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(caps) == 0 {
		t.Fatalf("%s sets no CapabilityBoundingSet", agentUnit)
	}
	return caps
}

// leastPrivilege returns the command prefix that runs a program with only
// caps (as the unit's bounding set does for root) and the CapEff it must
// then report.
func leastPrivilege(t *testing.T, caps []string) (prefix []string, capEff uint64) {
	t.Helper()
	setpriv := testenv.RequireTool(t, "setpriv")
	set := []string{"-all"}
	for _, c := range caps {
		bit, ok := capabilityBits[c]
		if !ok {
			t.Fatalf("%s: unknown capability %s", agentUnit, c)
		}
		capEff |= 1 << bit
		set = append(set, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	return []string{setpriv, "--bounding-set=" + strings.Join(set, ","), "--inh-caps=-all", "--no-new-privs", "--"}, capEff
}

// printCapabilities writes the capsPrefix line for this process.
func printCapabilities() error {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err
	}
	for l := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			fmt.Println(capsPrefix + strings.TrimSpace(v))
			return nil
		}
	}
	return fmt.Errorf("no CapEff in /proc/self/status")
}

// assertCapabilities checks a helper reported exactly want as CapEff.
func assertCapabilities(t *testing.T, h *helper, want uint64, names []string) {
	t.Helper()
	got, err := strconv.ParseUint(h.caps, 16, 64)
	if err != nil {
		t.Fatalf("%s helper reported capabilities %q: %v", h.what, h.caps, err)
	}
	if got != want {
		t.Fatalf("%s helper ran with capabilities %#x, want %#x (%s)", h.what, got, want, strings.Join(names, " "))
	}
	t.Logf("%s helper ran with %s only (CapEff %#x)", h.what, strings.Join(slices.Sorted(slices.Values(names)), " "), got)
}
