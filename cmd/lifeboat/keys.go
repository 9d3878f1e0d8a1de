package main

import (
	"fmt"

	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/spf13/cobra"
)

func keysCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "Recovery key that protects the data keys in the storage account",
	}
	var to string
	initCmd := &cobra.Command{
		Use:   "init --to FILE",
		Short: "Create a new recovery key in FILE (mode 0600)",
		Long: `Creates a random recovery key. The process server wraps every machine's
data key with it and stores the result in the storage account, so that
recovery needs only the account and this file. Keep a copy off-site:
without it the replicated data cannot be decrypted. An existing file is
never overwritten.`,
		Args:    cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { return nonEmpty("to", to) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			k := seal.NewRecoveryKey()
			defer clear(k)
			if err := seal.WriteRecoveryKey(to, k); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote recovery key %s to %s; keep a copy somewhere safe\n", seal.Fingerprint(k), to)
			return nil
		},
	}
	initCmd.Flags().StringVar(&to, "to", "", "recovery key file to create")
	initCmd.MarkFlagRequired("to")
	cmd.AddCommand(initCmd)
	return cmd
}
