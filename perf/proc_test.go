package perf

import (
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseStatCPUTicks(t *testing.T) {
	// comm containing ") " must not shift the fields.
	stat := "1234 (evil) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 17 0 0 20 0 4 0 100 1000000 200 18446744073709551615\n"
	got, err := parseStatCPUTicks([]byte(stat))
	if err != nil {
		t.Fatal(err)
	}
	if got != 267 {
		t.Errorf("utime+stime = %d, want 267", got)
	}
	if _, err := parseStatCPUTicks([]byte("1234 (x) S 1 2")); err == nil {
		t.Error("short stat accepted")
	}
}

func TestClockTicks(t *testing.T) {
	if hz := clockTicks(); hz != 100 {
		t.Errorf("AT_CLKTCK = %v, want 100 (USER_HZ on Linux)", hz)
	}
}

// spin burns CPU without system calls (time.Now may be a real syscall
// under some hypervisors, which would turn a timed loop into sleeping).
func spin(n int) uint64 {
	x := uint64(1)
	for i := 0; i < n; i++ {
		x = x*6364136223846793005 + 1442695040888963407
	}
	return x
}

func rusageSeconds(t *testing.T) float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func TestProcSelf(t *testing.T) {
	pid := os.Getpid()
	before, err := procCPUSeconds(pid)
	if err != nil {
		t.Fatal(err)
	}
	ru0 := rusageSeconds(t)
	var sink uint64
	for rusageSeconds(t)-ru0 < 0.3 {
		sink += spin(10_000_000)
	}
	after, err := procCPUSeconds(pid)
	if err != nil {
		t.Fatal(err)
	}
	ruDelta := rusageSeconds(t) - ru0
	if d := after - before; d < 0.2 || d > ruDelta+0.1 {
		t.Errorf("/proc CPU delta = %.3f s, getrusage delta = %.3f s (sink %d)", d, ruDelta, sink)
	}

	hold := make([]byte, 64<<20)
	for i := range hold {
		hold[i] = 1
	}
	rss, err := procPeakRSS(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	if rss < 64<<20 {
		t.Errorf("VmHWM = %d bytes after touching 64 MiB", rss)
	}
	_ = hold[len(hold)-1]
}

func TestTailBuffer(t *testing.T) {
	b := newTailBuffer(8)
	b.Write([]byte("abc"))
	if b.String() != "abc" {
		t.Errorf("got %q", b.String())
	}
	b.Write([]byte("defgh"))
	b.Write([]byte("ij"))
	if got := b.String(); got != "...cdefghij" {
		t.Errorf("got %q, want last 8 bytes with marker", got)
	}
	b.Write([]byte(strings.Repeat("x", 20) + "12345678"))
	if got := b.String(); got != "...12345678" {
		t.Errorf("got %q", got)
	}
}

// Only the ring's mapping (a page, then its data area twice) is left out
// of the agent's RSS; its bitmaps and other maps count.
func TestRingRSS(t *testing.T) {
	smaps := `7f0000000000-7f0008001000 r--s 00000000 00:0f 1234                       anon_inode:bpf-map
Size:             131076 kB
Rss:              131076 kB
7f0008001000-7f0008002000 rw-s 00000000 00:0f 1234                       anon_inode:bpf-map
Size:                  4 kB
Rss:                   4 kB
7f0009000000-7f0009010000 rw-s 00000000 00:0f 1240                       anon_inode:bpf-map
Size:                 64 kB
Rss:                  64 kB
55d0c0000000-55d0c0400000 r-xp 00000000 fd:01 99                         /usr/bin/lifeboat
Size:               4096 kB
Rss:                2048 kB
`
	if got := ringRSS([]byte(smaps), 64<<20); got != 131076<<10 {
		t.Errorf("ring RSS = %d, want the 2 × 64 MiB + page mapping only (%d)", got, 131076<<10)
	}
	if got := ringRSS([]byte(smaps), 0); got != 0 {
		t.Errorf("no ring: %d", got)
	}
}

// With a 1 MiB ring, the pending table's mapping (2.5 MiB, writable) is
// as large as twice the ring: only the ring's own mapping is left out.
func TestRingRSSSmallRingSparesOtherMaps(t *testing.T) {
	smaps := `7f0000000000-7f0000201000 r--s 00001000 00:0f 1234                       anon_inode:bpf-map
Size:               2052 kB
Rss:                2052 kB
7f0000201000-7f0000202000 rw-s 00000000 00:0f 1234                       anon_inode:bpf-map
Size:                  4 kB
Rss:                   4 kB
7f0001000000-7f0001280000 rw-s 00000000 00:0f 1240                       anon_inode:bpf-map
Size:               2560 kB
Rss:                2560 kB
`
	if got, want := ringRSS([]byte(smaps), 1<<20), int64(2052<<10); got != want {
		t.Errorf("ring RSS with a 1 MiB ring = %d KiB, want only the ring's %d KiB", got>>10, want>>10)
	}
}
