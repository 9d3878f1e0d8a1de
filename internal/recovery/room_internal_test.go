package recovery

import (
	"strings"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestRoomIn(t *testing.T) {
	dir := testenv.Tmpfs(t, 1<<20)
	if err := roomIn(dir, 100<<10); err != nil {
		t.Errorf("100 KiB in 1 MiB: %v", err)
	}
	if err := roomIn(dir, 2<<20); err == nil || !strings.Contains(err.Error(), "needs 2.0 MiB") {
		t.Errorf("2 MiB in 1 MiB: %v, want a refusal saying what it needs", err)
	}
}
