package capture

import (
	"slices"
	"testing"
)

// A swept write to a whole disk is read back where it overlaps the
// protected partitions, in partition-relative bytes, clipped at their ends.
func TestDiskOverlaps(t *testing.T) {
	const disk = 7 << 20 // minor 0
	c := &Capture{devices: []Device{
		{ID: 0, KernelDev: 7<<20 | 1, Disk: disk, Start: 2048, Size: 100 << 20},    // sectors [2048, 206848)
		{ID: 1, KernelDev: 7<<20 | 2, Disk: disk, Start: 206848, Size: 50 << 20},   // [206848, 309248)
		{ID: 2, KernelDev: 8<<20 | 1, Disk: 8 << 20, Start: 2048, Size: 100 << 20}, // another disk
	}}
	for _, tc := range []struct {
		name   string
		sector uint64
		bytes  uint32
		want   []Stale
	}{
		{"before the partitions", 0, 1 << 20, nil},
		{"inside the first", 4096, 8192, []Stale{{Dev: 0, Off: 2048 * 512, Len: 8192}}},
		{"across the first's start", 1024, 1 << 20, []Stale{{Dev: 0, Off: 0, Len: 1<<20 - 1024*512}}},
		{"across both", 206848 - 8, 8192, []Stale{{Dev: 0, Off: (206848 - 8 - 2048) * 512, Len: 4096}, {Dev: 1, Off: 0, Len: 4096}}},
		{"odd length rounds up to a sector", 206848, 100, []Stale{{Dev: 1, Off: 0, Len: 512}}},
		{"after the partitions", 309248, 4096, nil},
	} {
		if got := c.diskOverlaps(disk, tc.sector, tc.bytes); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
