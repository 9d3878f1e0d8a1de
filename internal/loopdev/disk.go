package loopdev

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Table is a partition table type, named as sfdisk's "label:" expects.
type Table string

const (
	GPT Table = "gpt"
	MBR Table = "dos"
)

// PartSpec describes one partition for Partition.
type PartSpec struct {
	// Size in bytes, a multiple of 1024. 0 means "the rest of the disk" and
	// is only valid for the last partition. sfdisk aligns starts to 1 MiB.
	Size int64
	// Type is an sfdisk type shortcut or GUID/MBR code; "" means "linux".
	Type string
}

// Partition writes a fresh partition table with parts to the block device
// dev using sfdisk (util-linux), makes the kernel use it and waits until
// the partition nodes exist. It returns their paths in order. Existing
// signatures on the device are wiped. Loop devices must be attached with
// Options.PartScan.
//
// The kernel is told with BLKRRPART, and any partition that did not appear
// is then added explicitly with BLKPG, because kernels built without
// partition table parsers (CONFIG_EFI_PARTITION, CONFIG_MSDOS_PARTITION)
// find nothing on a re-read.
func Partition(ctx context.Context, dev string, table Table, parts []PartSpec) ([]string, error) {
	if len(parts) == 0 {
		return nil, errors.New("loopdev: partition: no partitions given")
	}
	var script strings.Builder
	fmt.Fprintf(&script, "label: %s\n", table)
	for i, p := range parts {
		typ := p.Type
		if typ == "" {
			typ = "linux"
		}
		switch {
		case p.Size == 0 && i != len(parts)-1:
			return nil, fmt.Errorf("loopdev: partition %d: size 0 (rest of disk) is only valid for the last partition", i+1)
		case p.Size%1024 != 0 || p.Size < 0:
			return nil, fmt.Errorf("loopdev: partition %d: size %d is not a positive multiple of 1024", i+1, p.Size)
		case p.Size == 0:
			fmt.Fprintf(&script, "type=%s\n", typ)
		default:
			fmt.Fprintf(&script, "size=%dKiB, type=%s\n", p.Size/1024, typ)
		}
	}

	// We re-read the table ourselves below, with retries, instead of
	// letting sfdisk try once.
	cmd := exec.CommandContext(ctx, "sfdisk", "--quiet", "--no-reread", "--no-tell-kernel",
		"--wipe", "always", "--wipe-partitions", "always", dev)
	cmd.Stdin = strings.NewReader(script.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("loopdev: sfdisk %s: %w: %s", dev, err, trimOutput(out))
	}
	if err := rereadPartitions(dev); err != nil {
		return nil, err
	}
	if err := addMissingPartitions(ctx, dev); err != nil {
		return nil, err
	}

	paths := make([]string, len(parts))
	for i := range parts {
		paths[i] = PartitionPath(dev, i+1)
		if err := waitFor(paths[i], settleTimeout); err != nil {
			return nil, fmt.Errorf("loopdev: partition node: %w", err)
		}
	}
	return paths, nil
}

func rereadPartitions(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: %w", err)
	}
	defer f.Close()
	deadline := time.Now().Add(settleTimeout)
	for {
		err := unix.IoctlSetInt(int(f.Fd()), unix.BLKRRPART, 0)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINVAL):
			return fmt.Errorf("loopdev: BLKRRPART %s: %w (loop devices need Options.PartScan)", dev, err)
		case errors.Is(err, unix.EBUSY) && time.Now().Before(deadline):
			// A partition is briefly open (e.g. udev probing); retry.
			time.Sleep(busyRetryDelay)
		default:
			return fmt.Errorf("loopdev: BLKRRPART %s: %w", dev, err)
		}
	}
}

// addMissingPartitions adds, with BLKPG_ADD_PARTITION, each partition in
// dev's table that the kernel did not pick up on its own.
func addMissingPartitions(ctx context.Context, dev string) error {
	out, err := exec.CommandContext(ctx, "sfdisk", "--json", dev).Output()
	if err != nil {
		return fmt.Errorf("loopdev: sfdisk --json %s: %w", dev, err)
	}
	var dump struct {
		Table struct {
			SectorSize int64 `json:"sectorsize"`
			Partitions []struct {
				Node  string `json:"node"`
				Start int64  `json:"start"`
				Size  int64  `json:"size"`
			} `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal(out, &dump); err != nil {
		return fmt.Errorf("loopdev: parse sfdisk --json %s: %w", dev, err)
	}

	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: %w", err)
	}
	defer f.Close()
	sys := "/sys/class/block/"
	for i, p := range dump.Table.Partitions {
		if _, err := os.Stat(sys + filepath.Base(p.Node)); err == nil {
			continue // the kernel parsed it itself
		}
		part := unix.BlkpgPartition{
			Start:  p.Start * dump.Table.SectorSize,
			Length: p.Size * dump.Table.SectorSize,
			Pno:    int32(i + 1),
		}
		arg := unix.BlkpgIoctlArg{
			Op:      unix.BLKPG_ADD_PARTITION,
			Datalen: int32(unsafe.Sizeof(part)),
			Data:    (*byte)(unsafe.Pointer(&part)),
		}
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKPG, uintptr(unsafe.Pointer(&arg)))
		if errno != 0 {
			return fmt.Errorf("loopdev: BLKPG add partition %d on %s: %w", i+1, dev, errno)
		}
	}
	return nil
}

// Mkfs creates a file system of type fstype ("ext4", "xfs" or "btrfs")
// on dev, overwriting whatever is there. extraArgs are passed to mkfs
// before dev.
func Mkfs(ctx context.Context, fstype, dev string, extraArgs ...string) error {
	var args []string
	switch fstype {
	case "ext4":
		args = []string{"-F", "-q"}
	case "xfs", "btrfs":
		args = []string{"-f", "-q"}
	default:
		return fmt.Errorf("loopdev: mkfs: unsupported file system type %q (want ext4, xfs or btrfs)", fstype)
	}
	args = append(append(args, extraArgs...), dev)
	out, err := exec.CommandContext(ctx, "mkfs."+fstype, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("loopdev: mkfs.%s %s: %w: %s", fstype, dev, err, trimOutput(out))
	}
	return nil
}

// mountFlags are the generic options Mount translates to MS_* flags; all
// other options are passed to the file system as data.
var mountFlags = map[string]uintptr{
	"ro":      unix.MS_RDONLY,
	"nosuid":  unix.MS_NOSUID,
	"nodev":   unix.MS_NODEV,
	"noexec":  unix.MS_NOEXEC,
	"sync":    unix.MS_SYNCHRONOUS,
	"noatime": unix.MS_NOATIME,
}

// Mount mounts dev on dir (created if missing) as fstype. opts is a
// comma-separated option list as for mount(8); ro, nosuid, nodev, noexec,
// sync and noatime become mount flags, the rest is file-system data.
func Mount(dev, dir, fstype, opts string) error {
	var flags uintptr
	var data []string
	for _, o := range strings.Split(opts, ",") {
		if o == "" {
			continue
		}
		if f, ok := mountFlags[o]; ok {
			flags |= f
		} else {
			data = append(data, o)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("loopdev: mount: %w", err)
	}
	if err := unix.Mount(dev, dir, fstype, flags, strings.Join(data, ",")); err != nil {
		return fmt.Errorf("loopdev: mount %s on %s (%s): %w", dev, dir, fstype, err)
	}
	return nil
}

// Unmount unmounts dir, retrying briefly while it is busy (a just-closed
// file may still pin it for a moment).
func Unmount(dir string) error {
	deadline := time.Now().Add(settleTimeout)
	for {
		err := unix.Unmount(filepath.Clean(dir), 0)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("loopdev: unmount %s: %w", dir, err)
		}
		time.Sleep(busyRetryDelay)
	}
}
