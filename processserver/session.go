package processserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

const (
	protocolVersion = 4                // 3: Recoverable; 4: MarkerWithdrawn records
	oldestProtocol  = 2                // agents of protocol 2 are served, without Recoverable
	helloTimeout    = 30 * time.Second // first frame after the handshake
	helloWork       = time.Minute      // reading the manifest to answer it
	writeTimeout    = 30 * time.Second
	flushDepth      = 2 // cut segments queued for Put per session
	// maxClockAhead is how far ahead of this server's clock an agent's
	// time markers may run before it is warned of: recoverable_until
	// (dated by the agent) only moves forward, so a clock far ahead hides
	// a stalled machine's RPO until real time catches up.
	maxClockAhead = time.Minute
	logAhead      = "ahead"
)

// Read time-outs of a streaming session (variables for the tests): an
// agent sends a time marker every 500 ms while it streams, but nothing
// while it is paused (Backpressure 0) or waits for a sums reply, which may
// wait out a storage outage; TCP keepalives then tell a dead peer.
var (
	idleTimeout  = time.Minute
	quietTimeout = 30 * time.Minute
)

// flushItem is a cut segment or a marker note, in stream order.
type flushItem struct {
	seg  *segBuf
	note *wire.Marker
}

// session serves one agent connection.
type session struct {
	s     *Server
	conn  net.Conn // a *channel.Conn, or a *tls.Conn for an agent without records
	agent string   // certificate name = machine name
	// version is the protocol the agent's hello asked for (oldestProtocol
	// to protocolVersion), set before the hello-ack.
	version uint16
	log     *slog.Logger
	m       *machine
	r       *wire.Reader
	w       *wire.Writer
	done    chan struct{}

	closeOnce sync.Once
	errMu     sync.Mutex
	err       error // why the session ended, if not the agent's doing

	wmu        sync.Mutex  // one writer at a time, so the write deadline is ours
	ackSent    atomic.Bool // the hello-ack is out: backpressure frames may follow
	bpMu       sync.Mutex
	window     uint64 // last window sent
	sentWindow bool
	// ruSent is the recoverable_until last sent (Recoverable), ruSet
	// whether one was; under ruMu.
	ruMu   sync.Mutex
	ruSent time.Time
	ruSet  bool
	// updates asks the session's timer to send the window and
	// recoverable_until if they changed (poke): the monitor serves every
	// session, and must not wait on one whose agent does not read.
	updates chan struct{}

	mu       sync.Mutex // guards buf, closed, filling and sends on flushq
	buf      *segBuf
	closed   bool
	filling  bool // a frame is being read into buf's spare capacity (room)
	flushq   chan flushItem
	accepted uint64   // highest record seq accepted (read loop only)
	took     uint64   // durable at the hello, or the last record taken since (read loop only)
	diskMap  []uint16 // Hello disk index → manifest disk index
	diskSize []uint64 // Hello disk index → size: records must fit
	// mendEpoch: the hello was answered with a checksum resync for the
	// machine's open gap at this epoch (0: not); its first time marker
	// mends the gap (machine.mended).
	mendEpoch uint64
	agentRun  wire.RunID // Hello.Run
	remap     bool       // diskMap is not the identity
	skewed    bool       // warned of the agent's clock running ahead

	sumsq chan sumsReq
	// sumsPending counts sums requests not answered yet; paused is set
	// while the last window sent is 0: the agent may then be silent.
	sumsPending atomic.Int32
	paused      atomic.Bool
	// pausedBytes and pausedMax: the batch bytes read since the window
	// went to 0, and the largest batch among them (read loop only; reset
	// when the pause is sent). An agent keeps at most the window in flight,
	// or one batch when nothing is: past that it ignores backpressure.
	pausedBytes, pausedMax atomic.Uint64
	// pausedAtConnect: the first window sent was 0. The agent resends up
	// to its own default window at a connect before it hears this one.
	pausedAtConnect atomic.Bool
	// cancel ends the session's context: an abort (a newer connection of
	// the machine, its replica lost) stops the hello's storage calls and
	// the sums worker instead of leaving the next hello waiting on them.
	ctx    context.Context
	cancel context.CancelFunc
	// synced: the generation the hello-ack agreed for each disk (under
	// m.mu): a replica found lost ends only a session that streams into
	// that generation.
	synced map[string]string
}

type sumsReq struct {
	upTo uint64
	sums wire.Sums
}

// serveConn serves one connection; release frees its handshake slot.
func (s *Server) serveConn(ctx context.Context, raw net.Conn, release func()) {
	defer s.conns.Done()
	remote := raw.RemoteAddr().String()
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	conn, err := channel.Server(hctx, raw, s.tlsConf)
	cancel()
	release()
	if err != nil {
		s.shakes.warn(s.log, "refused connection: TLS handshake failed (wrong certificate role or CA?)", logRemote, remote, logErr, err)
		raw.Close()
		return
	}
	sctx, scancel := context.WithCancel(ctx)
	st := &session{
		s:       s,
		conn:    conn,
		log:     s.log.With(logRemote, remote),
		done:    make(chan struct{}),
		r:       wire.NewReader(conn, 0),
		w:       wire.NewWriter(conn),
		sumsq:   make(chan sumsReq, 16),
		updates: make(chan struct{}, 1),
		ctx:     sctx,
		cancel:  scancel,
	}
	defer close(st.done)
	defer st.close()
	// Close aborts the sessions it finds; this one may register after
	// that (its hello still on the way, or waiting for the session it
	// replaces), and a streaming agent would keep it, and Close, going.
	defer context.AfterFunc(ctx, func() { st.abort(errShuttingDown) })()
	name, _, err := peerIdentity(conn)
	if err != nil {
		st.log.Warn("refused connection", logErr, err)
		return
	}
	st.agent = name
	st.log = st.log.With(logAgent, name)
	st.run(sctx)
}

// run reads the hello, takes over the machine and streams until the
// connection ends.
func (st *session) run(ctx context.Context) {
	st.conn.SetReadDeadline(time.Now().Add(helloTimeout))
	f, err := st.r.Next()
	if err != nil {
		st.readFailed(err)
		return
	}
	if f.Type != wire.TypeHello {
		st.protocolError(fmt.Sprintf("expected hello, got %s frame", f.Type))
		return
	}
	var h wire.Hello
	err = h.UnmarshalBinary(f.Payload)
	if err != nil && len(f.Payload) >= 2 {
		// Another version's hello may not decode: say why.
		h.ProtocolVersion = binary.LittleEndian.Uint16(f.Payload)
	}
	known := h.ProtocolVersion >= oldestProtocol && h.ProtocolVersion <= protocolVersion
	if err != nil && known {
		st.protocolError(fmt.Sprintf("bad hello: %v", err))
		return
	}
	if !known {
		st.sendError(wire.CodeVersion, fmt.Sprintf("protocol version %d not supported; this process server speaks %d to %d", h.ProtocolVersion, oldestProtocol, protocolVersion))
		st.log.Warn("refused agent: unsupported protocol version", logVersion, h.ProtocolVersion)
		return
	}
	// An agent of an older protocol (process servers upgraded first) is
	// answered in its own.
	st.version = h.ProtocolVersion
	if err := st.checkHello(&h); err != nil {
		st.sendError(wire.CodeUnknownAgent, err.Error())
		st.log.Warn("refused agent", logErr, err)
		return
	}

	m := st.s.machine(h.Machine)
	st.m = m
	st.log = st.log.With(logMachine, m.name)
	m.takeover.Lock()
	if old := m.current(); old != nil {
		st.log.Info("agent reconnected; closing its previous connection")
		old.abort(errReplaced)
		<-old.done
	}
	// A fenced machine too: the hello claims it back (agree).
	m.mu.Lock()
	m.sess = st
	m.mu.Unlock()
	m.takeover.Unlock()
	defer func() {
		m.mu.Lock()
		if m.sess == st {
			m.sess = nil
		}
		m.mu.Unlock()
	}()

	actx, cancel := context.WithTimeout(ctx, helloWork)
	ack, start, diskMap, mendEpoch, err := m.agree(actx, &h)
	cancel()
	switch {
	case errors.Is(err, errFenced):
		st.sendError(wire.CodeInternal, m.fencedMessage())
		return
	case err != nil:
		st.log.Error("cannot answer hello", logErr, err)
		st.sendError(wire.CodeInternal, "process server cannot read this machine's state from the storage account; retry later")
		return
	}
	st.accepted = start.accepted
	st.took = start.durable
	st.diskMap = diskMap
	for _, d := range h.Disks {
		st.diskSize = append(st.diskSize, d.Size)
	}
	st.mendEpoch = mendEpoch
	st.agentRun = h.Run
	for i, j := range diskMap {
		if int(j) != i {
			st.remap = true
		}
	}
	st.warnExpiring()
	synced := make(map[string]string, len(ack.Disks))
	for _, d := range ack.Disks {
		st.log.Info("agent connected", logDisk, d.Name, logAction, d.Action.String(), logGeneration, d.Generation.String(), logResumeFrom, d.ResumeFrom)
		synced[d.Name] = d.Generation.String()
	}
	st.m.mu.Lock()
	st.synced = synced
	st.m.mu.Unlock()
	ack.ProtocolVersion = st.version
	if err := st.send(func(w *wire.Writer) error { return w.WriteHelloAck(ack) }); err != nil {
		st.log.Warn("send hello-ack", logErr, err)
		return
	}
	st.ackSent.Store(true)
	st.updateBackpressure()
	st.updateRecoverable()

	st.buf = st.s.getBuf()
	st.buf.begin(start.durable) // the last segment before this session's ends there
	st.flushq = make(chan flushItem, flushDepth)
	var wg sync.WaitGroup
	wg.Go(st.flusher)
	tctx, stopTimer := context.WithCancel(ctx)
	wg.Go(func() { st.timer(tctx) })
	if st.s.applier != nil {
		wg.Go(func() { st.sumsWorker(tctx) })
	}
	clean := st.readLoop()

	st.mu.Lock()
	if clean && st.buf.hasRecords() {
		st.cutLocked()
	}
	st.closed = true
	close(st.flushq)
	st.mu.Unlock()
	stopTimer()
	close(st.sumsq)
	wg.Wait()
	if st.buf != nil {
		st.s.putBuf(st.buf)
		st.buf = nil
	}
}

func (st *session) checkHello(h *wire.Hello) error {
	if h.Machine != st.agent {
		return fmt.Errorf("certificate %q cannot send data for machine %q: the agent's --name must match its certificate", st.agent, h.Machine)
	}
	if err := layout.CheckName("machine name", h.Machine); err != nil {
		return err
	}
	if err := cache.CheckStream(h.Machine); err != nil {
		return fmt.Errorf("machine name: %w", err)
	}
	seen := make(map[string]bool, len(h.Disks))
	for _, d := range h.Disks {
		if err := layout.CheckName("disk name", d.Name); err != nil {
			return err
		}
		if seen[d.Name] {
			return fmt.Errorf("disk %q listed twice", d.Name)
		}
		seen[d.Name] = true
		// Accepted, its records could never be applied: the applier
		// would stop on the machine's journal for good.
		if err := layout.CheckDiskSize(d.Name, d.Size); err != nil {
			return err
		}
	}
	return nil
}

// readLoop consumes frames until the connection ends. It reports whether
// the agent closed it cleanly (between frames).
func (st *session) readLoop() bool {
	var filtered []byte
	var markers []wire.Marker // of the batch at hand, for the segment's summary
	defer st.release()
	for {
		st.release()
		d := st.readTimeout()
		st.conn.SetReadDeadline(time.Now().Add(d))
		if d != quietTimeout && st.readTimeout() == quietTimeout {
			// Paused meanwhile: updateBackpressure's longer deadline
			// may have come before ours.
			st.conn.SetReadDeadline(time.Now().Add(quietTimeout))
		}
		f, err := st.r.NextInto(st.room)
		if err != nil {
			if err == io.EOF {
				st.log.Info("agent disconnected")
				return true
			}
			st.readFailed(err)
			return false
		}
		st.s.metrics.receivedBytes.Add(float64(wire.HeaderSize + len(f.Payload)))
		switch f.Type {
		case wire.TypeBatch:
			if st.paused.Load() {
				n := uint64(len(f.Payload))
				total, largest := st.pausedBytes.Add(n), max(st.pausedMax.Load(), n)
				st.pausedMax.Store(largest)
				bound := max(st.s.cfg.Window, largest)
				if st.pausedAtConnect.Load() {
					bound = max(bound, DefaultWindow)
				}
				if total > bound {
					// It would fill the cache every machine shares.
					st.protocolError(fmt.Sprintf("the agent sent %d bytes of batches after it was paused (backpressure), more than it may have had in flight (%d): refused", total, bound))
					return false
				}
			}
			b, err := wire.DecodeBatch(f.Payload)
			if err != nil {
				st.corrupt(err)
				return false
			}
			first, last, cut := b.FirstSeq, b.FirstSeq, false
			markers = markers[:0]
			for it := b.Records(); it.Next(); {
				r := it.Record()
				last = r.Seq
				switch {
				case r.Op == wire.OpMarker:
					if !r.Dates() {
						break // withdrawn by the agent: no point, no time
					}
					cut = cut || wire.MarkerKind(r.Flags) != wire.MarkerTime
					if r.Seq > st.accepted {
						markers = append(markers, r.Marker())
					}
				case int(r.Disk) >= len(st.diskMap):
					st.corrupt(fmt.Errorf("record %d names disk %d, but the hello listed %d disks", r.Seq, r.Disk, len(st.diskMap)))
					return false
				case r.Offset > st.diskSize[r.Disk] || uint64(r.Length) > st.diskSize[r.Disk]-r.Offset:
					st.corrupt(fmt.Errorf("record %d: %s of [%d, %d) is beyond the %d bytes of disk %d", r.Seq, r.Op, r.Offset, r.Offset+uint64(r.Length), st.diskSize[r.Disk], r.Disk))
					return false
				}
			}
			if last <= st.accepted {
				continue // a resent duplicate: already durable
			}
			frame := f // stored as received, checksum and all, unless changed
			if first <= st.accepted {
				if filtered, first, err = filterBatch(filtered[:0], b, st.accepted); err != nil {
					st.corrupt(err)
					return false
				}
				frame = wire.Frame{Type: wire.TypeBatch, Flags: f.Flags, Payload: filtered}
			}
			if st.remap {
				remapDisks(frame.Payload, st.diskMap)
				frame = wire.Frame{Type: wire.TypeBatch, Flags: f.Flags, Payload: frame.Payload}
			}
			st.accepted = last
			st.took = last
			now := time.Now()
			st.mu.Lock()
			st.buf.appendBatch(frame, first, last, now) // in place if read there
			st.filling = false
			for _, mk := range markers {
				st.buf.meta.marker(mk.Kind, mk.UnixNano, mk.Seq)
			}
			// The timer does not cut while a frame is read into the
			// segment: the age is checked here too.
			if cut || len(st.buf.data) >= st.s.cfg.SegmentBytes || now.Sub(st.buf.started) >= st.s.cfg.SegmentAge {
				st.cutLocked()
			}
			st.mu.Unlock()
		case wire.TypeMarker:
			var mk wire.Marker
			if err := mk.UnmarshalBinary(f.Payload); err != nil {
				st.corrupt(err)
				return false
			}
			if mk.Seq < st.accepted {
				continue // stale: records after it are already here
			}
			if mk.Seq > st.accepted {
				// An agent marks what it has sent: one that claims more
				// would date recoverable_until past records the journal
				// lacks.
				st.protocolError(fmt.Sprintf("time marker at sequence %d, past the last record received (%d)", mk.Seq, st.accepted))
				return false
			}
			if ahead := time.Until(time.Unix(0, mk.UnixNano)); ahead > maxClockAhead && !st.skewed {
				st.skewed = true
				st.log.Warn("agent's clock runs ahead of the process server's: recoverable_until and RPO follow the agent's clock; fix its time synchronisation", logAhead, ahead.Round(time.Second))
			}
			if mk.Kind == wire.MarkerTime && st.mendEpoch != 0 {
				// Records the agent numbered up to mk.Seq that never
				// reached this server are inside the gap: the resync
				// is complete at what this session took.
				st.m.mended(st.mendEpoch, min(mk.Seq, st.took))
				st.mendEpoch = 0
			}
			st.mu.Lock()
			st.buf.appendMarker(f.Flags, f.Payload, mk)
			full := len(st.buf.data) >= st.s.cfg.SegmentBytes
			if st.buf.hasRecords() {
				if mk.Kind != wire.MarkerTime || full {
					st.cutLocked()
				}
			} else if st.buf.hasNote {
				st.buf.hasNote = false
				st.flushq <- flushItem{note: &mk}
			}
			overflow := !st.buf.hasRecords() && len(st.buf.data) >= st.s.cfg.SegmentBytes
			st.mu.Unlock()
			if overflow {
				// Markers without records fill no segment that an agent
				// sends: a misbehaving one would grow it without bound.
				st.protocolError(fmt.Sprintf("%d bytes of markers with no record between them", len(st.buf.data)))
				return false
			}
		case wire.TypeSums:
			var sr sumsReq
			if err := sr.sums.UnmarshalBinary(f.Payload); err != nil {
				st.corrupt(err)
				return false
			}
			if !st.handleSums(&sr) {
				return false
			}
		case wire.TypeError:
			var e wire.Error
			if err := e.UnmarshalBinary(f.Payload); err != nil {
				st.log.Warn("agent sent a malformed error frame; closing", logErr, err)
			} else {
				st.log.Warn("agent reported an error; closing", logErr, e)
			}
			return false
		default:
			st.protocolError(fmt.Sprintf("unexpected %s frame from an agent", f.Type))
			return false
		}
	}
}

// room gives the wire reader the open segment's spare capacity for a
// batch frame, which is then stored where it was read (appendBatch does
// not copy it): one copy of every byte less. It keeps room for the seal's
// tag, so that the segment is still sealed in place; the same 16 bytes
// take the stream record's tag while the frame is opened there (see
// wire.Reader.NextInto). Until release, the
// timer does not cut the segment the frame is read into. It never waits
// for the lock (the timer may hold it while the flush queue is full), as
// the frame's read deadline is running: a busy lock means a copy.
func (st *session) room(t wire.Type, n int) []byte {
	if t != wire.TypeBatch || !st.mu.TryLock() {
		return nil
	}
	defer st.mu.Unlock()
	d := st.buf.data
	need := wire.HeaderSize + n
	if st.closed || cap(d)-len(d) < need+seal.TagSize {
		return nil
	}
	st.filling = true
	return d[len(d) : len(d)+need]
}

// release lets the timer cut the open segment again once the frame read
// into it (room) has been stored or dropped.
func (st *session) release() {
	st.mu.Lock()
	st.filling = false
	st.mu.Unlock()
}

// remapDisks rewrites, in place, the disk index of every record of a
// validated batch payload from Hello order to manifest order.
func remapDisks(p []byte, diskMap []uint16) {
	const batchHeader = 12
	n := int(binary.LittleEndian.Uint32(p[8:]))
	off := batchHeader
	for range n {
		h := p[off : off+wire.RecordHeaderSize]
		op := wire.Op(h[10])
		if op != wire.OpMarker {
			binary.LittleEndian.PutUint16(h[8:], diskMap[binary.LittleEndian.Uint16(h[8:])])
		}
		off += wire.RecordHeaderSize
		if op == wire.OpWrite {
			off += int(binary.LittleEndian.Uint32(h[20:]))
		}
	}
}

// filterBatch re-encodes the records of b with seq > after.
func filterBatch(dst []byte, b wire.Batch, after uint64) ([]byte, uint64, error) {
	var bb wire.BatchBuilder
	first := uint64(0)
	for it := b.Records(); it.Next(); {
		r := it.Record()
		if r.Seq <= after {
			continue
		}
		if first == 0 {
			first = r.Seq
		}
		if err := bb.Add(*r); err != nil {
			return dst, 0, err
		}
	}
	out, err := bb.AppendBinary(dst)
	return out, first, err
}

// handleSums answers a checksum-resync request. The open segment is cut so
// that the applier can bring the replica up to everything received.
func (st *session) handleSums(sr *sumsReq) bool {
	if st.s.applier == nil {
		// Without an applier there is no replica to compare with:
		// "everything differs" makes the agent send every chunk, which
		// is always correct.
		reply := wire.SumsReply{ID: sr.sums.ID, Differs: make([]bool, len(sr.sums.Sums))}
		for i := range reply.Differs {
			reply.Differs[i] = true
		}
		return st.send(func(w *wire.Writer) error { return w.WriteSumsReply(&reply) }) == nil
	}
	sr.upTo = st.took
	st.mu.Lock()
	if st.buf.hasRecords() {
		st.cutLocked()
	}
	st.mu.Unlock()
	st.sumsPending.Add(1)
	select {
	case st.sumsq <- *sr:
		return true
	case <-st.ctxDone():
		// More requests than the worker holds, and it is stuck (an
		// outage): the session is over anyway.
		st.sumsPending.Add(-1)
		return false
	}
}

// readTimeout is how long the read loop waits for the agent's next frame.
func (st *session) readTimeout() time.Duration {
	if st.paused.Load() || st.sumsPending.Load() > 0 {
		return quietTimeout
	}
	return idleTimeout
}

func (st *session) sumsWorker(ctx context.Context) {
	for sr := range st.sumsq {
		st.answerSums(ctx, sr)
		st.sumsPending.Add(-1)
	}
}

// answerSums waits until the journal holds everything before sr, then
// compares sr's checksums with the replica and sends the answer.
func (st *session) answerSums(ctx context.Context, sr sumsReq) {
	if ctx.Err() != nil {
		return
	}
	if err := st.m.waitUploaded(ctx, sr.upTo); err != nil {
		return
	}
	reply, err := st.s.applier.CompareSums(ctx, st.m.name, sr.upTo, &sr.sums)
	if err != nil {
		if ctx.Err() == nil {
			st.log.Error("checksum comparison failed", logDisk, sr.sums.Disk, logErr, err)
			st.abortWith(wire.CodeInternal, "checksum comparison failed: "+err.Error(), err)
		}
		return
	}
	reply.ID = sr.sums.ID
	st.send(func(w *wire.Writer) error { return w.WriteSumsReply(&reply) })
}

// cutLocked hands the open segment to the flusher. st.mu must be held.
func (st *session) cutLocked() {
	if st.closed || !st.buf.hasRecords() {
		return
	}
	// Read before the hand-over: the flusher may store the buffer and
	// give it back, to another session's getBuf, at once.
	prev := st.buf.meta.last
	st.flushq <- flushItem{seg: st.buf}
	st.buf = st.s.getBuf()
	st.buf.begin(prev)
}

// timer cuts the open segment once its first record is SegmentAge old.
func (st *session) timer(ctx context.Context) {
	tick := time.NewTicker(max(st.s.cfg.SegmentAge/4, 5*time.Millisecond))
	defer tick.Stop()
	revoked := time.NewTicker(revocationCheckEvery)
	defer revoked.Stop()
	listWarned := false
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			st.mu.Lock()
			if !st.closed && !st.filling && st.buf.hasRecords() && now.Sub(st.buf.started) >= st.s.cfg.SegmentAge {
				st.cutLocked()
			}
			st.mu.Unlock()
		case <-st.updates:
			st.updateBackpressure()
			st.updateRecoverable()
		case <-revoked.C:
			// A revocation ends the sessions of the certificate too,
			// not only its next handshakes: a stolen key's stream must
			// not go on while the real agent is down.
			switch err := st.checkRevoked(); {
			case errors.Is(err, pki.ErrRevoked):
				st.log.Error("agent certificate revoked; closing its connection", logErr, err)
				st.abortWith(wire.CodeUnknownAgent, err.Error(), err)
				return
			case err != nil && !listWarned:
				// The next handshakes are refused until it is fixed; the
				// live sessions go on.
				listWarned = true
				st.log.Error("cannot check the agent's certificate against the revocation list; fix the list (new connections are refused meanwhile)", logErr, err)
			}
		}
	}
}

// revocationCheckEvery is how often a session checks its agent's
// certificate against the revoked list (read again only if it changed).
var revocationCheckEvery = 10 * time.Second

// checkRevoked fails if the agent's certificate is revoked now.
func (st *session) checkRevoked() error {
	if st.s.id == nil {
		return nil
	}
	c, ok := st.conn.(channel.Stream)
	if !ok {
		return nil
	}
	cs := c.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		return nil
	}
	return st.s.id.CheckRevoked(cs.PeerCertificates[0])
}

// warnExpiring warns, at the agent's hello, when its certificate ends
// soon: past its end, the agent cannot connect, and the machine's RPO
// grows until someone notices.
func (st *session) warnExpiring() {
	c, ok := st.conn.(channel.Stream)
	if !ok {
		return
	}
	if cs := c.ConnectionState(); len(cs.PeerCertificates) > 0 {
		if w := pki.Expiring("the agent's certificate", cs.PeerCertificates[0].NotAfter, time.Now()); w != "" {
			st.log.Warn(w)
		}
	}
}

// flusher makes cut segments durable, in order, and acknowledges them.
// Nothing is acknowledged before cache.Put returned, and after a failed
// Put nothing more is, so an ack never covers a gap.
func (st *session) flusher() {
	var lastAck uint64
	var sealed []byte
	failed := false
	for it := range st.flushq {
		if it.note != nil {
			if !failed {
				st.m.noteMarker(*it.note)
			}
			continue
		}
		b := it.seg
		kept := false // b's buffer holds a hot segment now
		if !failed {
			// held: a shard write to a hung cache disk still reads the
			// sealed segment, and may whenever the disk answers: its
			// buffer (b's, sealed in place, or the sealing buffer) is
			// left to the garbage collector, never reused.
			held := false
			id := cache.SegmentID{Stream: st.m.name, Seq: b.meta.first}
			b.meta.run = st.agentRun
			cached, sums, inPlace, err := st.m.sealInPlace(b, st.s.cache)
			if err == nil && !inPlace {
				sealed, err = st.m.sealSegment(sealed[:0], b)
				cached = sealed
			}
			if err != nil {
				failed = true
				st.log.Error("cannot seal a segment; closing the connection, the agent will resend", logSegment, id.String(), logErr, err)
				st.abortWith(wire.CodeInternal, "process server cannot seal the segment; reconnect and resend", err)
			} else if held, err = st.s.cache.PutSummed(id, cached, sums); err != nil {
				failed = true
				st.log.Error("cache write failed; closing the connection, the agent will resend", logSegment, id.String(), logErr, err)
				st.abortWith(wire.CodeInternal, "process server cache write failed; reconnect and resend", err)
				// Never acked, what the write left goes: readable, it
				// would be uploaded with records the agent resends
				// (or, restarted, never sends again); unreadable, a
				// restart would take it for an acked segment lost. (A
				// segment of that id is never an acked one: records
				// acked are never stored again.)
				if derr := st.s.cache.Delete(id); derr != nil {
					st.log.Warn("cannot remove what a failed cache write left", logSegment, id.String(), logErr, derr)
				}
			} else {
				// Once segmentDurable publishes a hot segment, its last
				// reader may hand b back for reuse at any time: b is not
				// touched after it.
				last, lastTime := b.meta.last, b.meta.lastTime
				var hot *hotSeg
				switch {
				case 2*len(cached) < cap(cached):
					// A small segment (a trickle, or well compressed)
					// would pin a whole segment buffer: keep a copy.
					hot = st.s.newHot(bytes.Clone(cached), nil)
				case inPlace && held:
					hot = st.s.newHot(cached, nil)
				case inPlace:
					// The segment stays in b's buffer until applied; the
					// last reader hands the buffer back.
					hot = st.s.newHot(cached, func() { st.s.putBuf(b) })
					kept = hot != nil
				default:
					if hot = st.s.newHot(cached, nil); hot != nil {
						sealed = nil // the hot segment owns it
					}
				}
				st.m.segmentDurable(id, int64(len(cached)), last, lastTime, hot, st.agentRun)
				if last > lastAck {
					lastAck = last
					if err := st.send(func(w *wire.Writer) error { return w.WriteAck(lastAck) }); err != nil {
						failed = true
					}
				}
				st.updateBackpressure()
			}
			switch {
			case held && inPlace:
				kept = true
			case held:
				sealed = nil
			}
		}
		if !kept {
			st.s.putBuf(b)
		}
	}
}

// poke has the session send what changed of its window and
// recoverable_until, without waiting for its socket.
func (st *session) poke() {
	select {
	case st.updates <- struct{}{}:
	default: // one is pending already
	}
}

// updateRecoverable sends the agent the machine's recoverable_until, if
// it changed since last sent (after the hello-ack, then from the
// monitor's tick): the agent reports its RPO from it.
func (st *session) updateRecoverable() {
	if !st.ackSent.Load() || st.version < 3 {
		return
	}
	// Read under ruMu: the hello and the monitor may both be here, and
	// an older value must not be sent after a newer one.
	st.ruMu.Lock()
	defer st.ruMu.Unlock()
	r, ok := st.m.report()
	if !ok || !r.loaded && r.until.IsZero() {
		return // unknown (manifest not read yet) is not "nothing recoverable"
	}
	if st.ruSet && r.until.Equal(st.ruSent) {
		return
	}
	var ns int64
	if !r.until.IsZero() {
		ns = r.until.UnixNano()
	}
	if err := st.send(func(w *wire.Writer) error { return w.WriteRecoverable(wire.Recoverable{UnixNano: ns}) }); err != nil {
		return
	}
	st.ruSent, st.ruSet = r.until, true
}

// updateBackpressure sends the window the server can take now, if it
// changed: 0 while the cache is nearly full or the machine's upload
// backlog is over its bound.
func (st *session) updateBackpressure() {
	if !st.ackSent.Load() {
		return // the hello-ack goes first; run sends the window after it
	}
	want := st.s.cfg.Window
	st.bpMu.Lock()
	defer st.bpMu.Unlock()
	paused := st.sentWindow && st.window == 0
	if st.s.cachePaused.Load() {
		want = 0
	} else if lim := st.s.cfg.MaxMachineCacheBytes; lim > 0 && st.m != nil {
		b := st.m.cacheShare()
		if b > lim || (paused && b > lim*3/4) {
			want = 0
		}
	}
	if st.sentWindow && want == st.window {
		return
	}
	// Before the frame: a batch the agent sends once it has the new
	// window must not be counted against the pause it ended, and all it
	// sent before it heard of a pause is counted against that pause.
	if want == 0 && !paused {
		st.pausedBytes.Store(0)
		st.pausedMax.Store(0)
	}
	st.pausedAtConnect.Store(want == 0 && (!st.sentWindow || st.pausedAtConnect.Load()))
	st.paused.Store(want == 0)
	if err := st.send(func(w *wire.Writer) error { return w.WriteBackpressure(want) }); err != nil {
		return
	}
	if want == 0 {
		// The agent goes silent: the read under way must not time out.
		st.conn.SetReadDeadline(time.Now().Add(quietTimeout))
		st.log.Warn("pausing agent (backpressure): cache nearly full, or this machine's share of it over --machine-cache-limit")
	} else if paused {
		st.log.Info("resuming agent")
	}
	st.window = want
	st.sentWindow = true
}

// send writes one frame with a deadline; a failure ends the session.
func (st *session) send(write func(*wire.Writer) error) error {
	st.wmu.Lock()
	defer st.wmu.Unlock()
	st.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	err := write(st.w)
	if err != nil {
		st.close()
	}
	return err
}

func (st *session) sendError(code wire.ErrorCode, msg string) {
	_ = st.send(func(w *wire.Writer) error { return w.WriteError(wire.Error{Code: code, Message: msg}) })
}

// corrupt handles a frame that failed validation: nothing of it is kept.
func (st *session) corrupt(err error) {
	st.log.Error(fmt.Sprintf("corrupt frame from agent %s: %v: dropped, closing connection", st.agent, err))
	st.sendError(wire.CodeProtocol, "corrupt frame dropped: "+err.Error()+"; reconnect and resend from the last ack")
}

func (st *session) protocolError(msg string) {
	st.log.Error("protocol error from agent; closing connection", logErr, msg)
	st.sendError(wire.CodeProtocol, msg)
}

// readFailed reports a read error: corrupt stream, or a closed/timed-out
// connection.
func (st *session) readFailed(err error) {
	switch {
	case errors.Is(err, wire.ErrVersion):
		// Frames of another framing version: resending will not help.
		st.log.Error("agent sends frames of another version; closing connection", logErr, err)
		st.sendError(wire.CodeVersion, err.Error())
	case errors.Is(err, wire.ErrChecksum), errors.Is(err, wire.ErrBadMagic),
		errors.Is(err, wire.ErrTooLarge), errors.Is(err, wire.ErrMalformed):
		st.corrupt(err)
	case errors.Is(err, channel.ErrAuth):
		// Damaged in transit, not by the agent: CodeInternal, which
		// agents retry, even when it hits the hello.
		st.log.Error(fmt.Sprintf("damaged record from agent %s: %v: dropped, closing connection", st.agent, err))
		st.sendError(wire.CodeInternal, "record damaged in transit, dropped: "+err.Error()+"; reconnect and resend from the last ack")
	case st.cause() != nil:
		st.log.Info("connection closed", logErr, st.cause())
	default:
		st.log.Warn("connection lost", logErr, err)
	}
}

func (st *session) cause() error {
	st.errMu.Lock()
	defer st.errMu.Unlock()
	return st.err
}

// abort ends the session from another goroutine.
func (st *session) abort(err error) {
	st.errMu.Lock()
	if st.err == nil {
		st.err = err
	}
	st.errMu.Unlock()
	st.close()
}

func (st *session) abortWith(code wire.ErrorCode, msg string, err error) {
	st.errMu.Lock()
	if st.err == nil {
		st.err = err
	}
	st.errMu.Unlock()
	st.sendError(code, msg)
	st.close()
}

func (st *session) close() {
	st.closeOnce.Do(func() {
		st.cancel()
		st.conn.Close()
	})
}

// ctxDone is closed once the session is closed.
func (st *session) ctxDone() <-chan struct{} { return st.ctx.Done() }
