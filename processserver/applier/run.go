package applier

import (
	"context"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/stage"
)

// Backoff of Run after a failed pass.
const (
	minBackoff = time.Second
	maxBackoff = time.Minute
)

// Run applies machine's segments until ctx is done, then returns ctx's
// error. It applies at once, then whenever notify delivers a durable
// sequence (the ingest side's "segments up to here are uploaded"; values
// may be coalesced or skipped, only the highest matters) and every
// PollInterval. After a failed pass (e.g. a tampered segment, which it
// logs at Error level with the blob name) it waits with exponential backoff
// before trying again, not reacting to notify meanwhile. applied, if not
// nil, is called from Run's goroutine each time the applied sequence
// advances. A nil notify only polls.
func (a *Applier) Run(ctx context.Context, machine string, notify <-chan uint64, applied func(seq uint64)) error {
	var (
		durable uint64
		last    uint64
		backoff = minBackoff
		timer   = time.NewTimer(0)
	)
	defer timer.Stop()
	failing := false
	for {
		wake := notify
		if failing {
			wake = nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case s, ok := <-wake:
			if !ok {
				notify = nil
				continue
			}
			durable = max(durable, s)
		case <-timer.C:
		}
		// Take every notification already queued, so one pass covers them.
	drain:
		for notify != nil {
			select {
			case s, ok := <-notify:
				if !ok {
					notify = nil
					break drain
				}
				durable = max(durable, s)
			default:
				break drain
			}
		}
		if a.cfg.Yield != nil {
			a.cfg.Yield(ctx)
		}
		seq, err := a.apply(ctx, machine, durable)
		if seq > last {
			last = seq
			if applied != nil {
				applied(seq)
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			a.log.Error("apply failed", logKeyMachine, machine, logKeySeq, seq, logKeyErr, err, logKeyWait, backoff)
			failing = true
			resetTimer(timer, backoff)
			backoff = min(2*backoff, maxBackoff)
			continue
		}
		failing, backoff = false, minBackoff
		resetTimer(timer, a.cfg.PollInterval)
	}
}

func resetTimer(t *time.Timer, d time.Duration) {
	t.Stop()
	t.Reset(d)
}

// Manager runs one Run loop per machine and connects them to the ingest
// side: call Durable from the ingest's "uploaded up to seq" hook and
// WaitApplied where the replica must have caught up (checksum resync).
type Manager struct {
	a         *Applier
	ctx       context.Context
	onApplied func(machine string, seq uint64)

	mu    sync.Mutex
	loops map[string]*loop
	wg    sync.WaitGroup
}

type loop struct {
	notify  chan uint64
	stop    context.CancelFunc
	stopped bool          // by Stop, until Resume (under Manager.mu)
	done    chan struct{} // closed when the loop's goroutine ends

	mu      sync.Mutex
	applied uint64
	changed chan struct{} // closed and replaced when applied advances
}

// NewManager returns a Manager whose loops run until ctx is done.
// onApplied, if not nil, is called (from the machine's loop goroutine)
// whenever a machine's applied sequence advances, e.g. to export metrics.
func (a *Applier) NewManager(ctx context.Context, onApplied func(machine string, seq uint64)) *Manager {
	return &Manager{a: a, ctx: ctx, onApplied: onApplied, loops: map[string]*loop{}}
}

func (mg *Manager) loop(machine string) *loop {
	mg.mu.Lock()
	defer mg.mu.Unlock()
	if l := mg.loops[machine]; l != nil {
		return l
	}
	return mg.startLocked(machine, nil)
}

// startLocked starts machine's loop once prev, if not nil, has ended (one
// loop of a machine at a time). mg.mu is held.
func (mg *Manager) startLocked(machine string, prev chan struct{}) *loop {
	ctx, stop := context.WithCancel(mg.ctx)
	l := &loop{notify: make(chan uint64, 1), changed: make(chan struct{}), stop: stop, done: make(chan struct{})}
	mg.loops[machine] = l
	mg.wg.Go(func() {
		defer close(l.done)
		if prev != nil {
			select {
			case <-prev:
			case <-ctx.Done():
				return
			}
			mg.a.Forget(machine)
		}
		stage.Do(ctx, stage.Apply, func(ctx context.Context) { mg.run(ctx, machine, l) })
	})
	return l
}

// Stop ends machine's loop (a pass under way is cancelled): the process
// server no longer serves the machine. Durable and WaitApplied start
// nothing for it until Resume.
func (mg *Manager) Stop(machine string) {
	l := mg.loop(machine)
	mg.mu.Lock()
	l.stopped = true
	mg.mu.Unlock()
	l.stop()
}

// Resume starts machine's loop again after Stop (the process server
// serves the machine again), once the stopped one has ended, from the
// account's state (Applier.Forget): another server may have applied the
// machine meanwhile.
func (mg *Manager) Resume(machine string) {
	mg.mu.Lock()
	defer mg.mu.Unlock()
	if l := mg.loops[machine]; l != nil && l.stopped {
		mg.startLocked(machine, l.done)
	}
}

func (mg *Manager) run(ctx context.Context, machine string, l *loop) {
	_ = mg.a.Run(ctx, machine, l.notify, func(seq uint64) {
		l.mu.Lock()
		l.applied = seq
		close(l.changed)
		l.changed = make(chan struct{})
		l.mu.Unlock()
		if mg.onApplied != nil {
			mg.onApplied(machine, seq)
		}
	})
}

// Durable tells the applier that every record of machine up to seq is in
// the journal in the account. It never blocks; it starts the machine's
// loop on first use. Call it with 0 to start a machine's loop (e.g. for
// every machine in the account at startup).
func (mg *Manager) Durable(machine string, seq uint64) {
	l := mg.loop(machine)
	l.mu.Lock()
	defer l.mu.Unlock()
	// Keep only the highest pending value in the one-slot channel.
	select {
	case old := <-l.notify:
		seq = max(seq, old)
	default:
	}
	select {
	case l.notify <- seq:
	default:
	}
}

// Applied returns the sequence up to which machine's replicas are applied
// as far as this Manager has seen (0 before its first pass).
func (mg *Manager) Applied(machine string) uint64 {
	l := mg.loop(machine)
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.applied
}

// WaitApplied blocks until every disk of machine is applied up to seq, or
// ctx is done. It wakes the machine's loop with seq as the durable hint.
func (mg *Manager) WaitApplied(ctx context.Context, machine string, seq uint64) error {
	mg.Durable(machine, seq)
	l := mg.loop(machine)
	for {
		l.mu.Lock()
		done, ch := l.applied >= seq, l.changed
		l.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Wait blocks until every loop has returned (after the Manager's context
// is done).
func (mg *Manager) Wait() { mg.wg.Wait() }
