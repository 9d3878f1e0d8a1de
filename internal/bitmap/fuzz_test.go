package bitmap

import (
	"slices"
	"testing"
)

// naiveExtents walks bit by bit: the obviously correct reference.
func naiveExtents(b *Bitmap, maxBlocks int) []Extent {
	var out []Extent
	for i := range b.Blocks() {
		if !b.Test(i) {
			continue
		}
		if n := len(out); n > 0 {
			last := &out[n-1]
			if last.Start+last.Len == i && (maxBlocks <= 0 || last.Len < uint64(maxBlocks)) {
				last.Len++
				continue
			}
		}
		out = append(out, Extent{Start: i, Len: 1})
	}
	return out
}

// FuzzExtents compares Extents with naiveExtents. data is the bitmap's
// raw bytes, trimmed to blocks bits.
func FuzzExtents(f *testing.F) {
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, uint16(65), int16(0))
	f.Add([]byte{0b10110111, 0, 0, 0, 0, 0, 0, 0x80, 0x01}, uint16(72), int16(2))
	f.Add([]byte{}, uint16(0), int16(5))
	f.Fuzz(func(t *testing.T, data []byte, blocks uint16, maxBlocks int16) {
		b := New(uint64(blocks))
		for i := range uint64(blocks) {
			if i/8 < uint64(len(data)) && data[i/8]&(1<<(i%8)) != 0 {
				b.Set(i)
			}
		}
		got := slices.Collect(b.Extents(int(maxBlocks)))
		want := naiveExtents(b, int(maxBlocks))
		if !slices.Equal(got, want) {
			t.Fatalf("Extents(%d) = %v\nwant %v", maxBlocks, got, want)
		}
		var sum uint64
		for _, e := range got {
			sum += e.Len
		}
		if sum != b.Count() {
			t.Fatalf("extents cover %d blocks, Count = %d", sum, b.Count())
		}
	})
}
