// Package progress reports the progress of long byte-oriented work such
// as an initial sync or a resync.
//
// On a terminal the bar redraws one line in place at most five times a
// second:
//
//	initial sync  37% 1.2 GiB/3.2 GiB 410 MiB/s eta 5s
//
// On anything else (a log file, journald, a pipe) it writes a full line
// each time another 10% completes, at least once a minute while it moves
// (10% of a multi-terabyte disk can take half an hour), and a last one
// from Done, so logs stay readable.
package progress

import (
	"fmt"
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// redrawInterval caps terminal redraws at 5 per second.
	redrawInterval = 200 * time.Millisecond
	// stepPercent is how far a non-terminal bar advances between lines.
	stepPercent = 10
	// unknownTotalInterval spaces lines when there is no total to take
	// percentages of and the output is not a terminal.
	unknownTotalInterval = 10 * time.Second
	// heartbeatInterval is the longest a non-terminal bar with a total
	// stays silent while work is done.
	heartbeatInterval = time.Minute
)

// Bar reports progress towards a total number of bytes. Add may be called
// from any number of goroutines; rendering is serialised internally and
// never blocks Add on a slow writer for longer than one line write.
type Bar struct {
	done atomic.Int64
	// nextRender is the clock reading (ns since start) or, on a
	// non-terminal with a known total, the byte count at which Add should
	// next try to render. It keeps the common Add to two atomic ops and,
	// on a non-terminal with a total, a clock read (the heartbeat).
	nextRender atomic.Int64
	// heartbeat: on a non-terminal with a known total, the clock reading
	// (ns since start) at which Add renders even within a 10% step.
	heartbeat atomic.Int64

	w     io.Writer
	label string
	total int64
	tty   bool
	now   func() time.Time
	start time.Time

	mu       sync.Mutex // guards the fields below and writes to w
	finished bool
	lastPct  int64 // last percentage printed on a non-terminal; -1 if none
}

// New starts a bar labelled label for total bytes of work and writes to
// w. total <= 0 means unknown: no percentage or eta is shown.
func New(w io.Writer, label string, total int64) *Bar {
	return newBar(w, label, total, isTerminal(w), time.Now)
}

func newBar(w io.Writer, label string, total int64, tty bool, now func() time.Time) *Bar {
	b := &Bar{w: w, label: label, total: total, tty: tty, now: now, start: now(), lastPct: -1}
	if !tty && total > 0 {
		b.nextRender.Store(b.bytesForStep(1))
		b.heartbeat.Store(heartbeatInterval.Nanoseconds())
	}
	return b
}

// isTerminal reports whether w is a terminal; anything that is not an
// *os.File (or equivalent with an Fd method) is not.
func isTerminal(w io.Writer) bool {
	f, ok := w.(interface{ Fd() uintptr })
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// bytesForStep returns the byte count at which step*10% is reached, or
// MaxInt64 for 100%, which only Done prints.
func (b *Bar) bytesForStep(step int64) int64 {
	if step*stepPercent >= 100 {
		return math.MaxInt64
	}
	return int64(math.Ceil(float64(b.total) * float64(step*stepPercent) / 100))
}

// Add records n more bytes done and redraws if due.
func (b *Bar) Add(n int64) {
	done := b.done.Add(n)
	if !b.tty && b.total > 0 {
		if done < b.nextRender.Load() && b.now().Sub(b.start).Nanoseconds() < b.heartbeat.Load() {
			return
		}
	} else if b.now().Sub(b.start).Nanoseconds() < b.nextRender.Load() {
		return
	}
	// Another goroutine rendering will pick up our progress, or the next
	// Add will: never queue behind a slow writer.
	if !b.mu.TryLock() {
		return
	}
	defer b.mu.Unlock()
	if b.finished {
		return
	}
	b.render(b.done.Load(), false)
}

// Done renders the final state, ending the terminal line, and stops
// further output. It is safe to call more than once.
func (b *Bar) Done() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.finished {
		return
	}
	b.finished = true
	b.render(b.done.Load(), true)
}

// render writes the current state; b.mu is held.
func (b *Bar) render(done int64, final bool) {
	now := b.now()
	elapsed := now.Sub(b.start)
	pct := int64(-1)
	if b.total > 0 {
		if done <= math.MaxInt64/100 {
			pct = min(done*100/b.total, 100)
		} else { // done*100 would overflow
			pct = min(int64(float64(done)/float64(b.total)*100), 100)
		}
	}

	if !b.tty {
		if b.total > 0 {
			step := pct / stepPercent
			b.nextRender.Store(b.bytesForStep(step + 1))
			beat := elapsed.Nanoseconds() >= b.heartbeat.Load()
			// 100% is left to Done, whose line adds the elapsed time.
			if !final && (pct <= b.lastPct && !beat || pct >= 100) {
				return
			}
			b.lastPct = pct
			b.heartbeat.Store((elapsed + heartbeatInterval).Nanoseconds())
		} else {
			b.nextRender.Store((elapsed + unknownTotalInterval).Nanoseconds())
		}
	} else {
		b.nextRender.Store((elapsed + redrawInterval).Nanoseconds())
	}

	line := b.format(done, pct, elapsed, final)
	switch {
	case b.tty && final:
		fmt.Fprintf(b.w, "\r%s\x1b[K\n", line)
	case b.tty:
		fmt.Fprintf(b.w, "\r%s\x1b[K", line)
	default:
		fmt.Fprintf(b.w, "%s\n", line)
	}
}

func (b *Bar) format(done, pct int64, elapsed time.Duration, final bool) string {
	var rate float64
	if s := elapsed.Seconds(); s > 0 {
		// The average since start, not an instantaneous rate: the eta
		// of a sync should not swing with each burst.
		rate = float64(done) / s
	}
	line := b.label
	if pct >= 0 {
		line += fmt.Sprintf(" %3d%% %s/%s", pct, Bytes(done), Bytes(b.total))
	} else {
		line += " " + Bytes(done)
	}
	if rate > 0 {
		line += " " + Bytes(int64(rate)) + "/s"
	}
	switch {
	case final:
		line += " in " + Duration(elapsed)
	case pct >= 0 && rate > 0 && done < b.total:
		line += " eta " + Duration(time.Duration(float64(b.total-done)/rate*float64(time.Second)))
	}
	return line
}

// Bytes formats n with binary (IEC) units: "512 B", "1.2 GiB".
func Bytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n)
	i := -1
	for math.Abs(v) >= unit && i < 5 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[i])
}

// Duration formats d compactly at one-second resolution: "5s", "3m20s",
// "2h05m".
func Duration(d time.Duration) string {
	d = d.Round(time.Second)
	h, m, s := int64(d/time.Hour), int64(d/time.Minute)%60, int64(d/time.Second)%60
	switch {
	case h > 0:
		return fmt.Sprintf("%dh%02dm", h, m)
	case m > 0:
		return fmt.Sprintf("%dm%02ds", m, s)
	default:
		return fmt.Sprintf("%ds", s)
	}
}
