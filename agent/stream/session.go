package stream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// permanentError is a connection failure that retrying cannot fix: a
// refused certificate, a version mismatch, an unknown machine.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// session is one connection.
type session struct {
	conn   net.Conn  // a *channel.Conn, or a *tls.Conn to a process server without records
	cork   *corkConn // under conn
	w      *wire.Writer
	r      *wire.Reader
	window uint64 // set by a Backpressure before the HelloAck; 0 = none
	hasWin bool
}

// close closes the connection under TLS first: a sender blocked flushing
// a frame fails at once, and tls.Conn.Close, which would queue its
// close_notify behind that flush, finds the connection closed.
func (s *session) close() {
	if s.cork != nil {
		s.cork.Close()
	}
	s.conn.Close()
}

// connect dials, handshakes and exchanges Hello/HelloAck. A process
// server of an older protocol refuses the hello: the agent then says
// hello again in the protocol before (agents upgraded before their
// process servers), down to protocol 2. In protocol 3 the consistency
// points taken before a resync it asks for are not withdrawn; in
// protocol 2 the RPO counts from acknowledged markers.
func (t *Target) connect(ctx context.Context) (*session, *wire.HelloAck, error) {
	for {
		s, ack, err := t.connectOnce(ctx)
		var we wire.Error
		v := t.version()
		if err == nil || !errors.As(err, &we) || we.Code != wire.CodeVersion || v <= 2 {
			return s, ack, err
		}
		t.log.Warn("the process server speaks an older stream protocol: saying hello in the one before", keyAddr, t.cfg.Addr, "protocol", v-1)
		t.helloVersion.Store(uint32(v - 1))
	}
}

// version returns the protocol hellos are said in.
func (t *Target) version() uint16 {
	if v := t.helloVersion.Load(); v != 0 {
		return uint16(v)
	}
	return ProtocolVersion
}

func (t *Target) connectOnce(ctx context.Context) (*session, *wire.HelloAck, error) {
	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	dial := t.cfg.DialContext
	if dial == nil {
		d := net.Dialer{KeepAlive: 15 * time.Second}
		dial = d.DialContext
	}
	raw, err := dial(dctx, "tcp", t.cfg.Addr)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to process server %s: %w", t.cfg.Addr, err)
	}
	cork := &corkConn{Conn: raw}
	conn, err := channel.Client(dctx, cork, t.cfg.TLS)
	if err != nil {
		raw.Close()
		err = fmt.Errorf("TLS handshake with process server %s: %w", t.cfg.Addr, err)
		if !transient(err) {
			err = &permanentError{err}
		}
		return nil, nil, err
	}
	s := &session{conn: conn, cork: cork, r: wire.NewReader(conn, 0)}
	// Close (ctx) ends a hello stuck on a process server that stopped
	// answering at once, not after helloTimeout.
	stop := context.AfterFunc(ctx, s.close)
	defer stop()
	if tc, ok := conn.(*tls.Conn); ok {
		// Plain TLS: a record per 16 KiB, each its own write unless corked.
		cork.start()
		s.w = wire.NewBufferedWriter(tc, cork.Flush)
	} else {
		s.w = wire.NewWriter(conn) // a frame's records go out in one write
	}
	ack, err := t.hello(s)
	if err != nil {
		conn.Close()
		var oe *net.OpError
		if errors.As(err, &oe) && oe.Op == "remote error" {
			err = fmt.Errorf("process server %s refused this agent's certificate (is it an agent certificate from the process server's CA?): %w", t.cfg.Addr, err)
		}
		if !transient(err) {
			err = &permanentError{err}
		}
		return nil, nil, err
	}
	return s, ack, nil
}

// transient tells failures worth retrying (the network, a restarting
// server) from refusals.
func transient(err error) bool {
	var we wire.Error
	if errors.As(err, &we) {
		return we.Code == wire.CodeInternal || we.Code == wire.CodeShuttingDown
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		// With TLS 1.3 the server checks our certificate after our
		// handshake has completed; its refusal arrives as an alert on
		// the first read.
		return oe.Op != "remote error"
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, wire.ErrTruncated) ||
		errors.Is(err, channel.ErrAuth) || // damaged in transit, as a TLS "bad record MAC" was
		errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}

func (t *Target) hello(s *session) (*wire.HelloAck, error) {
	version := t.version()
	h := wire.Hello{ProtocolVersion: version, Machine: t.cfg.Machine, Run: t.runID}
	t.mu.Lock()
	for i, d := range t.cfg.Disks {
		ds := wire.DiskState{Name: d.Name, Size: d.Size, Generation: t.gens[i]}
		if !ds.Generation.IsZero() {
			ds.LastAckedSeq = t.ackedSeq
		}
		h.Disks = append(h.Disks, ds)
	}
	t.mu.Unlock()
	s.conn.SetDeadline(time.Now().Add(helloTimeout))
	defer s.conn.SetDeadline(time.Time{})
	if err := s.w.WriteHello(&h); err != nil {
		return nil, fmt.Errorf("send hello to process server %s: %w", t.cfg.Addr, err)
	}
	for {
		f, err := s.r.Next()
		if err != nil {
			return nil, fmt.Errorf("process server %s did not answer the hello: %w", t.cfg.Addr, err)
		}
		switch f.Type {
		case wire.TypeHelloAck:
			var a wire.HelloAck
			if err := a.UnmarshalBinary(f.Payload); err != nil {
				return nil, err
			}
			if a.ProtocolVersion != version {
				return nil, fmt.Errorf("process server %s answered a protocol %d hello in protocol %d", t.cfg.Addr, version, a.ProtocolVersion)
			}
			return &a, nil
		case wire.TypeBackpressure:
			var b wire.Backpressure
			if err := b.UnmarshalBinary(f.Payload); err != nil {
				return nil, err
			}
			s.window, s.hasWin = b.Window, true
		case wire.TypeError:
			var e wire.Error
			if err := e.UnmarshalBinary(f.Payload); err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("process server %s refused the hello: %w", t.cfg.Addr, e)
		default:
			return nil, fmt.Errorf("process server %s sent a %s frame before its hello-ack", t.cfg.Addr, f.Type)
		}
	}
}

// agree applies a HelloAck: generations, the resume point, what is still
// to send. On a reconnect (initial false) it asks for resyncs through
// OnResync; at Dial the caller gets the agreements instead.
func (t *Target) agree(s *session, a *wire.HelloAck, initial bool) ([]wire.DiskAgreement, error) {
	out := make([]wire.DiskAgreement, len(t.cfg.Disks))
	for i, d := range t.cfg.Disks {
		found := false
		for _, da := range a.Disks {
			if da.Name == d.Name {
				out[i], found = da, true
				break
			}
		}
		if !found {
			return nil, &permanentError{fmt.Errorf("process server %s did not answer for disk %s", t.cfg.Addr, d.Name)}
		}
	}

	// What is agreed is saved under mu below: not while an app point
	// holds the file systems frozen.
	if err := t.lockThawed(); err != nil {
		return nil, err
	}
	// Sequences are per machine: every disk's ResumeFrom is the machine's
	// durable sequence + 1.
	var resume, durable uint64
	for _, da := range out {
		resume = max(resume, da.ResumeFrom)
	}
	if resume > 0 {
		durable = resume - 1
		// A process server cannot hold a sequence this agent never sent
		// (on a reconnect), or never numbered (at Dial: nextSeq then is
		// above every number this machine's state handed out; with no
		// state, every disk gets a full sync anyway), nor newest records
		// another run made durable beyond what we heard acknowledged
		// (ours are acknowledged, or resent). If it does, another agent
		// streams under the same name (a clone, a test boot of the
		// replica with its agent on) or the state directory is an old
		// copy: its records hold numbers of ours, which the process
		// server would drop as duplicates.
		foreignRun := !initial && a.LastRun != (wire.RunID{}) && a.LastRun != t.runID && durable > max(t.ackedSeq, t.foreignSeen)
		foreign := (!initial && durable > t.maxSent) || foreignRun || (initial && t.ownState && durable >= t.nextSeq)
		switch {
		case foreign:
			t.log.Error("the process server holds sequences this agent never sent: another agent streams as this machine, or the state directory is an old copy; resyncing by checksum",
				"sent", t.maxSent, "next", t.nextSeq, "durable", durable)
			// Records of ours up to durable would be dropped there as
			// duplicates, never acknowledged: held, they would fill the
			// buffer for good and block the writer before the resync.
			// The resync brings back what they changed.
			t.freeThroughLocked(durable)
			t.cond.Broadcast()
		case durable < t.ackedSeq:
			// It lost records it had acknowledged, and we freed them.
			t.log.Warn("process server lost acknowledged records: resyncing by checksum",
				"acked", t.ackedSeq, "durable", durable)
		default:
			// Records it made durable without our hearing the ack.
			t.ackLocked(durable)
		}
		if foreign || durable < t.ackedSeq {
			// Never take the acks for ours; renumber, and let a compare
			// bring back what differs. Time markers sent before cover
			// records it lost or never had from us: acked with the
			// records resent, they would date a replica with a gap.
			t.markers = t.markers[:0]
			for i := range out {
				if out[i].Action == wire.SyncResume {
					out[i].Action = wire.SyncChecksum
				}
			}
		}
		for i := range out {
			if out[i].Action != wire.SyncResume {
				// A disk to be copied again: markers sent before do not
				// date a whole replica (this agent's own recoverable
				// until and RPO would run ahead while it is copied).
				t.markers = t.markers[:0]
				break
			}
		}
		if resume > t.nextSeq {
			// It holds numbers we have no record of (state from an older
			// copy of the state directory): never reuse them. (Safe to
			// keep if the save below fails: add extends the lease first.)
			t.log.Warn("process server has sequence numbers beyond ours: skipping ahead", "ours", t.nextSeq, "resume_from", resume)
			t.nextSeq = resume
		}
	}
	// The new generations and lease count only once saved: with the new
	// generations in memory and no resync asked for, the retry's hello
	// would claim the new replica and get a resume, and the sync the
	// process server asked for would never be done. The lock is held
	// across the save (as extendLeaseLocked does) so that no other
	// snapshot sees the uncommitted state.
	oldGens, oldLease := append([]wire.Generation(nil), t.gens...), t.lease
	if t.nextSeq > t.lease {
		t.lease = t.nextSeq + seqLease
	}
	for i, da := range out {
		t.gens[i] = da.Generation
	}
	if err := t.persist(t.snapshotLocked()); err != nil {
		changed := !slices.Equal(oldGens, t.gens)
		copy(t.gens, oldGens)
		t.lease = oldLease
		t.mu.Unlock()
		if changed && errors.Is(err, errNotDurable) {
			// The file holds the new generations all the same.
			err = fmt.Errorf("%w: %w", ErrStateUnsettled, err)
		}
		return nil, err
	}
	// A disk to be copied again: the consistency markers numbered before
	// and not durable yet would date it half rebuilt, as points (cut on
	// every disk's replica) and as times (recoverable_until): withdrawn
	// in the batches resent (protocol 4); and none is taken until the
	// engine has the resync (ResyncsTaken).
	var epoch uint64
	if !initial && slices.ContainsFunc(out, func(da wire.DiskAgreement) bool { return da.Action != wire.SyncResume }) {
		t.resyncAsked++
		epoch = t.resyncAsked
		t.pointsHeld = t.cfg.OnResync != nil // (else nobody takes it)
		n := 0
		if a.ProtocolVersion >= 4 {
			for _, seg := range t.segs {
				n += seg.bb.WithdrawMarkers(resume)
			}
			if t.open != nil {
				n += t.open.bb.WithdrawMarkers(resume)
			}
		}
		if n > 0 {
			t.log.Warn("withdrew consistency points taken before the process server asked for a resync: they would date a replica being copied again", keyCount, n)
		}
	}
	// Handled (or ours): the next reconnect judges only what comes after.
	t.maxSent = max(t.maxSent, durable)
	t.foreignSeen = max(t.foreignSeen, durable)
	// Everything held goes out again on this connection.
	for _, seg := range t.segs[:t.sent] {
		if seg.last >= resume {
			t.resent.Add(1)
		}
	}
	t.sent, t.inflight = 0, 0
	t.sentSeq = t.ackedSeq
	t.markedSeq = min(t.markedSeq, t.sentSeq) // the resend is traffic too
	t.window = t.cfg.Window
	if s.hasWin {
		t.window = s.window
	}
	if t.window == 0 {
		t.log.Warn("process server paused this agent from the start (its cache nearly full, or this machine's backlog over its limit: uploads to the storage account not keeping up); captured writes wait here and RPO grows", keyAddr, t.cfg.Addr)
	}
	if t.sums != nil {
		t.sums.sent = false
	}
	t.connected = true
	t.mu.Unlock()

	for i, da := range out {
		if da.Action == wire.SyncResume {
			continue
		}
		t.log.Warn("process server asks for a resync", keyDisk, t.cfg.Disks[i].Name, "action", da.Action.String(), "generation", da.Generation.String())
		if !initial {
			t.resyncs.Add(1)
			if t.cfg.OnResync != nil {
				t.cfg.OnResync(i, da.Action)
			}
		}
	}
	if epoch != 0 {
		t.mu.Lock() // (epochs only grow: agreements run one at a time, under mu)
		t.resyncDelivered.Store(max(t.resyncDelivered.Load(), epoch))
		t.mu.Unlock()
	}
	return out, nil
}

// run owns the connection: it sends, and reconnects when it breaks.
func (t *Target) run(s *session) {
	defer t.wg.Done()
	backoff := minBackoff
	for {
		began := time.Now()
		err := t.serve(s)
		s.close()
		t.mu.Lock()
		t.connected = false
		t.mu.Unlock()
		if t.ctx.Err() != nil {
			return
		}
		if time.Since(began) >= stableSession {
			backoff = minBackoff
		}
		t.log.Warn("connection to the process server lost; reconnecting", keyAddr, t.cfg.Addr, keyErr, err)
		for s = nil; s == nil; {
			select {
			case <-t.ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, maxBackoff)
			ns, ack, err := t.connect(t.ctx)
			if err == nil {
				if _, err = t.agree(ns, ack, false); err != nil {
					ns.close()
				} else {
					s = ns
				}
			}
			if err != nil {
				if t.ctx.Err() != nil {
					return
				}
				t.log.Warn("reconnect to the process server failed", keyAddr, t.cfg.Addr, keyRetry, backoff, keyErr, err)
			}
		}
		t.reconnects.Add(1)
		t.log.Info("reconnected to the process server", keyAddr, t.cfg.Addr)
	}
}

// serve runs one connection until it fails or the Target closes.
func (t *Target) serve(s *session) error {
	// Close ends a write stuck on a process server that stopped reading
	// at once, not after writeTimeout.
	stop := context.AfterFunc(t.ctx, s.close)
	defer stop()
	rdErr := make(chan error, 1)
	go func() {
		err := t.readLoop(s)
		s.close() // unblocks a sender stuck in a write
		rdErr <- err
	}()
	if stopCheck := t.checkPeer(s); stopCheck != nil {
		defer stopCheck()
	}
	defer func() {
		s.close()
		<-rdErr
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var lastMarker time.Time // the first marker goes at once
	for {
		now := time.Now()
		nextMarker := t.nextMarker(lastMarker)
		// markerDue first: it clears the release flag, which a marker
		// sent on schedule must clear too, or a second follows at once.
		if due := t.markerDue(); due || !now.Before(nextMarker) {
			if err := t.sendMarker(s, now); err != nil {
				return err
			}
			lastMarker = now
			nextMarker = t.nextMarker(lastMarker)
		}
		seg, sums, wait := t.nextWork(now)
		var err error
		switch {
		case seg != nil:
			n := seg.payload // seg may be recycled once busy is cleared
			s.conn.SetWriteDeadline(now.Add(writeTimeout))
			err = s.w.WriteBatch(&seg.bb)
			t.mu.Lock()
			t.busy = nil
			if seg.freed {
				t.recycleLocked(seg)
			}
			t.mu.Unlock()
			if err == nil {
				t.sentBytes.Add(uint64(n))
			}
		case sums != nil:
			s.conn.SetWriteDeadline(now.Add(writeTimeout))
			for _, m := range sums {
				if err = s.w.WriteSums(m); err != nil {
					break
				}
			}
		}
		if err != nil {
			return err
		}
		if seg != nil || sums != nil {
			continue
		}
		timer.Reset(min(wait, time.Until(nextMarker)))
		select {
		case <-t.kick:
		case <-timer.C:
		case err := <-rdErr:
			rdErr <- err // for the deferred wait
			return err
		case <-t.ctx.Done():
			return t.ctx.Err()
		}
	}
}

// nextWork picks what to send: the next batch if the window allows, else
// pending checksum questions once every batch before them is out. wait is
// how long until a partial batch is due.
func (t *Target) nextWork(now time.Time) (seg *segment, sums []*wire.Sums, wait time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	wait = time.Hour
	// A partial batch goes out after FlushInterval, but only when it could
	// be sent at once: while the window is closed it keeps filling.
	if o := t.open; o != nil && o.bb.Count() > 0 && t.sent == len(t.segs) && t.canSendLocked(o.bb.Len()) {
		if age := now.Sub(o.t0); age >= t.cfg.FlushInterval {
			t.sealLocked()
		} else {
			wait = t.cfg.FlushInterval - age
		}
	}
	if t.sent < len(t.segs) {
		s := t.segs[t.sent]
		if !t.canSendLocked(s.payload) {
			return nil, nil, wait
		}
		t.sent++
		t.inflight += uint64(s.payload)
		t.sentSeq = s.last
		t.maxSent = max(t.maxSent, s.last)
		t.busy = s
		return s, nil, wait
	}
	if t.sums != nil && !t.sums.sent && (t.open == nil || t.open.bb.Count() == 0) {
		t.sums.sent = true
		return nil, t.sums.msgs, wait
	}
	return nil, nil, wait
}

func (t *Target) canSendLocked(n int) bool {
	return t.window > 0 && (t.inflight == 0 || t.inflight+uint64(n) <= t.window)
}

// sendMarker sends a time marker for everything sent so far (sentSeq).
// Without Coverage its time is now when everything numbered has been sent;
// otherwise it is when the oldest unsent record was numbered. With
// Coverage it is the newest Covered time whose records have all been
// sent: a record's hand-over time says nothing of when its write
// completed (the ring, a bitmap or a read-back delays it), so only the
// sequence number a Covered call came with ties a time to the stream.
func (t *Target) sendMarker(s *session, now time.Time) error {
	t.mu.Lock()
	if t.holdMarkers || t.sentSeq < t.releaseSeq || t.insideDrainLocked(t.sentSeq) {
		t.mu.Unlock()
		return nil
	}
	at := now
	if t.cfg.Coverage {
		k := -1
		for i, c := range t.covers {
			if c.seq > t.sentSeq {
				break
			}
			k = i
		}
		if k < 0 {
			t.mu.Unlock()
			return nil
		}
		at = t.covers[k].at
		// Older points are superseded; this one stays for a later
		// marker (after a reconnect sentSeq can step back).
		t.covers = t.covers[k:]
	} else {
		switch {
		case t.sent < len(t.segs):
			at = t.segs[t.sent].t0
		case t.open != nil && t.open.bb.Count() > 0:
			at = t.open.t0
		}
	}
	m := wire.Marker{Seq: t.sentSeq, UnixNano: at.UnixNano(), Kind: wire.MarkerTime}
	t.markedSeq = t.sentSeq
	if m.Seq <= t.ackedSeq {
		t.ackedMarker = at
	} else if n := len(t.markers); n > 0 && t.markers[n-1].seq == m.Seq {
		// Acknowledged together, only the later one counts: while acks
		// are withheld the list would grow by one every interval.
		t.markers[n-1].at = at
	} else {
		t.markers = append(t.markers, sentMarker{seq: m.Seq, at: at})
	}
	t.mu.Unlock()
	s.conn.SetWriteDeadline(now.Add(writeTimeout))
	return s.w.WriteMarker(m)
}

// nextMarker returns when the time marker after one sent at last is due:
// BusyMarkerInterval later if records were sent since, else
// MarkerInterval later.
func (t *Target) nextMarker(last time.Time) time.Time {
	t.mu.Lock()
	busy := t.sentSeq > t.markedSeq
	t.mu.Unlock()
	if busy {
		return last.Add(t.cfg.BusyMarkerInterval)
	}
	return last.Add(t.cfg.MarkerInterval)
}

// markerDue reports (once) that time markers were just released, or that
// the records sent end where a drain starts or ends, not marked yet.
func (t *Target) markerDue() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	due := t.markerNow || t.markedSeq < t.sentSeq && t.atDrainEdgeLocked(t.sentSeq)
	t.markerNow = false
	return due
}

// readLoop handles what the process server sends.
func (t *Target) readLoop(s *session) error {
	for {
		f, err := s.r.Next()
		if err != nil {
			return fmt.Errorf("read from process server: %w", err)
		}
		switch f.Type {
		case wire.TypeAck:
			var a wire.Ack
			if err := a.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			t.mu.Lock()
			if a.Seq > t.maxSent {
				// Freeing records it never received would lose them.
				t.mu.Unlock()
				return fmt.Errorf("process server acknowledged sequence %d, but the last one sent is %d (numbered: %d)", a.Seq, t.maxSent, t.nextSeq-1)
			}
			t.ackLocked(a.Seq)
			t.mu.Unlock()
		case wire.TypeRecoverable:
			var r wire.Recoverable
			if err := r.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			t.mu.Lock()
			t.recoverable, t.ruHeard = time.Time{}, true
			if r.UnixNano > 0 {
				t.recoverable = time.Unix(0, r.UnixNano).UTC()
				t.unrecSince = time.Time{}
			} else if t.unrecSince.IsZero() {
				t.unrecSince = t.start
				if t.unrecSince.IsZero() { // the hello of Dial itself
					t.unrecSince = time.Now()
				}
			}
			t.mu.Unlock()
		case wire.TypeBackpressure:
			var b wire.Backpressure
			if err := b.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			t.mu.Lock()
			switch {
			case b.Window == 0 && t.window != 0:
				t.log.Warn("process server paused this agent (its cache nearly full, or this machine's backlog over its limit: uploads to the storage account not keeping up); captured writes wait here and RPO grows", keyAddr, t.cfg.Addr)
			case b.Window != 0 && t.window == 0:
				t.log.Info("process server resumed this agent", keyAddr, t.cfg.Addr, "bytes", b.Window)
			case b.Window != t.window:
				t.log.Debug("process server window", "bytes", b.Window)
			}
			t.window = b.Window
			t.mu.Unlock()
			t.wake()
		case wire.TypeSumsReply:
			var r wire.SumsReply
			if err := r.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			t.deliverSums(r)
		case wire.TypeError:
			var e wire.Error
			if err := e.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			return e
		default:
			return fmt.Errorf("process server sent an unexpected %s frame", f.Type)
		}
	}
}

// ackLocked frees every record ≤ seq.
func (t *Target) ackLocked(seq uint64) {
	if seq <= t.ackedSeq {
		return
	}
	t.ackedSeq = seq
	t.freeThroughLocked(seq)
	t.sentSeq = max(t.sentSeq, seq)
	n := 0
	for _, m := range t.markers {
		if m.seq <= seq {
			t.ackedMarker = m.at
			n++
		}
	}
	t.markers = t.markers[n:]
	t.cond.Broadcast()
	t.wake()
}

// freeThroughLocked frees the buffered segments whose records are all at
// or below seq.
func (t *Target) freeThroughLocked(seq uint64) {
	for len(t.segs) > 0 && t.segs[0].last <= seq {
		s := t.segs[0]
		t.segs[0] = nil
		t.segs = t.segs[1:]
		if t.sent > 0 {
			t.sent--
			t.inflight -= uint64(s.payload)
		}
		t.pending -= uint64(s.payload)
		if s == t.busy {
			s.freed = true // the sender recycles it when its write returns
		} else {
			t.recycleLocked(s)
		}
	}
}

// corkConn, once started, holds back what TLS writes until Flush, up to
// corkSize: a batch of 1 MiB is some 64 TLS records, each of which was a
// write system call of its own, and over loopback each also ran the
// receiving side's TCP processing. Records written outside a frame (a
// KeyUpdate reply) leave with the next frame. A failed write is sticky.
// Close closes the connection without flushing: it is what unblocks a
// flush stuck on a peer that stopped reading (session.close calls it
// before tls.Conn.Close, whose close_notify is therefore not sent).
type corkConn struct {
	net.Conn
	mu  sync.Mutex
	buf []byte // nil until start
	err error
}

const corkSize = 256 << 10

func (c *corkConn) start() {
	c.mu.Lock()
	c.buf = make([]byte, 0, corkSize)
	c.mu.Unlock()
}

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.buf == nil {
		return c.Conn.Write(p)
	}
	if len(c.buf)+len(p) > cap(c.buf) {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > cap(c.buf) {
			n, err := c.Conn.Write(p)
			c.err = err
			return n, err
		}
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

// Flush writes what is held back.
func (c *corkConn) Flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked()
}

func (c *corkConn) flushLocked() error {
	if c.err != nil || len(c.buf) == 0 {
		return c.err
	}
	_, c.err = c.Conn.Write(c.buf)
	c.buf = c.buf[:0]
	return c.err
}

// deliverSums queues a checksum answer for waitSums. It keeps the newest
// answers: when the queue is full of answers to abandoned questions, the
// oldest goes rather than this one, which the engine may be waiting for.
func (t *Target) deliverSums(r wire.SumsReply) {
	for {
		select {
		case t.sumsCh <- r:
			return
		default:
			select {
			case <-t.sumsCh:
			default:
			}
		}
	}
}

// checkPeer asks Config.CheckPeer about the session's process server
// every peerCheckEvery, and closes the session when it fails. It returns
// the function that stops it (nil if there is nothing to check).
func (t *Target) checkPeer(s *session) (stop func()) {
	cs, ok := s.conn.(interface{ ConnectionState() tls.ConnectionState })
	if t.cfg.CheckPeer == nil || !ok {
		return nil
	}
	peers := cs.ConnectionState().PeerCertificates
	if len(peers) == 0 {
		return nil
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(peerCheckEvery)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			if err := t.cfg.CheckPeer(peers[0]); err != nil {
				t.log.Error("dropping the connection: the process server's certificate is no longer trusted", keyAddr, t.cfg.Addr, keyErr, err)
				s.close()
				return
			}
		}
	}()
	return func() { close(done) }
}
