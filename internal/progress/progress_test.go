package progress

import (
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock advances only when told to.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newClock() *fakeClock { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }

const gib = 1 << 30

func TestNonTerminalPrintsEveryTenPercent(t *testing.T) {
	var out strings.Builder
	clk := newClock()
	b := newBar(&out, "initial sync", 10*gib, false, clk.Now)
	// 100 steps of 1% at one second each: 1% of 10 GiB per second.
	for k := range int64(100) {
		clk.Advance(time.Second)
		b.Add(10*gib*(k+1)/100 - 10*gib*k/100)
	}
	b.Done()
	b.Done()

	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 10 {
		t.Fatalf("got %d lines, want 10 (one per 10%%, Done adding none):\n%s", len(lines), out.String())
	}
	if want := "initial sync  10% 1.0 GiB/10.0 GiB 102.4 MiB/s eta 1m30s"; lines[0] != want {
		t.Errorf("first line = %q\nwant          %q", lines[0], want)
	}
	if want := "initial sync  50% 5.0 GiB/10.0 GiB 102.4 MiB/s eta 50s"; lines[4] != want {
		t.Errorf("fifth line = %q\nwant          %q", lines[4], want)
	}
	if want := "initial sync 100% 10.0 GiB/10.0 GiB 102.4 MiB/s in 1m40s"; lines[9] != want {
		t.Errorf("last line = %q\nwant         %q", lines[9], want)
	}
	if strings.ContainsAny(out.String(), "\r\x1b") {
		t.Error("non-terminal output contains terminal control characters")
	}
}

// A slow job still says it moves, once a minute, between its 10% lines.
func TestNonTerminalHeartbeat(t *testing.T) {
	var out strings.Builder
	clk := newClock()
	b := newBar(&out, "recover", 1000, false, clk.Now)
	for range 5 { // 1% every 30 s
		clk.Advance(30 * time.Second)
		b.Add(10)
	}
	want := "recover   2% 20 B/1000 B 0 B/s eta 49m00s\n" +
		"recover   4% 40 B/1000 B 0 B/s eta 48m00s\n"
	if out.String() != want {
		t.Fatalf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestNonTerminalBigJumpPrintsOnce(t *testing.T) {
	var out strings.Builder
	clk := newClock()
	b := newBar(&out, "resync", 1000, false, clk.Now)
	clk.Advance(time.Second)
	b.Add(370) // crosses 10, 20 and 30%
	b.Add(1)   // still 37%: nothing new
	clk.Advance(time.Second)
	b.Add(29) // exactly 40%
	b.Done()  // aborted at 40%: final line with elapsed time
	want := "resync  37% 370 B/1000 B 370 B/s eta 2s\n" +
		"resync  40% 400 B/1000 B 200 B/s eta 3s\n" +
		"resync  40% 400 B/1000 B 200 B/s in 2s\n"
	if out.String() != want {
		t.Fatalf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestTerminalThrottlesRedraws(t *testing.T) {
	var out strings.Builder
	clk := newClock()
	b := newBar(&out, "initial sync", 3*gib, true, clk.Now)
	// 10 seconds of progress reported every 10 ms: 1000 Adds.
	for k := range int64(1000) {
		clk.Advance(10 * time.Millisecond)
		b.Add(3*gib*(k+1)/1000 - 3*gib*k/1000)
	}
	b.Done()
	s := out.String()
	redraws := strings.Count(s, "\r")
	// 5 per second for 10 s, plus the first Add and Done.
	if redraws < 45 || redraws > 52 {
		t.Fatalf("%d redraws in 10 s, want about 50", redraws)
	}
	if !strings.HasSuffix(s, "\rinitial sync 100% 3.0 GiB/3.0 GiB 307.2 MiB/s in 10s\x1b[K\n") {
		t.Fatalf("final redraw = %q", s[strings.LastIndex(s, "\r"):])
	}
	if strings.Count(s, "\n") != 1 {
		t.Fatal("terminal output must end the line only once, in Done")
	}
}

func TestTerminalLineFormat(t *testing.T) {
	var out strings.Builder
	clk := newClock()
	b := newBar(&out, "initial sync", 32*gib/10, true, clk.Now)
	clk.Advance(3 * time.Second)
	b.Add(12 * gib / 10)
	want := "\rinitial sync  37% 1.2 GiB/3.2 GiB 409.6 MiB/s eta 5s\x1b[K"
	if out.String() != want {
		t.Fatalf("line = %q\nwant   %q", out.String(), want)
	}
}

func TestUnknownTotal(t *testing.T) {
	var out strings.Builder
	clk := newClock()
	b := newBar(&out, "scan", 0, false, clk.Now)
	for range 25 {
		clk.Advance(time.Second)
		b.Add(1 << 20)
	}
	b.Done()
	want := "scan 1.0 MiB 1.0 MiB/s\n" + // first Add
		"scan 11.0 MiB 1.0 MiB/s\n" + // 10 s later
		"scan 21.0 MiB 1.0 MiB/s\n" +
		"scan 25.0 MiB 1.0 MiB/s in 25s\n"
	if out.String() != want {
		t.Fatalf("output:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestConcurrentAdd(t *testing.T) {
	var out lockedWriter
	b := New(&out, "sync", 8*1000*1000)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				b.Add(1000)
			}
		})
	}
	wg.Wait()
	b.Done()
	if got := b.done.Load(); got != 8*1000*1000 {
		t.Fatalf("done = %d, want %d", got, 8*1000*1000)
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) > 10 || !strings.HasPrefix(lines[len(lines)-1], "sync 100% ") {
		t.Fatalf("unexpected output:\n%s", out.String())
	}
}

type lockedWriter struct {
	mu sync.Mutex
	strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.Builder.Write(p)
}

func TestIsTerminal(t *testing.T) {
	if isTerminal(&strings.Builder{}) {
		t.Error("strings.Builder is a terminal")
	}
	f, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if isTerminal(f) {
		t.Error("regular file is a terminal")
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	if isTerminal(null) {
		t.Error("/dev/null (a character device, not a tty) is a terminal")
	}
}

func TestFormatters(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB",
		3 * gib: "3.0 GiB", 1 << 60: "1.0 EiB",
	} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
	for d, want := range map[time.Duration]string{
		0: "0s", 1499 * time.Millisecond: "1s", 200 * time.Second: "3m20s",
		2*time.Hour + 5*time.Minute + 40*time.Second: "2h05m",
	} {
		if got := Duration(d); got != want {
			t.Errorf("Duration(%v) = %q, want %q", d, got, want)
		}
	}
}

func BenchmarkAddNonTerminal(b *testing.B) {
	var out strings.Builder
	bar := New(&out, "bench", 1<<62)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			bar.Add(4096)
		}
	})
}
