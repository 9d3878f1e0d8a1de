package capture

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/lifeboat-dr/lifeboat/internal/spsc"
)

// Arena sizing: records are copied out of the BPF ring into large chunks
// and handed to the consumer as descriptors, so the hot path allocates
// nothing. A chunk is retired once less than a largest record fits.
const (
	maxRecordBytes = HeaderSize + 4<<20 // LB_MAX_RECORD_DATA
	chunkBytes     = 8 << 20
	arenaChunks    = 4
	// With BPF_RB_NO_WAKEUP the reader polls; a barrier or Stop wakes it
	// at once (Flush). Each poll is a blocking epoll_wait that holds a Go
	// P, and the runtime's sysmon churns while one is held.
	pollInterval = 10 * time.Millisecond
)

type chunk struct{ buf []byte }

// Item is what the consumer receives: a ring record (Raw), or a barrier
// that confirms everything committed to the BPF ring before the barrier
// was requested has been delivered.
type Item struct {
	Raw     []byte // valid until the item is released
	Barrier uint64 // non-zero: barrier id
	chunk   *chunk
}

// Reader moves records from the BPF ring to a lock-free SPSC queue.
// One goroutine runs Run; one consumer uses Next/Release/RequestBarrier.
type Reader struct {
	ring    *ringbuf.Reader
	q       *spsc.Ring[Item]
	free    chan *chunk
	cur     *chunk // consumer side: chunk of the last released item
	pos     int
	fill    *chunk        // producer side
	barrier atomic.Uint64 // highest requested barrier
	done    uint64        // producer side: highest delivered barrier
	stopped atomic.Bool

	RecordsRead atomic.Uint64
	BytesRead   atomic.Uint64
}

// NewReader wraps c's ring.
func NewReader(c *Capture) *Reader {
	r := &Reader{ring: c.Ring, q: spsc.New[Item](1 << 14), free: make(chan *chunk, arenaChunks)}
	for i := 0; i < arenaChunks; i++ {
		r.free <- &chunk{buf: make([]byte, chunkBytes)}
	}
	return r
}

// RequestBarrier asks the reader to deliver a barrier item once the BPF
// ring has been read empty after this call. It returns the barrier id.
func (r *Reader) RequestBarrier() uint64 {
	id := r.barrier.Add(1)
	r.ring.Flush() // wake a reader waiting for records
	return id
}

// Stop makes Run return after it has read the ring empty once more.
func (r *Reader) Stop() {
	r.stopped.Store(true)
	r.ring.Flush()
}

// Run reads until Stop (or ctx) and then closes the queue.
func (r *Reader) Run(ctx context.Context) error {
	defer r.q.Close()
	var rec ringbuf.Record
	idle := true
	for {
		if r.fill == nil || chunkBytes-r.pos < maxRecordBytes {
			if r.fill != nil {
				r.fill = nil
			}
			select {
			case c := <-r.free:
				r.fill, r.pos = c, 0
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if idle {
			// Only an empty ring needs a fresh deadline: with records
			// waiting, ReadInto returns them whatever the deadline.
			r.ring.SetDeadline(time.Now().Add(pollInterval))
			idle = false
		}
		// What was asked before this read: a barrier (or stop) requested
		// later may have records committed after the ring read empty.
		barrier, stopped := r.barrier.Load(), r.stopped.Load()
		rec.RawSample = r.fill.buf[r.pos:r.pos:chunkBytes]
		err := r.ring.ReadInto(&rec)
		switch {
		case err == nil:
			n := len(rec.RawSample)
			if n > 0 && &rec.RawSample[0] != &r.fill.buf[r.pos] {
				return fmt.Errorf("ring record of %d bytes exceeds the arena chunk", n)
			}
			r.pos = (r.pos + n + 7) &^ 7
			r.RecordsRead.Add(1)
			r.BytesRead.Add(uint64(n))
			if err := r.push(ctx, Item{Raw: rec.RawSample, chunk: r.fill}); err != nil {
				return err
			}
		case errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, ringbuf.ErrFlushed):
			// Ring empty (as far as committed records go).
			idle = true
			if barrier > r.done {
				if err := r.push(ctx, Item{Barrier: barrier}); err != nil {
					return err
				}
				r.done = barrier
			}
			if stopped {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if r.barrier.Load() > barrier || r.stopped.Load() {
				// Asked for during that read: read the ring empty once
				// more right away rather than after the next poll.
				r.ring.SetDeadline(time.Now())
				idle = false
			}
		default:
			return fmt.Errorf("read capture ring: %w", err)
		}
	}
}

func (r *Reader) push(ctx context.Context, it Item) error {
	for !r.q.TryPush(it) {
		if err := r.q.WaitSpace(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Next blocks for the next item; io.EOF after Run returned and all items
// were consumed.
func (r *Reader) Next(ctx context.Context) (Item, error) {
	for {
		if it, ok := r.q.TryPop(); ok {
			r.retire(it.chunk)
			return it, nil
		}
		if err := r.q.Wait(ctx); err != nil {
			return Item{}, err
		}
	}
}

// TryNext returns the next item without blocking.
func (r *Reader) TryNext() (Item, bool) {
	it, ok := r.q.TryPop()
	if ok {
		r.retire(it.chunk)
	}
	return it, ok
}

// retire returns the consumer's previous chunk to the producer once the
// consumer has moved on to another one. The item returned last stays valid
// until the next call to Next, because its chunk is kept.
func (r *Reader) retire(c *chunk) {
	if c == nil || c == r.cur {
		return
	}
	if r.cur != nil {
		r.free <- r.cur
	}
	r.cur = c
}
