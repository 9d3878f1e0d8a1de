package recovery

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func TestRoomIn(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(dir, 0)
	if err := roomIn(dir, 100<<10); err != nil {
		t.Errorf("100 KiB in 1 MiB: %v", err)
	}
	if err := roomIn(dir, 2<<20); err == nil || !strings.Contains(err.Error(), "needs 2.0 MiB") {
		t.Errorf("2 MiB in 1 MiB: %v, want a refusal saying what it needs", err)
	}
}
