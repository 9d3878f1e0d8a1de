package blockdev_test

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

const mib = 1 << 20

func TestAlignedBuffer(t *testing.T) {
	for _, size := range []int{1, 512, 4096, 12345, 1 << 20} {
		b := blockdev.AlignedBuffer(size)
		if len(b) != size || cap(b) != size {
			t.Errorf("AlignedBuffer(%d): len %d cap %d", size, len(b), cap(b))
		}
		if addr := uintptr(unsafe.Pointer(&b[0])); addr%blockdev.Align != 0 {
			t.Errorf("AlignedBuffer(%d) at %#x, not %d-aligned", size, addr, blockdev.Align)
		}
	}
	if b := blockdev.AlignedBuffer(0); len(b) != 0 {
		t.Errorf("AlignedBuffer(0) has len %d", len(b))
	}
}

func TestKernelDev(t *testing.T) {
	d := blockdev.Dev{Major: 259, Minor: 3}
	if got, want := d.Kernel(), uint32(259<<20|3); got != want {
		t.Errorf("Kernel() = %#x, want %#x", got, want)
	}
	if d.String() != "259:3" {
		t.Errorf("String() = %q", d.String())
	}
}

func TestNotABlockDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "plain")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, "/dev/null"} {
		_, err := blockdev.Open(p)
		if err == nil || !strings.Contains(err.Error(), p+" is not a block device") {
			t.Errorf("Open(%s) error = %v; want 'is not a block device'", p, err)
		}
	}
}

func TestWholeDisk(t *testing.T) {
	ld := loopdev.New(t, 8*mib, loopdev.Options{BlockSize: 4096})

	// Write a marker through the page cache of the backing file; a direct
	// read of the device must see it.
	want := bytes.Repeat([]byte("lifeboat"), 1024) // 8 KiB
	backing, err := os.OpenFile(ld.File, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = backing.WriteAt(want, 4*mib)
	backing.Close()
	if err != nil {
		t.Fatal(err)
	}

	d, err := blockdev.Open(ld.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	// A loop device has no inline encryption (queue/crypto); a disk with
	// it is captured in metadata mode (agent Engine).
	if crypt, err := d.InlineEncryption(); err != nil || crypt {
		t.Errorf("InlineEncryption() = %v, %v on a loop device; want false", crypt, err)
	}
	if size, err := d.Size(); err != nil || size != 8*mib {
		t.Errorf("Size() = %d, %v; want %d", size, err, 8*mib)
	}
	if lbs := d.LogicalBlockSize(); lbs != 4096 {
		t.Errorf("LogicalBlockSize() = %d, want 4096", lbs)
	}
	dev, err := blockdev.DevT(ld.Path)
	if err != nil || dev != d.Dev() || dev.Major != 7 {
		t.Errorf("DevT = %v, %v; Dev() = %v; want loop major 7", dev, err, d.Dev())
	}
	p, err := d.Placement()
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Base(ld.Path)
	if p != (blockdev.Placement{Name: name, Disk: name, DiskDev: d.Dev()}) {
		t.Errorf("Placement() = %+v; want whole disk %s", p, name)
	}

	got := blockdev.AlignedBuffer(len(want))
	if n, err := d.ReadAtDirect(got, 4*mib); err != nil || n != len(got) || !bytes.Equal(got, want) {
		t.Errorf("ReadAtDirect: n=%d err=%v equal=%v", n, err, bytes.Equal(got, want))
	}
	// The last block reads fully; past it is io.EOF.
	if n, err := d.ReadAtDirect(got[:4096], 8*mib-4096); err != nil || n != 4096 {
		t.Errorf("read of last block: n=%d err=%v", n, err)
	}
	if _, err := d.ReadAtDirect(got[:4096], 8*mib); err != io.EOF {
		t.Errorf("read past end: err=%v, want io.EOF", err)
	}
	// Misalignment is rejected up front with a clear error.
	for _, tc := range []struct {
		buf []byte
		off int64
	}{
		{got[:4096], 512},  // offset not a multiple of 4096
		{got[:512], 0},     // length not a multiple of 4096
		{got[512:4608], 0}, // buffer not aligned
	} {
		if _, err := d.ReadAtDirect(tc.buf, tc.off); err == nil || !strings.Contains(err.Error(), "4096") {
			t.Errorf("misaligned read (len %d at %d) error = %v", len(tc.buf), tc.off, err)
		}
	}
}

func TestPartitionPlacementAndIdentity(t *testing.T) {
	testenv.RequireTool(t, "sfdisk")
	ld := loopdev.New(t, 64*mib, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(t.Context(), ld.Path, loopdev.MBR, []loopdev.PartSpec{{Size: 16 * mib}, {Size: 8 * mib}})
	if err != nil {
		t.Fatal(err)
	}

	d, err := blockdev.Open(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p, err := d.Placement()
	if err != nil {
		t.Fatal(err)
	}
	whole, err := blockdev.DevT(ld.Path)
	if err != nil {
		t.Fatal(err)
	}
	// sfdisk starts p1 at 1 MiB and aligns p2 right after it (1 + 16 MiB).
	want := blockdev.Placement{
		Name:      filepath.Base(parts[1]),
		Disk:      filepath.Base(ld.Path),
		DiskDev:   whole,
		Partition: 2,
		Start:     17 * mib / 512,
	}
	if p != want {
		t.Errorf("Placement() = %+v\nwant %+v", p, want)
	}
	if size, err := d.Size(); err != nil || size != 8*mib {
		t.Errorf("Size() = %d, %v; want %d", size, err, 8*mib)
	}

	id1, err := d.Identity()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"dev=" + d.Dev().String(), "size=8388608", "part=2", "diskseq=", ld.File} {
		if !strings.Contains(id1, s) {
			t.Errorf("Identity() = %q, missing %q", id1, s)
		}
	}
	if id2, err := d.Identity(); err != nil || id2 != id1 {
		t.Errorf("Identity() not stable: %q then %q (%v)", id1, id2, err)
	}
	// A partition's zone model is its disk's (a loop device: none).
	if z, err := d.Zoned(); err != nil || z != "" {
		t.Errorf("Zoned() = %q, %v; want a conventional device", z, err)
	}
}

// Re-attaching the same file yields a new diskseq, so the identity must
// change even if the device number, size and backing file are equal; the
// stable ID stays, and another file of the same size has another.
func TestIdentityChangesOnReattach(t *testing.T) {
	testenv.RequireRoot(t)
	file := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(file, make([]byte, 4*mib), 0o644); err != nil {
		t.Fatal(err)
	}
	var stable []string
	identity := func() (id, diskseq string) {
		ld, err := loopdev.Attach(file, loopdev.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := ld.Detach(); err != nil {
				t.Error(err)
			}
		}()
		d, err := blockdev.Open(ld.Path)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		id, err = d.Identity()
		if err != nil {
			t.Fatal(err)
		}
		st, err := d.StableID()
		if err != nil {
			t.Fatal(err)
		}
		stable = append(stable, st)
		for _, f := range strings.Fields(id) {
			if strings.HasPrefix(f, "diskseq=") {
				diskseq = f
			}
		}
		return id, diskseq
	}
	id1, seq1 := identity()
	id2, seq2 := identity()
	if seq1 == "" || seq1 == seq2 || id1 == id2 {
		t.Errorf("identity did not change across detach/attach:\n%s\n%s", id1, id2)
	}
	file = filepath.Join(t.TempDir(), "other.img")
	if err := os.WriteFile(file, make([]byte, 4*mib), 0o644); err != nil {
		t.Fatal(err)
	}
	identity()
	if stable[0] == "" || stable[0] != stable[1] || stable[2] == stable[0] {
		t.Errorf("stable IDs: %q, %q across detach/attach, %q for another file: want the first two equal, the third not", stable[0], stable[1], stable[2])
	}
}
