// Package loopdev attaches and detaches Linux loop devices over regular
// files, and provides the partition/mkfs/mount helpers that tests and
// tooling need to turn them into realistic disks.
//
// Devices are set up directly through /dev/loop-control and LOOP_CONFIGURE,
// without losetup. Several processes may allocate loop devices at the same
// time (the free index returned by LOOP_CTL_GET_FREE is only a hint), so
// attach and detach retry on EBUSY.
package loopdev

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

const (
	controlPath = "/dev/loop-control"

	// attachAttempts bounds the GET_FREE/CONFIGURE race loop. Each lost race
	// means another process bound the index we were offered; a handful of
	// retries is plenty unless something is allocating in a tight loop.
	attachAttempts = 20
	// busyRetryDelay is the pause between retries after EBUSY.
	busyRetryDelay = 20 * time.Millisecond
	// settleTimeout bounds waiting for device nodes to appear.
	settleTimeout = 5 * time.Second
	// detachTimeout bounds waiting for an exclusive holder to go away and
	// for a deferred clear to complete.
	detachTimeout = 2 * time.Second
)

// Options control how a backing file is attached.
type Options struct {
	// PartScan sets LO_FLAGS_PARTSCAN so the kernel scans the device for a
	// partition table and creates /dev/loopNpM nodes. Required by Partition.
	PartScan bool
	// DirectIO makes the loop driver access the backing file with O_DIRECT,
	// bypassing the page cache of the backing file system. Off by default:
	// buffered backing I/O works on every file system (including tmpfs on
	// older kernels) and is what most tests want.
	DirectIO bool
	// ReadOnly attaches the device read-only.
	ReadOnly bool
	// BlockSize is the logical block size of the device; 0 means the kernel
	// default (512).
	BlockSize uint32
}

// Device is an attached loop device.
type Device struct {
	Path  string // device node, e.g. "/dev/loop3"
	File  string // backing file
	Index int    // N in /dev/loopN

	ownsFile bool // Create made File, so Detach removes it
	// ino and dev identify File: the index may be another's once detached
	// (tests run in parallel), and Bound must not take that for this one.
	ino, dev uint64
}

// Attach binds backingFile to a free loop device. The caller must call
// Detach when done.
func Attach(backingFile string, opts Options) (*Device, error) {
	flags := os.O_RDWR
	if opts.ReadOnly {
		flags = os.O_RDONLY
	}
	if opts.DirectIO {
		flags |= unix.O_DIRECT
	}
	backing, err := os.OpenFile(backingFile, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loopdev: open backing file: %w", err)
	}
	// The kernel takes its own reference on the file; ours only needs to
	// live until LOOP_CONFIGURE returns.
	defer backing.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(backing.Fd()), &st); err != nil {
		return nil, fmt.Errorf("loopdev: stat backing file: %w", err)
	}

	ctl, err := os.OpenFile(controlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loopdev: %w", err)
	}
	defer ctl.Close()

	cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: opts.BlockSize}
	if opts.PartScan {
		cfg.Info.Flags |= unix.LO_FLAGS_PARTSCAN
	}
	if opts.DirectIO {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	if opts.ReadOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	name := filepath.Base(backingFile)
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], name)

	for attempt := 0; ; attempt++ {
		idx, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("loopdev: LOOP_CTL_GET_FREE: %w", err)
		}
		path := "/dev/loop" + strconv.Itoa(idx)
		err = configure(path, &cfg)
		if err == nil {
			return &Device{Path: path, File: backingFile, Index: idx, ino: st.Ino, dev: st.Dev}, nil
		}
		// EBUSY: another process bound this index between GET_FREE and
		// CONFIGURE. Ask for a new free index.
		if !errors.Is(err, unix.EBUSY) || attempt+1 >= attachAttempts {
			return nil, fmt.Errorf("loopdev: attach %s to %s: %w", backingFile, path, err)
		}
		time.Sleep(busyRetryDelay)
	}
}

func configure(path string, cfg *unix.LoopConfig) error {
	if err := waitFor(path, settleTimeout); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlLoopConfigure(int(f.Fd()), cfg); err != nil {
		return fmt.Errorf("LOOP_CONFIGURE: %w", err)
	}
	return nil
}

// Create makes a sparse file of size bytes in dir and attaches it. Detach
// removes the file again.
func Create(dir string, size int64, opts Options) (*Device, error) {
	f, err := os.CreateTemp(dir, "lifeboat-loop-*.img")
	if err != nil {
		return nil, fmt.Errorf("loopdev: create backing file: %w", err)
	}
	name := f.Name()
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(name)
		return nil, fmt.Errorf("loopdev: size backing file: %w", err)
	}
	d, err := Attach(name, opts)
	if err != nil {
		os.Remove(name)
		return nil, err
	}
	d.ownsFile = true
	return d, nil
}

// New creates a size-byte loop device for a test, backed by a file in a
// test temporary directory, and detaches it in t.Cleanup. It calls
// testenv.RequireRoot.
func New(t testing.TB, size int64, opts Options) *Device {
	t.Helper()
	testenv.RequireRoot(t)
	d, err := Create(t.TempDir(), size, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Detach(); err != nil {
			t.Error(err)
		}
	})
	return d
}

// Detach unbinds the device and, if Create made the backing file, removes
// it. It returns once the kernel reports the device unbound, so the index
// is free for reuse. A device claimed exclusively (mounted, or used by
// device-mapper) is left untouched and Detach fails. Detach is idempotent.
func (d *Device) Detach() error {
	if err := d.clear(); err != nil {
		return err
	}
	if d.ownsFile {
		if err := os.Remove(d.File); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("loopdev: remove backing file: %w", err)
		}
		d.ownsFile = false
	}
	return nil
}

func (d *Device) clear() error {
	deadline := time.Now().Add(detachTimeout)
	for d.Bound() {
		err := clrFD(d.Path)
		switch {
		case err == nil, errors.Is(err, unix.ENXIO): // ENXIO: already unbound
		case errors.Is(err, unix.EBUSY):
			if time.Now().After(deadline) {
				return fmt.Errorf("loopdev: detach %s: device is in use (mounted?): %w", d.Path, err)
			}
		default:
			return fmt.Errorf("loopdev: detach %s: %w", d.Path, err)
		}
		// If other openers remain, the kernel defers the clear to the last
		// close (LO_FLAGS_AUTOCLEAR), so poll rather than trust the ioctl.
		if !d.Bound() {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("loopdev: detach %s: still bound after %v; another process holds it open and the kernel will clear it on last close", d.Path, detachTimeout)
		}
		time.Sleep(busyRetryDelay)
	}
	return nil
}

// clrFD issues LOOP_CLR_FD through an exclusive open: O_EXCL on a block
// device fails with EBUSY while a file system or device-mapper claims it,
// which stops us from merely arming a lazy auto-clear on a mounted device.
func clrFD(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
}

// Bound reports whether the device is still bound to its backing file:
// once detached, its index may be bound to another file (another test's),
// which is not this device.
func (d *Device) Bound() bool {
	f, err := os.OpenFile(d.Path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	return err == nil && info.Inode == d.ino && info.Device == d.dev
}

// PartitionPath returns the node of partition n (1-based) of device path,
// following the kernel's naming: a "p" separates the number when the
// device name ends in a digit ("/dev/loop0p1", but "/dev/sda1").
func PartitionPath(path string, n int) string {
	if path != "" && path[len(path)-1] >= '0' && path[len(path)-1] <= '9' {
		return path + "p" + strconv.Itoa(n)
	}
	return path + strconv.Itoa(n)
}

// waitFor polls until path exists. devtmpfs nodes appear without udev, but
// not necessarily by the time the ioctl that created them returns.
func waitFor(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := os.Stat(path)
		if err == nil || !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v", path, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// trimOutput shortens tool output for inclusion in an error.
func trimOutput(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 2000 {
		s = s[:2000] + "..."
	}
	return s
}

// Unbound makes a loop device node with nothing attached (as a detached
// device, or one a boot has not set up yet, is), at an index far above
// those Attach is handed, and removes it when t ends. Its size is 0.
func Unbound(t testing.TB) string {
	t.Helper()
	testenv.RequireRoot(t)
	ctl, err := os.OpenFile(controlPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("loopdev: %v", err)
	}
	defer ctl.Close()
	for idx := 4000 + os.Getpid()%1000; idx < 6000; idx++ {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), unix.LOOP_CTL_ADD, uintptr(idx))
		if errno == unix.EEXIST {
			continue
		}
		if errno != 0 {
			t.Fatalf("loopdev: LOOP_CTL_ADD %d: %v", idx, errno)
		}
		t.Cleanup(func() {
			c, err := os.OpenFile(controlPath, os.O_RDWR, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			if _, _, errno := unix.Syscall(unix.SYS_IOCTL, c.Fd(), unix.LOOP_CTL_REMOVE, uintptr(idx)); errno != 0 {
				t.Errorf("loopdev: LOOP_CTL_REMOVE %d: %v", idx, errno)
			}
		})
		path := "/dev/loop" + strconv.Itoa(idx)
		if err := waitFor(path, settleTimeout); err != nil {
			t.Fatalf("loopdev: %v", err)
		}
		return path
	}
	t.Fatal("loopdev: no free loop index from 4000 to 6000")
	return ""
}
