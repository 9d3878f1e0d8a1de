package perf

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// assertNoLoopInto fails if any loop device is still backed by a file under dir.
func assertNoLoopInto(t *testing.T, dir string) {
	t.Helper()
	out, err := exec.Command("losetup", "--list", "--noheadings", "--output", "BACK-FILE").Output()
	if err != nil {
		t.Fatalf("losetup --list: %v", err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), dir) {
			t.Errorf("loop device left attached to %s", strings.TrimSpace(l))
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) > 0 {
		t.Errorf("files left in %s: %v", dir, ents)
	}
}

func TestRunCaptureNoAgent(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	dir := t.TempDir()
	var progress bytes.Buffer
	rep, err := RunCapture(context.Background(), CaptureConfig{
		Dir:        dir,
		DeviceSize: 256 << 20,
		Runtime:    2 * time.Second,
		Rounds:     1,
		Variants:   []Variant{VariantNone},
		// Captures other tests leave pinned meanwhile cost this
		// run nothing it checks.
		AllowOtherCaptures: true,
	}, discardLog(), &progress)
	assertNoLoopInto(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Samples) != 2 || len(rep.Results) != 2 {
		t.Fatalf("got %d samples, %d results; want 2 workloads × 1 variant × 1 round", len(rep.Samples), len(rep.Results))
	}
	for _, r := range rep.Results {
		if r.IOPS <= 0 || r.MBPerSec <= 0 || r.P99WriteUs <= 0 {
			t.Errorf("%s: implausible result %+v", r.Workload, r)
		}
		if r.AgentCPUPercent != nil || r.AgentPeakRSSBytes != nil {
			t.Errorf("%s: agent values without agent: %+v", r.Workload, r)
		}
	}
	// 1 MiB writes must move more bytes per IO than 4 KiB ones.
	if rs, seq := rep.Results[0], rep.Results[1]; seq.MBPerSec/seq.IOPS < 100*rs.MBPerSec/rs.IOPS {
		t.Errorf("bytes per IO: randwrite %.0f, seqwrite %.0f", rs.MBPerSec*1e6/rs.IOPS, seq.MBPerSec*1e6/seq.IOPS)
	}
	if !strings.Contains(progress.String(), "[2/2] round 1/1 seqwrite-1m none: ") {
		t.Errorf("progress = %q", progress.String())
	}
	var tb bytes.Buffer
	if err := rep.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", tb.String())
}

// TestRunCaptureFakeAgent drives the whole agent path with the test binary
// standing in for "lifeboat agent mirror" (see fakeAgent).
func TestRunCaptureFakeAgent(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	t.Setenv(fakeAgentEnv, "ok")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rep, err := RunCapture(context.Background(), CaptureConfig{
		AgentExe:           exe,
		Dir:                dir,
		DeviceSize:         128 << 20,
		Runtime:            time.Second,
		Rounds:             2,
		Variants:           []Variant{VariantNone, VariantData},
		Workloads:          DefaultWorkloads()[:1],
		AllowOtherCaptures: true,
	}, discardLog(), nil)
	assertNoLoopInto(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	var order []Variant
	for _, s := range rep.Samples {
		order = append(order, s.Variant)
	}
	if want := []Variant{VariantNone, VariantData, VariantData, VariantNone}; !slices.Equal(order, want) {
		t.Errorf("sample order = %v, want rotated %v", order, want)
	}
	data := rep.Results[1]
	if data.Variant != VariantData || data.AgentPeakRSSBytes == nil || *data.AgentPeakRSSBytes < 32<<20 {
		t.Fatalf("data result lacks agent peak RSS: %+v", data)
	}
	if data.AgentCPUPercent == nil || data.AgentCPUSecondsPerGB == nil || data.IOPSRatio == nil {
		t.Errorf("data result lacks agent CPU or ratio: %+v", data)
	}
	if data.OverflowEvents == nil || *data.OverflowEvents != 4 {
		t.Errorf("overflow events summed over 2 rounds = %v, want 4", data.OverflowEvents)
	}
	var tb bytes.Buffer
	if err := rep.WriteTable(&tb); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", tb.String())
}

// A run with other captures attached is refused, with how to detach them:
// every variant, the baseline too, would pay for their programs.
func TestRunCaptureRefusesOtherCaptures(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "0123456789abcdef"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "0123456789abcdef", "link_queue"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := RunCapture(context.Background(), CaptureConfig{Dir: t.TempDir(), PinRoot: root}, discardLog(), nil)
	if err == nil || !strings.Contains(err.Error(), "lifeboat agent release") || !strings.Contains(err.Error(), "--allow-other-captures") {
		t.Fatalf("RunCapture with a capture attached = %v, want a refusal naming the way out", err)
	}
	// An empty directory is a leftover with nothing attached: no refusal
	// (the run itself is cut short by its deadline).
	if err := os.Remove(filepath.Join(root, "0123456789abcdef", "link_queue")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = RunCapture(ctx, CaptureConfig{Dir: t.TempDir(), PinRoot: root, Variants: []Variant{VariantNone}}, discardLog(), nil)
	if err != nil && strings.Contains(err.Error(), "other capture") {
		t.Fatalf("refused over an empty directory: %v", err)
	}
}

func TestRunCaptureConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  CaptureConfig
		want string
	}{
		{"short runtime", CaptureConfig{Runtime: 500 * time.Millisecond}, "minimum 1s"},
		{"odd size", CaptureConfig{DeviceSize: 100<<20 + 1}, "multiple of 512"},
		{"dup variant", CaptureConfig{Variants: []Variant{VariantData, VariantData}}, "twice"},
		{"bad variant", CaptureConfig{Variants: []Variant{"full"}}, "unknown"},
		{"no fio", CaptureConfig{Fio: "/nonexistent/fio"}, "apt-get install fio"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := RunCapture(context.Background(), tc.cfg, discardLog(), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("RunCapture error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
}

func TestParseVariants(t *testing.T) {
	if vs, err := ParseVariants(""); err != nil || !slices.Equal(vs, AllVariants()) {
		t.Errorf(`ParseVariants("") = %v, %v`, vs, err)
	}
	if vs, err := ParseVariants("none, data"); err != nil || !slices.Equal(vs, []Variant{VariantNone, VariantData}) {
		t.Errorf(`ParseVariants("none, data") = %v, %v`, vs, err)
	}
	if _, err := ParseVariants("none,full"); err == nil {
		t.Error("unknown variant accepted")
	}
}

func TestRotateGivesEachVariantEachPosition(t *testing.T) {
	vs := AllVariants()
	first := map[Variant]int{}
	for r := range len(vs) {
		got := rotate(vs, r)
		first[got[0]]++
		if len(got) != len(vs) {
			t.Fatalf("rotate lost variants: %v", got)
		}
	}
	for _, v := range vs {
		if first[v] != 1 {
			t.Errorf("over %d rounds %s ran first %d times, want 1", len(vs), v, first[v])
		}
	}
}

func TestRunCaptureCanceledCleansUp(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	t.Setenv(fakeAgentEnv, "ok")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = RunCapture(ctx, CaptureConfig{
		AgentExe:           exe,
		Dir:                dir,
		DeviceSize:         128 << 20,
		Runtime:            20 * time.Second,
		Variants:           []Variant{VariantData},
		AllowOtherCaptures: true,
	}, discardLog(), nil)
	if err == nil || !strings.Contains(err.Error(), "deadline exceeded") {
		t.Errorf("RunCapture after cancel = %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("cancellation took %s", d)
	}
	assertNoLoopInto(t, dir)
}
