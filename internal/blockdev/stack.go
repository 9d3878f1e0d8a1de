package blockdev

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// FileSystemDev returns the device number of the file system holding path
// (st_dev), or of its nearest existing ancestor when path does not exist
// yet. File systems without a block device of their own (tmpfs, overlay,
// NFS, btrfs) have major number 0: Lower knows nothing below them.
func FileSystemDev(path string) (Dev, error) {
	p := filepath.Clean(path)
	for {
		var st unix.Stat_t
		err := unix.Stat(p, &st)
		if err == nil {
			return Dev{unix.Major(st.Dev), unix.Minor(st.Dev)}, nil
		}
		if !errors.Is(err, unix.ENOENT) || p == "/" || p == "." {
			return Dev{}, fmt.Errorf("blockdev: %w", &os.PathError{Op: "stat", Path: p, Err: err})
		}
		p = filepath.Dir(p)
	}
}

// Lower returns dev and every block device that I/O to dev reaches below
// it: the members of a device-mapper or md device (sysfs slaves), the
// device whose file system holds a loop device's backing file, and theirs
// in turn. A partition's disk is not listed (other partitions of it are
// other blocks; Overlaps knows the relation). What sysfs cannot tell ends
// a branch: a backing file on tmpfs, overlay or NFS, a device with no
// sysfs entry.
func Lower(dev Dev) []Dev {
	var out []Dev
	seen := map[Dev]bool{}
	var walk func(d Dev)
	walk = func(d Dev) {
		if d.Major == 0 || seen[d] {
			return
		}
		seen[d] = true
		out = append(out, d)
		sys, err := filepath.EvalSymlinks("/sys/dev/block/" + d.String())
		if err != nil {
			return
		}
		slaves, _ := os.ReadDir(filepath.Join(sys, "slaves"))
		for _, s := range slaves {
			if v, err := readSysfs(filepath.Join(sys, "slaves", s.Name()), "dev"); err == nil {
				if sd, ok := parseDev(v); ok {
					walk(sd)
				}
			}
		}
		if backing, err := readSysfs(sys, "loop/backing_file"); err == nil {
			// A backing file renamed or deleted since is not followed.
			if fd, err := FileSystemDev(strings.TrimSuffix(backing, " (deleted)")); err == nil {
				walk(fd)
			}
		}
	}
	walk(dev)
	return out
}

// Overlaps reports whether I/O to a can reach blocks of b: b is in
// Lower(a), or one of those is b's whole disk or a partition of b. It
// returns the device of Lower(a) that does. A sibling partition of b does
// not overlap it.
func Overlaps(a, b Dev) (Dev, bool) {
	bDisk, bPart := diskOf(b)
	for _, x := range Lower(a) {
		xDisk, xPart := diskOf(x)
		switch {
		case x == b,
			bPart && x == bDisk, // x is b's whole disk
			xPart && xDisk == b: // x is a partition of b
			return x, true
		}
	}
	return Dev{}, false
}

// Disks returns the whole disks dev lies on (Lower, partitions taken as
// their disk): losing one of them loses dev.
func Disks(dev Dev) []Dev {
	var out []Dev
	for _, x := range Lower(dev) {
		if d, _ := diskOf(x); !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// Name returns the kernel name of dev ("sda1", "dm-0"), or its numbers
// when sysfs has no entry for it.
func Name(dev Dev) string {
	sys, err := filepath.EvalSymlinks("/sys/dev/block/" + dev.String())
	if err != nil {
		return dev.String()
	}
	return filepath.Base(sys)
}

// diskOf returns the whole disk of a partition (and true), or dev itself.
func diskOf(dev Dev) (Dev, bool) {
	sys, err := filepath.EvalSymlinks("/sys/dev/block/" + dev.String())
	if err != nil {
		return dev, false
	}
	if _, err := os.Stat(filepath.Join(sys, "partition")); err != nil {
		return dev, false
	}
	v, err := readSysfs(filepath.Dir(sys), "dev")
	if err != nil {
		return dev, false
	}
	if d, ok := parseDev(v); ok {
		return d, true
	}
	return dev, false
}

func parseDev(s string) (Dev, bool) {
	var d Dev
	_, err := fmt.Sscanf(s, "%d:%d", &d.Major, &d.Minor)
	return d, err == nil
}
