package cache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestMarkerMountPoints(t *testing.T) {
	for _, m := range []marker{
		{cache: strings.Repeat("ab", 16), slot: 1, n: 3, mounts: []string{"", "/mnt/d1", "/mnt/d 2\"x\""}},
		{cache: strings.Repeat("cd", 16), slot: 0, n: 2, mounts: []string{"", ""}},
		{cache: strings.Repeat("ef", 16), slot: 2, n: 3}, // written before mount points were recorded
	} {
		got, err := parseMarker([]byte(m.String()))
		if err != nil {
			t.Fatalf("%q: %v", m.String(), err)
		}
		if got.cache != m.cache || got.slot != m.slot || got.n != m.n || !slices.Equal(got.mounts, m.mounts) ||
			(got.mounts == nil) != (m.mounts == nil) {
			t.Errorf("%q parsed as %+v", m.String(), got)
		}
	}
	early := "lifeboat-cache v1\ncache " + strings.Repeat("ab", 16) + "\nslot 0 of 3\nmount points 0,2\n"
	if m, err := parseMarker([]byte(early)); err != nil || m.mounts != nil {
		t.Errorf("marker with a mount points line: %+v, %v", m, err)
	}
	for _, bad := range []string{"mounts recorded\nmount 3 \"/x\"", "mounts recorded\nmount x \"/x\"",
		"mounts recorded\nmount 1 /x", "mounts recorded\nmount 1 \"x\"", "mount 1 \"/x\""} {
		b := "lifeboat-cache v1\ncache " + strings.Repeat("ab", 16) + "\nslot 0 of 3\n" + bad + "\n"
		if _, err := parseMarker([]byte(b)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// mountDisk mounts an empty tmpfs, a fresh disk, on dir.
func mountDisk(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64m"); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// threeDirsOneMounted returns three cache directories of which the second
// is a mount point, and the disk mounted there (its content, to bind again
// after an unmount).
func threeDirsOneMounted(t *testing.T) (dirs []string, backing string) {
	t.Helper()
	testenv.RequireRoot(t)
	dirs = tempDirs(t, 3)
	backing = filepath.Join(t.TempDir(), "disk1")
	mountDisk(t, backing)
	if err := os.MkdirAll(dirs[1], 0o750); err != nil {
		t.Fatal(err)
	}
	bindDisk(t, backing, dirs[1])
	return dirs, backing
}

// bindDisk mounts backing (a disk's content) on dir.
func bindDisk(t *testing.T, backing, dir string) {
	t.Helper()
	if err := unix.Mount(backing, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s on %s: %v", backing, dir, err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// A cache disk that is not mounted must not take shards in the directory
// below its mount point: a Put fails with a clear error (nothing is
// acknowledged, so nothing is lost) and Open refuses to start. Mounted
// again, it is scrubbed for what it missed; a fresh disk mounted there
// instead is rebuilt.
func TestUnmountedDisk(t *testing.T) {
	dirs, backing := threeDirsOneMounted(t)
	c := open(t, dirs, Options{})
	a, b := payload(300<<10, 1), payload(200<<10, 2)
	idA, idB, idC := SegmentID{"m", 1}, SegmentID{"m", 2}, SegmentID{"m", 3}
	if err := c.Put(idA, a); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(idC, b); err != nil {
		t.Fatal(err)
	}
	if mk, err := os.ReadFile(filepath.Join(dirs[0], markerName)); err != nil || !strings.Contains(string(mk), fmt.Sprintf("mount 1 %q\n", dirs[1])) {
		t.Fatalf("marker %q (%v) does not record the mount point", mk, err)
	}

	if err := unix.Unmount(dirs[1], unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	// Its shard 0 gone too, idA needs shard 1, looked for below the
	// mount point: it cannot be read now, but is not lost.
	if err := os.Remove(c.shardPath(0, idA)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(idA); !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnrecoverable) || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("get needing the unmounted disk: %v, want ErrUnavailable naming it", err)
	}
	if err := c.Put(idB, b); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("put with a disk unmounted: %v", err)
	}
	// Past the grace of the last check, a Put sees the disk gone before
	// it writes anything.
	time.Sleep(mountCheckFor)
	idD := SegmentID{"m", 4}
	if err := c.Put(idD, b); err == nil || !strings.Contains(err.Error(), "directories can take shards") {
		t.Fatalf("put with a disk unmounted: %v", err)
	}
	for _, d := range []string{dirs[0], dirs[2]} {
		if _, err := os.Stat(filepath.Join(d, "m", segName(idD.Seq))); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("the failed put left a shard in %s (%v)", d, err)
		}
	}
	if err := c.Delete(idC); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("delete with a disk unmounted: %v", err)
	}
	lost, err := c.CheckDirs()
	if len(lost) != 0 || err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Errorf("CheckDirs with a disk unmounted: lost %v, %v", lost, err)
	}
	if _, err := c.Scrub(context.Background()); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Errorf("scrub with a disk unmounted: %v", err) // its repairs cannot be written
	}
	if ents, err := os.ReadDir(dirs[1]); err != nil || len(ents) != 0 {
		t.Fatalf("the directory below the mount point holds %v (%v)", ents, err)
	}
	if _, err := Open(dirs, Options{}); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("Open with a disk unmounted: %v", err)
	}

	// Mounted again: what it missed is found by the next check's scrub.
	bindDisk(t, backing, dirs[1])
	if lost, err := c.CheckDirs(); err != nil || !slices.Equal(lost, dirs[1:2]) {
		t.Fatalf("CheckDirs after the disk is back: lost %v (want %v), %v", lost, dirs[1:2], err)
	}
	if err := c.Delete(idC); err != nil { // the caller's retry
		t.Fatal(err)
	}
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(idB, b); err != nil {
		t.Fatal(err)
	}
	if ids, err := c.List("m"); err != nil || !slices.Equal(ids, []SegmentID{idA, idB}) {
		t.Fatalf("List = %v (%v), want %v", ids, err, []SegmentID{idA, idB})
	}
	wipe(t, dirs[2]) // shard 1 now needed to read
	if lost, err := c.CheckDirs(); err != nil || !slices.Equal(lost, dirs[2:]) {
		t.Fatalf("CheckDirs after a wipe: lost %v, %v", lost, err)
	}
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, idA, a)
	mustGet(t, c, idB, b)

	// An empty disk mounted in its place is adopted and rebuilt.
	if err := unix.Unmount(dirs[1], unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	mountDisk(t, dirs[1])
	c = reopen(t, c, Options{})
	if got := c.Replaced(); !slices.Equal(got, dirs[1:2]) {
		t.Fatalf("Replaced = %v, want %v", got, dirs[1:2])
	}
	if _, err := c.Scrub(context.Background()); err != nil {
		t.Fatal(err)
	}
	wipe(t, dirs[0])
	mustGet(t, c, idA, a)
	mustGet(t, c, idB, b)
}

// A cache whose markers predate mount points gets them recorded at Open.
func TestMountPointsRecordedForOlderCache(t *testing.T) {
	testenv.RequireRoot(t)
	dirs := tempDirs(t, 3)
	mountDisk(t, dirs[2])
	c := open(t, dirs, Options{})
	writeMarkers(t, dirs, func(i int) marker { return marker{cache: strings.Repeat("12", 16), slot: i, n: 3} })
	reopen(t, c, Options{})
	wantMountRecorded(t, dirs, 2)
	if err := unix.Unmount(dirs[2], unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dirs, Options{}); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("Open with a disk unmounted: %v", err)
	}
}

// Markers that lack the record while another has it (an Open that
// stopped half way, an older binary's rebuild) get it; markers of an older
// cache with a directory unmarked (a disk perhaps not mounted) are left
// as they are, so as not to record it as no mount point for good.
func TestMountPointsPartialRecord(t *testing.T) {
	testenv.RequireRoot(t)
	dirs := tempDirs(t, 3)
	mountDisk(t, dirs[0])
	c := open(t, dirs, Options{})
	id := strings.Repeat("34", 16)
	writeMarkers(t, dirs, func(i int) marker {
		m := marker{cache: id, slot: i, n: 3}
		if i == 2 {
			m.mounts = []string{dirs[0], "", ""}
		}
		return m
	})
	c = reopen(t, c, Options{})
	wantMountRecorded(t, dirs, 0)

	writeMarkers(t, dirs, func(i int) marker { return marker{cache: id, slot: i, n: 3} })
	wipe(t, dirs[1])
	c = reopen(t, c, Options{})
	if got := c.Replaced(); !slices.Equal(got, dirs[1:2]) {
		t.Fatalf("Replaced = %v", got)
	}
	for _, d := range []string{dirs[0], dirs[2]} {
		if mk, err := os.ReadFile(filepath.Join(d, markerName)); err != nil || strings.Contains(string(mk), "mounts recorded") {
			t.Errorf("marker of %s rewritten with a directory unmarked: %q (%v)", d, mk, err)
		}
	}
}

// A cache directory inside a disk's file system (not its mount point) is
// refused too when that disk is not mounted, and not re-created below.
func TestCacheBelowMountPoint(t *testing.T) {
	testenv.RequireRoot(t)
	root := t.TempDir()
	var dirs []string
	for i := range 3 {
		disk := filepath.Join(root, fmt.Sprintf("disk%d", i))
		mountDisk(t, disk)
		dirs = append(dirs, filepath.Join(disk, "lifeboat", "cache"))
	}
	c := open(t, dirs, Options{})
	if err := c.Put(SegmentID{"m", 1}, payload(10<<10, 3)); err != nil {
		t.Fatal(err)
	}
	disk0 := filepath.Dir(filepath.Dir(dirs[0]))
	if err := unix.Unmount(disk0, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(SegmentID{"m", 2}, payload(10<<10, 4)); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("put with a disk unmounted: %v", err)
	}
	if _, err := Open(dirs, Options{}); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("Open with a disk unmounted: %v", err)
	}
	if ents, err := os.ReadDir(disk0); err != nil || len(ents) != 0 {
		t.Fatalf("below the mount point: %v (%v)", ents, err)
	}
}

// writeMarkers writes marker(i) as the marker of each dirs[i], as an
// earlier binary or an interrupted Open left it.
func writeMarkers(t *testing.T, dirs []string, marker func(i int) marker) {
	t.Helper()
	for i, d := range dirs {
		if err := os.WriteFile(filepath.Join(d, markerName), []byte(marker(i).String()), 0o640); err != nil {
			t.Fatal(err)
		}
	}
}

// wantMountRecorded checks that every marker records directory slot's
// mount point (the directory itself, a mount point in these tests).
func wantMountRecorded(t *testing.T, dirs []string, slot int) {
	t.Helper()
	want := fmt.Sprintf("mount %d %q\n", slot, dirs[slot])
	for _, d := range dirs {
		if mk, err := os.ReadFile(filepath.Join(d, markerName)); err != nil || !strings.Contains(string(mk), want) {
			t.Errorf("marker of %s: %q (%v), want %q in it", d, mk, err, want)
		}
	}
}

// A Delete right after a cache disk is unmounted (within the grace of the
// last mount check) finds no shard in the directory below the mount point:
// that is not taken for deleted, or the shard would come back with the
// disk.
func TestDeleteJustAfterUnmount(t *testing.T) {
	dirs, backing := threeDirsOneMounted(t)
	c := open(t, dirs, Options{})
	id := SegmentID{"m", 1}
	if err := c.Put(id, payload(100<<10, 3)); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(dirs[1], unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(id); err == nil || !strings.Contains(err.Error(), "not mounted") {
		t.Fatalf("delete just after the disk was unmounted: %v, want a not-mounted error", err)
	}
	bindDisk(t, backing, dirs[1])
	if err := c.Delete(id); err != nil { // the caller's retry
		t.Fatal(err)
	}
	if ents, err := os.ReadDir(filepath.Join(backing, "m")); err != nil || len(ents) != 0 {
		t.Fatalf("the disk still holds %v (%v) after the retried delete", ents, err)
	}
}

func TestFstabMountPoint(t *testing.T) {
	tab := filepath.Join(t.TempDir(), "fstab")
	content := "# comment\n" +
		"UUID=1 / ext4 defaults 0 1\n" +
		"UUID=2 /srv/cache ext4 defaults 0 2\n" +
		"UUID=3 /srv/cache/disk1 xfs defaults,nofail 0 2\n" +
		"/dev/sdz none swap sw 0 0\n" +
		"UUID=4 /mnt/with\\040space ext4 defaults 0 2\n" +
		"garbage\n"
	if err := os.WriteFile(tab, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	for dir, want := range map[string]string{
		"/srv/cache/disk1/lb": "/srv/cache/disk1",
		"/srv/cache/disk2":    "/srv/cache",
		"/srv/cache":          "/srv/cache",
		"/srv/cachet":         "",
		"/var/lib/lifeboat":   "",
		"/mnt/with space/lb":  "/mnt/with space",
		"/srv/cache/../other": "",
	} {
		if got := fstabMountPoint(tab, dir); got != want {
			t.Errorf("fstabMountPoint(%q) = %q, want %q", dir, got, want)
		}
	}
	if got := fstabMountPoint(filepath.Join(t.TempDir(), "none"), "/srv/cache/x"); got != "" {
		t.Errorf("no table: %q", got)
	}
}

// A new cache (or a replaced directory) below a mount point listed in
// fstab that is not mounted is refused: started before its disks were
// mounted, the process server would otherwise put every shard on the file
// system below, where they vanish once the disks are mounted.
func TestNewCacheRefusedBelowUnmountedFstabEntry(t *testing.T) {
	testenv.RequireRoot(t)
	root := t.TempDir()
	mp := filepath.Join(root, "disks")
	if err := os.MkdirAll(mp, 0o750); err != nil {
		t.Fatal(err)
	}
	tab := filepath.Join(t.TempDir(), "fstab")
	if err := os.WriteFile(tab, []byte("UUID=5 "+mp+" ext4 defaults 0 2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dirs := []string{filepath.Join(mp, "a"), filepath.Join(mp, "b"), filepath.Join(mp, "c")}
	_, err := Open(dirs, Options{Fstab: tab})
	if err == nil || !strings.Contains(err.Error(), "not mounted") || !strings.Contains(err.Error(), mp) {
		t.Fatalf("Open below an unmounted fstab entry: %v", err)
	}
	if ents, _ := os.ReadDir(mp); len(ents) != 0 {
		t.Fatalf("the refused Open created %v below the mount point", ents)
	}
	mountDisk(t, mp)
	c := open(t, dirs, Options{Fstab: tab})
	if err := c.Put(SegmentID{"m", 1}, payload(1000, 1)); err != nil {
		t.Fatal(err)
	}
}

// More directories than parity shards on one disk are warned of, the
// disk found through partitions; tmpfs, which no disk holds, is not.
func TestSharedDiskWarned(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "sfdisk")
	disk := loopdev.New(t, 64<<20, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(t.Context(), disk.Path, loopdev.MBR, []loopdev.PartSpec{{Size: 24 << 20}, {Size: 0}})
	if err != nil {
		t.Fatal(err)
	}
	var mnts []string
	for _, p := range parts {
		if err := loopdev.Mkfs(t.Context(), "ext4", p); err != nil {
			t.Fatal(err)
		}
		mnt := t.TempDir()
		if err := loopdev.Mount(p, mnt, "ext4", ""); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { loopdev.Unmount(mnt) })
		mnts = append(mnts, mnt)
	}
	// The disk under the loop disk's backing file (the loop disk itself
	// if that is tmpfs).
	whole, err := blockdev.DevT(disk.Path)
	if err != nil {
		t.Fatal(err)
	}
	want := blockdev.Name(blockdev.Disks(whole)[0])
	shm := func() string {
		d, err := os.MkdirTemp("/dev/shm", "lifeboat-cache-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	for _, c := range []struct {
		dirs []string
		warn bool
	}{
		{[]string{filepath.Join(mnts[0], "c"), filepath.Join(mnts[1], "c"), shm()}, true}, // 2 > 1 parity on one disk
		{[]string{filepath.Join(mnts[0], "c2"), shm(), shm()}, false},
	} {
		var log strings.Builder
		cc, err := Open(c.dirs, Options{Logger: slog.New(slog.NewTextHandler(&log, nil))})
		if err != nil {
			t.Fatal(err)
		}
		cc.Close()
		warned := strings.Contains(log.String(), "share one disk")
		if warned != c.warn || warned && !strings.Contains(log.String(), "disk="+want) {
			t.Errorf("cache over %v: warned %v, want %v:\n%s", c.dirs, warned, c.warn, log.String())
		}
	}
}

// A fence record is not written below an unmounted disk's mount point:
// hidden once the disk is back, it would leave the older record on the
// disk to decide.
func TestFenceRecordNotBelowUnmountedDisk(t *testing.T) {
	dirs, backing := threeDirsOneMounted(t)
	c := open(t, dirs, Options{})
	if err := c.SetFenced("m", true, []byte("j1")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(dirs[1], unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := c.SetFenced("m", false, nil); err != nil {
		t.Fatal(err)
	}
	if ents, err := os.ReadDir(dirs[1]); err != nil || len(ents) != 0 {
		t.Fatalf("the directory below the mount point holds %v (%v)", ents, err)
	}
	bindDisk(t, backing, dirs[1])
	if _, on := c.Fenced("m"); on {
		t.Fatal("fenced again once the disk is back")
	}
}
