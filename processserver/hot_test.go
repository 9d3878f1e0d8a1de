package processserver

import "testing"

// A hot segment's buffer goes back for reuse only when the segment entry
// and every reader have let go of it; the budget is freed at once.
func TestHotSegmentRecycledAfterLastReader(t *testing.T) {
	s := &Server{freeSealed: make(chan []byte, 2)}
	h := s.newHot(make([]byte, 100, 128))
	if h == nil {
		t.Fatal("a 100-byte segment did not fit the hot budget")
	}
	if got := s.hotBytes.Load(); got != 100 {
		t.Fatalf("hot bytes = %d, want 100", got)
	}
	r := h.acquire() // an upload reading it
	s.dropHot(h)     // the entry is dropped meanwhile
	if got := s.hotBytes.Load(); got != 0 {
		t.Fatalf("hot bytes after drop = %d, want 0", got)
	}
	if b := s.getSealed(); b != nil {
		t.Fatal("buffer recycled while a reader still holds it")
	}
	r.release()
	b := s.getSealed()
	if b == nil || len(b) != 0 || cap(b) != 128 {
		t.Fatalf("recycled buffer len %d cap %d, want an empty one of cap 128", len(b), cap(b))
	}
	if s.newHot(make([]byte, hotLimit+1)) != nil || s.hotBytes.Load() != 0 {
		t.Fatal("a segment over the hot limit was kept")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a second release did not panic")
		}
	}()
	r.release()
}
