// Package spsc implements a bounded, lock-free single-producer
// single-consumer ring buffer with batch claim on both sides.
//
// It sits between the agent goroutine that reads the BPF ring buffer and
// the goroutine that consumes the events, where a Go channel's per-item
// lock and wake-up cost dominates at high event rates.
//
// Exactly one goroutine may act as the producer (Claim, Publish, TryPush,
// WaitSpace, Close) and exactly one as the consumer (Peek, Release, TryPop,
// Wait, Ready, Settle, Drained) at any time. Cap and Len may be called from anywhere.
package spsc

import (
	"context"
	"fmt"
	"io"
	"math/bits"
	"runtime"
	"sync/atomic"
)

// padSize is two 64-byte lines: x86 prefetches adjacent line pairs, so
// 64 bytes of separation still produces false sharing there.
const padSize = 128

// Before parking, a waiter polls spinBusy times, then yields spinYield
// times. Kept short: the agent host may have few cores and a long spin
// steals CPU from the very producer we wait for.
const (
	spinBusy  = 32
	spinYield = 8
)

// Ring is a bounded SPSC queue of T. The zero value is not usable; create
// one with New.
//
// Slots handed out by Claim and Peek alias the ring's storage. Released
// slots are not zeroed, so with a pointer-bearing T up to Cap() stale
// elements stay reachable until the producer overwrites them.
type Ring[T any] struct {
	_ [padSize]byte

	// Producer-owned: tail is stored only by the producer; the consumer
	// loads it. headCache is the producer's last view of head, so that a
	// claim touches the consumer's cache line only when the ring looks full.
	tail      atomic.Uint64
	headCache uint64
	claimed   uint64
	_         [padSize - 24]byte

	// Consumer-owned, mirroring the producer side.
	head      atomic.Uint64
	tailCache uint64
	peeked    uint64
	_         [padSize - 24]byte

	// Read-mostly after New.
	buf    []T
	mask   uint64
	closed atomic.Bool
	_      [padSize - 40]byte

	cons parker // consumer waiting for data
	prod parker // producer waiting for space
	_    [padSize]byte
}

// parker lets one side sleep until the other side makes progress. The
// other side signals only when parked is set, so an active peer costs one
// atomic load per batch instead of a channel operation per item.
type parker struct {
	parked atomic.Uint32
	ch     chan struct{} // capacity 1; a stale token only causes a re-check
}

// wake is called by the side that just made progress, after its
// progress store. Go atomics are sequentially consistent, so either this
// load sees parked==1 or the parking side's re-check sees our progress.
func (p *parker) wake() {
	if p.parked.Load() != 0 && p.parked.Swap(0) != 0 {
		select {
		case p.ch <- struct{}{}:
		default:
		}
	}
}

// New returns an empty ring with room for capacity elements. capacity must
// be a power of two and at least 2; New panics otherwise because a
// non-power-of-two size is a programming error, not a runtime condition.
func New[T any](capacity int) *Ring[T] {
	if capacity < 2 || bits.OnesCount(uint(capacity)) != 1 {
		panic(fmt.Sprintf("spsc: capacity %d is not a power of two >= 2", capacity))
	}
	r := &Ring[T]{
		buf:  make([]T, capacity),
		mask: uint64(capacity - 1),
	}
	r.cons.ch = make(chan struct{}, 1)
	r.prod.ch = make(chan struct{}, 1)
	return r
}

// Cap returns the ring's capacity.
func (r *Ring[T]) Cap() int { return len(r.buf) }

// Len returns the number of published, unreleased elements. Called from a
// goroutine other than producer or consumer, it is only a snapshot.
func (r *Ring[T]) Len() int {
	// Load head first: tail only grows, so tail-head cannot underflow.
	head := r.head.Load()
	return int(r.tail.Load() - head)
}

// Claim returns up to max free slots for the producer to fill, as at most
// two contiguous slices (b is non-empty only when the free space wraps
// around the end of the storage). len(a)+len(b) is zero when the ring is
// full. The slots become visible to the consumer only after Publish.
// A new Claim, or TryPush, discards any unpublished part of the previous one.
func (r *Ring[T]) Claim(max int) (a, b []T) {
	r.claimed = 0
	if max <= 0 {
		return nil, nil
	}
	tail := r.tail.Load()
	size := uint64(len(r.buf))
	free := size - (tail - r.headCache)
	if free < uint64(max) {
		r.headCache = r.head.Load()
		free = size - (tail - r.headCache)
	}
	n := min(free, uint64(max))
	if n == 0 {
		return nil, nil
	}
	r.claimed = n
	start := tail & r.mask
	if end := start + n; end <= size {
		return r.buf[start:end:end], nil
	}
	return r.buf[start:size:size], r.buf[: start+n-size : start+n-size]
}

// Publish makes the first n claimed slots visible to the consumer, in
// order. Several Publish calls may split one Claim; the slots published
// next are the ones following those already published. Publish panics if
// n exceeds the claimed, unpublished slots.
func (r *Ring[T]) Publish(n int) {
	if n < 0 || uint64(n) > r.claimed {
		panic(fmt.Sprintf("spsc: Publish(%d) with %d slots claimed", n, r.claimed))
	}
	if n == 0 {
		return
	}
	r.claimed -= uint64(n)
	r.tail.Store(r.tail.Load() + uint64(n))
	r.cons.wake()
}

// TryPush appends v and reports whether there was room.
func (r *Ring[T]) TryPush(v T) bool {
	r.claimed = 0
	tail := r.tail.Load()
	if tail-r.headCache == uint64(len(r.buf)) {
		r.headCache = r.head.Load()
		if tail-r.headCache == uint64(len(r.buf)) {
			return false
		}
	}
	r.buf[tail&r.mask] = v
	r.tail.Store(tail + 1)
	r.cons.wake()
	return true
}

// Close marks the end of the stream. Elements published before Close are
// still delivered; once they are drained, Wait returns io.EOF. Only the
// producer may call Close, and it must not publish afterwards. Close is
// idempotent.
func (r *Ring[T]) Close() {
	r.closed.Store(true)
	r.cons.wake()
}

// WaitSpace blocks the producer until at least one slot is free. It
// returns ctx.Err() if ctx is done first.
func (r *Ring[T]) WaitSpace(ctx context.Context) error {
	for i := 0; ; i++ {
		if r.writable() {
			return nil
		}
		if i < spinBusy+spinYield {
			if i >= spinBusy {
				runtime.Gosched()
			}
			continue
		}
		r.prod.parked.Store(1)
		if r.writable() {
			r.prod.parked.Store(0)
			return nil
		}
		select {
		case <-r.prod.ch:
		case <-ctx.Done():
			r.prod.parked.Store(0)
			return ctx.Err()
		}
	}
}

func (r *Ring[T]) writable() bool {
	r.headCache = r.head.Load()
	return r.tail.Load()-r.headCache < uint64(len(r.buf))
}

// Peek returns up to max published elements, oldest first, as at most two
// contiguous slices (b is non-empty only when the data wraps). The
// elements stay in the ring, and must not be retained, until Release.
// A new Peek, or TryPop, discards the unreleased part of the previous one.
func (r *Ring[T]) Peek(max int) (a, b []T) {
	r.peeked = 0
	if max <= 0 {
		return nil, nil
	}
	head := r.head.Load()
	avail := r.tailCache - head
	if avail < uint64(max) {
		r.tailCache = r.tail.Load()
		avail = r.tailCache - head
	}
	n := min(avail, uint64(max))
	if n == 0 {
		return nil, nil
	}
	r.peeked = n
	size := uint64(len(r.buf))
	start := head & r.mask
	if end := start + n; end <= size {
		return r.buf[start:end:end], nil
	}
	return r.buf[start:size:size], r.buf[: start+n-size : start+n-size]
}

// Release returns the first n peeked elements' slots to the producer.
// Release panics if n exceeds the peeked, unreleased elements.
func (r *Ring[T]) Release(n int) {
	if n < 0 || uint64(n) > r.peeked {
		panic(fmt.Sprintf("spsc: Release(%d) with %d elements peeked", n, r.peeked))
	}
	if n == 0 {
		return
	}
	r.peeked -= uint64(n)
	r.head.Store(r.head.Load() + uint64(n))
	r.prod.wake()
}

// TryPop removes and returns the oldest element; ok is false if the ring
// is empty (use Wait to tell "empty" from "closed and drained").
func (r *Ring[T]) TryPop() (v T, ok bool) {
	r.peeked = 0
	head := r.head.Load()
	if head == r.tailCache {
		r.tailCache = r.tail.Load()
		if head == r.tailCache {
			return v, false
		}
	}
	v = r.buf[head&r.mask]
	r.head.Store(head + 1)
	r.prod.wake()
	return v, true
}

// Wait blocks the consumer until at least one element can be peeked. It
// returns nil when data is available, io.EOF once the ring is closed and
// fully drained, or ctx.Err() if ctx is done first. Data wins over both
// close and cancellation.
//
// Wait polls briefly and then parks; the producer pays for a wake-up only
// when the consumer is actually parked.
func (r *Ring[T]) Wait(ctx context.Context) error {
	for i := 0; ; i++ {
		if r.readable() {
			return nil
		}
		if r.closed.Load() {
			// The last Publish happens before Close, so one more load
			// of tail is enough to see it.
			if r.readable() {
				return nil
			}
			return io.EOF
		}
		if i < spinBusy+spinYield {
			if i >= spinBusy {
				runtime.Gosched()
			}
			continue
		}
		r.cons.parked.Store(1)
		if r.readable() || r.closed.Load() {
			r.cons.parked.Store(0)
			continue
		}
		select {
		case <-r.cons.ch:
		case <-ctx.Done():
			r.cons.parked.Store(0)
			if r.readable() {
				return nil
			}
			return ctx.Err()
		}
	}
}

// Ready is Wait for a consumer that also waits on other events: it
// returns a channel that is ready once the ring may have become readable
// (closed at once if it is readable or closed now), to select on. Call
// Settle after the select, whichever case it took. A spurious wake-up is
// possible; a missed one is not.
func (r *Ring[T]) Ready() <-chan struct{} {
	r.cons.parked.Store(1)
	if r.readable() || r.closed.Load() {
		r.cons.parked.Store(0)
		return readyNow
	}
	return r.cons.ch
}

// Settle ends a wait begun by Ready.
func (r *Ring[T]) Settle() { r.cons.parked.Store(0) }

// Drained reports whether the ring is closed and empty: Ready will be
// ready at once from now on, with nothing to read.
func (r *Ring[T]) Drained() bool { return r.closed.Load() && !r.readable() }

// readyNow is always ready.
var readyNow = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

func (r *Ring[T]) readable() bool {
	r.tailCache = r.tail.Load()
	return r.tailCache != r.head.Load()
}
