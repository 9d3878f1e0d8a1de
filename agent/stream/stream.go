// Package stream is the agent's network target: it sends the captured
// writes of one machine's disks to a process server (internal/wire frames
// over mutual TLS), keeps every record until the process server has
// acknowledged it, and resends what is unacknowledged after a reconnect.
//
// One Target carries all disks of a machine on one connection with one
// sequence: records of every disk are numbered by a single counter, so a
// recovery point is consistent across the disks.
//
// Memory is bounded (Config.BufferBytes). When the buffer is full — the
// process server is unreachable, slow, or has closed its window — WriteAt
// blocks. The engine then stops draining the BPF ring, the ring overflows
// into the kernel's dirty bitmap, and those blocks are read back later:
// back-pressure degrades to re-reading, never to loss.
package stream

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Defaults for Config fields left zero.
const (
	DefaultBufferBytes    = 256 << 20
	DefaultFlushBytes     = 1 << 20
	DefaultFlushInterval  = 5 * time.Millisecond
	DefaultMarkerInterval = 500 * time.Millisecond // RPO carries up to one interval of sawtooth
	DefaultBusyMarkers    = 100 * time.Millisecond // while records flow (Config.BusyMarkerInterval)
	DefaultWindow         = 64 << 20
	DefaultSyncTimeout    = time.Minute
)

// ChunkSize is the unit of checksum resync: Resync compares 64 KiB chunks.
const ChunkSize = 64 << 10

// ProtocolVersion is the stream protocol this package speaks.
const ProtocolVersion = 4 // 2: Hello.Run, HelloAck.LastRun; 3: Recoverable; 4: MarkerWithdrawn records

const (
	minBackoff     = 100 * time.Millisecond
	maxBackoff     = 5 * time.Second
	dialTimeout    = 10 * time.Second
	helloTimeout   = 30 * time.Second
	writeTimeout   = 30 * time.Second
	persistEvery   = time.Second
	stableSession  = 5 * time.Second // a session this long resets the backoff
	maxZeroRecord  = 1 << 30         // OpZero records are split at 1 GiB (Length is 32 bits)
	keepFreeChunks = 8
	// keepFreeSegments bounds the recycled segment structs (their record
	// lists): segments flushed on the timer are small and many.
	keepFreeSegments = 256
	// keepSegmentRecords: a segment that held more records is not kept for
	// reuse (a burst of discards leaves record lists of megabytes).
	keepSegmentRecords = 1024
	// recordCost is what a buffered record costs besides its data (its
	// header in the batch, its entry in the builder, with room to spare):
	// records without data (discards, write-zeroes, markers) take no chunk
	// memory, and are counted against BufferBytes by this instead.
	recordCost = 64
)

// Log keys.
const (
	keyAddr  = "process_server"
	keyErr   = "err"
	keyDisk  = "disk"
	keySeq   = "seq"
	keyRetry = "retry_in"
	keyCount = "count"
)

// ErrClosed is returned by calls on a closed Target.
var ErrClosed = errors.New("stream: target closed")

// ErrResyncPending is Mark's answer while the process server has asked
// for a resync the engine has not taken yet (ResyncsTaken): a consistency
// point then would date a replica about to be copied again.
var ErrResyncPending = errors.New("stream: a resync the process server asked for is pending")

// ErrStateUnsettled: Dial failed after saving generations the process
// server had just started (replicas it asked to sync), which a crash may
// or may not undo. The saved state no longer matches the last clean
// stop's: what the agent took for clean must be compared again.
var ErrStateUnsettled = errors.New("stream: the saved replica generations changed without their sync")

// Disk is one disk of the machine, in the order the engine numbers them.
type Disk struct {
	Name string // stable name, unique within the machine (e.g. "sdb")
	Size uint64 // bytes
	// Forget drops the generation remembered for the disk: the caller
	// cannot vouch for its history (another device is behind the name now),
	// so the process server must start a new replica.
	Forget bool
}

// Config configures a Target.
type Config struct {
	Addr     string      // process server, host:port
	TLS      *tls.Config // client config, e.g. pki Identity.ClientTLS(host, pki.RoleProcessServer)
	Machine  string
	Disks    []Disk
	StateDir string // holds StateFile; created if missing

	BufferBytes    int64         // bound on unacknowledged data held (default 256 MiB)
	FlushBytes     int           // batch size (default 1 MiB)
	FlushInterval  time.Duration // a partial batch waits at most this long (default 5 ms)
	MarkerInterval time.Duration // time markers (default 500 ms)
	// BusyMarkerInterval spaces time markers while records flow (default
	// 100 ms, at most MarkerInterval): they then ride in journal segments
	// at no cost to the storage account, and recoverable_until, which
	// moves to the newest marker of each uploaded segment, trails the
	// stream by less. On an idle stream every marker rewrites the
	// process server's manifest, so those keep MarkerInterval.
	BusyMarkerInterval time.Duration
	Window             uint64        // in-flight bytes until the process server says otherwise (default 64 MiB)
	SyncTimeout        time.Duration // bound of Sync (default 1 min)
	// HoldTimeMarkers starts the Target with time markers held (see
	// Target.HoldTimeMarkers), as an agent does until its initial sync
	// is done.
	HoldTimeMarkers bool
	// Coverage dates each time marker at the newest Target.Covered time
	// whose records (those numbered by the Covered call) it carries, and
	// sends none before that: the caller (the engine) reports when every
	// earlier write has been handed over. Without it a marker covers what
	// was handed over when it is sent.
	Coverage bool

	Logger *slog.Logger

	// OnResync is called (from the stream's goroutine) when the process
	// server asks, at a reconnect, for disk i to be synced again: a full
	// copy (wire.SyncFull) or a checksum compare (wire.SyncChecksum). The
	// agent wires it to Engine.RequestSync. It must not block.
	OnResync func(disk int, action wire.SyncAction)

	// DialContext replaces the TCP dialer (tests).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)

	// CheckPeer, if set, is asked every peerCheckEvery during a session
	// whether the process server's certificate is still to be trusted
	// (e.g. not revoked meanwhile: the handshake checked it once); an
	// error ends the session, and the next handshake decides.
	CheckPeer func(*x509.Certificate) error
}

// peerCheckEvery spaces Config.CheckPeer's checks.
var peerCheckEvery = 10 * time.Second

// Stats are the stream's counters. All are cumulative since Dial except
// where noted.
type Stats struct {
	Connected     bool   `json:"connected"`
	Reconnects    uint64 `json:"reconnects"`
	ChurnBytes    uint64 `json:"churn_bytes"`    // write payload handed to the stream
	SentBytes     uint64 `json:"sent_bytes"`     // batch payload written to the network, resends included
	ResentBatches uint64 `json:"resent_batches"` // batches sent again after a reconnect
	PendingBytes  uint64 `json:"pending_bytes"`  // now: batch payload not yet acknowledged
	BufferedBytes int64  `json:"buffered_bytes"` // now: memory holding it
	Window        uint64 `json:"window"`         // now: in-flight bytes the process server allows
	LastSeq       uint64 `json:"last_seq"`       // last sequence number assigned
	AckedSeq      uint64 `json:"acked_seq"`      // every record ≤ this is durable at the process server
	Resyncs       uint64 `json:"resyncs"`        // disks the process server asked to sync again after a reconnect
	SumChunks     uint64 `json:"sum_chunks"`     // chunks compared by checksum resync
	SumDiffers    uint64 `json:"sum_differs"`    // of which differed and were sent
	// AckedUntil is the time of the newest time marker whose records
	// are all acknowledged: the process server's cache holds every write
	// made before it. Zero until the first one.
	AckedUntil time.Time `json:"acked_until"`
	// RecoverableUntil is the time before which every write is in the
	// storage account, as the process server last said (Recoverable);
	// zero until it has said, or while nothing is recoverable.
	RecoverableUntil time.Time `json:"recoverable_until"`
}

// segment is one batch: records whose data is copied into arena, which
// never grows, so the Data slices the BatchBuilder keeps stay valid.
type segment struct {
	arena   []byte // the records' data, carved from ch
	ch      *chunk
	bb      wire.BatchBuilder
	first   uint64
	last    uint64
	t0      time.Time // when its first record was assigned
	payload int       // batch payload bytes, set when sealed
	freed   bool      // acknowledged while the sender was writing it
}

// chunk is memory that consecutive segments carve their arenas from. A
// segment flushed after FlushInterval may hold a few KiB: a whole
// FlushBytes arena each kept about ten times the data in memory until its
// acknowledgement, and allocating and zeroing them cost the agent more
// CPU than copying the data in.
type chunk struct {
	buf  []byte // buf[:len] is carved out
	refs int    // segments carved from it and not recycled
}

// minArena is the least room a new segment takes in the current chunk;
// with less left, it starts a new chunk.
const minArena = 64 << 10

type sentMarker struct {
	seq uint64
	at  time.Time
}

// coverPoint is one Covered call: every write completed before at has a
// sequence number ≤ seq.
type coverPoint struct {
	at  time.Time
	seq uint64
}

// maxCovers bounds the covered points kept while the sender cannot move
// (about 50 s of the engine's 50 ms reports); beyond it they are thinned
// out: a marker dated at an older point is still true, only older.
const maxCovers = 1024

// sumsReq is a checksum resync question waiting for its answers.
type sumsReq struct {
	msgs []*wire.Sums
	sent bool // on the current connection
}

// Target streams a machine's disks to a process server. It has the methods
// of agent.Target and agent.Resyncer, except that markers come through
// Mark. WriteAt, Zero, Mark, Resync and Sync must be called from one
// goroutine (the engine's); Stats, RPO and Abort from any.
type Target struct {
	cfg        Config
	log        *slog.Logger
	statePath  string
	agreements []wire.DiskAgreement
	start      time.Time

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	kick   chan struct{} // wakes the sender
	sumsCh chan wire.SumsReply
	abort  chan struct{} // closed when err is set
	done   chan struct{} // sender and persister exited
	wg     sync.WaitGroup

	mu          sync.Mutex
	cond        sync.Cond // buffer space, acknowledgements, abort
	segs        []*segment
	sent        int // segs[:sent] are on the current connection
	open        *segment
	free        []*segment // recycled segments (their chunks released)
	chunks      []*chunk   // free chunks
	cur         *chunk     // the chunk new segments are carved from
	busy        *segment   // being written by the sender
	buffered    int64      // bytes of chunks in use
	recBytes    int64      // recordCost × records in segments not yet recycled
	pending     uint64     // payload of segs
	inflight    uint64
	window      uint64
	connected   bool
	nextSeq     uint64
	lease       uint64 // persisted: no seq ≥ lease has been used
	ackedSeq    uint64
	sentSeq     uint64 // every record ≤ this is on the process server or sent on this connection
	gens        []wire.Generation
	sums        *sumsReq
	markers     []sentMarker // time markers not yet known durable
	ackedMarker time.Time
	// recoverable is the process server's recoverable_until (ruHeard:
	// it said, this run); savedRU the last one persisted (by this run or
	// the last), savedRUAt when this run saved it.
	recoverable time.Time
	ruHeard     bool
	// helloVersion is the protocol hellos are said in (0: ProtocolVersion;
	// one less each time a process server refused one, and so the
	// protocol spoken). A process server of protocol 2 sends no
	// Recoverable: the RPO then counts from the acknowledged markers, as
	// before; one of protocol 3 takes no withdrawn markers.
	helloVersion atomic.Uint32
	// unrecSince is since when the process server has said that nothing
	// is recoverable (a first sync; persisted, so that a restart does not
	// make the RPO look small).
	unrecSince  time.Time
	savedRU     time.Time
	savedRUAt   time.Time
	err         error // set by Abort or Close: every call fails with it
	stateVer    uint64
	holdMarkers bool
	drains      []drainRange // drains whose records may still be sent (again, after a reconnect)
	markerNow   bool         // released: send a time marker at once
	releaseSeq  uint64       // the last sequence numbered when markers were released
	markedSeq   uint64       // sentSeq when the last time marker was sent
	maxSent     uint64       // the highest sequence sent this run (or agreed at Dial)
	ownState    bool         // the state directory held this machine's history
	runID       wire.RunID   // random per Target: Hello.Run
	foreignSeen uint64       // durable sequences judged at a reconnect (foreign ones resynced)
	covers      []coverPoint // Covered points, oldest first; covers[0] may be the one the last marker used
	coverFloor  time.Time    // time markers last released: no cover before it counts
	// pointsHeld: a reconnect agreed a resync (resyncAsked counts them)
	// that the engine has not taken yet; resyncDelivered is the count
	// whose requests OnResync has handed on.
	pointsHeld      bool
	resyncAsked     uint64
	resyncDelivered atomic.Uint64 // (read by the engine at every pass)

	sumsID uint16 // engine goroutine only

	// thawed is closed when the app-consistent point that froze the file
	// systems (BeforeFreeze) thaws them (AfterThaw); nil when none is
	// frozen. Under mu. Saves wait for it: the state file may live on a
	// frozen file system, and a save under mu would hold the engine's
	// drain inside the freeze until the watchdog thaws.
	thawed chan struct{}
	saving int // persistLoop's saves under way; under mu

	persistMu  sync.Mutex
	writtenVer uint64

	churn, sentBytes, resent, reconnects, resyncs, sumChunks, sumDiffers atomic.Uint64
}

// Dial loads the stream state from cfg.StateDir, connects to the process
// server and agrees with it on every disk's generation (Hello/HelloAck). It
// retries unreachable servers with backoff until ctx is done, but returns
// at once when the server or its certificate is refused, or it refuses
// ours. On success the Target is streaming: Agreements tells how each disk
// must be brought up to date.
func Dial(ctx context.Context, cfg Config) (*Target, error) {
	t, err := newTarget(cfg)
	if err != nil {
		return nil, err
	}
	backoff := minBackoff
	for {
		s, ack, err := t.connect(ctx)
		if err == nil {
			agreements, err := t.agree(s, ack, true)
			if err != nil {
				s.close()
				t.cancel()
				return nil, err
			}
			t.agreements = agreements
			t.start = time.Now()
			t.wg.Add(2)
			go t.run(s)
			go t.persistLoop()
			go func() { t.wg.Wait(); close(t.done) }()
			return t, nil
		}
		var pe *permanentError
		if errors.As(err, &pe) {
			t.cancel()
			return nil, pe.err
		}
		if ctx.Err() != nil {
			t.cancel()
			return nil, fmt.Errorf("connect to process server %s: %w (last error: %v)", cfg.Addr, ctx.Err(), err)
		}
		t.log.Warn("process server not reachable; retrying", keyAddr, cfg.Addr, keyRetry, backoff, keyErr, err)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

func newTarget(cfg Config) (*Target, error) {
	if cfg.Addr == "" || cfg.TLS == nil {
		return nil, errors.New("stream: process server address and TLS configuration are required")
	}
	if err := layout.CheckName("machine name", cfg.Machine); err != nil {
		return nil, err
	}
	if len(cfg.Disks) == 0 || len(cfg.Disks) > wire.MaxDisks {
		return nil, fmt.Errorf("stream: %d disks; want 1 to %d", len(cfg.Disks), wire.MaxDisks)
	}
	seen := map[string]bool{}
	for _, d := range cfg.Disks {
		if err := layout.CheckName("disk name", d.Name); err != nil {
			return nil, err
		}
		if seen[d.Name] {
			return nil, fmt.Errorf("stream: disk name %q used twice", d.Name)
		}
		seen[d.Name] = true
		if err := layout.CheckDiskSize(d.Name, d.Size); err != nil {
			return nil, err // the process server would refuse it
		}
	}
	if cfg.StateDir == "" {
		return nil, errors.New("stream: a state directory is required")
	}
	cfg.TLS = channel.Config(cfg.TLS)
	if cfg.BufferBytes <= 0 {
		cfg.BufferBytes = DefaultBufferBytes
	}
	if cfg.FlushBytes <= 0 {
		cfg.FlushBytes = DefaultFlushBytes
	}
	cfg.FlushBytes = min(cfg.FlushBytes, wire.MaxPayload/2)
	if cfg.FlushInterval <= 0 {
		cfg.FlushInterval = DefaultFlushInterval
	}
	if cfg.MarkerInterval <= 0 {
		cfg.MarkerInterval = DefaultMarkerInterval
	}
	if cfg.BusyMarkerInterval <= 0 {
		cfg.BusyMarkerInterval = DefaultBusyMarkers
	}
	cfg.BusyMarkerInterval = min(cfg.BusyMarkerInterval, cfg.MarkerInterval)
	if cfg.Window == 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.SyncTimeout <= 0 {
		cfg.SyncTimeout = DefaultSyncTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("stream state directory: %w", err)
	}
	t := &Target{
		cfg:         cfg,
		log:         cfg.Logger,
		statePath:   filepath.Join(cfg.StateDir, StateFile),
		kick:        make(chan struct{}, 1),
		sumsCh:      make(chan wire.SumsReply, 4),
		abort:       make(chan struct{}),
		done:        make(chan struct{}),
		gens:        make([]wire.Generation, len(cfg.Disks)),
		nextSeq:     1,
		window:      cfg.Window,
		holdMarkers: cfg.HoldTimeMarkers,
	}
	t.cond.L = &t.mu
	rand.Read(t.runID[:])
	t.ctx, t.cancel = context.WithCancel(context.Background())
	p, err := loadPersisted(t.statePath)
	if err != nil {
		return nil, err
	}
	if p != nil {
		t.nextSeq = max(p.NextSeq, 1)
		if p.Machine == cfg.Machine {
			t.ownState = true
			t.ackedSeq = p.AckedSeq
			t.savedRU = p.RecoverableUntil
			t.unrecSince = p.UnrecoverableSince
			for i, d := range cfg.Disks {
				for _, pd := range p.Disks {
					if pd.Name != d.Name || d.Forget {
						continue
					}
					if t.gens[i], err = parseGeneration(pd.Generation); err != nil {
						return nil, fmt.Errorf("stream state %s: disk %s: %w", t.statePath, d.Name, err)
					}
				}
			}
		} else {
			t.log.Warn("stream state belongs to another machine name: starting a new history", "state_machine", p.Machine, "machine", cfg.Machine)
		}
	}
	t.lease = t.nextSeq
	return t, nil
}

// Agreements reports, per disk (in Config.Disks order), what the process
// server answered at Dial: SyncResume, SyncFull or SyncChecksum. A resume
// that would leave a gap (the process server lost records it had
// acknowledged) is reported as SyncChecksum.
func (t *Target) Agreements() []wire.DiskAgreement {
	return append([]wire.DiskAgreement(nil), t.agreements...)
}

// WriteAt queues p for offset off of disk dev. It copies p. It blocks while
// the buffer is full.
func (t *Target) WriteAt(dev int, p []byte, off int64) error {
	if err := t.check(dev, off, int64(len(p))); err != nil {
		return err
	}
	t.churn.Add(uint64(len(p)))
	for len(p) > 0 {
		n := min(len(p), t.cfg.FlushBytes)
		r := wire.Record{Disk: uint16(dev), Op: wire.OpWrite, Offset: uint64(off), Length: uint32(n)}
		if err := t.add(r, p[:n], false); err != nil {
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Zero queues "n bytes at off of disk dev read as zeroes".
func (t *Target) Zero(dev int, off, n int64) error {
	if err := t.check(dev, off, n); err != nil {
		return err
	}
	for n > 0 {
		k := min(n, maxZeroRecord)
		if err := t.add(wire.Record{Disk: uint16(dev), Op: wire.OpZero, Offset: uint64(off), Length: uint32(k)}, nil, false); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// ReadAt fails: the replica lives at the process server. The engine
// compares through Resync instead.
func (t *Target) ReadAt(int, []byte, int64) (int, error) {
	return 0, errors.New("stream: the replica cannot be read back; use Resync")
}

// Mark queues a consistency point (wire.MarkerCrashConsistent or
// wire.MarkerAppConsistent) taken at time at, as an OpMarker record with
// its own sequence number, and sends it without waiting for the batch to
// fill. (package agent adapts it to agent.Target's Marker: this package
// cannot import agent, which imports it.) It fails with ErrResyncPending
// while a resync agreed at a reconnect is not taken yet (ResyncsTaken).
func (t *Target) Mark(kind wire.MarkerKind, at time.Time) error {
	if kind != wire.MarkerCrashConsistent && kind != wire.MarkerAppConsistent {
		return fmt.Errorf("stream: marker kind %s is not a consistency point", kind)
	}
	return t.add(wire.MarkerRecord(wire.Marker{UnixNano: at.UnixNano(), Kind: kind}), nil, true)
}

// ResyncEpoch returns how many resync agreements have had their requests
// handed on through OnResync. The engine reads it before it takes the
// requests, and passes it to ResyncsTaken once it has.
func (t *Target) ResyncEpoch() uint64 { return t.resyncDelivered.Load() }

// ResyncsTaken says that the engine has taken every resync request of the
// agreements up to epoch: its next consistency point follows their end,
// so Mark takes points again, unless a later agreement asked for more.
func (t *Target) ResyncsTaken(epoch uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.resyncAsked == epoch {
		t.pointsHeld = false
	}
}

func (t *Target) check(dev int, off, n int64) error {
	if dev < 0 || dev >= len(t.cfg.Disks) {
		return fmt.Errorf("stream: no disk %d", dev)
	}
	if off < 0 || n < 0 || uint64(off)+uint64(n) > t.cfg.Disks[dev].Size {
		return fmt.Errorf("stream: %d bytes at %d are beyond disk %s (%d bytes)", n, off, t.cfg.Disks[dev].Name, t.cfg.Disks[dev].Size)
	}
	return nil
}

// add assigns r the next sequence number and appends it, with a copy of
// data, to the open segment.
func (t *Target) add(r wire.Record, data []byte, seal bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err != nil {
		return t.err
	}
	if r.Op == wire.OpMarker && t.pointsHeld {
		return ErrResyncPending
	}
	if s := t.open; s != nil && (len(s.arena)+len(data) > cap(s.arena) || s.bb.Len()+wire.RecordHeaderSize > t.cfg.FlushBytes) {
		if s.bb.Count() == 0 {
			// Empty, its arena too short (sealing would keep it open,
			// and the data would land outside chunk memory): let it go.
			t.open = nil
			t.recycleLocked(s)
		} else {
			t.sealLocked()
		}
	}
	if t.open == nil {
		// Wait for room (overLocked).
		for t.err == nil && t.overLocked(len(data)) {
			t.cond.Wait()
		}
		if t.err != nil {
			return t.err
		}
		// Before a segment is opened: one left empty could lack room
		// for the next add's data.
		if r.Op == wire.OpMarker && t.pointsHeld { // agreed while it waited
			return ErrResyncPending
		}
		if err := t.leaseLocked(); err != nil {
			return err
		}
		t.open = t.newSegmentLocked(len(data))
	} else if err := t.leaseLocked(); err != nil {
		return err
	}
	s := t.open
	r.Seq = t.nextSeq
	if len(data) > 0 {
		start := len(s.arena)
		s.arena = append(s.arena, data...)
		r.Data = s.arena[start:len(s.arena):len(s.arena)]
	}
	if err := s.bb.Add(r); err != nil {
		return fmt.Errorf("stream: %w", err) // a bug: records are built here
	}
	t.recBytes += recordCost
	t.nextSeq++
	if s.bb.Count() == 1 {
		s.first, s.t0 = r.Seq, time.Now()
		// An idle sender sleeps until its next time marker: wake it so
		// that the partial batch leaves after FlushInterval, not up to a
		// marker interval later (late records also hold back the time
		// markers, which then cannot cover them).
		t.wake()
	}
	s.last = r.Seq
	if seal || s.bb.Len() >= t.cfg.FlushBytes {
		t.sealLocked()
	}
	return nil
}

// overLocked reports whether a new segment whose first record holds need
// bytes of data must wait for acknowledgements: it needs a new chunk that
// BufferBytes has no room for, or the chunks and the records buffered
// (counted by recordCost) already pass it. Nothing buffered never waits,
// so that a buffer smaller than a chunk cannot deadlock. (A segment adds
// at most FlushBytes ÷ RecordHeaderSize records: what BufferBytes may be
// passed by.)
func (t *Target) overLocked(need int) bool {
	if t.buffered == 0 {
		return false
	}
	used := t.buffered + t.recBytes
	return used > t.cfg.BufferBytes || !t.fitsLocked(need) && used+int64(t.cfg.FlushBytes) > t.cfg.BufferBytes
}

// fitsLocked reports whether a new segment whose first record holds need
// bytes of data fits in the current chunk.
func (t *Target) fitsLocked(need int) bool {
	return t.cur != nil && cap(t.cur.buf)-len(t.cur.buf) >= max(need, min(minArena, cap(t.cur.buf)))
}

// newSegmentLocked opens a segment in the current chunk, or in a new one
// when the current one lacks room for need bytes (records are at most
// FlushBytes, a chunk's size).
func (t *Target) newSegmentLocked(need int) *segment {
	if !t.fitsLocked(need) {
		if c := t.cur; c != nil && c.refs == 0 {
			t.releaseChunkLocked(c)
		}
		if n := len(t.chunks); n > 0 {
			t.cur, t.chunks = t.chunks[n-1], t.chunks[:n-1]
		} else {
			t.cur = &chunk{buf: make([]byte, 0, max(t.cfg.FlushBytes, need))}
		}
		t.buffered += int64(cap(t.cur.buf))
	}
	var s *segment
	if n := len(t.free); n > 0 {
		s, t.free = t.free[n-1], t.free[:n-1]
	} else {
		s = &segment{}
	}
	c := t.cur
	c.refs++
	s.ch, s.arena = c, c.buf[len(c.buf):len(c.buf)]
	return s
}

// closeArenaLocked ends s's carving: the chunk's next segment starts
// after s's data.
func (t *Target) closeArenaLocked(s *segment) {
	if c := s.ch; c == t.cur && len(s.arena) > 0 {
		c.buf = c.buf[:len(c.buf)+len(s.arena)]
	}
	s.arena = s.arena[:len(s.arena):len(s.arena)]
}

func (t *Target) recycleLocked(s *segment) {
	if c := s.ch; c != nil {
		if c.refs--; c.refs == 0 {
			if c == t.cur {
				c.buf = c.buf[:0] // nothing carved from it is in use
			} else {
				t.releaseChunkLocked(c)
			}
		}
	}
	t.recBytes -= int64(s.bb.Count()) * recordCost
	if len(t.free) < keepFreeSegments && s.bb.Count() <= keepSegmentRecords {
		s.arena, s.ch = nil, nil
		s.bb.Reset()
		s.first, s.last, s.payload, s.freed = 0, 0, 0, false
		t.free = append(t.free, s)
	}
	t.cond.Broadcast() // room for a writer waiting in add
}

func (t *Target) releaseChunkLocked(c *chunk) {
	t.buffered -= int64(cap(c.buf))
	if t.cur == c {
		t.cur = nil
	}
	if len(t.chunks) < keepFreeChunks {
		c.buf, c.refs = c.buf[:0], 0
		t.chunks = append(t.chunks, c)
	}
}

// sealLocked closes the open segment: it becomes a batch to send.
func (t *Target) sealLocked() {
	s := t.open
	if s == nil || s.bb.Count() == 0 {
		return
	}
	s.payload = s.bb.Len()
	t.closeArenaLocked(s)
	t.pending += uint64(s.payload)
	t.segs = append(t.segs, s)
	t.open = nil
	t.wake()
}

func (t *Target) wake() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// leaseLocked extends the persisted sequence lease when nextSeq reaches it.
func (t *Target) leaseLocked() error {
	if t.nextSeq < t.lease {
		return nil
	}
	return t.extendLeaseLocked()
}

func (t *Target) extendLeaseLocked() error {
	t.lease = t.nextSeq + seqLease
	if err := t.persist(t.snapshotLocked()); err != nil {
		t.lease = t.nextSeq
		return fmt.Errorf("stream: reserve sequence numbers: %w", err)
	}
	return nil
}

// BeforeFreeze implements agent.Freezer: a sequence lease taken while the
// file systems are frozen for an app-consistent point would write the
// state file, which may live on one of them, under the stream's lock. It
// makes sure half a lease is left.
func (t *Target) BeforeFreeze() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lease-t.nextSeq < seqLease/2 {
		if err := t.extendLeaseLocked(); err != nil {
			return err
		}
	}
	if t.thawed == nil {
		t.thawed = make(chan struct{})
	}
	// A save that began before (persistLoop's) ends before the freeze.
	for t.saving > 0 {
		t.cond.Wait()
	}
	return nil
}

// AfterThaw implements agent.Freezer: the file systems BeforeFreeze was
// called for are thawed, and saves held back meanwhile go on. It may be
// called more than once, and from another goroutine (the watchdog's).
func (t *Target) AfterThaw() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.thawed != nil {
		close(t.thawed)
		t.thawed = nil
	}
}

// lockThawed takes mu once no app-consistent point holds the file
// systems frozen (see thawed).
func (t *Target) lockThawed() error {
	for {
		t.mu.Lock()
		ch := t.thawed
		if ch == nil {
			return nil
		}
		t.mu.Unlock()
		select {
		case <-ch:
		case <-t.ctx.Done():
			return t.ctx.Err()
		}
	}
}

// Resync makes the process server's bytes [off, off+len(p)) of disk dev
// equal to p: it sends SHA-256 sums of 64 KiB chunks, waits for the answer
// and queues only the chunks that differ. It returns the bytes queued.
func (t *Target) Resync(dev int, p []byte, off int64) (int64, error) {
	if err := t.check(dev, off, int64(len(p))); err != nil {
		return 0, err
	}
	type chunk struct{ start, end int }
	var (
		chunks []chunk
		msgs   []*wire.Sums
	)
	question := func(start, size, n int) {
		t.sumsID++ // only the engine's goroutine touches it
		m := &wire.Sums{ID: t.sumsID, Disk: t.cfg.Disks[dev].Name, Offset: uint64(off) + uint64(start), ChunkSize: uint32(size)}
		for i := range n {
			c := chunk{start + i*size, start + (i+1)*size}
			m.Sums = append(m.Sums, sha256.Sum256(p[c.start:c.end]))
			chunks = append(chunks, c)
		}
		msgs = append(msgs, m)
	}
	full := len(p) / ChunkSize
	for i := 0; i < full; i += wire.MaxSums {
		question(i*ChunkSize, ChunkSize, min(wire.MaxSums, full-i))
	}
	// A shorter tail is its own question with its own chunk size, so the
	// process server compares exactly these bytes.
	tail := len(p) - full*ChunkSize
	if tail > 0 && tail%512 == 0 {
		question(full*ChunkSize, tail, 1)
		tail = 0
	}
	t.mu.Lock()
	if err := t.err; err != nil {
		t.mu.Unlock()
		return 0, err
	}
	if len(msgs) > 0 {
		// Sums follow every record queued so far: the process server
		// compares with the replica as of those.
		t.sealLocked()
		t.sums = &sumsReq{msgs: msgs}
		t.wake()
	}
	t.mu.Unlock()

	differs := make([]bool, 0, len(chunks))
	for _, m := range msgs {
		d, err := t.waitSums(m)
		if err != nil {
			t.mu.Lock()
			t.sums = nil
			t.mu.Unlock()
			return 0, err
		}
		differs = append(differs, d...)
	}
	t.mu.Lock()
	t.sums = nil
	t.mu.Unlock()

	var stored int64
	for i, c := range chunks {
		t.sumChunks.Add(1)
		if !differs[i] {
			continue
		}
		t.sumDiffers.Add(1)
		if err := t.WriteAt(dev, p[c.start:c.end], off+int64(c.start)); err != nil {
			return stored, err
		}
		stored += int64(c.end - c.start)
	}
	if tail > 0 { // not a multiple of 512: cannot be asked about
		start := len(p) - tail
		if err := t.WriteAt(dev, p[start:], off+int64(start)); err != nil {
			return stored, err
		}
		stored += int64(tail)
	}
	return stored, nil
}

func (t *Target) waitSums(m *wire.Sums) ([]bool, error) {
	for {
		select {
		case r := <-t.sumsCh:
			if r.ID != m.ID {
				continue // an answer to an abandoned question
			}
			if len(r.Differs) != len(m.Sums) {
				t.log.Warn("process server answered a checksum question with the wrong number of chunks; sending them all",
					keyDisk, m.Disk, "asked", len(m.Sums), "answered", len(r.Differs))
				d := make([]bool, len(m.Sums))
				for i := range d {
					d[i] = true
				}
				return d, nil
			}
			return r.Differs, nil
		case <-t.abort:
			t.mu.Lock()
			defer t.mu.Unlock()
			return nil, t.err
		}
	}
}

// Sync waits until the process server has acknowledged every record queued
// so far, at most Config.SyncTimeout, and saves the stream state.
func (t *Target) Sync() error {
	ctx, cancel := context.WithTimeout(context.Background(), t.cfg.SyncTimeout)
	defer cancel()
	err := t.SyncContext(ctx)
	if err != nil && ctx.Err() != nil && errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("%w (not within the stop timeout, %s, --stop-timeout; the next start resyncs by checksum)", err, t.cfg.SyncTimeout)
	}
	return err
}

// SyncContext is Sync bounded by ctx instead of Config.SyncTimeout.
func (t *Target) SyncContext(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		t.mu.Lock()
		t.cond.Broadcast()
		t.mu.Unlock()
	})
	defer stop()
	t.mu.Lock()
	t.sealLocked()
	want := t.nextSeq - 1
	// Up to foreignSeen, what is not acknowledged was let go at a
	// reconnect that found another agent's sequences there (and a
	// resync owed): no ack will come for those numbers.
	for max(t.ackedSeq, t.foreignSeen) < want && t.err == nil && ctx.Err() == nil {
		t.cond.Wait()
	}
	acked, err := max(t.ackedSeq, t.foreignSeen), t.err
	snap := t.snapshotLocked()
	t.mu.Unlock()
	if acked < want {
		if err == nil {
			err = fmt.Errorf("process server %s acknowledged records up to %d of %d: %w", t.cfg.Addr, acked, want, ctx.Err())
		}
		return fmt.Errorf("stream sync: %w", err)
	}
	return t.persist(snap)
}

// Covered says that every write completed before at has been handed to
// the Target (see Config.Coverage): its records are numbered at most the
// last sequence assigned now. Safe from any goroutine, but only the
// records handed over before the call count.
func (t *Target) Covered(at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	seq := t.nextSeq - 1
	n := len(t.covers)
	switch {
	case at.Before(t.coverFloor):
		return // asked for before a sync or resync ended (HoldTimeMarkers)
	case n > 0 && !at.After(t.covers[n-1].at):
		return // never moves back
	case n > 0 && t.covers[n-1].seq == seq:
		t.covers[n-1].at = at // nothing handed over since: a later time, same records
		return
	case n >= maxCovers:
		// Keeps the oldest, the only one a marker may be able to use.
		k := 0
		for i := 0; i < n; i += 2 {
			t.covers[k] = t.covers[i]
			k++
		}
		t.covers = t.covers[:k]
	}
	t.covers = append(t.covers, coverPoint{at: at, seq: seq})
}

// HoldTimeMarkers stops (hold) or restarts time markers. The agent holds
// them while an initial sync or resync is under way: the replica is not a
// point in time then, and "recoverable until" must not advance.
//
// Released, the first marker waits until every record numbered so far is
// sent: the resync's last records may still be queued, and a marker before
// them would date a replica still half resynced (the process server takes
// the first time marker after a resync as its end). Nor is it dated before
// the release: a cover taken before or during the resync (one of the pass
// that ran it, asked for at its start) would date the state after it,
// with every write made meanwhile, back to the resync's start, before the
// consistency point that ended it; a time then would recover to writes
// made after it.
func (t *Target) HoldTimeMarkers(hold bool) {
	t.mu.Lock()
	t.markerNow = t.holdMarkers && !hold
	if t.holdMarkers && !hold {
		t.releaseSeq = t.nextSeq - 1
		t.coverFloor = time.Now()
		t.covers = t.covers[:0]
	}
	t.holdMarkers = hold
	t.mu.Unlock()
	t.wake()
}

// maxDrains bounds the drains kept while their records are not
// acknowledged.
const maxDrains = 1024

// drainRange is a drain's records: the last sequence numbered before it
// and the last of it (0 until it is done). The states strictly between
// are no state the device was in.
type drainRange struct{ start, end uint64 }

// DrainStarted says that the agent starts a drain, which reads blocks
// back (after an overflow, or for a consistency point): until it ends the
// replica holds some blocks read back and not others, each as the device
// had it at its read, which is no state the device was in. No time marker
// is numbered inside a drain's records, whenever they are sent: dated by
// a cover from before it, it would offer such a state for that time. One
// goes at each end of a drain as soon as the records up to it are sent
// (under overload the sender may never rest between drains otherwise).
func (t *Target) DrainStarted() {
	t.mu.Lock()
	if n := len(t.drains); n == 0 || t.drains[n-1].end != 0 {
		// (Else the last one stopped half way: this one ends it.)
		if n >= maxDrains {
			// Acks withheld long under overload: the two oldest
			// merge, the states between them given up for markers.
			t.drains[1].start = t.drains[0].start
			t.drains = t.drains[1:]
		}
		t.drains = append(t.drains, drainRange{start: t.nextSeq - 1})
	}
	t.sealLocked() // a batch ends there, for a marker to follow it
	t.mu.Unlock()
	t.wake()
}

// DrainEnded says that the drain DrainStarted began is over: done, it
// read back all it took; else it stopped half way (the blocks it had yet
// to read wait in a bitmap), and the next drain that is done ends it.
func (t *Target) DrainEnded(done bool) {
	t.mu.Lock()
	if n := len(t.drains); done && n > 0 && t.drains[n-1].end == 0 {
		d := &t.drains[n-1]
		if d.end = t.nextSeq - 1; d.end == d.start {
			t.drains = t.drains[:n-1] // numbered nothing
		}
		t.sealLocked()
	}
	t.mu.Unlock()
	t.wake()
}

// insideDrainLocked reports whether seq falls inside a drain's records.
func (t *Target) insideDrainLocked(seq uint64) bool {
	// Acknowledged records are never sent again.
	for len(t.drains) > 0 && t.drains[0].end != 0 && t.drains[0].end <= t.ackedSeq {
		t.drains = t.drains[1:]
	}
	for _, d := range t.drains {
		if d.start < seq && (d.end == 0 || seq < d.end) {
			return true
		}
	}
	return false
}

// atDrainEdgeLocked reports whether seq is where a drain starts or ends.
func (t *Target) atDrainEdgeLocked(seq uint64) bool {
	for _, d := range t.drains {
		if seq == d.start || seq == d.end {
			return true
		}
	}
	return false
}

// Abort makes every blocked and later call fail with err (the first one
// given). The agent uses it to bound how long a stop waits for an
// unreachable process server.
func (t *Target) Abort(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.abortLocked(err)
}

func (t *Target) abortLocked(err error) {
	if t.err != nil {
		return
	}
	t.err = err
	close(t.abort)
	t.cond.Broadcast()
	t.wake()
}

// Close disconnects and saves the stream state. Records not acknowledged
// are dropped: after a Close without a successful Sync the caller must
// treat the stop as unclean (resync by checksum on the next start).
func (t *Target) Close() error {
	t.mu.Lock()
	t.abortLocked(ErrClosed)
	t.mu.Unlock()
	t.cancel()
	<-t.done
	t.mu.Lock()
	// Nothing will be numbered any more: the exact next number is a
	// sufficient bound, and the next run continues without a gap.
	t.lease = t.nextSeq
	snap := t.snapshotLocked()
	t.mu.Unlock()
	return t.persist(snap)
}

// Stats returns the counters. Safe from any goroutine.
func (t *Target) Stats() Stats {
	t.mu.Lock()
	s := Stats{
		Connected:        t.connected,
		PendingBytes:     t.pending,
		BufferedBytes:    t.buffered + t.recBytes,
		Window:           t.window,
		LastSeq:          t.nextSeq - 1,
		AckedSeq:         t.ackedSeq,
		AckedUntil:       t.ackedMarker,
		RecoverableUntil: t.recoverable,
	}
	if t.open != nil {
		s.PendingBytes += uint64(t.open.bb.Len())
	}
	t.mu.Unlock()
	s.Reconnects = t.reconnects.Load()
	s.ChurnBytes = t.churn.Load()
	s.SentBytes = t.sentBytes.Load()
	s.ResentBatches = t.resent.Load()
	s.Resyncs = t.resyncs.Load()
	s.SumChunks = t.sumChunks.Load()
	s.SumDiffers = t.sumDiffers.Load()
	return s
}

// RPO is how far back recoverable_until is: the time before which every
// write is in the storage account, as the process server last said.
// Until it has said this run, the last run's word counts; while nothing
// is recoverable (a first sync), the time since it first said so (since
// Dial, if nobody ever said anything).
func (t *Target) RPO() time.Duration {
	t.mu.Lock()
	at := t.recoverable
	switch {
	case t.helloVersion.Load() == 2:
		at = t.ackedMarker
	case !t.ruHeard:
		at = t.savedRU
	}
	if at.IsZero() { // nothing recoverable, as heard this run or the last
		at = t.unrecSince
	}
	t.mu.Unlock()
	if at.IsZero() {
		at = t.start
	}
	return max(time.Since(at), 0)
}

// snapshot is the state to persist, numbered so that an older snapshot
// never overwrites a newer one.
type snapshot struct {
	ver uint64
	p   persisted
}

func (t *Target) snapshotLocked() snapshot {
	t.stateVer++
	p := persisted{Version: stateVersion, Machine: t.cfg.Machine, NextSeq: t.lease, AckedSeq: t.ackedSeq, RecoverableUntil: t.savedRU, UnrecoverableSince: t.unrecSince}
	if t.ruHeard {
		p.RecoverableUntil = t.recoverable
		t.savedRU, t.savedRUAt = t.recoverable, time.Now()
	}
	for i, d := range t.cfg.Disks {
		p.Disks = append(p.Disks, persistedDisk{Name: d.Name, Generation: formatGeneration(t.gens[i])})
	}
	return snapshot{ver: t.stateVer, p: p}
}

func (t *Target) persist(s snapshot) error {
	t.persistMu.Lock()
	defer t.persistMu.Unlock()
	if s.ver <= t.writtenVer {
		return nil
	}
	b, err := json.MarshalIndent(&s.p, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(t.statePath, b); err != nil {
		return fmt.Errorf("save stream state: %w", err)
	}
	t.writtenVer = s.ver
	return nil
}

// persistRUEvery spaces saves of recoverable_until alone: a next run
// started while the process server is away reports an RPO at most this
// much too high.
const persistRUEvery = 10 * time.Second

// persistLoop saves the acknowledged sequence about once a second: a stale
// value only makes the process server's loss check less sharp, while
// sequence numbers are protected by the lease.
func (t *Target) persistLoop() {
	defer t.wg.Done()
	tick := time.NewTicker(persistEvery)
	defer tick.Stop()
	var last uint64
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-tick.C:
		}
		t.mu.Lock()
		// recoverable_until moves on an idle stream too: saved less often.
		ruDue := t.ruHeard && !t.recoverable.Equal(t.savedRU) && time.Since(t.savedRUAt) >= persistRUEvery
		if t.ackedSeq == last && !ruDue || t.thawed != nil { // frozen: the next tick saves
			t.mu.Unlock()
			continue
		}
		last = t.ackedSeq
		snap := t.snapshotLocked()
		t.saving++
		t.mu.Unlock()
		err := t.persist(snap)
		t.mu.Lock()
		t.saving--
		t.cond.Broadcast() // BeforeFreeze
		t.mu.Unlock()
		if err != nil {
			t.log.Error("cannot save the stream state", keyErr, err)
		}
	}
}
