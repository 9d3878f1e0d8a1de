package capture

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/spsc"
)

// With BPF_RB_NO_WAKEUP the reader polls; a barrier or Stop wakes it at
// once (flush). Polls park in the runtime's poller (eventRing.wait).
// Without data-mode devices nothing but barriers, which wake the reader,
// goes through the ring: it then polls at idlePoll (at 10 ms, an agent
// protecting metadata-mode devices woke 100 times a second for nothing).
const (
	pollInterval = 10 * time.Millisecond
	idlePoll     = time.Second
)

// Item is what the consumer receives: a ring record (Raw), or a barrier
// that confirms everything committed to the BPF ring before the barrier
// was requested has been delivered.
type Item struct {
	Raw     []byte // in the ring: valid until the next Next or TryNext
	Barrier uint64 // non-zero: barrier id
	end     uint64 // ring position after Raw (0: a barrier)
	skip    bool   // a discarded record: only its space is released
}

// Reader moves records from the BPF ring to a lock-free SPSC queue as
// descriptors: the records stay in the ring, which the consumer releases
// one by one as it takes the next item, so the hot path copies and
// allocates nothing. One goroutine runs Run; one consumer uses
// Next/TryNext; RequestBarrier and Stop may be called from anywhere.
type Reader struct {
	ring    *eventRing
	poll    time.Duration
	q       *spsc.Ring[Item]
	held    uint64        // consumer side: end of the item returned last
	barrier atomic.Uint64 // highest requested barrier
	done    uint64        // producer side: highest delivered barrier
	stopped atomic.Bool

	RecordsRead atomic.Uint64
	BytesRead   atomic.Uint64
}

// NewReader wraps c's ring.
func NewReader(c *Capture) *Reader {
	r := &Reader{ring: c.ring, poll: idlePoll, q: spsc.New[Item](1 << 14)}
	for _, d := range c.devices {
		if d.Mode == ModeData {
			r.poll = pollInterval
		}
	}
	return r
}

// RequestBarrier asks the reader to deliver a barrier item after every
// record committed to the BPF ring before this call. It returns the
// barrier id.
func (r *Reader) RequestBarrier() uint64 {
	id := r.barrier.Add(1)
	r.ring.flush() // wake a reader waiting for records
	return id
}

// Stop makes Run return after it has read the ring empty once more.
func (r *Reader) Stop() {
	r.stopped.Store(true)
	r.ring.flush()
}

// Run reads until Stop (or ctx, seen at the next poll at the latest) and
// then closes the queue.
func (r *Reader) Run(ctx context.Context) error {
	defer r.q.Close()
	for {
		// What was asked before this read: a barrier (or stop) requested
		// later may have records committed after the ring read empty. A
		// record committed before the barrier was requested lies before
		// the producer position read after it: the barrier goes out once
		// the reader is there, even if writes keep the ring busy.
		barrier, stopped := r.barrier.Load(), r.stopped.Load()
		upTo := r.ring.produced()
		for {
			if barrier > r.done && r.ring.pos >= upTo {
				if err := r.push(ctx, Item{Barrier: barrier}); err != nil {
					return err
				}
				r.done = barrier
			}
			if barrier <= r.done {
				// One asked for during this read goes out at the
				// producer position read now, not once the ring reads
				// empty: under steady writes that may be a whole
				// backlog later, and a drain holds back every record
				// of its epoch until its barrier (and a marker waits).
				if b := r.barrier.Load(); b > barrier {
					barrier, upTo = b, r.ring.produced()
					continue
				}
			}
			raw, end, ok := r.ring.next()
			if !ok {
				break
			}
			it := Item{Raw: raw, end: end, skip: raw == nil}
			if !it.skip {
				r.RecordsRead.Add(1)
				r.BytesRead.Add(uint64(len(raw)))
			}
			if err := r.push(ctx, it); err != nil {
				return err
			}
		}
		// Ring empty (as far as committed records go).
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
			// Asked for during that read: read the ring empty once more
			// right away rather than after the next poll.
			continue
		}
		if err := r.ring.wait(r.poll); err != nil && !errors.Is(err, errRingFlushed) {
			return err
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
		if it, ok := r.TryNext(); ok {
			return it, nil
		}
		if err := r.q.Wait(ctx); err != nil {
			return Item{}, err
		}
	}
}

// Ready and Settle let the consumer wait for items in a select (see
// spsc.Ring.Ready).
func (r *Reader) Ready() <-chan struct{} { return r.q.Ready() }

// Settle ends a wait begun by Ready.
func (r *Reader) Settle() { r.q.Settle() }

// Stopped reports whether Run has returned and every item was taken.
func (r *Reader) Stopped() bool { return r.q.Drained() }

// TryNext returns the next item without blocking. The item returned
// before is released: its record's ring space goes back to the kernel.
func (r *Reader) TryNext() (Item, bool) {
	for {
		it, ok := r.q.TryPop()
		if !ok {
			return Item{}, false
		}
		if r.held != 0 {
			r.ring.release(r.held)
			r.held = 0
		}
		if it.end != 0 {
			r.held = it.end
		}
		if !it.skip {
			return it, true
		}
	}
}
