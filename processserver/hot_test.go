package processserver

import "testing"

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
