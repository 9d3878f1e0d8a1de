package agent

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/fsfreeze"
	"github.com/lifeboat-dr/lifeboat/internal/progress"
	"github.com/lifeboat-dr/lifeboat/internal/sdnotify"
	"golang.org/x/sys/unix"
)

// MirrorConfig configures `lifeboat agent mirror`.
type MirrorConfig struct {
	Device    string
	To        string
	Mode      capture.Mode
	RingBytes int
	// ReadbackDelay: Options.ReadbackDelay (metadata mode).
	ReadbackDelay time.Duration
	StateDir      string
	CrashInterval time.Duration
	AppInterval   time.Duration
	PreScript     string
	PostScript    string
	Logger        *slog.Logger
	Progress      io.Writer // progress of the initial copy
	Out           io.Writer // the final counters line
	OnSynced      func()    // called once the initial copy is done (tests)
	Stats         *Stats    // filled in on return (tests, benchmarks)
}

// mirrorState is what the agent remembers in --state-dir between runs.
// It never outranks the target: every field is checked against the
// device and the file before it is trusted.
type mirrorState struct {
	Version  int    `json:"version"`
	Device   string `json:"device"`
	Identity string `json:"device_identity"`
	// Stable and TargetStable are blockdev's StableID of the device and
	// of a mirror device: the disk as a reboot or a re-attach leaves it
	// ("" if it has none).
	Stable       string `json:"device_stable_id,omitempty"`
	Target       string `json:"target"`
	TargetID     string `json:"target_identity"`
	TargetStable string `json:"target_stable_id,omitempty"`
	// TargetStamp is the mirror file's ctime after the clean stop's last
	// write (for a device, its kernel write counters, blockStamp; "blk:?"
	// when they could not be read): anything that writes, truncates or
	// replaces it since moves it.
	TargetStamp string `json:"target_stamp,omitempty"`
	Clean       bool   `json:"clean"`
	// Whole: the mirror held all of the device once (a sync finished),
	// so a compare writes only what differs from it now. Discards punch
	// holes in it: what it holds says nothing of the room a compare
	// needs.
	Whole bool `json:"copied_whole,omitempty"`
}

const stateVersion = 1

// isDevNull reports whether fi is the null device (1:3), whatever its
// name.
func isDevNull(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && fi.Mode()&os.ModeCharDevice != 0 && unix.Major(st.Rdev) == 1 && unix.Minor(st.Rdev) == 3
}

// checkNotOn refuses a mirror target whose writes reach the source device
// src (named device): the target's device or file system, or anything
// below it (blockdev.Overlaps). A character device (/dev/null) writes
// nowhere.
func checkNotOn(target string, src blockdev.Dev, device string) error {
	var at blockdev.Dev
	fi, err := os.Stat(target)
	switch {
	case err == nil && fi.Mode()&os.ModeCharDevice != 0:
		return nil
	case err == nil && fi.Mode()&os.ModeDevice != 0:
		if at, err = blockdev.DevT(target); err != nil {
			return fmt.Errorf("mirror device: %w", err)
		}
	default:
		if at, err = blockdev.FileSystemDev(target); err != nil {
			return fmt.Errorf("mirror file: %w", err)
		}
	}
	if via, ok := blockdev.Overlaps(at, src); ok {
		return fmt.Errorf("mirror %s is stored on %s (through %s): the copy would write to what it copies", target, device, blockdev.Name(via))
	}
	return nil
}

// RunMirror keeps cfg.To equal to cfg.Device until ctx is done.
func RunMirror(ctx context.Context, cfg MirrorConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if os.Geteuid() != 0 {
		return errors.New("the agent needs root (it loads eBPF programs and reads block devices)")
	}
	if err := capture.CheckCapabilities(); err != nil {
		return err
	}
	if err := capture.CheckBTF(); err != nil {
		return err
	}
	if err := fsfreeze.CheckScripts(cfg.PreScript, cfg.PostScript); err != nil {
		return err
	}
	dev, err := blockdev.Open(cfg.Device)
	if err != nil {
		return err
	}
	identity, err := dev.Identity()
	stable, terr := dev.StableID()
	size, serr := dev.Size()
	place, perr := dev.Placement()
	dev.Close()
	if err = cmp.Or(err, terr, serr, perr); err != nil {
		return err
	}
	// A block device target is opened exclusively: one mounted or held
	// (by device mapper, md, another mirror) is refused with EBUSY
	// instead of being overwritten.
	openFlags := os.O_RDWR | os.O_CREATE
	toInfo, toErr := os.Stat(cfg.To)
	existed := toErr == nil
	if errors.Is(toErr, fs.ErrNotExist) && blockdev.OnDevtmpfs(filepath.Dir(cfg.To)) {
		// A device not there yet (the unit started before the disk
		// appeared) or mistyped: a file made in its place would hold the
		// copy in memory and take the device's name.
		return fmt.Errorf("mirror device %s does not exist (not created: a file under /dev would live in memory and take the name of the device when it appears)", cfg.To)
	}
	if fi := toInfo; existed && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
		openFlags = os.O_RDWR | os.O_EXCL
		td, err := blockdev.Open(cfg.To)
		if err != nil {
			return fmt.Errorf("mirror device: %w", err)
		}
		tplace, err := td.Placement()
		tsize, serr := td.Size()
		td.Close()
		if err != nil {
			return fmt.Errorf("mirror device: %w", err)
		}
		if serr != nil {
			return fmt.Errorf("mirror device: %w", serr)
		}
		// Another partition of the same disk is a target; one that
		// overlaps the source (the disk itself, the same partition) is not.
		s0, t0 := place.StartBytes(), tplace.StartBytes()
		if tplace.DiskDev == place.DiskDev && t0 < s0+size && s0 < t0+tsize {
			return fmt.Errorf("mirror device %s overlaps %s on disk %s: the copy would overwrite what it copies", cfg.To, cfg.Device, place.Disk)
		}
	}
	// Nor may the mirror's writes reach the source through the layers
	// below it: a file on a file system of the source, or a loop or
	// device-mapper device built on it. Each copied write would be
	// captured and copied again, and the copy would fill the source.
	if err := checkNotOn(cfg.To, dev.Dev(), cfg.Device); err != nil {
		return err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := checkPrivate(cfg.StateDir); err != nil {
		return err
	}
	lock, err := lockState(cfg.StateDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	statePath := filepath.Join(cfg.StateDir, "mirror.json")
	prev, err := loadState(statePath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Warn("ignoring unreadable state: full copy", "err", err)
	}

	f, err := os.OpenFile(cfg.To, openFlags, 0o600)
	if errors.Is(err, syscall.EBUSY) {
		return fmt.Errorf("mirror device %s is in use (mounted, or held by another device): %w", cfg.To, err)
	}
	if err != nil {
		return fmt.Errorf("mirror file: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
		// One writer per mirror file, as O_EXCL gives a device: another
		// agent's writes would reach the file behind this one's state,
		// and the stamp the later stop saves would vouch for them.
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("mirror file %s is in use by another agent (one mirror file takes one device's copy)", cfg.To)
		} else if err != nil {
			// A file system without locks (NFS without lockd): not
			// another agent's, and no reason to refuse.
			log.Warn("cannot lock the mirror file: a second agent given it would not be refused", "to", cfg.To, "err", err)
		}
	}
	targetID, targetStable, err := fileIdentity(f)
	if err != nil {
		return err
	}
	// A copy of the disk is as secret as the disk: an existing file
	// another user owns, and the state does not know, would stay theirs
	// to read whatever its mode. (One the agent made may belong to
	// another uid by the mount's rule: vfat or CIFS mounted with uid=,
	// an NFS export mapping root.)
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() && existed && (prev == nil || prev.TargetID != targetID) {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() && st.Uid != overflowUID() {
			return fmt.Errorf("mirror file %s is owned by uid %d: the copy of %s would be theirs to read; remove it or chown it to root", cfg.To, st.Uid, cfg.Device)
		}
	}
	stamp, err := fileStamp(f)
	if err != nil {
		return err
	}
	// A file that others may read (made by truncate or cp) is closed to
	// them. After the stamp: the chmod moves its ctime (and on vfat or
	// exFAT, which keep no modes, moves it at every start).
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o077 != 0 {
		if err := f.Chmod(fi.Mode().Perm() &^ 0o077); err != nil {
			log.Warn("mirror file is readable by others and its mode cannot be changed", "file", cfg.To, "err", err)
		}
	}
	abs, _ := filepath.Abs(cfg.To)
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("mirror file: %w", err)
	}
	// The target is checked before anything is saved: a mistyped --to
	// must not replace the state of the real mirror.
	switch {
	case fi.Mode().IsRegular():
		// Written through a loop device too (left mounted to look at
		// the copy, or the source's own backing file), the file would
		// take writes the state never hears of.
		if loops := blockdev.LoopsBackedBy(fi); len(loops) > 0 {
			if slices.ContainsFunc(loops, func(l string) bool { return sameDevice(l, cfg.Device) }) {
				return fmt.Errorf("mirror file %s is the backing file of %s, the device it would copy: give another --to", cfg.To, cfg.Device)
			}
			return fmt.Errorf("mirror file %s backs loop device %s: detach it first (losetup -d)", cfg.To, strings.Join(loops, ", "))
		}
	case fi.Mode()&os.ModeCharDevice != 0 && isDevNull(fi):
	case fi.Mode()&os.ModeCharDevice != 0:
		// Only /dev/null keeps no copy on purpose: another character
		// device (/dev/nvme1 for /dev/nvme1n1) would swallow it silently.
		return fmt.Errorf("mirror file %s: a character device; the mirror goes to a file, a block device or /dev/null", cfg.To)
	case fi.Mode()&os.ModeDevice != 0:
		tsize, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return fmt.Errorf("mirror device %s: size: %w", cfg.To, err)
		}
		if tsize < size {
			return fmt.Errorf("mirror device %s: %d bytes, smaller than %s (%d bytes)", cfg.To, tsize, cfg.Device, size)
		}
	default:
		return fmt.Errorf("mirror file %s: not a regular file or a device", cfg.To)
	}

	sync := SyncFull
	// (A state written before device targets were known by their disk's
	// identity names the node's.)
	targetMoved := prev != nil && (prev.Target != abs || (prev.TargetID != targetID && prev.TargetID != nodeIdentity(fi)))
	// A disk back under a new device number or diskseq (a reboot, a
	// re-attach) is compared, not copied anew.
	sourceBack := prev != nil && prev.Identity != identity && prev.Stable != "" && prev.Stable == stable
	targetBack := targetMoved && prev.Target == abs && prev.TargetStable != "" && prev.TargetStable == targetStable
	switch {
	case prev == nil:
		log.Info("no previous state: full copy")
		if fi.Mode().IsRegular() && fi.Size() > 0 {
			// Created or overwritten, as the command says; said, in case
			// --to was mistyped.
			log.Warn("the mirror file exists and is not one this state directory knows: overwriting it with a copy of the device", "to", cfg.To, "bytes", fi.Size())
		}
	case prev.Identity != identity && !sourceBack:
		log.Warn("another device is behind this path now: full copy", "was", prev.Identity, "now", identity)
	case targetMoved && !targetBack:
		log.Warn("the mirror file is not the one the last run wrote (missing, replaced or moved): full copy", "to", cfg.To)
	case sourceBack || targetBack:
		log.Warn("the device or the mirror device is back under a new device number or sequence (a reboot, a re-attach): resync by checksum")
		sync = SyncCompare
	case !prev.Clean:
		log.Warn("the last run did not stop cleanly: resync by checksum")
		sync = SyncCompare
	case prev.TargetStamp != "" && prev.TargetStamp != stamp:
		// ("" : a state written before stamps were kept.)
		log.Warn("the mirror file changed since the last clean stop (written, truncated or replaced by something else): resync by checksum")
		sync = SyncCompare
	default:
		sync = SyncResume
	}
	// A compare of a file that was whole, and stays the same size, keeps
	// it whole: it writes what differs only.
	whole := sync == SyncCompare && prev.Whole && fi.Size() == size
	if fi.Mode().IsRegular() && !whole && (sync != SyncResume || fi.Size() != size) {
		// A copy writes every block, zeros included, and a compare
		// every block of a file never copied whole: refused now, the
		// state as it was, rather than failing part-way with the file
		// system full.
		if err := roomForCopy(f, cfg.To, size); err != nil {
			return err
		}
	}
	// From here on a crash is an unclean stop: saved before the target is
	// touched (resized below), so that a crash then is not taken for a
	// clean stop with the target as that stop left it.
	st := mirrorState{Version: stateVersion, Device: cfg.Device, Identity: identity, Stable: stable, Target: abs, TargetID: targetID, TargetStable: targetStable,
		Whole: whole || sync == SyncResume && prev.Whole && fi.Size() == size}
	if err := saveState(statePath, &st); err != nil {
		return err
	}
	switch {
	case fi.Mode().IsRegular():
		if fi.Size() != size {
			if err := f.Truncate(size); err != nil {
				return fmt.Errorf("size mirror file: %w", err)
			}
			// Not the file the state knows (a new one may even get the
			// old inode number): copy it all.
			sync = SyncFull
		}
	case fi.Mode()&os.ModeCharDevice != 0:
		// /dev/null: capture without keeping a copy (benchmarks).
		sync = SyncFull
	}
	markers, err := os.OpenFile(filepath.Join(cfg.StateDir, "markers.jsonl"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer markers.Close()
	target := &fileTarget{f: f, markers: markers, null: fi.Mode()&os.ModeCharDevice != 0}
	e, err := New(Options{
		Sources:       []Source{{Name: filepath.Base(cfg.Device), Path: cfg.Device, Mode: cfg.Mode, Sync: sync, Size: size}},
		RingBytes:     cfg.RingBytes,
		PinDir:        PinDir(cfg.StateDir),
		Target:        target,
		Logger:        log,
		Progress:      cfg.Progress,
		CrashInterval: cfg.CrashInterval,
		AppInterval:   cfg.AppInterval,
		ReadbackDelay: cfg.ReadbackDelay,
		PreScript:     cfg.PreScript,
		PostScript:    cfg.PostScript,
		ScriptLog:     filepath.Join(cfg.StateDir, ScriptLogFile),
		OnReady: func() {
			log.Info("capture attached", keyDevice, cfg.Device)
			sdnotify.Notify("READY=1\nSTATUS=initial sync")
		},
		OnSynced: func() {
			log.Info("initial sync done; mirroring", keyDevice, cfg.Device, "to", cfg.To)
			if !st.Whole && fi.Mode().IsRegular() {
				// Still unclean; from now on a compare needs no room
				// for the whole device. (Run calls this on the
				// goroutine that called it: st is not shared.)
				st.Whole = true
				if err := saveState(statePath, &st); err != nil {
					log.Warn("cannot save the state", "err", err)
				}
			}
			sdnotify.Notify("X-LIFEBOAT-SYNCED=1\nSTATUS=mirroring")
			if cfg.OnSynced != nil {
				cfg.OnSynced()
			}
		},
	})
	if err != nil {
		return err
	}
	var looped *loopWatch
	if fi.Mode().IsRegular() {
		looped = watchLoops(fi, log, cfg.To)
		defer looped.stop()
	}
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopSync := make(chan struct{})
	syncDone := make(chan struct{})
	go func() {
		defer close(syncDone)
		target.syncLoop(stopSync, cancel)
	}()
	runErr := e.Run(rctx)
	close(stopSync)
	<-syncDone
	if err := target.failure(); err != nil {
		// The mirror failed under the run (its write-back): what the
		// engine made of the cancel, or of a stop meanwhile, is beside
		// the point.
		runErr = err
	}
	stats := e.Stats()
	if cfg.Stats != nil {
		*cfg.Stats = stats
	}
	unsettled := e.Unsettled(0)
	closeErr := e.Close()
	if runErr != nil && ctx.Err() != nil && errors.Is(runErr, context.Canceled) {
		// Stopped before the initial copy (or a resume's first drain)
		// was done: saved unclean, the next run compares by checksum.
		log.Warn("stopped before the initial copy finished; the next run resyncs by checksum", keyDevice, cfg.Device)
		printCounters(cfg.Out, stats)
		return nil
	}
	if runErr != nil {
		return runErr
	}
	if closeErr != nil {
		return closeErr
	}
	if unsettled {
		// (Logged when the drain went on.)
		printCounters(cfg.Out, stats)
		return nil
	}
	if looped != nil {
		if loop := looped.stop(); loop != "" {
			// Written through it maybe, behind the capture: the stamp
			// below would vouch for that.
			log.Warn("the mirror file was attached to a loop device during the run; the next start resyncs by checksum", "to", cfg.To, "loop", loop)
			printCounters(cfg.Out, stats)
			return nil
		}
	}
	// The copy's writes are synced (Close): its ctime now is the one a
	// file nothing else touched still has at the next start.
	if st.TargetStamp, err = fileStamp(f); err != nil {
		return err
	}
	if st.TargetStamp == "" && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
		// Counters unreadable now: the next start compares ("" is a
		// state from before stamps, trusted).
		log.Warn("cannot read the mirror device's write counters; the next start resyncs by checksum", "to", cfg.To)
		st.TargetStamp = "blk:?"
	}
	st.Clean = true
	if err := saveState(statePath, &st); err != nil {
		return err
	}
	printCounters(cfg.Out, stats)
	return nil
}

// printCounters writes the counters line a stop ends with.
func printCounters(out io.Writer, stats Stats) {
	if out != nil {
		b, _ := json.Marshal(stats)
		fmt.Fprintf(out, "counters: %s\n", b)
	}
}

// PinRoot holds one directory per pinned capture (see PinDir).
const PinRoot = "/sys/fs/bpf/lifeboat"

// Pinned reports whether a capture is pinned for stateDir.
func Pinned(stateDir string) bool {
	_, err := os.Stat(PinDir(stateDir))
	return err == nil
}

// PinDir is where the capture of stateDir is pinned on the bpffs.
func PinDir(stateDir string) string {
	abs, _ := filepath.Abs(stateDir)
	h := sha256.Sum256([]byte(abs))
	return filepath.Join(PinRoot, hex.EncodeToString(h[:8]))
}

// Release detaches the capture a clean stop left pinned for stateDir and
// forgets that the stop was clean (the next run resyncs by checksum).
func Release(stateDir string) error {
	return release(stateDir, func() error {
		statePath := filepath.Join(stateDir, "mirror.json")
		if st, err := loadState(statePath); err == nil {
			st.Clean = false
			return saveState(statePath, st)
		}
		return nil
	})
}

// release unpins dir's capture and, with dir locked, forgets its clean
// stop (forget); a directory never used has only pins to remove.
func release(dir string, forget func() error) error {
	lock, err := lockState(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return unpin(dir) // no state: nothing else to forget
	}
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := unpin(dir); err != nil {
		return err
	}
	return forget()
}

// lockState locks state directory dir for as long as the file it returns
// is open. Two agents sharing one would share its pinned capture, each
// harvesting (and so stealing) the other's bitmap marks, and a release
// would detach a running agent's capture.
func lockState(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state directory %s is in use by another lifeboat agent: stop it first, or give this one its own --state-dir", dir)
		}
		return nil, fmt.Errorf("lock state directory %s: %w", dir, err)
	}
	return f, nil
}

// overflowUID is the uid the kernel shows for one it cannot map (65534
// unless set otherwise), the owner root's files get on a squashing NFS
// export.
func overflowUID() uint32 {
	b, err := os.ReadFile("/proc/sys/fs/overflowuid")
	if err != nil {
		return 65534
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 32)
	if err != nil {
		return 65534
	}
	return uint32(n)
}

// checkPrivate refuses a state directory another user owns or may write
// to: the state in it decides what the agent trusts of its copy (a clean
// stop skips the resync), and files the agent writes there by name could
// be links planted to others. (The overflow uid owns what root makes on
// an NFS export that squashes it.)
func checkPrivate(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if int(st.Uid) != os.Geteuid() && st.Uid != overflowUID() || fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("state directory %s is owned by uid %d with mode %v: it must be this agent's alone (chown root and chmod go-w it, or give another --state-dir)", dir, st.Uid, fi.Mode().Perm())
	}
	return nil
}

// unpin removes the pins of stateDir's capture: its programs detach once
// no process holds them.
func unpin(stateDir string) error {
	dir := PinDir(stateDir)
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	for _, e := range entries {
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	os.Remove(dir)
	return nil
}

func loadState(path string) (*mirrorState, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var st mirrorState
	if err := json.Unmarshal(b, &st); err != nil || st.Version != stateVersion {
		return nil, fmt.Errorf("state %s: unreadable, or of another version", path)
	}
	return &st, nil
}

// saveState writes st atomically and durably.
func saveState(path string, st *mirrorState) error { return saveJSON(path, st) }

// fileIdentity names the inode behind f, so a replaced file is noticed,
// and for a block device its StableID as well.
func fileIdentity(f *os.File) (id, stable string, err error) {
	fi, err := f.Stat()
	if err != nil {
		return "", "", err
	}
	if _, ok := fi.Sys().(*syscall.Stat_t); !ok {
		return "", "", errors.New("mirror file: no inode information")
	}
	if fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0 {
		// A device node keeps its inode whatever disk is behind it
		// (another image attached to the same loop device).
		d, err := blockdev.Open(f.Name())
		if err != nil {
			return "", "", fmt.Errorf("mirror device: %w", err)
		}
		defer d.Close()
		id, err := d.Identity()
		if err != nil {
			return "", "", fmt.Errorf("mirror device: %w", err)
		}
		stable, err := d.StableID()
		if err != nil {
			return "", "", fmt.Errorf("mirror device: %w", err)
		}
		return "block " + id, stable, nil
	}
	return nodeIdentity(fi), "", nil
}

// nodeIdentity is the file's device and inode numbers.
func nodeIdentity(fi os.FileInfo) string {
	s, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	return fmt.Sprintf("%d:%d", s.Dev, s.Ino)
}

// fileStamp returns a regular file's ctime, which moves with every write,
// truncation or inode change and which no caller can set back; "" for
// devices (their node's ctime does not follow writes).
func fileStamp(f *os.File) (string, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return "", fmt.Errorf("mirror file: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return fmt.Sprintf("%d.%09d", st.Ctim.Sec, st.Ctim.Nsec), nil
	case unix.S_IFBLK:
		return withBacking(blockStamp(unix.Major(st.Rdev), unix.Minor(st.Rdev)), unix.Major(st.Rdev), unix.Minor(st.Rdev)), nil
	}
	return "", nil
}

// withBacking adds to the stamp of a loop device its backing file's
// ctime: that file written directly, or through another loop device
// (mount -o loop), leaves the device's counters still. "" when the file
// cannot be examined. (Not for a partition of one: the file changes with
// every partition's writes, the source's too when it is a sibling.)
func withBacking(stamp string, major, minor uint32) string {
	if stamp == "" {
		return ""
	}
	dir, err := filepath.EvalSymlinks(fmt.Sprintf("/sys/dev/block/%d:%d", major, minor))
	if err != nil {
		return ""
	}
	if _, err := os.Stat(filepath.Join(dir, "partition")); err == nil {
		return stamp
	}
	b, err := os.ReadFile(filepath.Join(dir, "loop", "backing_file"))
	if errors.Is(err, fs.ErrNotExist) {
		return stamp // not a loop device
	}
	if err != nil {
		return ""
	}
	var st unix.Stat_t
	if err := unix.Stat(strings.TrimSuffix(string(b), "\n"), &st); err != nil {
		return ""
	}
	return stamp + fmt.Sprintf("|f%d.%09d", st.Ctim.Sec, st.Ctim.Nsec)
}

// blockStamp is what the kernel counted written and discarded on block
// device major:minor and, for a partition, written to its disk directly
// (a write to the whole disk may land in it; the disk's counters also
// count its partitions' I/O, which is taken out: the source may be
// another partition of the disk): a mirror device written by anything
// else between two runs (mounted, fsck-ed, dd) moves it. A reboot resets
// the counters, but removes the pinned capture too (the next run
// compares). "" when the counters cannot be read.
func blockStamp(major, minor uint32) string {
	dir, err := filepath.EvalSymlinks(fmt.Sprintf("/sys/dev/block/%d:%d", major, minor))
	if err != nil {
		return ""
	}
	// counts returns sectors written and discarded (stat fields 7, 14).
	counts := func(dir string) (w, d uint64, ok bool) {
		b, err := os.ReadFile(filepath.Join(dir, "stat"))
		if err != nil {
			return 0, 0, false
		}
		f := strings.Fields(string(b))
		if len(f) < 7 {
			return 0, 0, false
		}
		w, err = strconv.ParseUint(f[6], 10, 64)
		if err != nil {
			return 0, 0, false
		}
		if len(f) >= 14 {
			d, _ = strconv.ParseUint(f[13], 10, 64)
		}
		return w, d, true
	}
	// Counters only vouch for a device whose queue counts its I/O
	// (queue/iostats, off by tuning on some NVMe hosts).
	queue := filepath.Join(dir, "queue")
	if _, err := os.Stat(filepath.Join(dir, "partition")); err == nil {
		queue = filepath.Join(filepath.Dir(dir), "queue")
	}
	if b, err := os.ReadFile(filepath.Join(queue, "iostats")); err != nil || strings.TrimSpace(string(b)) != "1" {
		return ""
	}
	w, d, ok := counts(dir)
	if !ok {
		return ""
	}
	stamp := fmt.Sprintf("blk:w%dd%d", w, d)
	if _, err := os.Stat(filepath.Join(dir, "partition")); err != nil {
		return stamp
	}
	disk := filepath.Dir(dir)
	parts, err := os.ReadDir(disk)
	if err != nil {
		return ""
	}
	// The disk's counters read again after its partitions' must not have
	// moved (a partition written in between would hide a direct write).
	for try := range 50 {
		if try > 0 {
			time.Sleep(10 * time.Millisecond) // a sibling partition busy
		}
		dw, dd, ok := counts(disk)
		if !ok {
			return ""
		}
		var pw, pd uint64
		for _, p := range parts {
			sub := filepath.Join(disk, p.Name())
			if _, err := os.Stat(filepath.Join(sub, "partition")); err != nil {
				continue
			}
			w, d, ok := counts(sub)
			if !ok {
				return ""
			}
			pw, pd = pw+w, pd+d
		}
		if w, d, ok := counts(disk); !ok || w != dw || d != dd {
			continue
		}
		if pw > dw || pd > dd {
			return ""
		}
		return stamp + fmt.Sprintf("/w%dd%d", dw-pw, dd-pd)
	}
	return ""
}

// roomForCopy fails unless the file system of the mirror file f (named
// to) can take size bytes: its free space plus what f holds already.
func roomForCopy(f *os.File, to string, size int64) error {
	var sfs unix.Statfs_t
	var st unix.Stat_t
	if unix.Fstatfs(int(f.Fd()), &sfs) != nil || unix.Fstat(int(f.Fd()), &st) != nil {
		return nil // unknown: the writes will tell
	}
	free, held := int64(sfs.Bavail)*blockdev.StatfsUnit(&sfs), st.Blocks*512
	if free+held < size {
		return fmt.Errorf("mirror file %s: its file system has %s free and the file holds %s; the copy needs %s (the device's size): free some space or give another --to",
			to, progress.Bytes(free), progress.Bytes(held), progress.Bytes(size))
	}
	return nil
}

// fileTarget keeps a mirror in a regular file (or another block device).
type fileTarget struct {
	f       *os.File
	markers *os.File
	null    bool // a character device (/dev/null): the copy is discarded here

	mu sync.Mutex
	// failed is the first failed sync of f: a later fsync may succeed
	// after writes were lost (the kernel reports a writeback error once),
	// and must not let the stop vouch for the mirror.
	failed error
}

func (t *fileTarget) WriteAt(_ int, p []byte, off int64) error {
	if t.null {
		return nil // not even a syscall: the benchmark measures capture alone
	}
	if _, err := t.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("write mirror: %w", err)
	}
	return nil
}

func (t *fileTarget) Zero(_ int, off, n int64) error {
	if t.null {
		return nil
	}
	err := unix.Fallocate(int(t.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	// No hole punching here: write the zeroes.
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(zero)))
		if _, err := t.f.WriteAt(zero[:k], off); err != nil {
			return fmt.Errorf("zero mirror: %w", err)
		}
		off += k
		n -= k
	}
	return nil
}

func (t *fileTarget) ReadAt(_ int, p []byte, off int64) (int, error) { return t.f.ReadAt(p, off) }

// Marker records m once the mirror holds its state on stable storage: a
// write the kernel could not write back (a full thin volume, a failing
// disk) stops the mirror here, not at the next stop, days later.
func (t *fileTarget) Marker(m Marker) error {
	if err := t.syncData(false); err != nil {
		return err
	}
	b, _ := json.Marshal(struct {
		Kind MarkerKind `json:"kind"`
		Seq  uint64     `json:"seq"`
		Time time.Time  `json:"time"`
	}{m.Kind, m.Seq, m.Time})
	if _, err := t.markers.Write(append(b, '\n')); err != nil {
		return err
	}
	return t.markers.Sync()
}

// Sync writes the mirror back, its ctime too (the clean stop's stamp).
func (t *fileTarget) Sync() error {
	if err := t.syncData(true); err != nil {
		return err
	}
	return t.markers.Sync()
}

// syncData writes the mirror's data back (and its metadata: all); once
// it has failed it fails for good.
func (t *fileTarget) syncData(all bool) error {
	if t.null {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.failed == nil {
		sync := unix.Fdatasync
		if all {
			sync = unix.Fsync
		}
		if err := sync(int(t.f.Fd())); err != nil {
			t.failed = fmt.Errorf("sync mirror %s: %w", t.f.Name(), err)
		}
	}
	return t.failed
}

// failure is the mirror's latched write-back failure, if any.
func (t *fileTarget) failure() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failed
}

// syncEvery is how often a running mirror writes its data back, so that
// a target that cannot take it is reported within that time.
var syncEvery = 30 * time.Second

// syncLoop writes the mirror back every syncEvery until stop is closed;
// a failure is passed to fail.
func (t *fileTarget) syncLoop(stop <-chan struct{}, fail func(error)) {
	tick := time.NewTicker(syncEvery)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
			if err := t.syncData(false); err != nil {
				fail(err)
				return
			}
		}
	}
}

// loopCheckEvery is how often a running mirror looks for a loop device
// attached to its file.
var loopCheckEvery = 2 * time.Second

// loopWatch looks for loop devices attached writable to the mirror file
// while the agent runs (to look at the copy, say): refused at the start,
// one attached later may write the file behind the capture, and the
// clean stop's stamp would then vouch for those writes. Writes by other
// means during a run (a dd onto the file) are not seen.
type loopWatch struct {
	done chan struct{}
	end  chan string
	once sync.Once
	seen string
}

func watchLoops(fi os.FileInfo, log *slog.Logger, to string) *loopWatch {
	w := &loopWatch{done: make(chan struct{}), end: make(chan string, 1)}
	go func() {
		t := time.NewTicker(loopCheckEvery)
		defer t.Stop()
		seen := ""
		for {
			select {
			case <-w.done:
				if seen == "" {
					seen = strings.Join(blockdev.LoopsBackedBy(fi), ", ")
				}
				w.end <- seen
				return
			case <-t.C:
				if seen != "" {
					continue
				}
				if loops := blockdev.LoopsBackedBy(fi); len(loops) > 0 {
					seen = strings.Join(loops, ", ")
					log.Warn("the mirror file is attached to a loop device: writes through it are not the device's, and the next start resyncs by checksum", "to", to, "loop", seen)
				}
			}
		}
	}()
	return w
}

// stop ends the watch and returns the loop devices seen ("": none). A
// look that does not answer (a loop device over a file on a hung file
// system) counts as one seen: the next start compares, and the stop
// does not hang.
func (w *loopWatch) stop() string {
	w.once.Do(func() {
		close(w.done)
		select {
		case w.seen = <-w.end:
		case <-time.After(loopCheckTimeout):
			w.seen = "(the look for loop devices did not answer)"
		}
	})
	return w.seen
}

// loopCheckTimeout bounds the stop's look for loop devices.
const loopCheckTimeout = 10 * time.Second

// sameDevice reports whether paths a and b are the same block device.
func sameDevice(a, b string) bool {
	var sa, sb unix.Stat_t
	return unix.Stat(a, &sa) == nil && unix.Stat(b, &sb) == nil &&
		sa.Mode&unix.S_IFMT == unix.S_IFBLK && sb.Mode&unix.S_IFMT == unix.S_IFBLK && sa.Rdev == sb.Rdev
}
