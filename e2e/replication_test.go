// Package e2e holds the end-to-end tests of replication (issue 3): real
// loop devices with ext4, the eBPF agent, the process server with its
// erasure-coded cache, Azurite, and recovery from the account alone. Every
// test ends comparing bytes: a recovered disk against the device, or
// against a copy of the device the test took at the point it recovers.
//
// They need root (loop devices, eBPF) and node/npm (Azurite); with
// AZURE_STORAGE_CONNECTION_STRING set they run against that account
// instead (except the outage test, which needs an emulator to stop).
package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent"
	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

const diskSize = 64 << 20

// 1. ext4 with a file workload → agent → process server → Azurite:
// `recover latest` equals the device once the workload stopped, and so
// does the replica page blob the applier keeps.
func TestFileWorkloadRecoverLatest(t *testing.T) {
	r := newRig(t, account(t), "m1")
	ps := r.startPS(psOpts{})
	d := newDisk(t, diskSize, true)
	a := r.startAgent(r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path}))

	mnt := mount(t, d.Path)
	workload(t, mnt, "a", 1)
	unmount(t, mnt)
	done := time.Now()

	r.waitRecoverable("m1", done.Add(settle), 2*time.Minute)
	want := readImage(t, d.Path)
	res := r.assertRecovered("m1", "d0", recovery.Latest, want, "after the workload")

	r.waitApplied("m1", res.Seq, 2*time.Minute)
	sameBytes(t, "replica page blob "+layout.DiskName("m1", "d0"), want, r.readReplica("m1", "d0", len(want)))
	// Crash-consistent points are cut at journal markers at least a point
	// interval apart; markers reach the journal with writes, so keep
	// writing a little until one is cut. Every write puts the same block
	// at the same place: the device is want before the first and marked
	// after it, and a point must hold one of the two.
	marked := bytes.Clone(want)
	copy(marked[len(marked)-4096:], bytes.Repeat([]byte{1}, 4096))
	deadline := time.Now().Add(time.Minute)
	var points []recovery.Point
	for {
		var err error
		if points, _, err = recovery.Points(context.Background(), r.store, "m1"); err != nil {
			t.Fatal(err)
		}
		// One cut after the workload: the first may have been cut
		// during it (one point interval after the first marker).
		if len(points) > 0 && points[len(points)-1].Seq >= res.Seq {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no recovery point was cut within a minute of writes after the workload")
		}
		if err := writeSync(d.Path, marked[len(marked)-4096:], int64(len(marked))-4096); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
	}

	p := points[len(points)-1]
	img, _ := r.recover("m1", "d0", fmt.Sprint(p.Seq))
	if got := readImage(t, img); !bytes.Equal(got, want) && !bytes.Equal(got, marked) {
		sameBytes(t, fmt.Sprintf("crash-consistent point %d (neither before nor after the marking writes)", p.Seq), marked, got)
	}
	r.waitRecoverable("m1", time.Now().Add(settle), 2*time.Minute)
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after the marking writes")

	s := a.stop()
	if s.Sync[0] != agent.SyncFull.String() || s.Stream.Resyncs != 0 || s.Stream.Reconnects != 0 {
		t.Errorf("agent: sync %v, %d resyncs, %d reconnects; want one full copy and nothing else", s.Sync, s.Stream.Resyncs, s.Stream.Reconnects)
	}
}

// writeSync writes b at off of path and syncs it.
func writeSync(path string, b []byte, off int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(b, off)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// 1b. The usual VM layout: the protected device is a whole disk with a
// partition table and the file system sits on a partition, so every write
// reaches the disk through the partition's device. The recovered disk
// equals the whole device, partition table included.
func TestPartitionedDiskRecoverLatest(t *testing.T) {
	testenv.RequireTool(t, "sfdisk")
	r := newRig(t, account(t), "m1")
	ps := r.startPS(psOpts{})
	d := loopdev.New(t, diskSize, loopdev.Options{PartScan: true})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	parts, err := loopdev.Partition(ctx, d.Path, loopdev.GPT, []loopdev.PartSpec{{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Mkfs(ctx, "ext4", parts[0]); err != nil {
		t.Fatal(err)
	}
	a := r.startAgent(r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path}))

	mnt := mount(t, parts[0])
	workload(t, mnt, "p", 3)
	unmount(t, mnt)
	done := time.Now()

	r.waitRecoverable("m1", done.Add(settle), 2*time.Minute)
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after the workload on the partition")
	a.stop()
}

// 2. Recovering to a time in the middle of the workload equals the copy of
// the device the test took at that time; an app-consistent point mounts
// cleanly and holds a file written before it.
//
// Points are cut rarely here (as in production, every few minutes), so
// recovering to T relies on the time markers in the journal alone; the
// agent that takes app-consistent points only starts after T (app markers
// would be points), by a clean restart that must resume.
func TestRecoverToTimeInTheMiddle(t *testing.T) {
	testenv.RequireTool(t, "e2fsck")
	testenv.RequireTool(t, "dumpe2fs")
	r := newRig(t, account(t), "m1")
	ps := r.startPS(psOpts{PointInterval: time.Hour})
	d := newDisk(t, diskSize, true)
	cfg := r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path})
	cfg.CrashInterval = 0
	a := r.startAgent(cfg)

	// Three rounds of workload, each followed by an idle gap in which the
	// test copies the device and notes the time T: the journal covers the
	// unmount's last write before T is taken, and covers T before the next
	// round starts, so that a time marker lies between the round's writes
	// and the next's whatever the agent's lag.
	type moment struct {
		at   time.Time
		copy []byte
	}
	var moments []moment
	for i := range 3 {
		mnt := mount(t, d.Path)
		workload(t, mnt, fmt.Sprintf("a%d", i), uint64(1+i))
		unmount(t, mnt)
		r.waitRecoverable("m1", time.Now().Add(settle), 2*time.Minute)
		m := moment{copy: readImage(t, d.Path), at: time.Now().UTC()}
		moments = append(moments, m)
		r.waitRecoverable("m1", m.at.Add(settle), 2*time.Minute)
	}

	mnt := mount(t, d.Path)
	workload(t, mnt, "b", 2)
	if s := a.stop(); s.AppMarkers != 0 {
		t.Fatalf("%d app-consistent markers with AppInterval 0", s.AppMarkers)
	}
	cfg.AppInterval = 2 * time.Second
	a = r.startAgent(cfg)
	// Written without fsync: it reaches the disk by the freeze of the next
	// app-consistent point at the latest.
	late := writtenFile{Path: "late", Data: bytes.Repeat([]byte("app-consistent "), 20000)}
	if err := os.WriteFile(filepath.Join(mnt, late.Path), late.Data, 0o644); err != nil {
		t.Fatal(err)
	}
	late.Closed = time.Now()
	// Mounted until an app-consistent point after late.Closed is in the
	// account (checked below).
	for deadline := time.Now().Add(time.Minute); ; {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		points, _, err := recovery.Points(ctx, r.store, "m1")
		cancel()
		if err == nil && slices.ContainsFunc(points, func(p recovery.Point) bool {
			return p.Kind == recovery.KindApp && p.Time.After(late.Closed)
		}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no app-consistent point after %s a minute later (err %v, %d points)", late.Closed.Format("15:04:05.000"), err, len(points))
		}
		time.Sleep(200 * time.Millisecond)
	}
	unmount(t, mnt)
	done := time.Now()
	r.waitRecoverable("m1", done.Add(settle), 2*time.Minute)

	for i, m := range moments {
		r.assertRecovered("m1", "d0", m.at.Format(time.RFC3339Nano), m.copy, fmt.Sprintf("at T%d, after round %d", i+1, i+1))
	}
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after phase 2")

	points, _, err := recovery.Points(context.Background(), r.store, "m1")
	if err != nil {
		t.Fatal(err)
	}
	var app *recovery.Point
	var kinds []string
	for i, p := range points {
		kinds = append(kinds, p.Kind)
		if p.Kind == recovery.KindApp && app == nil && p.Time.After(late.Closed) {
			app = &points[i]
		}
	}
	if app == nil {
		t.Fatalf("no app-consistent point after %s among %d points (kinds %v)", late.Closed.Format("15:04:05.000"), len(points), kinds)
	}
	img, _ := r.recover("m1", "d0", fmt.Sprint(app.Seq))
	check := &late
	// Read-only, so that neither the mount nor e2fsck can replay the
	// journal: a point that is not quiesced (needs_recovery set) fails
	// here instead of being repaired on the way.
	ld, err := loopdev.Attach(img, loopdev.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ld.Detach()
	if out, err := exec.Command("dumpe2fs", "-h", ld.Path).CombinedOutput(); err != nil {
		t.Fatalf("dumpe2fs -h of app-consistent point %d: %v\n%s", app.Seq, err, out)
	} else if bytes.Contains(out, []byte("needs_recovery")) {
		t.Fatalf("app-consistent point %d needs journal recovery: the file system was not frozen there", app.Seq)
	}
	if out, err := exec.Command("e2fsck", "-fn", ld.Path).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of app-consistent point %d: %v\n%s", app.Seq, err, out)
	}
	amnt := filepath.Join(t.TempDir(), "app")
	if err := loopdev.Mount(ld.Path, amnt, "ext4", "ro"); err != nil {
		t.Fatalf("app-consistent point %d does not mount: %v", app.Seq, err)
	}
	got, err := os.ReadFile(filepath.Join(amnt, check.Path))
	unmountQuiet(amnt)
	if err != nil {
		t.Fatalf("app-consistent point %d (%s): %v", app.Seq, app.Time.Format(time.RFC3339Nano), err)
	}
	sameBytes(t, fmt.Sprintf("%s in the app-consistent point %d", check.Path, app.Seq), check.Data, got)
	t.Logf("app-consistent point %d (%s) mounts, holds %s and is clean", app.Seq, app.Time.Format("15:04:05.000"), check.Path)

	s := a.stop()
	if s.AppMarkers == 0 {
		t.Error("the agent took no app-consistent marker")
	}
	if s.Sync[0] != agent.SyncResume.String() {
		t.Errorf("clean restart brought the disk up to date by %q, want %q", s.Sync[0], agent.SyncResume.String())
	}
}

// 3. Eight devices on two agents stream to one process server at once.
func TestEightDevicesTwoAgents(t *testing.T) {
	r := newRig(t, account(t), "m1", "m2")
	ps := r.startPS(psOpts{})
	var paths []string
	var devs [2][]agent.ProtectDevice
	for i := range 8 {
		d := newDisk(t, 32<<20, false)
		if i%2 == 0 { // half start with data
			if out, err := exec.Command("dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=8", "oflag=direct", "status=none").CombinedOutput(); err != nil {
				t.Fatalf("dd: %v %s", err, out)
			}
		}
		paths = append(paths, d.Path)
		devs[i/4] = append(devs[i/4], agent.ProtectDevice{Name: fmt.Sprintf("d%d", i), Path: d.Path})
	}
	a1 := r.startAgent(r.agentConfig("m1", ps.addr(), devs[0]...))
	a2 := r.startAgent(r.agentConfig("m2", ps.addr(), devs[1]...))

	start := time.Now()
	fio(t, "6m", paths...) // all eight at once
	done := time.Now()
	t.Logf("fio: 48 MiB over 8 devices in %v", done.Sub(start).Round(time.Millisecond))
	r.waitRecoverable("m1", done.Add(settle), 2*time.Minute)
	r.waitRecoverable("m2", done.Add(settle), 2*time.Minute)
	for i, p := range paths {
		r.assertRecovered(fmt.Sprintf("m%d", i/4+1), fmt.Sprintf("d%d", i), recovery.Latest, readImage(t, p), "after fio")
	}
	for _, a := range []*agentRun{a1, a2} {
		if s := a.stop(); s.Stream.Resyncs != 0 || s.Stream.Reconnects != 0 {
			t.Errorf("agent %s: %d resyncs, %d reconnects", a.name, s.Stream.Resyncs, s.Stream.Reconnects)
		}
	}
}

// 4. Azurite stopped for 30 s mid-workload, then started again: the cache
// absorbs the stream, the retries resume, nothing is lost.
func TestAzuriteOutage(t *testing.T) {
	testenv.RequireRoot(t)
	az := azurite.EmulatorForTest(t) // its own: the outage must not hit other tests
	r := newRig(t, az.ConnectionString(), "m1")
	ps := r.startPS(psOpts{})
	d := newDisk(t, diskSize, true)
	a := r.startAgent(r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path}))

	mnt := mount(t, d.Path)
	workload(t, mnt, "a", 1)
	c := startChurn(t, mnt, "b", 2, 100*time.Millisecond)
	time.Sleep(time.Second)
	if err := az.Down(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	t.Logf("azurite down")
	// The account is gone indeed: the test's own view of it fails too.
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	_, err := r.store.Stat(sctx, layout.ManifestName("m1"))
	scancel()
	if err == nil {
		t.Fatal("the account still answers after Azurite was stopped")
	}
	time.Sleep(time.Until(down.Add(30 * time.Second)))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := az.Up(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("azurite up again after %v", time.Since(down).Round(time.Millisecond))
	time.Sleep(time.Second)
	c.finish(t)
	workload(t, mnt, "c", 3)
	unmount(t, mnt)
	done := time.Now()

	r.waitRecoverable("m1", done.Add(settle), 3*time.Minute)
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after the outage")
	if !strings.Contains(r.psLog.String(), "retry") {
		t.Error("the process server logged no retry: did the outage happen?")
	}
	s := a.stop()
	if s.Stream.Resyncs != 0 || s.Stream.Reconnects != 0 {
		t.Errorf("agent: %d resyncs, %d reconnects during an outage the cache absorbed", s.Stream.Resyncs, s.Stream.Reconnects)
	}
}

// 5. The process server killed with SIGKILL mid-workload and started again
// on the same cache and address: nothing lost, no resync.
func TestProcessServerSIGKILL(t *testing.T) {
	r := newRig(t, account(t), "m1")
	addr := freePort(t)
	spec := helperSpec{Role: "process-server", PS: &processServerSpec{
		Listen: addr, PKI: r.pki, RecoveryKey: r.rkFile, ConnStr: r.cs, Container: r.container, Cache: r.cacheDirs(3),
	}}
	ps1, _ := startHelper(t, spec, "READY", time.Minute)
	d := newDisk(t, diskSize, true)
	a := r.startAgent(r.agentConfig("m1", addr, agent.ProtectDevice{Name: "d0", Path: d.Path}))

	mnt := mount(t, d.Path)
	workload(t, mnt, "a", 1)
	c := startChurn(t, mnt, "b", 2, 20*time.Millisecond)
	time.Sleep(1500 * time.Millisecond)
	ps1.kill()
	t.Logf("process server SIGKILLed after %d churn files", c.files.Load())
	time.Sleep(1500 * time.Millisecond) // writes go on; the agent keeps them
	ps2, _ := startHelper(t, spec, "READY", time.Minute)
	time.Sleep(1500 * time.Millisecond)
	c.finish(t)
	workload(t, mnt, "c", 3)
	unmount(t, mnt)
	done := time.Now()

	r.waitRecoverable("m1", done.Add(settle), 2*time.Minute)
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after the process server's SIGKILL")
	s := a.stop()
	if s.Stream.Reconnects == 0 {
		t.Error("the agent never reconnected: was the process server killed while it was connected?")
	}
	if s.Stream.Resyncs != 0 || s.Sync[0] != agent.SyncFull.String() {
		t.Errorf("agent: sync %v then %d resyncs; want the initial full copy only", s.Sync, s.Stream.Resyncs)
	}
	log := ps2.log.String()
	if !strings.Contains(log, "action=resume") || strings.Contains(log, "action=full-sync") || strings.Contains(log, "action=checksum-resync") {
		t.Errorf("restarted process server did not simply resume the agent:\n%s", grepLines(log, "agent connected"))
	}
	t.Logf("restarted process server: %s", grepLines(log, "agent connected"))
}

// 6. The agent killed with SIGKILL mid-workload and started again: it
// resyncs by checksum (not a full copy) and nothing is lost. Both agents
// run with only the capabilities of the shipped systemd unit: the first
// attaches capture, the second resumes the capture the first left pinned.
func TestAgentSIGKILL(t *testing.T) {
	r := newRig(t, account(t), "m1")
	ps := r.startPS(psOpts{})
	d := newDisk(t, diskSize, true)
	cfg := r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path})
	t.Cleanup(func() { agent.ReleaseMachine(cfg.StateDir, cfg.Name) })
	caps := unitCapabilities(t)
	prefix, capEff := leastPrivilege(t, caps)
	spec := helperSpec{Role: "agent", Prefix: prefix, Agent: &agentSpec{
		ProcessServer: cfg.ProcessServer, PKI: cfg.PKIDir, Name: cfg.Name, StateDir: cfg.StateDir,
		Devices: cfg.Devices, CrashInterval: cfg.CrashInterval,
	}}
	child, _ := startHelper(t, spec, "SYNCED", 3*time.Minute)
	assertCapabilities(t, child, capEff, caps)

	mnt := mount(t, d.Path)
	workload(t, mnt, "a", 1)
	c := startChurn(t, mnt, "b", 2, 50*time.Millisecond)
	time.Sleep(1500 * time.Millisecond)
	child.kill()
	t.Logf("agent SIGKILLed after %d churn files", c.files.Load())
	time.Sleep(1500 * time.Millisecond) // not captured by anyone

	a, _ := startHelper(t, spec, "SYNCED", 3*time.Minute)
	assertCapabilities(t, a, capEff, caps)
	time.Sleep(time.Second)
	c.finish(t)
	workload(t, mnt, "c", 3)
	unmount(t, mnt)
	done := time.Now()

	r.waitRecoverable("m1", done.Add(settle), 2*time.Minute)
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after the agent's SIGKILL")
	s := a.stopAgent()
	if len(s.Sync) == 0 || s.Sync[0] != agent.SyncCompare.String() {
		t.Errorf("restarted agent brought the disk up to date by %q, want %q", s.Sync, agent.SyncCompare.String())
	}
	if s.Stream.SumChunks == 0 || s.Stream.SumDiffers == 0 || s.Stream.SumDiffers == s.Stream.SumChunks || s.BlocksSkipped == 0 {
		t.Errorf("checksum resync compared %d chunks, %d differed, %d blocks equal: want some but not all to differ",
			s.Stream.SumChunks, s.Stream.SumDiffers, s.BlocksSkipped)
	}
	t.Logf("checksum resync: %d of %d chunks differed, %d bytes re-sent", s.Stream.SumDiffers, s.Stream.SumChunks, s.BytesReread)
}

// 7. One of three cache directories (2 data + 1 parity) wiped
// mid-workload: nothing lost.
func TestCacheDirectoryWiped(t *testing.T) {
	r := newRig(t, account(t), "m1")
	dirs := r.cacheDirs(3)
	// A slow upload keeps segments in the cache long enough for the wipe
	// to take shards that are still needed.
	ps := r.startPS(psOpts{Cache: dirs, UploadLimit: 4 << 20})
	d := newDisk(t, diskSize, true)
	a := r.startAgent(r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path}))

	mnt := mount(t, d.Path)
	workload(t, mnt, "a", 1)
	c := startChurn(t, mnt, "b", 2, 20*time.Millisecond)
	time.Sleep(1500 * time.Millisecond)
	durable := r.manifest("m1").DurableSeq
	shards, pending := cachedShards(t, filepath.Join(dirs[1], "m1"), durable)
	wipe(t, dirs[1])
	t.Logf("wiped %s holding %d shards, %d of segments not yet uploaded (durable_seq %d): their upload must rebuild them",
		dirs[1], shards, pending, durable)
	time.Sleep(1500 * time.Millisecond)
	c.finish(t)
	workload(t, mnt, "c", 3)
	unmount(t, mnt)
	done := time.Now()

	r.waitRecoverable("m1", done.Add(settle), 3*time.Minute)
	r.assertRecovered("m1", "d0", recovery.Latest, readImage(t, d.Path), "after a cache directory was wiped")
	if pending == 0 {
		t.Error("the wiped directory held no shard of a segment still to upload: the wipe tested nothing")
	}
	if s := a.stop(); s.Stream.Resyncs != 0 {
		t.Errorf("agent: %d resyncs: the process server lost data it had acknowledged", s.Stream.Resyncs)
	}
}

// cachedShards counts the shards in a cache directory's stream directory
// (named by the segment's first sequence, in hex), and those of segments
// starting after durable, i.e. not yet uploaded.
func cachedShards(t *testing.T, dir string, durable uint64) (shards, pending int) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".shard")
		if !ok {
			continue
		}
		shards++
		if seq, err := strconv.ParseUint(name, 16, 64); err == nil && seq > durable {
			pending++
		}
	}
	return shards, pending
}

// wipe removes everything in dir, like a replaced disk.
func wipe(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		// The process server keeps writing shards while we remove them, so
		// RemoveAll can meet a file created after it listed the directory.
		var err error
		for range 10 {
			if err = os.RemoveAll(filepath.Join(dir, e.Name())); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// 8. A certificate from another CA, and a process server's certificate
// used by an agent, are refused; a frame with a bad CRC is dropped with a
// clear error and nothing of it applied; a tampered journal segment is
// detected by recovery, which names the blob and writes no disk.
func TestSecurity(t *testing.T) {
	r := newRig(t, account(t), "m1")
	if err := pki.Issue(r.pki, "ps2", pki.RoleProcessServer); err != nil {
		t.Fatal(err)
	}
	ps := r.startPS(psOpts{})
	d := newDisk(t, 32<<20, false)
	if out, err := exec.Command("dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=24", "oflag=direct", "status=none").CombinedOutput(); err != nil {
		t.Fatalf("dd: %v %s", err, out)
	}
	cfg := r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path})
	cfg.CrashInterval = 0 // points only at time markers: the sync's segments have none
	a := r.startAgent(cfg)
	fio(t, "4m", d.Path)
	r.waitRecoverable("m1", time.Now().Add(settle), time.Minute)
	a.stop()
	want := readImage(t, d.Path)
	r.assertRecovered("m1", "d0", recovery.Latest, want, "before the attacks")
	before := r.manifest("m1")

	t.Run("foreign CA", func(t *testing.T) {
		other := filepath.Join(t.TempDir(), "other-pki")
		if err := pki.Init(other); err != nil {
			t.Fatal(err)
		}
		if err := pki.Issue(other, "m1", pki.RoleAgent); err != nil {
			t.Fatal(err)
		}
		// Even trusting any server, the client certificate is refused.
		mark := r.psLog.Len()
		err := tlsRefused(t, ps.addr(), filepath.Join(other, "m1"))
		t.Logf("client with a certificate of another CA: %v", err)
		waitLog(t, r.psLog, mark, "refused connection", "m1", "not by this deployment's CA")
		// The agent itself refuses a server of another CA, at once.
		foreign := r.agentConfig("m1", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path})
		foreign.PKIDir, foreign.StateDir = other, t.TempDir()
		err = runAgentBriefly(t, foreign)
		if err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Fatalf("agent with another CA's certificate: %v, want a certificate error", err)
		}
		t.Logf("agent with another CA: %v", err)
	})

	t.Run("process server certificate as agent", func(t *testing.T) {
		mark := r.psLog.Len()
		err := tlsRefused(t, ps.addr(), filepath.Join(r.pki, "ps2"))
		t.Logf("client with a process-server certificate: %v", err)
		waitLog(t, r.psLog, mark, "refused connection", "ps2", "presented role", "process-server")
		cfg := r.agentConfig("ps2", ps.addr(), agent.ProtectDevice{Name: "d0", Path: d.Path})
		cfg.StateDir = t.TempDir()
		err = runAgentBriefly(t, cfg)
		if err == nil || !strings.Contains(err.Error(), "role") {
			t.Fatalf("agent with a process-server certificate: %v, want a role error", err)
		}
		t.Logf("agent with a process-server certificate: %v", err)
	})

	t.Run("corrupt frame", func(t *testing.T) {
		mark := r.psLog.Len()
		_, rd, w := dialAgent(t, r, ps.addr(), "m1")
		man := r.manifest("m1")
		disk := man.Disk("d0")
		var gen wire.Generation
		if b, err := hex.DecodeString(disk.Generation); err != nil || len(b) != len(gen) {
			t.Fatalf("manifest generation %q", disk.Generation)
		} else {
			copy(gen[:], b)
		}
		if err := w.WriteHello(&wire.Hello{ProtocolVersion: 2, Machine: "m1", Disks: []wire.DiskState{{
			Name: "d0", Size: disk.Size, Generation: gen, LastAckedSeq: man.DurableSeq,
		}}}); err != nil {
			t.Fatal(err)
		}
		f, err := rd.Next()
		if err != nil || f.Type != wire.TypeHelloAck {
			t.Fatalf("want hello-ack, got %v %v", f.Type, err)
		}
		var ack wire.HelloAck
		if err := ack.UnmarshalBinary(f.Payload); err != nil || ack.Disks[0].Action != wire.SyncResume {
			t.Fatalf("hello-ack %+v %v, want resume", ack, err)
		}
		// A batch overwriting the first 64 KiB with 0xEE, one bit flipped.
		var bb wire.BatchBuilder
		if err := bb.Add(wire.Record{Seq: man.DurableSeq + 1, Disk: 0, Op: wire.OpWrite, Offset: 0, Length: 64 << 10,
			Data: bytes.Repeat([]byte{0xee}, 64<<10)}); err != nil {
			t.Fatal(err)
		}
		p, err := bb.AppendBinary(nil)
		if err != nil {
			t.Fatal(err)
		}
		frame, err := wire.AppendFrame(nil, wire.TypeBatch, 0, p)
		if err != nil {
			t.Fatal(err)
		}
		frame[wire.HeaderSize+1000] ^= 0x10
		if err := w.WriteRaw(frame); err != nil {
			t.Fatal(err)
		}
		var errFrame *wire.Error
		for {
			f, err := rd.Next()
			if err != nil {
				break
			}
			if f.Type == wire.TypeError {
				var e wire.Error
				if err := e.UnmarshalBinary(f.Payload); err != nil {
					t.Fatal(err)
				}
				errFrame = &e
			}
		}
		if errFrame == nil || !strings.Contains(errFrame.Message, "corrupt frame") {
			t.Fatalf("process server answered a corrupt frame with %+v, want an error naming it", errFrame)
		}
		t.Logf("process server to the agent: %s", errFrame.Message)
		waitLog(t, r.psLog, mark, "corrupt frame from agent m1", "crc mismatch")
		time.Sleep(2 * segmentAge) // anything applied would be cut and uploaded by now
		if after := r.manifest("m1"); after.DurableSeq != before.DurableSeq {
			t.Fatalf("durable_seq moved from %d to %d: something of the corrupt frame was kept", before.DurableSeq, after.DurableSeq)
		}
		r.assertRecovered("m1", "d0", recovery.Latest, want, "after the corrupt frame")
	})

	t.Run("tampered segment", func(t *testing.T) {
		ctx := context.Background()
		segs, err := recovery.ListSegments(ctx, r.store, "m1")
		if err != nil {
			t.Fatal(err)
		}
		points, _, err := recovery.Points(ctx, r.store, "m1")
		if err != nil {
			t.Fatal(err)
		}
		// A segment with no point at its last record: recovering to that
		// record must replay (part of) it.
		var seg *recovery.Segment
		for i, s := range segs {
			atPoint := false
			for _, p := range points {
				atPoint = atPoint || p.Seq == s.Last
			}
			if !atPoint {
				seg = &segs[i]
				break
			}
		}
		if seg == nil {
			t.Fatalf("every one of %d segments is at or before a recovery point (%d points)", len(segs), len(points))
		}
		info, err := r.store.Stat(ctx, seg.Name)
		if err != nil {
			t.Fatal(err)
		}
		blob, err := r.store.GetBlob(ctx, seg.Name)
		if err != nil {
			t.Fatal(err)
		}
		blob[len(blob)/2] ^= 0x01
		if err := r.store.PutBlob(ctx, seg.Name, blob, info.Metadata); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(t.TempDir(), "tampered.img")
		_, err = recovery.RecoverFile(ctx, r.store, recovery.Request{Machine: "m1", Disk: "d0", Point: fmt.Sprint(seg.Last), RecoveryKey: r.rk}, out)
		if !errors.Is(err, recovery.ErrTampered) || !strings.Contains(err.Error(), seg.Name) {
			t.Fatalf("recovery through tampered %s: %v, want ErrTampered naming the blob", seg.Name, err)
		}
		t.Logf("recovery: %v", err)
		if _, serr := os.Stat(out); !errors.Is(serr, os.ErrNotExist) {
			t.Fatalf("recovery left %s behind (%v)", out, serr)
		}
	})
}

// tlsRefused connects with the certificate cert (path without .crt/.key),
// trusting any server, and returns the error that refuses it. The client
// certificate is checked after the client's TLS 1.3 handshake returns, so
// the refusal shows on the first read.
func tlsRefused(t *testing.T, addr, cert string) error {
	t.Helper()
	kp, err := tls.LoadX509KeyPair(cert+".crt", cert+".key")
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{kp}, InsecureSkipVerify: true,
	})
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	w := wire.NewWriter(c)
	w.WriteHello(&wire.Hello{ProtocolVersion: 2, Machine: "m1"})
	f, err := wire.NewReader(c, 0).Next()
	if err == nil {
		t.Fatalf("process server accepted the certificate %s: sent a %s frame", filepath.Base(cert), f.Type)
	}
	if !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("certificate %s: %v, want a TLS certificate alert", filepath.Base(cert), err)
	}
	return err
}

// runAgentBriefly runs an agent that is expected to fail at once.
func runAgentBriefly(t *testing.T, cfg agent.ProtectConfig) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := agent.RunProtect(ctx, cfg)
	if ctx.Err() != nil {
		t.Fatalf("agent was not refused within 30 s (%v)", err)
	}
	return err
}

// dialAgent opens a valid mTLS connection as machine's agent.
func dialAgent(t *testing.T, r *rig, addr, machine string) (net.Conn, *wire.Reader, *wire.Writer) {
	t.Helper()
	id, err := pki.Load(r.pki, machine)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := channel.Client(ctx, raw, channel.Config(id.ClientTLS(addr, pki.RoleProcessServer)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	return c, wire.NewReader(c, 0), wire.NewWriter(c)
}

// waitLog waits until a line of l logged after offset mark contains every
// one of parts.
func waitLog(t *testing.T, l *logBuf, mark int, parts ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, line := range strings.Split(l.String()[mark:], "\n") {
			ok := true
			for _, p := range parts {
				ok = ok && strings.Contains(line, p)
			}
			if ok {
				t.Logf("process server logged: %s", line)
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("process server never logged a line with %q", parts)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// waitApplied polls the manifest until applied_seq reaches seq.
func (r *rig) waitApplied(machine string, seq uint64, timeout time.Duration) {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m := r.manifest(machine)
		if m.AppliedSeq >= seq {
			return
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("%s: applied_seq %d after %v, want ≥ %d (durable_seq %d)", machine, m.AppliedSeq, timeout, seq, m.DurableSeq)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// readReplica reads the first n bytes of a disk's replica page blob.
func (r *rig) readReplica(machine, disk string, n int) []byte {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	name := layout.DiskName(machine, disk)
	buf := make([]byte, n)
	for off := 0; off < n; off += blobstore.MaxPutPage {
		if err := r.store.ReadPages(ctx, name, "", int64(off), buf[off:min(off+blobstore.MaxPutPage, n)]); err != nil {
			r.t.Fatalf("read %s at %d: %v", name, off, err)
		}
	}
	return buf
}
