// Package blockdev answers questions about Linux block devices (size,
// sector size, device numbers, partition placement, identity) and reads
// them with O_DIRECT.
package blockdev

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the buffer alignment AlignedBuffer guarantees. It satisfies the
// O_DIRECT memory alignment of every logical block size Linux supports up
// to the page size.
const Align = 4096

// Dev is a block device number.
type Dev struct{ Major, Minor uint32 }

// String formats d as the kernel does in sysfs and mountinfo ("8:1").
func (d Dev) String() string { return fmt.Sprintf("%d:%d", d.Major, d.Minor) }

// Kernel returns the kernel-internal dev_t encoding (major<<20 | minor),
// which is what BPF programs see in bio->bi_bdev->bd_dev. It differs from
// the userspace encoding in stat(2)'s st_rdev.
func (d Dev) Kernel() uint32 { return d.Major<<20 | d.Minor&(1<<20-1) }

// DevT returns the device number of the block device node at path.
func DevT(path string) (Dev, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return Dev{}, fmt.Errorf("blockdev: %w", &os.PathError{Op: "stat", Path: path, Err: err})
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return Dev{}, fmt.Errorf("blockdev: %s is not a block device", path)
	}
	return Dev{unix.Major(st.Rdev), unix.Minor(st.Rdev)}, nil
}

// Device is an open block device. Its methods are safe for concurrent use;
// Close must not race with them.
type Device struct {
	path string
	f    *os.File // O_RDONLY|O_DIRECT; ioctls work on it too
	dev  Dev
	lbs  int
}

// Open opens the block device at path read-only with O_DIRECT. The open
// descriptor keeps a loop device from being detached until Close.
func Open(path string) (*Device, error) {
	dev, err := DevT(path)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("blockdev: %w", err)
	}
	lbs, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blockdev: BLKSSZGET %s: %w", path, err)
	}
	return &Device{path: path, f: f, dev: dev, lbs: lbs}, nil
}

// Close releases the device.
func (d *Device) Close() error { return d.f.Close() }

// Path returns the path the device was opened with.
func (d *Device) Path() string { return d.path }

// Dev returns the device number.
func (d *Device) Dev() Dev { return d.dev }

// KernelDev returns the kernel-internal device number; see Dev.Kernel.
func (d *Device) KernelDev() uint32 { return d.dev.Kernel() }

// LogicalBlockSize returns the logical block (sector) size in bytes, as
// read at Open. O_DIRECT offsets and lengths must be multiples of it.
func (d *Device) LogicalBlockSize() int { return d.lbs }

// Size returns the current size in bytes (BLKGETSIZE64). It is queried on
// every call because devices can be resized while open.
func (d *Device) Size() (int64, error) {
	var size uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, d.f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return 0, fmt.Errorf("blockdev: BLKGETSIZE64 %s: %w", d.path, errno)
	}
	if size == 0 {
		return 0, fmt.Errorf("blockdev: %s: %w", d.path, ErrNoMedia)
	}
	return int64(size), nil
}

// ErrNoMedia is Size's error for a device node with no disk behind it: a
// loop device not attached (or detached), a disconnected nbd device, an
// empty drive. Taken for a disk of 0 bytes, it would make a mirror or a
// replica of 0 bytes.
var ErrNoMedia = errors.New("no media (0 bytes: a loop device not attached, a disconnected nbd device or an empty drive)")

// ReadAtDirect reads len(p) bytes at off, bypassing the page cache, with
// io.ReaderAt semantics (io.EOF at the end of the device). off and len(p)
// must be multiples of LogicalBlockSize and p must start at an address
// aligned to it (use AlignedBuffer); otherwise it fails without reading.
func (d *Device) ReadAtDirect(p []byte, off int64) (int, error) {
	if off%int64(d.lbs) != 0 || len(p)%d.lbs != 0 {
		return 0, fmt.Errorf("blockdev: direct read of %d bytes at %d on %s: offset and length must be multiples of %d", len(p), off, d.path, d.lbs)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if uintptr(unsafe.Pointer(&p[0]))%uintptr(d.lbs) != 0 {
		return 0, fmt.Errorf("blockdev: direct read on %s: buffer not aligned to %d bytes (use AlignedBuffer)", d.path, d.lbs)
	}
	return d.f.ReadAt(p, off)
}

// AlignedBuffer returns a zeroed size-byte slice whose first byte is
// aligned to Align, suitable for O_DIRECT I/O. Its capacity equals its
// length, so appending reallocates (and loses the alignment).
func AlignedBuffer(size int) []byte {
	if size == 0 {
		return []byte{}
	}
	// Over-allocate and slice; the Go heap does not move objects.
	buf := make([]byte, size+Align)
	off := int(-uintptr(unsafe.Pointer(&buf[0])) & (Align - 1))
	return buf[off : off+size : off+size]
}

// Placement says where a device sits: a whole disk, or a partition of one.
type Placement struct {
	Name      string // kernel name, e.g. "loop0p1"
	Disk      string // kernel name of the whole disk; equals Name for a whole disk
	DiskDev   Dev    // device number of the whole disk
	Partition int    // partition number; 0 for a whole disk
	// Start is the partition's first sector on Disk, in 512-byte units
	// whatever the logical block size; 0 for a whole disk.
	Start int64
}

// StartBytes returns the partition's byte offset on its disk.
func (p Placement) StartBytes() int64 { return p.Start * 512 }

// Placement reads the device's position from sysfs.
func (d *Device) Placement() (Placement, error) {
	sys, err := filepath.EvalSymlinks("/sys/dev/block/" + d.dev.String())
	if err != nil {
		return Placement{}, fmt.Errorf("blockdev: sysfs entry for %s: %w", d.path, err)
	}
	p := Placement{Name: filepath.Base(sys), Disk: filepath.Base(sys), DiskDev: d.dev}
	part, err := readSysfs(sys, "partition")
	if errors.Is(err, os.ErrNotExist) {
		return p, nil // whole disk
	}
	if err != nil {
		return Placement{}, err
	}
	if p.Partition, err = strconv.Atoi(part); err != nil {
		return Placement{}, fmt.Errorf("blockdev: %s/partition: %w", sys, err)
	}
	start, err := readSysfs(sys, "start")
	if err != nil {
		return Placement{}, err
	}
	if p.Start, err = strconv.ParseInt(start, 10, 64); err != nil {
		return Placement{}, fmt.Errorf("blockdev: %s/start: %w", sys, err)
	}
	// A partition's sysfs directory sits inside its disk's.
	disk := filepath.Dir(sys)
	p.Disk = filepath.Base(disk)
	diskDev, err := readSysfs(disk, "dev")
	if err != nil {
		return Placement{}, err
	}
	if _, err := fmt.Sscanf(diskDev, "%d:%d", &p.DiskDev.Major, &p.DiskDev.Minor); err != nil {
		return Placement{}, fmt.Errorf("blockdev: %s/dev %q: %w", disk, diskDev, err)
	}
	return p, nil
}

// Identity returns a string that changes when the node no longer refers to
// the same underlying device: it combines the device number, size, the
// partition start, the disk's diskseq (bumped by the kernel on every
// media change or loop re-attach) and, for loop devices, the backing file.
// Compare identities; do not parse them.
func (d *Device) Identity() (string, error) {
	size, p, err := d.sizeAndPlacement()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "dev=%s size=%d", d.dev, size)
	if p.Partition != 0 {
		fmt.Fprintf(&b, " part=%d start=%d", p.Partition, p.Start)
	}
	disk := "/sys/block/" + p.Disk
	if seq, err := readSysfs(disk, "diskseq"); err == nil {
		fmt.Fprintf(&b, " diskseq=%s", seq)
	} else if !errors.Is(err, os.ErrNotExist) { // older kernels lack diskseq
		return "", err
	}
	if backing, err := readSysfs(disk, "loop/backing_file"); err == nil {
		fmt.Fprintf(&b, " loop=%q", backing)
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	return b.String(), nil
}

func (d *Device) sizeAndPlacement() (int64, Placement, error) {
	size, err := d.Size()
	if err != nil {
		return 0, Placement{}, err
	}
	p, err := d.Placement()
	return size, p, err
}

// StableID names the disk behind the node by what survives a reboot or a
// re-attach, which both change Identity (its device number and diskseq
// may change): the disk's WWID or serial number, or a loop device's
// backing file (path and inode number), with the partition, its start and the
// size. It is "" when the disk has none of them. Equal stable IDs say the
// same disk is likely back, not that its blocks are unchanged: callers
// compare the blocks rather than trust a bitmap.
func (d *Device) StableID() (string, error) {
	size, p, err := d.sizeAndPlacement()
	if err != nil {
		return "", err
	}
	disk := "/sys/block/" + p.Disk
	var id string
	for _, name := range []string{"wwid", "device/wwid", "serial", "device/serial"} {
		// An attribute that cannot be read is no ID: a SCSI disk without
		// VPD page 0x83 (a USB stick) fails device/wwid with ENXIO.
		if v, err := readSysfs(disk, name); err == nil && v != "" {
			id = name + "=" + strconv.Quote(v)
			break
		}
	}
	if backing, err := readSysfs(disk, "loop/backing_file"); err == nil {
		var st unix.Stat_t
		if err := unix.Stat(backing, &st); err != nil {
			return "", nil // the backing file is gone or renamed: nothing stable
		}
		// Not its file system's device number, which a reboot may change
		// (btrfs's are allocated at mount).
		id = fmt.Sprintf("loop=%q ino=%d", backing, st.Ino)
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if id == "" {
		return "", nil
	}
	if p.Partition != 0 {
		id += fmt.Sprintf(" part=%d start=%d", p.Partition, p.Start)
	}
	return fmt.Sprintf("%s size=%d", id, size), nil
}

// InflightWrites returns the number of write requests the kernel counts
// as in flight on device dev (sysfs inflight; for blk-mq, requests the
// driver has started).
func InflightWrites(dev Dev) (int, error) {
	v, err := readSysfs("/sys/dev/block/"+dev.String(), "inflight")
	if err != nil {
		return 0, err
	}
	var r, w int
	if _, err := fmt.Sscan(v, &r, &w); err != nil {
		return 0, fmt.Errorf("blockdev: %s inflight %q: %w", dev, v, err)
	}
	return w, nil
}

// DevOf is the inverse of Dev.Kernel.
func DevOf(kernel uint32) Dev { return Dev{Major: kernel >> 20, Minor: kernel & (1<<20 - 1)} }

// Zoned reports the device's zone model ("host-managed" or "host-aware")
// and "" for a conventional device (or a kernel that does not say).
func (d *Device) Zoned() (string, error) {
	p, err := d.Placement()
	if err != nil {
		return "", err
	}
	z, err := readSysfs("/sys/block/"+p.Disk+"/queue", "zoned")
	if errors.Is(err, os.ErrNotExist) || z == "none" {
		return "", nil
	}
	return z, err
}

// InlineEncryption reports whether the device's disk encrypts in hardware
// (queue/crypto: UFS and eMMC controllers, used by fscrypt's inlinecrypt).
// Its writes then carry plaintext in memory and land as ciphertext, which
// only a read from the device returns.
func (d *Device) InlineEncryption() (bool, error) {
	p, err := d.Placement()
	if err != nil {
		return false, err
	}
	_, err = os.Stat("/sys/block/" + p.Disk + "/queue/crypto")
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func readSysfs(dir, name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return "", fmt.Errorf("blockdev: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// StatfsUnit is the unit of st's block counts (f_blocks, f_bfree,
// f_bavail): the fragment size, which file systems such as NFS or FUSE
// may set apart from f_bsize (their preferred I/O size).
func StatfsUnit(st *unix.Statfs_t) int64 {
	if st.Frsize > 0 {
		return st.Frsize
	}
	return st.Bsize
}
