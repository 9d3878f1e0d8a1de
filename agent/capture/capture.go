package capture

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// BlockSize is the bitmap granularity (LB_BLOCK_SHIFT in capture.h).
const BlockSize = 1 << 12

// Mode selects what capture copies for a device.
type Mode uint32

const (
	// ModeData copies every write's payload into the ring.
	ModeData Mode = 0
	// ModeMetadata records extents only; the agent reads the blocks back.
	ModeMetadata Mode = 1
)

// ParseMode parses "data" or "metadata".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "data":
		return ModeData, nil
	case "metadata":
		return ModeMetadata, nil
	}
	return 0, fmt.Errorf("unknown capture mode %q (want data or metadata)", s)
}

func (m Mode) String() string {
	if m == ModeMetadata {
		return "metadata"
	}
	return "data"
}

// Device is one protected block device.
type Device struct {
	ID        uint16 // index used in records
	KernelDev uint32 // major<<20 | minor, as the kernel's bd_dev
	Size      int64  // bytes
	Mode      Mode
	// A partition's whole disk (its KernelDev; 0 for a whole disk) and
	// first sector on it: writes to the disk over the partition are
	// captured too (read back).
	Disk  uint32
	Start uint64
}

// Blocks is the number of bitmap blocks covering the device.
func (d Device) Blocks() uint64 { return uint64((d.Size + BlockSize - 1) / BlockSize) }

// Config describes what to load.
type Config struct {
	Devices   []Device
	RingBytes int    // power of two, at most MaxRingBytes; default 64 MiB
	WakeBytes uint64 // unread bytes that force a reader wake-up; default RingBytes/8
	// PinDir (on a bpffs) keeps the capture state across agent restarts:
	// a clean stop leaves the programs attached and marking the bitmap,
	// and the next Load picks the maps up again. "" disables pinning.
	PinDir string
	// FreeAbandoned frees, when a pinned capture is resumed, the pending
	// slots an agent killed in the middle of a sweep left busy. Only for
	// a run that resyncs every device: a slot a program of the last run
	// still holds (preempted long enough) would be freed too, and the
	// write it tracks then marks nothing, which only a resync repairs.
	FreeAbandoned bool
	Logger        *slog.Logger
}

// Maps pinned across restarts. The ring itself is not: a clean stop
// drains it, and after an unclean one its contents cannot be trusted.
var pinnedMaps = []string{"devices", "devstate", "bitmap", "pending", "global", "counters", "ring_flight", "marks", "swept"}

// In attach order (see setup).
var pinnedLinks = []string{"link_complete", "link_rq_complete", "link_split", "link_queue"}

// Capture is the loaded and attached BPF side.
type Capture struct {
	log      *slog.Logger
	objs     captureObjects
	links    []link.Link
	ring     *eventRing
	devices  []Device
	wordBase []uint32 // first bitmap word per device ID
	bitmap   []byte   // mmap of the bitmap map
	devstate []byte   // mmap of the devstate map
	marks    []byte   // mmap of the marks map (a row of counts per CPU)
	pending  []byte   // mmap of the pending table
	global   []byte   // mmap of the global map (epoch)

	stopClock, clockDone chan struct{} // runClock
	pinDir               string
	resumed              bool
	freeAbandoned        bool // Config.FreeAbandoned
}

// MaxRingBytes is the largest ring: the kernel takes up to 2 GiB, but
// the ring is mapped twice into the agent and is always resident.
const MaxRingBytes = 1 << 30

// Load checks prerequisites, calibrates the direct map, loads the programs
// and attaches them. Capture starts before Load returns.
func Load(cfg Config) (*Capture, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("capture needs root (CAP_BPF and CAP_PERFMON)")
	}
	if err := CheckCapabilities(); err != nil {
		return nil, err
	}
	if err := CheckBTF(); err != nil {
		return nil, err
	}
	if len(cfg.Devices) == 0 || len(cfg.Devices) > maxDevices {
		return nil, fmt.Errorf("capture: %d devices (want 1 to %d)", len(cfg.Devices), maxDevices)
	}
	if cfg.RingBytes == 0 {
		cfg.RingBytes = 64 << 20
	}
	if cfg.RingBytes < 1<<16 || cfg.RingBytes > MaxRingBytes || cfg.RingBytes&(cfg.RingBytes-1) != 0 {
		return nil, fmt.Errorf("ring size %d: must be a power of two from 64 KiB to 1 GiB", cfg.RingBytes)
	}
	if cfg.WakeBytes == 0 {
		cfg.WakeBytes = uint64(cfg.RingBytes / 8)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	_ = rlimit.RemoveMemlock()

	spec, err := loadCapture()
	if err != nil {
		return nil, fmt.Errorf("load capture spec: %w", err)
	}
	c := &Capture{log: cfg.Logger, devices: cfg.Devices, freeAbandoned: cfg.FreeAbandoned}
	var words uint64
	for _, d := range cfg.Devices {
		c.wordBase = append(c.wordBase, uint32(words))
		words += (d.Blocks() + 63) / 64
	}
	// The bitmap's words are indexed with 32 bits, and its mapping is
	// addressed in bytes: 2^28 words (64 TiB of 4 KiB blocks) at most.
	if words > 1<<28 {
		return nil, fmt.Errorf("capture: the devices need %d bitmap words, more than the %d supported (64 TiB in all)", words, 1<<28)
	}
	if words == 0 {
		words = 1
	}
	spec.Maps["events"].MaxEntries = uint32(cfg.RingBytes)
	spec.Maps["bitmap"].MaxEntries = uint32(words)
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("capture: count possible CPUs: %w", err)
	}
	spec.Maps["marks"].MaxEntries = uint32(cpus * maxDevices)
	if err := spec.Variables["wake_bytes"].Set(cfg.WakeBytes); err != nil {
		return nil, err
	}
	if err := spec.Variables["wake_step"].Set(max(cfg.WakeBytes/4, 1)); err != nil {
		return nil, err
	}
	if err := spec.Variables["agent_tgid"].Set(uint32(os.Getpid())); err != nil {
		return nil, err
	}
	c.pinDir = cfg.PinDir
	loaded := false
	var repl map[string]*ebpf.Map
	if cfg.PinDir != "" {
		if err := ensureBPFFS(cfg.PinDir); err != nil {
			return nil, err
		}
		// One made now and left empty by a failed load would outlive
		// it (Remove takes only an empty directory).
		defer func() {
			if !loaded {
				os.Remove(cfg.PinDir)
			}
		}()
		var other string
		repl, other = loadPinned(cfg.PinDir, spec)
		if other != "" {
			c.log.Warn("capture state pinned by the last run has another layout (lifeboat was upgraded): not resuming it", "map", other)
		}
		if repl != nil {
			if err := c.samePinnedLayout(repl["devices"]); err != nil {
				// Its bitmap words and device states belong to other
				// devices: resuming would read one disk back where
				// another was written.
				c.log.Warn("capture state pinned by the last run is for another device layout: not resuming it", "reason", err.Error())
				for _, m := range repl {
					m.Close()
				}
				repl = nil
			}
		}
		c.resumed = repl != nil
		defer func() {
			for _, m := range repl {
				m.Close()
			}
		}()
	}
	if err := spec.LoadAndAssign(&c.objs, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load capture programs: %+v", ve)
		}
		return nil, fmt.Errorf("load capture programs: %w", err)
	}
	if err := c.setup(); err != nil {
		c.Close()
		return nil, err
	}
	loaded = true
	return c, nil
}

func (c *Capture) setup() error {
	var err error
	if n, m := c.objs.Devstate.MaxEntries(), c.objs.Marks.MaxEntries(); n != maxDevices || m%maxDevices != 0 {
		return fmt.Errorf("capture: %d device states and %d mark counts, want %d and a multiple of it", n, m, maxDevices)
	}
	if c.bitmap, err = mmapMap(c.objs.Bitmap); err != nil {
		return fmt.Errorf("mmap bitmap: %w", err)
	}
	if c.devstate, err = mmapMap(c.objs.Devstate); err != nil {
		return fmt.Errorf("mmap devstate: %w", err)
	}
	if c.marks, err = mmapMap(c.objs.Marks); err != nil {
		return fmt.Errorf("mmap marks: %w", err)
	}
	if n, sz := c.objs.Pending.MaxEntries(), c.objs.Pending.ValueSize(); n != pendBuckets || sz != uint32(unsafe.Sizeof(captureLbBucket{})) {
		return fmt.Errorf("capture: pending table has %d buckets of %d bytes, want %d of %d", n, sz, pendBuckets, unsafe.Sizeof(captureLbBucket{}))
	}
	if c.pending, err = mmapMap(c.objs.Pending); err != nil {
		return fmt.Errorf("mmap pending: %w", err)
	}
	if c.global, err = mmapMap(c.objs.Global); err != nil {
		return fmt.Errorf("mmap global: %w", err)
	}
	if err := c.calibrate(); err != nil {
		return err
	}
	c.tick()
	c.stopClock = make(chan struct{})
	c.clockDone = make(chan struct{})
	go c.runClock()
	// Until the agent has drained them, all devices mark the bitmap
	// (the initial copy reads everything anyway).
	for i := range c.devices {
		c.SetOverflow(i, true)
	}
	if c.resumed {
		c.forgetOtherDevices()
		if c.freeAbandoned {
			c.freeAbandonedSlots()
		}
	}
	for i, d := range c.devices {
		v := captureLbDev{Id: uint32(d.ID), Mode: uint32(d.Mode), Blocks: d.Blocks(), BitmapWord: c.wordBase[i]}
		if err := c.objs.Devinfo.Put(uint32(d.ID), v); err != nil {
			return fmt.Errorf("register device %d: %w", d.ID, err)
		}
		if err := c.objs.Devices.Put(d.KernelDev, v); err != nil {
			return fmt.Errorf("register device %d: %w", d.ID, err)
		}
	}
	if err := c.registerDisks(); err != nil {
		return err
	}
	if c.ring, err = newEventRing(c.objs.Events); err != nil {
		return fmt.Errorf("ring reader: %w", err)
	}
	// Completion and split handlers first: a queued bio must never miss
	// its completion.
	for _, p := range []*ebpf.Program{c.objs.LbBioComplete, c.objs.LbRqComplete, c.objs.LbSplit, c.objs.LbBioQueue} {
		l, err := link.AttachTracing(link.TracingOptions{Program: p})
		if err != nil {
			return fmt.Errorf("attach %s: %w", p, err)
		}
		c.links = append(c.links, l)
	}
	// Only now that the new programs run, retire those of the last run.
	for _, name := range pinnedLinks {
		if c.pinDir == "" {
			break
		}
		if l, err := link.LoadPinnedLink(filepath.Join(c.pinDir, name), nil); err == nil {
			l.Unpin()
			l.Close()
		}
	}
	return nil
}

// registerDisks lists, per whole disk, the protected partitions on it.
func (c *Capture) registerDisks() error {
	disks := map[uint32]*captureLbDisk{}
	for _, d := range c.devices {
		if d.Disk == 0 {
			continue
		}
		k := disks[d.Disk]
		if k == nil {
			k = &captureLbDisk{}
			disks[d.Disk] = k
		}
		if int(k.N) == len(k.Part) {
			return fmt.Errorf("capture: more than %d protected partitions on one disk", len(k.Part))
		}
		k.Part[k.N].Start, k.Part[k.N].Sectors, k.Part[k.N].Id = d.Start, uint64(d.Size/512), uint32(d.ID)
		k.N++
	}
	for dev, k := range disks {
		if err := c.objs.Disks.Put(dev, k); err != nil {
			return fmt.Errorf("register disk %d:%d: %w", dev>>20, dev&(1<<20-1), err)
		}
	}
	return nil
}

func (c *Capture) forgetOtherDevices() {
	keep := map[uint32]bool{}
	for _, d := range c.devices {
		keep[d.KernelDev] = true
	}
	var k uint32
	var stale []uint32
	it := c.objs.Devices.Iterate()
	var v captureLbDev
	for it.Next(&k, &v) {
		if !keep[k] {
			stale = append(stale, k)
		}
	}
	for _, k := range stale {
		c.objs.Devices.Delete(k)
	}
}

// Resumed reports whether Load found the capture state of a previous run
// pinned, compatible with this configuration: its bitmap holds every
// write since that run's clean stop.
func (c *Capture) Resumed() bool { return c.resumed }

// samePinnedLayout checks that the pinned devices map (kernel device to
// its state) gave every configured device the ID, size and bitmap words
// it has now: devices listed in another order, replaced behind the same
// path, resized, added or removed all move them.
func (c *Capture) samePinnedLayout(devices *ebpf.Map) error {
	for i, d := range c.devices {
		var v captureLbDev
		if err := devices.Lookup(d.KernelDev, &v); err != nil {
			return fmt.Errorf("device %d:%d was not protected by that run", d.KernelDev>>20, d.KernelDev&(1<<20-1))
		}
		if v.Id != uint32(d.ID) || v.Blocks != d.Blocks() || v.BitmapWord != c.wordBase[i] {
			return fmt.Errorf("device %d:%d was device %d of %d blocks at bitmap word %d, now device %d of %d blocks at word %d",
				d.KernelDev>>20, d.KernelDev&(1<<20-1), v.Id, v.Blocks, v.BitmapWord, d.ID, d.Blocks(), c.wordBase[i])
		}
	}
	return nil
}

// loadPinned returns the pinned maps if all exist and match spec; else
// nil, and the name of a pinned map whose layout differs, if one does.
func loadPinned(dir string, spec *ebpf.CollectionSpec) (map[string]*ebpf.Map, string) {
	repl := map[string]*ebpf.Map{}
	other := ""
	for _, name := range pinnedMaps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			break
		}
		ms := spec.Maps[name]
		if m.Type() != ms.Type || m.KeySize() != ms.KeySize || m.ValueSize() != ms.ValueSize ||
			m.MaxEntries() != ms.MaxEntries || m.Flags() != ms.Flags {
			m.Close()
			other = name
			break
		}
		repl[name] = m
	}
	if len(repl) != len(pinnedMaps) {
		for _, m := range repl {
			m.Close()
		}
		return nil, other
	}
	return repl, ""
}

// pinnable returns the maps named in pinnedMaps.
func (c *Capture) pinnable() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{"devices": c.objs.Devices, "devstate": c.objs.Devstate, "bitmap": c.objs.Bitmap,
		"pending": c.objs.Pending, "global": c.objs.Global, "counters": c.objs.Counters, "ring_flight": c.objs.RingFlight,
		"marks": c.objs.Marks, "swept": c.objs.Swept}
}

// Persist pins the maps and links so capture outlives this process.
func (c *Capture) Persist() error {
	if c.pinDir == "" {
		return nil
	}
	maps := c.pinnable()
	for _, name := range pinnedMaps {
		p := filepath.Join(c.pinDir, name)
		if m := maps[name]; !m.IsPinned() {
			os.Remove(p)
			if err := m.Pin(p); err != nil {
				return fmt.Errorf("pin %s: %w", name, err)
			}
		}
	}
	for i, l := range c.links {
		p := filepath.Join(c.pinDir, pinnedLinks[i])
		os.Remove(p)
		if err := l.Pin(p); err != nil {
			return fmt.Errorf("pin %s: %w", pinnedLinks[i], err)
		}
	}
	return nil
}

// Unpin removes every pin, so that Close detaches capture for good.
func (c *Capture) Unpin() {
	if c.pinDir == "" {
		return
	}
	for _, l := range c.links {
		l.Unpin()
	}
	for _, name := range pinnedLinks {
		if l, err := link.LoadPinnedLink(filepath.Join(c.pinDir, name), nil); err == nil {
			l.Unpin()
			l.Close()
		}
	}
	for _, m := range c.pinnable() {
		if m != nil {
			m.Unpin()
		}
	}
	for _, name := range pinnedMaps {
		os.Remove(filepath.Join(c.pinDir, name))
	}
	os.Remove(c.pinDir) // only if empty
}

// ensureBPFFS makes sure dir is on a mounted bpffs, mounting
// /sys/fs/bpf if needed.
func ensureBPFFS(dir string) error {
	const bpffsMagic = 0xcafe4a11
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil || st.Type != bpffsMagic {
		if err := unix.Mount("bpf", "/sys/fs/bpf", "bpf", 0, "mode=0700"); err != nil {
			return fmt.Errorf("mount bpffs on /sys/fs/bpf: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := unix.Statfs(dir, &st); err != nil || st.Type != bpffsMagic {
		return fmt.Errorf("pin directory %s is not on a bpffs", dir)
	}
	return nil
}

// calibrate runs lb_calibrate once in this process to find the kernel's
// direct map, which data mode needs to read bio pages.
func (c *Capture) calibrate() error {
	l, err := link.AttachTracing(link.TracingOptions{Program: c.objs.LbCalibrate})
	if err != nil {
		return fmt.Errorf("attach calibration: %w", err)
	}
	defer l.Close()
	var g captureLbGlobal
	for i := 0; i < 100; i++ {
		unix.Getppid() // any syscall from this process triggers it
		if err := c.objs.Global.Lookup(uint32(0), &g); err != nil {
			return fmt.Errorf("read calibration: %w", err)
		}
		if g.CalibStatus != 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if g.CalibStatus != 1 {
		return fmt.Errorf("cannot locate the kernel direct map (calibration status %d)", g.CalibStatus)
	}
	c.log.Debug("calibrated", "page_offset", fmt.Sprintf("%#x", g.PageOffset), "vmemmap", fmt.Sprintf("%#x", g.Vmemmap))
	return nil
}

func mmapMap(m *ebpf.Map) ([]byte, error) {
	size := int(m.MaxEntries()) * int(m.ValueSize())
	size = (size + os.Getpagesize() - 1) &^ (os.Getpagesize() - 1)
	return unix.Mmap(m.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
}

// Close detaches the programs and releases everything.
func (c *Capture) Close() error {
	if c.stopClock != nil {
		close(c.stopClock)
		<-c.clockDone
		c.stopClock = nil
	}
	for _, l := range c.links {
		l.Close()
	}
	c.links = nil
	if c.ring != nil {
		c.ring.close()
		c.ring = nil
	}
	if c.bitmap != nil {
		unix.Munmap(c.bitmap)
		c.bitmap = nil
	}
	if c.devstate != nil {
		unix.Munmap(c.devstate)
		c.devstate = nil
	}
	if c.marks != nil {
		unix.Munmap(c.marks)
		c.marks = nil
	}
	if c.pending != nil {
		unix.Munmap(c.pending)
		c.pending = nil
	}
	if c.global != nil {
		unix.Munmap(c.global)
		c.global = nil
	}
	return c.objs.Close()
}

// Detach stops capture of new writes; records already in the ring stay
// readable.
func (c *Capture) Detach() {
	for _, l := range c.links {
		l.Close()
	}
	c.links = nil
}

// BitmapWords returns device i's words of the shared bitmap.
func (c *Capture) BitmapWords(i int) []uint64 {
	n := (c.devices[i].Blocks() + 63) / 64
	all := unsafe.Slice((*uint64)(unsafe.Pointer(&c.bitmap[0])), len(c.bitmap)/8)
	return all[c.wordBase[i] : uint64(c.wordBase[i])+n]
}

func (c *Capture) state(i int) *captureLbDevstate {
	return (*captureLbDevstate)(unsafe.Pointer(&c.devstate[i*int(unsafe.Sizeof(captureLbDevstate{}))]))
}

// Overflowed reports whether device i is in overflow (bitmap) mode.
func (c *Capture) Overflowed(i int) bool {
	return atomic.LoadUint32(&c.state(i).Overflow) != 0
}

// SetOverflow forces device i into (true) or out of (false) bitmap mode.
func (c *Capture) SetOverflow(i int, on bool) {
	var v uint32
	if on {
		v = 1
	}
	atomic.StoreUint32(&c.state(i).Overflow, v)
}

// OverflowEvents is the number of times device i's ring path overflowed.
func (c *Capture) OverflowEvents(i int) uint64 {
	return atomic.LoadUint64(&c.state(i).OverflowEvents)
}

// Counters sums the per-CPU counters.
func (c *Capture) Counters() (Counters, error) {
	s, err := c.sum()
	if err != nil {
		return Counters{}, err
	}
	for _, prog := range []*ebpf.Program{c.objs.LbBioQueue, c.objs.LbBioComplete, c.objs.LbRqComplete, c.objs.LbSplit} {
		if st, err := prog.Stats(); err == nil {
			s.RecursionMisses += st.RecursionMisses
		}
	}
	return s, nil
}

// sum adds up the per-CPU counters (without the programs' stats).
func (c *Capture) sum() (Counters, error) {
	var per []captureLbCounters
	if err := c.objs.Counters.Lookup(uint32(0), &per); err != nil {
		return Counters{}, err
	}
	var s Counters
	for _, p := range per {
		s.Records += p.Records
		s.Bytes += p.Bytes
		s.OverflowBios += p.OverflowBios
		s.BitmapMarks += p.BitmapMarks
		s.MarkFailures += p.MarkFailures
		s.PendingFull += p.PendingFull
		s.CopyFailures += p.CopyFailures
		s.Untracked += p.Untracked
		s.LateCompletions += p.LateCompletions
		s.DiskWrites += p.DiskWrites
		s.NowaitSplits += p.NowaitSplits
		s.Inflight += p.Inflight
	}
	return s, nil
}

// DiskWrites returns Counters().DiskWrites, cheaply: 0 without protected
// partitions, whose whole disks are the only ones such writes go to.
func (c *Capture) DiskWrites() (uint64, error) {
	if !slices.ContainsFunc(c.devices, func(d Device) bool { return d.Disk != 0 }) {
		return 0, nil
	}
	s, err := c.sum()
	return s.DiskWrites, err
}

// Counters are the kernel-side counts, summed over CPUs.
type Counters struct {
	Records uint64 `json:"records"`
	Bytes   uint64 `json:"bytes"`
	// OverflowBios counts the write bios that took the bitmap path: the
	// one that found the ring full, and every one while the device
	// overflowed or a drain parked it.
	OverflowBios uint64 `json:"overflow_bios"`
	BitmapMarks  uint64 `json:"bitmap_marks"`
	MarkFailures uint64 `json:"mark_failures"`
	PendingFull  uint64 `json:"pending_full"`
	CopyFailures uint64 `json:"copy_failures"`
	Untracked    uint64 `json:"untracked"`
	// LateCompletions counts tracked writes whose end the block
	// tracepoints missed, settled when their bio's memory was reused.
	LateCompletions uint64 `json:"late_completions"`
	// DiskWrites counts writes to a whole disk over protected partitions
	// (not through a partition's device), tracked until they complete.
	DiskWrites uint64 `json:"disk_writes"`
	// NowaitSplits counts REQ_NOWAIT writes their queue would have to
	// split (io_uring's first try): they fail and come again, so they are
	// tracked, not recorded.
	NowaitSplits uint64 `json:"nowait_splits"`
	// RecursionMisses counts capture program runs the kernel skipped
	// because another ran on the same CPU (an interrupt nested in one).
	RecursionMisses uint64 `json:"recursion_misses"`
	Inflight        int64  `json:"-"`
}

// RingInflight is the number of device i's ring-captured writes, captured
// under epoch parity p (Epoch), that have not completed yet: the per-CPU
// counts capture keeps plus the agent's own adjustments. The per-CPU
// values are read one after the other, so the finished counts are read
// first: both only grow, and the result is never below the number in
// flight at the moment the finished counts were read. A failed read
// counts as one write in flight (waitLanded then times out rather than
// letting a read-back run ahead).
func (c *Capture) RingInflight(i int, p uint32) int64 {
	p &= 1
	adj := atomic.LoadInt64(&c.state(i).RingInflight[p])
	n, err := c.ringFlight(i, p)
	if err != nil {
		return max(1, n+adj)
	}
	return n + adj
}

// ringFlight is device i's started minus finished ring-captured writes
// of epoch parity p.
func (c *Capture) ringFlight(i int, p uint32) (int64, error) {
	var perCPU []captureLbFlight
	if err := c.objs.RingFlight.Lookup(uint32(c.devices[i].ID), &perCPU); err != nil {
		return 0, err
	}
	var finished uint64
	for _, v := range perCPU {
		finished += v.Finished[p]
	}
	// A second read for the started counts, after the finished ones.
	if err := c.objs.RingFlight.Lookup(uint32(c.devices[i].ID), &perCPU); err != nil {
		return 0, err
	}
	var started uint64
	for _, v := range perCPU {
		started += v.Started[p]
	}
	return int64(started - finished), nil
}

// ResetRingInflight forgets device i's in-flight count of epoch parity p
// (after a timeout).
func (c *Capture) ResetRingInflight(i int, p uint32) {
	p &= 1
	n, _ := c.ringFlight(i, p)
	atomic.StoreInt64(&c.state(i).RingInflight[p], -n)
}

// Epoch is the drain epoch: ring records carry it (Record.Epoch), their
// writes' flight counts its parity (RingInflight).
func (c *Capture) Epoch() uint32 {
	return atomic.LoadUint32(&c.glob().Epoch)
}

// BumpEpoch moves every device to the next drain epoch at once and
// returns it. Programs that start after it capture in the new epoch; one
// already running may still use the old one (ProgramsRunning tells when
// none is left). The add is a full barrier, as the program's count of
// itself running is: either the agent sees a program running or the
// program sees the new epoch.
func (c *Capture) BumpEpoch() uint32 {
	return atomic.AddUint32(&c.glob().Epoch, 1)
}

func (c *Capture) glob() *captureLbGlobal {
	return (*captureLbGlobal)(unsafe.Pointer(&c.global[0]))
}

// Marks counts the bitmap marks of device i; it moves when there is
// something to read back. Every count it sums only grows, so a mark not
// in one result makes every later one differ from it.
func (c *Capture) Marks(i int) uint64 {
	n := atomic.LoadUint64(&c.state(i).Marks)
	rows := unsafe.Slice((*uint64)(unsafe.Pointer(&c.marks[0])), c.objs.Marks.MaxEntries())
	for r := int(c.devices[i].ID); r < len(rows); r += maxDevices {
		n += atomic.LoadUint64(&rows[r])
	}
	return n
}

// ProgramsRunning is the number of capture programs running right now on
// any CPU (they may still reserve ring space).
func (c *Capture) ProgramsRunning() (int64, error) {
	s, err := c.Counters()
	return s.Inflight, err
}

// clockPeriod is how often capture gets the time that stamps pending
// writes (SweepStale ages are whole seconds).
const clockPeriod = 250 * time.Millisecond

// ClockLag bounds how far a pending write's stamp can be behind the time
// it was queued: the clock's period, and the whole second stamps keep.
const ClockLag = clockPeriod + time.Second

// runClock keeps capture's clock current until Close. A pinned capture
// keeps the last time it got while no agent runs: its entries then look
// older than they are, and a restarted agent may sweep them early, which
// only reads them back early.
func (c *Capture) runClock() {
	defer close(c.clockDone)
	t := time.NewTicker(clockPeriod)
	defer t.Stop()
	for {
		select {
		case <-c.stopClock:
			return
		case <-t.C:
			c.tick()
		}
	}
}

// tick gives capture the current time, which stamps pending writes.
func (c *Capture) tick() {
	now := monoSeconds()
	for i := range c.devices {
		atomic.StoreUint32(&c.state(i).Clock, now)
	}
}

// Stale is a pending write whose completion never came (see SweepStale).
type Stale struct {
	Dev      int   // device index
	Off, Len int64 // bytes
}

// monoSeconds is the clock of lb_pending.stamp (see Tick).
func monoSeconds() uint32 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint32(ts.Sec)
}

// SweepStale removes pending entries older than maxAge (ringAge for
// ring-captured writes) and returns their extents. The kernel now and then
// ends a request without firing block_rq_complete (seen with loop on
// 6.18), and the writes that capture handles at completion (metadata mode,
// the bitmap path) would then go unrecorded: the caller must read those
// extents back under the drain protocol. Sweeping such a write while it is
// still in flight only reads it back early: its completion finds no entry
// and marks the bitmap. A ring-captured write's entry only keeps
// ring_inflight up, released here; it needs the longer age, because
// releasing it early could let a read-back run ahead of it.
func (c *Capture) SweepStale(maxAge, ringAge time.Duration) ([]Stale, error) {
	now := monoSeconds()
	limit, ringLimit := uint32(maxAge/time.Second), uint32(ringAge/time.Second)
	return c.sweep(func(v *captureLbPending) bool {
		l := limit
		if v.Kind == kindRing {
			l = ringLimit
		}
		return now-v.Stamp > l && now >= v.Stamp
	})
}

// SweepIdle removes every pending entry of the devices idle reports as
// having no write in flight, whatever its age, except ring-captured ones:
// such a write has ended unseen. A write that starts meanwhile is only
// read back early; its completion then marks the bitmap, as for a write
// in flight when capture attached. A ring-captured write is left to
// SweepStale: releasing it early could let a read-back run ahead of it.
func (c *Capture) SweepIdle(idle func(kernelDev uint32) bool) ([]Stale, error) {
	known := map[uint32]bool{} // one look per device and sweep
	isIdle := func(dev uint32) bool {
		v, ok := known[dev]
		if !ok {
			v = idle(dev)
			known[dev] = v
		}
		return v
	}
	return c.sweep(func(v *captureLbPending) bool {
		switch v.Kind {
		case kindRing:
			return false
		case kindDisk:
			// Counted in flight on the whole disk, not its partitions.
			return isIdle(v.Disk)
		}
		i := c.index(v.Dev)
		return i >= 0 && isIdle(c.devices[i].KernelDev)
	})
}

// sweep removes the pending entries old picks, settles them and returns
// their extents. Whoever frees a slot settles its entry: the BPF side does
// the same when the write completes or its bio address is reused. A slot
// is claimed (LB_TAG_BUSY) before its entry is read, and that entry may
// already be a new bio's under the same address: it is then put back.
func (c *Capture) sweep(old func(*captureLbPending) bool) ([]Stale, error) {
	var stale []Stale
	for i := range pendSlots {
		t, p := c.slot(i)
		tag := atomic.LoadUint64(t)
		if tag == tagFree || tag == tagBusy {
			continue
		}
		if v := *p; !old(&v) { // read unclaimed: a hint only
			continue
		}
		if !atomic.CompareAndSwapUint64(t, tag, tagBusy) {
			continue // completed or settled meanwhile
		}
		v := *p
		if !old(&v) {
			atomic.StoreUint64(t, tag)
			continue
		}
		// A completion that still shows up, on another device than the
		// bio was queued on, reads the write back again (swept map); put
		// there before the slot is freed, so that a completion finds one
		// or the other. Only read back: this sweep has already counted a
		// ring-captured write finished.
		sv := v
		if sv.Kind == kindRing {
			sv.Kind = kindOverflow
		}
		c.objs.Swept.Put(tag, &sv)
		atomic.StoreUint64(t, tagFree)
		if v.Kind == kindDisk {
			stale = append(stale, c.diskOverlaps(v.Disk, v.Sector, v.Len)...)
			continue
		}
		idx := c.index(v.Dev)
		if idx < 0 {
			continue
		}
		if v.Kind == kindRing {
			atomic.AddInt64(&c.state(idx).RingInflight[v.Epoch&1], -1)
		}
		stale = append(stale, Stale{Dev: idx, Off: int64(v.Sector) * 512, Len: int64(v.Len)})
	}
	return stale, nil
}

// maxDevices is LB_MAX_DEVICES: devices per capture, and a row of the
// marks map.
const maxDevices = 64

// The pending table (capture.h: LB_PEND_BITS, LB_PEND_WAYS, LB_TAG_*).
const (
	pendBits    = 13
	pendBuckets = 1 << pendBits
	pendWays    = len(captureLbBucket{}.Tag)
	pendSlots   = pendBuckets * pendWays
	tagFree     = 0
	tagBusy     = 1
)

// slot returns the tag and entry of slot i of the pending table (way
// i%pendWays of bucket i/pendWays).
func (c *Capture) slot(i int) (*uint64, *captureLbPending) {
	b := (*captureLbBucket)(unsafe.Pointer(&c.pending[i/pendWays*int(unsafe.Sizeof(captureLbBucket{}))]))
	return &b.Tag[i%pendWays], &b.P[i%pendWays]
}

// CompletionPendingSince reports whether the pending table holds a write
// that is handed over only once its completion is seen (read back then):
// any tracked write but a ring-captured one; and a time at or before which
// the oldest of them was queued. One whose completion the kernel does not
// report stays there until SweepStale finds it. Stamps are whole seconds
// of the monotonic clock, never ahead of the queueing. The entries are
// read unclaimed: a hint, as in sweep.
func (c *Capture) CompletionPendingSince() (time.Time, bool) {
	var oldest uint32
	found := false
	for i := range pendSlots {
		t, p := c.slot(i)
		if tag := atomic.LoadUint64(t); tag != tagFree && tag != tagBusy && p.Kind != kindRing {
			if st := p.Stamp; !found || st < oldest {
				oldest, found = st, true
			}
		}
	}
	if !found {
		return time.Time{}, false
	}
	now := time.Now() // first: the age below is then never short
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	if age := time.Duration(ts.Nano()) - time.Duration(oldest)*time.Second; age > 0 {
		return now.Add(-age), true
	}
	return now, true
}

// freeAbandonedSlots frees the pending slots left busy by an agent that
// stopped in the middle of a sweep. A program holds a slot busy for a few
// instructions only: a slot still busy after abandonedAfter was left.
// (That agent's unclean stop makes this run resync anyway.)
func (c *Capture) freeAbandonedSlots() {
	var busy []int
	for i := range pendSlots {
		if t, _ := c.slot(i); atomic.LoadUint64(t) == tagBusy {
			busy = append(busy, i)
		}
	}
	if len(busy) == 0 {
		return
	}
	time.Sleep(abandonedAfter)
	n := 0
	for _, i := range busy {
		if t, _ := c.slot(i); atomic.CompareAndSwapUint64(t, tagBusy, tagFree) {
			n++
		}
	}
	c.log.Warn("freed pending slots left busy by the previous run", "slots", n)
}

const abandonedAfter = 100 * time.Millisecond

// putPending adds an entry under key as track_bio does (tests only: it
// does not settle an entry already there).
func (c *Capture) putPending(key uint64, v captureLbPending) error {
	h := int((key * 0x9E3779B97F4A7C15) >> (64 - pendBits))
	for w := range pendWays {
		t, p := c.slot(h*pendWays + w)
		if atomic.CompareAndSwapUint64(t, tagFree, tagBusy) {
			*p = v
			atomic.StoreUint64(t, key)
			return nil
		}
	}
	return errors.New("capture: no free pending slot")
}

// Pending kinds (enum lb_pend_kind).
const (
	kindOverflow = 2
	kindRing     = 3
	kindDisk     = 4
)

// diskOverlaps returns the parts of a write to whole disk disk (len bytes
// at sector) that fall in protected partitions, as their extents.
func (c *Capture) diskOverlaps(disk uint32, sector uint64, n uint32) []Stale {
	var out []Stale
	first, end := sector, sector+(uint64(n)+511)/512
	for i, d := range c.devices {
		if d.Disk != disk {
			continue
		}
		ps, pe := d.Start, d.Start+uint64(d.Size/512)
		a, b := max(first, ps), min(end, pe)
		if a < b {
			out = append(out, Stale{Dev: i, Off: int64(a-ps) * 512, Len: int64(b-a) * 512})
		}
	}
	return out
}

// index returns the device index of device id, -1 if unknown.
func (c *Capture) index(id uint16) int {
	for i, d := range c.devices {
		if d.ID == id {
			return i
		}
	}
	return -1
}

// InjectPending inserts a pending entry for device i's extent, stamped
// age ago, as if the kernel had queued a write and never reported its
// completion. For tests of SweepStale.
func (c *Capture) InjectPending(i int, off, n int64, metadata bool, age time.Duration) error {
	kind := uint8(kindOverflow)
	if metadata {
		kind = 1 // LB_PEND_META
	}
	v := captureLbPending{Sector: uint64(off / 512), Len: uint32(n), Opf: 1, Dev: c.devices[i].ID, Op: 1, Kind: kind,
		Stamp: monoSeconds() - uint32(age/time.Second)}
	return c.putPending(uint64(0xdead0000_00000000)|uint64(off), v)
}

// InjectDiskPending inserts a pending entry, stamped now, for a write of
// n bytes at off on the whole disk that holds device i (a partition), as
// if the kernel had queued it there and would never report its
// completion. For tests of coverage.
func (c *Capture) InjectDiskPending(i int, off, n int64) error {
	d := c.devices[i]
	if d.Disk == 0 {
		return fmt.Errorf("capture: device %d is not a partition", i)
	}
	v := captureLbPending{Sector: uint64(off / 512), Len: uint32(n), Opf: 1, Op: 1, Kind: kindDisk, Disk: d.Disk,
		Stamp: monoSeconds()}
	return c.putPending(uint64(0xdeae0000_00000000)|uint64(off), v)
}

// MarkBytes marks device i's blocks covering [off, off+n) in the kernel
// bitmap, as a BPF program would, and moves the device's mark count so
// that the agent's loop drains it.
func (c *Capture) MarkBytes(i int, off, n int64) {
	words := c.BitmapWords(i)
	first := off / BlockSize
	// Not past the device's last block: the drain takes a bit there for
	// a layout that does not match (bitmap.ErrOutOfRange).
	end := min((off+max(n, 1)+BlockSize-1)/BlockSize, int64(c.devices[i].Blocks()))
	for b := first; b < end; b++ {
		atomic.OrUint64(&words[b/64], 1<<(b%64))
	}
	atomic.AddUint64(&c.state(i).Marks, 1)
}

// capabilitiesNeeded are the capabilities loading, attaching and reading
// the tp_btf capture programs need.
var capabilitiesNeeded = []struct {
	name string
	bit  uint
}{{"CAP_BPF", unix.CAP_BPF}, {"CAP_PERFMON", unix.CAP_PERFMON}}

// CheckBTF fails when the kernel's BTF, which the programs' CO-RE
// relocations need, is missing or cannot be read. Agents call it with
// CheckCapabilities, before they change any state.
func CheckBTF() error {
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return errors.New("this kernel has no BTF (/sys/kernel/btf/vmlinux): eBPF capture needs CONFIG_DEBUG_INFO_BTF")
	}
	if _, err := btf.LoadKernelSpec(); err != nil {
		return fmt.Errorf("cannot read this kernel's BTF (/sys/kernel/btf/vmlinux): %w", err)
	}
	return nil
}

// CheckCapabilities fails, naming them, when this process lacks
// capabilities capture needs. Else the first map creation fails with EPERM
// and a hint about MEMLOCK that sends the user the wrong way. Agents call
// it before anything else, so that a misconfigured service changes no
// state.
func CheckCapabilities() error {
	missing, err := missingCapabilities()
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return fmt.Errorf("capture needs CAP_BPF and CAP_PERFMON; this process lacks %s (a service's CapabilityBoundingSet must list them)", strings.Join(missing, " and "))
	}
	return nil
}

// missingCapabilities returns the needed capabilities this process does
// not have in its effective set.
func missingCapabilities() ([]string, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return nil, fmt.Errorf("read this process's capabilities: %w", err)
	}
	return lacking(uint64(data[1].Effective)<<32 | uint64(data[0].Effective)), nil
}

// CanFreeze reports whether this process holds CAP_SYS_ADMIN, which
// freezing file systems (FIFREEZE) for app-consistent points needs.
func CanFreeze() (bool, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false, fmt.Errorf("read this process's capabilities: %w", err)
	}
	return data[0].Effective&(1<<unix.CAP_SYS_ADMIN) != 0, nil
}

// lacking returns the needed capabilities missing from the effective set eff.
func lacking(eff uint64) []string {
	var missing []string
	for _, c := range capabilitiesNeeded {
		if eff&(1<<c.bit) == 0 {
			missing = append(missing, c.name)
		}
	}
	return missing
}
