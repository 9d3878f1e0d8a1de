// Command lifeboat is the single binary of every Lifeboat role. It only
// wires flags to the role packages.
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/fsfreeze"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
)

func main() {
	var verbose bool
	root := newRoot(&verbose)
	// Registered first, so that it sees the first signal too.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// The first signal asks for a clean stop; a second one ends the
		// process at once, by that signal, but not before the file
		// systems an app-consistent point froze are thawed and its
		// scripts' processes killed: nobody would undo them after.
		<-sigs
		sig := <-sigs
		fsfreeze.ThawAll(fsfreeze.DefaultTimeout)
		fsfreeze.KillScripts()
		signal.Reset()
		syscall.Kill(os.Getpid(), sig.(syscall.Signal))
		// Still here: the signal was ignored when the process started
		// (started with & from a script). It ends the process all the same.
		os.Exit(128 + int(sig.(syscall.Signal)))
	}()
	if err := execute(ctx, root); err != nil {
		fmt.Fprintln(os.Stderr, "lifeboat:", err)
		os.Exit(exitCode(err))
	}
}

// noKeys annotates a command that holds no key: it stays dumpable.
const noKeys = "lifeboat/no-keys"

func newRoot(verbose *bool) *cobra.Command {
	root := &cobra.Command{
		Use:           "lifeboat",
		Short:         "Disaster-recovery replication of Linux block devices",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().BoolVarP(verbose, "verbose", "v", false, "debug logging")
	root.PersistentPreRun = func(cmd *cobra.Command, _ []string) {
		// Keys live in this process's memory (TLS keys, the recovery
		// key, machines' data keys): no core dump writes them to disk,
		// and no other process of its user may read them through ptrace
		// or /proc/PID/mem.
		if cmd.Annotations[noKeys] == "" {
			unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
		}
	}
	root.AddCommand(agentCmd(verbose), benchCmd(verbose))
	root.AddCommand(processServerCmd(verbose))
	root.AddCommand(pkiCmd())
	root.AddCommand(keysCmd())
	root.AddCommand(machinesCmd(verbose), pointsCmd(verbose), recoverCmd(verbose))
	// A mistyped subcommand followed by its flags ("agent mirorr --to F")
	// fails on the first flag its parent lacks: say what was mistyped.
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		if args := c.Flags().Args(); c.HasSubCommands() && len(args) > 0 {
			if sub, _, ferr := c.Find(args[:1]); ferr != nil || sub == c {
				msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
				c.SuggestionsMinimumDistance = cmp.Or(c.SuggestionsMinimumDistance, 2)
				if s := c.SuggestionsFor(args[0]); len(s) > 0 {
					msg += " (did you mean " + strings.Join(s, " or ") + "?)"
				}
				return errors.New(msg)
			}
		}
		return err
	})
	for _, c := range root.Commands() {
		// A group (keys, pki, bench) takes no arguments: cobra would show
		// its help for a mistyped subcommand and exit 0.
		if c.HasSubCommands() && c.Run == nil && c.RunE == nil {
			c.Args = cobra.NoArgs
			c.RunE = func(c *cobra.Command, _ []string) error { return c.Help() }
		}
	}
	return root
}

// usageError is a command line cobra refused before running anything
// (an unknown command or flag, a missing required flag, a stray
// argument): exit status 2, as for other Unix commands.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// execute runs root, telling a refused command line from a failed run.
func execute(ctx context.Context, root *cobra.Command) error {
	// Cobra validates flags and arguments before it calls RunE.
	ran := false
	root.InitDefaultCompletionCmd() // cobra adds it at Execute, past the wrapping
	var wrap func(*cobra.Command)
	wrap = func(c *cobra.Command) {
		if run := c.RunE; run != nil {
			c.RunE = func(c *cobra.Command, args []string) error { ran = true; return run(c, args) }
		}
		for _, sub := range c.Commands() {
			wrap(sub)
		}
	}
	wrap(root)
	cmd, err := root.ExecuteContextC(ctx)
	if err != nil && !ran {
		return usageError{fmt.Errorf("%w (see %s --help)", err, cmd.CommandPath())}
	}
	return err
}

// errInterrupted marks a command a signal stopped before it was done
// (exit status 130).
var errInterrupted = errors.New("interrupted")

// interrupted marks err as errInterrupted when ctx was cancelled (a
// signal) and err is that cancellation.
func interrupted(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %v", errInterrupted, err)
	}
	return err
}

// exitCode tells runbooks apart what they act on differently (README,
// Replication to Azure): 130 interrupted, 3 the point is not recoverable,
// 4 the recovery key is not this machine's, 5 the account's data failed
// verification, 2 a refused command line, 1 anything else.
func exitCode(err error) int {
	switch {
	case errors.As(err, new(usageError)):
		return 2
	case errors.Is(err, errInterrupted):
		return 130 // as shells report a process a signal stopped
	case errors.Is(err, recovery.ErrWrongRecoveryKey):
		return 4
	case errors.Is(err, recovery.ErrTampered):
		return 5
	case errors.Is(err, recovery.ErrOutOfRange):
		return 3
	}
	return 1
}

func logger(verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// checkListen refuses a listen address that is not host:port with a
// port number or service name (a typo found only when binding exits 1).
func checkListen(flag, addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err == nil {
		_, err = net.LookupPort("tcp", port)
	}
	if err != nil {
		return fmt.Errorf("%s %q: want host:port, e.g. :7070 or 10.0.0.5:7070 (%v)", flag, addr, err)
	}
	return nil
}

// checkPprof refuses --pprof on a metrics address other hosts can reach:
// the profiles are served without authentication.
func checkPprof(pprof bool, addr string) error {
	if addr != "" {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("--metrics %q: want HOST:PORT: %w", addr, err)
		}
	}
	if !pprof {
		return nil
	}
	if addr == "" {
		return errors.New("--pprof serves profiles on the --metrics address: give one")
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--metrics %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("--pprof on --metrics %s: profiles are served without authentication; bind --metrics to 127.0.0.1 or [::1] (and reach it through SSH)", addr)
	}
	return nil
}

// checkRingMiB checks --ring-mib before anything is touched.
func checkRingMiB(n int) error {
	if n < 1 || n > capture.MaxRingBytes>>20 || n&(n-1) != 0 {
		return fmt.Errorf("--ring-mib %d: must be a power of two from 1 to %d", n, capture.MaxRingBytes>>20)
	}
	return nil
}

// checkIntervals refuses negative point intervals, which would turn the
// points off as silently as 0 does on purpose.
func checkIntervals(crash, app, readback time.Duration) error {
	if readback < 0 {
		return fmt.Errorf("--readback-delay %v: must not be negative", readback)
	}
	if crash < 0 {
		return fmt.Errorf("--crash-interval %v: must not be negative (0 turns crash-consistent points off)", crash)
	}
	if app < 0 {
		return fmt.Errorf("--app-interval %v: must not be negative (0 turns app-consistent points off)", app)
	}
	return nil
}
