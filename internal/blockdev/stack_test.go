package blockdev_test

import (
	"path/filepath"
	"slices"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// A loop device backed by a file on a partition's file system reaches
// that partition (and so its disk), not the sibling partition; two loop
// devices backed on tmpfs share nothing sysfs can see.
func TestLowerOverlapsSameDisk(t *testing.T) {
	testenv.RequireTool(t, "sfdisk")
	testenv.RequireTool(t, "mkfs.ext4")
	disk := loopdev.New(t, 64*mib, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(t.Context(), disk.Path, loopdev.MBR, []loopdev.PartSpec{{Size: 24 * mib}, {Size: 0}})
	if err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Mkfs(t.Context(), "ext4", parts[0]); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := loopdev.Mount(parts[0], mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	stacked, err := loopdev.Create(mnt, 8*mib, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stacked.Detach() })
	dev := func(path string) blockdev.Dev {
		t.Helper()
		d, err := blockdev.DevT(path)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	D, p1, p2, S := dev(disk.Path), dev(parts[0]), dev(parts[1]), dev(stacked.Path)

	if fs, err := blockdev.FileSystemDev(filepath.Join(mnt, "not", "yet")); err != nil || fs != p1 {
		t.Errorf("FileSystemDev under the mount = %v, %v; want %v", fs, err, p1)
	}
	if l := blockdev.Lower(S); len(l) < 2 || l[0] != S || !slices.Contains(l, p1) || slices.Contains(l, p2) {
		t.Errorf("Lower(%v) = %v; want %v first, with %v and without %v", S, l, S, p1, p2)
	}
	for _, c := range []struct {
		name string
		a, b blockdev.Dev
		want bool
	}{
		{"stacked loop on p1", S, p1, true},
		{"stacked loop on its disk", S, D, true},
		{"stacked loop on the sibling partition", S, p2, false},
		{"sibling partitions", p2, p1, false},
		{"disk on its partition", D, p1, true},
		{"partition on its disk", p1, D, true},
		{"p1 on the stacked loop above it", p1, S, false},
	} {
		if _, got := blockdev.Overlaps(c.a, c.b); got != c.want {
			t.Errorf("%s: Overlaps(%v, %v) = %v, want %v", c.name, c.a, c.b, got, c.want)
		}
	}
	// All of them lie on the disk holding the loop disk's backing file
	// (itself, if that is tmpfs).
	if dd := blockdev.Disks(D); len(dd) != 1 || !slices.Equal(blockdev.Disks(S), dd) || !slices.Equal(blockdev.Disks(p2), dd) {
		t.Errorf("Disks: loop disk %v, stacked loop %v, p2 %v; want one and the same", dd, blockdev.Disks(S), blockdev.Disks(p2))
	}
	// A partition of a stacked device lies on what the device does.
	if err := loopdev.Mkfs(t.Context(), "ext4", parts[1]); err != nil {
		t.Fatal(err)
	}
	mnt2 := t.TempDir()
	if err := loopdev.Mount(parts[1], mnt2, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt2) })
	img, err := loopdev.Create(mnt2, 8*mib, loopdev.Options{PartScan: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Detach() })
	imgParts, err := loopdev.Partition(t.Context(), img.Path, loopdev.MBR, []loopdev.PartSpec{{Size: 0}})
	if err != nil {
		t.Fatal(err)
	}
	if via, ok := blockdev.Overlaps(dev(imgParts[0]), p2); !ok || via != p2 {
		t.Errorf("Overlaps(partition of a loop device backed on p2, p2) = %v, %v; want through p2", via, ok)
	}
	if _, ok := blockdev.Overlaps(dev(imgParts[0]), p1); ok {
		t.Error("a partition of a loop device backed on p2 overlaps p1")
	}
	if got := blockdev.Name(p1); got != filepath.Base(parts[0]) {
		t.Errorf("Name(%v) = %q, want %q", p1, got, filepath.Base(parts[0]))
	}

	// Backing files on tmpfs: nothing below the loop devices is known.
	a, err := loopdev.Create("/dev/shm", mib, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Detach() })
	b, err := loopdev.Create("/dev/shm", mib, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Detach() })
	if da, db := blockdev.Disks(dev(a.Path)), blockdev.Disks(dev(b.Path)); len(da) != 1 || len(db) != 1 || da[0] == db[0] {
		t.Errorf("loop devices backed on tmpfs lie on disks %v and %v; want only themselves", da, db)
	}
}

// btrfs reports an anonymous st_dev per subvolume: the file system's
// device is found through its mount, and a loop device backed on it lies
// on that device.
func TestFileSystemDevBtrfs(t *testing.T) {
	testenv.RequireTool(t, "mkfs.btrfs")
	disk := loopdev.New(t, 128*mib, loopdev.Options{})
	if err := loopdev.Mkfs(t.Context(), "btrfs", disk.Path); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := loopdev.Mount(disk.Path, mnt, "btrfs", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	want, err := blockdev.DevT(disk.Path)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := blockdev.FileSystemDev(filepath.Join(mnt, "not", "yet")); err != nil || got != want {
		t.Fatalf("FileSystemDev on btrfs = %v, %v; want %v", got, err, want)
	}
	stacked, err := loopdev.Create(mnt, 8*mib, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stacked.Detach() })
	s, err := blockdev.DevT(stacked.Path)
	if err != nil {
		t.Fatal(err)
	}
	if via, ok := blockdev.Overlaps(s, want); !ok || via != want {
		t.Fatalf("Overlaps(loop backed on btrfs, its device) = %v, %v; want through %v", via, ok, want)
	}
}
