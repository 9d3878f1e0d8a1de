package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/stream"
	"github.com/lifeboat-dr/lifeboat/agent/stream/streamtest"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/loopdev"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

type protectRun struct {
	t       *testing.T
	cancel  context.CancelFunc
	done    chan error
	stopped bool
	synced  time.Time // when the initial sync ended, taken in OnSynced
	stats   ProtectStats
	out     bytes.Buffer
}

func startProtect(t *testing.T, cfg ProtectConfig) *protectRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &protectRun{t: t, cancel: cancel, done: make(chan error, 1)}
	synced := make(chan struct{})
	cfg.Out, cfg.Stats, cfg.OnSynced = &r.out, &r.stats, func() { r.synced = time.Now(); close(synced) }
	go func() { r.done <- RunProtect(ctx, cfg) }()
	t.Cleanup(func() { // a failed test must not leave the device open
		if !r.stopped {
			cancel()
			select {
			case <-r.done:
			case <-time.After(time.Minute):
			}
		}
	})
	select {
	case <-synced:
	case err := <-r.done:
		t.Fatalf("agent stopped before the initial sync: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("initial sync did not finish in a minute")
	}
	return r
}

func (r *protectRun) stop() ProtectStats {
	r.t.Helper()
	r.cancel()
	r.stopped = true
	select {
	case err := <-r.done:
		if err != nil {
			r.t.Fatalf("agent: %v", err)
		}
	case <-time.After(time.Minute):
		r.t.Fatal("agent did not stop within a minute")
	}
	if !strings.HasPrefix(r.out.String(), "counters: {") {
		r.t.Errorf("no counters line, got %q", r.out.String())
	}
	r.t.Log(strings.TrimSpace(r.out.String()))
	return r.stats
}

func assertReplica(t *testing.T, srv *streamtest.Server, disk, dev string) {
	t.Helper()
	want, err := readDirect(dev) // not the page cache: a reused loop number may serve stale pages
	if err != nil {
		t.Fatal(err)
	}
	got := srv.Image(disk)
	if len(got) != len(want) {
		t.Fatalf("replica of %s: %d bytes, device %d", disk, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("replica of %s differs from %s at byte %d (block %d)", disk, dev, i, i/4096)
			}
		}
	}
	if v := srv.Violations(); len(v) > 0 {
		t.Fatalf("protocol violations: %v", v)
	}
}

// A loop device streamed to a (fake) process server: full sync, writes,
// a replica lost at the process server mid-run, a clean restart that only
// sends what changed, and an unclean one that compares checksums. After
// each stop the replica equals the device.
func TestProtectLoopDevice(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "fio")
	d := loopdev.New(t, 64<<20, loopdev.Options{})
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=16", "oflag=direct", "status=none")
	srv := streamtest.New(t)
	srv.ClientTLS(t, "m1") // issues the machine's certificate
	state := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { ReleaseMachine(state, "m1") })
	disk := filepath.Base(d.Path)
	cfg := ProtectConfig{
		ProcessServer: srv.Addr, PKIDir: srv.PKIDir, Name: "m1",
		Devices:   []ProtectDevice{{Path: d.Path}},
		RingBytes: 16 << 20, StateDir: state, CrashInterval: 200 * time.Millisecond,
	}

	r := startProtect(t, cfg)
	for _, m := range srv.Markers() {
		if m.At.Before(r.synced.Add(-50 * time.Millisecond)) {
			t.Fatalf("time marker %+v sent during the initial sync", m.Marker)
		}
	}
	fio(t, d.Path, "--io_size=24m")
	// The process server loses the replica: the reconnect brings a full copy.
	lost := time.Now()
	srv.Forget(disk)
	srv.Drop()
	fio(t, d.Path, "--io_size=8m")
	// Time markers, held during the resync, resume after it (on the next
	// crash-consistent marker), and come to date times after it: the
	// first ones may be dated seconds back (a ring overflow during the
	// resync's read-back makes coverage wait for the stale sweep).
	deadline := time.Now().Add(30 * time.Second)
	for resumed := false; !resumed; {
		for _, m := range srv.Markers() {
			resumed = resumed || (m.Conn > 1 && time.Unix(0, m.UnixNano).After(lost))
		}
		if time.Now().After(deadline) {
			t.Fatal("time markers did not resume after the resync")
		}
		time.Sleep(20 * time.Millisecond)
	}
	s := r.stop()
	if s.Sync[0] != SyncFull.String() || s.Stream.Resyncs != 1 || s.Stream.Reconnects != 1 {
		t.Fatalf("first run: sync %v, %d resyncs, %d reconnects; want a full copy, then one forced by the lost replica", s.Sync, s.Stream.Resyncs, s.Stream.Reconnects)
	}
	if s.CrashMarkers == 0 {
		t.Error("no crash-consistent markers")
	}
	if !s.Stream.RecoverableUntil.After(lost) {
		t.Errorf("recoverable until %v, before the resync", s.Stream.RecoverableUntil)
	}
	assertReplica(t, srv, disk, d.Path)
	markers := 0
	for _, rec := range srv.Received() {
		if rec.Op == wire.OpMarker && wire.MarkerKind(rec.Flags) == wire.MarkerCrashConsistent {
			markers++
		}
	}
	if markers == 0 {
		t.Error("no crash-consistent marker records reached the process server")
	}

	// Written while the agent is down; a clean restart resumes.
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=64k", "seek=100", "count=16", "oflag=direct", "status=none")
	r = startProtect(t, cfg)
	fio(t, d.Path, "--io_size=8m")
	s = r.stop()
	if s.Sync[0] != SyncResume.String() || s.BytesReread >= 16<<20 {
		t.Fatalf("clean restart: %s, %d bytes re-read; want a resume", s.Sync[0], s.BytesReread)
	}
	assertReplica(t, srv, disk, d.Path)

	// As after a crash: the next run compares checksums.
	if err := ReleaseMachine(state, "m1"); err != nil {
		t.Fatal(err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=4k", "seek=1000", "count=10", "oflag=direct", "status=none")
	r = startProtect(t, cfg)
	s = r.stop()
	if s.Sync[0] != SyncCompare.String() || s.BlocksSkipped == 0 || s.Stream.SumDiffers == 0 || s.BytesReread > 1<<20 {
		t.Fatalf("unclean restart: %+v; want a checksum resync sending only the changed chunks", s)
	}
	assertReplica(t, srv, disk, d.Path)
}

type fakeStreamStats struct{}

func (fakeStreamStats) Stats() stream.Stats {
	return stream.Stats{ChurnBytes: 12345, PendingBytes: 77, AckedSeq: 42, Reconnects: 3, Connected: true}
}
func (fakeStreamStats) RPO() time.Duration { return 1500 * time.Millisecond }

func TestProtectMetrics(t *testing.T) {
	reg := protectMetrics("m1", fakeStreamStats{}, func() uint64 { return 9 }, time.Unix(1_900_000_000, 0))
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		`lifeboat_agent_churn_bytes_total{machine="m1"} 12345`,
		`lifeboat_agent_pending_bytes{machine="m1"} 77`,
		`lifeboat_agent_acked_seq{machine="m1"} 42`,
		`lifeboat_agent_overflow_events_total{machine="m1"} 9`,
		`lifeboat_agent_rpo_seconds{machine="m1"} 1.5`,
		`lifeboat_agent_reconnects_total{machine="m1"} 3`,
		`lifeboat_agent_connected{machine="m1"} 1`,
		`lifeboat_certificate_expiry_timestamp_seconds{machine="m1"} 1.9e+09`,
	} {
		if !strings.Contains(string(body), want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// With crash-consistent markers off, time markers held by a resync the
// process server asked for still resume once it ends: the engine marks
// the end of a resync with a consistency point (the process server takes
// the first time marker after a resync answer as the replicas whole
// again, and recoverable_until waits for it).
func TestTimeMarkersResumeAfterResyncWithoutCrashInterval(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	srv := streamtest.New(t)
	srv.ClientTLS(t, "m1")
	state := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { ReleaseMachine(state, "m1") })
	disk := filepath.Base(d.Path)
	r := startProtect(t, ProtectConfig{
		ProcessServer: srv.Addr, PKIDir: srv.PKIDir, Name: "m1",
		Devices: []ProtectDevice{{Path: d.Path}}, RingBytes: 4 << 20, StateDir: state,
	})
	lost := time.Now()
	srv.Forget(disk)
	srv.Drop()
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=64k", "count=16", "oflag=direct", "status=none")
	deadline := time.Now().Add(30 * time.Second)
	for resumed := false; !resumed; {
		for _, m := range srv.Markers() {
			resumed = resumed || (m.Conn > 1 && time.Unix(0, m.UnixNano).After(lost))
		}
		if time.Now().After(deadline) {
			t.Fatal("time markers did not resume after the resync")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s := r.stop(); s.Stream.Resyncs != 1 {
		t.Fatalf("%d resyncs, want 1 (the lost replica)", s.Stream.Resyncs)
	}
	assertReplica(t, srv, disk, d.Path)
}

// Dial saves the generations the process server answers with, a new
// replica among them: should the agent crash once it has, the next run
// must not find the last stop clean and resume onto the empty replica.
// So protect.json says unclean before Dial starts (here it never gets
// through: nothing listens).
func TestProtectUncleanBeforeDial(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	srv := streamtest.New(t)
	srv.ClientTLS(t, "m1") // issues the machine's certificate
	state := filepath.Join(t.TempDir(), "state")
	dir := MachineDir(state, "m1")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	devs, err := inspectDevices([]ProtectDevice{{Path: d.Path}})
	if err != nil {
		t.Fatal(err)
	}
	devs[0].Clean = true // as a clean stop left it
	path := filepath.Join(dir, protectStateFile)
	if err := saveJSON(path, &protectState{Version: stateVersion, Machine: "m1", Devices: devs}); err != nil {
		t.Fatal(err)
	}
	// The last run heard recoverable_until an hour ago.
	lastRU := time.Now().Add(-time.Hour).UTC()
	streamState := fmt.Sprintf(`{"version":1,"machine":"m1","next_seq":10,"acked_seq":9,"disks":[],"recoverable_until":%q}`, lastRU.Format(time.RFC3339Nano))
	if err := os.WriteFile(filepath.Join(dir, stream.StateFile), []byte(streamState), 0o600); err != nil {
		t.Fatal(err)
	}
	free := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	addr := free() // nothing listens: Dial retries until cancelled
	metrics := free()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- RunProtect(ctx, ProtectConfig{
			ProcessServer: addr, PKIDir: srv.PKIDir, Name: "m1",
			Devices: []ProtectDevice{{Path: d.Path}}, StateDir: state, Metrics: metrics,
		})
	}()
	// While the process server cannot be reached, the metrics say so, and
	// the RPO counts from the last run's recoverable_until.
	var body string
	for deadline := time.Now().Add(10 * time.Second); ; {
		body = scrape(t, "http://"+metrics+"/metrics")
		if body != "" || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(body, `lifeboat_agent_connected{machine="m1"} 0`) {
		t.Errorf("metrics while the process server is away lack connected 0:\n%s", body)
	}
	if rpo := metricValue(t, body, `lifeboat_agent_rpo_seconds{machine="m1"}`); rpo < 3600 {
		t.Errorf("RPO %v s while the process server is away, want at least an hour (the last run's recoverable_until)", rpo)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := loadProtectState(path)
		if err != nil {
			t.Fatal(err)
		}
		if !st.Devices[0].Clean {
			if st.Devices[0].Identity != devs[0].Identity {
				t.Errorf("protect.json names identity %q, want %q", st.Devices[0].Identity, devs[0].Identity)
			}
			break
		}
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatal("protect.json still says the last stop was clean while the agent dials the process server")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("a stop while the process server is away: %v, want a stop like any other (exit 0)", err)
	}
	// Dial never got through: nothing changed, the last stop stays clean.
	if st, err := loadProtectState(path); err != nil || !st.Devices[0].Clean {
		t.Fatalf("after a stop during Dial: %+v (%v), want the clean state restored", st, err)
	}
}

// scrape returns the body of a GET of url, "" if it fails.
func scrape(t *testing.T, url string) string {
	t.Helper()
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return ""
	}
	return string(b)
}

// metricValue returns the value of the sample named series in an
// exposition body (-1 if absent).
func metricValue(t *testing.T, body, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	return -1
}

// readDirect reads a whole block device with O_DIRECT.
func readDirect(dev string) ([]byte, error) {
	d, err := blockdev.Open(dev)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	size, err := d.Size()
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, size)
	buf := blockdev.AlignedBuffer(1 << 20)
	for off := int64(0); off < size; {
		n := min(int64(len(buf)), size-off)
		if _, err := d.ReadAtDirect(buf[:n], off); err != nil {
			return nil, fmt.Errorf("read %s at %d: %w", dev, off, err)
		}
		out = append(out, buf[:n]...)
		off += n
	}
	return out, nil
}

// gate forwards connections to addr once opened; until then it accepts
// and closes them, as a process server that is away.
type gate struct {
	ln      net.Listener
	opened  atomic.Bool
	refused atomic.Int64
}

func newGate(t *testing.T, addr string) *gate {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !g.opened.Load() {
				g.refused.Add(1)
				c.Close()
				continue
			}
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				defer up.Close()
				go io.Copy(up, c)
				io.Copy(c, up)
			}()
		}
	}()
	return g
}

// A device resized while the agent waits for the process server, after
// a clean stop, is not the one whose state the agent would resume from:
// refused once the process server answers, and the next start copies it
// anew.
func TestProtectDeviceChangedDuringDial(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTool(t, "losetup")
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	srv := streamtest.New(t)
	srv.ClientTLS(t, "m1") // issues the machine's certificate
	state := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { ReleaseMachine(state, "m1") })
	cfg := ProtectConfig{
		ProcessServer: srv.Addr, PKIDir: srv.PKIDir, Name: "m1",
		Devices: []ProtectDevice{{Path: d.Path}}, StateDir: state,
	}
	startProtect(t, cfg).stop()

	g := newGate(t, srv.Addr)
	away := cfg
	away.ProcessServer = g.ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- RunProtect(ctx, away) }()
	for deadline := time.Now().Add(30 * time.Second); g.refused.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the agent did not try the process server")
		}
	}
	if err := os.Truncate(d.File, 24<<20); err != nil {
		t.Fatal(err)
	}
	run(t, "losetup", "-c", d.Path)
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=24", "oflag=direct", "status=none")
	g.opened.Store(true)
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "changed while the agent waited") {
			t.Fatalf("agent with its device resized during Dial: %v, want it refused", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the agent did not stop once the process server answered")
	}
	s := startProtect(t, cfg).stop()
	if s.Sync[0] != SyncFull.String() {
		t.Errorf("next start: %s sync, want full", s.Sync[0])
	}
	assertReplica(t, srv, filepath.Base(d.Path), d.Path)
}

// A disk back after a reboot (the pinned capture gone, its loop image
// attached again: a new diskseq) is compared with its replica, in the
// same generation, not sent whole to a new one.
func TestProtectDiskBackAfterReboot(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	img := sparseImage(t, filepath.Join(dir, "disk.img"), 32<<20)
	attach := func() *loopdev.Device { return attachImage(t, img) }
	srv := streamtest.New(t)
	srv.ClientTLS(t, "m1") // issues the machine's certificate
	state := filepath.Join(dir, "state")
	t.Cleanup(func() { ReleaseMachine(state, "m1") })
	d := attach()
	cfg := ProtectConfig{
		ProcessServer: srv.Addr, PKIDir: srv.PKIDir, Name: "m1",
		Devices: []ProtectDevice{{Name: "disk", Path: d.Path}}, StateDir: state,
	}
	run(t, "dd", "if=/dev/urandom", "of="+d.Path, "bs=1M", "count=8", "oflag=direct", "status=none")
	if s := startProtect(t, cfg).stop(); s.Sync[0] != SyncFull.String() {
		t.Fatalf("first run: %s, want a full copy", s.Sync[0])
	}
	gen := srv.Generation("disk")
	if err := ReleaseMachine(state, "m1"); err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	run(t, "dd", "if=/dev/urandom", "of="+img, "bs=4k", "seek=3000", "count=5", "conv=notrunc", "status=none")
	d = attach()
	cfg.Devices = []ProtectDevice{{Name: "disk", Path: d.Path}}
	s := startProtect(t, cfg).stop()
	if s.Sync[0] != SyncCompare.String() || s.BlocksSkipped == 0 || s.BytesReread > 1<<20 {
		t.Fatalf("disk back after a reboot: %s sync, %d blocks equal, %d bytes re-read; want a checksum resync that sends the 5 changed blocks", s.Sync[0], s.BlocksSkipped, s.BytesReread)
	}
	if srv.Generation("disk") != gen {
		t.Error("the disk back after a reboot got a new replica generation")
	}
	assertReplica(t, srv, "disk", d.Path)
}

// A command line the agent cannot run (here one device under two names)
// is refused before the agent says hello: the process server would have
// added the disks to the machine for good, and closed the session of the
// agent already running.
func TestProtectRefusesOverlapBeforeHello(t *testing.T) {
	testenv.RequireRoot(t)
	d := loopdev.New(t, 16<<20, loopdev.Options{})
	srv := streamtest.New(t)
	srv.ClientTLS(t, "m1")
	g := newGate(t, srv.Addr) // never opened: counts connections
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err := RunProtect(ctx, ProtectConfig{
		ProcessServer: g.ln.Addr().String(), PKIDir: srv.PKIDir, Name: "m1",
		Devices:  []ProtectDevice{{Name: "a", Path: d.Path}, {Name: "b", Path: d.Path}},
		StateDir: filepath.Join(t.TempDir(), "state"),
	})
	if err == nil || !strings.Contains(err.Error(), "the same device") {
		t.Fatalf("one device protected twice: %v, want it refused", err)
	}
	if n := g.refused.Load(); n != 0 {
		t.Fatalf("the agent connected %d times before refusing its command line", n)
	}
}
