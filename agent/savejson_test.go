package agent

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// A state that cannot be written whole (a full disk) is an error, and the
// state saved before stays. The write's error used to be dropped, and a
// truncated file renamed over the good one.
func TestSaveJSONFullDisk(t *testing.T) {
	dir := testenv.Tmpfs(t, 64<<10)
	path := filepath.Join(dir, "state.json")
	if err := saveJSON(path, map[string]int{"ok": 1}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)
	if err := saveJSON(path, map[string][]byte{"big": bytes.Repeat([]byte{7}, 256<<10)}); err == nil {
		t.Fatal("a state larger than the file system was saved without an error")
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Fatalf("the saved state changed: %q", after)
	}
	if _, err := os.Stat(path + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary file left: %v", err)
	}
}
