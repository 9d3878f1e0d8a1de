package capture

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// The capture state a clean stop leaves pinned is resumed only by a run
// that gives every device the ID, size and bitmap words it had: devices
// listed in another order, or another device in one's place, would have
// one disk read back at the blocks another one was written at.
func TestPinnedStateResumedOnlyForTheSameLayout(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBTF(t)
	dev := func(size int64) Device {
		d := loopdev.New(t, size, loopdev.Options{})
		bd, err := blockdev.Open(d.Path)
		if err != nil {
			t.Fatal(err)
		}
		defer bd.Close()
		return Device{KernelDev: bd.KernelDev(), Size: size, Mode: ModeMetadata}
	}
	a, b, other := dev(8<<20), dev(8<<20), dev(8<<20)
	layout := func(ds ...Device) []Device {
		for i := range ds {
			ds[i].ID = uint16(i)
		}
		return ds
	}
	pins, err := os.MkdirTemp("/sys/fs/bpf", "lifeboat-layout-test-")
	if err != nil {
		t.Fatalf("bpffs: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(pins) })

	// run loads capture for devs, reports whether it resumed the pinned
	// state, and stops cleanly (pinned) unless last.
	run := func(last bool, devs ...Device) bool {
		t.Helper()
		c, err := Load(Config{Devices: devs, RingBytes: 1 << 20, PinDir: filepath.Join(pins, "state")})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if last {
			c.Unpin()
		} else if err := c.Persist(); err != nil {
			t.Fatal(err)
		}
		return c.Resumed()
	}
	if run(false, layout(a, b)...) {
		t.Fatal("first run resumed a state")
	}
	if !run(false, layout(a, b)...) {
		t.Fatal("same devices, same order: not resumed")
	}
	if run(false, layout(b, a)...) {
		t.Fatal("devices swapped: resumed the other order's bitmap")
	}
	if !run(false, layout(b, a)...) {
		t.Fatal("swapped order kept: not resumed")
	}
	if run(false, layout(b, other)...) {
		t.Fatal("another device in a's place: resumed a's bitmap")
	}
	if !run(true, layout(b, other)...) {
		t.Fatal("last layout kept: not resumed")
	}
}

// Devices whose bitmap would not fit its 32-bit word index (and byte-sized
// mapping) are refused, not wrapped onto each other's words.
func TestBitmapTooLargeRefused(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBTF(t)
	_, err := Load(Config{Devices: []Device{{ID: 0, KernelDev: 7<<20 | 1000, Size: 65 << 40, Mode: ModeMetadata}}})
	if err == nil || !strings.Contains(err.Error(), "bitmap words") {
		t.Fatalf("a 65 TiB device: %v, want a refusal", err)
	}
}
