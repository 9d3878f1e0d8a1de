// Package agent is the protected-server role: it captures every write to
// the protected block devices with eBPF and keeps a target (a mirror file
// now, a process server later) equal to them.
package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat/agent/capture"
	"github.com/lifeboat-dr/lifeboat/internal/bitmap"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/fsfreeze"
	"github.com/lifeboat-dr/lifeboat/internal/progress"
)

// Log keys.
const (
	keyDevice = "device"
	keyBlocks = "blocks"
	keyKind   = "kind"
	keySeq    = "seq"
)

// Target receives the replicated state of the protected devices. Calls
// come from one goroutine, in stream order: a later call for the same
// bytes always carries newer data.
type Target interface {
	// WriteAt stores p at byte offset off of device dev. p is valid only
	// during the call: a target that keeps it must copy it.
	WriteAt(dev int, p []byte, off int64) error
	// Zero makes n bytes at off of device dev read as zeroes.
	Zero(dev int, off, n int64) error
	// ReadAt reads the target's copy (used by checksum resync).
	ReadAt(dev int, p []byte, off int64) (int, error)
	// Marker records a consistency point: everything before it in the
	// stream is the state of all devices at one instant.
	Marker(m Marker) error
	// Sync makes everything stored so far durable.
	Sync() error
}

// Coverer is implemented by targets that date time markers (the stream to
// a process server): Covered(t) says that every write completed before t
// has been handed to the target, so that a time marker never claims a
// write still in the ring, the bitmap or waiting to be read back.
type Coverer interface {
	Covered(t time.Time)
}

// Resyncer is implemented by targets that can compare a range with their
// copy more cheaply than by reading it back (a remote replica compares
// checksums). Resync makes the target's bytes [off, off+len(p)) of device
// dev equal to p and returns how many bytes it had to store.
type Resyncer interface {
	Resync(dev int, p []byte, off int64) (stored int64, err error)
}

// DrainHolder is implemented by targets that send time markers on their
// own (the stream): while a drain reads blocks back the target's copy is
// in no state the device was in, and a marker must not date it.
type DrainHolder interface {
	DrainStarted()
	// DrainEnded: done when the drain read back all it took; one that
	// stopped half way ends with the next that does.
	DrainEnded(done bool)
}

// ResyncAsker is implemented by targets that ask for resyncs themselves
// (the stream, at a reconnect): from the request until the engine has
// taken it, their Marker fails with ErrResyncPending. The engine reads
// ResyncEpoch before it takes the requests (RequestSync) and passes it to
// ResyncsTaken once it has.
type ResyncAsker interface {
	ResyncEpoch() uint64
	ResyncsTaken(epoch uint64)
}

// ErrResyncPending is a target's Marker error while a resync it asked
// for is not taken yet: the point would date a copy about to be redone.
var ErrResyncPending = errors.New("a resync the target asked for is pending")

// Freezer is implemented by targets that write files of their own while
// they take records (a stream's sequence lease): BeforeFreeze writes what
// they would need to while the file systems are frozen for an
// app-consistent point, which may hold their state directory.
type Freezer interface {
	BeforeFreeze() error
	// AfterThaw follows a BeforeFreeze that succeeded, once the file
	// systems are thawed (or were never frozen).
	AfterThaw()
}

// MarkerKind tells how consistent a marker's point is.
type MarkerKind string

const (
	CrashConsistent MarkerKind = "crash"
	AppConsistent   MarkerKind = "app"
)

// Marker is a consistency point in the stream.
type Marker struct {
	Kind MarkerKind
	Seq  uint64 // last capture sequence applied before the marker
	Time time.Time
}

// SyncKind is how a device's target is brought up to date at start.
type SyncKind int

const (
	// SyncResume trusts the target and the bitmap kept by capture since a
	// clean stop: only blocks written meanwhile are copied.
	SyncResume SyncKind = iota
	// SyncCompare reads device and target and copies blocks that differ
	// (after an unclean stop).
	SyncCompare
	// SyncFull copies the whole device.
	SyncFull
)

func (k SyncKind) String() string {
	return [...]string{"resume", "checksum resync", "full copy"}[k]
}

// Source is one protected device.
type Source struct {
	Name string
	Path string
	Mode capture.Mode
	Sync SyncKind
	// Size, if not 0, is the size the target was told: New refuses a
	// device of another size (resized since).
	Size int64
}

// Options configures an Engine.
type Options struct {
	Sources       []Source
	RingBytes     int
	PinDir        string // where capture is pinned across clean restarts; "" = no pinning
	Target        Target
	Logger        *slog.Logger
	Progress      io.Writer // initial sync progress; nil = none
	CrashInterval time.Duration
	AppInterval   time.Duration
	PreScript     string
	PostScript    string
	ScriptLog     string // where the scripts' output goes ("": discarded); see fsfreeze.Window
	FreezeTimeout time.Duration
	OnReady       func() // capture attached, before the initial copy
	OnSynced      func() // initial copy done
	// ReadbackDelay (metadata mode) is how long a written extent waits
	// before it is read back. Rewrites of a block within it are read
	// once and neighbours with one I/O, which cuts the read-back I/O
	// under heavy random writes; the target lags by as much.
	ReadbackDelay time.Duration
}

// Stats are the agent-side counters.
type Stats struct {
	Kernel           capture.Counters `json:"kernel"`
	Applied          uint64           `json:"records"`
	AppliedBytes     uint64           `json:"bytes_applied"`
	OverflowEvents   uint64           `json:"overflow_events"`
	Drains           uint64           `json:"bitmap_drains"`
	BlocksReread     uint64           `json:"blocks_reread"`
	BytesReread      uint64           `json:"bytes_reread"`
	BlocksSkipped    uint64           `json:"blocks_equal_on_resync"`
	CrashMarkers     uint64           `json:"crash_markers"`
	AppMarkers       uint64           `json:"app_markers"`
	MarkersSkipped   uint64           `json:"crash_markers_skipped"`
	LastSeq          uint64           `json:"last_seq"`
	InflightTimeouts uint64           `json:"inflight_timeouts"`
	// StaleCompletions counts writes whose completion the kernel never
	// reported; their blocks were read back (see capture.SweepStale).
	StaleCompletions uint64 `json:"stale_completions"`
	// AppliedAhead counts records applied in the middle of a read-back
	// (applyAhead), and ReadEarly the blocks read back ahead of their
	// turn because such a record covered them in part.
	AppliedAhead uint64 `json:"records_during_readback"`
	ReadEarly    uint64 `json:"blocks_read_early"`
	// Overwritten counts blocks a read-back had still to read that such
	// a record covered whole: not read at all (readUnder).
	Overwritten uint64 `json:"blocks_overwritten_in_readback"`
	// Held counts ring records a drain held back until its read-back
	// (captured after it began, their writes maybe not landed).
	Held uint64 `json:"records_held_by_drains"`
	// HeldOut counts those past maxHeld, read back instead.
	HeldOut uint64   `json:"records_read_back_for_want_of_room"`
	Sync    []string `json:"sync"` // how each device was brought up to date at start
}

type source struct {
	Source
	dev       *blockdev.Device
	size      int64
	dirty     *bitmap.Bitmap
	compare   bool // next read-back compares with the target first
	lastMarks uint64
	metaDirty bool      // metadata marks (kernel bitmap or dirty) not read back yet
	metaSince time.Time // when metaDirty was set
	readGen   uint64    // read-backs done (coverage waits for one)
	passEnd   time.Time // when the last metadata read-back pass ended
	passTook  time.Duration
	// draining: the drain under way swapped the kernel bitmap into dirty
	// after this device's captured writes landed; until its read-back
	// ends, applyAhead reads a record's blocks still in dirty first.
	draining  bool
	lastDrain time.Time
	// late: the runs the last drain's second swap took (all of them with
	// lateAll), which a record of that drain's epoch committed before the
	// swap may be older than: the blocks such a record covers there are
	// marked again (remarkLate).
	late    []bitmap.Extent
	lateAll bool
	// unsettled: a drain went on past captured writes still in flight
	// (inflightTimeout); landing after its read-back, they may be
	// missing from the target, which only a compare finds.
	unsettled atomic.Bool
}

// Engine runs capture for a set of devices into a Target.
type Engine struct {
	opt  Options
	log  *slog.Logger
	cap  *capture.Capture
	rd   *capture.Reader
	srcs []*source
	buf  []byte // read-back buffer, O_DIRECT aligned
	tbuf []byte // target buffer for compares
	// cbuf: the read-back buffer of a checksum resync into a Resyncer,
	// compareChunk long, while one runs (nil else).
	cbuf    []byte
	stats   Stats
	appReq  chan chan error
	persist bool
	// nothingWarned: the interval's app-consistent points found nothing
	// to quiesce, and said so (once).
	nothingWarned bool
	// An app-consistent point under way (appBusy, loop only): its
	// scripts' goroutine (appWG, under appCtx) asks the loop to freeze
	// (appFreeze) and says when it is over (appEnd); appWaiters are told
	// how it ended, appNext (asking once it had frozen: appFroze) get a
	// point of their own after it. quit is closed when the loop ends.
	appBusy, appFroze   bool
	appWaiters, appNext []chan error
	appFreeze           chan appFreezeReq
	appEnd              chan error
	appWG               sync.WaitGroup
	appCtx              context.Context
	quit                chan struct{}
	quitOnce            sync.Once
	final               Stats // Stats at Close
	// beforeMarkerDrain and afterMarkerLook, if set (tests), run in a
	// crash-consistent marker before its quiesce, and once it has found
	// marks and chosen the devices to drain.
	beforeMarkerDrain func()
	afterMarkerLook   func()
	drainHook         func(stage string) // (tests) in a drain: "swapped", "bumped"

	syncReq      []atomic.Int32 // per device: SyncKind+1 requested by RequestSync
	resyncsTaken uint64         // the ResyncAsker epoch last passed to ResyncsTaken
	pointOwed    bool           // a point the target refused as ErrResyncPending
	// pointDue: a resync ended and no point followed yet (the target
	// holds its time markers until one does); once the markers retried
	// at once are skipped too, tried again at pointRetryAt, crash
	// interval or not.
	pointDue     bool
	pointRetryAt time.Time
	runs         []bitmap.Extent
	// aheadTook is the time applyAhead has taken so far (pacing leaves it
	// out of read-back passes).
	aheadTook time.Duration

	// held: ring records a drain's quiesce held back (captured in their
	// device's new epoch, their writes maybe not landed), in ring order,
	// each after its length (4 bytes): applied before anything later from
	// the ring (applyHeld).
	held    []byte
	holding bool
	// holdEpoch is the epoch the drain under way moved to; heldOut the
	// extents of records it did not keep past maxHeld (marked for the
	// next drain once it has swapped the bitmap twice).
	holdEpoch uint32
	heldOut   []heldExtent
	// late (per source) applies to records of holdEpoch until the
	// barrier lateUntil comes through: it follows every record committed
	// before the second swap.
	lateUntil uint64
	// lateTaken: the last drain's second swap took marks, which may be
	// of writes that depend on records it held back (no marker then);
	// heldFull: it held back all it may, and keeps no more records.
	lateTaken      bool
	heldBeforeLate bool // a record of the new epoch committed before lateUntil was held back (or left out)
	heldFull       bool
	markerRetries  int  // crash markers skipped in a row (marker)
	forceLate      bool // applyHeld: the record may predate the late marks
	// markerNoRetry (tests): a marker that drained is emitted as it
	// stands, not taken once more (marker).
	markerNoRetry bool
	// skipMarker (tests): a crash marker is skipped when it reports true,
	// as one whose drain took writes that may follow held records.
	skipMarker func() bool
	// ringInflight (tests) stands in for the capture's RingInflight.
	ringInflight func(i int, p uint32) int64

	closed        bool
	barrierSeen   uint64    // highest capture barrier applied
	lastOverflow  time.Time // a device last seen in bitmap mode
	diskWrites    uint64    // capture.DiskWrites last seen
	lastDiskWrite time.Time // when diskWrites last moved
	cover         struct {
		id    uint64    // barrier requested for it; 0: none
		at    time.Time // taken before the barrier was requested
		last  time.Time
		armed bool     // the barrier came through; need is set
		need  []uint64 // per device: the readGen that covers at
	}
}

// readbackGap is how many clean blocks a read-back reads through rather
// than split one I/O in two: a 4 KiB read costs about what 32 KiB do.
// Only the dirty blocks go to the target.
const readbackGap = 8

// markDrainInterval spaces the drains of a data-mode device for bitmap
// marks (a write that ended unseen, a failed one, one that overflowed):
// when drains parked the device's new writes on the bitmap, under steady
// writes their marks called for the next drain at once, a drain storm
// (4000 drains in a 20 s run of 1 MiB writes at 400 MB/s, filling the
// ring while they read back); marks that keep coming (a device failing
// writes) would still. A full ring is drained at the loop's next tick.
const markDrainInterval = 250 * time.Millisecond

// coverInterval paces the barriers that date time markers (Coverer).
const coverInterval = 50 * time.Millisecond

const readbackChunk = 1 << 20

// compareChunk is the span a checksum resync into a Resyncer (the
// stream) reads and asks about at once: each question waits for the
// process server's replica to be applied up to the records sent before
// it, then for its answer, and at 1 MiB a resync ran at a few MB/s,
// slower than a full copy.
const compareChunk = 8 << 20

// New opens the devices and loads capture. Capture is attached (and
// OnReady called) when New returns; nothing is copied yet.
func New(opt Options) (*Engine, error) {
	if opt.Logger == nil {
		opt.Logger = slog.New(slog.DiscardHandler)
	}
	e := &Engine{opt: opt, log: opt.Logger, appReq: make(chan chan error), syncReq: make([]atomic.Int32, len(opt.Sources)),
		appFreeze: make(chan appFreezeReq), appEnd: make(chan error, 1), quit: make(chan struct{})}
	var devs []capture.Device
	for i, s := range opt.Sources {
		d, err := blockdev.Open(s.Path)
		if err != nil {
			e.closeDevs()
			return nil, err
		}
		if z, err := d.Zoned(); err != nil || z != "" {
			d.Close()
			e.closeDevs()
			if err == nil {
				// Zone appends and resets are not captured: a copy would
				// silently miss them.
				err = fmt.Errorf("%s is a zoned device (%s): capture does not follow zone appends and resets, so it cannot be protected", s.Path, z)
			}
			return nil, err
		}
		size, err := d.Size()
		if err == nil && s.Size != 0 && size != s.Size {
			err = fmt.Errorf("%s is %d bytes, not the %d its replica was agreed on (resized meanwhile): start the agent again to protect it as it is now", s.Path, size, s.Size)
		}
		if err != nil {
			d.Close()
			e.closeDevs()
			return nil, err
		}
		if s.Mode == capture.ModeData {
			// The payload capture copies would be plaintext where the
			// disk holds ciphertext: read back instead.
			switch crypt, err := d.InlineEncryption(); {
			case err != nil:
				e.log.Warn("cannot tell whether the disk encrypts inline: metadata mode (its writes are read back)", keyDevice, s.Path, "err", err)
				s.Mode = capture.ModeMetadata
			case crypt:
				e.log.Warn("the disk encrypts inline: metadata mode (its writes are read back)", keyDevice, s.Path)
				s.Mode = capture.ModeMetadata
			}
		}
		e.srcs = append(e.srcs, &source{Source: s, dev: d, size: size, dirty: bitmap.New(uint64((size + capture.BlockSize - 1) / capture.BlockSize))})
		cd := capture.Device{ID: uint16(i), KernelDev: d.KernelDev(), Size: size, Mode: s.Mode}
		p, err := d.Placement()
		if err != nil {
			e.closeDevs()
			return nil, err
		}
		if p.Partition != 0 {
			cd.Disk, cd.Start = p.DiskDev.Kernel(), uint64(p.Start)
		}
		devs = append(devs, cd)
	}
	opened := make([]openDev, len(e.srcs))
	for i, s := range e.srcs {
		opened[i] = openDev{s.Path, s.dev}
	}
	if err := checkOverlap(opened); err != nil {
		e.closeDevs()
		return nil, err
	}
	resyncAll := true // after an unclean stop: no device resumes
	for _, s := range opt.Sources {
		resyncAll = resyncAll && s.Sync != SyncResume
	}
	c, err := capture.Load(capture.Config{Devices: devs, RingBytes: opt.RingBytes, PinDir: opt.PinDir, FreeAbandoned: resyncAll, Logger: opt.Logger})
	if err != nil {
		e.closeDevs()
		return nil, err
	}
	e.cap = c
	if !c.Resumed() {
		for _, s := range e.srcs {
			if s.Sync == SyncResume {
				s.Sync = SyncCompare // the kernel-side bitmap did not survive
				e.log.Warn("capture state from the last run is gone (reboot, unclean stop or upgrade): resyncing by checksum", keyDevice, s.Path)
			}
		}
	}
	e.buf = blockdev.AlignedBuffer(readbackChunk)
	e.tbuf = make([]byte, readbackChunk)
	if opt.OnReady != nil {
		opt.OnReady()
	}
	return e, nil
}

// openDev is a device to protect, opened, and the path it was given by.
type openDev struct {
	Path string
	dev  *blockdev.Device
}

// checkOverlap refuses a whole disk protected together with one of its
// partitions, or one device twice: capture sends each write to exactly one
// protected device (a partition's writes go to its protected disk).
func checkOverlap(srcs []openDev) error {
	seen := map[blockdev.Dev]string{}
	disks := map[blockdev.Dev]string{}
	type part struct {
		path string
		disk blockdev.Dev
	}
	var parts []part
	for _, s := range srcs {
		p, err := s.dev.Placement()
		if err != nil {
			return err
		}
		if prev, ok := seen[s.dev.Dev()]; ok {
			return fmt.Errorf("%s and %s are the same device: protect it once", prev, s.Path)
		}
		seen[s.dev.Dev()] = s.Path
		if p.Partition == 0 {
			disks[s.dev.Dev()] = s.Path
		} else {
			parts = append(parts, part{s.Path, p.DiskDev})
		}
	}
	for _, p := range parts {
		if disk, ok := disks[p.disk]; ok {
			return fmt.Errorf("%s is a partition of %s, which is protected too: protect the disk or its partitions, not both", p.path, disk)
		}
	}
	return nil
}

// Sources reports the devices and how each is being synced.
func (e *Engine) Sources() []Source {
	var out []Source
	for _, s := range e.srcs {
		out = append(out, s.Source)
	}
	return out
}

func (e *Engine) closeDevs() {
	for _, s := range e.srcs {
		s.dev.Close()
	}
}

// Run copies the devices, then applies captured writes until ctx is done;
// then it drains everything captured into the target and returns. The
// capture stays pinned (when PinDir is set) so that writes made while the
// agent is down are remembered in the bitmap.
func (e *Engine) Run(ctx context.Context) (err error) {
	rctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rdDone := make(chan error, 1)
	e.rd = capture.NewReader(e.cap)
	go func() { rdDone <- e.rd.Run(rctx) }()
	defer func() {
		e.rd.Stop()
		if err != nil {
			// The consumer is gone: a reader blocked on a full queue
			// would wait for it forever.
			cancel()
		}
		if rerr := <-rdDone; rerr != nil && !errors.Is(rerr, context.Canceled) && (err == nil || errors.Is(err, errReaderStopped)) {
			err = rerr // why the reader stopped
		}
	}()
	defer e.endApps()

	// Initial sync: every block is dirty.
	var total int64
	for _, s := range e.srcs {
		e.stats.Sync = append(e.stats.Sync, s.Sync.String())
		if s.Sync != SyncResume {
			s.dirty.SetRange(0, s.dirty.Blocks())
			s.compare = s.Sync == SyncCompare
			total += s.size
		}
		e.log.Info("protecting", keyDevice, s.Path, "mode", s.Mode.String(), "sync", s.Sync.String(), "bytes", s.size)
	}
	var bar *progress.Bar
	if e.opt.Progress != nil && total > 0 {
		bar = progress.New(e.opt.Progress, "initial sync", total)
	}
	if err := e.drain(ctx, allIdx(len(e.srcs)), false, true, bar); err != nil {
		return err
	}
	if bar != nil {
		bar.Done()
	}
	if e.opt.OnSynced != nil {
		e.opt.OnSynced()
	}

	actx, acancel := context.WithCancel(ctx)
	defer acancel() // a panic too: endApps starts no point after the loop
	e.appCtx = actx
	err = e.loop(ctx)
	// A point under way stops waiting for the loop, and its pre script
	// is ended (its post script runs: it may have to undo what the pre
	// script began); Run returns once it has (endApps).
	acancel()
	e.endLoop()
	if err != nil {
		return err
	}
	// Clean stop: settle writes that ended unseen on idle devices, park
	// every device on the bitmap and drain what remains.
	if err := e.settleIdle(); err != nil {
		return err
	}
	if err := e.drain(context.Background(), allIdx(len(e.srcs)), true, false, nil); err != nil {
		return err
	}
	if err := e.opt.Target.Sync(); err != nil {
		return fmt.Errorf("sync target: %w", err)
	}
	e.persist = true
	return nil
}

func allIdx(n int) []int {
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	return idx
}

// loop applies ring records and drains bitmaps until ctx is done.
func (e *Engine) loop(ctx context.Context) error {
	var crashT, appT <-chan time.Time
	if e.opt.CrashInterval > 0 {
		t := time.NewTicker(e.opt.CrashInterval)
		defer t.Stop()
		crashT = t.C
	}
	if e.opt.AppInterval > 0 {
		t := time.NewTicker(e.opt.AppInterval)
		defer t.Stop()
		appT = t.C
	}
	// Records wake the loop (Ready); the tick paces what it polls: cover
	// barriers, marks, overflows, resync requests. A 5 ms tick woke an
	// idle agent 200 times a second, most of its CPU at low churn.
	idle := time.NewTicker(coverInterval / 2)
	defer idle.Stop()
	sweep := time.NewTicker(sweepInterval)
	defer sweep.Stop()
	var need []int
	for {
		// Apply whatever is queued, in batches, checking the devices
		// between batches.
		e.requestCover()
		if err := e.applyHeld(nil); err != nil {
			return err
		}
		busy := true // records may be left: do not wait for the idle tick
		for range applyBatch {
			it, ok := e.rd.TryNext()
			if !ok {
				busy = false
				break
			}
			if err := e.apply(it, nil); err != nil {
				return err
			}
		}
		if err := e.readbackMetadata(context.Background(), e.opt.ReadbackDelay, true); err != nil {
			return err
		}
		need = need[:0]
		resync := false
		asker, asks := e.opt.Target.(ResyncAsker)
		var epoch uint64
		if asks {
			epoch = asker.ResyncEpoch()
		}
		for i, s := range e.srcs {
			if k := e.syncReq[i].Swap(0); k > 0 {
				e.log.Warn("target asks for a resync", keyDevice, s.Path, "sync", SyncKind(k-1).String())
				s.dirty.SetRange(0, s.dirty.Blocks())
				s.compare = SyncKind(k-1) == SyncCompare
				need = append(need, i)
				resync = true
				continue
			}
			if e.cap.Overflowed(i) {
				e.lastOverflow = time.Now()
				need = append(need, i)
			} else if s.Mode != capture.ModeMetadata && e.cap.Marks(i) != s.lastMarks &&
				time.Since(s.lastDrain) >= markDrainInterval {
				// A metadata device's marks are taken by its
				// read-back pass (readbackMetadata).
				need = append(need, i)
			}
		}
		if asks && epoch > e.resyncsTaken {
			// Every request handed on up to epoch was in syncReq before
			// this pass took them (or an earlier one did).
			asker.ResyncsTaken(epoch)
			e.resyncsTaken = epoch
			if e.pointOwed && !resync {
				// The point after a resync an earlier pass took.
				if err := e.marker(ctx, CrashConsistent); err != nil && !(ctx.Err() != nil && stopped(err)) {
					return err
				}
			}
		}
		if len(need) > 0 {
			// A stop request does not interrupt a drain half way.
			if err := e.drain(context.Background(), need, false, true, nil); err != nil {
				return err
			}
			if resync {
				// The target is whole again: say so now, not at the
				// next crash interval (the target holds its time
				// markers until a consistency point follows a resync).
				e.pointDue = true
				if err := e.marker(ctx, CrashConsistent); err != nil && !(ctx.Err() != nil && stopped(err)) {
					return err
				}
			}
			// Not straight back to the devices: under overload a device
			// overflows again during each drain, and a stop, markers
			// and sweeps would wait for the churn to fall. The select
			// below takes them, or goes on at once.
			busy = true
		} else {
			e.reportCover()
		}
		if e.markerRetries > 0 && e.markerRetries <= maxMarkerRetries {
			if err := e.marker(ctx, CrashConsistent); err != nil && !(ctx.Err() != nil && stopped(err)) {
				return err
			}
		}
		if e.markerRetries > maxMarkerRetries {
			e.markerRetries = 0 // the next interval's marker starts again
			if e.pointDue {
				// Not only at the next interval, or never with crash
				// points off: until a point follows the resync,
				// recoverable_until stands still.
				e.pointRetryAt = time.Now().Add(pointRetry)
			}
		}
		var records <-chan struct{}
		if !busy {
			records = e.rd.Ready()
		}
		select {
		case <-ctx.Done():
			e.rd.Settle()
			return nil
		case <-crashT:
			if err := e.marker(ctx, CrashConsistent); err != nil {
				if ctx.Err() != nil && stopped(err) {
					// A stop interrupted the marker: still a clean
					// stop (Run drains what remains). Not a target
					// that failed meanwhile: its extent waits in a
					// bitmap (applyRecord), and the stop is unclean.
					return nil
				}
				return err
			}
		case <-appT:
			e.startApp(nil)
		case done := <-e.appReq:
			e.startApp(done)
		case req := <-e.appFreeze:
			req.reply <- e.appFrozen(ctx, req.w)
		case err := <-e.appEnd:
			e.appBusy = false
			e.endApp(err)
		case <-sweep.C:
			if e.pointDue && !e.pointRetryAt.IsZero() && !time.Now().Before(e.pointRetryAt) {
				e.pointRetryAt = time.Time{}
				if err := e.marker(ctx, CrashConsistent); err != nil && !(ctx.Err() != nil && stopped(err)) {
					return err
				}
			}
			if err := e.checkSizes(); err != nil {
				return err
			}
			if err := e.sweepStale(); err != nil {
				return err
			}
		case <-idle.C:
		case <-records:
			if e.rd.Stopped() {
				// The reader failed (Run reports why): its closed queue
				// would keep Ready ready.
				return errReaderStopped
			}
		case <-wake(busy):
		}
		if !busy {
			e.rd.Settle()
		}
	}
}

// stopped tells an error of Run's context (a stop) from a failure.
func stopped(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// errReaderStopped: the capture reader ended while the engine ran.
var errReaderStopped = errors.New("capture reader stopped")

// applyBatch is how many records the loop applies between two looks at
// the devices, timers and requests.
const applyBatch = 1024

// closedChan is always ready.
var closedChan = func() chan time.Time { c := make(chan time.Time); close(c); return c }()

// wake returns a ready channel when busy (the loop must not block: records
// are waiting), else nil (a select never picks it). The loop used to wait
// for its idle tick (5 ms then) after every batch, which capped it at 1024
// records per tick, about 200 000 a second: under 4 KiB writes at more
// than that the ring filled and overflowed.
func wake(busy bool) <-chan time.Time {
	if busy {
		return closedChan
	}
	return nil
}

// A pending write older than staleAfter (ringStaleAfter if ring-captured)
// has completed, or its device is hung, without the kernel reporting it;
// sweepInterval paces the check. Reading a write back too early costs a
// read; releasing a ring-captured one too early could let a read-back run
// ahead of it, hence its longer age. The short one bounds how long a
// metadata-mode write can be missing from consistency points.
const (
	staleAfter     = 2 * time.Second
	ringStaleAfter = 10 * time.Second
	sweepInterval  = time.Second
)

// sweepStale reads back the writes whose completion the kernel never
// reported: their extents go into the kernel bitmap and the devices are
// drained, under the usual ordering protocol.
func (e *Engine) sweepStale() error {
	idx, err := e.markStale()
	if err != nil || len(idx) == 0 {
		return err
	}
	return e.drain(context.Background(), idx, false, true, nil)
}

// markStale sweeps the stale pending writes into the kernel bitmap, where
// the next drain of their devices (returned; the loop also sees their
// marks move) picks them up.
func (e *Engine) markStale() ([]int, error) {
	stale, err := e.cap.SweepStale(staleAfter, ringStaleAfter)
	if err != nil {
		return nil, err
	}
	return e.markSwept(stale), nil
}

// markSwept marks swept writes in the kernel bitmap, where the next drain
// of their devices (returned; metadata devices' are not: their read-back
// harvests the marks) reads them back.
func (e *Engine) markSwept(stale []capture.Stale) []int {
	if len(stale) == 0 {
		return nil
	}
	var idx []int
	for _, st := range stale {
		e.cap.MarkBytes(st.Dev, st.Off, st.Len)
		// A metadata device's marks wait for its paced read-back
		// (harvest): a drain would read its whole dirty set at once.
		if e.srcs[st.Dev].Mode != capture.ModeMetadata && !slices.Contains(idx, st.Dev) {
			idx = append(idx, st.Dev)
		}
	}
	e.stats.StaleCompletions += uint64(len(stale))
	e.log.Warn("the kernel did not report the completion of some writes; reading their blocks back",
		"writes", len(stale))
	return idx
}

// settleIdle marks in the kernel bitmap the pending writes of devices with
// no write in flight: their completion went unreported, and the stop's
// drain must not leave them to a later run's sweep.
func (e *Engine) settleIdle() error {
	stale, err := e.cap.SweepIdle(func(kdev uint32) bool {
		n, err := blockdev.InflightWrites(blockdev.DevOf(kdev))
		return err == nil && n == 0
	})
	if err != nil {
		return err
	}
	e.markSwept(stale)
	return nil
}

// RequestSync asks the running engine to bring device dev's target up to
// date again, by checksum compare or full copy (a target that lost data
// calls it). Safe from any goroutine.
func (e *Engine) RequestSync(dev int, kind SyncKind) {
	if kind == SyncResume || dev < 0 || dev >= len(e.syncReq) {
		return
	}
	// The stronger of two pending requests stands: a compare asked after
	// a full copy must not replace it before the loop takes it.
	for {
		old := e.syncReq[dev].Load()
		if old >= int32(kind)+1 || e.syncReq[dev].CompareAndSwap(old, int32(kind)+1) {
			return
		}
	}
}

// requestCover asks capture for a barrier that dates the next Covered
// call, unless one is on its way. The time is taken first: every write
// completed before it has its record (or bitmap mark) committed before
// the barrier is requested.
func (e *Engine) requestCover() {
	// A tenth of slack: the loop ticks every half interval, and a tick a
	// little early would otherwise put the barrier off by half again.
	if _, ok := e.opt.Target.(Coverer); !ok || e.cover.id != 0 || time.Since(e.cover.last) < coverInterval-coverInterval/10 {
		return
	}
	now := time.Now()
	e.cover.last = now
	e.cover.at = e.datedBack(now)
	e.cover.id = e.rd.RequestBarrier()
}

// datedBack returns now, or earlier when a write completed before now may
// not be handed over yet for want of its completion (completionTracked):
// then by unreportedLag, since a write whose completion the kernel never
// reported is only found by the sweep, once its pending entry is stale;
// or, for a write still tracked, to when it was queued (one queued while
// its data-mode device overflowed, or the agent's stop parked it): it
// cannot have completed before.
func (e *Engine) datedBack(now time.Time) time.Time {
	// Entries the sweep is overdue for (a long drain held the loop, or a
	// capture pinned while no agent ran kept those of writes made then)
	// go to the bitmap first, where a cover waits for their read-back:
	// dated back to them, a marker would claim a time long before writes
	// its sequence holds.
	since, ok := e.cap.CompletionPendingSince()
	if ok && now.Sub(since) > staleAfter+capture.ClockLag {
		if _, err := e.markStale(); err != nil {
			e.log.Warn("cannot sweep the pending writes", "err", err)
		}
		since, ok = e.cap.CompletionPendingSince()
	}
	at := now
	if e.completionTracked(now) {
		at = now.Add(-unreportedLag)
	}
	if ok && since.Before(at) {
		at = since
	}
	return at
}

// unreportedLag bounds how long a completed write can stay unknown to the
// agent when the kernel does not report its completion: the sweep's age,
// its period and the lag of capture's clock.
const unreportedLag = staleAfter + sweepInterval + capture.ClockLag

// completionTracked reports whether some writes are handed over only once
// their completion is seen, and so may wait for the sweep: those of
// metadata-mode devices, of a data-mode device that overflowed into its
// bitmap lately, and writes to a whole disk over protected partitions
// made lately (read back from the partitions once they complete).
func (e *Engine) completionTracked(now time.Time) bool {
	for i, s := range e.srcs {
		if s.Mode == capture.ModeMetadata || e.cap.Overflowed(i) {
			return true
		}
	}
	if n, err := e.cap.DiskWrites(); err != nil || n != e.diskWrites {
		e.diskWrites, e.lastDiskWrite = n, now
	}
	recent := unreportedLag + staleAfter
	return now.Sub(e.lastOverflow) < recent || now.Sub(e.lastDiskWrite) < recent
}

// reportCover tells the target that everything before the cover time has
// been handed over: once the barrier has come through, and every device
// that then had blocks waiting (noted for read-back, marked in a bitmap)
// has been read back since. New blocks noted meanwhile do not hold it up:
// they were written after the barrier.
func (e *Engine) reportCover() {
	if e.cover.id == 0 || e.barrierSeen < e.cover.id {
		return
	}
	if !e.cover.armed {
		e.cover.need = e.cover.need[:0]
		for i, s := range e.srcs {
			g := s.readGen
			if s.metaDirty || e.cap.Overflowed(i) || e.cap.Marks(i) != s.lastMarks {
				g++
			}
			e.cover.need = append(e.cover.need, g)
		}
		e.cover.armed = true
	}
	for i, s := range e.srcs {
		if s.readGen < e.cover.need[i] {
			return
		}
	}
	e.cover.id, e.cover.armed = 0, false
	e.opt.Target.(Coverer).Covered(e.cover.at)
}

// readbackPause paces metadata-mode read-back under churn: after a pass
// that took d, the next one starts no sooner than readbackPause×d later,
// so read-back takes at most 1/(1+readbackPause) of the agent's time
// however fast the device is written, and the longer wait coalesces more
// rewrites of a block into one read. Unpaced, 4 KiB random writes at
// 230k IOPS on a 2 GiB device had the agent re-read most of the device
// every second and kept 69 % of the writer's IOPS; paced, 87 %. A pass
// over a few blocks takes microseconds: at ordinary churn only
// ReadbackDelay applies. Markers and stops read back at once.
const readbackPause = 8

// readbackMaxWait caps the wait readbackPause imposes, so that a slow
// device (long passes) keeps a bounded lag rather than a bounded share.
const readbackMaxWait = 10 * time.Second

// readbackDue reports whether s's noted extents are due for read-back at
// now: noted at least delay ago and, with paced, readbackPause allows it.
func (s *source) readbackDue(now time.Time, delay time.Duration, paced bool) bool {
	if !s.metaDirty || now.Sub(s.metaSince) < delay {
		return false
	}
	return !paced || now.Sub(s.passEnd) >= min(readbackPause*s.passTook, readbackMaxWait)
}

// readbackMetadata reads back the blocks metadata devices marked at
// least delay ago; with paced, no sooner than readbackPause allows.
func (e *Engine) readbackMetadata(ctx context.Context, delay time.Duration, paced bool) error {
	for i, s := range e.srcs {
		if s.Mode != capture.ModeMetadata {
			continue
		}
		// New marks in the kernel bitmap call for a pass, which takes
		// them when it starts: scanning the bitmap reads all of it (32
		// MiB for 1 TiB), too much for every round of the loop. Every
		// pass, even one that finds nothing, counts for coverage, which
		// arms on the marks having moved.
		if e.cap.Marks(i) != s.lastMarks {
			e.noteMeta(s)
		}
		if !s.readbackDue(time.Now(), delay, paced) {
			continue
		}
		if err := e.harvest(i); err != nil {
			return err
		}
		s.metaDirty = false
		start, ahead := time.Now(), e.aheadTook
		if err := e.readback(ctx, i, nil, paced); err != nil {
			e.noteMeta(s) // what is left waits for the next pass
			return err
		}
		// Records applied meanwhile are not the pass's own work.
		s.passEnd = time.Now()
		s.passTook = s.passEnd.Sub(start) - (e.aheadTook - ahead)
		e.log.Debug("read-back pass", keyDevice, s.Path, "took", s.passTook)
	}
	return nil
}

// AppConsistent asks the running engine for an app-consistent marker,
// and waits for the point, its scripts included.
func (e *Engine) AppConsistent(ctx context.Context) error {
	done := make(chan error, 1)
	select {
	case e.appReq <- done:
	case <-e.quit:
		return errEngineStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-done: // endApps answers every waiter left
		return err
	case <-ctx.Done():
		return ctx.Err() // done is buffered: its answer goes nowhere
	}
}

var errEngineStopped = errors.New("the engine stopped before the point was taken")

// errNothingToFreeze: no file system is mounted from the protected
// devices and no pre script quiesces anything, so an app-consistent point
// would claim what a crash-consistent one says.
var errNothingToFreeze = errors.New("no file system is mounted from the protected devices (none recognised: a btrfs is not) and no pre script is set: nothing to quiesce; crash-consistent points cover the devices")

// appFreezeReq asks the loop to freeze, drain and mark (appFrozen), once
// a point's pre script has run.
type appFreezeReq struct {
	w     fsfreeze.Window
	reply chan error
}

// startApp starts an app-consistent point (from the loop), unless one is
// under way: done, if not nil, is told how it ended. Its scripts run on a
// goroutine of their own: a pre script may take minutes (a database
// flushing its tables), and records must go on being applied meanwhile,
// or the ring overflows into a bitmap that the freeze would then have to
// read back. The loop itself freezes, drains and marks (appFreezeReq).
func (e *Engine) startApp(done chan error) {
	if e.appBusy {
		if done != nil {
			if e.appFroze {
				// Its writes may postdate the point under way.
				e.appNext = append(e.appNext, done)
			} else {
				e.appWaiters = append(e.appWaiters, done)
			}
		}
		return
	}
	if done != nil {
		e.appWaiters = append(e.appWaiters, done)
	}
	w, err := e.appWindow()
	if err != nil {
		e.endApp(err)
		return
	}
	e.appBusy, e.appFroze = true, false
	ctx := e.appCtx
	e.appWG.Add(1)
	go func() {
		defer e.appWG.Done()
		err := w.RunPre(ctx)
		taken := false
		if err == nil {
			// The application is quiesced from here: the loop (between
			// its rounds, a long resync drain perhaps) is waited for a
			// bounded time only.
			reply := make(chan error, 1)
			wait := time.NewTimer(appFreezeWait)
			select {
			case e.appFreeze <- appFreezeReq{w: w, reply: reply}:
				err = <-reply // the loop answers in the same step
				taken = err == nil
			case <-wait.C:
				err = fmt.Errorf("app-consistent point not taken: the agent was busy (a resync?) for %v after the pre script", appFreezeWait)
			case <-e.quit:
				err = errEngineStopped
			}
			wait.Stop()
		}
		if perr := w.RunPost(ctx); perr != nil {
			if taken {
				err = fmt.Errorf("app-consistent point taken, but: %w", perr)
			} else {
				err = errors.Join(err, perr)
			}
		}
		e.appEnd <- err // one point at a time: never full
	}()
}

// endApp reports how a point ended: to those who asked for it, or, a
// point of the interval, to the log.
func (e *Engine) endApp(err error) {
	defer func() {
		// Those who asked once the last point had frozen get their own.
		if next := e.appNext; len(next) > 0 && !e.appBusy && e.appCtx != nil && e.appCtx.Err() == nil {
			e.appNext = nil
			e.appWaiters = append(e.appWaiters, next[1:]...)
			e.startApp(next[0])
		}
	}()
	if len(e.appWaiters) > 0 {
		for _, w := range e.appWaiters {
			w <- err
		}
		e.appWaiters = nil
		return
	}
	switch {
	case errors.Is(err, errEngineStopped):
		// A stop ended it: nothing to report.
	case errors.Is(err, errNothingToFreeze):
		if !e.nothingWarned {
			e.nothingWarned = true
			e.log.Warn("no app-consistent points: "+err.Error(), "app_interval", e.opt.AppInterval)
		}
	case err != nil:
		e.log.Error("app-consistent point failed", "err", err)
	}
}

// appFreezeWait bounds how long a point whose pre script has run waits
// for the loop to freeze: the application stays quiesced meanwhile.
const appFreezeWait = 30 * time.Second

// endLoop tells a point under way that the loop is gone (quit).
func (e *Engine) endLoop() { e.quitOnce.Do(func() { close(e.quit) }) }

// endApps, as Run returns: the loop is gone; a point under way runs its
// post script to its end, and everyone who asked for a point is answered.
func (e *Engine) endApps() {
	e.endLoop()
	e.appWG.Wait()
	select {
	case err := <-e.appEnd:
		e.appBusy = false
		e.endApp(err)
	default:
	}
	for _, w := range append(e.appWaiters, e.appNext...) {
		w <- errEngineStopped
	}
	e.appWaiters, e.appNext = nil, nil
}

// appWindow is the freeze window of an app-consistent point: the file
// systems mounted from the devices, and the scripts.
func (e *Engine) appWindow() (fsfreeze.Window, error) {
	var mounts, devices []string
	for _, s := range e.srcs {
		m, err := fsfreeze.MountsOf(s.Path)
		if err != nil {
			return fsfreeze.Window{}, err
		}
		mounts = append(mounts, m...)
		devices = append(devices, s.Path)
	}
	if len(mounts) == 0 && e.opt.PreScript == "" {
		return fsfreeze.Window{}, errNothingToFreeze
	}
	// The file systems are looked up again at the freeze: the pre
	// script may mount one, and one may be covered or unmounted since.
	return fsfreeze.Window{
		Devices: devices, Pre: e.opt.PreScript, Post: e.opt.PostScript, Timeout: e.opt.FreezeTimeout, ScriptLog: e.opt.ScriptLog,
		Unfreezable: func(m string) {
			e.log.Warn("file system cannot be frozen: synced instead, its writes during the point are not held back", "mount", m)
		},
	}, nil
}

// appFrozen freezes w's file systems, drains every device and, once they
// are thawed, emits the app-consistent marker (on the loop, between the
// point's scripts). nil means the marker was emitted.
func (e *Engine) appFrozen(ctx context.Context, w fsfreeze.Window) error {
	e.appFroze = true
	f, _ := e.opt.Target.(Freezer)
	if f != nil {
		if err := f.BeforeFreeze(); err != nil {
			return err
		}
		// As soon as they are: a drain the watchdog outlasted may wait
		// for acks that only the target's next save lets in.
		w.OnThaw = f.AfterThaw
	}
	var at time.Time
	drained := false
	err := w.Frozen(ctx, func() error {
		// Frozen filesystems have written everything: once the stream
		// holds every completed write, the point is app-consistent.
		at = e.pointTime()
		// A write whose completion the kernel did not report is not yet
		// stale (staleAfter) but done: the frozen devices have nothing
		// in flight, so their pending entries are settled now.
		if err := e.settleIdle(); err != nil {
			return err
		}
		if _, err := e.markStale(); err != nil { // as in marker; the drain below reads them
			return err
		}
		if err := e.drain(ctx, allIdx(len(e.srcs)), false, false, nil); err != nil {
			return err
		}
		drained = true
		return nil
	})
	if f != nil {
		f.AfterThaw() // also when Frozen returned before freezing
	}
	// The marker goes after the thaw (a target writing it to a frozen
	// file system would wait for the watchdog), at the place the drain
	// left: this loop applies nothing in between. Not if the watchdog
	// thawed first, nor if someone else did (a file system found not
	// frozen at the thaw): the drain may then have read writes made
	// after the point.
	if err != nil || !drained || ctx.Err() != nil {
		if err == nil {
			err = ctx.Err()
		}
		return err
	}
	return e.emit(AppConsistent, at)
}

// marker emits a crash-consistent marker after every write captured so
// far has been applied: every write completed so far on blk-mq devices,
// every write submitted so far on bio-based ones.
func (e *Engine) marker(ctx context.Context, kind MarkerKind) error {
	if e.skipMarker != nil && kind == CrashConsistent && e.skipMarker() {
		e.stats.MarkersSkipped++
		e.markerRetries++
		return nil
	}
	for attempt := 0; ; attempt++ {
		at := e.pointTime()
		// pointTime counts on a sweep since: a write whose completion went
		// unreported before at is swept now, whenever the loop last swept
		// (overflow drains and long read-backs hold its sweeps back).
		need, err := e.markStale()
		if err != nil {
			return err
		}
		if e.beforeMarkerDrain != nil {
			e.beforeMarkerDrain()
		}
		if err := e.quiesce(ctx); err != nil {
			return err
		}
		// Marks a data-mode device took since its last drain (spaced by
		// markDrainInterval) are writes that may precede records the point
		// now holds (a journal block that overflowed, its commit captured
		// after). They are looked for after the quiesce: a write completed
		// before a record it applied was marked before that record was
		// submitted. With none anywhere, the point is exact as it stands, and
		// nothing is drained: a drain reads blocks back while they are being
		// written, maybe in a state newer than records the point lacks
		// (TestMarkerParksNoWrite).
		// With some, every data-mode device is drained: the drain quiesces
		// again, and a mark another device takes before its records are
		// applied then would be left out (TestMarkerDrainsDevicesMarkedLate).
		for i, s := range e.srcs {
			if s.Mode != capture.ModeMetadata && e.cap.Marks(i) != s.lastMarks && !slices.Contains(need, i) {
				need = append(need, i)
			}
		}
		if len(need) > 0 {
			for i, s := range e.srcs {
				if s.Mode != capture.ModeMetadata && !slices.Contains(need, i) {
					need = append(need, i)
				}
			}
			if e.afterMarkerLook != nil {
				e.afterMarkerLook()
			}
			if err := e.drain(ctx, need, false, false, nil); err != nil {
				return err
			}
			if e.lateTaken && e.heldBeforeLate {
				// Its second swap took writes that completed in the
				// moment after the bump, and it held back records made
				// then: one of those writes may depend on one of them
				// (TestMarkerNotTakenOverHeldRecord). The loop tries
				// again at once, a few times, then at the next interval.
				e.stats.MarkersSkipped++
				e.markerRetries++
				e.log.Debug("marker skipped: writes completed as its drain began may follow records it held back")
				return nil
			}
			if attempt == 0 && !e.markerNoRetry {
				// The drain read blocks back while they were being
				// written: one may be newer than records the point lacks
				// (those it held back). Once more: the next quiesce
				// applies them, and with no new mark the point holds
				// every record of what it read, and is exact
				// (TestMarkerExactAfterDrain).
				continue
			}
		}
		// Metadata devices hold their completed writes as marks, read back
		// now rather than when pacing would, after the last quiesce: a write
		// that completed before a record the point holds is read back too.
		if err := e.readbackMetadata(ctx, 0, false); err != nil {
			return err
		}
		e.markerRetries = 0
		return e.emit(kind, at)
	}
}

// maxMarkerRetries bounds the crash markers taken again at once after one
// was skipped (marker).
const maxMarkerRetries = 3

// pointRetry spaces the attempts at the point that follows a resync once
// those retried at once were skipped (a variable for tests).
var pointRetry = 10 * time.Second

// pointTime dates a consistency point whose quiesce starts now: a write
// that completes during the quiesce, drain or read-back may be captured
// after the point, so a later time would claim it. A write whose
// completion the kernel did not report waits for the sweep, as in
// requestCover.
func (e *Engine) pointTime() time.Time {
	return e.datedBack(time.Now())
}

// emit hands the target a marker dated at (pointTime, taken before the
// point's quiesce).
func (e *Engine) emit(kind MarkerKind, at time.Time) error {
	// A resync asked for while the point was being taken (the loop takes
	// requests only between its rounds) means the target lacks writes the
	// point would claim: no point now; the loop's next round resyncs and
	// marks the target whole again.
	for i := range e.syncReq {
		if e.syncReq[i].Load() != 0 {
			if kind == AppConsistent {
				return fmt.Errorf("app-consistent point not taken: device %s is to be resynced first", e.srcs[i].Path)
			}
			e.log.Debug("marker skipped: a resync is pending", keyDevice, e.srcs[i].Path)
			return nil
		}
	}
	m := Marker{Kind: kind, Seq: e.stats.LastSeq, Time: at.UTC()}
	if err := e.opt.Target.Marker(m); err != nil {
		if !errors.Is(err, ErrResyncPending) {
			return err
		}
		// Asked for by the target since the check above, or taken by a
		// pass that read its epoch before it moved: owed once the target
		// has it taken (the point that follows a resync releases the
		// target's time markers).
		e.pointOwed = true
		if kind == AppConsistent {
			return fmt.Errorf("app-consistent point not taken: %w", err)
		}
		e.log.Debug("marker skipped: a resync is pending")
		return nil
	}
	e.pointOwed, e.pointDue, e.pointRetryAt = false, false, time.Time{}
	if kind == AppConsistent {
		e.stats.AppMarkers++
	} else {
		e.stats.CrashMarkers++
	}
	e.log.Debug("marker", keyKind, string(kind), keySeq, m.Seq)
	return nil
}

// quiesce applies every record committed to the BPF ring so far, but for
// those a drain holds back (hold).
func (e *Engine) quiesce(ctx context.Context) error {
	if !e.holding {
		if err := e.applyHeld(nil); err != nil {
			return err
		}
	}
	if err := e.programsDone(); err != nil {
		return err
	}
	id := e.rd.RequestBarrier()
	for {
		it, err := e.rd.Next(ctx)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errReaderStopped
			}
			return err
		}
		if it.Barrier != 0 {
			e.barrierSeen = max(e.barrierSeen, it.Barrier)
			if it.Barrier >= id {
				return nil
			}
			continue
		}
		if e.holding && e.hold(it) {
			continue
		}
		if err := e.apply(it, nil); err != nil {
			return err
		}
	}
}

// programsDone waits until no capture program runs: those running may
// still reserve ring space (or have read the epoch before a bump).
func (e *Engine) programsDone() error {
	for {
		n, err := e.cap.ProgramsRunning()
		if err != nil {
			return err
		}
		if n <= 0 {
			return nil
		}
		time.Sleep(20 * time.Microsecond)
	}
}

// drain brings the devices idx up to date from their bitmaps, keeping the
// ordering contract of capture.bpf.c: bitmap swapped → drain epoch
// bumped (one for all devices) → bitmap swapped again → ring drained, the
// records of the new epoch held back → writes captured in the old epoch
// landed → blocks read back before any record held back or later is
// applied. Every record applied before the read-back has landed; the
// marks of the first swap are older than every record of the new epoch,
// and those of the second, which may not be (a write that completed
// between the swaps), are read again by the next drain wherever such a
// record meets them (remarkLate). The second swap takes the writes
// completed before the records of the old epoch, which a marker's point
// must hold. The devices' writes go on into the
// ring meanwhile: a drain that parked them on the bitmap left the marks
// of those still in flight at its swap to the next one, so that under
// steady writes every drain called for another, and a marker never found
// a device without marks again (TestDrainLeavesNoMarks). With park, the
// devices are parked (overflow flag set → ring drained → captured writes
// landed → bitmap swapped) and stay so: capture keeps marking the bitmap
// after the agent has gone. With ahead, ring records that come in during
// the read-back are applied meanwhile (applyAhead), the held ones first:
// not for markers, whose point must stay where quiesce put it (held
// records wait for the next time the engine reads the ring).
func (e *Engine) drain(ctx context.Context, idx []int, park, ahead bool, bar *progress.Bar) (err error) {
	if err := e.applyHeld(nil); err != nil {
		return err
	}
	if h, ok := e.opt.Target.(DrainHolder); ok {
		h.DrainStarted()
		defer func() { h.DrainEnded(err == nil) }()
	}
	e.heldFull = false
	// Should the drain stop half way (an app-consistent point's drain
	// that failed; other failures stop the agent), the blocks it took and
	// has not read go back to the kernel bitmap, whose marks call for the
	// device's next drain: read after its writes have landed again, never
	// early by applyAhead.
	var taken []int
	defer func() {
		e.holding = false
		// Records not held for want of room: read back by the next
		// drain, after their epoch's writes have landed (marked only
		// now, past the second swap, which would read them too early).
		for _, x := range e.heldOut {
			e.cap.MarkBytes(x.dev, x.off, x.n)
		}
		e.heldOut = e.heldOut[:0]
		for _, i := range taken {
			s := e.srcs[i]
			s.draining = false
			for ext := range s.dirty.Extents(0) {
				e.cap.MarkBytes(i, int64(ext.Start)*capture.BlockSize, int64(ext.Len)*capture.BlockSize)
			}
			s.dirty.Reset()
		}
	}()
	swap := func(i int) error {
		s := e.srcs[i]
		if !slices.Contains(taken, i) {
			taken = append(taken, i)
		}
		s.lastMarks = e.cap.Marks(i)
		if _, err := s.dirty.Drain(e.cap.BitmapWords(i)); err != nil && !errors.Is(err, bitmap.ErrOutOfRange) {
			return err
		}
		return nil
	}
	if park {
		for _, i := range idx {
			e.cap.SetOverflow(i, true)
		}
		if err := e.quiesce(ctx); err != nil {
			return err
		}
		for _, i := range idx {
			for p := range uint32(2) {
				if err := e.waitLanded(ctx, i, p); err != nil {
					return err
				}
			}
		}
		for _, i := range idx {
			if err := swap(i); err != nil {
				return err
			}
		}
	} else if err := e.swapHolding(ctx, idx, swap); err != nil {
		return err
	}
	for _, i := range idx {
		e.srcs[i].draining = true
	}
	e.stats.Drains++
	if ahead {
		// As records that come in during the read-back are
		// (applyAhead): the blocks they do not cover whole are read
		// first.
		if err := e.applyHeld(bar); err != nil {
			return err
		}
	}
	for n, i := range idx {
		e.srcs[i].lastDrain = time.Now()
		if err := e.readback(ctx, i, bar, ahead); err != nil {
			return err
		}
		e.srcs[i].draining = false
		taken = idx[n+1:]
	}
	return nil
}

// swapHolding is the part of a drain that does not park its devices idx
// (see drain): swap, bump the epoch, swap again, quiesce holding the new
// epoch's records back, wait for the old epoch's writes.
func (e *Engine) swapHolding(ctx context.Context, idx []int, swap func(int) error) error {
	// The parity the epoch moves to counts no write still in flight but
	// one an earlier drain, stopped half way, did not wait for: that one
	// first, on every device (all move to the new epoch at once). Before
	// the swap: what completes meanwhile is taken by it, not by the
	// second one, whose marks call for a second read (remarkLate).
	next := (e.cap.Epoch() + 1) & 1
	for i := range e.srcs {
		if err := e.waitLanded(ctx, i, next); err != nil {
			return err
		}
	}
	for _, i := range idx {
		if err := swap(i); err != nil {
			return err
		}
	}
	e.atDrainStage("swapped")
	// One word for every device, and the records of every device held
	// back, not only of those drained: a record held back on one device
	// and a dependent write on another applied would make a point, or a
	// stream, that holds the second without the first.
	e.holdEpoch = e.cap.BumpEpoch()
	e.atDrainStage("bumped")
	// The second swap, once no program that read the old epoch runs:
	// the writes completed before a record of the old epoch are all in
	// one swap or the other (a marker's point must hold them). Right
	// away: a record of the new epoch may already have completed, and a
	// write that depends on it may complete on the bitmap path; taken
	// and read back, it would be in a point that lacks the held record
	// (a marker then is not taken, lateTaken). Its marks may be newer
	// than records of the new epoch committed until the barrier asked
	// for now (remarkLate).
	if err := e.programsDone(); err != nil {
		return err
	}
	e.lateTaken = false
	for _, s := range e.srcs {
		s.late, s.lateAll = s.late[:0], false
	}
	for _, i := range idx {
		e.takeLate(i)
		e.lateTaken = e.lateTaken || len(e.srcs[i].late) > 0 || e.srcs[i].lateAll
	}
	e.lateUntil, e.heldBeforeLate = 0, false
	if e.lateTaken {
		// A program that started during the swap may reserve a record
		// of a write older than a mark it took.
		if err := e.programsDone(); err != nil {
			return err
		}
		e.lateUntil = e.rd.RequestBarrier()
	}
	e.holding = true
	err := e.quiesce(ctx)
	e.holding = false
	if err != nil {
		return err
	}
	for _, i := range idx {
		if err := e.waitLanded(ctx, i, (e.holdEpoch-1)&1); err != nil {
			return err
		}
		// Set by capture when the ring filled (its writes are in the
		// bitmaps taken, or will be in the next), or by the stop of the
		// run that left capture pinned: cleared once the ring is read.
		e.cap.SetOverflow(i, false)
	}
	return nil
}

// atDrainStage runs the tests' drain hook, if set.
func (e *Engine) atDrainStage(stage string) {
	if e.drainHook != nil {
		e.drainHook(stage)
	}
}

// maxLate bounds the runs a drain's second swap remembers (late); past
// it, every record of the new epoch is marked again.
const maxLate = 4096

// takeLate is a drain's second swap of device i: the kernel bitmap goes
// into the read-back set, and its runs into s.late for the records of the
// drain's epoch (remarkLate).
func (e *Engine) takeLate(i int) {
	s := e.srcs[i]
	s.lastMarks = e.cap.Marks(i)
	words := e.cap.BitmapWords(i)
	blocks := s.dirty.Blocks()
	for w := range words {
		if atomic.LoadUint64(&words[w]) == 0 {
			continue
		}
		v := atomic.SwapUint64(&words[w], 0)
		for v != 0 {
			b := bits.TrailingZeros64(v)
			n := bits.TrailingZeros64(^(v >> b)) // < 64 - b + 1
			if b+n >= 64 {
				v = 0
			} else {
				v &^= (uint64(1)<<n - 1) << b
			}
			start := uint64(w)*64 + uint64(b)
			end := min(start+uint64(n), blocks)
			if start >= end {
				continue
			}
			s.dirty.SetRange(start, end-start)
			if k := len(s.late); k > 0 && s.late[k-1].Start+s.late[k-1].Len == start {
				s.late[k-1].Len += end - start
			} else if k < maxLate {
				s.late = append(s.late, bitmap.Extent{Start: start, Len: end - start})
			} else {
				s.lateAll = true
			}
		}
	}
}

// remarkLate marks again, for the next drain, the blocks of record r that
// the last drain's second swap took, if r is of that drain's epoch: r may
// be older than the write that marked them, and applied after their
// read-back it would stand in the copy over that newer write.
func (e *Engine) remarkLate(s *source, r *capture.Record) {
	if (len(s.late) == 0 && !s.lateAll) || r.Epoch != e.holdEpoch || (e.barrierSeen >= e.lateUntil && !e.forceLate) || r.Len == 0 {
		return
	}
	if s.lateAll {
		e.cap.MarkBytes(int(r.Dev), r.Offset, int64(r.Len))
		return
	}
	lo := uint64(r.Offset / capture.BlockSize)
	hi := uint64((r.Offset + int64(r.Len) + capture.BlockSize - 1) / capture.BlockSize)
	k, _ := slices.BinarySearchFunc(s.late, lo, func(x bitmap.Extent, b uint64) int {
		if x.Start+x.Len <= b {
			return -1
		}
		return 1
	})
	for ; k < len(s.late) && s.late[k].Start < hi; k++ {
		a, b := max(s.late[k].Start, lo), min(s.late[k].Start+s.late[k].Len, hi)
		if a < b {
			e.cap.MarkBytes(int(r.Dev), int64(a)*capture.BlockSize, int64(b-a)*capture.BlockSize)
		}
	}
}

// hold keeps ring record it back, if it was captured in the epoch the
// drain under way moved to (swapHolding); it reports whether it did. A
// record that does not decode is not held: apply reports it.
func (e *Engine) hold(it capture.Item) bool {
	var r capture.Record
	if it.Barrier != 0 || capture.Decode(it.Raw, &r) != nil || int(r.Dev) >= len(e.srcs) || r.Epoch != e.holdEpoch {
		return false
	}
	if e.lateTaken && e.barrierSeen < e.lateUntil {
		e.heldBeforeLate = true
	}
	if e.heldFull || len(e.held)+len(it.Raw) > maxHeld {
		// None kept after the first left out: a record kept and
		// applied before one read back later would be a dependent
		// write reaching the target before the write it follows.
		e.heldFull = true
		e.heldOut = append(e.heldOut, heldExtent{dev: int(r.Dev), off: r.Offset, n: int64(r.Len)})
		e.stats.HeldOut++
		return true
	}
	n := uint32(len(it.Raw))
	if e.lateTaken {
		n |= heldLate // held before, or after, the barrier lateUntil: either may predate the late marks
	}
	e.held = binary.LittleEndian.AppendUint32(e.held, n)
	e.held = append(e.held, it.Raw...)
	e.stats.Held++
	return true
}

// maxHeld bounds the records a drain holds back (their copies); past it,
// their extents are read back by the next drain instead. maxHeldKeep
// bounds the buffer kept for the next drain.
const (
	maxHeld     = 16 << 20
	maxHeldKeep = 4 << 20
)

// heldLate flags, in a held record's length, one to be treated as
// committed before the barrier lateUntil (remarkLate).
const heldLate = 1 << 31

// heldExtent is a record a drain did not keep (maxHeld).
type heldExtent struct {
	dev    int
	off, n int64
}

// applyHeld applies the records a drain held back, in ring order; bar is
// the drain's, when its read-back is under way.
func (e *Engine) applyHeld(bar *progress.Bar) error {
	for pos := 0; pos < len(e.held); {
		h := binary.LittleEndian.Uint32(e.held[pos:])
		n := int(h &^ heldLate)
		raw := e.held[pos+4 : pos+4+n]
		e.forceLate = h&heldLate != 0
		err := e.apply(capture.Item{Raw: raw}, bar)
		e.forceLate = false
		if err != nil {
			// Kept, the failed one too (applying it again writes the
			// same bytes): a caller going on after the error (an app
			// point that failed) loses none of them.
			e.held = append(e.held[:0], e.held[pos:]...)
			return err
		}
		pos += 4 + n
	}
	if cap(e.held) > maxHeldKeep {
		e.held = nil
	} else {
		e.held = e.held[:0]
	}
	return nil
}

// ResizeError reports a protected device whose size changed: capture
// (its bitmap, the target's size) covers the size it had at start, so the
// agent stops rather than miss writes past the old end. A restart protects
// the new size; it copies the device again.
type ResizeError struct {
	Path     string
	Old, New int64
}

func (e *ResizeError) Error() string {
	verb := "grew"
	if e.New < e.Old {
		verb = "shrank"
	}
	return fmt.Sprintf("%s %s from %d to %d bytes while protected: restart the agent to protect it at its new size (it copies the device again)",
		e.Path, verb, e.Old, e.New)
}

// checkSizes returns a *ResizeError if a device's size has changed, and
// an error if its media is gone (a loop device detached, nbd disconnected).
func (e *Engine) checkSizes() error {
	for _, s := range e.srcs {
		n, err := s.dev.Size()
		if errors.Is(err, blockdev.ErrNoMedia) {
			return fmt.Errorf("%s vanished while protected: %w", s.Path, err)
		}
		if err == nil && n != s.size {
			return &ResizeError{Path: s.Path, Old: s.size, New: n}
		}
	}
	return nil
}

// harvest moves the marks of metadata device i from the kernel bitmap to
// its read-back set, without the drain's ordering steps: a metadata device
// has no ring-captured data that a read-back could overtake. Capture
// marks every write of a metadata device there once it has landed (a
// ring record per write cost the kernel about as much and the agent a
// record to handle, for nothing a read-back needs), except when its
// pending bucket is full (add_pending marks at submission): that write's
// completion then finds no entry and marks it again
// (complete_untracked), so an early read-back is repeated.
func (e *Engine) harvest(i int) error {
	s := e.srcs[i]
	s.lastMarks = e.cap.Marks(i)
	if _, err := s.dirty.Drain(e.cap.BitmapWords(i)); err != nil && !errors.Is(err, bitmap.ErrOutOfRange) {
		return err
	}
	return nil
}

// inflightTimeout bounds the wait for ring-captured writes to land. A
// device that holds writes longer is hung; a completion the kernel did not
// report (a skipped program run) would otherwise stop the agent for good.
var inflightTimeout = 30 * time.Second // (a variable for tests)

// waitLanded waits until device i's writes captured in the ring under
// epoch parity p have completed, so that a read-back cannot be older
// than a write already applied.
func (e *Engine) waitLanded(ctx context.Context, i int, p uint32) error {
	deadline := time.Now().Add(inflightTimeout)
	nextSweep := time.Now().Add(sweepInterval)
	inflight := e.cap.RingInflight
	if e.ringInflight != nil {
		inflight = e.ringInflight
	}
	for inflight(i, p) > 0 {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Now().After(nextSweep) {
			// A completion the kernel never reported: its entry goes
			// stale and releases ring_inflight; the blocks are marked in
			// the kernel bitmap, which this drain swaps next (or, before
			// a bump, its second swap does).
			if _, err := e.markStale(); err != nil {
				return err
			}
			nextSweep = time.Now().Add(sweepInterval)
		}
		if time.Now().After(deadline) {
			k, _ := e.cap.Counters()
			e.log.Warn("captured writes still not completed: continuing; the next start resyncs by checksum",
				keyDevice, e.srcs[i].Path, "in_flight", inflight(i, p), "recursion_misses", k.RecursionMisses)
			e.stats.InflightTimeouts++
			e.srcs[i].unsettled.Store(true)
			e.cap.ResetRingInflight(i, p)
			return nil
		}
		time.Sleep(50 * time.Microsecond)
	}
	return nil
}

// readback copies the dirty blocks of device i from the device to the
// target. Dirty runs at most readbackGap blocks apart are read with one
// I/O (up to readbackChunk); only the runs go to the target. Each block
// is marked clean as it is read: blocks marked during the pass, behind
// it, wait for the next one.
//
// With ahead, the ring records that come in meanwhile are applied
// between reads (applyAhead) rather than left in the ring until the pass
// ends: a pass over a large bitmap (the initial copy, a drain after an
// overflow) takes far longer than the ring lasts under heavy writes, and
// a ring filled during one drain's read-back overflowed into the next.
func (e *Engine) readback(ctx context.Context, i int, bar *progress.Bar, ahead bool) error {
	s := e.srcs[i]
	for pos := uint64(0); ; {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		runs, next := e.takeSpan(s, pos, s.dirty.Blocks())
		if len(runs) == 0 {
			break
		}
		if err := e.readTaken(s, i, runs, bar); err != nil {
			return err
		}
		pos = next
		if ahead {
			if err := e.applyAhead(bar); err != nil {
				return err
			}
		}
	}
	s.compare = false
	s.readGen++
	if !slices.ContainsFunc(e.srcs, func(s *source) bool { return s.compare }) {
		e.cbuf = nil
	}
	return nil
}

// span returns the most bytes one read-back of s takes, and the buffer
// it reads into.
func (e *Engine) span(s *source) (int, []byte) {
	if _, ok := e.opt.Target.(Resyncer); ok && s.compare {
		if e.cbuf == nil {
			e.cbuf = blockdev.AlignedBuffer(compareChunk)
		}
		return compareChunk, e.cbuf
	}
	return readbackChunk, e.buf
}

// takeSpan takes from s's dirty set the runs, between blocks pos and end,
// that one read covers: from the first dirty block, runs at most
// readbackGap clean blocks apart within a span (readbackChunk, or
// compareChunk for a resync into a Resyncer). It marks them
// clean and returns them (in e.runs) and the block after the last.
func (e *Engine) takeSpan(s *source, pos, end uint64) ([]bitmap.Extent, uint64) {
	n, _ := e.span(s)
	maxSpan := n / capture.BlockSize
	runs := e.runs[:0]
	for ext := range s.dirty.ExtentsIn(pos, end, maxSpan) {
		if len(runs) > 0 {
			last := runs[len(runs)-1]
			if ext.Start-(last.Start+last.Len) > readbackGap || ext.Start+ext.Len-runs[0].Start > uint64(maxSpan) {
				break
			}
		}
		runs = append(runs, ext)
	}
	for _, r := range runs {
		s.dirty.ClearRange(r.Start, r.Len)
	}
	e.runs = runs
	if len(runs) == 0 {
		return nil, end
	}
	last := runs[len(runs)-1]
	return runs, last.Start + last.Len
}

// applyAheadBatch bounds the records applyAhead applies between two reads.
const applyAheadBatch = 4096

// applyAhead applies the ring records ready now, in the middle of a
// read-back. A data-mode record was captured at submission, so its write
// may not have landed yet: a read-back of its blocks after it is applied
// could bring back the older data over it. The blocks it covers that are
// still waiting in a read-back are therefore read first, then the record
// is applied, which is the order a drain keeps for all of them (blocks it
// covers whole need no read: readUnder). Only
// devices whose drain is under way have such blocks: their writes landed
// before the swap. Other records (metadata extents, other blocks, other
// devices) do not meet a pending read.
func (e *Engine) applyAhead(bar *progress.Bar) error {
	start := time.Now()
	defer func() { e.aheadTook += time.Since(start) }()
	for range applyAheadBatch {
		it, ok := e.rd.TryNext()
		if !ok {
			return nil
		}
		if it.Barrier == 0 {
			e.stats.AppliedAhead++
		}
		if err := e.apply(it, bar); err != nil {
			return err
		}
	}
	return nil
}

// readUnder settles the blocks of draining device i, still waiting in its
// read-back, that a record over [off, off+n) is about to be applied to.
// A block the record covers whole needs no read: read, it would be
// overwritten on the target by the record right after, which is what a
// drain did before (a failed write is marked for a later drain, as for
// any ring-captured write). The blocks it covers in part are read first.
func (e *Engine) readUnder(s *source, i int, off, n int64, bar *progress.Bar) error {
	lo := uint64(off / capture.BlockSize)
	hi := min(uint64((off+n+capture.BlockSize-1)/capture.BlockSize), s.dirty.Blocks())
	flo := min(uint64((off+capture.BlockSize-1)/capture.BlockSize), hi)
	fhi := max(min(uint64((off+n)/capture.BlockSize), hi), flo)
	for _, r := range [][2]uint64{{lo, flo}, {fhi, hi}} {
		for pos := r[0]; pos < r[1]; {
			runs, next := e.takeSpan(s, pos, r[1])
			if len(runs) == 0 {
				break
			}
			if err := e.readTaken(s, i, runs, bar); err != nil {
				return err
			}
			for _, x := range runs {
				e.stats.ReadEarly += x.Len
			}
			pos = next
		}
	}
	// Only now, the reads done: a failed one leaves these blocks too.
	for ext := range s.dirty.ExtentsIn(flo, fhi, 0) {
		s.dirty.ClearRange(ext.Start, ext.Len)
		e.stats.Overwritten += ext.Len
		if bar != nil {
			bar.Add(int64(ext.Len) * capture.BlockSize)
		}
	}
	return nil
}

// readTaken reads runs, which takeSpan took out of s's dirty set; should
// that fail, they go back into it, so that a drain that stops there
// leaves them to the next one.
func (e *Engine) readTaken(s *source, i int, runs []bitmap.Extent, bar *progress.Bar) error {
	if err := e.readSpan(s, i, runs, bar); err != nil {
		for _, r := range runs {
			s.dirty.SetRange(r.Start, r.Len)
		}
		return err
	}
	return nil
}

// readSpan reads the blocks from runs[0] to the end of the last run with
// one I/O and hands each run to the target.
func (e *Engine) readSpan(s *source, i int, runs []bitmap.Extent, bar *progress.Bar) error {
	off := int64(runs[0].Start) * capture.BlockSize
	end := min(int64(runs[len(runs)-1].Start+runs[len(runs)-1].Len)*capture.BlockSize, s.size)
	if end <= off {
		return nil
	}
	_, buf := e.span(s)
	p := buf[:end-off]
	if _, err := s.dev.ReadAtDirect(p, off); err != nil {
		return fmt.Errorf("read back %s at %d: %w", s.Path, off, err)
	}
	for _, r := range runs {
		roff := int64(r.Start) * capture.BlockSize
		rend := min(roff+int64(r.Len)*capture.BlockSize, end)
		if rend <= roff {
			continue
		}
		if err := e.deliver(s, i, p[roff-off:rend-off], roff); err != nil {
			return err
		}
		e.stats.BlocksReread += r.Len
		if bar != nil {
			bar.Add(rend - roff)
		}
	}
	return nil
}

// deliver hands p, read back from device i at off, to the target; with
// compare, only if the target's copy differs.
func (e *Engine) deliver(s *source, i int, p []byte, off int64) error {
	n := int64(len(p))
	if s.compare {
		if rs, ok := e.opt.Target.(Resyncer); ok {
			stored, err := rs.Resync(i, p, off)
			if err != nil {
				return err
			}
			e.stats.BytesReread += uint64(stored)
			e.stats.BlocksSkipped += uint64((n - stored) / capture.BlockSize)
			return nil
		}
		t := e.tbuf[:n]
		if m, err := e.opt.Target.ReadAt(i, t, off); err == nil && m == len(t) {
			return e.writeDiffering(i, p, t, off)
		}
	}
	e.stats.BytesReread += uint64(n)
	return e.opt.Target.WriteAt(i, p, off)
}

// writeDiffering writes to target i the blocks of p (the device at off)
// that differ from t (the target there), coalesced: a span read whole
// (up to a megabyte) may differ in one block, and writing all of it
// would fill the holes of a sparse mirror for nothing.
func (e *Engine) writeDiffering(i int, p, t []byte, off int64) error {
	from := -1 // start of the differing run under way
	for b := 0; ; b += capture.BlockSize {
		end := min(b+capture.BlockSize, len(p))
		same := b < len(p) && string(p[b:end]) == string(t[b:end])
		switch {
		case b < len(p) && !same:
			if from < 0 {
				from = b
			}
			continue
		case from >= 0:
			run := p[from:min(b, len(p))]
			e.stats.BytesReread += uint64(len(run))
			if err := e.opt.Target.WriteAt(i, run, off+int64(from)); err != nil {
				return err
			}
			from = -1
		}
		if b >= len(p) {
			return nil
		}
		e.stats.BlocksSkipped++
	}
}

// apply hands one ring record to the target. During a drain's read-back
// (applyAhead), a data-mode record first settles the blocks under it that
// the drain has still to read (readUnder); bar is the drain's.
func (e *Engine) apply(it capture.Item, bar *progress.Bar) error {
	if it.Barrier != 0 {
		e.barrierSeen = max(e.barrierSeen, it.Barrier)
		return nil
	}
	var r capture.Record
	if err := capture.Decode(it.Raw, &r); err != nil {
		return err
	}
	s, err := e.check(&r)
	if err != nil {
		return err
	}
	if s.draining && s.Mode != capture.ModeMetadata {
		if err := e.readUnder(s, int(r.Dev), r.Offset, int64(r.Len), bar); err != nil {
			return err
		}
	}
	if err := e.applyRecord(s, &r); err != nil {
		return err
	}
	e.remarkLate(s, &r)
	return nil
}

// check returns the source of record r, whose extent must lie on it.
func (e *Engine) check(r *capture.Record) (*source, error) {
	if int(r.Dev) >= len(e.srcs) {
		return nil, fmt.Errorf("record %d: unknown device %d", r.Seq, r.Dev)
	}
	s := e.srcs[r.Dev]
	if r.Offset < 0 || r.Offset > s.size-int64(r.Len) { // (no overflow near the sector limit)
		if err := e.checkSizes(); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("record %d: extent %d+%d beyond %s (%d bytes)", r.Seq, r.Offset, r.Len, s.Path, s.size)
	}
	return s, nil
}

// applyRecord hands record r of source s to the target.
func (e *Engine) applyRecord(s *source, r *capture.Record) error {
	var err error
	switch {
	case r.Data != nil:
		err = e.opt.Target.WriteAt(int(r.Dev), r.Data, r.Offset)
	case s.Mode == capture.ModeMetadata || r.Op == capture.OpWrite:
		// Capture marks a metadata device's writes in its bitmap, not
		// in the ring (harvest); should a record come all the same, or
		// a write without its payload, its extent is read back like a
		// mark (a write is never taken for zeros).
		if err := s.dirty.MarkBytes(r.Offset, int64(r.Len)); err != nil {
			return err
		}
		e.noteMeta(s)
	default: // data mode write-zeroes / discard
		err = e.opt.Target.Zero(int(r.Dev), r.Offset, int64(r.Len))
	}
	if err != nil {
		// The record is taken from the ring either way: its extent goes
		// to the kernel bitmap, whose drain reads it back (after the
		// write landed), so that a caller going on after the error (an
		// app point that failed) loses nothing.
		e.cap.MarkBytes(int(r.Dev), r.Offset, int64(r.Len))
		return err
	}
	e.stats.Applied++
	e.stats.LastSeq = max(e.stats.LastSeq, r.Seq)
	e.stats.AppliedBytes += uint64(len(r.Data))
	return nil
}

// noteMeta records that s has extents waiting to be read back.
func (e *Engine) noteMeta(s *source) {
	if !s.metaDirty {
		s.metaSince = time.Now()
	}
	s.metaDirty = true
}

// Unsettled reports whether a drain of device i went on past captured
// writes still in flight (waitLanded): the target may lack them, and the
// next run must resync the device by checksum rather than resume.
func (e *Engine) Unsettled(i int) bool { return e.srcs[i].unsettled.Load() }

// Stats returns the counters.
func (e *Engine) Stats() Stats {
	if e.closed {
		return e.final
	}
	s := e.stats
	s.Kernel, _ = e.cap.Counters()
	var ov uint64
	for i := range e.srcs {
		ov += e.cap.OverflowEvents(i)
	}
	s.OverflowEvents = ov
	return s
}

// Close releases the engine. After a clean Run the capture stays pinned
// (if PinDir was set); otherwise it is detached.
func (e *Engine) Close() error {
	if e.closed {
		return nil
	}
	e.final = e.Stats() // the capture's counters go with it
	e.closed = true
	var err error
	if e.persist && e.opt.PinDir != "" {
		err = e.cap.Persist()
	} else if e.opt.PinDir != "" {
		e.cap.Unpin()
	}
	e.cap.Close()
	e.closeDevs()
	return err
}
