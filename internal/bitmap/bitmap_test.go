package bitmap

import (
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
)

// setBlocks lists the dirty blocks one by one, the slow obvious way.
func setBlocks(b *Bitmap) []uint64 {
	var out []uint64
	for i := range b.Blocks() {
		if b.Test(i) {
			out = append(out, i)
		}
	}
	return out
}

func span(start, n uint64) []uint64 {
	out := make([]uint64, n)
	for i := range out {
		out[i] = start + uint64(i)
	}
	return out
}

func TestSetRange(t *testing.T) {
	for _, tc := range []struct {
		name             string
		blocks, start, n uint64
	}{
		{"empty range", 200, 10, 0},
		{"single bit", 200, 5, 1},
		{"within one word", 200, 3, 60},
		{"exactly one word", 200, 64, 64},
		{"across one boundary", 200, 60, 8},
		{"across many words", 200, 1, 198},
		{"ends at last partial word", 200, 190, 10},
		{"whole partial last word", 200, 192, 8},
		{"full bitmap", 200, 0, 200},
		{"full, multiple of 64", 128, 0, 128},
		{"last bit of a word", 128, 63, 1},
		{"first bit of a word", 128, 64, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := New(tc.blocks)
			b.SetRange(tc.start, tc.n)
			want := span(tc.start, tc.n)
			if got := setBlocks(b); !slices.Equal(got, want) && !(len(got) == 0 && len(want) == 0) {
				t.Fatalf("dirty blocks = %v, want %v", got, want)
			}
			if b.Count() != tc.n {
				t.Fatalf("Count = %d, want %d", b.Count(), tc.n)
			}
			if b.Any() != (tc.n > 0) {
				t.Fatalf("Any = %v", b.Any())
			}
			if r := tc.blocks % 64; r != 0 && b.words[len(b.words)-1]>>r != 0 {
				t.Fatal("bits set beyond Blocks()")
			}
		})
	}
}

func TestOutOfRangePanics(t *testing.T) {
	for name, f := range map[string]func(b *Bitmap){
		"Set at Blocks()":          func(b *Bitmap) { b.Set(100) },
		"SetRange past end":        func(b *Bitmap) { b.SetRange(90, 11) },
		"SetRange overflowing u64": func(b *Bitmap) { b.SetRange(2, ^uint64(0)) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			f(New(100))
		})
	}
}

func TestEmptyBitmap(t *testing.T) {
	b := New(0)
	if b.Count() != 0 || b.Any() || b.Test(0) {
		t.Fatal("empty bitmap reports dirty blocks")
	}
	for e := range b.Extents(8) {
		t.Fatalf("empty bitmap yielded %+v", e)
	}
	b.SetRange(0, 0)
	data, _ := b.MarshalBinary()
	var c Bitmap
	if err := c.UnmarshalBinary(data); err != nil || c.Blocks() != 0 {
		t.Fatalf("round trip of empty bitmap: %v, blocks %d", err, c.Blocks())
	}
}

func TestMarkBytes(t *testing.T) {
	b, err := ForDevice(10*4096+100, 4096) // 11 blocks, the last partial
	if err != nil {
		t.Fatal(err)
	}
	if b.Blocks() != 11 {
		t.Fatalf("Blocks = %d, want 11", b.Blocks())
	}
	for _, tc := range []struct {
		off, length int64
		want        []uint64
	}{
		{0, 0, nil},
		{0, 1, []uint64{0}},
		{4095, 2, []uint64{0, 1}},    // straddles a boundary
		{4096, 4096, []uint64{1}},    // exactly one block
		{4096, 4097, []uint64{1, 2}}, // one byte into the next
		{3 * 4096, 3*4096 + 1, []uint64{3, 4, 5, 6}},
		{10 * 4096, 100, []uint64{10}}, // partial last block
	} {
		b.Reset()
		if err := b.MarkBytes(tc.off, tc.length); err != nil {
			t.Fatalf("MarkBytes(%d, %d): %v", tc.off, tc.length, err)
		}
		if got := setBlocks(b); !slices.Equal(got, tc.want) {
			t.Errorf("MarkBytes(%d, %d) dirtied %v, want %v", tc.off, tc.length, got, tc.want)
		}
	}

	b.Reset()
	if err := b.MarkBytes(10*4096, 8192); err == nil {
		t.Fatal("MarkBytes past the device end returned nil")
	}
	if got := setBlocks(b); !slices.Equal(got, []uint64{10}) {
		t.Fatalf("MarkBytes past the end dirtied %v, want the in-range block 10", got)
	}
	if err := b.MarkBytes(-1, 5); err == nil {
		t.Fatal("negative offset accepted")
	}
}

func TestBlockSizeValidation(t *testing.T) {
	for _, bs := range []uint32{0, 256, 1000, 4095} {
		if _, err := NewBlockSize(8, bs); err == nil {
			t.Errorf("block size %d accepted", bs)
		}
	}
	b, err := NewBlockSize(8, 65536)
	if err != nil || b.BlockSize() != 65536 {
		t.Fatalf("NewBlockSize(8, 65536) = %v, %v", b, err)
	}
}

func TestExtents(t *testing.T) {
	b := New(300)
	b.SetRange(0, 3)
	b.SetRange(62, 4)    // across a word boundary
	b.SetRange(128, 150) // many full words
	b.Set(299)           // last block
	collect := func(max int) []Extent { return slices.Collect(b.Extents(max)) }

	want := []Extent{{0, 3}, {62, 4}, {128, 150}, {299, 1}}
	if got := collect(0); !slices.Equal(got, want) {
		t.Fatalf("Extents(0) = %v, want %v", got, want)
	}
	want = []Extent{{0, 3}, {62, 4}, {128, 64}, {192, 64}, {256, 22}, {299, 1}}
	if got := collect(64); !slices.Equal(got, want) {
		t.Fatalf("Extents(64) = %v, want %v", got, want)
	}
	// Early break must stop the iteration.
	var n int
	for range b.Extents(1) {
		n++
		if n == 5 {
			break
		}
	}
	if n != 5 {
		t.Fatalf("iterated %d times after break at 5", n)
	}

	full := New(130)
	full.SetRange(0, 130)
	if got := slices.Collect(full.Extents(-1)); !slices.Equal(got, []Extent{{0, 130}}) {
		t.Fatalf("full bitmap extents = %v", got)
	}
}

func TestUnion(t *testing.T) {
	a, b := New(100), New(100)
	a.SetRange(0, 10)
	b.SetRange(5, 10)
	b.Set(99)
	if err := a.Union(b); err != nil {
		t.Fatal(err)
	}
	if want := append(span(0, 15), 99); !slices.Equal(setBlocks(a), want) {
		t.Fatalf("union = %v, want %v", setBlocks(a), want)
	}

	// A drained map is rounded up to whole words: fine while the extra
	// bits are clean, an error (and no change) when one is dirty.
	drained := New(128)
	drained.Set(3)
	if err := a.Union(drained); err != nil {
		t.Fatalf("union with larger, clean-tailed bitmap: %v", err)
	}
	drained.Set(100)
	before := a.Count()
	if err := a.Union(drained); err == nil {
		t.Fatal("union silently dropped block 100")
	}
	if a.Count() != before {
		t.Fatal("failed union modified the target")
	}

	other, _ := NewBlockSize(100, 512)
	if err := a.Union(other); err == nil {
		t.Fatal("union of different block sizes accepted")
	}
}

func TestDrainMasksOutOfRange(t *testing.T) {
	b := New(70) // 2 words, 6 valid bits in the second
	words := []uint64{1, 1<<5 | 1<<6, 1}
	n, err := b.Drain(words)
	if n != 3 {
		t.Fatalf("nonzero words = %d, want 3", n)
	}
	if !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("Drain error = %v, want ErrOutOfRange", err)
	}
	if got := setBlocks(b); !slices.Equal(got, []uint64{0, 69}) {
		t.Fatalf("drained %v, want [0 69]", got)
	}
	if !slices.Equal(words, []uint64{0, 0, 0}) {
		t.Fatalf("words not cleared: %v", words)
	}
}

// TestDrainConcurrent sets every bit exactly once with atomic OR from
// several goroutines (as the kernel would) while another drains
// repeatedly. Each bit must show up in exactly one drain: none lost, none
// duplicated.
func TestDrainConcurrent(t *testing.T) {
	const (
		nwords  = 512
		writers = 4
	)
	words := make([]uint64, nwords)
	order := rand.New(rand.NewPCG(5, 6)).Perm(nwords * 64)

	var wg sync.WaitGroup
	var writing atomic.Int32
	writing.Store(writers)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer writing.Add(-1)
			// Interleave the writers over the same words.
			for k := g; k < len(order); k += writers {
				i := order[k]
				atomic.OrUint64(&words[i/64], 1<<(i%64))
			}
		}()
	}

	all := New(nwords * 64)
	var total uint64
	drains := 0
	for {
		done := writing.Load() == 0 // read before draining, so the last drain is complete
		d := DrainAtomic(words)
		total += d.Count()
		if err := all.Union(d); err != nil {
			t.Fatal(err)
		}
		drains++
		if done {
			break
		}
	}
	wg.Wait()
	if all.Count() != nwords*64 {
		t.Fatalf("union of %d drains has %d bits, want %d", drains, all.Count(), nwords*64)
	}
	if total != nwords*64 {
		t.Fatalf("drains returned %d bits in total, want %d (duplicates or losses)", total, nwords*64)
	}
	t.Logf("%d drains", drains)
}

func TestMarshalRoundTrip(t *testing.T) {
	for _, blocks := range []uint64{0, 1, 63, 64, 65, 1000} {
		b, _ := NewBlockSize(blocks, 8192)
		rng := rand.New(rand.NewPCG(blocks, 7))
		for i := range blocks {
			if rng.IntN(3) == 0 {
				b.Set(i)
			}
		}
		data, err := b.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var c Bitmap
		if err := c.UnmarshalBinary(data); err != nil {
			t.Fatalf("blocks=%d: %v", blocks, err)
		}
		if c.Blocks() != blocks || c.BlockSize() != 8192 || !slices.Equal(setBlocks(&c), setBlocks(b)) {
			t.Fatalf("blocks=%d: round trip mismatch", blocks)
		}
	}
}

func TestUnmarshalRejectsCorruption(t *testing.T) {
	b := New(100)
	b.SetRange(10, 20)
	good, _ := b.MarshalBinary()

	for i := range good {
		bad := slices.Clone(good)
		bad[i] ^= 0x10
		var c Bitmap
		if err := c.UnmarshalBinary(bad); err == nil {
			t.Fatalf("flipping a bit in byte %d went unnoticed", i)
		}
	}
	for _, n := range []int{0, 10, 27, len(good) - 1} {
		var c Bitmap
		if err := c.UnmarshalBinary(good[:n]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d bytes: %v, want ErrCorrupt", n, err)
		}
	}

	// A well-checksummed file with inconsistent fields is still rejected.
	reseal := func(f func([]byte)) []byte {
		d := slices.Clone(good)
		f(d)
		end := len(d) - trailerSize
		putCRC(d[end:], d[:end])
		return d
	}
	for name, data := range map[string][]byte{
		"blocks too large":   reseal(func(d []byte) { d[16] = 200 }),
		"bit beyond blocks":  reseal(func(d []byte) { d[24+8+7] = 0x80 }),
		"invalid block size": reseal(func(d []byte) { d[8], d[9] = 1, 0 }),
		"future version (2)": reseal(func(d []byte) { d[4] = 2 }),
	} {
		var c Bitmap
		if err := c.UnmarshalBinary(data); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestClearRangeAndExtentsIn against a plain []bool model, at random.
func TestClearRangeAndExtentsIn(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for round := range 200 {
		blocks := uint64(1 + rng.IntN(300))
		b := New(blocks)
		model := make([]bool, blocks)
		for range 20 {
			start := rng.Uint64N(blocks)
			n := rng.Uint64N(blocks - start + 1)
			set := rng.IntN(3) > 0
			if set {
				b.SetRange(start, n)
			} else {
				b.ClearRange(start, n)
			}
			for i := start; i < start+n; i++ {
				model[i] = set
			}
		}
		var want []uint64
		for i, v := range model {
			if v {
				want = append(want, uint64(i))
			}
		}
		if got := setBlocks(b); !slices.Equal(got, want) {
			t.Fatalf("round %d: dirty %v, want %v", round, got, want)
		}
		from := rng.Uint64N(blocks + 1)
		to := from + rng.Uint64N(blocks-from+1)
		if rng.IntN(2) == 0 {
			to = blocks
		}
		max := 1 + rng.IntN(70)
		var got []uint64
		for e := range b.ExtentsIn(from, to, max) {
			if e.Len == 0 || e.Len > uint64(max) {
				t.Fatalf("round %d: extent %+v breaks the limit %d", round, e, max)
			}
			got = append(got, span(e.Start, e.Len)...)
		}
		var wantFrom []uint64
		for _, i := range want {
			if i >= from && i < to {
				wantFrom = append(wantFrom, i)
			}
		}
		if !slices.Equal(got, wantFrom) {
			t.Fatalf("round %d: extents in [%d,%d) cover %v, want %v", round, from, to, got, wantFrom)
		}
	}
}
