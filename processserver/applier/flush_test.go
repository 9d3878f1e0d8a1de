package applier

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
)

// countingStore records the page ranges each call touches, to check that
// the calls of one flush never share a page and respect the Put Page limit.
type countingStore struct {
	blobstore.Store
	mu      sync.Mutex
	touched map[int64]int
	bad     string
}

func (s *countingStore) touch(off, n int64, what string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n > blobstore.MaxPutPage && what == "write" {
		s.bad = "write larger than MaxPutPage"
	}
	for p := off / pageSize; p < (off+n)/pageSize; p++ {
		s.touched[p]++
		if s.touched[p] > 1 {
			s.bad = "two calls of one flush touched the same page"
		}
	}
}

func (s *countingStore) WritePages(ctx context.Context, name string, off int64, data []byte) error {
	s.touch(off, int64(len(data)), "write")
	return s.Store.WritePages(ctx, name, off, data)
}

func (s *countingStore) ClearPages(ctx context.Context, name string, off, n int64) error {
	s.touch(off, n, "clear")
	return s.Store.ClearPages(ctx, name, off, n)
}

// TestFlushRandom applies random batches of overlapping, unaligned writes
// and zeros and compares the blob with applying them in order to a slice.
func TestFlushRandom(t *testing.T) {
	ctx := context.Background()
	const size = 1 << 20
	base := mem.New()
	st := &countingStore{Store: base}
	if err := st.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := st.CreatePageBlob(ctx, "b", size, nil); err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(11, 12))
	var r resolver
	var ops []pendingOp
	for round := range 300 {
		ops = ops[:0]
		n := 1 + rng.IntN(40)
		// Cluster the ops in a small window on some rounds so they overlap a lot.
		window := int64(size)
		if round%2 == 0 {
			window = int64(8192 + rng.IntN(32768))
		}
		start := rng.Int64N(size - window + 1)
		for range n {
			l := 1 + rng.Int64N(min(window, 300<<10))
			if rng.IntN(3) == 0 {
				l = pageSize * (1 + rng.Int64N(min(window, 300<<10)/pageSize))
			}
			l = min(l, window)
			off := start + rng.Int64N(window-l+1)
			if rng.IntN(4) == 0 {
				off &^= pageSize - 1
			}
			o := pendingOp{off: off, end: off + l}
			if rng.IntN(4) != 0 {
				o.data = make([]byte, l)
				for i := range o.data {
					o.data[i] = byte(rng.Uint32() | 1)
				}
				if rng.IntN(3) == 0 && l > 200<<10 { // a long zero run inside
					clear(o.data[l/4 : 3*l/4])
				}
				copy(model[o.off:o.end], o.data)
			} else {
				clear(model[o.off:o.end])
			}
			ops = append(ops, o)
		}
		st.touched, st.bad = map[int64]int{}, ""
		if _, err := r.flush(ctx, st, "b", ops, 1+rng.IntN(4)); err != nil {
			t.Fatal(err)
		}
		if st.bad != "" {
			t.Fatalf("round %d: %s", round, st.bad)
		}
		got := make([]byte, size)
		if err := base.ReadPages(ctx, "b", "", 0, got); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			if got[i] != model[i] {
				t.Fatalf("round %d (%d ops): blob differs from the model at byte %d", round, n, i)
			}
		}
	}
}

func TestResolveLaterWins(t *testing.T) {
	a := []byte("aaaaaaaaaa")
	b := []byte("bbbb")
	var r resolver
	got := r.resolve([]pendingOp{
		{off: 0, end: 10, data: a},
		{off: 3, end: 7, data: b},
		{off: 5, end: 12},  // zeros
		{off: 12, end: 14}, // adjacent zeros merge
	})
	want := []frag{{0, 3, a[:3]}, {3, 5, b[:2]}, {5, 14, nil}}
	if len(got) != len(want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i].off != want[i].off || got[i].end != want[i].end || string(got[i].data) != string(want[i].data) {
			t.Fatalf("fragment %d: got %+v, want %+v", i, got[i], want[i])
		}
	}
}
