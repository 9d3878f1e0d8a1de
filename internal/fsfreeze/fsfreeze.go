// Package fsfreeze quiesces mounted file systems (FIFREEZE/FITHAW) around
// an operation such as taking a crash-consistent bookmark, with optional
// application pre/post scripts and a watchdog that guarantees the thaw.
package fsfreeze

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
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
)

// scriptTimeout bounds each script: a pre script that hangs would hold
// the agent's loop. The post script runs even after the caller's context
// is cancelled (it must undo what pre did). A variable for tests.
var scriptTimeout = 2 * time.Minute

// freeze is freezeFD; tests make it slow.
var freeze = freezeFD

// ErrTimeout means the watchdog thawed the file systems before fn
// returned: whatever fn captured may not be consistent.
var ErrTimeout = errors.New("freeze window exceeded")

// ErrThaw means a file system did not thaw as frozen: most likely
// someone else thawed it during the window (EINVAL, "not frozen"), so
// writes may have gone on while the operation ran.
var ErrThaw = errors.New("thaw failed")

// MountsOf returns the mount points of the file systems whose writes
// reach the block device devPath, as listed in /proc/self/mountinfo (bind
// mounts included): those on the device itself, on its partitions (a whole
// disk protected with its file systems on sda1, sda2), and on the devices
// built on any of them (device mapper, md: LVM volumes, dm-crypt), as
// sysfs lists them under holders/. File systems spanning several devices
// (btrfs) report an anonymous device number there and are not found.
func MountsOf(devPath string) ([]string, error) {
	ms, err := mountsOf(devPath)
	if err != nil {
		return nil, err
	}
	return points(ms), nil
}

// points are the mount points of ms.
func points(ms []mount) []string {
	out := make([]string, 0, len(ms))
	for _, m := range ms {
		out = append(out, m.point)
	}
	return out
}

// mount is a mount point and the device number (st_dev) of the file
// system mounted there, as mountinfo lists it; 0 when unknown (a mount
// point given by the caller).
type mount struct {
	point string
	dev   uint64
}

// mountsOf lists the mounts of the file systems whose writes reach any
// of devPaths (see MountsOf), and checks that each mount point leads to
// its file system: one covered by a later mount (a service's
// ProtectHome=tmpfs), by a mount on a directory above it, or by one moved
// over it, would have its freeze freeze the file system on top.
func mountsOf(devPaths ...string) ([]mount, error) {
	devs := map[string]bool{}
	for _, p := range devPaths {
		dev, err := blockdev.DevT(p)
		if err != nil {
			return nil, fmt.Errorf("fsfreeze: %w", err)
		}
		devs[dev.String()] = true
		stackedOn(filepath.Join(sysBlock, dev.String()), devs)
	}
	loopsOn(devs)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("fsfreeze: %w", err)
	}
	defer f.Close()
	ms, err := parseMountinfo(f, devs)
	if err != nil {
		return nil, fmt.Errorf("fsfreeze: read mountinfo: %w", err)
	}
	for _, m := range ms {
		var st unix.Stat_t
		if err := unix.Stat(m.point, &st); err != nil {
			return nil, fmt.Errorf("fsfreeze: %w", &os.PathError{Op: "stat", Path: m.point, Err: err})
		}
		if st.Dev != m.dev {
			return nil, errCovered(m.point)
		}
	}
	return ms, nil
}

func errCovered(point string) error {
	return fmt.Errorf("%s, where a protected device is mounted, leads to another file system (covered by another mount, on it or on a directory above it): its file system cannot be frozen through it", point)
}

// sysBlock holds a directory per block device, named by its "major:minor".
const sysBlock = "/sys/dev/block"

// stackedOn adds to devs the "major:minor" of the block device whose sysfs
// directory is dir, of its partitions, and of every device built on them,
// recursively. Unreadable entries are skipped: a device gone meanwhile has
// nothing mounted to freeze.
func stackedOn(dir string, devs map[string]bool) {
	b, err := os.ReadFile(filepath.Join(dir, "dev"))
	if err != nil {
		return
	}
	devs[strings.TrimSpace(string(b))] = true
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if _, err := os.Stat(filepath.Join(p, "partition")); err == nil {
			stackedOn(p, devs)
		}
	}
	holders, _ := os.ReadDir(filepath.Join(dir, "holders"))
	for _, h := range holders {
		p := filepath.Join(dir, "holders", h.Name())
		if b, err := os.ReadFile(filepath.Join(p, "dev")); err == nil && !devs[strings.TrimSpace(string(b))] {
			stackedOn(p, devs)
		}
	}
}

// loopsOn adds to devs the loop devices whose backing file is one of the
// block devices in devs (loop registers under no holders/), and what is
// built on them, until none is left to add.
func loopsOn(devs map[string]bool) {
	loops, _ := filepath.Glob("/sys/block/loop*")
	for added := true; added; {
		added = false
		for _, dir := range loops {
			b, err := os.ReadFile(filepath.Join(dir, "dev"))
			if err != nil || devs[strings.TrimSpace(string(b))] {
				continue
			}
			back, err := os.ReadFile(filepath.Join(dir, "loop", "backing_file"))
			if err != nil {
				continue // not attached
			}
			// A block device's node is under /dev; the file of any other
			// loop device is not looked at (one on a dead NFS mount would
			// hang the stat).
			path := strings.TrimSpace(string(back))
			var st unix.Stat_t
			if !strings.HasPrefix(path, "/dev/") || unix.Stat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
				continue
			}
			if devs[fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))] {
				stackedOn(dir, devs)
				added = true
			}
		}
	}
}

// parseMountinfo returns the mounts whose "major:minor" field is in devs,
// each mount point once. Line format (proc(5)): id parent maj:min root
// mountpoint options ... Whether a mount point still leads to its file
// system (another mounted over it) mountsOf checks by its st_dev.
func parseMountinfo(r io.Reader, devs map[string]bool) ([]mount, error) {
	var mounts []mount
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20) // overlay mounts' option lists can be long
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || !devs[fields[2]] {
			continue
		}
		point := unescapeOctal(fields[4])
		var maj, mnr uint32
		if _, err := fmt.Sscanf(fields[2], "%d:%d", &maj, &mnr); err != nil {
			return nil, fmt.Errorf("mount %s: device %q: %w", point, fields[2], err)
		}
		if !slices.ContainsFunc(mounts, func(m mount) bool { return m.point == point }) {
			mounts = append(mounts, mount{point: point, dev: unix.Mkdev(maj, mnr)})
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return mounts, nil
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
		return fmt.Errorf("fsfreeze: %w: %s: not frozen (thawed by someone else?): %w", ErrThaw, mountpoint, err)
	default:
		return fmt.Errorf("fsfreeze: %w: %s: %w", ErrThaw, mountpoint, err)
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

// WithFrozen runs fn while the file systems at mounts are frozen; see
// Window.Run.
func WithFrozen(ctx context.Context, mounts []string, pre, post string, timeout time.Duration, fn func() error) error {
	return Window{Mounts: mounts, Pre: pre, Post: post, Timeout: timeout}.Run(ctx, fn)
}

// Window is a freeze of file systems around an operation.
type Window struct {
	// Mounts are mount points to freeze; Devices are block devices whose
	// file systems to freeze (MountsOf), looked up at the freeze, after
	// the pre script (which may mount one), and each checked, once
	// opened, to be the file system mounted from them.
	Mounts    []string
	Devices   []string
	Pre, Post string // scripts run before the freeze and after the thaw ("": none)
	// Timeout bounds the freeze (DefaultTimeout if <= 0): writers block
	// for as long.
	Timeout time.Duration
	// ScriptLog, if set, is the file the scripts' output goes to (mode
	// 0600, replaced at each run): not into errors, which are logged, as
	// a script may print what it should not (set -x and a password).
	// Without it the output is discarded.
	ScriptLog string
	// Unfreezable, if set, is told (after the thaw) of each mount point
	// whose file system cannot be frozen (vfat, as on an EFI system
	// partition): it is synced instead, and the others frozen. If nil,
	// such a file system fails the freeze.
	Unfreezable func(mount string)
	// OnThaw, if set, is called once the file systems are thawed, by
	// whoever thaws them first (the end of fn, the watchdog, ThawAll),
	// at the latest before Frozen returns, as long as Frozen got to
	// freezing. It must not wait for long: the thaws of ThawAll's other
	// Windows do not wait for it, but Frozen's return does.
	OnThaw func()
}

// Run runs fn while the file systems are frozen:
//
//  1. the pre script, if any, with the mount points as arguments, bounded
//     by a timeout (2 min); if it fails, nothing but the post script
//     runs (it may have to undo what the pre script did in part);
//  2. Freeze of each file system (several mount points of one file system
//     are frozen once); if one fails, or none could be (all unfreezable),
//     fn is skipped;
//  3. fn;
//  4. Thaw of everything frozen, always: on return, on panic, and from a
//     watchdog when the timeout, counted from the first freeze, expires or
//     ctx is cancelled, even while a later freeze still blocks (it
//     flushes the file system's dirty pages first, and a hung device
//     never returns). Run still waits for fn, so fn must itself be
//     bounded; a watchdog thaw yields ErrTimeout or the context error,
//     and fn is not run at all if it came before fn would start;
//  5. the post script, if any, whatever happened before.
//
// All errors are returned joined.
func (w Window) Run(ctx context.Context, fn func() error) (err error) {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("fsfreeze: %w", err)
	}
	defer func() { err = errors.Join(err, w.RunPost(ctx)) }()
	if err := w.RunPre(ctx); err != nil {
		return err
	}
	return w.Frozen(ctx, fn)
}

// RunPre runs the pre script, if any (Run's step 1), starting the
// scripts' log afresh. A caller running the steps itself (so as not to
// wait for a script where it has other work) must run RunPost once RunPre
// has started, whatever RunPre and Frozen returned.
func (w Window) RunPre(ctx context.Context) error {
	if w.ScriptLog != "" && (w.Pre != "" || w.Post != "") {
		// This window's output only, in a file of mode 0600 whatever an
		// older one's was.
		os.Remove(w.ScriptLog)
		f, err := os.OpenFile(w.ScriptLog, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return fmt.Errorf("fsfreeze: scripts' output file: %w", err)
		}
		f.Close()
	}
	if w.Pre == "" {
		return nil
	}
	sctx, cancel := context.WithTimeout(ctx, scriptTimeout)
	defer cancel()
	return w.runScript(sctx, "pre-freeze", w.Pre)
}

// RunPost runs the post script, if any (Run's step 5), even once ctx is
// done: it may have to undo what the pre script did.
func (w Window) RunPost(ctx context.Context) error {
	scripts.post()
	if w.Post == "" {
		return nil
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), scriptTimeout)
	defer cancel()
	return w.runScript(sctx, "post-thaw", w.Post)
}

// Frozen runs fn with the file systems frozen: Run's steps 2 to 4,
// without the scripts.
func (w Window) Frozen(ctx context.Context, fn func() error) (err error) {
	timeout := w.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("fsfreeze: %w", err)
	}
	targets, err := w.targets()
	if err != nil {
		return err
	}
	if len(targets) == 0 && len(w.Devices) > 0 && w.Pre == "" {
		return fmt.Errorf("fsfreeze: no file system is mounted from %s now: nothing to freeze", strings.Join(w.Devices, ", "))
	}
	// Told after the thaw: telling may write (a log on a frozen disk).
	var unfrozen []string
	if w.Unfreezable != nil {
		defer func() {
			for _, m := range unfrozen {
				w.Unfreezable(m)
			}
		}()
	}
	frozen := openSet(w.OnThaw)
	defer func() { err = errors.Join(err, frozen.thaw()); closeSet(frozen) }()
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
			watchdog <- fmt.Errorf("fsfreeze: %w: file systems thawed by the watchdog after %v, before the freeze and the frozen operation ended", ErrTimeout, timeout)
		case <-ctx.Done():
			watchdog <- fmt.Errorf("fsfreeze: file systems thawed early, before the freeze and the frozen operation ended: %w", ctx.Err())
		}
		frozen.thaw()
	}()
	defer func() {
		close(stop)
		err = errors.Join(err, <-watchdog)
	}()
	for _, t := range targets {
		m := t.point
		// Thawed through the descriptor that froze it: should the file
		// system be unmounted meanwhile, its mount point is no longer
		// it, and a thaw by path would leave it frozen, its device held.
		fd, err := openMount(m)
		if err != nil {
			return fmt.Errorf("fsfreeze: freeze %s: %w", m, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || (t.dev != 0 && st.Dev != t.dev) {
			unix.Close(fd)
			return fmt.Errorf("fsfreeze: %w", cmp.Or(err, errCovered(m)))
		}
		frozen.freezing.Lock() // until add has it (or it failed)
		if frozen.isThawed() { // ThawAll (the process stopping) or the watchdog
			frozen.freezing.Unlock()
			unix.Close(fd)
			return nil // their error says why
		}
		if err := freeze(fd, m); err != nil {
			frozen.freezing.Unlock()
			if errors.Is(err, unix.EOPNOTSUPP) && w.Unfreezable != nil {
				serr := unix.Syncfs(fd)
				unix.Close(fd)
				if serr != nil {
					return fmt.Errorf("fsfreeze: sync %s, which cannot be frozen: %w", m, serr)
				}
				unfrozen = append(unfrozen, m)
				continue
			}
			unix.Close(fd)
			return err
		}
		added := frozen.add(m, fd)
		frozen.freezing.Unlock()
		if !added {
			return nil // the watchdog's (or ThawAll's) error says why
		}
	}
	if frozen.isThawed() {
		return nil // the watchdog's error says why
	}
	if len(targets) > 0 && len(unfrozen) == len(targets) {
		// Synced, but nothing held back: no consistent point to take.
		return fmt.Errorf("fsfreeze: none of the file systems can be frozen (%s)", strings.Join(unfrozen, ", "))
	}
	return fn()
}

// frozenSet thaws its mounts exactly once, from whichever of Run, its
// watchdog and ThawAll gets there first; later callers wait and get the
// result. A freeze that returns after the thaw is undone at once.
type frozenSet struct {
	mu     sync.Mutex
	mounts []string
	fds    []int // open on each mount's root, from the freeze on
	thawed bool
	err    error
	// freezing is held by a freeze under way until add has it: one
	// cannot be interrupted (it flushes the file system first), and
	// ThawAll waits for it.
	freezing sync.Mutex
	// onThaw is Window.OnThaw, run once by the first thaw.
	onThaw   func()
	thawOnce sync.Once
}

// open lists the frozenSets of the Windows running, for ThawAll;
// stopping, set by ThawAll, makes later ones thawed from the start.
var open = struct {
	sync.Mutex
	sets     map[*frozenSet]struct{}
	stopping bool
}{sets: make(map[*frozenSet]struct{})}

func openSet(onThaw func()) *frozenSet {
	f := &frozenSet{onThaw: onThaw}
	open.Lock()
	if open.stopping {
		f.thawed, f.err = true, fmt.Errorf("fsfreeze: %w: the process is stopping", ErrThaw)
	}
	open.sets[f] = struct{}{}
	open.Unlock()
	return f
}

func closeSet(f *frozenSet) {
	open.Lock()
	delete(open.sets, f)
	open.Unlock()
}

// ThawAll thaws every file system a running Window froze, and waits up
// to timeout for freezes under way to return (and be undone): for a
// process about to die (a second signal), which must not leave a file
// system frozen with nobody to thaw it. The Windows fail with ErrThaw,
// and so does every Window after it: the process is stopping.
func ThawAll(timeout time.Duration) {
	open.Lock()
	open.stopping = true
	sets := make([]*frozenSet, 0, len(open.sets))
	for f := range open.sets {
		sets = append(sets, f)
	}
	open.Unlock()
	done := make(chan struct{})
	go func() {
		// Every set thawed first, then the freezes under way waited for:
		// one that hangs holds up no other set's thaw.
		for _, f := range sets {
			f.mu.Lock()
			if !f.thawed {
				f.err = errors.Join(f.err, fmt.Errorf("fsfreeze: %w: thawed early, the process stopping", ErrThaw))
			}
			f.mu.Unlock()
			f.thawOnly()
		}
		// Told once all are thawed: a callback that waits holds up no
		// thaw.
		for _, f := range sets {
			f.tellThawed()
		}
		for _, f := range sets {
			// A freeze under way: add undoes it.
			f.freezing.Lock()
			//lint:ignore SA2001 the wait is the point
			f.freezing.Unlock()
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

// add records a frozen mount; false if the set was thawed meanwhile, in
// which case it is thawed now.
func (f *frozenSet) add(mount string, fd int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.thawed {
		f.err = errors.Join(f.err, thawFD(fd, mount))
		unix.Close(fd)
		return false
	}
	f.mounts = append(f.mounts, mount)
	f.fds = append(f.fds, fd)
	return true
}

func (f *frozenSet) isThawed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.thawed
}

func (f *frozenSet) thaw() error {
	err := f.thawOnly()
	f.tellThawed()
	return err
}

// thawOnly thaws the set without telling OnThaw.
func (f *frozenSet) thawOnly() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.thawed {
		f.thawed = true
		for i, m := range f.mounts {
			f.err = errors.Join(f.err, thawFD(f.fds[i], m))
			unix.Close(f.fds[i])
		}
	}
	return f.err
}

// tellThawed tells OnThaw, once.
func (f *frozenSet) tellThawed() {
	if f.onThaw != nil {
		f.thawOnce.Do(f.onThaw)
	}
}

// targets lists the file systems to freeze, each once (freezing one
// twice fails with EBUSY): those mounted from Devices now, then those at
// Mounts.
func (w Window) targets() ([]mount, error) {
	var all []mount
	if len(w.Devices) > 0 {
		ms, err := mountsOf(w.Devices...)
		if err != nil {
			return nil, err
		}
		all = ms
	}
	for _, m := range w.Mounts {
		var st unix.Stat_t
		if err := unix.Stat(m, &st); err != nil {
			return nil, fmt.Errorf("fsfreeze: %w", &os.PathError{Op: "stat", Path: m, Err: err})
		}
		all = append(all, mount{point: m, dev: st.Dev})
	}
	seen := make(map[uint64]bool, len(all))
	var out []mount
	for _, m := range all {
		if !seen[m.dev] {
			seen[m.dev] = true
			out = append(out, m)
		}
	}
	return out, nil
}

// CheckScripts refuses pre and post scripts ("" for none) that are not
// executable files, or that someone other than root could change: the
// file, a directory above it, and, for a symbolic link, the same for
// what it points to. The agent runs them as root. A name without a slash
// is looked up in PATH, as it will be run. Found at start, not at the
// first point an hour later.
func CheckScripts(paths ...string) error {
	for _, p := range paths {
		if p == "" {
			continue
		}
		path := p
		if !strings.Contains(p, "/") {
			found, err := exec.LookPath(p)
			if err != nil {
				return fmt.Errorf("fsfreeze: script %s: %w", p, err)
			}
			path = found
		}
		abs, err := filepath.Abs(path)
		if err != nil {
			return fmt.Errorf("fsfreeze: script %s: %w", p, err)
		}
		target, err := filepath.EvalSymlinks(abs)
		if err != nil {
			return fmt.Errorf("fsfreeze: script %s: %w", p, err)
		}
		for _, q := range []string{abs, target} {
			if err := rootOnly(p, q); err != nil {
				return err
			}
		}
	}
	return nil
}

// rootOnly checks that only root can change file, an executable, or a
// directory above it (p names the script in errors).
func rootOnly(p, file string) error {
	for dir := file; ; dir = filepath.Dir(dir) {
		var st unix.Stat_t
		if err := unix.Stat(dir, &st); err != nil {
			return fmt.Errorf("fsfreeze: script %s: %w", p, &os.PathError{Op: "stat", Path: dir, Err: err})
		}
		if dir == file && (st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&0o100 == 0) {
			return fmt.Errorf("fsfreeze: script %s: not an executable file", p)
		}
		sticky := st.Mode&unix.S_ISVTX != 0 && dir != file // /tmp: others cannot replace root's entries
		if st.Uid != 0 || st.Mode&0o022 != 0 && !sticky {
			return fmt.Errorf("fsfreeze: script %s: %s is writable by users other than root (owner uid %d, mode %#o); the agent runs the script as root", p, dir, st.Uid, st.Mode&0o7777)
		}
		if dir == "/" {
			return nil
		}
	}
}

// runScript runs a script with the mount points as arguments, its output
// to w.ScriptLog.
func (w Window) runScript(ctx context.Context, what, path string) error {
	args := w.Mounts
	if len(w.Devices) > 0 {
		// The file systems mounted from the devices now (the freeze
		// looks again); one that cannot be listed fails the freeze.
		ms, _ := mountsOf(w.Devices...)
		args = append(slices.Clone(w.Mounts), points(ms)...)
	}
	cmd := exec.CommandContext(ctx, path, args...)
	// A script out of time is killed with everything it started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Not the agent's NOTIFY_SOCKET: a script is not the service.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NOTIFY_SOCKET=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	where := ""
	if w.ScriptLog != "" {
		f, err := os.OpenFile(w.ScriptLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return fmt.Errorf("fsfreeze: %s script %s: output file: %w", what, path, err)
		}
		defer f.Close()
		fmt.Fprintf(f, "%s %s %s\n", time.Now().UTC().Format(time.RFC3339), what, path)
		// A file, not a pipe: a background child the script leaves
		// running (a lock holder) does not hold the script's end open.
		cmd.Stdout, cmd.Stderr = f, f
		where = " (its output: " + w.ScriptLog + ")"
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("fsfreeze: %s script %s: %w%s", what, path, err, where)
	}
	// Its group (a lock holder the pre script leaves running) is killed
	// if the process ends at once (KillScripts): the post script that
	// would release it never runs then. A pre script's stays known until
	// the next post script starts.
	scripts.add(cmd.Process.Pid, what == "pre-freeze")
	err := cmd.Wait()
	if what != "pre-freeze" {
		scripts.done(cmd.Process.Pid)
	}
	if err != nil {
		return fmt.Errorf("fsfreeze: %s script %s: %w%s", what, path, err, where)
	}
	return nil
}

// scripts are the process groups of the scripts running, and of the pre
// scripts whose post script has not started: what KillScripts kills.
var scripts scriptGroups

type scriptGroups struct {
	mu     sync.Mutex
	groups map[int]bool // pgid: a pre script's
}

func (g *scriptGroups) add(pgid int, pre bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.groups == nil {
		g.groups = map[int]bool{}
	}
	g.groups[pgid] = pre
}

func (g *scriptGroups) done(pgid int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.groups, pgid)
}

// post forgets the pre scripts' groups: their post script runs now.
func (g *scriptGroups) post() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for pgid, pre := range g.groups {
		if pre {
			delete(g.groups, pgid)
		}
	}
}

// KillScripts kills the process groups of the scripts running and of
// the pre scripts whose post script has not run (a child a pre script
// left holding a lock): for a process that ends at once, after ThawAll,
// so that nothing it started stays quiesced without it.
func KillScripts() {
	scripts.mu.Lock()
	defer scripts.mu.Unlock()
	for pgid := range scripts.groups {
		syscall.Kill(-pgid, syscall.SIGKILL)
		delete(scripts.groups, pgid)
	}
}
