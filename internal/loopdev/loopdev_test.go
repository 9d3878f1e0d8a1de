package loopdev_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

const mib = 1 << 20

func TestDirectIO(t *testing.T) {
	for _, dio := range []bool{false, true} {
		t.Run(fmt.Sprintf("backing-dio=%v", dio), func(t *testing.T) { testDirectIO(t, dio) })
	}
}

func testDirectIO(t *testing.T, dio bool) {
	d := loopdev.New(t, 64*mib, loopdev.Options{DirectIO: dio})
	sysDIO, err := os.ReadFile("/sys/block/" + filepath.Base(d.Path) + "/loop/dio")
	if want := map[bool]string{false: "0", true: "1"}[dio]; err != nil || strings.TrimSpace(string(sysDIO)) != want {
		t.Fatalf("sysfs loop/dio = %q, %v; want %s", sysDIO, err, want)
	}

	f, err := os.OpenFile(d.Path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	want := blockdev.AlignedBuffer(8192)
	for i := range want {
		want[i] = byte(i * 7)
	}
	const off = 32 * mib
	if _, err := f.WriteAt(want, off); err != nil {
		t.Fatal(err)
	}
	got := blockdev.AlignedBuffer(len(want))
	if _, err := f.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("O_DIRECT read-back differs from what was written")
	}

	// The data must have reached the backing file at the same offset.
	backing, err := os.ReadFile(d.File)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(backing)) != 64*mib || !bytes.Equal(backing[off:off+len(want)], want) {
		t.Fatal("backing file does not hold the written data")
	}
}

func TestPartitionMkfsMount(t *testing.T) {
	testenv.RequireTool(t, "sfdisk")
	testenv.RequireTool(t, "mkfs.ext4")
	d := loopdev.New(t, 64*mib, loopdev.Options{PartScan: true})

	parts, err := loopdev.Partition(t.Context(), d.Path, loopdev.GPT, []loopdev.PartSpec{{Size: 24 * mib}, {}})
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 2 || parts[0] != d.Path+"p1" || parts[1] != d.Path+"p2" {
		t.Fatalf("partition paths = %q", parts)
	}
	p1, err := blockdev.Open(parts[0])
	if err != nil {
		t.Fatal(err)
	}
	size, err := p1.Size()
	p1.Close()
	if err != nil || size != 24*mib {
		t.Fatalf("p1 size = %d, %v; want %d", size, err, 24*mib)
	}

	if err := loopdev.Mkfs(t.Context(), "ext4", parts[0]); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "mnt")
	if err := loopdev.Mount(parts[0], dir, "ext4", "noatime"); err != nil {
		t.Fatal(err)
	}
	mounted := true
	defer func() {
		if mounted {
			loopdev.Unmount(dir)
		}
	}()
	if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Unmount(dir); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if _, err := os.Stat(filepath.Join(dir, "hello")); !os.IsNotExist(err) {
		t.Fatalf("file still visible after unmount: %v", err)
	}
}

func TestDetachFreesDevice(t *testing.T) {
	testenv.RequireRoot(t)
	d, err := loopdev.Create(t.TempDir(), 4*mib, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Bound() {
		t.Fatal("device not bound after Create")
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if d.Bound() {
		t.Fatal("device still bound after Detach")
	}
	f, err := os.Open(d.Path)
	if err == nil {
		// An unbound loop device answers LOOP_GET_STATUS64 with ENXIO;
		// another test running meanwhile may have bound the index to a
		// file of its own.
		info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
		f.Close()
		if err == nil && strings.TrimRight(string(info.File_name[:]), "\x00") == filepath.Base(d.File) {
			t.Fatal("LOOP_GET_STATUS64 after detach still names the backing file")
		} else if err != nil && err != unix.ENXIO {
			t.Fatalf("LOOP_GET_STATUS64 after detach: %v; want ENXIO", err)
		}
	}
	if _, err := os.Stat(d.File); !os.IsNotExist(err) {
		t.Fatalf("backing file not removed: %v", err)
	}
	if err := d.Detach(); err != nil {
		t.Fatalf("second Detach: %v", err)
	}
}

func TestDetachRefusesWhileMounted(t *testing.T) {
	testenv.RequireTool(t, "mkfs.ext4")
	d := loopdev.New(t, 16*mib, loopdev.Options{})
	if err := loopdev.Mkfs(t.Context(), "ext4", d.Path); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := loopdev.Mount(d.Path, dir, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	defer loopdev.Unmount(dir)
	if err := d.Detach(); err == nil {
		t.Fatal("Detach of a mounted device succeeded")
	}
	// A refused Detach must leave the device intact, not lazily cleared.
	if !d.Bound() {
		t.Fatal("device unbound although mounted")
	}
	if _, err := os.Stat(d.File); err != nil {
		t.Fatalf("backing file of a mounted device: %v", err)
	}
}

// Concurrent attaches race for the same free index; all must succeed on
// distinct devices.
func TestConcurrentAttach(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	const n = 4
	devs := make([]*loopdev.Device, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { devs[i], errs[i] = loopdev.Create(dir, mib, loopdev.Options{}) })
	}
	wg.Wait()
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Error(errs[i])
			continue
		}
		if seen[devs[i].Path] {
			t.Errorf("%s handed out twice", devs[i].Path)
		}
		seen[devs[i].Path] = true
		if err := devs[i].Detach(); err != nil {
			t.Error(err)
		}
	}
}

func TestPartitionPath(t *testing.T) {
	for in, want := range map[string]string{
		"/dev/loop0":   "/dev/loop0p2",
		"/dev/sda":     "/dev/sda2",
		"/dev/nvme0n1": "/dev/nvme0n1p2",
	} {
		if got := loopdev.PartitionPath(in, 2); got != want {
			t.Errorf("PartitionPath(%q, 2) = %q, want %q", in, got, want)
		}
	}
}
