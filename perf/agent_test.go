package perf

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeAgentEnv makes the test binary act as "lifeboat agent mirror"; its
// value selects the behaviour (see fakeAgent).
const fakeAgentEnv = "LIFEBOAT_PERF_FAKE_AGENT"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeAgentEnv); mode != "" {
		os.Exit(fakeAgent(mode))
	}
	os.Exit(m.Run())
}

// releasedFile is what the fake "agent release" creates in the state dir.
const releasedFile = "released"

// fakeAgent imitates the agent's process contract:
//
//	ok:          READY=1, STATUS, X-LIFEBOAT-SYNCED=1, hold 32 MiB, on
//	             SIGTERM print counters and exit 0
//	exit-early:  complain on stderr and exit 1 before READY=1
//	ignore-term: become ready, then ignore SIGTERM
func fakeAgent(mode string) int {
	args := os.Args[1:]
	flag := func(name string) string {
		i := slices.Index(args, name)
		if i < 0 || i+1 >= len(args) {
			return ""
		}
		return args[i+1]
	}
	if len(args) == 4 && args[0] == "agent" && args[1] == "release" && flag("--state-dir") != "" {
		// Leaves a trace for the tests to see that the pin was released.
		if err := os.WriteFile(filepath.Join(flag("--state-dir"), releasedFile), nil, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	if len(args) < 2 || args[0] != "agent" || args[1] != "mirror" ||
		flag("--device") == "" || flag("--to") == "" || flag("--state-dir") == "" ||
		(flag("--mode") != "data" && flag("--mode") != "metadata") {
		fmt.Fprintf(os.Stderr, "fake agent: bad args %q\n", args)
		return 2
	}
	if mode == "exit-early" {
		fmt.Fprintln(os.Stderr, "fake agent: no BTF for this kernel")
		return 1
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	if mode == "ignore-term" {
		signal.Ignore(syscall.SIGTERM)
	}
	notify := func(msg string) {
		c, err := net.Dial("unixgram", os.Getenv("NOTIFY_SOCKET"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake agent: notify:", err)
			os.Exit(3)
		}
		c.Write([]byte(msg))
		c.Close()
	}
	notify("READY=1\nSTATUS=initial copy")
	hold := make([]byte, 32<<20)
	for i := range hold {
		hold[i] = byte(i)
	}
	notify("STATUS=initial copy done")
	notify("X-LIFEBOAT-SYNCED=1")
	if mode == "ignore-term" {
		select {}
	}
	<-term
	fmt.Printf("drained\ncounters: {\"overflow_events\":2,\"records\":%d,\"mode\":%q}\n", 9007199254740993, flag("--mode"))
	runtime.KeepAlive(hold)
	return 0
}

func testAgentSpec(t *testing.T, mode string) agentSpec {
	t.Setenv(fakeAgentEnv, mode)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	return agentSpec{
		Exe:          exe,
		Device:       "/dev/null",
		MirrorPath:   dir + "/mirror.img",
		Mode:         VariantData,
		RingMiB:      8,
		StateDir:     dir,
		NotifyDir:    t.TempDir(),
		ReadyTimeout: 10 * time.Second,
		SyncTimeout:  10 * time.Second,
		StopTimeout:  10 * time.Second,
	}
}

func TestAgentLifecycle(t *testing.T) {
	spec := testAgentSpec(t, "ok")
	a, err := startAgent(context.Background(), spec, discardLog())
	if err != nil {
		t.Fatal(err)
	}
	if cpu, err := a.cpuSeconds(); err != nil || cpu < 0 {
		t.Errorf("cpuSeconds = %v, %v", cpu, err)
	}
	rss, err := a.peakRSS()
	if err != nil || rss < 32<<20 {
		t.Errorf("peakRSS = %d, %v; want >= 32 MiB the fake agent touched", rss, err)
	}
	counters, err := a.stop()
	if err != nil {
		t.Fatalf("stop: %v", err)
	}
	if _, err := os.Stat(filepath.Join(spec.StateDir, releasedFile)); err != nil {
		t.Errorf("stop did not release the agent's pinned capture: %v", err)
	}
	if n, ok := counterInt(counters, counterOverflowEvents); !ok || n != 2 {
		t.Errorf("overflow_events = %d, %v", n, ok)
	}
	// 2^53+1: only exact if decoded as json.Number, not float64.
	if n, ok := counterInt(counters, counterRecords); !ok || n != 9007199254740993 {
		t.Errorf("records = %d, %v", n, ok)
	}
	if counters["mode"] != "data" {
		t.Errorf("counters = %v", counters)
	}
	if _, err := os.Stat(a.notify.path); !os.IsNotExist(err) {
		t.Errorf("notify socket left behind: %v", err)
	}
}

func TestAgentExitBeforeReadyReportsStderr(t *testing.T) {
	spec := testAgentSpec(t, "exit-early")
	_, err := startAgent(context.Background(), spec, discardLog())
	if err == nil || !strings.Contains(err.Error(), "no BTF for this kernel") || !strings.Contains(err.Error(), "READY=1") {
		t.Fatalf("startAgent = %v, want error with the agent's stderr", err)
	}
}

func TestAgentKilledWhenIgnoringSIGTERM(t *testing.T) {
	spec := testAgentSpec(t, "ignore-term")
	spec.StopTimeout = 300 * time.Millisecond
	a, err := startAgent(context.Background(), spec, discardLog())
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.stop()
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("stop = %v, want killed error", err)
	}
	if err := syscall.Kill(a.pid(), 0); err == nil {
		t.Errorf("agent %d still alive", a.pid())
	}
}

func TestAgentArgs(t *testing.T) {
	s := agentSpec{Device: "/dev/loop3", MirrorPath: "/m", Mode: VariantMetadata, StateDir: "/s", Delay: time.Second}
	want := "agent mirror --device /dev/loop3 --to /m --mode metadata --readback-delay 1s --state-dir /s"
	if got := strings.Join(s.args(), " "); got != want {
		t.Errorf("args = %q, want %q", got, want)
	}
	s.Mode = VariantData // the delay is for metadata mode only
	want = "agent mirror --device /dev/loop3 --to /m --mode data --state-dir /s"
	if got := strings.Join(s.args(), " "); got != want {
		t.Errorf("args = %q, want %q", got, want)
	}
	s.Mode = VariantMetadata
	s.RingMiB = 64
	if got := strings.Join(s.args(), " "); !strings.Contains(got, "--ring-mib 64") {
		t.Errorf("args = %q lack --ring-mib", got)
	}
}

func TestEnvWithout(t *testing.T) {
	got := envWithout([]string{"A=1", "NOTIFY_SOCKET=/run/systemd/notify", "NOTIFY_SOCKETX=2"}, "NOTIFY_SOCKET")
	if !slices.Equal(got, []string{"A=1", "NOTIFY_SOCKETX=2"}) {
		t.Errorf("envWithout = %q", got)
	}
}
