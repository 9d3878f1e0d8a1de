package agent

import (
	"sync/atomic"
	"testing"
)

// A compare asked while a full copy is pending (a second reconnect's gap
// after the first's new generation) must not replace it.
func TestRequestSyncKeepsStronger(t *testing.T) {
	e := &Engine{syncReq: make([]atomic.Int32, 1)}
	for _, tc := range []struct {
		asks []SyncKind
		want SyncKind
	}{
		{[]SyncKind{SyncFull, SyncCompare}, SyncFull},
		{[]SyncKind{SyncCompare, SyncFull}, SyncFull},
		{[]SyncKind{SyncCompare, SyncResume}, SyncCompare},
	} {
		e.syncReq[0].Store(0)
		for _, k := range tc.asks {
			e.RequestSync(0, k)
		}
		if got := SyncKind(e.syncReq[0].Load() - 1); got != tc.want {
			t.Errorf("asked %v: pending %v, want %v", tc.asks, got, tc.want)
		}
	}
}
