package cache

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// A disk that hangs rather than fails (a multipath device queueing with no
// path left, a stalled iSCSI or NFS server) never returns from a write, a
// read or a directory fsync, and no timeout of ours can end that call. So
// every operation on a directory runs where it can be left behind: one
// still running after Options.HangAfter is abandoned, counts as failed, and the
// directory is taken for hung until the last abandoned operation returns.
// Meanwhile operations on it fail at once (ErrHung), so that Put reaches
// its quorum without it (or fails, and the agents keep their data), Get
// reconstructs from the others, and nothing waits on it while holding a
// segment's lock. When it answers again it is reported for a scrub, which
// writes the shards it missed.

// DefaultHangAfter is Options.HangAfter when unset: far longer than a
// healthy disk takes to write and fsync a shard, or to fail.
const DefaultHangAfter = 10 * time.Second

// ErrHung is returned for an operation on a directory that does not
// answer: one of its operations has run for longer than Options.HangAfter
// without returning. It says nothing of the directory's shards.
var ErrHung = errors.New("cache directory does not answer")

// Operation states (dirOp.state).
const (
	opRunning int32 = iota
	opEnded
	opAbandoned
)

// dirOp is one operation on one directory.
type dirOp struct{ state atomic.Int32 }

// abandoned reports whether the operation's caller stopped waiting for it:
// its result is not looked at, so it must not make anything visible that
// the caller took as failed (a shard renamed into place).
func (o *dirOp) abandoned() bool { return o.state.Load() == opAbandoned }

// hungErr is ErrHung for directory i, or nil while it answers.
func (c *Cache) hungErr(i int) error {
	if c.hung[i].Load() == 0 {
		return nil
	}
	return c.hungErrFor(i)
}

// hungErrFor is ErrHung for directory i, whatever its count says now.
func (c *Cache) hungErrFor(i int) error {
	// A fixed text while it lasts: the monitor logs a changed error.
	since := time.Unix(0, c.hungSince[i].Load()).UTC().Format(time.RFC3339)
	return fmt.Errorf("%s: %w (an operation on it has not returned since %s)", c.dirs[i], ErrHung, since)
}

// onDirs runs op on the directories for which want returns true (all of
// them when want is nil), in parallel, and waits until each has returned
// or Options.HangAfter has passed. It returns each directory's error:
// ErrHung for one that was hung already (op not run) or whose op was
// abandoned. held reports whether an abandoned op may still be running:
// whatever the caller gave it (a segment's buffers) must then not be
// reused.
func (c *Cache) onDirs(want func(i int) bool, op func(i int, o *dirOp) error) (errs []error, held bool) {
	n := len(c.dirs)
	errs = make([]error, n)
	ops := make([]dirOp, n)
	results := make([]error, n) // written by each op before it signals done
	done := make(chan int, n)
	pending := make([]bool, n) // started and not yet returned
	running := 0
	for i := range n {
		if want != nil && !want(i) {
			continue
		}
		if err := c.hungErr(i); err != nil {
			errs[i] = err
			continue
		}
		running++
		pending[i] = true
		go func() {
			results[i] = op(i, &ops[i])
			if !ops[i].state.CompareAndSwap(opRunning, opEnded) {
				c.unhang(i)
			}
			done <- i
		}()
	}
	if running == 0 {
		return errs, false
	}
	timer := time.NewTimer(c.hangAfter)
	defer timer.Stop()
	for running > 0 {
		select {
		case i := <-done:
			if pending[i] { // not one abandoned before it signalled
				errs[i], pending[i] = results[i], false
				running--
			}
			continue
		case <-timer.C:
		}
		// Abandon what still runs. An op that ended meanwhile has
		// signalled, or is about to: it is waited for.
		for i := range n {
			if pending[i] && c.abandon(i, &ops[i]) {
				errs[i], pending[i] = c.hungErrFor(i), false
				held = true
				running--
			}
		}
	}
	return errs, held
}

// dirValues is onDirs for an op that returns a value (and reads nothing
// the caller would reuse): the value of each directory whose op returned
// without error, the zero value for the others (an abandoned op's, which
// it may still write, is never looked at).
func dirValues[T any](c *Cache, want func(i int) bool, op func(i int) (T, error)) ([]T, []error) {
	got := make([]T, len(c.dirs))
	errs, _ := c.onDirs(want, func(i int, _ *dirOp) (err error) {
		got[i], err = op(i)
		return err
	})
	vals := make([]T, len(c.dirs))
	for i, err := range errs {
		if err == nil {
			vals[i] = got[i]
		}
	}
	return vals, errs
}

// onDir is onDirs for directory i alone, for an op that reads nothing
// the caller would reuse.
func (c *Cache) onDir(i int, op func(o *dirOp) error) error {
	errs, _ := c.onDirs(func(j int) bool { return j == i }, func(_ int, o *dirOp) error { return op(o) })
	return errs[i]
}

// abandon marks o, an operation on directory i, abandoned unless it ended,
// and then takes the directory for hung until o returns (unhang).
func (c *Cache) abandon(i int, o *dirOp) bool {
	c.hungMu[i].Lock()
	// Under the lock with the count: o's unhang, however soon, comes
	// after it, and other callers never see a count that is undone.
	if !o.state.CompareAndSwap(opRunning, opAbandoned) {
		c.hungMu[i].Unlock()
		return false // it ended: its signal is on its way
	}
	first := c.hung[i].Load() == 0
	if first {
		c.hungSince[i].Store(time.Now().Add(-c.hangAfter).UnixNano())
	}
	c.hung[i].Add(1)
	// What it was doing is unknown: a scrub running now must not mark it
	// rebuilt, and once it answers it is scrubbed for what it missed.
	c.epoch[i].Add(1)
	c.vanished[i].Store(true)
	c.hungMu[i].Unlock()
	if first {
		c.log.Error("cache: directory does not answer: an operation on it has run for longer than the limit; operations on it fail at once until it returns (puts go on without it if their quorum allows, reads rebuild from the other directories)",
			logDir, c.dirs[i], "limit", c.hangAfter)
	}
	return true
}

// unhang ends an abandoned operation on directory i.
func (c *Cache) unhang(i int) {
	c.hungMu[i].Lock()
	last := c.hung[i].Add(-1) == 0
	if last {
		c.epoch[i].Add(1)
		c.vanished[i].Store(true) // the next CheckDirs asks for a scrub
	}
	since := c.hungSince[i].Load()
	c.hungMu[i].Unlock()
	if last {
		c.log.Warn("cache: directory answers again; it is scrubbed for the shards it missed",
			logDir, c.dirs[i], "after", time.Since(time.Unix(0, since)).Round(time.Millisecond))
	}
}
