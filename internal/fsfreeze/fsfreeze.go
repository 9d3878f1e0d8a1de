// Package fsfreeze quiesces mounted file systems (FIFREEZE/FITHAW) around
// an operation such as taking a crash-consistent bookmark, with optional
// application pre/post scripts and a watchdog that guarantees the thaw.
package fsfreeze

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
)

// Defined here because x/sys/unix does not export them.
const (
	fiFreeze = 0xC0045877 // _IOWR('X', 119, int)
	fiThaw   = 0xC0045878 // _IOWR('X', 120, int)
)

const (
	// DefaultTimeout is the freeze window WithFrozen uses when given a
	// timeout <= 0. Writers block for the whole window, so keep it short.
	DefaultTimeout = 10 * time.Second
	// postScriptTimeout bounds the post script, which runs even after the
	// caller's context is cancelled (it must undo what pre did).
	postScriptTimeout = 2 * time.Minute
)

// ErrTimeout means the watchdog thawed the file systems before fn
// returned: whatever fn captured may not be consistent.
var ErrTimeout = errors.New("freeze window exceeded")

// MountsOf returns the mount points of the file systems that live on the
// block device devPath, as listed in /proc/self/mountinfo (bind mounts
// included). File systems spanning several devices (btrfs) report an
// anonymous device number there and are not found.
func MountsOf(devPath string) ([]string, error) {
	dev, err := blockdev.DevT(devPath)
	if err != nil {
		return nil, fmt.Errorf("fsfreeze: %w", err)
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("fsfreeze: %w", err)
	}
	defer f.Close()
	mounts, err := parseMountinfo(f, dev.String())
	if err != nil {
		return nil, fmt.Errorf("fsfreeze: read mountinfo: %w", err)
	}
	return mounts, nil
}

// parseMountinfo returns the mount points whose "major:minor" field is dev.
// Line format (proc(5)): id parent maj:min root mountpoint options ...
func parseMountinfo(r io.Reader, dev string) ([]string, error) {
	var mounts []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 5 && fields[2] == dev {
			mounts = append(mounts, unescapeOctal(fields[4]))
		}
	}
	return mounts, sc.Err()
}

// unescapeOctal undoes the kernel's \ooo escaping of space, tab, newline
// and backslash in mountinfo paths.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// Freeze freezes the file system mounted at mountpoint: pending writes are
// flushed and new writes block until Thaw. It fails if the file system is
// already frozen or does not support freezing.
func Freeze(mountpoint string) error { return onMount(mountpoint, "freeze", freezeFD) }

func freezeFD(fd int, mountpoint string) error {
	err := unix.IoctlSetInt(fd, fiFreeze, 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("fsfreeze: freeze %s: already frozen: %w", mountpoint, err)
	case errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("fsfreeze: freeze %s: file system does not support freezing: %w", mountpoint, err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("fsfreeze: freeze %s: needs CAP_SYS_ADMIN (add it to the agent's CapabilityBoundingSet for app-consistent points): %w", mountpoint, err)
	default:
		return fmt.Errorf("fsfreeze: freeze %s: %w", mountpoint, err)
	}
}

// Thaw thaws a file system frozen with Freeze. It fails if the file system
// is not frozen.
func Thaw(mountpoint string) error { return onMount(mountpoint, "thaw", thawFD) }

func thawFD(fd int, mountpoint string) error {
	err := unix.IoctlSetInt(fd, fiThaw, 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("fsfreeze: thaw %s: not frozen (thawed by someone else?): %w", mountpoint, err)
	default:
		return fmt.Errorf("fsfreeze: thaw %s: %w", mountpoint, err)
	}
}

func openMount(mountpoint string) (int, error) {
	return unix.Open(mountpoint, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
}

// onMount runs op (freezeFD or thawFD) on a descriptor of mountpoint.
func onMount(mountpoint, what string, op func(fd int, mountpoint string) error) error {
	fd, err := openMount(mountpoint)
	if err != nil {
		return fmt.Errorf("fsfreeze: %s %s: %w", what, mountpoint, err)
	}
	defer unix.Close(fd)
	return op(fd, mountpoint)
}

// WithFrozen runs fn while the file systems at mounts are frozen:
//
//  1. the pre script, if pre != "", with the mount points as arguments; if
//     it fails nothing else runs;
//  2. Freeze of each file system (several mount points of one file system
//     are frozen once); if one fails, fn is skipped;
//  3. fn;
//  4. Thaw of everything frozen, always: on return, on panic, and from a
//     watchdog when timeout (DefaultTimeout if <= 0) expires or ctx is
//     cancelled while fn still runs. WithFrozen still waits for fn, so fn
//     must itself be bounded; a watchdog thaw yields ErrTimeout or the
//     context error;
//  5. the post script, if post != "" and pre succeeded, whatever happened
//     in between.
//
// All errors are returned joined.
func WithFrozen(ctx context.Context, mounts []string, pre, post string, timeout time.Duration, fn func() error) (err error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("fsfreeze: %w", err)
	}
	if pre != "" {
		if err := runScript(ctx, "pre-freeze", pre, mounts); err != nil {
			return err
		}
	}
	if post != "" {
		defer func() {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), postScriptTimeout)
			defer cancel()
			err = errors.Join(err, runScript(sctx, "post-thaw", post, mounts))
		}()
	}

	targets, err := distinctFileSystems(mounts)
	if err != nil {
		return err
	}
	frozen := &frozenSet{}
	defer func() { err = errors.Join(err, frozen.thaw()) }()
	for _, m := range targets {
		// Thawed through the descriptor that froze it: should the file
		// system be unmounted meanwhile, its mount point is no longer
		// it, and a thaw by path would leave it frozen, its device held.
		fd, err := openMount(m)
		if err != nil {
			return fmt.Errorf("fsfreeze: freeze %s: %w", m, err)
		}
		if err := freezeFD(fd, m); err != nil {
			unix.Close(fd)
			return err
		}
		frozen.mounts = append(frozen.mounts, m)
		frozen.fds = append(frozen.fds, fd)
	}

	stop := make(chan struct{})
	watchdog := make(chan error, 1)
	go func() {
		timer := time.NewTimer(timeout)
		defer timer.Stop()
		select {
		case <-stop:
			watchdog <- nil
			return
		case <-timer.C:
			watchdog <- fmt.Errorf("fsfreeze: %w: file systems thawed by the watchdog after %v while the frozen operation was still running", ErrTimeout, timeout)
		case <-ctx.Done():
			watchdog <- fmt.Errorf("fsfreeze: file systems thawed early while the frozen operation was still running: %w", ctx.Err())
		}
		frozen.thaw()
	}()
	defer func() {
		close(stop)
		err = errors.Join(err, <-watchdog)
	}()
	return fn()
}

// frozenSet thaws its mounts exactly once, from whichever of WithFrozen
// and its watchdog gets there first; later callers wait and get the result.
type frozenSet struct {
	mounts []string
	fds    []int // open on each mount's root, from the freeze on
	once   sync.Once
	err    error
}

func (f *frozenSet) thaw() error {
	f.once.Do(func() {
		for i, m := range f.mounts {
			f.err = errors.Join(f.err, thawFD(f.fds[i], m))
			unix.Close(f.fds[i])
		}
	})
	return f.err
}

// distinctFileSystems drops mount points whose file system (st_dev) was
// already listed: freezing a file system twice fails with EBUSY.
func distinctFileSystems(mounts []string) ([]string, error) {
	seen := make(map[uint64]bool, len(mounts))
	var out []string
	for _, m := range mounts {
		var st unix.Stat_t
		if err := unix.Stat(m, &st); err != nil {
			return nil, fmt.Errorf("fsfreeze: %w", &os.PathError{Op: "stat", Path: m, Err: err})
		}
		if !seen[st.Dev] {
			seen[st.Dev] = true
			out = append(out, m)
		}
	}
	return out, nil
}

func runScript(ctx context.Context, what, path string, mounts []string) error {
	cmd := exec.CommandContext(ctx, path, mounts...)
	// Don't hang on a background child that inherited the output pipe.
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if len(msg) > 2000 {
			msg = msg[:2000] + "..."
		}
		return fmt.Errorf("fsfreeze: %s script %s: %w: %s", what, path, err, msg)
	}
	return nil
}
