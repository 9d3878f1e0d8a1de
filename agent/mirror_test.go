package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// mirrorRun is an agent mirror running in this process.
type mirrorRun struct {
	t       *testing.T
	cancel  context.CancelFunc
	done    chan error
	stats   Stats
	out     bytes.Buffer
	stopped bool
}

type runOpts struct {
	mode     capture.Mode
	ringMiB  int
	stateDir string
}

// startMirror runs RunMirror until stop and waits for the initial copy.
func startMirror(t *testing.T, dev, to string, o runOpts) *mirrorRun {
	t.Helper()
	if o.ringMiB == 0 {
		o.ringMiB = 16
	}
	if o.stateDir == "" {
		o.stateDir = filepath.Join(t.TempDir(), "state")
	}
	t.Cleanup(func() { Release(o.stateDir) })
	ctx, cancel := context.WithCancel(context.Background())
	r := &mirrorRun{t: t, cancel: cancel, done: make(chan error, 1)}
	synced := make(chan struct{})
	go func() {
		r.done <- RunMirror(ctx, MirrorConfig{
			Device: dev, To: to, Mode: o.mode, RingBytes: o.ringMiB << 20, StateDir: o.stateDir,
			Out: &r.out, Stats: &r.stats, OnSynced: func() { close(synced) },
		})
	}()
	t.Cleanup(func() { // before Release: a failed test must not leave the run going
		if !r.stopped {
			cancel()
			select {
			case <-r.done:
			case <-time.After(2 * time.Minute):
				t.Error("agent did not stop within 2 minutes of the test's end")
			}
		}
	})
	select {
	case <-synced:
	case err := <-r.done:
		t.Fatalf("agent stopped before the initial copy: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("initial copy did not finish in 2 minutes")
	}
	return r
}

// stop ends the run as SIGTERM does and returns its counters.
func (r *mirrorRun) stop() Stats {
	r.t.Helper()
	r.cancel()
	r.stopped = true
	select {
	case err := <-r.done:
		if err != nil {
			r.t.Fatalf("agent: %v", err)
		}
	case <-time.After(2 * time.Minute):
		r.t.Fatal("agent did not stop within 2 minutes")
	}
	if !strings.HasPrefix(r.out.String(), "counters: {") {
		r.t.Errorf("no counters line, got %q", r.out.String())
	}
	r.t.Logf("counters: %+v", r.stats)
	return r.stats
}

// assertSameBytes compares a device with its mirror, reporting the first
// difference. The device is read with O_DIRECT: its page cache can hold
// pages of an earlier test's device with the same loop number.
func assertSameBytes(t *testing.T, dev, mirror string) {
	t.Helper()
	a, err := blockdev.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	size, err := a.Size()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.Open(mirror)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	ba, bb := blockdev.AlignedBuffer(1<<20), make([]byte, 1<<20)
	var off int64
	for off < size {
		n := min(int64(len(ba)), size-off)
		if _, err := a.ReadAtDirect(ba[:n], off); err != nil {
			t.Fatalf("read %s at %d: %v", dev, off, err)
		}
		if _, err := io.ReadFull(b, bb[:n]); err != nil {
			t.Fatalf("%s is shorter than %s: %v at %d", mirror, dev, err, off)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			for i := range n {
				if ba[i] != bb[i] {
					t.Fatalf("%s and %s differ at byte %d (block %d)", dev, mirror, off+i, (off+i)/4096)
				}
			}
		}
		off += n
	}
	t.Logf("%s equals %s (%d bytes)", mirror, dev, off)
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// fio writes random extents with O_DIRECT. serialize_overlap: two
// overlapping writes in flight at once have no defined order on the device
// (the block layer may dispatch them in either order), so no replica could
// be checked against it byte for byte; applications do not do that.
func fio(t *testing.T, dev string, extra ...string) {
	t.Helper()
	testenv.RequireTool(t, "fio")
	args := append([]string{"--name=lb", "--filename=" + dev, "--direct=1", "--ioengine=libaio", "--rw=randwrite",
		"--bssplit=512/10:4k/40:64k/20:256k/20:1m/10", "--blockalign=512", "--serialize_overlap=1", "--iodepth=16", "--randrepeat=0",
		"--size=100%", "--io_size=96m", "--output-format=terse"}, extra...)
	run(t, "fio", args...)
}

// fileWorkload copies a tree, deletes part of it, writes random files and
// trims: the way a filesystem user churns a disk.
func fileWorkload(t *testing.T, mnt string, seed uint64) {
	t.Helper()
	src, err := testenv.GoSource("src/net") // ~10 MB of small files, on every machine with Go
	if err != nil {
		t.Fatal(err)
	}
	run(t, "cp", "-r", src, filepath.Join(mnt, "tree"))
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := range 8 {
		b := make([]byte, 1<<20+rng.IntN(3<<20))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		if err := os.WriteFile(filepath.Join(mnt, fmt.Sprintf("rand%d", i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	entries, err := os.ReadDir(filepath.Join(mnt, "tree"))
	if err != nil || len(entries) < 2 {
		t.Fatalf("the copied tree: %d entries, %v", len(entries), err)
	}
	for i, e := range entries {
		if i%2 == 0 {
			if err := os.RemoveAll(filepath.Join(mnt, "tree", e.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := os.Remove(filepath.Join(mnt, "rand3")); err != nil {
		t.Fatal(err)
	}
	run(t, "sync")
	run(t, "fstrim", mnt)
}

func fsRoundTrip(t *testing.T, fstype string, size int64) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "mkfs."+fstype)
	d := loopdev.New(t, size, loopdev.Options{})
	if err := loopdev.Mkfs(context.Background(), fstype, d.Path); err != nil {
		t.Fatal(err)
	}
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	r := startMirror(t, d.Path, mirror, runOpts{})
	mnt := t.TempDir()
	if err := loopdev.Mount(d.Path, mnt, fstype, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	fileWorkload(t, mnt, 1)
	if err := loopdev.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	s := r.stop()
	if s.Applied == 0 {
		t.Error("no records were applied: capture saw nothing")
	}
	assertSameBytes(t, d.Path, mirror)
}

// 1. O_DIRECT random writes of 512 B to 1 MiB.
func TestMirrorRandomDirectWrites(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 128<<20, loopdev.Options{})
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	r := startMirror(t, d.Path, mirror, runOpts{})
	fio(t, d.Path)
	s := r.stop()
	// Every write came through the ring unless the ring overflowed (a busy
	// machine can stall the reader); then some came through the bitmap's
	// read-back, and only the byte compare below can tell.
	if s.OverflowEvents == 0 && s.AppliedBytes < 96<<20 {
		t.Errorf("applied %d payload bytes without an overflow, fio wrote 96 MiB", s.AppliedBytes)
	}
	if s.AppliedBytes == 0 {
		t.Error("no payload came through the ring")
	}
	assertSameBytes(t, d.Path, mirror)
}

// 2. ext4: copy a tree, delete part of it, fstrim, unmount.
func TestMirrorExt4(t *testing.T) { fsRoundTrip(t, "ext4", 256<<20) }

// 3. The same on xfs (mkfs.xfs wants at least 300 MB).
func TestMirrorXFS(t *testing.T) { fsRoundTrip(t, "xfs", 512<<20) }

// partitionedDisk returns a 256 MiB GPT loop disk and its two partitions,
// ext4 on the first (100 MiB).
func partitionedDisk(t *testing.T) (d *loopdev.Device, p1, p2 string) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "sfdisk")
	d = loopdev.New(t, 256<<20, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(context.Background(), d.Path, loopdev.GPT, []loopdev.PartSpec{{Size: 100 << 20}, {}})
	if err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Mkfs(context.Background(), "ext4", parts[0]); err != nil {
		t.Fatal(err)
	}
	return d, parts[0], parts[1]
}

// partitionStart returns where partition p starts on its disk, in bytes.
func partitionStart(t *testing.T, p string) int64 {
	t.Helper()
	pd, err := blockdev.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer pd.Close()
	pl, err := pd.Placement()
	if err != nil {
		t.Fatal(err)
	}
	return pl.StartBytes()
}

// 4. One partition protected while the other is written too.
func TestMirrorPartition(t *testing.T) {
	d, p1, p2 := partitionedDisk(t)
	mirror := filepath.Join(t.TempDir(), "p1.img")
	r := startMirror(t, p1, mirror, runOpts{})
	mnt := t.TempDir()
	if err := loopdev.Mount(p1, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	// The neighbour partition is written at the same time.
	run(t, "dd", "if=/dev/urandom", "of="+p2, "bs=1M", "count=60", "oflag=direct", "status=none")
	fileWorkload(t, mnt, 2)
	if err := loopdev.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	// Writes to the whole disk land in the partition too: one inside it,
	// one across its end into the neighbour.
	startMiB := partitionStart(t, p1) >> 20
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=3", fmt.Sprintf("seek=%d", startMiB+40), "oflag=direct", "status=none")
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=4", fmt.Sprintf("seek=%d", startMiB+98), "oflag=direct", "status=none")
	r.stop()
	assertSameBytes(t, p1, mirror)
}

// 4b. A protected whole disk whose file system sits on one of its
// partitions: every write reaches the disk through a partition's device.
func TestMirrorWholeDiskPartitions(t *testing.T) {
	d, p1, p2 := partitionedDisk(t)
	mirror := filepath.Join(t.TempDir(), "disk.img")
	r := startMirror(t, d.Path, mirror, runOpts{})
	mnt := t.TempDir()
	if err := loopdev.Mount(p1, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	run(t, "dd", "if=/dev/urandom", "of="+p2, "bs=1M", "count=40", "seek=7", "oflag=direct", "status=none")
	fileWorkload(t, mnt, 3)
	if err := loopdev.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	s := r.stop()
	if s.Applied == 0 {
		t.Errorf("no write to the partitions was captured: %+v", s)
	}
	assertSameBytes(t, d.Path, mirror)
}

// A disk and one of its partitions cannot both be protected: each write
// would belong to two devices.
func TestMirrorRefusesDiskAndItsPartition(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "sfdisk")
	d := loopdev.New(t, 64<<20, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(context.Background(), d.Path, loopdev.GPT, []loopdev.PartSpec{{}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(Options{Sources: []Source{{Path: d.Path}, {Path: parts[0]}}, Target: &fileTarget{}})
	if err == nil || !strings.Contains(err.Error(), "not both") {
		t.Fatalf("protecting %s and %s: err = %v, want a refusal", d.Path, parts[0], err)
	}
}

// A device whose size is not the one its replica was agreed on (resized
// between the agreement and the engine's start) is refused, not
// protected under the other size.
func TestEngineRefusesResizedSource(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	_, err := New(Options{Sources: []Source{{Path: d.Path, Size: 32 << 20}}, Target: &fileTarget{}})
	if err == nil || !strings.Contains(err.Error(), "resized") {
		t.Fatalf("a 16 MiB device agreed on as 32 MiB: err = %v, want a refusal", err)
	}
	e, err := New(Options{Sources: []Source{{Path: d.Path, Size: 16 << 20}}, Target: &fileTarget{}})
	if err != nil {
		t.Fatalf("the size agreed on: %v", err)
	}
	e.Close()
}

// 5. Writes running during the initial copy.
func TestMirrorWritesDuringInitialCopy(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	d := loopdev.New(t, 512<<20, loopdev.Options{})
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=64", "oflag=direct", "status=none")
	// --thread: all of fio is one process, so nothing outlives it.
	fioCmd := exec.Command("fio", "--name=bg", "--thread", "--filename="+d.Path, "--direct=1", "--ioengine=libaio",
		"--rw=randwrite", "--bsrange=512-64k", "--serialize_overlap=1", "--iodepth=8", "--time_based", "--runtime=600", "--size=100%", "--rate=60m")
	if err := fioCmd.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan struct{})
	var fioErr error
	go func() { fioErr = fioCmd.Wait(); close(fioDone) }()
	defer func() {
		fioCmd.Process.Kill()
		<-fioDone
	}()
	time.Sleep(300 * time.Millisecond)
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	r := startMirror(t, d.Path, mirror, runOpts{})
	// fio runs until told to stop (however slow the host makes the
	// copy), and a while past the copy's end.
	select {
	case <-fioDone:
		t.Fatalf("fio ended before the initial copy did (%v): the test proves nothing", fioErr)
	case <-time.After(500 * time.Millisecond):
	}
	fioCmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-fioDone:
	case <-time.After(30 * time.Second):
		t.Fatal("fio did not stop within 30 s of SIGTERM")
	}
	// fio ends with status 128 when stopped by SIGTERM; anything else
	// is a failure of its own (an I/O error on the device).
	var ee *exec.ExitError
	if fioErr != nil && !(errors.As(fioErr, &ee) && ee.ExitCode() == 128) {
		t.Fatalf("fio: %v", fioErr)
	}
	s := r.stop()
	if s.Applied == 0 && s.BlocksReread <= uint64(512<<20/4096) {
		t.Error("nothing was captured while fio was writing")
	}
	// Records came in during the copy's read-back and were applied there,
	// some over blocks the copy had not reached yet: those covered whole
	// were not read, the others were read first.
	if s.AppliedAhead == 0 || s.ReadEarly == 0 || s.Overwritten == 0 {
		t.Errorf("records applied during the initial copy: %d, blocks ahead of it read first: %d, covered whole: %d; want all > 0",
			s.AppliedAhead, s.ReadEarly, s.Overwritten)
	}
	// The kernel now and then ends a write here without block_rq_complete:
	// capture settles it when its bio is reused (late_completions) or
	// sweeps it; a write counted in flight for good stalls the drain.
	if s.InflightTimeouts != 0 {
		t.Errorf("a write whose completion was missed held the drain: %+v", s)
	}
	assertSameBytes(t, d.Path, mirror)
}

// 6. Metadata mode: extents marked, blocks read back.
func TestMirrorMetadataMode(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 128<<20, loopdev.Options{})
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	r := startMirror(t, d.Path, mirror, runOpts{mode: capture.ModeMetadata})
	fio(t, d.Path)
	s := r.stop()
	if s.AppliedBytes != 0 {
		t.Errorf("metadata mode carried %d payload bytes", s.AppliedBytes)
	}
	// Writes are marked in the bitmap at completion, never put in the ring.
	if s.Kernel.Records != 0 || s.Kernel.BitmapMarks == 0 {
		t.Errorf("metadata mode: %d ring records, %d bitmap marks (want none, some)", s.Kernel.Records, s.Kernel.BitmapMarks)
	}
	if s.BlocksReread <= uint64(128<<20/4096) {
		t.Errorf("metadata mode read back nothing beyond the initial copy: %+v", s)
	}
	assertSameBytes(t, d.Path, mirror)
}

// 7. A 1 MiB ring under heavy writes overflows into the bitmap; nothing is lost.
func TestMirrorTinyRingOverflow(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 128<<20, loopdev.Options{})
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	r := startMirror(t, d.Path, mirror, runOpts{ringMiB: 1})
	fio(t, d.Path, "--iodepth=32", "--io_size=160m")
	s := r.stop()
	if s.OverflowEvents == 0 {
		t.Errorf("a 1 MiB ring did not overflow under fio: %+v", s)
	}
	assertSameBytes(t, d.Path, mirror)
}

// 8. Clean stop and restart between write phases: no full copy, and
// writes made while the agent was down are not lost.
func TestMirrorCleanRestart(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 128<<20, loopdev.Options{})
	dir := t.TempDir()
	mirror := filepath.Join(dir, "mirror.img")
	o := runOpts{stateDir: filepath.Join(dir, "state")}

	r := startMirror(t, d.Path, mirror, o)
	fio(t, d.Path, "--io_size=32m")
	if s := r.stop(); s.Sync[0] != SyncFull.String() {
		t.Fatalf("first run: %s, want a full copy", s.Sync[0])
	}
	assertSameBytes(t, d.Path, mirror)

	// While the agent is down.
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=64k", "seek=100", "count=16", "oflag=direct", "status=none")

	// A mistyped --to (a device too small) is refused, and leaves the
	// state of the real mirror as the clean stop left it.
	small := loopdev.New(t, 1<<20, loopdev.Options{})
	if err := RunMirror(context.Background(), MirrorConfig{Device: d.Path, To: small.Path, StateDir: o.stateDir}); err == nil || !strings.Contains(err.Error(), "smaller than") {
		t.Fatalf("mirror onto a device too small: %v", err)
	}

	r = startMirror(t, d.Path, mirror, o)
	fio(t, d.Path, "--io_size=32m")
	s := r.stop()
	if s.Sync[0] != SyncResume.String() {
		t.Fatalf("restart: %s, want resume from the pinned bitmap", s.Sync[0])
	}
	if s.BytesReread >= 64<<20 {
		t.Errorf("restart re-read %d bytes: that is a full copy", s.BytesReread)
	}
	assertSameBytes(t, d.Path, mirror)
}

// An unclean stop, or a mirror written by something else since a clean
// one, leads to a checksum resync; a replaced mirror to a full copy.
func TestMirrorUncleanAndReplacedTarget(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	dir := t.TempDir()
	mirror := filepath.Join(dir, "mirror.img")
	o := runOpts{stateDir: filepath.Join(dir, "state")}
	r := startMirror(t, d.Path, mirror, o)
	fio(t, d.Path, "--io_size=16m")
	r.stop()

	// Forget the clean stop, as a crash would, and write meanwhile.
	if err := Release(o.stateDir); err != nil {
		t.Fatal(err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=4k", "seek=1000", "count=10", "oflag=direct", "status=none")
	r = startMirror(t, d.Path, mirror, o)
	s := r.stop()
	if s.Sync[0] != SyncCompare.String() || s.BlocksSkipped == 0 || s.BytesReread > 1<<20 {
		t.Fatalf("after an unclean stop: %+v, want a checksum resync that copies only the 10 changed blocks", s)
	}
	assertSameBytes(t, d.Path, mirror)

	// After a clean stop, something else writes into the mirror (same
	// inode, same size): the state no longer describes it.
	run(t, "dd", "if=/dev/urandom", "of="+mirror, "bs=4k", "seek=2000", "count=3", "conv=notrunc", "status=none")
	r = startMirror(t, d.Path, mirror, o)
	if s := r.stop(); s.Sync[0] != SyncCompare.String() {
		t.Fatalf("mirror written by something else after a clean stop: %s, want a checksum resync", s.Sync[0])
	}
	assertSameBytes(t, d.Path, mirror)

	// A new file at the same path is not the mirror the state knows.
	os.Remove(mirror)
	os.WriteFile(mirror, []byte("x"), 0o600)
	r = startMirror(t, d.Path, mirror, o)
	if s := r.stop(); s.Sync[0] != SyncFull.String() {
		t.Fatalf("replaced mirror: %s, want a full copy", s.Sync[0])
	}
	assertSameBytes(t, d.Path, mirror)
}

func TestMirrorBadInput(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("x"), 0o600)
	err := RunMirror(context.Background(), MirrorConfig{Device: plain, To: filepath.Join(dir, "m"), StateDir: dir})
	if err == nil || !strings.Contains(err.Error(), "not a block device") {
		t.Errorf("regular file as device: %v", err)
	}
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	err = RunMirror(context.Background(), MirrorConfig{Device: d.Path, To: dir, StateDir: filepath.Join(dir, "s")})
	if err == nil || !strings.Contains(err.Error(), "mirror file") {
		t.Errorf("directory as mirror file: %v", err)
	}
	// A mirror file a loop device reads and writes too (attached to
	// look at the copy, or the source's own backing file).
	lf := filepath.Join(dir, "looped.img")
	if err := os.WriteFile(lf, make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	ld, err := loopdev.Attach(lf, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	lctx, lcancel := context.WithTimeout(context.Background(), 10*time.Second) // accepted, it would mirror on
	err = RunMirror(lctx, MirrorConfig{Device: d.Path, To: lf, StateDir: filepath.Join(dir, "sl")})
	lcancel()
	Release(filepath.Join(dir, "sl"))
	ld.Detach()
	if err == nil || !strings.Contains(err.Error(), "backs loop device "+ld.Path) {
		t.Errorf("mirror file backing a loop device: %v", err)
	}
	// The device's own backing file: said so, not "detach it".
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	err = RunMirror(sctx, MirrorConfig{Device: d.Path, To: d.File, StateDir: filepath.Join(dir, "sb")})
	scancel()
	Release(filepath.Join(dir, "sb"))
	if err == nil || !strings.Contains(err.Error(), "the backing file of "+d.Path) {
		t.Errorf("the device's own backing file as mirror file: %v", err)
	}
	// Attached read-only (losetup -r, to look at the copy), it writes
	// nothing: accepted.
	ro, err := loopdev.Attach(lf, loopdev.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ro.Detach() })
	if loops := blockdev.LoopsBackedBy(mustStat(t, lf)); len(loops) != 0 {
		t.Errorf("read-only loop device %s counted as writing to its backing file: %v", ro.Path, loops)
	}
	ro.Detach()
	// A character device other than /dev/null (a mistyped NVMe name)
	// would swallow the copy: refused. /dev/full fails writes anyway;
	// /dev/zero takes them silently.
	for _, cdev := range []string{"/dev/zero", "/dev/full"} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // accepted, it would mirror on
		state := filepath.Join(dir, "s"+filepath.Base(cdev))
		err = RunMirror(ctx, MirrorConfig{Device: d.Path, To: cdev, StateDir: state})
		cancel()
		Release(state)
		if err == nil || !strings.Contains(err.Error(), "character device") {
			t.Errorf("%s as mirror file: %v", cdev, err)
		}
	}

	// A state directory another agent holds is refused, to run and to
	// release (they would share one pinned capture).
	busy := filepath.Join(dir, "busy")
	os.MkdirAll(busy, 0o700)
	lock, err := lockState(busy)
	if err != nil {
		t.Fatal(err)
	}
	err = RunMirror(context.Background(), MirrorConfig{Device: d.Path, To: filepath.Join(dir, "m2"), StateDir: busy})
	if err == nil || !strings.Contains(err.Error(), "in use by another lifeboat agent") {
		t.Errorf("state directory in use: %v", err)
	}
	if err := Release(busy); err == nil || !strings.Contains(err.Error(), "in use by another lifeboat agent") {
		t.Errorf("release of a state directory in use: %v", err)
	}
	lock.Close()
	if err := Release(busy); err != nil {
		t.Errorf("release once free: %v", err)
	}
	if err := Release(filepath.Join(dir, "never")); err != nil {
		t.Errorf("release of a state directory never used: %v", err)
	}

	// A mirror device that is not there (not yet, or mistyped): no file
	// is made in its place on devtmpfs. /dev/shm is a file system of its
	// own, where a mirror file is fine.
	missing := "/dev/lifeboat-test-missing"
	mctx, mcancel := context.WithTimeout(context.Background(), 10*time.Second) // accepted, it would mirror on
	err = RunMirror(mctx, MirrorConfig{Device: d.Path, To: missing, StateDir: filepath.Join(dir, "sm")})
	mcancel()
	Release(filepath.Join(dir, "sm"))
	if _, serr := os.Stat(missing); serr == nil {
		os.Remove(missing)
		t.Errorf("%s made", missing)
	}
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing mirror device: %v", err)
	}
	if blockdev.OnDevtmpfs("/dev/shm") || !blockdev.OnDevtmpfs("/dev") {
		t.Errorf("OnDevtmpfs: /dev/shm %v, /dev %v", blockdev.OnDevtmpfs("/dev/shm"), blockdev.OnDevtmpfs("/dev"))
	}
}

// Markers: crash-consistent on a timer, app-consistent with the
// filesystem frozen; the mirror at the end still equals the device.
func TestMirrorMarkers(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 128<<20, loopdev.Options{})
	if err := loopdev.Mkfs(context.Background(), "ext4", d.Path); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := loopdev.Mount(d.Path, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Unmount(mnt) })
	dir := t.TempDir()
	mirror := filepath.Join(dir, "mirror.img")
	stateDir := filepath.Join(dir, "state")
	t.Cleanup(func() { Release(stateDir) })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var stats Stats
	synced := make(chan struct{})
	go func() {
		done <- RunMirror(ctx, MirrorConfig{Device: d.Path, To: mirror, RingBytes: 16 << 20, StateDir: stateDir,
			CrashInterval: 100 * time.Millisecond, AppInterval: 300 * time.Millisecond, Stats: &stats,
			OnSynced: func() { close(synced) }})
	}()
	select {
	case <-synced:
	case err := <-done:
		t.Fatalf("agent stopped before the initial copy: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("initial copy did not finish in 2 minutes")
	}
	for i := range 10 {
		os.WriteFile(filepath.Join(mnt, fmt.Sprintf("f%d", i)), bytes.Repeat([]byte{byte(i)}, 1<<20), 0o644)
		time.Sleep(100 * time.Millisecond)
	}
	// Both kinds of marker, however slow the host (waited for, not timed).
	markers := filepath.Join(stateDir, "markers.jsonl")
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(markers)
		if strings.Contains(string(b), `"kind":"app"`) && strings.Contains(string(b), `"kind":"crash"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no app and crash markers in %s after a minute:\n%s", markers, b)
		}
	}
	if err := loopdev.Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if stats.CrashMarkers == 0 || stats.AppMarkers == 0 {
		t.Fatalf("markers: %d crash, %d app; want both", stats.CrashMarkers, stats.AppMarkers)
	}
	b, err := os.ReadFile(filepath.Join(stateDir, "markers.jsonl"))
	if err != nil || !strings.Contains(string(b), `"kind":"app"`) || !strings.Contains(string(b), `"kind":"crash"`) {
		t.Fatalf("markers.jsonl lacks app or crash markers: %v\n%s", err, b)
	}
	assertSameBytes(t, d.Path, mirror)
}

// /dev/null as the mirror: capture runs (benchmarks measure it alone) and
// nothing tries to size, punch or fsync the character device.
func TestMirrorToDevNull(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 32<<20, loopdev.Options{})
	r := startMirror(t, d.Path, "/dev/null", runOpts{})
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=64k", "count=32", "oflag=direct", "status=none")
	run(t, "blkdiscard", "-o", "0", "-l", "1048576", d.Path)
	s := r.stop()
	if s.AppliedBytes < 2<<20 {
		t.Fatalf("captured %d payload bytes, dd wrote 2 MiB", s.AppliedBytes)
	}
	if fi, err := os.Stat("/dev/null"); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Fatalf("/dev/null is no longer a character device: %v %v", fi, err)
	}
}

// An existing mirror file others may read (made by truncate or cp under
// umask 022) is closed to them: it holds a copy of the disk.
func TestMirrorFileClosedToOthers(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	mirror := filepath.Join(t.TempDir(), "mirror.img")
	if err := os.WriteFile(mirror, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(mirror, 0o644); err != nil {
		t.Fatal(err)
	}
	r := startMirror(t, d.Path, mirror, runOpts{})
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=64k", "count=16", "oflag=direct", "status=none")
	r.stop()
	if fi, err := os.Stat(mirror); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mirror file mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	assertSameBytes(t, d.Path, mirror)
}

// A mirror device that holds the source, or that something uses (a
// mounted file system), is refused before a byte is written: the copy
// would overwrite what it copies, or a live file system.
func TestMirrorRefusesItsOwnDiskAndBusyDevices(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "sfdisk")
	d := loopdev.New(t, 64<<20, loopdev.Options{PartScan: true})
	parts, err := loopdev.Partition(t.Context(), d.Path, loopdev.GPT, []loopdev.PartSpec{{Size: 16 << 20}, {}})
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	for _, c := range []struct{ dev, to string }{{parts[0], d.Path}, {parts[0], parts[0]}, {d.Path, parts[1]}} {
		err := RunMirror(context.Background(), MirrorConfig{Device: c.dev, To: c.to, StateDir: state})
		if err == nil || !strings.Contains(err.Error(), "would overwrite what it copies") {
			t.Errorf("mirror of %s to %s: %v, want a refusal", c.dev, c.to, err)
		}
	}
	busy := loopdev.New(t, 64<<20, loopdev.Options{})
	if err := loopdev.Mkfs(t.Context(), "ext4", busy.Path); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := loopdev.Mount(busy.Path, mnt, "ext4", ""); err != nil {
		t.Fatal(err)
	}
	defer loopdev.Unmount(mnt)
	err = RunMirror(context.Background(), MirrorConfig{Device: parts[0], To: busy.Path, StateDir: state})
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("mirror to the mounted %s: %v, want a refusal", busy.Path, err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "lost+found")); err != nil {
		t.Errorf("the mounted file system was touched: %v", err)
	}
	// A mirror whose writes land on the source through a file system or
	// a loop device built on it: each copied write would be copied again.
	stacked, err := loopdev.Create(mnt, 8<<20, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer stacked.Detach()
	for _, to := range []string{filepath.Join(mnt, "mirror.img"), stacked.Path} {
		err := RunMirror(context.Background(), MirrorConfig{Device: busy.Path, To: to, StateDir: state})
		if err == nil || !strings.Contains(err.Error(), "would write to what it copies") {
			t.Errorf("mirror of %s to %s: %v, want a refusal", busy.Path, to, err)
		}
	}
	if _, err := os.Stat(filepath.Join(mnt, "mirror.img")); err == nil {
		t.Error("the refused mirror file was created")
	}
}

// A mirror device written by something else between two runs (mounted,
// fsck-ed, dd) is compared again, not resumed: the state does not
// describe it any more. Untouched, it is resumed.
func TestMirrorDeviceWrittenBetweenRuns(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	m := loopdev.New(t, 64<<20, loopdev.Options{})
	o := runOpts{stateDir: filepath.Join(t.TempDir(), "state")}
	r := startMirror(t, d.Path, m.Path, o)
	fio(t, d.Path, "--io_size=8m")
	r.stop()
	assertSameBytes(t, d.Path, m.Path)

	r = startMirror(t, d.Path, m.Path, o)
	if s := r.stop(); s.Sync[0] != SyncResume.String() {
		t.Fatalf("untouched mirror device: %s, want a resume", s.Sync[0])
	}
	run(t, "dd", "if=/dev/urandom", "of="+m.Path, "bs=4k", "seek=100", "count=4", "oflag=direct", "status=none")
	r = startMirror(t, d.Path, m.Path, o)
	if s := r.stop(); s.Sync[0] != SyncCompare.String() {
		t.Fatalf("mirror device written by something else after a clean stop: %s, want a checksum resync", s.Sync[0])
	}
	assertSameBytes(t, d.Path, m.Path)
	// Its backing file written directly: the device counts nothing.
	run(t, "dd", "if=/dev/urandom", "of="+m.File, "bs=4k", "seek=200", "count=4", "conv=notrunc", "status=none")
	r = startMirror(t, d.Path, m.Path, o)
	if s := r.stop(); s.Sync[0] != SyncCompare.String() {
		t.Fatalf("mirror device's backing file written after a clean stop: %s, want a checksum resync", s.Sync[0])
	}
	assertSameBytes(t, d.Path, m.Path)
}

// A stop before the initial copy is done exits as any stop does: counters
// printed, no error (saved unclean, the next run compares).
func TestMirrorStoppedDuringInitialCopy(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	to := filepath.Join(t.TempDir(), "mirror.img")
	state := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { Release(state) })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out bytes.Buffer
	if err := RunMirror(ctx, MirrorConfig{Device: d.Path, To: to, RingBytes: 16 << 20, StateDir: state, Out: &out}); err != nil {
		t.Fatalf("stopped during the initial copy: %v, want a clean exit", err)
	}
	if !strings.HasPrefix(out.String(), "counters: {") {
		t.Fatalf("no counters line, got %q", out.String())
	}
	r := startMirror(t, d.Path, to, runOpts{stateDir: state})
	if s := r.stop(); s.Sync[0] == SyncResume.String() {
		t.Fatalf("after a stop during the initial copy: %s, want a copy or a compare", s.Sync[0])
	}
	assertSameBytes(t, d.Path, to)
}

// A mirror partition of the source's own disk: the source written while
// no agent runs still resumes (the disk's counters count its partitions'
// writes, which are taken out), and the mirror written through the whole
// disk is compared again.
func TestMirrorPartitionWrittenBetweenRuns(t *testing.T) {
	d, p1, p2 := partitionedDisk(t)
	o := runOpts{stateDir: filepath.Join(t.TempDir(), "state")}
	r := startMirror(t, p1, p2, o)
	r.stop()
	assertSameBytes(t, p1, p2)

	run(t, "dd", "if=/dev/urandom", "of="+p1, "bs=4k", "seek=1000", "count=4", "oflag=direct", "status=none")
	r = startMirror(t, p1, p2, o)
	if s := r.stop(); s.Sync[0] != SyncResume.String() {
		t.Fatalf("source written while no agent ran, mirror untouched: %s, want a resume", s.Sync[0])
	}
	assertSameBytes(t, p1, p2)

	seek := partitionStart(t, p2)/4096 + 100
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=4k", fmt.Sprintf("seek=%d", seek), "count=4", "oflag=direct", "status=none")
	r = startMirror(t, p1, p2, o)
	if s := r.stop(); s.Sync[0] != SyncCompare.String() {
		t.Fatalf("mirror partition written through its disk: %s, want a checksum resync", s.Sync[0])
	}
	assertSameBytes(t, p1, p2)
}

// A mirror device whose queue does not count its I/O (queue/iostats 0,
// a common NVMe tuning) has counters that never move: nothing vouches
// that it was left alone between two runs, so it is compared.
func TestMirrorDeviceWithoutIOStats(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	m := loopdev.New(t, 64<<20, loopdev.Options{})
	iostats := filepath.Join("/sys/block", filepath.Base(m.Path), "queue", "iostats")
	if err := os.WriteFile(iostats, []byte("0"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The setting outlives the binding: the next user of the device
	// must find it counting.
	t.Cleanup(func() { os.WriteFile(iostats, []byte("1"), 0o644) })
	o := runOpts{stateDir: filepath.Join(t.TempDir(), "state")}
	r := startMirror(t, d.Path, m.Path, o)
	fio(t, d.Path, "--io_size=8m")
	r.stop()
	run(t, "dd", "if=/dev/urandom", "of="+m.Path, "bs=4k", "seek=100", "count=4", "oflag=direct", "status=none")
	r = startMirror(t, d.Path, m.Path, o)
	if s := r.stop(); s.Sync[0] == SyncResume.String() {
		t.Fatalf("mirror device without I/O accounting resumed after a clean stop: its counters vouch for nothing")
	}
	assertSameBytes(t, d.Path, m.Path)
}

func mustStat(t *testing.T, path string) os.FileInfo {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

// A device node with no disk behind it (a loop device not attached, a
// disconnected nbd device) reports 0 bytes: refused before the mirror
// file or the state is touched, not mirrored as an empty disk over the
// copy.
func TestMirrorRefusesDeviceWithoutMedia(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	to := filepath.Join(dir, "m.img")
	old := make([]byte, 1<<20)
	for i := range old {
		old[i] = byte(i * 7)
	}
	if err := os.WriteFile(to, old, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // accepted, it would mirror on
	defer cancel()
	err := RunMirror(ctx, MirrorConfig{Device: loopdev.Unbound(t), To: to, StateDir: filepath.Join(dir, "s")})
	Release(filepath.Join(dir, "s"))
	if err == nil || !strings.Contains(err.Error(), "no media") {
		t.Errorf("device without media: %v", err)
	}
	if got, _ := os.ReadFile(to); !bytes.Equal(got, old) {
		t.Errorf("the mirror file changed (%d bytes now)", len(got))
	}
}

// A device detached and its image attached again (as after a reboot: a
// new diskseq, maybe another loop number) is the same disk: compared with
// the mirror, not copied anew, whatever was written to it meanwhile.
// Another image behind the device is copied anew.
func TestMirrorSourceReattached(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	img := sparseImage(t, filepath.Join(dir, "src.img"), 64<<20)
	attach := func(file string) *loopdev.Device { return attachImage(t, file) }
	mirror := filepath.Join(dir, "mirror.img")
	o := runOpts{stateDir: filepath.Join(dir, "state")}
	d := attach(img)
	r := startMirror(t, d.Path, mirror, o)
	fio(t, d.Path, "--io_size=16m")
	if s := r.stop(); s.Sync[0] != SyncFull.String() {
		t.Fatalf("first run: %s, want a full copy", s.Sync[0])
	}
	assertSameBytes(t, d.Path, mirror)

	// The reboot: the pinned capture is gone, the device detached; the
	// image is written meanwhile, then attached again.
	if err := Release(o.stateDir); err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+img, "bs=4k", "seek=1000", "count=10", "conv=notrunc", "status=none")
	d = attach(img)
	r = startMirror(t, d.Path, mirror, o)
	s := r.stop()
	if s.Sync[0] != SyncCompare.String() || s.BlocksSkipped == 0 {
		t.Fatalf("image attached again: %s sync, %d blocks skipped; want a checksum resync", s.Sync[0], s.BlocksSkipped)
	}
	assertSameBytes(t, d.Path, mirror)

	// Another image of the same size behind a device: a full copy.
	other := filepath.Join(dir, "other.img")
	run(t, "cp", img, other)
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	d = attach(other)
	r = startMirror(t, d.Path, mirror, o)
	if s := r.stop(); s.Sync[0] != SyncFull.String() {
		t.Fatalf("another image: %s, want a full copy", s.Sync[0])
	}
	assertSameBytes(t, d.Path, mirror)
}

// sparseImage creates a sparse file of size bytes at path, for a loop
// device the test attaches and detaches itself (attachImage).
func sparseImage(t *testing.T, path string, size int64) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// attachImage attaches file to a loop device, detached at the test's end
// unless the test detached it before.
func attachImage(t *testing.T, file string) *loopdev.Device {
	t.Helper()
	d, err := loopdev.Attach(file, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Detach() })
	return d
}

// One mirror file takes one agent: a second, with a state directory of
// its own, is refused (before, both ran; each one's writes reached the
// file behind the other's state, and the last stop's stamp vouched for
// them, so that its next start resumed over bytes its device lacks).
func TestMirrorFileTakesOneAgent(t *testing.T) {
	testenv.RequireRoot(t)
	a := loopdev.New(t, 32<<20, loopdev.Options{})
	b := loopdev.New(t, 32<<20, loopdev.Options{})
	dir := t.TempDir()
	mirror := filepath.Join(dir, "mirror.img")
	ra := startMirror(t, a.Path, mirror, runOpts{stateDir: filepath.Join(dir, "stateA")})
	err := RunMirror(context.Background(), MirrorConfig{Device: b.Path, To: mirror, RingBytes: 16 << 20, StateDir: filepath.Join(dir, "stateB")})
	Release(filepath.Join(dir, "stateB"))
	if err == nil || !strings.Contains(err.Error(), "in use by another agent") {
		t.Fatalf("a second agent on the mirror file: %v, want refused", err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+a.Path, "bs=4k", "seek=100", "count=4", "oflag=direct", "status=none")
	ra.stop()
	assertSameBytes(t, a.Path, mirror)
}

// A loop device attached to the mirror file while the agent runs, and
// written through, makes the next start resync by checksum (before, the
// clean stop's stamp vouched for its write, and the next start resumed
// over a block the device does not hold).
func TestMirrorLoopAttachedDuringRun(t *testing.T) {
	testenv.RequireRoot(t)
	defer func(d time.Duration) { loopCheckEvery = d }(loopCheckEvery)
	loopCheckEvery = 50 * time.Millisecond
	a := loopdev.New(t, 32<<20, loopdev.Options{})
	dir := t.TempDir()
	mirror := filepath.Join(dir, "mirror.img")
	o := runOpts{stateDir: filepath.Join(dir, "state")}
	r := startMirror(t, a.Path, mirror, o)
	l, err := loopdev.Attach(mirror, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+l.Path, "bs=4k", "seek=100", "count=4", "oflag=direct", "status=none")
	time.Sleep(10 * loopCheckEvery)
	if err := l.Detach(); err != nil {
		t.Fatal(err)
	}
	r.stop()
	r = startMirror(t, a.Path, mirror, o)
	if s := r.stop(); s.Sync[0] != SyncCompare.String() {
		t.Fatalf("restart after a loop device wrote the mirror: %s, want a resync by checksum", s.Sync[0])
	}
	assertSameBytes(t, a.Path, mirror)
}

// A mirror whose target cannot hold the copy fails with a clear error,
// and is never vouched for: a mirror file on a file system too small is
// refused before anything is written (it used to fill the file system
// and fail part-way); a target that takes writes it cannot store (a
// thin volume: a loop device over a sparse file on a small file system)
// fails within the write-back interval, not at the stop days later.
func TestMirrorTargetFull(t *testing.T) {
	testenv.RequireRoot(t)
	src := loopdev.New(t, 32<<20, loopdev.Options{})
	run(t, "dd", "if=/dev/urandom", "of="+src.Path, "bs=1M", "count=32", "oflag=direct", "status=none")
	small := testenv.Tmpfs(t, 8<<20)
	dir := t.TempDir()

	to := filepath.Join(small, "mirror.img")
	state := filepath.Join(dir, "s1")
	for try := range 2 { // the command run again: not a compare into the sparse file
		err := RunMirror(context.Background(), MirrorConfig{Device: src.Path, To: to, RingBytes: 16 << 20, StateDir: state})
		Release(state)
		if err == nil || !strings.Contains(err.Error(), "free some space or give another --to") {
			t.Fatalf("run %d: mirror file on an 8 MiB file system for a 32 MiB device: %v, want refused for room", try, err)
		}
	}
	// Nor after an unclean stop that left the file sized but never
	// copied whole (a compare writes every block of it).
	if err := os.Truncate(to, 32<<20); err != nil {
		t.Fatal(err)
	}
	sd, err := blockdev.Open(src.Path)
	if err != nil {
		t.Fatal(err)
	}
	identity, _ := sd.Identity()
	stable, _ := sd.StableID()
	sd.Close()
	tf, err := os.Open(to)
	if err != nil {
		t.Fatal(err)
	}
	targetID, targetStable, err := fileIdentity(tf)
	tf.Close()
	if err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(to)
	if err := saveState(filepath.Join(state, "mirror.json"), &mirrorState{Version: stateVersion, Device: src.Path, Identity: identity, Stable: stable,
		Target: abs, TargetID: targetID, TargetStable: targetStable}); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err = RunMirror(context.Background(), MirrorConfig{Device: src.Path, To: to, RingBytes: 16 << 20, StateDir: state,
		Logger: slog.New(slog.NewTextHandler(&out, nil))})
	Release(state)
	if err == nil || !strings.Contains(err.Error(), "free some space or give another --to") || !strings.Contains(out.String(), "resync by checksum") {
		t.Fatalf("after an unclean stop: %v, want refused for room before a resync by checksum; log:\n%s", err, out.String())
	}
	if st := mustStat(t, to).Sys().(*syscall.Stat_t); st.Blocks != 0 {
		t.Errorf("the refused mirror file holds %d blocks", st.Blocks)
	}

	defer func(d time.Duration) { syncEvery = d }(syncEvery)
	syncEvery = 200 * time.Millisecond
	thin := attachImage(t, sparseImage(t, filepath.Join(small, "thin.img"), 32<<20))
	state = filepath.Join(dir, "s2")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err = RunMirror(ctx, MirrorConfig{Device: src.Path, To: thin.Path, RingBytes: 16 << 20, StateDir: state})
	Release(state)
	if ctx.Err() != nil || err == nil || !strings.Contains(err.Error(), "sync mirror "+thin.Path) {
		t.Fatalf("mirror to a device that cannot store it: %v (context: %v), want its write-back error", err, ctx.Err())
	}
	t.Logf("thin target: %v", err)
	if st, err := loadState(filepath.Join(state, "mirror.json")); err == nil && st.Clean {
		t.Error("the state after the failed mirror is clean: the next start would resume over what the target lost")
	}
}

// TestMirrorCompareOfPunchedMirror: discards punch holes in a mirror
// that was whole; with the room they gave back taken, a compare after an
// unclean stop is not refused for want of room for the whole device (it
// writes only what differs), as the compare after a reboot is not.
func TestMirrorCompareOfPunchedMirror(t *testing.T) {
	testenv.RequireRoot(t)
	src := loopdev.New(t, 32<<20, loopdev.Options{})
	run(t, "dd", "if=/dev/urandom", "of="+src.Path, "bs=1M", "count=32", "oflag=direct", "status=none")
	fs := testenv.Tmpfs(t, 40<<20)
	to := filepath.Join(fs, "mirror.img")
	o := runOpts{stateDir: filepath.Join(t.TempDir(), "state")}
	r := startMirror(t, src.Path, to, o)
	run(t, "blkdiscard", "-o", "0", "-l", "30M", src.Path) // fstrim of the free space
	time.Sleep(500 * time.Millisecond)
	r.stop()
	assertSameBytes(t, src.Path, to)
	st := mustStat(t, to).Sys().(*syscall.Stat_t)
	t.Logf("mirror holds %d KiB after the discards", st.Blocks/2)
	// Another file takes the room the holes gave back.
	run(t, "dd", "if=/dev/zero", "of="+filepath.Join(fs, "other.img"), "bs=1M", "count=30", "status=none")
	// A reboot after the clean stop (the pins gone, the state clean): the
	// engine compares every block, and no room is asked for.
	if err := unpin(o.stateDir); err != nil {
		t.Fatal(err)
	}
	r = startMirror(t, src.Path, to, o)
	if s := r.stop(); s.Sync[0] != SyncCompare.String() {
		t.Fatalf("after a reboot: %v", s.Sync)
	}
	assertSameBytes(t, src.Path, to)
	t.Logf("after a reboot the same compare ran; mirror holds %d KiB", mustStat(t, to).Sys().(*syscall.Stat_t).Blocks/2)
	// An unclean stop (as a crash leaves it).
	if err := Release(o.stateDir); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := RunMirror(ctx, MirrorConfig{Device: src.Path, To: to, RingBytes: 16 << 20, StateDir: o.stateDir,
		OnSynced: cancel, Out: io.Discard})
	if err != nil {
		t.Fatalf("restart after an unclean stop refused: %v (the compare writes 2 MiB at most)", err)
	}
	assertSameBytes(t, src.Path, to)
}

// A state directory another user may write, and an existing mirror file
// another user owns, are refused: the state decides what the agent
// trusts of its copy (and files it writes there by name could be planted
// links), and the copy of the disk would be that user's to read.
func TestMirrorRefusesOthersFiles(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	// Bounded: accepted, it would mirror on.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := RunMirror(ctx, MirrorConfig{Device: d.Path, To: filepath.Join(dir, "m.img"), RingBytes: 16 << 20, StateDir: open})
	Release(open)
	if err == nil || !strings.Contains(err.Error(), "must be this agent's alone") {
		t.Errorf("state directory writable by all: %v, want refused", err)
	}
	theirs := filepath.Join(dir, "theirs.img")
	if err := os.WriteFile(theirs, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(theirs, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	err = RunMirror(ctx, MirrorConfig{Device: d.Path, To: theirs, RingBytes: 16 << 20, StateDir: state})
	Release(state)
	if err == nil || !strings.Contains(err.Error(), "owned by uid 1000") {
		t.Errorf("mirror file owned by uid 1000: %v, want refused", err)
	}
	if fi := mustStat(t, theirs); fi.Size() != 0 {
		t.Errorf("their file was written: %d bytes", fi.Size())
	}
	// One the agent made, owned by another uid by the mount's rule (vfat
	// or CIFS mounted with uid=1000): its own state knows it.
	mine, state2 := filepath.Join(dir, "mine.img"), filepath.Join(dir, "state2")
	startMirror(t, d.Path, mine, runOpts{stateDir: state2}).stop()
	if err := os.Chown(mine, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	startMirror(t, d.Path, mine, runOpts{stateDir: state2}).stop()
	assertSameBytes(t, d.Path, mine)
}

// TestCompareWritesOnlyDifferingBlocks: a resync by checksum writes the
// blocks that differ, not the whole span read around them: here one
// block of a mirror whose every block is a hole (equal to the device's
// zeros) but that one.
func TestCompareWritesOnlyDifferingBlocks(t *testing.T) {
	testenv.RequireRoot(t)
	src := loopdev.New(t, 16<<20, loopdev.Options{})
	to := filepath.Join(t.TempDir(), "mirror.img")
	o := runOpts{stateDir: filepath.Join(t.TempDir(), "state")}
	startMirror(t, src.Path, to, o).stop()
	run(t, "fallocate", "--punch-hole", "--offset", "0", "--length", fmt.Sprint(16<<20), to)
	if err := Release(o.stateDir); err != nil { // an unclean stop: compared next
		t.Fatal(err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+src.Path, "bs=4k", "seek=3", "count=1", "oflag=direct", "status=none")
	s := startMirror(t, src.Path, to, o).stop()
	if s.Sync[0] != SyncCompare.String() {
		t.Fatalf("sync %v, want a resync by checksum", s.Sync)
	}
	assertSameBytes(t, src.Path, to)
	if held := mustStat(t, to).Sys().(*syscall.Stat_t).Blocks * 512; held > 64<<10 || s.BytesReread != 4096 {
		t.Fatalf("the compare wrote %d bytes, and the mirror holds %d: want one 4 KiB block", s.BytesReread, held)
	}
}
