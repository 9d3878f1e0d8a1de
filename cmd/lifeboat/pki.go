package main

import (
	"fmt"

	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/spf13/cobra"
)

func pkiCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pki",
		Short: "Certificate authority for mTLS between Lifeboat components",
	}
	var dir string
	initCmd := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "Create a new CA (ca.crt, ca.key) in DIR",
		Long: `Creates the deployment's certificate authority in DIR. Every component
authenticates with a certificate issued by it; ca.key is needed only to
issue certificates, so keep it off the machines that merely use them.
An existing CA is never overwritten.`,
		Args:    cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { return nonEmpty("dir", dir) },
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := pki.Init(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created CA in %s\n", dir)
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "", "PKI directory")
	initCmd.MarkFlagRequired("dir")

	var (
		name, role string
		hosts      []string
	)
	issue := &cobra.Command{
		Use:   "issue --dir DIR --name NAME --role agent|process-server",
		Short: "Issue NAME.crt and NAME.key in DIR, signed by DIR's CA",
		Long: `Issues a certificate for one component. The role decides who may talk to
whom: a process server accepts only agent certificates, an agent only
process-server certificates. An agent's NAME is its machine name.
Server certificates are valid for NAME, localhost, 127.0.0.1 and ::1;
add the names agents dial with --host.`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error { // exit 2
			if err := nonEmpty("dir", dir, "name", name); err != nil {
				return err
			}
			if err := pki.CheckName(name); err != nil {
				return err
			}
			for _, h := range hosts {
				if err := pki.CheckHost(h); err != nil {
					return err
				}
			}
			// Roles of components not built yet are refused; so the list
			// shows only those issued.
			if r := pki.Role(role); r != pki.RoleAgent && r != pki.RoleProcessServer {
				if r.Valid() {
					return fmt.Errorf("--role %s: that component is not built yet; issue agent or process-server certificates", r)
				}
				return fmt.Errorf("--role %q: want agent or process-server", role)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := pki.ParseRole(role)
			if err != nil {
				return err
			}
			var opts []pki.IssueOption
			if len(hosts) > 0 {
				opts = append(opts, pki.WithHosts(hosts...))
			}
			if err := pki.Issue(dir, name, r, opts...); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s/%s.crt and %s.key (role %s)\n", dir, name, name, r)
			return nil
		},
	}
	f := issue.Flags()
	f.StringVar(&dir, "dir", "", "PKI directory holding the CA")
	f.StringVar(&name, "name", "", "component name (an agent's machine name)")
	f.StringVar(&role, "role", "", "agent or process-server")
	f.StringSliceVar(&hosts, "host", nil, "extra DNS name or IP address the certificate is valid for (repeatable)")
	issue.MarkFlagRequired("dir")
	issue.MarkFlagRequired("name")
	issue.MarkFlagRequired("role")
	var revokeDir, revokeName string
	revoke := &cobra.Command{
		Use:   "revoke --dir DIR --name NAME",
		Short: "Revoke NAME's certificate (a stolen key, a retired machine)",
		Long: `Adds the serial number of DIR/NAME.crt to DIR/revoked. A component whose
--pki directory holds that file refuses the certificate from its next
handshake on, without a restart: copy DIR/revoked into the --pki directory
of every process server (to refuse a revoked agent) and every agent (to
refuse a revoked process server). A component cannot start with its own
certificate revoked. Issue a new certificate under another name, or under
the same name once the revoked one is no longer needed.`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error {
			return nonEmpty("dir", revokeDir, "name", revokeName)
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := pki.Revoke(revokeDir, revokeName); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked %s/%s.crt: copy %s/revoked into every component's --pki directory\n", revokeDir, revokeName, revokeDir)
			return nil
		},
	}
	revoke.Flags().StringVar(&revokeDir, "dir", "", "PKI directory holding the certificate")
	revoke.Flags().StringVar(&revokeName, "name", "", "name of the certificate to revoke")
	revoke.MarkFlagRequired("dir")
	revoke.MarkFlagRequired("name")
	cmd.AddCommand(initCmd, issue, revoke)
	return cmd
}

// nonEmpty refuses an empty flag value (--dir "$D" with D unset), which
// would otherwise reach the file system as "". Its arguments are pairs of
// flag name and value.
func nonEmpty(flagValues ...string) error {
	for i := 0; i+1 < len(flagValues); i += 2 {
		if flagValues[i+1] == "" {
			return fmt.Errorf("--%s is empty", flagValues[i])
		}
	}
	return nil
}
