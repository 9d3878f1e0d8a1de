package capture

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
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
}

// Blocks is the number of bitmap blocks covering the device.
func (d Device) Blocks() uint64 { return uint64((d.Size + BlockSize - 1) / BlockSize) }

// Config describes what to load.
type Config struct {
	Devices   []Device
	RingBytes int    // power of two; default 64 MiB
	WakeBytes uint64 // unread bytes that force a reader wake-up; default RingBytes/8
	Logger    *slog.Logger
}

// Capture is the loaded and attached BPF side.
type Capture struct {
	log      *slog.Logger
	objs     captureObjects
	links    []link.Link
	Ring     *ringbuf.Reader
	devices  []Device
	wordBase []uint32 // first bitmap word per device ID
	bitmap   []byte   // mmap of the bitmap map
	devstate []byte   // mmap of the devstate map
}

// Load checks prerequisites, calibrates the direct map, loads the programs
// and attaches them. Capture starts before Load returns.
func Load(cfg Config) (*Capture, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("capture needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		return nil, errors.New("this kernel has no BTF (/sys/kernel/btf/vmlinux): eBPF capture needs CONFIG_DEBUG_INFO_BTF")
	}
	if len(cfg.Devices) == 0 || len(cfg.Devices) > 64 {
		return nil, fmt.Errorf("capture: %d devices (want 1 to 64)", len(cfg.Devices))
	}
	if cfg.RingBytes == 0 {
		cfg.RingBytes = 64 << 20
	}
	if cfg.RingBytes < 1<<16 || cfg.RingBytes&(cfg.RingBytes-1) != 0 {
		return nil, fmt.Errorf("ring size %d: must be a power of two of at least 64 KiB", cfg.RingBytes)
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
	c := &Capture{log: cfg.Logger, devices: cfg.Devices}
	var words uint32
	for _, d := range cfg.Devices {
		c.wordBase = append(c.wordBase, words)
		words += uint32((d.Blocks() + 63) / 64)
	}
	if words == 0 {
		words = 1
	}
	spec.Maps["events"].MaxEntries = uint32(cfg.RingBytes)
	spec.Maps["bitmap"].MaxEntries = words
	if err := spec.Variables["wake_bytes"].Set(cfg.WakeBytes); err != nil {
		return nil, err
	}
	if err := spec.Variables["agent_tgid"].Set(uint32(os.Getpid())); err != nil {
		return nil, err
	}
	if err := spec.LoadAndAssign(&c.objs, nil); err != nil {
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
	return c, nil
}

func (c *Capture) setup() error {
	var err error
	if c.bitmap, err = mmapMap(c.objs.Bitmap); err != nil {
		return fmt.Errorf("mmap bitmap: %w", err)
	}
	if c.devstate, err = mmapMap(c.objs.Devstate); err != nil {
		return fmt.Errorf("mmap devstate: %w", err)
	}
	if err := c.calibrate(); err != nil {
		return err
	}
	for i, d := range c.devices {
		v := captureLbDev{Id: uint32(d.ID), Mode: uint32(d.Mode), Blocks: d.Blocks(), BitmapWord: c.wordBase[i]}
		if err := c.objs.Devices.Put(d.KernelDev, v); err != nil {
			return fmt.Errorf("register device %d: %w", d.ID, err)
		}
	}
	if c.Ring, err = ringbuf.NewReader(c.objs.Events); err != nil {
		return fmt.Errorf("ring reader: %w", err)
	}
	for _, p := range []*ebpf.Program{c.objs.LbBioComplete, c.objs.LbBioQueue} {
		l, err := link.AttachTracing(link.TracingOptions{Program: p})
		if err != nil {
			return fmt.Errorf("attach %s: %w", p, err)
		}
		c.links = append(c.links, l)
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
	size := int(m.MaxEntries() * m.ValueSize())
	size = (size + os.Getpagesize() - 1) &^ (os.Getpagesize() - 1)
	return unix.Mmap(m.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
}

// Close detaches the programs and releases everything.
func (c *Capture) Close() error {
	for _, l := range c.links {
		l.Close()
	}
	c.links = nil
	if c.Ring != nil {
		c.Ring.Close()
	}
	if c.bitmap != nil {
		unix.Munmap(c.bitmap)
		c.bitmap = nil
	}
	if c.devstate != nil {
		unix.Munmap(c.devstate)
		c.devstate = nil
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
		s.Inflight += p.Inflight
	}
	return s, nil
}

// Counters are the kernel-side counts, summed over CPUs.
type Counters struct {
	Records      uint64 `json:"records"`
	Bytes        uint64 `json:"bytes"`
	OverflowBios uint64 `json:"overflow_bios"`
	BitmapMarks  uint64 `json:"bitmap_marks"`
	MarkFailures uint64 `json:"mark_failures"`
	PendingFull  uint64 `json:"pending_full"`
	CopyFailures uint64 `json:"copy_failures"`
	Inflight     int64  `json:"-"`
}
