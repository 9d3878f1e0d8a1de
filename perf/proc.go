package perf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
)

// atClkTck is the auxv key under which the kernel passes USER_HZ, the unit of
// /proc/PID/stat times (what sysconf(_SC_CLK_TCK) returns in C).
const atClkTck = 17

var clockTicks = sync.OnceValue(func() float64 {
	if hz := auxvValue(atClkTck); hz > 0 {
		return float64(hz)
	}
	return 100 // USER_HZ is 100 on every Linux architecture Go supports
})

// auxvValue returns the value of key in this process's auxiliary vector, or
// 0 when it cannot be read.
func auxvValue(key uint64) uint64 {
	data, err := os.ReadFile("/proc/self/auxv")
	if err != nil {
		return 0
	}
	const word = 8 // 64-bit targets only; the capture agent needs them anyway
	for i := 0; i+2*word <= len(data); i += 2 * word {
		k := binary.NativeEndian.Uint64(data[i:])
		v := binary.NativeEndian.Uint64(data[i+word:])
		if k == key {
			return v
		}
		if k == 0 { // AT_NULL
			break
		}
	}
	return 0
}

// procCPUSeconds returns user+system CPU time consumed so far by all threads
// of process pid (not its children).
func procCPUSeconds(pid int) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read process CPU time: %w", err)
	}
	ticks, err := parseStatCPUTicks(data)
	if err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return float64(ticks) / clockTicks(), nil
}

// parseStatCPUTicks returns utime+stime (fields 14 and 15) from the content of
// /proc/PID/stat. The comm field (2) may contain spaces and parentheses, so
// fields are counted from the last ')'.
func parseStatCPUTicks(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("malformed stat: no ')'")
	}
	f := strings.Fields(string(stat[i+1:]))
	// f[0] is field 3 (state), so field n is f[n-3].
	if len(f) < 13 {
		return 0, errors.New("malformed stat: too few fields")
	}
	utime, err := strconv.ParseUint(f[14-3], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("malformed stat utime: %w", err)
	}
	stime, err := strconv.ParseUint(f[15-3], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("malformed stat stime: %w", err)
	}
	return utime + stime, nil
}

// procPeakRSS returns process pid's peak resident set size (VmHWM) in
// bytes, less the mapping of a BPF ring buffer of ringBytes (0: none).
func procPeakRSS(pid int, ringBytes int64) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read process peak RSS: %w", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		v, ok := strings.CutPrefix(line, "VmHWM:")
		if !ok {
			continue
		}
		kb, ok := strings.CutSuffix(strings.TrimSpace(v), " kB")
		if !ok {
			return 0, fmt.Errorf("/proc/%d/status: unexpected VmHWM unit in %q", pid, line)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(kb), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/status: VmHWM: %w", pid, err)
		}
		return n<<10 - bpfRingRSS(pid, ringBytes), nil
	}
	return 0, fmt.Errorf("/proc/%d/status has no VmHWM (kernel thread or zombie?)", pid)
}

// bpfRingRSS is the resident size of the process's mapping of a BPF ring
// buffer of ringBytes: its data area, mapped twice after a page, is
// resident from the start, kernel memory sized by --ring-mib, which the
// goal "RSS besides the ring" leaves out. The other BPF maps the agent
// maps (its bitmaps, the pending table) count.
func bpfRingRSS(pid int, ringBytes int64) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0
	}
	return ringRSS(data, ringBytes)
}

// ringRSS is bpfRingRSS over the text of an smaps file.
func ringRSS(data []byte, ringBytes int64) int64 {
	if ringBytes <= 0 {
		return 0
	}
	var total int64
	inRing := false
	for line := range strings.SplitSeq(string(data), "\n") {
		if len(line) > 0 && line[0] >= '0' && line[0] <= 'f' && strings.Contains(line, "-") && !strings.Contains(line, ":  ") {
			inRing = false
			if f := strings.Fields(line); strings.HasSuffix(line, "anon_inode:bpf-map") && len(f) > 1 {
				// The ring's read-only mapping: the producer page and
				// the data area twice, exactly (the pending table, also
				// mapped, may be as large with a small ring).
				lo, hi, _ := strings.Cut(f[0], "-")
				a, err1 := strconv.ParseUint(lo, 16, 64)
				b, err2 := strconv.ParseUint(hi, 16, 64)
				inRing = err1 == nil && err2 == nil && f[1] == "r--s" && int64(b-a) == int64(os.Getpagesize())+2*ringBytes
			}
			continue
		}
		if v, ok := strings.CutPrefix(line, "Rss:"); ok && inRing {
			kb, _ := strings.CutSuffix(strings.TrimSpace(v), " kB")
			if n, err := strconv.ParseInt(strings.TrimSpace(kb), 10, 64); err == nil {
				total += n << 10
			}
		}
	}
	return total
}

// tailBuffer is an io.Writer that keeps only the last max bytes written, so
// a chatty child cannot grow the harness's memory without bound.
type tailBuffer struct {
	mu    sync.Mutex
	max   int
	buf   []byte
	trunc bool
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(p)
	if len(p) >= t.max {
		p = p[len(p)-t.max:]
		t.buf = t.buf[:0]
		t.trunc = true
	} else if over := len(t.buf) + len(p) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.trunc = true
	}
	t.buf = append(t.buf, p...)
	return n, nil
}

// String returns the retained bytes; a leading "..." marks dropped output.
func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.trunc {
		return "..." + string(t.buf)
	}
	return string(t.buf)
}
