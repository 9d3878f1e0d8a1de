package processserver

import (
	"context"
	"errors"
	"testing"
	"time"
)

// A hot segment's buffer is freed only when the segment entry and every
// reader have let go of it; the budget is freed at once.
func TestHotSegmentFreedAfterLastReader(t *testing.T) {
	s := &Server{}
	freed := 0
	h := s.newHot(make([]byte, 100, 300), func() { freed++ })
	if h == nil {
		t.Fatal("a 100-byte segment did not fit the hot budget")
	}
	if got := s.hotBytes.Load(); got != 300 {
		t.Fatalf("hot bytes = %d, want 300: the buffer's capacity is what it holds", got)
	}
	r := h.acquire() // an upload reading it
	s.dropHot(h)     // the entry is dropped meanwhile
	if got := s.hotBytes.Load(); got != 0 {
		t.Fatalf("hot bytes after drop = %d, want 0", got)
	}
	if freed != 0 {
		t.Fatal("buffer freed while a reader still holds it")
	}
	r.release()
	if freed != 1 {
		t.Fatalf("buffer freed %d times after the last release, want 1", freed)
	}
	if s.newHot(make([]byte, hotLimit+1), nil) != nil || s.hotBytes.Load() != 0 {
		t.Fatal("a segment over the hot limit was kept")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a second release did not panic")
		}
	}()
	r.release()
}

// Uploads that read their segment back from the cache are bounded across
// machines: past the bound one waits for a slot (or its context).
func TestColdReadsBounded(t *testing.T) {
	s := &Server{coldReads: make(chan struct{}, 2)}
	r1, err := s.acquireCold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r2, err := s.acquireCold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.acquireCold(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a third read past a bound of 2: %v, want it to wait until its context ends", err)
	}
	r1()
	r3, err := s.acquireCold(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r2()
	r3()
	if n := len(s.coldReads); n != 0 {
		t.Fatalf("%d slots held after every release", n)
	}
	if maxColdReads*DefaultSegmentBytes > hotLimit {
		t.Errorf("cold reads may hold %d bytes, more than the hot segments' %d", maxColdReads*DefaultSegmentBytes, hotLimit)
	}
}
