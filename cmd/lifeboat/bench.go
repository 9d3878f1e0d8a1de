package main

import (
	"os"
	"time"

	"github.com/lifeboat-dr/lifeboat/perf"
	"github.com/spf13/cobra"
)

func benchCmd(verbose *bool) *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Benchmarks (see perf/)"}
	var (
		cfg      perf.CaptureConfig
		variants string
		jsonOut  string
	)
	capture := &cobra.Command{
		Use:   "capture",
		Short: "fio on a loop device with no capture, metadata mode and data mode, side by side",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v, err := perf.ParseVariants(variants)
			if err != nil {
				return err
			}
			cfg.Variants = v
			rep, err := perf.RunCapture(cmd.Context(), cfg, logger(*verbose), os.Stderr)
			if err != nil {
				return err
			}
			if err := rep.WriteTable(os.Stdout); err != nil {
				return err
			}
			switch jsonOut {
			case "":
			case "-":
				return rep.WriteJSON(os.Stdout)
			default:
				f, err := os.Create(jsonOut)
				if err != nil {
					return err
				}
				defer f.Close()
				return rep.WriteJSON(f)
			}
			return nil
		},
	}
	f := capture.Flags()
	f.DurationVar(&cfg.Runtime, "runtime", 10*time.Second, "fio runtime per sample")
	f.IntVar(&cfg.Rounds, "rounds", 3, "rounds (variants alternate within each)")
	f.StringVar(&variants, "variants", "", "comma-separated subset of none,metadata,data")
	f.IntVar(&cfg.RingMiB, "ring-mib", 0, "agent ring size (0: agent default)")
	f.BoolVar(&cfg.NullTarget, "null-target", false, "mirror into /dev/null: measure capture alone, without the copy's writes")
	f.StringVar(&cfg.Dir, "dir", "/var/tmp", "where the loop device's file and the mirror go")
	f.StringVar(&jsonOut, "json", "", "also write the report as JSON to this file (- for stdout)")
	cmd.AddCommand(capture)
	return cmd
}
