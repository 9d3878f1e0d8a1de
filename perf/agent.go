package perf

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// countersPrefix starts the line of JSON counters the agent prints on stdout
// when it exits after SIGTERM.
const countersPrefix = "counters: "

// Counter keys the report lifts out of the agent's counters object.
const (
	counterOverflowEvents = "overflow_events"
	counterRecords        = "records"
)

// Bytes of child output kept for error messages and the counters line.
const outputTail = 64 << 10

// agentSpec describes one agent mirror run.
type agentSpec struct {
	Exe          string
	Device       string
	MirrorPath   string
	Mode         Variant       // VariantMetadata or VariantData
	RingMiB      int           // 0: agent default
	Delay        time.Duration // --readback-delay (metadata mode)
	StateDir     string
	NotifyDir    string // private directory for the notify socket
	ReadyTimeout time.Duration
	SyncTimeout  time.Duration
	StopTimeout  time.Duration
	Cgroup       *ioCgroup // nil: the harness's own cgroup
}

func (s agentSpec) args() []string {
	a := []string{"agent", "mirror",
		"--device", s.Device,
		"--to", s.MirrorPath,
		"--mode", string(s.Mode),
	}
	if s.RingMiB > 0 {
		a = append(a, "--ring-mib", strconv.Itoa(s.RingMiB))
	}
	if s.Mode == VariantMetadata {
		a = append(a, "--readback-delay", s.Delay.String())
	}
	return append(a, "--state-dir", s.StateDir)
}

// agentProc is a running capture agent.
type agentProc struct {
	spec    agentSpec
	log     *slog.Logger
	cmd     *exec.Cmd
	notify  *notifyListener
	stdout  *tailBuffer
	stderr  *tailBuffer
	exited  chan struct{} // closed when cmd.Wait returns
	waitErr error         // valid once exited is closed
}

// startAgent starts the agent and returns once it has reported both READY=1
// and X-LIFEBOAT-SYNCED=1, i.e. capture is active and the initial copy is
// done. On error the agent has been stopped.
func startAgent(ctx context.Context, spec agentSpec, log *slog.Logger) (*agentProc, error) {
	n, err := listenNotify(spec.NotifyDir, log)
	if err != nil {
		return nil, err
	}
	a := &agentProc{
		spec:   spec,
		log:    log,
		notify: n,
		stdout: newTailBuffer(outputTail),
		stderr: newTailBuffer(outputTail),
		exited: make(chan struct{}),
	}
	cmd := exec.Command(spec.Exe, spec.args()...)
	cmd.Env = append(envWithout(os.Environ(), "NOTIFY_SOCKET"), "NOTIFY_SOCKET="+n.path)
	cmd.Stdout = a.stdout
	cmd.Stderr = a.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Own process group: a terminal ^C reaches only the harness, which
		// then stops the agent in order (SIGTERM, drain) instead of both
		// racing.
		Setpgid: true,
		// Never leave an agent (and its BPF programs) behind if the harness
		// is killed.
		Pdeathsig: syscall.SIGTERM,
	}
	// Bound Wait if the agent leaves a descendant holding its stdout open.
	cmd.WaitDelay = 5 * time.Second
	a.cmd = cmd
	log.Debug("start agent", "exe", spec.Exe, "args", strings.Join(spec.args(), " "))
	if err := cmd.Start(); err != nil {
		n.Close()
		return nil, fmt.Errorf("start agent %s: %w", spec.Exe, err)
	}
	go func() {
		a.waitErr = cmd.Wait()
		close(a.exited)
	}()
	if spec.Cgroup != nil {
		// Long before its first read: the agent reads only after READY=1.
		if err := spec.Cgroup.add(cmd.Process.Pid); err != nil {
			select {
			case <-a.exited: // its own error says more
				a.notify.Close()
				return nil, fmt.Errorf("agent exited at start (%v): %s", a.waitErr, a.stderrText())
			case <-time.After(time.Second): // not yet reaped, or alive
			}
			if _, stopErr := a.stop(); stopErr != nil {
				log.Warn("stop agent after failed start", "err", stopErr)
			}
			return nil, err
		}
	}

	if err := a.awaitNotify(ctx, readyMsg, spec.ReadyTimeout); err != nil {
		return nil, err
	}
	log.Debug("agent ready", "pid", cmd.Process.Pid)
	if err := a.awaitNotify(ctx, syncedMsg, spec.SyncTimeout); err != nil {
		return nil, err
	}
	log.Debug("agent synced", "pid", cmd.Process.Pid)
	return a, nil
}

// awaitNotify waits for msg and, on failure, stops the agent and returns an
// error carrying its stderr.
func (a *agentProc) awaitNotify(ctx context.Context, msg string, timeout time.Duration) error {
	err := a.notify.wait(ctx, msg, timeout, a.exited)
	if err == nil {
		return nil
	}
	if errors.Is(err, errChildExited) {
		a.notify.Close()
		return fmt.Errorf("agent exited before %s (%v): %s", msg, a.waitErr, a.stderrText())
	}
	if _, stopErr := a.stop(); stopErr != nil {
		a.log.Warn("stop agent after failed start", "err", stopErr)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("agent %s: %w; stderr: %s", a.spec.Mode, err, a.stderrText())
}

func (a *agentProc) pid() int { return a.cmd.Process.Pid }

// cpuSeconds returns the agent's user+system CPU time so far.
func (a *agentProc) cpuSeconds() (float64, error) { return procCPUSeconds(a.pid()) }

// exitCPUSeconds returns the user+system CPU time the agent used in all,
// once stop has returned.
func (a *agentProc) exitCPUSeconds() float64 {
	ps := a.cmd.ProcessState
	return (ps.UserTime() + ps.SystemTime()).Seconds()
}

// peakRSS returns the agent's VmHWM in bytes.
func (a *agentProc) peakRSS() (int64, error) {
	ring := int64(cmp.Or(a.spec.RingMiB, defaultRingMiB)) << 20
	return procPeakRSS(a.pid(), ring)
}

// defaultRingMiB is the agent's --ring-mib default.
const defaultRingMiB = 64

// stop sends SIGTERM, waits up to StopTimeout for the agent to drain and exit
// (then SIGKILLs it), releases the capture it left pinned and returns the
// counters it printed, if any. An exit status other than 0 is an error.
func (a *agentProc) stop() (map[string]any, error) {
	counters, err := a.terminate()
	// A clean stop leaves capture pinned and attached on purpose (writes
	// made while the agent is down go to the bitmap). Left behind, every
	// run would add programs that all later runs pay for on every bio.
	if out, rerr := exec.Command(a.spec.Exe, "agent", "release", "--state-dir", a.spec.StateDir).CombinedOutput(); rerr != nil {
		err = errors.Join(err, fmt.Errorf("agent release: %w: %s", rerr, strings.TrimSpace(string(out))))
	}
	return counters, err
}

func (a *agentProc) terminate() (map[string]any, error) {
	defer a.notify.Close()
	select {
	case <-a.exited:
		return a.result(errors.New("agent exited before it was stopped"))
	default:
	}
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		a.log.Warn("signal agent", "err", err)
	}
	timer := time.NewTimer(a.spec.StopTimeout)
	defer timer.Stop()
	select {
	case <-a.exited:
		return a.result(nil)
	case <-timer.C:
		_ = a.cmd.Process.Kill()
		<-a.exited
		return a.result(fmt.Errorf("agent did not exit within %s of SIGTERM; killed", a.spec.StopTimeout))
	}
}

func (a *agentProc) result(stopErr error) (map[string]any, error) {
	counters, cerr := parseCounters(a.stdout.String())
	if cerr != nil {
		a.log.Warn("agent counters unreadable", "err", cerr)
	}
	if stopErr == nil && a.waitErr != nil {
		stopErr = fmt.Errorf("agent exited with %w", a.waitErr)
	}
	if stopErr != nil {
		return counters, fmt.Errorf("%w; stderr: %s", stopErr, a.stderrText())
	}
	return counters, nil
}

func (a *agentProc) stderrText() string {
	s := strings.TrimSpace(a.stderr.String())
	if s == "" {
		return "(empty)"
	}
	return s
}

// parseCounters decodes the last "counters: {...}" line of out. It returns
// nil, nil when there is none (old agent or killed before draining).
func parseCounters(out string) (map[string]any, error) {
	var line string
	for l := range strings.SplitSeq(out, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(l), countersPrefix); ok {
			line = rest
		}
	}
	if line == "" {
		return nil, nil
	}
	dec := json.NewDecoder(strings.NewReader(line))
	dec.UseNumber() // keep 64-bit counters exact
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decode agent counters: %w", err)
	}
	return m, nil
}

// counterInt returns counters[key] if it is an integer.
func counterInt(counters map[string]any, key string) (int64, bool) {
	n, ok := counters[key].(json.Number)
	if !ok {
		return 0, false
	}
	v, err := n.Int64()
	return v, err == nil
}

// envWithout returns env minus entries for key, so an inherited
// NOTIFY_SOCKET (harness itself running under systemd) cannot leak through.
func envWithout(env []string, key string) []string {
	out := make([]string, 0, len(env))
	prefix := key + "="
	for _, e := range env {
		if !strings.HasPrefix(e, prefix) {
			out = append(out, e)
		}
	}
	return out
}
