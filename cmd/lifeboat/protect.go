package main

import (
	"cmp"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/lifeboat-dr/lifeboat/agent"
	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/spf13/cobra"
)

// protectCmd makes `lifeboat agent` itself protect devices (its
// subcommands mirror and release stay as they are).
func protectCmd(cmd *cobra.Command, verbose *bool) {
	var (
		cfg      agent.ProtectConfig
		devices  []string
		mode     string
		ringMiB  int
		stateDir string
	)
	cmd.Use = "agent --process-server ADDR --pki DIR --name MACHINE --device [NAME=]PATH [--device …]"
	cmd.Long = `Protects block devices: attaches eBPF capture to all of them at once (one
sequence across the machine's disks, so every point is consistent across
them), agrees with the process server on each disk (resume, full copy or
checksum resync), copies what the process server lacks with progress, then
streams every captured write until SIGINT or SIGTERM; then it drains what
was captured, waits for the process server's acknowledgement, prints its
counters and exits 0. With NOTIFY_SOCKET set it sends READY=1 once capture
is attached and X-LIFEBOAT-SYNCED=1 once the initial sync is done.

A disk is named NAME at the process server (default: the device's base
name, e.g. sdb or loop0p1); keep names stable, a new name is a new replica.
--name is both the machine's name and the name of its agent certificate in
the --pki directory.`
	cmd.Args = cobra.NoArgs
	cmd.PreRunE = func(*cobra.Command, []string) error { // flag values: exit 2, as in agent mirror
		if err := nonEmpty("process-server", cfg.ProcessServer, "pki", cfg.PKIDir, "name", cfg.Name, "state-dir", stateDir); err != nil {
			return err
		}
		if _, _, err := net.SplitHostPort(cfg.ProcessServer); err != nil {
			return fmt.Errorf("--process-server %q: want HOST:PORT: %w", cfg.ProcessServer, err)
		}
		if err := layout.CheckName("--name", cfg.Name); err != nil {
			return err
		}
		if err := checkPprof(cfg.Profiling, cfg.Metrics); err != nil {
			return err
		}
		if err := checkIntervals(cfg.CrashInterval, cfg.AppInterval, cfg.ReadbackDelay); err != nil {
			return err
		}
		m, err := capture.ParseMode(mode)
		if err != nil {
			return err
		}
		if err := checkRingMiB(ringMiB); err != nil {
			return err
		}
		if cfg.StopTimeout <= 0 {
			return fmt.Errorf("--stop-timeout %v: must be positive", cfg.StopTimeout)
		}
		cfg.Devices = cfg.Devices[:0]
		named := map[string]string{}
		for _, d := range devices {
			name, path, ok := strings.Cut(d, "=")
			if !ok {
				name, path = "", d
			}
			if path == "" {
				return fmt.Errorf("--device %q: want [NAME=]PATH", d)
			}
			if ok {
				if err := layout.CheckName("--device name", name); err != nil {
					return err
				}
			}
			disk := cmp.Or(name, filepath.Base(path))
			if other, dup := named[disk]; dup {
				return fmt.Errorf("--device %s and %s are both named %q: name them with NAME=PATH", other, path, disk)
			}
			named[disk] = path
			cfg.Devices = append(cfg.Devices, agent.ProtectDevice{Name: name, Path: path})
		}
		cfg.Mode, cfg.RingBytes = m, ringMiB<<20
		return nil
	}
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg.StateDir = stateDir
		cfg.Logger = logger(*verbose)
		cfg.Progress = os.Stderr
		cfg.Out = os.Stdout
		return agent.RunProtect(cmd.Context(), cfg)
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ProcessServer, "process-server", "", "process server address, HOST:PORT")
	f.StringVar(&cfg.PKIDir, "pki", "", "directory with the CA certificate and this machine's agent certificate")
	f.StringVar(&cfg.Name, "name", "", "machine name (also the name of its certificate)")
	f.StringArrayVar(&devices, "device", nil, "device to protect, [NAME=]PATH (repeat for more)")
	f.StringVar(&mode, "mode", "data", "capture mode: data (payload in the ring) or metadata (extents, read back)")
	f.DurationVar(&cfg.ReadbackDelay, "readback-delay", agent.DefaultReadbackDelay, "metadata mode: how long written blocks wait before they are read back (rewrites and neighbours then cost one read; the copy lags as much)")
	f.IntVar(&ringMiB, "ring-mib", 64, "BPF ring buffer size in MiB (power of two, at most 1024)")
	f.StringVar(&stateDir, "state-dir", "/var/lib/lifeboat", "agent state directory")
	f.StringVar(&cfg.Metrics, "metrics", "", "serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9101)")
	f.BoolVar(&cfg.Profiling, "pprof", false, "also serve Go profiles on the metrics address under /debug/pprof/")
	f.DurationVar(&cfg.CrashInterval, "crash-interval", agent.DefaultCrashInterval, "crash-consistent point interval (0: off)")
	f.DurationVar(&cfg.AppInterval, "app-interval", agent.DefaultAppInterval, "app-consistent (fsfreeze) point interval (0: off)")
	f.StringVar(&cfg.PreScript, "pre-script", "", "run before freezing for an app-consistent point (gets the mount points)")
	f.StringVar(&cfg.PostScript, "post-script", "", "run after thawing (always, even after a failed pre-script, which it may have to undo)")
	f.DurationVar(&cfg.StopTimeout, "stop-timeout", agent.DefaultStopTimeout, "how long a stop waits for the process server to acknowledge the last writes")
	for _, name := range []string{"process-server", "pki", "name", "device"} {
		cmd.MarkFlagRequired(name)
	}
}
