package spsc

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

func TestNewRejectsBadCapacity(t *testing.T) {
	for _, c := range []int{-4, 0, 1, 3, 6, 100} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("New(%d) did not panic", c)
				}
			}()
			New[int](c)
		}()
	}
}

// TestStreamOrder pushes 1e6 sequence numbers in random batch sizes and
// checks that the consumer, also reading in random batch sizes, sees each
// exactly once and in order, then sees io.EOF.
func TestStreamOrder(t *testing.T) {
	const total = 1_000_000
	n := total
	if testing.Short() {
		n = 100_000
	}
	r := New[uint64](256)
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()

	errc := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(1, 2))
		var next uint64
		for next < uint64(n) {
			// Alternate batch claims with single pushes so both paths
			// are exercised against each other.
			if rng.IntN(8) == 0 {
				if r.TryPush(next) {
					next++
				}
				continue
			}
			want := 1 + rng.IntN(300) // sometimes more than Cap
			a, b := r.Claim(min(want, n-int(next)))
			if len(a)+len(b) == 0 {
				if err := r.WaitSpace(ctx); err != nil {
					errc <- err
					return
				}
				continue
			}
			for i := range a {
				a[i] = next
				next++
			}
			for i := range b {
				b[i] = next
				next++
			}
			// Publish in up to two steps to cover partial publishes.
			k := rng.IntN(len(a) + len(b) + 1)
			r.Publish(k)
			r.Publish(len(a) + len(b) - k)
		}
		r.Close()
		errc <- nil
	}()

	rng := rand.New(rand.NewPCG(3, 4))
	var want uint64
	for {
		if rng.IntN(8) == 0 {
			if v, ok := r.TryPop(); ok {
				if v != want {
					t.Fatalf("TryPop = %d, want %d", v, want)
				}
				want++
			}
			continue
		}
		a, b := r.Peek(1 + rng.IntN(300))
		if len(a)+len(b) == 0 {
			err := r.Wait(ctx)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("Wait: %v (received %d of %d)", err, want, n)
			}
			continue
		}
		for _, s := range [][]uint64{a, b} {
			for _, v := range s {
				if v != want {
					t.Fatalf("got %d, want %d", v, want)
				}
				want++
			}
		}
		r.Release(len(a) + len(b))
	}
	if want != uint64(n) {
		t.Fatalf("received %d elements, want %d", want, n)
	}
	if err := <-errc; err != nil {
		t.Fatalf("producer: %v", err)
	}
}

func TestWrapAroundSlices(t *testing.T) {
	r := New[int](8)
	// Move head and tail to index 6.
	a, _ := r.Claim(6)
	r.Publish(len(a))
	a, _ = r.Peek(6)
	r.Release(len(a))

	a, b := r.Claim(100)
	if len(a) != 2 || len(b) != 6 {
		t.Fatalf("Claim at offset 6: len(a)=%d len(b)=%d, want 2 and 6", len(a), len(b))
	}
	if cap(a) != 2 || cap(b) != 6 {
		t.Fatalf("claimed slices must not allow appending into foreign slots: cap %d, %d", cap(a), cap(b))
	}
	for i := range a {
		a[i] = 10 + i
	}
	for i := range b {
		b[i] = 12 + i
	}
	r.Publish(8)
	if a, b := r.Claim(1); len(a)+len(b) != 0 {
		t.Fatalf("Claim on a full ring returned %d slots", len(a)+len(b))
	}
	if r.TryPush(99) {
		t.Fatal("TryPush on a full ring succeeded")
	}
	if r.Len() != 8 {
		t.Fatalf("Len = %d, want 8", r.Len())
	}

	a, b = r.Peek(5)
	if len(a) != 2 || len(b) != 3 {
		t.Fatalf("Peek(5) at offset 6: len(a)=%d len(b)=%d, want 2 and 3", len(a), len(b))
	}
	got := append(append([]int{}, a...), b...)
	for i, v := range got {
		if v != 10+i {
			t.Fatalf("element %d = %d, want %d", i, v, 10+i)
		}
	}
	r.Release(5)
	for i := 15; i < 18; i++ {
		v, ok := r.TryPop()
		if !ok || v != i {
			t.Fatalf("TryPop = %d, %v; want %d, true", v, ok, i)
		}
	}
	if _, ok := r.TryPop(); ok {
		t.Fatal("TryPop on an empty ring succeeded")
	}
}

func TestPublishReleaseBounds(t *testing.T) {
	mustPanic := func(name string, f func()) {
		t.Helper()
		defer func() {
			if recover() == nil {
				t.Errorf("%s did not panic", name)
			}
		}()
		f()
	}
	r := New[int](4)
	a, _ := r.Claim(3)
	mustPanic("Publish beyond claim", func() { r.Publish(len(a) + 1) })
	r.Publish(2)
	mustPanic("second Publish beyond remaining claim", func() { r.Publish(2) })
	r.Claim(4) // discards the unpublished slot
	r.Publish(0)
	p, _ := r.Peek(10)
	if len(p) != 2 {
		t.Fatalf("Peek saw %d elements, want the 2 published", len(p))
	}
	mustPanic("Release beyond peek", func() { r.Release(3) })
	mustPanic("negative Release", func() { r.Release(-1) })
}

func TestCloseDrainsThenEOF(t *testing.T) {
	r := New[int](4)
	r.TryPush(1)
	r.TryPush(2)
	r.Close()
	r.Close() // idempotent
	ctx := context.Background()
	for _, want := range []int{1, 2} {
		if err := r.Wait(ctx); err != nil {
			t.Fatalf("Wait with data after Close: %v", err)
		}
		if v, ok := r.TryPop(); !ok || v != want {
			t.Fatalf("TryPop = %d, %v; want %d", v, ok, want)
		}
	}
	for range 2 {
		if err := r.Wait(ctx); err != io.EOF {
			t.Fatalf("Wait on closed, drained ring = %v, want io.EOF", err)
		}
	}
}

func TestCloseWakesParkedConsumer(t *testing.T) {
	r := New[int](4)
	done := make(chan error, 1)
	go func() { done <- r.Wait(context.Background()) }()
	waitParked(t, &r.cons)
	r.Close()
	select {
	case err := <-done:
		if err != io.EOF {
			t.Fatalf("Wait = %v, want io.EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not wake the parked consumer")
	}
}

func TestPublishWakesParkedConsumer(t *testing.T) {
	r := New[int](4)
	done := make(chan error, 1)
	go func() { done <- r.Wait(context.Background()) }()
	waitParked(t, &r.cons)
	r.TryPush(7)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Wait = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("TryPush did not wake the parked consumer")
	}
}

func TestReleaseWakesParkedProducer(t *testing.T) {
	r := New[int](2)
	r.TryPush(1)
	r.TryPush(2)
	done := make(chan error, 1)
	go func() { done <- r.WaitSpace(context.Background()) }()
	waitParked(t, &r.prod)
	if _, ok := r.TryPop(); !ok {
		t.Fatal("TryPop on a full ring failed")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("WaitSpace = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Release did not wake the parked producer")
	}
}

func TestWaitHonoursContext(t *testing.T) {
	r := New[int](4)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := r.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v, want DeadlineExceeded", err)
	}
	if r.cons.parked.Load() != 0 {
		t.Fatal("cancelled Wait left the consumer marked as parked")
	}
	r.TryPush(1)
	r.TryPush(2)
	r.TryPush(3)
	r.TryPush(4)
	if err := r.WaitSpace(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitSpace = %v, want DeadlineExceeded", err)
	}
}

// waitParked waits until the other goroutine has gone to sleep, so the
// test exercises the channel wake-up rather than the spin phase.
func waitParked(t *testing.T, p *parker) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for p.parked.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("waiter never parked")
		}
		time.Sleep(time.Millisecond)
	}
}

// A consumer waiting in a select on Ready wakes for every push, however
// the push and the wait interleave: no wake-up is lost (run with -race).
func TestReadyNoLostWakeup(t *testing.T) {
	r := New[int](8)
	const n = 20000
	go func() {
		for i := range n {
			for !r.TryPush(i) {
				runtime.Gosched()
			}
			if i%64 == 0 {
				time.Sleep(time.Microsecond)
			}
		}
		r.Close()
	}()
	next := 0
	for next < n {
		if v, ok := r.TryPop(); ok {
			if v != next {
				t.Fatalf("popped %d, want %d", v, next)
			}
			next++
			continue
		}
		select {
		case <-r.Ready():
		case <-time.After(5 * time.Second):
			t.Fatalf("lost wake-up: waited 5 s with item %d due", next)
		}
		r.Settle()
	}
	select {
	case <-r.Ready(): // closed: ready at once
	case <-time.After(time.Second):
		t.Fatal("Ready did not report a closed ring")
	}
}

// Ready mixed with Wait and with a select that takes another case (which
// leaves a stale token behind): items still arrive in order with no lost
// wake-up, and Drained reports a closed, emptied ring.
func TestReadyMixedWithWait(t *testing.T) {
	r := New[int](4)
	const n = 5000
	go func() {
		for i := range n {
			for !r.TryPush(i) {
				runtime.Gosched()
			}
			if i%16 == 0 {
				time.Sleep(20 * time.Microsecond)
			}
		}
		r.Close()
	}()
	tick := time.NewTicker(10 * time.Microsecond)
	defer tick.Stop()
	for next := 0; next < n; {
		if r.Drained() {
			t.Fatalf("drained with item %d due", next)
		}
		if v, ok := r.TryPop(); ok {
			if v != next {
				t.Fatalf("popped %d, want %d", v, next)
			}
			next++
			continue
		}
		if next%3 == 0 {
			if err := r.Wait(context.Background()); err != nil {
				t.Fatal(err)
			}
			continue
		}
		select {
		case <-r.Ready():
		case <-tick.C: // leaves parked set, maybe a token behind
		case <-time.After(5 * time.Second):
			t.Fatalf("lost wake-up with item %d due", next)
		}
		r.Settle()
	}
	if err := r.Wait(context.Background()); !errors.Is(err, io.EOF) || !r.Drained() {
		t.Fatalf("after the last item: Wait = %v, Drained = %v", err, r.Drained())
	}
}
