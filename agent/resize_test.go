package agent

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// A protected device that grows stops the agent with a clear error rather
// than missing the writes past its old end; the restart copies it again at
// its new size, and the mirror then equals the device.
func TestMirrorDeviceGrows(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "losetup")
	const oldSize, newSize = 32 << 20, 48 << 20
	d := loopdev.New(t, oldSize, loopdev.Options{})
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	state := filepath.Join(t.TempDir(), "state")
	r := startMirror(t, d.Path, mirror, runOpts{stateDir: state})
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=2", "oflag=direct", "status=none")
	if err := os.Truncate(d.File, newSize); err != nil {
		t.Fatal(err)
	}
	run(t, "losetup", "-c", d.Path)
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=4", "seek=40", "oflag=direct", "status=none")
	select {
	case err := <-r.done:
		r.stopped = true
		var re *ResizeError
		if !errors.As(err, &re) || re.Old != oldSize || re.New != newSize {
			t.Fatalf("agent stopped with %v, want a ResizeError from %d to %d bytes", err, oldSize, newSize)
		}
		t.Logf("agent: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the agent did not notice that the device grew")
	}
	r.cancel()
	startMirror(t, d.Path, mirror, runOpts{stateDir: state}).stop()
	assertSameBytes(t, d.Path, mirror)
}
