// Command lifeboat is the single binary of every Lifeboat role. It only
// wires flags to the role packages.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	root := &cobra.Command{
		Use:           "lifeboat",
		Short:         "Disaster-recovery replication of Linux block devices",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	var verbose bool
	root.PersistentFlags().BoolVarP(&verbose, "verbose", "v", false, "debug logging")
	root.AddCommand(agentCmd(&verbose), benchCmd(&verbose))
	root.AddCommand(processServerCmd(&verbose))
	root.AddCommand(pkiCmd())
	root.AddCommand(keysCmd())
	root.AddCommand(pointsCmd(&verbose), recoverCmd(&verbose))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// The first signal asks for a clean stop; a second one is not
		// caught, and ends the process at once.
		<-ctx.Done()
		stop()
	}()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "lifeboat:", err)
		os.Exit(1)
	}
}

func logger(verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}
