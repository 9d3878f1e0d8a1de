package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/progress"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
)

// machineJSON is one machine of `lifeboat machines --json`.
type machineJSON struct {
	Machine          string     `json:"machine"`
	Disks            []diskJSON `json:"disks"`
	DurableSeq       uint64     `json:"durable_seq"`
	RecoverableUntil *string    `json:"recoverable_until"` // null: nothing recoverable yet
	ProcessServer    string     `json:"process_server,omitempty"`
	Updated          string     `json:"updated"`
}

func machinesCmd(verbose *bool) *cobra.Command {
	var container string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "machines [--json]",
		Short: "List the machines the storage account holds, with their disks and how recent a recovery can be",
		Long: `Lists the machines replicated to the container (the names lifeboat points and
lifeboat recover take as --machine), with their disks, the newest durable
sequence, "recoverable until", the process server that last served each, and
when its manifest was last written. Reads the account named by
AZURE_STORAGE_CONNECTION_STRING, without the recovery key: the manifests are
shown as stored (lifeboat points --recovery-key checks one).`,
		Args:    cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { return nonEmpty("container", container) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			store, err := recoveryStore(container, *verbose)
			if err != nil {
				return err
			}
			mans, err := recovery.Machines(cmd.Context(), store, cmd.ErrOrStderr())
			if err != nil {
				return interrupted(cmd.Context(), err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				doc := []machineJSON{}
				for _, m := range mans {
					mj := machineJSON{Machine: m.Machine, Disks: []diskJSON{}, DurableSeq: m.DurableSeq, ProcessServer: m.Owner, Updated: formatTime(m.Updated)}
					for _, d := range m.Disks {
						mj.Disks = append(mj.Disks, diskJSON{Name: d.Name, Size: d.Size, UnprotectedFrom: d.UnprotectedFrom})
					}
					if !m.RecoverableUntil.IsZero() {
						u := formatTime(m.RecoverableUntil)
						mj.RecoverableUntil = &u
					}
					doc = append(doc, mj)
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(doc)
			}
			if len(mans) == 0 {
				_, err := fmt.Fprintln(out, "no machine is replicated to this container yet")
				return err
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MACHINE\tDISKS\tDURABLE SEQ\tRECOVERABLE UNTIL\tPROCESS SERVER\tUPDATED")
			for _, m := range mans {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", m.Machine, disksOf(m), m.DurableSeq, formatTime(m.RecoverableUntil), m.Owner, formatTime(m.Updated))
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.BoolVar(&asJSON, "json", false, "print JSON")
	f.StringVar(&container, "container", layout.DefaultContainer, "container holding Lifeboat's blobs")
	return cmd
}

// disksOf lists a manifest's disks as name (size), and whether its agent
// left one out of protection.
func disksOf(m *layout.Manifest) string {
	var ds []string
	for _, d := range m.Disks {
		s := fmt.Sprintf("%s (%s)", d.Name, progress.Bytes(int64(d.Size)))
		if d.UnprotectedFrom != 0 {
			s = fmt.Sprintf("%s (%s, not protected since seq %d)", d.Name, progress.Bytes(int64(d.Size)), d.UnprotectedFrom)
		}
		ds = append(ds, s)
	}
	if len(ds) == 0 {
		return "-"
	}
	return strings.Join(ds, ", ")
}
