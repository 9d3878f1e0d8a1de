package capture

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// eventRing is the consumer side of the BPF ring buffer, read in place:
// a record stays in the ring, where the agent applies it, until the
// consumer releases it. ringbuf.Reader copies every record out (4 KiB per
// write in data mode), under a mutex. The kernel's layout: a consumer
// position page (ours to write), a producer position page, then the data
// pages mapped twice in a row, so that a record that wraps around is
// still contiguous.
type eventRing struct {
	cons, prod []byte // mappings
	consPos    *uint64
	prodPos    *uint64
	data       []byte // twice the ring's size
	mask       uint64
	pos        uint64 // the reader's position, ahead of consPos

	epfd, evfd int
	// ep is epfd in the Go runtime's poller: wait parks the goroutine
	// instead of blocking a thread in epoll_wait, which kept the
	// runtime's sysmon waking every 20 µs (thousands of context switches
	// a second on the writers' CPUs).
	ep *os.File
	rc syscall.RawConn
}

// How long next waits for a record still being written: busySpins
// yields, then sleeps of busySleep.
const (
	busySpins = 100
	busySleep = 20 * time.Microsecond
)

// Ring record header bits (BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT).
const (
	ringBusy    = 1 << 31
	ringDiscard = 1 << 30
	ringHdrSize = 8
)

func newEventRing(m *ebpf.Map) (*eventRing, error) {
	size := int(m.MaxEntries())
	if size == 0 || size&(size-1) != 0 {
		return nil, fmt.Errorf("ring size %d is not a power of two", size)
	}
	page := os.Getpagesize()
	r := &eventRing{epfd: -1, evfd: -1, mask: uint64(size - 1)}
	var err error
	if r.cons, err = unix.Mmap(m.FD(), 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("mmap ring consumer page: %w", err)
	}
	if r.prod, err = unix.Mmap(m.FD(), int64(page), page+2*size, unix.PROT_READ, unix.MAP_SHARED); err != nil {
		r.close()
		return nil, fmt.Errorf("mmap ring data: %w", err)
	}
	r.consPos = (*uint64)(unsafe.Pointer(&r.cons[0]))
	r.prodPos = (*uint64)(unsafe.Pointer(&r.prod[0]))
	r.data = r.prod[page:]
	r.pos = atomic.LoadUint64(r.consPos)
	if r.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		r.close()
		return nil, fmt.Errorf("epoll: %w", err)
	}
	// Non-blocking before NewFile: then the runtime poller takes it.
	if err := unix.SetNonblock(r.epfd, true); err != nil {
		r.close()
		return nil, fmt.Errorf("epoll: %w", err)
	}
	r.ep = os.NewFile(uintptr(r.epfd), "capture ring epoll")
	if r.rc, err = r.ep.SyscallConn(); err != nil {
		r.close()
		return nil, fmt.Errorf("epoll: %w", err)
	}
	if r.evfd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		r.close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	// Edge-triggered on the ring: it polls readable while the consumer
	// position lags, which here it does until the agent has applied the
	// records read; the reader wants the kernel's wake-ups only.
	for _, e := range []unix.EpollEvent{{Events: unix.EPOLLIN | epollET, Fd: int32(m.FD())}, {Events: unix.EPOLLIN, Fd: int32(r.evfd)}} {
		if err := unix.EpollCtl(r.epfd, unix.EPOLL_CTL_ADD, int(e.Fd), &e); err != nil {
			r.close()
			return nil, fmt.Errorf("epoll add: %w", err)
		}
	}
	return r, nil
}

// next returns the record at the reader's position and the ring position
// after it, and moves past it; ok is false when no committed record is
// there. A discarded record is returned with raw nil, so that its space is
// released in order with the others. A record still being written (busy)
// is waited for: later records may be committed already, and they cannot
// be read before it.
func (r *eventRing) next() (raw []byte, end uint64, ok bool) {
	for spins := 0; ; spins++ {
		if atomic.LoadUint64(r.prodPos) == r.pos {
			return nil, 0, false
		}
		start := r.pos & r.mask
		// The acquire load pairs with the kernel's xchg of the header at
		// commit: the record's data is visible once the busy bit is off.
		hdr := atomic.LoadUint32((*uint32)(unsafe.Pointer(&r.data[start])))
		if hdr&ringBusy != 0 {
			// A copy of up to 4 MiB takes a while, and its writer may be
			// preempted on this very CPU: spin a little, then sleep.
			if spins < busySpins {
				runtime.Gosched()
			} else {
				time.Sleep(busySleep)
			}
			continue
		}
		n := uint64(hdr &^ (ringBusy | ringDiscard))
		r.pos += ringHdrSize + (n+7)&^7
		if hdr&ringDiscard != 0 {
			return nil, r.pos, true
		}
		s := start + ringHdrSize
		return r.data[s : s+n : s+n], r.pos, true
	}
}

// produced returns the producer position: every record reserved so far
// lies before it.
func (r *eventRing) produced() uint64 { return atomic.LoadUint64(r.prodPos) }

// release hands the ring space up to end (a position next returned) back
// to the kernel; the records before it must not be used any more.
func (r *eventRing) release(end uint64) { atomic.StoreUint64(r.consPos, end) }

// epollET is EPOLLET as the uint32 of EpollEvent.Events (unix.EPOLLET is
// a negative int).
const epollET = 1 << 31

var errRingFlushed = errors.New("ring flushed")

// wait blocks until the kernel signals new records, flush is called, or
// d passes (nil for the signal and the timeout, errRingFlushed).
func (r *eventRing) wait(d time.Duration) error {
	var ev [2]unix.EpollEvent
	var n int
	var werr error
	if err := r.ep.SetReadDeadline(time.Now().Add(d)); err != nil {
		return fmt.Errorf("wait for the capture ring: %w", err)
	}
	err := r.rc.Read(func(fd uintptr) bool {
		n, werr = unix.EpollWait(int(fd), ev[:], 0)
		return n > 0 || (werr != nil && werr != unix.EINTR)
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil
	case err != nil:
		return fmt.Errorf("wait for the capture ring: %w", err)
	case werr != nil:
		return fmt.Errorf("wait for the capture ring: %w", werr)
	}
	for _, e := range ev[:n] {
		if int(e.Fd) == r.evfd {
			var b [8]byte
			unix.Read(r.evfd, b[:])
			return errRingFlushed
		}
	}
	return nil
}

// flush wakes a wait (safe from any goroutine).
func (r *eventRing) flush() {
	one := [8]byte{1}
	unix.Write(r.evfd, one[:])
}

func (r *eventRing) close() {
	if r.ep != nil {
		r.ep.Close() // closes epfd
		r.ep, r.epfd = nil, -1
	}
	for _, fd := range []int{r.epfd, r.evfd} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	r.epfd, r.evfd = -1, -1
	for _, m := range [][]byte{r.prod, r.cons} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	r.prod, r.cons, r.data = nil, nil, nil
}
