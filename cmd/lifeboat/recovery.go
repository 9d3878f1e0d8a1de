package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/progress"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
)

// recoveryAccountEnv names the storage account the recovery commands read.
const recoveryAccountEnv = "AZURE_STORAGE_CONNECTION_STRING"

// recoveryStore opens container of the account in recoveryAccountEnv,
// retrying transient failures for at most two minutes per call.
func recoveryStore(container string, verbose bool) (blobstore.Store, error) {
	cs := os.Getenv(recoveryAccountEnv)
	if cs == "" {
		return nil, fmt.Errorf("%s is not set: it must hold the connection string of the storage account", recoveryAccountEnv)
	}
	base, err := azure.New(azure.Config{ConnectionString: cs, Container: container})
	if err != nil {
		return nil, err
	}
	log := logger(verbose)
	return blobstore.Stack(base, blobstore.StackConfig{Logger: log, Retry: blobstore.RetryConfig{MaxElapsed: 2 * time.Minute, Logger: log}}), nil
}

// diskJSON is a disk of `lifeboat points --json`: name and size in bytes.
type diskJSON struct {
	Name            string `json:"name"`
	Size            uint64 `json:"size"`
	UnprotectedFrom uint64 `json:"unprotected_from,omitempty"` // its agent left it out from this sequence on
}

// pointJSON is one line of `lifeboat points --json`.
type pointJSON struct {
	Kind  string   `json:"kind"`
	Time  string   `json:"time"`
	Seq   uint64   `json:"seq"`
	ID    string   `json:"id"`
	Disks []string `json:"disks"`
}

func pointsCmd(verbose *bool) *cobra.Command {
	var machine, container, keyFile string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "points --machine MACHINE [--json] [--recovery-key FILE]",
		Short: "List the recovery points of a machine and how recent a recovery can be",
		Long: `Lists the recovery points (kind, time, sequence) kept in the storage account
for MACHINE, oldest first, then "recoverable until": every write made before
that time can be recovered (--point latest). Between points any time, and
the sequence of any consistency marker, can be recovered too (lifeboat
recover). Reads the account named by
AZURE_STORAGE_CONNECTION_STRING. Without --recovery-key it lists the
snapshots by their metadata; with it, only the points recover would start
from (a sealed record names their snapshots), after checking the manifest,
and says which it leaves out.`,
		Args: cobra.NoArgs,
		PreRunE: func(c *cobra.Command, _ []string) error { // exit 2, as in agent mirror
			if err := nonEmpty("machine", machine, "container", container); err != nil {
				return err
			}
			if err := layout.CheckName("--machine", machine); err != nil {
				return err
			}
			if c.Flags().Changed("recovery-key") && keyFile == "" {
				return errors.New(`--recovery-key "": give the recovery key file, or leave the flag out`)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			store, err := recoveryStore(container, *verbose)
			if err != nil {
				return err
			}
			var points []recovery.Point
			var until time.Time
			var man *layout.Manifest
			if keyFile == "" {
				if points, until, err = recovery.Points(cmd.Context(), store, machine); err == nil {
					man, err = recovery.ReadManifest(cmd.Context(), store, machine)
				}
			} else {
				var key []byte
				if key, err = seal.LoadRecoveryKeyToRead(keyFile, cmd.ErrOrStderr()); err != nil {
					return err
				}
				points, until, man, err = recovery.VerifiedPoints(cmd.Context(), store, machine, key, cmd.ErrOrStderr())
			}
			if err != nil {
				return interrupted(cmd.Context(), err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				doc := struct {
					Machine          string       `json:"machine"`
					Disks            []diskJSON   `json:"disks"` // what recover --disk takes
					Points           []pointJSON  `json:"points"`
					RecoverableUntil *string      `json:"recoverable_until"` // null: nothing recoverable yet
					Gaps             []layout.Gap `json:"gaps,omitempty"`
				}{Machine: machine, Disks: []diskJSON{}, Points: []pointJSON{}, Gaps: man.Gaps}
				for _, d := range man.Disks {
					doc.Disks = append(doc.Disks, diskJSON{Name: d.Name, Size: d.Size, UnprotectedFrom: d.UnprotectedFrom})
				}
				if !until.IsZero() {
					u := formatTime(until)
					doc.RecoverableUntil = &u
				}
				for _, p := range points {
					pj := pointJSON{Kind: p.Kind, Time: formatTime(p.Time), Seq: p.Seq, ID: p.ID}
					for _, d := range man.Disks { // the manifest's order, not a map's
						if p.Snapshots[d.Name] != "" && protectedAt(&d, p.Seq, p.Time) {
							pj.Disks = append(pj.Disks, d.Name)
						}
					}
					doc.Points = append(doc.Points, pj)
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(doc)
			}
			// The names lifeboat recover --disk takes.
			var disks []string
			for _, d := range man.Disks {
				disks = append(disks, fmt.Sprintf("%s (%s)", d.Name, progress.Bytes(int64(d.Size))))
			}
			fmt.Fprintf(out, "disks: %s\n", strings.Join(disks, ", "))
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "KIND\tTIME\tSEQ\tDISKS")
			for _, p := range points {
				// A disk without its snapshot at a point recovers from an
				// earlier one and the journal: still exact, but say so;
				// one a gap's mending left out, or added after the point,
				// does not recover there.
				disks := "all"
				var missing []string
				for i := range man.Disks {
					d := &man.Disks[i]
					_, gap := man.DiskGapAt(d, p.Seq)
					g, left := d.UnprotectedAt(p.Seq, p.Time)
					switch {
					case left:
						missing = append(missing, fmt.Sprintf("%s (not protected since seq %d)", d.Name, g.UnprotectedFrom))
					case !protectedAt(d, p.Seq, p.Time):
						missing = append(missing, d.Name+" (not protected yet)")
					case gap:
						missing = append(missing, d.Name+" (left out of a gap's resync: not recoverable here)")
					case p.Snapshots[d.Name] == "":
						missing = append(missing, d.Name)
					}
				}
				if len(missing) > 0 {
					disks = "all but " + strings.Join(missing, ", ")
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", p.Kind, formatTime(p.Time), p.Seq, disks)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, g := range man.Gaps {
				if g.Open() {
					fmt.Fprintf(out, "journal gap from seq %d: acknowledged writes lost before they reached the account; not recoverable until the agent's checksum resync completes\n", g.From)
				} else {
					fmt.Fprintf(out, "journal gap: seq %d to %d not recoverable (acknowledged writes lost, repaired by a checksum resync)\n", g.From, g.Mended-1)
				}
				for _, u := range g.Unmended {
					// The resync left it out (not protected then): its
					// own state stays unknown past the gap.
					if u.Until == 0 {
						fmt.Fprintf(out, "  disk %s: not recoverable from seq %d until its next full sync\n", u.Name, g.From)
					} else {
						fmt.Fprintf(out, "  disk %s: not recoverable from seq %d to %d (until its full sync)\n", u.Name, g.From, u.Until-1)
					}
				}
			}
			_, err = fmt.Fprintf(out, "recoverable until: %s\n", formatTime(until))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&machine, "machine", "", "protected machine name")
	f.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	f.StringVar(&keyFile, "recovery-key", "", "recovery key file: list only the points recover would use")
	f.StringVar(&container, "container", layout.DefaultContainer, "container holding Lifeboat's blobs")
	cmd.MarkFlagRequired("machine")
	return cmd
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func recoverCmd(verbose *bool) *cobra.Command {
	var machine, disk, point, to, keyFile, container string
	var force, anySeq bool
	cmd := &cobra.Command{
		Use:   "recover --machine MACHINE --disk DISK [--point latest|SEQ|TIME] --to FILE --recovery-key FILE",
		Short: "Write a disk as it was at a point in time, from the storage account alone",
		Long: `Writes disk DISK of MACHINE, as it was at --point, to FILE (created with
mode 0600, sparse; an existing FILE is replaced only with --force): the newest recovery point at or before it,
then the journal up to it.

--point is "latest" (the newest consistent state in the account: its
recoverable_until, see lifeboat points), a sequence number, or an RFC 3339
time such as 2025-01-02T15:04:05Z (the newest state known to precede it). A
sequence number must be a consistency marker's (a point's, as lifeboat points
lists them, or a time or crash-consistent marker's in the journal): between
markers the disks may be half copied by a full sync or a resync, or half
read back; the error names the nearest marker before it. --any-sequence takes
a sequence as given (in data mode, outside syncs, every sequence is
crash-consistent).

Every journal segment is authenticated before use; a tampered one stops the
recovery with an error naming it, and FILE is not created. Progress goes to
stderr. The account is AZURE_STORAGE_CONNECTION_STRING; the recovery key file
is the one "lifeboat keys init" wrote.`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { // exit 2, as in agent mirror
			// --to "$F" with F unset: found only at the end, after the
			// whole disk was downloaded.
			if err := nonEmpty("machine", machine, "disk", disk, "to", to, "recovery-key", keyFile, "container", container); err != nil {
				return err
			}
			if err := layout.CheckName("--machine", machine); err != nil {
				return err
			}
			if err := layout.CheckName("--disk", disk); err != nil {
				return err
			}
			if point == "" {
				// --point "$P" with P unset must not recover latest.
				return errors.New(`--point "": give latest, a sequence number or an RFC 3339 time`)
			}
			_, _, err := recovery.ParsePoint(point)
			return err
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := os.Lstat(to); err == nil {
				if fi, err := os.Stat(to); err == nil && !fi.Mode().IsRegular() {
					return fmt.Errorf("%s is not a regular file: recovery writes disk images to files (write the image to a file, then copy it to a device)", to)
				}
				if !force {
					return fmt.Errorf("%s exists: give --force to replace it (a machine running from it would lose what it writes there)", to)
				}
			}
			key, err := seal.LoadRecoveryKeyToRead(keyFile, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer clear(key)
			store, err := recoveryStore(container, *verbose)
			if err != nil {
				return err
			}
			res, err := recovery.RecoverFile(cmd.Context(), store, recovery.Request{
				NoReplace: !force, MarkersOnly: !anySeq,
				Machine: machine, Disk: disk, Point: point, RecoveryKey: key, Progress: cmd.ErrOrStderr(),
			}, to)
			if err != nil {
				switch {
				case cmd.Context().Err() != nil && errors.Is(err, context.Canceled):
					return fmt.Errorf("%w: recovery stopped, %s not written (the partial output was removed)", errInterrupted, to)
				case errors.Is(err, recovery.ErrTampered):
					return fmt.Errorf("recovery stopped, %s not written: %w", to, err)
				}
				return err
			}
			at := ""
			if !res.Time.IsZero() {
				at = " (" + formatTime(res.Time) + ")"
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "recovered disk %s of machine %s at sequence %d%s into %s: %d bytes, %d journal segments replayed\n",
				disk, machine, res.Seq, at, to, res.Size, res.Segments)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&machine, "machine", "", "protected machine name")
	f.StringVar(&disk, "disk", "", "disk name (as listed in the machine's manifest)")
	f.StringVar(&point, "point", recovery.Latest, `"latest", a sequence number or an RFC 3339 time`)
	f.StringVar(&to, "to", "", "output file (new, unless --force)")
	f.BoolVar(&force, "force", false, "replace --to if it exists")
	f.BoolVar(&anySeq, "any-sequence", false, "take a --point sequence number as given, even between consistency markers")
	f.StringVar(&keyFile, "recovery-key", "", "recovery key file")
	f.StringVar(&container, "container", layout.DefaultContainer, "container holding Lifeboat's blobs")
	for _, name := range []string{"machine", "disk", "to", "recovery-key"} {
		cmd.MarkFlagRequired(name)
	}
	return cmd
}

// protectedAt reports whether disk d was protected at sequence seq: from
// its first generation's start, recover --disk takes seq (a point cut
// before a disk was added holds zeros for it, not what it held), unless
// its agent's hellos had left it out by then (by seq, or by the point's
// time at).
func protectedAt(d *layout.Disk, seq uint64, at time.Time) bool {
	_, left := d.UnprotectedAt(seq, at)
	return seq >= max(d.Generations()[0].Start, 1) && !left
}
