package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/lifeboat-dr/lifeboat/agent"
	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/spf13/cobra"
)

func agentCmd(verbose *bool) *cobra.Command {
	cmd := &cobra.Command{Use: "agent", Short: "Capture agent of a protected server"}
	var (
		cfg      agent.MirrorConfig
		mode     string
		ringMiB  int
		stateDir string
	)
	mirror := &cobra.Command{
		// No key in its memory; the capture bench reads its /proc smaps.
		Annotations: map[string]string{noKeys: "true"},
		Use:         "mirror --device PATH --to FILE",
		Short:       "Keep FILE equal to a block device, byte for byte, until SIGINT/SIGTERM",
		Long: `Attaches eBPF capture to the device, copies it to FILE (created or
overwritten), then applies every captured write to FILE until SIGINT or
SIGTERM; then drains everything captured, prints its counters and exits 0.
With NOTIFY_SOCKET set it sends READY=1 once capture is attached and
X-LIFEBOAT-SYNCED=1 once the initial copy is done.

A clean stop leaves capture pinned, marking written blocks, so the next run
copies only what changed; after an unclean stop the next run compares
checksums instead of copying everything. "lifeboat agent release" detaches it.`,
		Args: cobra.NoArgs,
		// Flag values are checked before RunE: a bad one is a refused
		// command line (exit 2), as an unknown flag is.
		PreRunE: func(*cobra.Command, []string) error {
			if err := nonEmpty("device", cfg.Device, "to", cfg.To, "state-dir", stateDir); err != nil {
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
			cfg.Mode, cfg.RingBytes = m, ringMiB<<20
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.StateDir = stateDir
			cfg.Logger = logger(*verbose)
			cfg.Progress = os.Stderr
			cfg.Out = os.Stdout
			return agent.RunMirror(cmd.Context(), cfg)
		},
	}
	f := mirror.Flags()
	f.StringVar(&cfg.Device, "device", "", "block device to protect (whole disk or partition)")
	f.StringVar(&cfg.To, "to", "", "mirror file (or block device) to keep in sync")
	f.StringVar(&mode, "mode", "data", "capture mode: data (payload in the ring) or metadata (extents, read back)")
	f.DurationVar(&cfg.ReadbackDelay, "readback-delay", agent.DefaultReadbackDelay, "metadata mode: how long written blocks wait before they are read back (rewrites and neighbours then cost one read; the copy lags as much)")
	f.IntVar(&ringMiB, "ring-mib", 64, "BPF ring buffer size in MiB (power of two, at most 1024)")
	f.StringVar(&stateDir, "state-dir", "/var/lib/lifeboat", "agent state directory")
	f.DurationVar(&cfg.CrashInterval, "crash-interval", 0, "crash-consistent marker interval (0: off)")
	f.DurationVar(&cfg.AppInterval, "app-interval", 0, "app-consistent (fsfreeze) marker interval (0: off)")
	f.StringVar(&cfg.PreScript, "pre-script", "", "run before freezing for an app-consistent marker (gets the mount points)")
	f.StringVar(&cfg.PostScript, "post-script", "", "run after thawing (always, even after a failed pre-script, which it may have to undo)")
	mirror.MarkFlagRequired("device")
	mirror.MarkFlagRequired("to")

	var machine string
	release := &cobra.Command{
		Use:   "release",
		Short: "Detach the capture that a clean stop left pinned",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("agent release needs root (it removes pins on the BPF file system)")
			}
			dir, release := stateDir, func() error { return agent.Release(stateDir) }
			if machine != "" {
				dir, release = agent.MachineDir(stateDir, machine), func() error { return agent.ReleaseMachine(stateDir, machine) }
			}
			pinned := agent.Pinned(dir)
			if err := release(); err != nil {
				return err
			}
			switch {
			case pinned:
				fmt.Fprintf(cmd.OutOrStdout(), "released the capture pinned for %s; its next run resyncs by checksum\n", dir)
			case machine == "":
				fmt.Fprintf(cmd.OutOrStdout(), "nothing was pinned for %s (for a machine protected with lifeboat agent, add --name MACHINE)\n", dir)
			default:
				fmt.Fprintf(cmd.OutOrStdout(), "nothing was pinned for machine %s in %s\n", machine, stateDir)
			}
			return nil
		},
	}
	release.Flags().StringVar(&stateDir, "state-dir", "/var/lib/lifeboat", "agent state directory")
	release.Flags().StringVar(&machine, "name", "", "machine whose capture (left pinned by lifeboat agent --name) to release; default: agent mirror's")
	cmd.AddCommand(mirror, release)
	protectCmd(cmd, verbose)
	return cmd
}
