// Package bitmap tracks which blocks of a block device are dirty.
//
// Bit i of word i/64 (least significant bit first) stands for block i.
// That is the layout the capture BPF program uses for its array map, so a
// memory-mapped map can be drained with DrainAtomic while the kernel keeps
// setting bits.
//
// A Bitmap is not safe for concurrent use; only DrainAtomic and Drain
// tolerate concurrent atomic writers, and only on the words they drain.
package bitmap

import (
	"errors"
	"fmt"
	"iter"
	"math"
	"math/bits"
	"sync/atomic"
)

// DefaultBlockSize is the block size New uses, in bytes.
const DefaultBlockSize = 4096

// MinBlockSize is the smallest block size accepted: one disk sector.
const MinBlockSize = 512

// Extent is a run of consecutive blocks.
type Extent struct {
	Start uint64 // first block
	Len   uint64 // number of blocks, at least 1
}

// Bitmap is a fixed-size set of dirty blocks. Bits at or beyond Blocks()
// are always zero, which Count and Extents rely on.
type Bitmap struct {
	words     []uint64
	blocks    uint64
	blockSize uint32
}

// WordsFor returns the number of 64-bit words needed for blocks blocks,
// e.g. to size the BPF array map.
func WordsFor(blocks uint64) int {
	return int((blocks + 63) / 64)
}

// New returns an empty bitmap of blocks blocks of DefaultBlockSize bytes.
func New(blocks uint64) *Bitmap {
	return &Bitmap{words: make([]uint64, WordsFor(blocks)), blocks: blocks, blockSize: DefaultBlockSize}
}

// NewBlockSize returns an empty bitmap of blocks blocks of blockSize
// bytes. blockSize must be a power of two of at least MinBlockSize.
func NewBlockSize(blocks uint64, blockSize uint32) (*Bitmap, error) {
	if err := checkBlockSize(blockSize); err != nil {
		return nil, err
	}
	b := New(blocks)
	b.blockSize = blockSize
	return b, nil
}

// ForDevice returns an empty bitmap covering a device of size bytes in
// blocks of blockSize bytes; a partial last block counts as a block.
func ForDevice(size int64, blockSize uint32) (*Bitmap, error) {
	if size < 0 {
		return nil, fmt.Errorf("bitmap: negative device size %d", size)
	}
	if err := checkBlockSize(blockSize); err != nil {
		return nil, err
	}
	return NewBlockSize((uint64(size)+uint64(blockSize)-1)/uint64(blockSize), blockSize)
}

func checkBlockSize(bs uint32) error {
	if bs < MinBlockSize || bs&(bs-1) != 0 {
		return fmt.Errorf("bitmap: block size %d is not a power of two >= %d", bs, MinBlockSize)
	}
	return nil
}

// Blocks returns the number of blocks the bitmap covers.
func (b *Bitmap) Blocks() uint64 { return b.blocks }

// BlockSize returns the size of one block in bytes.
func (b *Bitmap) BlockSize() uint32 { return b.blockSize }

// Words returns the backing words. The slice aliases the bitmap; callers
// must keep bits at or beyond Blocks() zero.
func (b *Bitmap) Words() []uint64 { return b.words }

// Set marks block i dirty. It panics if i >= Blocks().
func (b *Bitmap) Set(i uint64) {
	if i >= b.blocks {
		panic(fmt.Sprintf("bitmap: block %d out of range [0,%d)", i, b.blocks))
	}
	b.words[i/64] |= 1 << (i % 64)
}

// Test reports whether block i is dirty. Blocks out of range are clean.
func (b *Bitmap) Test(i uint64) bool {
	return i < b.blocks && b.words[i/64]&(1<<(i%64)) != 0
}

// SetRange marks blocks [start, start+n) dirty, a word at a time. It
// panics if the range extends beyond Blocks().
func (b *Bitmap) SetRange(start, n uint64) {
	if n == 0 {
		return
	}
	first, last, lo, hi := b.masks(start, n)
	if first == last {
		b.words[first] |= lo & hi
		return
	}
	b.words[first] |= lo
	for w := first + 1; w < last; w++ {
		b.words[w] = ^uint64(0)
	}
	b.words[last] |= hi
}

// masks returns the words holding blocks [start, start+n) (n > 0) and the
// masks of the blocks in the first and the last of them. It panics if the
// range exceeds the bitmap.
func (b *Bitmap) masks(start, n uint64) (first, last, lo, hi uint64) {
	end := start + n
	if end < start || end > b.blocks {
		panic(fmt.Sprintf("bitmap: range [%d,+%d) out of range [0,%d)", start, n, b.blocks))
	}
	return start / 64, (end - 1) / 64, ^uint64(0) << (start % 64), ^uint64(0) >> (63 - (end-1)%64)
}

// ClearRange marks blocks [start, start+n) clean. It panics if the range
// exceeds the bitmap.
func (b *Bitmap) ClearRange(start, n uint64) {
	if n == 0 {
		return
	}
	first, last, lo, hi := b.masks(start, n)
	if first == last {
		b.words[first] &^= lo & hi
		return
	}
	b.words[first] &^= lo
	clear(b.words[first+1 : last])
	b.words[last] &^= hi
}

// MarkBytes marks dirty every block that the byte range [off, off+length)
// touches, including partially covered first and last blocks. The range is
// clipped to the device, so a write reported past the end (e.g. after the
// device was shrunk) marks what it can and returns an error naming the
// range. length 0 marks nothing.
func (b *Bitmap) MarkBytes(off, length int64) error {
	if off < 0 || length < 0 {
		return fmt.Errorf("bitmap: invalid byte range off=%d length=%d", off, length)
	}
	if length == 0 {
		return nil
	}
	bs := uint64(b.blockSize)
	start := uint64(off) / bs
	end := (uint64(off) + uint64(length) + bs - 1) / bs // exclusive
	if end > b.blocks {
		if start < b.blocks {
			b.SetRange(start, b.blocks-start)
		}
		return fmt.Errorf("bitmap: byte range [%d,+%d) extends past the device end at block %d", off, length, b.blocks)
	}
	b.SetRange(start, end-start)
	return nil
}

// Count returns the number of dirty blocks.
func (b *Bitmap) Count() uint64 {
	var n int
	for _, w := range b.words {
		n += bits.OnesCount64(w)
	}
	return uint64(n)
}

// Any reports whether at least one block is dirty.
func (b *Bitmap) Any() bool {
	for _, w := range b.words {
		if w != 0 {
			return true
		}
	}
	return false
}

// Reset marks every block clean.
func (b *Bitmap) Reset() { clear(b.words) }

// Union marks dirty every block that is dirty in other. other may cover
// fewer or more blocks (a drained BPF map is rounded up to whole words);
// Union fails, leaving b unchanged, if the block sizes differ or other has
// a dirty block at or beyond b.Blocks(), because dropping it would lose a
// write.
func (b *Bitmap) Union(other *Bitmap) error {
	if other.blockSize != b.blockSize {
		return fmt.Errorf("bitmap: union of block sizes %d and %d", b.blockSize, other.blockSize)
	}
	if other.blocks > b.blocks {
		if i := other.nextSet(b.blocks); i < other.blocks {
			return fmt.Errorf("bitmap: union: block %d is beyond the %d blocks of the target", i, b.blocks)
		}
	}
	n := min(len(b.words), len(other.words))
	for i, w := range other.words[:n] {
		b.words[i] |= w
	}
	return nil
}

// Extents yields the dirty blocks as maximal runs in ascending order,
// splitting runs longer than maxBlocks so that each fits one read.
// maxBlocks <= 0 means no limit. The bitmap must not change during
// iteration.
func (b *Bitmap) Extents(maxBlocks int) iter.Seq[Extent] { return b.ExtentsFrom(0, maxBlocks) }

// ExtentsFrom is Extents from block start on; a run across start yields
// its part from start.
func (b *Bitmap) ExtentsFrom(start uint64, maxBlocks int) iter.Seq[Extent] {
	return b.ExtentsIn(start, b.blocks, maxBlocks)
}

// ExtentsIn is Extents within blocks [start, end): runs across either
// bound yield their part inside, and the scan stops at end.
func (b *Bitmap) ExtentsIn(start, end uint64, maxBlocks int) iter.Seq[Extent] {
	limit := uint64(math.MaxUint64)
	if maxBlocks > 0 {
		limit = uint64(maxBlocks)
	}
	end = min(end, b.blocks)
	return func(yield func(Extent) bool) {
		for i := b.nextSetBefore(start, end); i < end; {
			// Bounded by limit too: a caller that takes one extent and
			// starts again from its end scans each word once.
			stop := b.nextClearBefore(i, min(end, i+min(limit, end-i)))
			for i < stop {
				n := min(stop-i, limit)
				if !yield(Extent{Start: i, Len: n}) {
					return
				}
				i += n
			}
			i = b.nextSetBefore(stop, end)
		}
	}
}

// nextSet returns the first dirty block >= i, or Blocks() if none.
func (b *Bitmap) nextSet(i uint64) uint64 { return b.nextSetBefore(i, b.blocks) }

// nextSetBefore returns the first dirty block in [i, end), or end if none;
// it reads no word past end's. end must not exceed Blocks().
func (b *Bitmap) nextSetBefore(i, end uint64) uint64 {
	if i >= end {
		return end
	}
	wi := i / 64
	last := (end - 1) / 64
	w := b.words[wi] & (^uint64(0) << (i % 64))
	for w == 0 {
		wi++
		if wi > last {
			return end
		}
		w = b.words[wi]
	}
	return min(wi*64+uint64(bits.TrailingZeros64(w)), end)
}

// nextClearBefore returns the first clean block in [i, end), or end if
// none; it reads no word past end's. end must not exceed Blocks().
func (b *Bitmap) nextClearBefore(i, end uint64) uint64 {
	if i >= end {
		return end
	}
	wi := i / 64
	last := (end - 1) / 64
	w := ^b.words[wi] & (^uint64(0) << (i % 64))
	for w == 0 {
		wi++
		if wi > last {
			return end
		}
		w = ^b.words[wi]
	}
	return min(wi*64+uint64(bits.TrailingZeros64(w)), end)
}

// DrainAtomic moves every dirty bit out of words, which other goroutines
// or the kernel may be setting concurrently with atomic OR, and returns
// them as a bitmap of len(words)*64 blocks of DefaultBlockSize. Each bit
// set before the swap of its word lands in exactly one drain. words must
// be 8-byte aligned (true for Go slices and for mmap'd BPF array maps).
func DrainAtomic(words []uint64) *Bitmap {
	b := New(uint64(len(words)) * 64)
	b.Drain(words)
	return b
}

// Drain is DrainAtomic into an existing bitmap: it atomically clears
// every nonzero word of words and ORs the bits into b, without allocating.
// It returns the number of words that were nonzero. Bits of words beyond
// b.Blocks() are cleared from words and reported through ErrOutOfRange;
// the in-range bits are still merged.
func (b *Bitmap) Drain(words []uint64) (nonzero int, err error) {
	var lost uint64
	for i := range words {
		p := &words[i]
		// Load first: swapping a zero word would still take the
		// cache line exclusive and contend with the kernel's writers.
		if atomic.LoadUint64(p) == 0 {
			continue
		}
		w := atomic.SwapUint64(p, 0)
		if w == 0 {
			continue
		}
		nonzero++
		if i >= len(b.words) {
			lost += uint64(bits.OnesCount64(w))
			continue
		}
		if i == len(b.words)-1 && b.blocks%64 != 0 {
			mask := uint64(1)<<(b.blocks%64) - 1
			lost += uint64(bits.OnesCount64(w &^ mask))
			w &= mask
		}
		b.words[i] |= w
	}
	if lost > 0 {
		return nonzero, fmt.Errorf("%w: %d dirty bits beyond block %d", ErrOutOfRange, lost, b.blocks)
	}
	return nonzero, nil
}

// ErrOutOfRange reports dirty bits that do not fit the target bitmap.
var ErrOutOfRange = errors.New("bitmap: dirty blocks out of range")
