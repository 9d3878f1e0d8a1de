package recovery_test

import (
	"context"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
)

// ListSegmentsFrom returns every segment ListSegments does whose first
// sequence lies in the range asked, across 10⁵-sequence blocks, and no
// segment the full listing does not.
func TestListSegmentsFrom(t *testing.T) {
	ctx := context.Background()
	s := mem.New()
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	bounds := []uint64{1, 99_990, 100_011, 250_000, 250_001, 399_999, 400_000, 2_500_000, 2_600_000}
	for i := 0; i+1 < len(bounds); i++ {
		if err := s.PutBlob(ctx, layout.SegmentName("m", bounds[i], bounds[i+1]-1), []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, other := range []string{layout.JournalPrefix("m") + "notes", layout.SegmentName("m0", 100_011, 100_012)} {
		if err := s.PutBlob(ctx, other, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
	}
	all, err := recovery.ListSegments(ctx, s, "m")
	if err != nil || len(all) != len(bounds)-1 {
		t.Fatalf("ListSegments: %d segments, %v; want %d", len(all), err, len(bounds)-1)
	}
	for _, r := range [][2]uint64{{1, 1}, {99_990, 100_011}, {100_011, 399_999}, {250_001, 250_001}, {399_999, 400_000},
		{400_000, 2_500_000}, {2_500_000, 9_000_000}, {5, 3}} {
		got, err := recovery.ListSegmentsFrom(ctx, s, "m", r[0], r[1])
		if err != nil {
			t.Fatal(err)
		}
		have := map[string]bool{}
		for _, g := range got {
			have[g.Name] = true
			// Within the blocks the range touches (all of them short).
			if lo, hi := r[0]/1e5*1e5, (r[1]/1e5+1)*1e5; r[0] <= r[1] && r[1]-r[0] < 1e6 && (g.First < lo || g.First >= hi) {
				t.Errorf("from %d to %d: %s listed, outside [%d, %d)", r[0], r[1], g.Name, lo, hi)
			}
		}
		for _, a := range all {
			if a.First >= r[0] && a.First <= r[1] && !have[a.Name] {
				t.Errorf("from %d to %d: %s missing", r[0], r[1], a.Name)
			}
			delete(have, a.Name)
		}
		if len(have) > 0 {
			t.Errorf("from %d to %d: %v are not segments of m", r[0], r[1], have)
		}
	}
}
