package blockdev

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// FileSystemDev returns the device number of the file system holding path
// (st_dev), or of its nearest existing ancestor when path does not exist
// yet. A file system that reports an anonymous device number (major 0) is
// looked up by its mount: btrfs gives each subvolume one of its own, and
// is mounted from a block device (the one mountinfo names: of a
// multi-device btrfs, one of them); tmpfs, overlay, NFS and ZFS have none
// and keep major 0 (Lower knows nothing below them).
func FileSystemDev(path string) (Dev, error) {
	p := filepath.Clean(path)
	for {
		var st unix.Stat_t
		err := unix.Stat(p, &st)
		if err == nil {
			d := Dev{unix.Major(st.Dev), unix.Minor(st.Dev)}
			if d.Major == 0 {
				var sx unix.Statx_t
				if unix.Statx(unix.AT_FDCWD, p, 0, unix.STATX_MNT_ID, &sx) == nil && sx.Mask&unix.STATX_MNT_ID != 0 {
					if src := mountSource(func(f []string) bool { return f[0] == strconv.FormatUint(sx.Mnt_id, 10) }); src.Major != 0 {
						return src, nil
					}
				}
			}
			return d, nil
		}
		if !errors.Is(err, unix.ENOENT) || p == "/" || p == "." {
			return Dev{}, fmt.Errorf("blockdev: %w", &os.PathError{Op: "stat", Path: p, Err: err})
		}
		p = filepath.Dir(p)
	}
}

// Lower returns the block devices that I/O to dev reaches: dev itself,
// then what lies below it, recursively (see below). A partition's disk is
// not listed: its other partitions are other blocks (Overlaps knows the
// relation). What sysfs cannot tell ends a branch: a loop device backed on
// tmpfs, overlay or NFS, a device with no sysfs entry.
func Lower(dev Dev) []Dev {
	var out []Dev
	walk(dev, false, func(d Dev, _ []Dev) { out = append(out, d) })
	return out
}

// Disks returns the disks that dev lies on, partitions taken as their
// disk: losing one of them loses dev. Device mapper, md RAID 0 and loop
// devices are followed down to what they are built on; a redundant md
// array (RAID 1, 4, 5, 6, 10) is one disk of its own, since losing one of
// its members loses nothing.
func Disks(dev Dev) []Dev {
	var out []Dev
	walk(dev, true, func(d Dev, under []Dev) {
		if len(under) > 0 {
			return
		}
		if disk, _ := diskOf(d); !slices.Contains(out, disk) {
			out = append(out, disk)
		}
	})
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

// Name returns the kernel name of dev ("sda1", "dm-0"), or its numbers
// when sysfs has no entry for it.
func Name(dev Dev) string {
	sys, err := filepath.EvalSymlinks("/sys/dev/block/" + dev.String())
	if err != nil {
		return dev.String()
	}
	return filepath.Base(sys)
}

// walk calls visit for dev and everything below it, depth first, each
// device once, with the devices directly below it; redundant md arrays
// are leaves when asked (below). A file system's anonymous device number
// (major 0) is replaced by the block device it is mounted from, when it
// has one (btrfs: the device in mountinfo).
func walk(dev Dev, redundantLeaves bool, visit func(d Dev, under []Dev)) {
	seen := map[Dev]bool{}
	var rec func(d Dev)
	rec = func(d Dev) {
		if d.Major == 0 {
			if d = mountSourceOf(d); d.Major == 0 {
				return
			}
		}
		if seen[d] {
			return
		}
		seen[d] = true
		under := below(d, redundantLeaves)
		visit(d, under)
		for _, u := range under {
			rec(u)
		}
	}
	rec(dev)
}

// below returns the devices directly under d: the members of a device
// mapper or md device (sysfs slaves; none for a redundant md array when
// redundantLeaves), the file system holding a loop device's backing file.
// For a partition, those of its disk (a partition of a loop or md device
// lies on what they do).
func below(d Dev, redundantLeaves bool) []Dev {
	sys, err := filepath.EvalSymlinks("/sys/dev/block/" + d.String())
	if err != nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(sys, "partition")); err == nil {
		sys = filepath.Dir(sys)
	}
	if level, err := readSysfs(sys, "md/level"); redundantLeaves && err == nil && level != "raid0" && level != "linear" {
		return nil // a member's loss is not the array's
	}
	var out []Dev
	slaves, _ := os.ReadDir(filepath.Join(sys, "slaves"))
	for _, s := range slaves {
		if v, err := readSysfs(filepath.Join(sys, "slaves", s.Name()), "dev"); err == nil {
			if sd, ok := parseDev(v); ok {
				out = append(out, sd)
			}
		}
	}
	if b, ok := loopBacking(sys); ok && b.Major != 0 {
		out = append(out, b)
	}
	return out
}

// loopBacking returns the device of the file system holding the backing
// file of the loop device at sysfs path sys. The kernel's own answer
// (LOOP_GET_STATUS64) is taken over the backing file's path, which may
// name another file by now (renamed, lazily unmounted, another mount
// namespace); a path that no longer exists is not followed.
func loopBacking(sys string) (Dev, bool) {
	backing, err := readSysfs(sys, "loop/backing_file")
	if err != nil {
		return Dev{}, false
	}
	path := strings.TrimSuffix(backing, " (deleted)")
	if f, err := os.Open("/dev/" + filepath.Base(sys)); err == nil {
		info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
		f.Close()
		if err == nil {
			d := Dev{unix.Major(info.Device), unix.Minor(info.Device)}
			if d.Major == 0 {
				// Anonymous (btrfs, tmpfs): by the path's mount, if the
				// path still names a file of that file system.
				var st unix.Stat_t
				if unix.Stat(path, &st) == nil && st.Dev == info.Device {
					d, _ = FileSystemDev(path)
				}
			}
			return d, true
		}
	}
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return Dev{}, false
	}
	d, err := FileSystemDev(path)
	return d, err == nil
}

// mountSourceOf returns the block device the file system with the
// anonymous device number dev is mounted from, when mountinfo shows that
// number (it does not for btrfs, whose subvolumes have numbers of their
// own: FileSystemDev goes by the mount instead), or the zero Dev.
func mountSourceOf(dev Dev) Dev {
	return mountSource(func(f []string) bool { return f[2] == dev.String() })
}

// mountSource returns the block device that the first mountinfo entry
// match accepts is mounted from, or the zero Dev (none, or no block
// device: tmpfs, overlay, NFS, ZFS).
func mountSource(match func(fields []string) bool) Dev {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return Dev{}
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options... - fstype source superoptions
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 || !match(fields) {
			continue
		}
		i := slices.Index(fields, "-")
		if i < 0 || i+2 >= len(fields) || !strings.HasPrefix(fields[i+2], "/dev/") {
			return Dev{}
		}
		if d, err := DevT(fields[i+2]); err == nil {
			return d
		}
		return Dev{}
	}
	return Dev{}
}

// OnDevtmpfs reports whether dir is on devtmpfs (/dev, but not a tmpfs
// mounted below it such as /dev/shm): a file made there lives in memory
// and takes the name of a device node not created yet.
func OnDevtmpfs(dir string) bool {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return false
	}
	dev := Dev{unix.Major(st.Dev), unix.Minor(st.Dev)}.String()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		i := slices.Index(fields, "-")
		if len(fields) > 2 && fields[2] == dev && i > 0 && i+1 < len(fields) {
			return fields[i+1] == "devtmpfs"
		}
	}
	return false
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

// LoopsBackedBy returns the loop devices ("/dev/loop3") that can write
// to the file fi describes (their backing file, not read-only), by the kernel's own answer (device and
// inode), whatever path they were attached by.
func LoopsBackedBy(fi os.FileInfo) []string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	loops, _ := filepath.Glob("/sys/block/loop*")
	var out []string
	for _, sys := range loops {
		if _, err := os.Stat(filepath.Join(sys, "loop", "backing_file")); err != nil {
			continue // not attached
		}
		f, err := os.Open("/dev/" + filepath.Base(sys))
		if err != nil {
			continue
		}
		info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
		f.Close()
		// Read-only attachments (losetup -r, to look at a copy) write
		// nothing.
		if err == nil && info.Device == st.Dev && info.Inode == st.Ino && info.Flags&unix.LO_FLAGS_READ_ONLY == 0 {
			out = append(out, "/dev/"+filepath.Base(sys))
		}
	}
	return out
}
