package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// io_uring tries an O_DIRECT write first with REQ_NOWAIT, and the block
// layer ends such a bio with BLK_STS_AGAIN rather than split it; io_uring
// then submits it again, without the flag. With the loop device's
// requests capped at 64 KiB, every first try of a 1 MiB write fails that
// way. Capture keeps
// those tries off the ring and reads nothing back for them: nothing was
// written, nothing recorded. Before, each one was recorded, applied, and
// read back when it failed.
func TestNowaitSplitNotRecorded(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	limit := filepath.Join("/sys/block", filepath.Base(d.Path), "queue", "max_sectors_kb")
	if err := os.WriteFile(limit, []byte("64"), 0); err != nil {
		t.Fatal(err)
	}
	tgt := newFileTarget(t)
	e, cancel, done := startEngine(t, Options{
		Sources:   []Source{{Name: "d0", Path: d.Path, Mode: capture.ModeData, Sync: SyncFull}},
		RingBytes: 32 << 20,
		Target:    tgt,
	})
	run(t, "fio", "--name=lb", "--filename="+d.Path, "--direct=1", "--ioengine=io_uring", "--rw=write",
		"--bs=1m", "--iodepth=4", "--size=100%", "--io_size=48m", "--output-format=terse")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	k := e.Stats().Kernel
	t.Logf("kernel counters: %+v", k)
	if k.NowaitSplits == 0 {
		t.Fatal("no REQ_NOWAIT write needing a split was seen: the test did not exercise the path")
	}
	if k.BitmapMarks != 0 || k.OverflowBios != 0 {
		t.Errorf("%d bitmap marks, %d overflows: the failed first tries were read back", k.BitmapMarks, k.OverflowBios)
	}
	assertSameBytes(t, d.Path, tgt.f.Name())
}
