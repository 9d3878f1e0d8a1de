// Package applier keeps the replica page blob of every protected disk up
// to date from the journal segments in the storage account, and cuts and
// prunes recovery points.
//
// For a machine it reads the sealed segments in sequence order (up to the
// manifest's durable_seq, or further when told so by the ingest side),
// authenticates each one completely before applying any of it, and writes
// its records into layout.DiskName page blobs: overlapping records are
// settled in memory, adjacent ones coalesced, and the resulting Put Page
// (≤ 4 MiB, 512-byte aligned) and Clear Page calls run Parallelism at a
// time (see flush.go). After each segment it records the progress in the
// page blobs' metadata (applied_seq, generation) and in the manifest.
//
// Recovery points are snapshots of every disk of the machine taken at a
// marker, with the metadata of recovery.PointMetadata: at every
// app-consistent marker, and at the first time or crash-consistent
// marker PointInterval (by marker time) after the previous point.
// Retention deletes snapshots older than Retention (never a disk's newest)
// and the segments no kept point needs.
//
// # Crash safety
//
// A disk's applied_seq is written only after every record of the segment
// up to it is in the blob. After a crash the applier resumes from the
// lowest applied_seq of the machine's disks and skips, per disk, the
// records at or below that disk's applied_seq. Re-applying records that
// were already (partly) written is harmless: applying records r_k…r_n in
// order to any state reached while applying them yields the state after
// r_n. Points are only cut at markers no disk has gone past, and not
// again at a sequence that already has a point, so a replay never
// snapshots a disk holding later writes. A disk's new generation is
// applied from the manifest's generation_start: records before it go to
// the old replica, and the blob is recreated empty (applied_seq start-1)
// when replay reaches the start; a replica that restarted there is never
// snapshotted for an earlier sequence.
//
// # Disk indices
//
// A record's Disk is an index into the manifest's Disks. The ingest side
// must keep that list append-only (never reorder or remove an entry),
// since old segments keep their indices; the applier refuses to run if it
// sees a disk change places.
package applier

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Log attribute keys.
const (
	logKeyMachine = "machine"
	logKeyDisk    = "disk"
	logKeySegment = "segment"
	logKeySeq     = "seq"
	logKeyKind    = "kind"
	logKeyErr     = "err"
	logKeyWrites  = "writes"
	logKeyClears  = "clears"
	logKeyReads   = "reads"
	logKeyBytes   = "bytes"
	logKeyRecords = "records"
	logKeyWait    = "retry_in"
	logKeyCount   = "count"
)

// Defaults of Config.
const (
	DefaultPointInterval = 5 * time.Minute
	DefaultRetention     = 24 * time.Hour
	DefaultParallelism   = 4
	DefaultPollInterval  = 30 * time.Second
)

// Config configures an Applier. Store and Keys are required.
type Config struct {
	// Store is the container (wrap it with blobstore.Stack for retries).
	Store blobstore.Store
	// Keys returns the keyring that opens machine's segments, e.g.
	// RecoveryKeys. It is called once per machine, and again when a segment
	// names a key the keyring lacks (key rotation).
	Keys func(ctx context.Context, machine string) (seal.Keyring, error)
	// Logger (nil: discard).
	Logger *slog.Logger
	// PointInterval spaces crash-consistent recovery points (default 5 min).
	PointInterval time.Duration
	// Retention: snapshots older than this are deleted (default 24 h;
	// negative: keep everything).
	Retention time.Duration
	// Parallelism bounds concurrent page blob calls per disk (default 4).
	Parallelism int
	// UpdateManifest, if set, performs the manifest read-modify-write
	// (update is given the current manifest and changes only applied_seq
	// and journal_from).
	// The process server routes the ingest side's manifest writes and
	// this through one serialised writer per machine. Nil: the applier
	// reads the manifest, sets applied_seq and writes it back itself, on
	// the condition that it is still the version read (PutBlobIf), and
	// starts over on a conflict.
	UpdateManifest func(ctx context.Context, machine string, update func(*layout.Manifest)) error
	// Local, when set, returns the plaintext of a journal segment from a
	// local copy (the process server's cache, which uploaded it), so that
	// applying does not download and decrypt what was just uploaded. It
	// reports false when it has no copy; the applier then reads the
	// account. It appends the plaintext to dst and returns it: the applier
	// reuses that memory from segment to segment (a fresh 8 MiB buffer per
	// segment cost more in page faults and zeroing than the decryption),
	// so Local must not keep or share the slice it returns, and may have
	// written into dst's spare capacity even when it reports false.
	Local func(name string, dst []byte) ([]byte, bool)
	// Yield, if set, is called before each apply pass (Run) and before
	// each segment of a pass after its first, until those calls have
	// taken 2 s in the pass. It may block for a
	// while when the account's bandwidth is better spent elsewhere: the
	// process server holds passes back while journal uploads are behind,
	// so that under overload apply lag grows before RPO does.
	Yield func(ctx context.Context)
	// ReplicaLost, if set, is told when the replica page blob of the
	// current generation of a disk has gone missing after records were
	// applied to it (and again at each load of the disk while it stays
	// so): the process server then ends the agent's session streaming
	// that generation, and the next hello sees the blob marked
	// layout.MetaLost and asks for a full sync. It must not block.
	ReplicaLost func(machine, disk, generation string)
	// Fence, if set, returns the fence machine's replicas are claimed and
	// written under (blobstore.WithFence): the process server's claim of
	// the machine (layout.Manifest.Claim of its last write). It is given
	// the manifest the pass read, which may show another server's
	// claim. An error (one that blobstore.NewerFence reports when
	// another server claimed the machine) fails the pass. Nil: the
	// manifest's claim (a lone applier).
	Fence func(ctx context.Context, machine string, man *layout.Manifest) (int64, error)
	// Fenced, if set, is told when a pass under fence n met a newer
	// writer (blobstore.NewerFence): a replica claimed above n, by
	// another process server's claim of the machine. It is called from
	// the pass, which holds the machine: it must not wait for the
	// applier.
	Fenced func(machine string, n int64, err error)
	// PollInterval: how often Run looks for new segments without being
	// notified (default 30 s).
	PollInterval time.Duration
	// Now is the clock for retention, which ages points by when they were
	// cut (default time.Now).
	Now func() time.Time
}

// RecoveryKeys returns a Config.Keys that unwraps machines' data keys from
// the account with the recovery key.
func RecoveryKeys(store blobstore.Store, recoveryKey []byte) func(context.Context, string) (seal.Keyring, error) {
	return func(ctx context.Context, machine string) (seal.Keyring, error) {
		return recovery.Keyring(ctx, store, machine, recoveryKey)
	}
}

// loadKeys (re)reads m's keyring. Key blobs it had to skip are logged:
// what is sealed under them will not open.
func (a *Applier) loadKeys(ctx context.Context, m *machine) error {
	keys, err := a.cfg.Keys(ctx, m.name)
	if err != nil {
		return fmt.Errorf("data keys of machine %q: %w", m.name, err)
	}
	if k, ok := keys.(recovery.Keys); ok {
		for _, err := range k.Skipped {
			a.log.Warn("skipped a data key that does not unwrap", logKeyMachine, m.name, logKeyErr, err)
		}
	}
	m.keys = keys
	return nil
}

// Applier applies journal segments to replica page blobs. It is safe for
// concurrent use; work on one machine is serialised.
type Applier struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	machines map[string]*machine
}

// New returns an Applier for cfg.
func New(cfg Config) (*Applier, error) {
	if cfg.Store == nil || cfg.Keys == nil {
		return nil, errors.New("applier: Store and Keys are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.PointInterval <= 0 {
		cfg.PointInterval = DefaultPointInterval
	}
	if cfg.Retention == 0 {
		cfg.Retention = DefaultRetention
	}
	if cfg.Parallelism <= 0 {
		cfg.Parallelism = DefaultParallelism
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Applier{cfg: cfg, log: cfg.Logger, machines: map[string]*machine{}}, nil
}

// machine is the applier's state for one machine; mu serialises Apply.
type machine struct {
	mu   sync.Mutex
	name string
	keys seal.Keyring
	// fence: the replicas are claimed under it (while loaded).
	fence int64

	loaded    bool
	disks     []*disk
	lastPoint uint64       // seq of the newest point
	lastKind  string       // and its kind
	gaps      []layout.Gap // the manifest's, as of the last applyLocked
	keyID     string       // the manifest's data key, which seals point records
	chain     uint64       // the journal is known complete up to here (segment headers)
	stale     recovery.StaleFilter
	pointTime time.Time // its marker time (or the anchor before the first point)
	// cursor is the name of the last segment applied in this process, so
	// that a segment ending exactly at the resume sequence (possible for
	// marker-only segments) is read once, not on every pass.
	cursor    string
	lastPrune time.Time
	// records are the point records retention has opened, by name: the
	// snapshots they name are the points it may keep as newest or base.
	records map[string]recovery.PointRecord
	// pruneFrom is the first sequence of the oldest segment the last
	// prune kept (0: unknown), where the next one starts listing.
	pruneFrom uint64
	// nextStart is the lowest start of a generation some disk has not
	// switched to yet (MaxUint64: none).
	nextStart uint64

	dec   recovery.Decoder
	plain []byte
	res   resolver
}

// disk is one replica page blob.
type disk struct {
	name    string
	blob    string
	gen     string
	size    uint64 // disk size; the blob is rounded up to whole pages
	applied uint64
	// floor: the blob restarted from zeros at this sequence, replacing an
	// earlier generation, so it is not the disk at any sequence before it
	// (0: it is, a disk reads as zeros before its first generation).
	floor uint64
	// start is the first sequence of the blob's generation (0: unknown):
	// while applied < start, none of its records is applied, and the blob
	// is the zeros it was created as.
	start uint64
	// lost: the blob went missing and was recreated empty; it is not the
	// disk at any sequence until the next generation replaces it.
	lost bool
	// next are the disk's newer generations in the manifest, oldest first:
	// the blob is recreated for each when the journal reaches its start,
	// so that the records before it still go to the old replica.
	next []layout.Generation
	ops  []pendingOp // queued records, in sequence order
	// anchor: the machine's pointTime as of applied, from the blob's
	// metadata (unix nanos; 0 none), for loadPoints.
	anchor int64
	// writingTo: a flush may write records up to it (metadata writing_to,
	// recorded before the flush: with the applied_seq of the segment
	// before, or on its own); written is the value loaded with the blob:
	// past applied, its pages may hold records up to it, so no point below
	// it may be cut from them.
	writingTo, written uint64
	// born is the start of the disk's first generation (0: unknown): a
	// point before it has no snapshot of the disk, which was not there.
	born uint64
}

func (a *Applier) machine(name string) *machine {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.machines[name]
	if m == nil {
		m = &machine{name: name}
		a.machines[name] = m
	}
	return m
}

// Apply applies every segment of machine up to the manifest's durable_seq
// and returns the sequence up to which every disk of the machine is now
// applied. It stops at the first segment it cannot apply — one that fails
// authentication (the error wraps recovery.ErrTampered and names the blob),
// is malformed, or a store error — having applied none of that segment's
// records, and leaves everything before it applied.
func (a *Applier) Apply(ctx context.Context, machine string) (uint64, error) {
	return a.apply(ctx, machine, 0)
}

// apply is Apply, also applying segments up to durable when that is
// beyond the manifest's durable_seq (the ingest side may notify before it
// rewrites the manifest).
func (a *Applier) apply(ctx context.Context, name string, durable uint64) (uint64, error) {
	if err := layout.CheckName("machine", name); err != nil {
		return 0, err
	}
	m := a.machine(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	applied, err := a.applyLocked(ctx, m, durable)
	if err != nil {
		// Reload everything from the account next time: a failed call may
		// have left the in-memory view ahead of or behind the blobs, and
		// records of the failed segment queued for other disks.
		m.forget()
		if blobstore.NewerFence(err) && a.cfg.Fenced != nil && ctx.Err() == nil {
			a.cfg.Fenced(name, m.fence, err)
		}
	}
	return applied, err
}

// Forget drops what the Applier knows of machine: the next pass reads it
// all from the account again. For a machine another process server has
// applied meanwhile (served here again after a fence), the replicas and
// points have moved past this view.
func (a *Applier) Forget(name string) {
	m := a.machine(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forget()
}

func (m *machine) forget() {
	m.loaded, m.cursor, m.disks, m.pruneFrom = false, "", nil, 0
	m.pointTime = time.Time{} // not to be stamped on a blob recreated before loadPoints
}

func (a *Applier) applyLocked(ctx context.Context, m *machine, durable uint64) (uint64, error) {
	man, err := recovery.ReadManifest(ctx, a.cfg.Store, m.name)
	if err != nil {
		return 0, err
	}
	if m.keys == nil {
		if err := a.loadKeys(ctx, m); err != nil {
			return 0, err
		}
	}
	if err := recovery.VerifyManifest(man, m.keys); errors.Is(err, seal.ErrUnknownKey) {
		// Sealed under a key created after we loaded the keyring.
		if err := a.loadKeys(ctx, m); err != nil {
			return 0, err
		}
		if err := recovery.VerifyManifest(man, m.keys); err != nil {
			return 0, err
		}
	} else if err != nil {
		return 0, err
	}
	fence, err := a.fenceOf(ctx, m.name, man)
	if fence != m.fence {
		m.forget() // loadDisk claims every replica again
		m.fence = fence
	}
	if err != nil {
		return 0, err
	}
	ctx = blobstore.WithFence(ctx, fence)
	limit := max(man.DurableSeq, durable)
	m.gaps, m.keyID = man.Gaps, man.KeyID
	m.stale.Gaps = man.Gaps
	if err := a.syncDisks(ctx, m, man); err != nil {
		return 0, err
	}
	if !m.loaded {
		if err := a.loadPoints(ctx, m); err != nil {
			return 0, err
		}
		m.loaded = true
		m.chain = m.applied() // where resume starts: each disk's applied ends a segment
		// What was skipped is read again, and judged again.
		m.stale = recovery.StaleFilter{Gaps: man.Gaps}
	}
	// Past the cursor only: segments sort by name, and names by first
	// sequence. Listing the whole journal each pass grew with retention.
	var segs []recovery.Segment
	if first, _, perr := layout.ParseSegmentName(m.cursor); m.cursor != "" && perr == nil {
		segs, err = recovery.ListSegmentsFrom(ctx, a.cfg.Store, m.name, first, limit)
	} else {
		segs, err = recovery.ListSegments(ctx, a.cfg.Store, m.name)
	}
	if err != nil {
		return 0, err
	}
	resume := m.applied()
	n := 0
	var yielded time.Duration
	whole := true // every listed segment up to limit was read
	for i, s := range segs {
		if (m.cursor != "" && s.Name <= m.cursor) || s.Last < resume {
			continue
		}
		if s.Last > limit {
			whole = false
			break
		}
		// The last sequence of the segment after it, for its writing_to
		// to be recorded with this one's applied_seq: then a failure
		// before the next is flushed keeps the points in it from being
		// cut (they come with the next marker due, but for app-consistent
		// ones: recorded at the next's flush then).
		var next uint64
		if i+1 < len(segs) && segs[i+1].Last <= limit && !segs[i+1].App {
			next = segs[i+1].Last
		}
		if n++; n > 1 && a.cfg.Yield != nil && yielded < passYieldMax {
			// A pass far behind takes a while: journal uploads that
			// fall behind meanwhile go first here too, for a bounded
			// time, so that the replica still advances under overload.
			t0 := time.Now()
			a.cfg.Yield(ctx)
			yielded += time.Since(t0)
		}
		err := a.applySegment(ctx, m, s, next)
		if errors.Is(err, errStale) {
			m.cursor = s.Name // the chain stays: the next must follow what came before
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				// Retention still runs: a point that cannot be cut
				// (the service's cap on snapshots per blob) may need
				// the room its aged points take.
				a.pruneLogged(ctx, m)
			}
			return m.applied(), err
		}
		m.cursor = s.Name
		m.chain = max(m.chain, s.Last)
	}
	if whole && m.chain < man.DurableSeq {
		// As recover refuses it: durable_seq only ever ends an uploaded
		// segment or tombstone, so the chain stopping short of it (no
		// segment past it, or only skipped ones) means what holds the
		// journal's next records is missing. Waiting would hang every
		// checksum resync on the replica.
		return m.applied(), fmt.Errorf("journal of machine %q is incomplete: the segments chained from the replicas end at sequence %d, before durable_seq %d (a deleted segment or tombstone?): %w",
			m.name, m.chain, man.DurableSeq, recovery.ErrTampered)
	}
	a.pruneLogged(ctx, m)
	return m.applied(), nil
}

// pruneLogged runs retention for m; pruning late is harmless, so a
// failure is logged and applying goes on.
func (a *Applier) pruneLogged(ctx context.Context, m *machine) {
	if err := a.prune(ctx, m); err != nil {
		a.log.Warn("retention failed", logKeyMachine, m.name, logKeyErr, err)
	}
}

// fenceOf returns the fence to write machine's replicas under (see
// Config.Fence).
func (a *Applier) fenceOf(ctx context.Context, machine string, man *layout.Manifest) (int64, error) {
	if a.cfg.Fence == nil {
		return man.Claim, nil
	}
	n, err := a.cfg.Fence(ctx, machine, man)
	if err != nil {
		return n, fmt.Errorf("fence of machine %q: %w", machine, err)
	}
	return n, nil
}

// errStale: applySegment skipped a segment of a history the journal gave
// up (recovery.StaleFilter).
var errStale = errors.New("stale journal segment")

// passYieldMax bounds the time a pass spends in Config.Yield between its
// segments.
const passYieldMax = 2 * time.Second

// applied is the sequence every disk of m has applied.
func (m *machine) applied() uint64 {
	if len(m.disks) == 0 {
		return 0
	}
	lo := m.disks[0].applied
	for _, d := range m.disks[1:] {
		lo = min(lo, d.applied)
	}
	return lo
}

// maxApplied is the highest applied sequence of m's disks that applied
// records of their generation: a disk added while the applier lags starts
// with applied just below its generation's start, and its zeros are the
// disk at every earlier marker still to apply, which must get points.
func (m *machine) maxApplied() uint64 {
	var hi uint64
	for _, d := range m.disks {
		if d.applied >= d.start {
			hi = max(hi, d.applied)
		}
	}
	return hi
}

// maxWritten is maxApplied counting what flushes of an earlier pass may
// have written (as loaded): the pages of a replica may hold records up to
// it.
func (m *machine) maxWritten() uint64 {
	hi := m.maxApplied()
	for _, d := range m.disks {
		if d.written >= d.start {
			hi = max(hi, d.written)
		}
	}
	return hi
}

func roundUp(n uint64) int64 { return int64((n + pageSize - 1) &^ (pageSize - 1)) }

func diskMetadata(d *disk, anchor time.Time) blobstore.Metadata {
	md := blobstore.Metadata{layout.MetaAppliedSeq: strconv.FormatUint(d.applied, 10), layout.MetaGeneration: d.gen}
	if d.writingTo > d.applied {
		md[layout.MetaWritingTo] = strconv.FormatUint(d.writingTo, 10)
	}
	if !anchor.IsZero() {
		md[layout.MetaPointAnchor] = strconv.FormatInt(anchor.UnixNano(), 10)
	}
	if d.lost {
		md[layout.MetaLost] = "true"
	}
	return md
}

// syncDisks makes m.disks match the manifest: it creates the page blob of
// a new disk, grows it when the disk grew, loads applied_seq, and notes
// the newer generations the journal has yet to reach (applyGenerations
// recreates the blob for each at its start).
func (a *Applier) syncDisks(ctx context.Context, m *machine, man *layout.Manifest) error {
	if len(man.Disks) < len(m.disks) {
		return fmt.Errorf("manifest of machine %q lists %d disks, %d before: disks must never be removed from it (journal records refer to them by index)",
			m.name, len(man.Disks), len(m.disks))
	}
	for i := range man.Disks {
		md := &man.Disks[i]
		gens := md.Generations()
		if i < len(m.disks) {
			cur := m.disks[i]
			if cur.name != md.Name {
				return fmt.Errorf("manifest of machine %q has disk %q at index %d, where %q was: refusing to apply records to the wrong disk",
					m.name, md.Name, i, cur.name)
			}
			if k := genIndex(gens, cur.gen); k >= 0 && (k < len(gens)-1 || cur.size == md.Size) {
				cur.next = gens[k+1:]
				continue
			}
		}
		if err := layout.CheckName("disk", md.Name); err != nil {
			return fmt.Errorf("manifest of machine %q: %w", m.name, err)
		}
		d, err := a.loadDisk(ctx, m, man, md, gens)
		if err != nil {
			return err
		}
		d.born = gens[0].Start
		if i < len(m.disks) {
			m.disks[i] = d
		} else {
			m.disks = append(m.disks, d)
		}
	}
	m.nextStart = nextStart(m.disks)
	return nil
}

// genIndex is the index of generation gen in gens, or -1.
func genIndex(gens []layout.Generation, gen string) int {
	for k := len(gens) - 1; k >= 0; k-- {
		if gens[k].Generation == gen {
			return k
		}
	}
	return -1
}

// loadDisk reads the state of md's replica page blob, creating it if
// missing.
func (a *Applier) loadDisk(ctx context.Context, m *machine, man *layout.Manifest, md *layout.Disk, gens []layout.Generation) (*disk, error) {
	d := &disk{name: md.Name, blob: layout.DiskName(m.name, md.Name)}
	info, err := a.claimStat(ctx, d.blob)
	switch {
	case err == nil && info.Kind == blobstore.PageBlob:
		d.gen, d.lost = info.Metadata[layout.MetaGeneration], info.Metadata[layout.MetaLost] == "true"
		d.applied, _ = strconv.ParseUint(info.Metadata[layout.MetaAppliedSeq], 10, 64)
		d.anchor, _ = strconv.ParseInt(info.Metadata[layout.MetaPointAnchor], 10, 64)
		d.written, _ = strconv.ParseUint(info.Metadata[layout.MetaWritingTo], 10, 64)
		d.writingTo = d.written
		k := genIndex(gens, d.gen)
		if k < 0 {
			// A generation the manifest does not list (one written
			// before generations were recorded): the blob holds the
			// records up to applied_seq; the generations starting after
			// that follow, else the current one replaces it at once.
			d.size = uint64(info.Size)
			for k = 0; k < len(gens) && gens[k].Start <= d.applied; k++ {
			}
			if k == len(gens) {
				k = len(gens) - 1
				d.next = gens[k:]
				if err := a.switchGeneration(ctx, m, d); err != nil {
					return nil, err
				}
				return d, nil
			}
			d.next = gens[k:]
			return d, nil
		}
		g := gens[k]
		d.size, d.next, d.start = g.Size, gens[k+1:], g.Start
		if k > 0 {
			d.floor = g.Start
		}
		if k == len(gens)-1 && info.Size < roundUp(g.Size) {
			if err := a.cfg.Store.ResizePageBlob(ctx, d.blob, roundUp(g.Size)); err != nil {
				return nil, fmt.Errorf("grow replica of disk %q of machine %q: %w", md.Name, m.name, err)
			}
		}
		if d.lost && k == len(gens)-1 && a.cfg.ReplicaLost != nil {
			// Found lost by an earlier run, and no full sync agreed
			// since: a session that resumed without seeing it (the
			// account did not answer its hello's check) must end.
			a.cfg.ReplicaLost(m.name, md.Name, d.gen)
		}
		return d, nil
	case err == nil || blobstore.IsNotFound(err):
	default:
		return nil, fmt.Errorf("replica of disk %q of machine %q: %w", md.Name, m.name, err)
	}
	// No replica (or not a page blob): the next records to apply are
	// those after the manifest's applied_seq.
	applied := man.AppliedSeq
	k := md.GenerationAt(applied + 1)
	g := gens[k]
	d.gen, d.size, d.next, d.applied, d.start = g.Generation, g.Size, gens[k+1:], applied, g.Start
	if k > 0 {
		d.floor = g.Start
	}
	reason := "new disk"
	if applied > 0 && applied >= g.Start {
		// Records of this generation were applied to a blob that is now
		// gone: what is left of the journal cannot rebuild it.
		d.lost, reason = true, "replica missing"
	} else if g.Start > 0 {
		d.applied = g.Start - 1
	}
	if err := a.cfg.Store.CreatePageBlob(ctx, d.blob, roundUp(d.size), diskMetadata(d, m.pointTime)); err != nil {
		return nil, fmt.Errorf("create replica of disk %q of machine %q: %w", md.Name, m.name, err)
	}
	a.log.Info("created replica page blob", logKeyMachine, m.name, logKeyDisk, md.Name, "reason", reason, "size", roundUp(d.size))
	if d.lost {
		if len(d.next) > 0 {
			a.log.Warn("replica page blob missing; no recovery points until its next generation starts",
				logKeyMachine, m.name, logKeyDisk, md.Name, logKeySeq, d.next[0].Start)
		} else {
			a.log.Error("replica page blob missing; asking the agent for a full sync",
				logKeyMachine, m.name, logKeyDisk, md.Name)
			if a.cfg.ReplicaLost != nil {
				a.cfg.ReplicaLost(m.name, md.Name, d.gen)
			}
		}
	}
	return d, nil
}

// claimStat claims page blob name under ctx's fence, then reads its
// properties: whatever an earlier writer did lands before the claim and
// shows, and nothing of its lands after. A missing blob, or one not a
// page blob, is for the caller to (re)create under the fence.
func (a *Applier) claimStat(ctx context.Context, name string) (blobstore.BlobInfo, error) {
	n, fenced := blobstore.FenceOf(ctx)
	for try := 0; ; try++ {
		var claimed bool
		if fenced {
			err := a.cfg.Store.ClaimPageBlob(ctx, name, n)
			if err != nil && !blobstore.IsNotFound(err) && !errors.Is(err, blobstore.ErrInvalid) {
				return blobstore.BlobInfo{}, fmt.Errorf("claim replica %s: %w", name, err)
			}
			claimed = err == nil
		}
		info, err := a.cfg.Store.Stat(ctx, name)
		if !fenced || claimed || err != nil || info.Kind != blobstore.PageBlob || try == 2 {
			return info, err
		}
		// Created since the claim found none (by an older writer, say):
		// claimed now, or found claimed by a newer one.
	}
}

// nextStart is the lowest start of a generation some disk has yet to
// switch to, or MaxUint64.
func nextStart(disks []*disk) uint64 {
	lo := uint64(math.MaxUint64)
	for _, d := range disks {
		if len(d.next) > 0 {
			lo = min(lo, d.next[0].Start)
		}
	}
	return lo
}

// applyGenerations recreates, from zeros, the replica of every disk whose
// next generation starts at or before seq, once its queued records (of
// the old generation) are written.
func (a *Applier) applyGenerations(ctx context.Context, m *machine, seq uint64, segment string) error {
	for _, d := range m.disks {
		for len(d.next) > 0 && d.next[0].Start <= seq {
			if err := a.flushDisk(ctx, m, d, segment, seq); err != nil {
				return err
			}
			if err := a.switchGeneration(ctx, m, d); err != nil {
				return err
			}
		}
	}
	m.nextStart = nextStart(m.disks)
	return nil
}

// switchGeneration recreates d's blob, empty, for its next generation,
// which holds the records from its start.
func (a *Applier) switchGeneration(ctx context.Context, m *machine, d *disk) error {
	g := d.next[0]
	d.gen, d.size, d.lost, d.floor, d.start, d.next = g.Generation, g.Size, false, g.Start, g.Start, d.next[1:]
	d.writingTo, d.written = 0, 0 // a new blob
	if g.Start > 0 {
		d.applied = g.Start - 1
	}
	if err := a.cfg.Store.CreatePageBlob(ctx, d.blob, roundUp(g.Size), diskMetadata(d, m.pointTime)); err != nil {
		return fmt.Errorf("recreate replica of disk %q of machine %q for its new generation: %w", d.name, m.name, err)
	}
	a.log.Info("created replica page blob", logKeyMachine, m.name, logKeyDisk, d.name, "reason", "new generation",
		logKeySeq, g.Start, "size", roundUp(g.Size))
	return nil
}

// sizeAt is the size of d in the generation of record seq.
func (d *disk) sizeAt(seq uint64) uint64 {
	size := d.size
	for _, g := range d.next {
		if g.Start > seq {
			break
		}
		size = g.Size
	}
	return size
}

// pointable reports whether a point can be cut at seq: not inside a gap,
// every disk's blob the disk there, but for the disks a gap's mending
// left out (their blobs lack the lost writes; the point leaves them out,
// see leftOut), and at least one disk in it.
func (m *machine) pointable(seq uint64) bool {
	if _, gap := layout.GapAt(m.gaps, seq); gap {
		return false
	}
	in := 0
	for _, d := range m.disks {
		if m.leftOut(d, seq) {
			continue // whatever its blob holds (recreated empty, say)
		}
		if d.lost || seq < d.floor {
			return false
		}
		in++
	}
	return in > 0
}

// leftOut reports whether a point at seq leaves d out: a gap's mending
// left it out (not protected at the time, say) and its full sync has not
// come yet. Such a disk may never come back: waiting for it would cut no
// point of the others, and retention could prune nothing.
func (m *machine) leftOut(d *disk, seq uint64) bool {
	_, gap := layout.DiskGapAt(m.gaps, d.name, seq)
	return gap
}

// loadPoints finds the newest recovery point, which decides when the next
// crash-consistent point is due and which markers already have one.
func (a *Applier) loadPoints(ctx context.Context, m *machine) error {
	names := make([]string, len(m.disks))
	for i, d := range m.disks {
		names[i] = d.name
	}
	points, err := recovery.ListPoints(ctx, a.cfg.Store, m.name, names)
	if err != nil {
		return err
	}
	recorded, err := recovery.ListPointRecords(ctx, a.cfg.Store, m.name)
	if err != nil {
		return err
	}
	// Only a point with a snapshot of every disk it does not leave out
	// (nor precedes) and its sealed record counts: if a crash or an error came before
	// the record was written, replaying its segment cuts it again (the
	// disks are still at its marker, and a second snapshot of the same
	// point is identical to the first; recover takes the one the record
	// names).
	m.lastPoint, m.pointTime, m.lastKind = 0, time.Time{}, ""
	for _, p := range points {
		kinds := recorded[p.Seq]
		kind := recovery.KindCrash
		if slices.Contains(kinds, recovery.KindApp) {
			kind = recovery.KindApp // the state is the same: app wins
		}
		whole := true
		for _, d := range m.disks {
			if p.Snapshots[d.name] == "" && !m.leftOut(d, p.Seq) && p.Seq >= d.born {
				whole = false
			}
		}
		if whole && len(kinds) > 0 {
			m.lastPoint, m.pointTime, m.lastKind = p.Seq, p.Time, kind
		}
	}
	if m.pointTime.IsZero() {
		// No recorded point: the anchor the last pass timed points from,
		// as of where this one resumes. A segment applied again must get
		// the points it got then, no other: a pass that failed after its
		// last flush left the blobs past the segment's markers, and a point
		// cut at one of them now would hold later writes. (Taken afresh
		// from the first marker, a later anchor made a marker dated back
		// by a clock step due only the second time.)
		floor := m.maxApplied()
		for _, d := range m.disks {
			if d.applied == floor && d.applied >= d.start && !d.lost && d.anchor != 0 {
				m.pointTime = time.Unix(0, d.anchor).UTC()
			}
		}
	}
	return nil
}

func (a *Applier) local(name string, dst []byte) ([]byte, bool) {
	if a.cfg.Local == nil {
		return nil, false
	}
	return a.cfg.Local(name, dst)
}

// applySegment applies one segment: authenticate and decode all of it,
// then apply its records, cutting points at markers, then record progress.
func (a *Applier) applySegment(ctx context.Context, m *machine, s recovery.Segment, next uint64) error {
	var plain []byte
	var err error
	if local, ok := a.local(s.Name, m.plain[:0]); ok {
		plain = local
		m.plain = plain
	} else {
		plain, err = recovery.ReadSegment(ctx, a.cfg.Store, s.Name, m.keys, m.plain[:0])
		m.plain = plain
	}
	if errors.Is(err, seal.ErrUnknownKey) {
		// Sealed under a key created after we loaded the keyring.
		if err := a.loadKeys(ctx, m); err != nil {
			return err
		}
		plain, err = recovery.ReadSegment(ctx, a.cfg.Store, s.Name, m.keys, m.plain[:0])
		m.plain = plain
	}
	if err != nil {
		return err
	}
	recs, err := m.dec.Decode(plain)
	if err != nil {
		return fmt.Errorf("journal segment %s: %w", s.Name, err)
	}
	if prev, ok := m.dec.Prev(); m.stale.Skip(s.Last, recs, prev, ok, m.chain) {
		a.log.Warn("skipping a journal segment of a history the journal gave up (a process server that no longer served the machine wrote it), or one that follows a missing segment",
			logKeyMachine, m.name, logKeySegment, s.Name)
		return errStale
	}
	// Applying across a missing segment would make a replica, and points,
	// without its writes: stop and say so. (A segment lost before the
	// journal is there as a tombstone, and its gap is recorded.)
	if prev, ok := m.dec.Prev(); ok && prev > m.chain {
		return fmt.Errorf("journal segment %s follows a segment ending at sequence %d, which is missing from the account (the journal holds nothing between %d and %d): %w",
			s.Name, prev, m.chain, s.First, recovery.ErrTampered)
	}
	// Check every record before applying any, so that a bad segment is
	// not half applied.
	for i := range recs {
		r := &recs[i]
		if r.Op == wire.OpMarker {
			continue
		}
		if int(r.Disk) >= len(m.disks) {
			return fmt.Errorf("journal segment %s: record %d is for disk index %d, but the manifest lists %d disks", s.Name, r.Seq, r.Disk, len(m.disks))
		}
		// Records already applied are skipped below; those of an older,
		// larger generation may lie beyond the current size.
		if d := m.disks[r.Disk]; r.Seq > d.applied && r.Offset+uint64(r.Length) > d.sizeAt(r.Seq) {
			return fmt.Errorf("journal segment %s: record %d: %s of [%d, %d) is beyond the %d bytes of disk %q",
				s.Name, r.Seq, r.Op, r.Offset, r.Offset+uint64(r.Length), d.sizeAt(r.Seq), d.name)
		}
	}
	// No point below what the replicas may hold already: a pass that
	// failed past a flush (a crash, a stop, a fence) left their pages
	// ahead of applied_seq, and this one may find other markers due (a
	// changed --point-interval, another process server's).
	floor := m.maxWritten()
	n := 0
	for i := range recs {
		r := &recs[i]
		if r.Seq >= m.nextStart {
			if err := a.applyGenerations(ctx, m, r.Seq, s.Name); err != nil {
				return err
			}
		}
		if r.Op == wire.OpMarker {
			if !r.Dates() {
				continue // withdrawn by the agent: no point
			}
			mk := r.Marker()
			// No point where the journal lacks acknowledged records:
			// the replicas are not the disks there.
			// An app-consistent marker at the sequence of a crash
			// point (the freeze wrote nothing) makes it app-consistent.
			kind, due := a.pointDue(m, mk)
			later := mk.Seq > m.lastPoint || mk.Seq == m.lastPoint && kind == recovery.KindApp && m.lastKind != recovery.KindApp
			if due && later && mk.Seq >= floor && m.pointable(mk.Seq) {
				if err := a.flush(ctx, m, s.Name, mk.Seq); err != nil {
					return err
				}
				if err := a.cutPoint(ctx, m, mk, kind); err != nil {
					return err
				}
			}
			continue
		}
		d := m.disks[r.Disk]
		if r.Seq <= d.applied {
			continue
		}
		op := pendingOp{off: int64(r.Offset), end: int64(r.Offset) + int64(r.Length)}
		if r.Op == wire.OpWrite {
			op.data = r.Data
		}
		d.ops = append(d.ops, op)
		n++
	}
	if err := a.flush(ctx, m, s.Name, s.Last); err != nil {
		return err
	}
	if s.Last >= m.nextStart {
		if err := a.applyGenerations(ctx, m, s.Last, s.Name); err != nil {
			return err
		}
	}
	for _, d := range m.disks {
		d.applied = max(d.applied, s.Last)
		// The next segment's flushes, recorded with this one's end: one
		// metadata write a segment, not two.
		d.writingTo = max(d.writingTo, next)
		if err := a.cfg.Store.SetMetadata(ctx, d.blob, diskMetadata(d, m.pointTime)); err != nil {
			return fmt.Errorf("record applied_seq of %s: %w", d.blob, err)
		}
		d.anchor = 0 // as written
		if !m.pointTime.IsZero() {
			d.anchor = m.pointTime.UnixNano()
		}
	}
	applied := m.applied()
	if err := a.updateManifest(ctx, m.name, func(man *layout.Manifest) { man.AppliedSeq = max(man.AppliedSeq, applied) }); err != nil {
		return err
	}
	a.log.Debug("applied segment", logKeyMachine, m.name, logKeySegment, s.Name, logKeyRecords, n)
	return nil
}

// pointDue says whether a point should be cut at mk, and of which kind.
func (a *Applier) pointDue(m *machine, mk wire.Marker) (string, bool) {
	t := time.Unix(0, mk.UnixNano).UTC()
	if mk.Kind == wire.MarkerAppConsistent {
		return recovery.KindApp, true
	}
	if m.pointTime.IsZero() {
		// No point yet: the first crash-consistent point comes one interval
		// after the first marker, not in the middle of the initial sync.
		m.pointTime = t
		return "", false
	}
	// A marker dated before the last point: the agent's clock stepped
	// back (a clock set too far ahead, then corrected). Waiting for it to
	// catch up would cut no point for as long, so the step counts as due.
	return recovery.KindCrash, t.Before(m.pointTime) || t.Sub(m.pointTime) >= a.cfg.PointInterval
}

// flush writes the queued records of every disk, all at or before
// sequence upTo.
func (a *Applier) flush(ctx context.Context, m *machine, segment string, upTo uint64) error {
	for _, d := range m.disks {
		if err := a.flushDisk(ctx, m, d, segment, upTo); err != nil {
			return err
		}
	}
	return nil
}

// flushDisk writes the queued records of d, all at or before sequence
// upTo, once d's metadata says that its pages may hold records up to it.
func (a *Applier) flushDisk(ctx context.Context, m *machine, d *disk, segment string, upTo uint64) error {
	if len(d.ops) == 0 {
		return nil
	}
	if upTo > max(d.writingTo, d.applied) {
		d.writingTo = upTo
		var anchor time.Time // as of applied: unchanged
		if d.anchor != 0 {
			anchor = time.Unix(0, d.anchor)
		}
		if err := a.cfg.Store.SetMetadata(ctx, d.blob, diskMetadata(d, anchor)); err != nil {
			return fmt.Errorf("record writing_to of %s: %w", d.blob, err)
		}
	}
	st, err := m.res.flush(ctx, a.cfg.Store, d.blob, d.ops, a.cfg.Parallelism)
	clear(d.ops)
	d.ops = d.ops[:0]
	if err != nil {
		return fmt.Errorf("apply journal segment %s to disk %q: %w", segment, d.name, err)
	}
	a.log.Debug("flushed", logKeyMachine, m.name, logKeyDisk, d.name,
		logKeyWrites, st.writes, logKeyClears, st.clears, logKeyReads, st.reads, logKeyBytes, st.bytes)
	return nil
}

// cutPoint snapshots every disk of m; they all hold exactly the records
// ≤ mk.Seq. Then it writes the point's sealed record (recovery.PointRecord),
// without which recover does not use the snapshots.
func (a *Applier) cutPoint(ctx context.Context, m *machine, mk wire.Marker, kind string) error {
	t := time.Unix(0, mk.UnixNano).UTC()
	cut := a.cfg.Now().UTC().Format(time.RFC3339Nano)
	rec := recovery.PointRecord{Seq: mk.Seq, Time: t, Kind: kind, Snapshots: map[string]recovery.PointSnapshot{}}
	for _, d := range m.disks {
		if m.leftOut(d, mk.Seq) {
			continue
		}
		md := recovery.PointMetadata(mk.Seq, t, kind, d.gen)
		md[layout.MetaCut] = cut
		snap, err := a.cfg.Store.Snapshot(ctx, d.blob, md)
		if err != nil {
			return fmt.Errorf("recovery point at seq %d: snapshot %s: %w", mk.Seq, d.blob, err)
		}
		rec.Snapshots[d.name] = recovery.PointSnapshot{ID: snap.ID, Generation: d.gen}
	}
	// The sealed record makes the snapshots a point recover trusts.
	key, err := a.dataKey(m)
	if err != nil {
		return fmt.Errorf("recovery point at seq %d: %w", mk.Seq, err)
	}
	name, blob, err := recovery.SealPointRecord(m.name, rec, key)
	if err != nil {
		return fmt.Errorf("recovery point at seq %d: %w", mk.Seq, err)
	}
	// Never over a record there already: it was written once every
	// snapshot of its cut existed, at the marker. A segment applied again
	// after a pass that failed past its last flush (the replicas holding
	// later writes) may cut the point again when the disks changed since
	// (a disk added has no snapshot in it): those snapshots go.
	_, err = a.cfg.Store.PutBlobIf(blobstore.Unmetered(ctx), name, blob, nil, "")
	if errors.Is(err, blobstore.ErrConflict) {
		// Ours, if a retry met the write its lost reply was for.
		old, rerr := recovery.ReadPointRecord(ctx, a.cfg.Store, m.keys, m.name, mk.Seq, kind)
		if rerr != nil {
			return fmt.Errorf("recovery point at seq %d: record %s there already: %w", mk.Seq, name, rerr)
		}
		for disk, ps := range rec.Snapshots {
			if old.Snapshots[disk].ID == ps.ID {
				continue
			}
			a.log.Info("recovery point recorded already: its record stands, the snapshot just taken goes", logKeyMachine, m.name, logKeyDisk, disk, logKeySeq, mk.Seq, logKeyKind, kind)
			if err := a.cfg.Store.DeleteSnapshot(ctx, layout.DiskName(m.name, disk), ps.ID); err != nil && !blobstore.IsNotFound(err) {
				a.log.Warn("cannot delete a snapshot taken again for a recorded point; retention deletes it in time", logKeyMachine, m.name, logKeyDisk, disk, logKeySeq, mk.Seq, logKeyErr, err)
			}
		}
	} else if err != nil {
		return fmt.Errorf("recovery point at seq %d: record %s: %w", mk.Seq, name, err)
	}
	m.lastPoint, m.pointTime, m.lastKind = mk.Seq, t, kind
	m.lastPrune = time.Time{} // a new point may let retention delete more
	a.log.Info("recovery point", logKeyMachine, m.name, logKeySeq, mk.Seq, logKeyKind, kind, "time", t)
	return nil
}

// dataKey returns the data key m's manifest names (as of the last pass).
func (a *Applier) dataKey(m *machine) (*seal.Key, error) {
	return keyByID(m.keys, m.name, m.keyID)
}

// sealManifest seals man under the data key it names, from the
// machine's keyring.
func (a *Applier) sealManifest(ctx context.Context, man *layout.Manifest) error {
	keys, err := a.cfg.Keys(ctx, man.Machine)
	if err != nil {
		return fmt.Errorf("data keys of machine %q: %w", man.Machine, err)
	}
	key, err := keyByID(keys, man.Machine, man.KeyID)
	if err != nil {
		return err
	}
	return recovery.SealManifest(man, key)
}

// keyByID returns the key of keys that machine's manifest names by keyID
// (hex).
func keyByID(keys seal.Keyring, machine, keyID string) (*seal.Key, error) {
	var id seal.KeyID
	if b, err := hex.DecodeString(keyID); err != nil || len(b) != len(id) {
		return nil, fmt.Errorf("manifest of machine %q: malformed key_id %q", machine, keyID)
	} else {
		copy(id[:], b)
	}
	key, ok := keys.Lookup(id)
	if !ok {
		return nil, fmt.Errorf("manifest of machine %q names data key %s, which is not in the account", machine, id)
	}
	return key, nil
}

// updateManifest applies change (which raises applied_seq or
// journal_from) to machine's manifest.
func (a *Applier) updateManifest(ctx context.Context, machine string, change func(*layout.Manifest)) error {
	set := func(man *layout.Manifest) {
		change(man)
		man.Updated = a.cfg.Now().UTC()
	}
	if a.cfg.UpdateManifest != nil {
		if err := a.cfg.UpdateManifest(ctx, machine, set); err != nil {
			return fmt.Errorf("update manifest of machine %q: %w", machine, err)
		}
		return nil
	}
	// Conditional on the version read: a concurrent writer's fields are
	// not erased; on a conflict the change is made again on its version.
	for attempt := 1; ; attempt++ {
		err := a.updateManifestOnce(ctx, machine, set)
		if !errors.Is(err, blobstore.ErrConflict) || attempt == 3 {
			return err
		}
	}
}

func (a *Applier) updateManifestOnce(ctx context.Context, machine string, set func(*layout.Manifest)) error {
	info, err := a.cfg.Store.Stat(ctx, layout.ManifestName(machine))
	if err != nil {
		return fmt.Errorf("update manifest of machine %q: %w", machine, err)
	}
	man, err := recovery.ReadManifest(ctx, a.cfg.Store, machine)
	if err != nil {
		return err
	}
	// Sealed again below: what it says must be authentic first, or a
	// manifest changed in the account (its gaps gone) would be vouched
	// for by this seal.
	keys, err := a.cfg.Keys(ctx, machine)
	if err != nil {
		return fmt.Errorf("data keys of machine %q: %w", machine, err)
	}
	if err := recovery.VerifyManifest(man, keys); err != nil {
		return fmt.Errorf("update manifest of machine %q: %w", machine, err)
	}
	before := *man
	set(man)
	if err := a.sealManifest(ctx, man); err != nil {
		return err
	}
	if man.AppliedSeq == before.AppliedSeq && man.JournalFrom == before.JournalFrom {
		return nil
	}
	b, err := layout.MarshalManifest(man)
	if err != nil {
		return err
	}
	if _, err := a.cfg.Store.PutBlobIf(blobstore.Unmetered(ctx), layout.ManifestName(machine), b, nil, info.ETag); err != nil {
		return fmt.Errorf("update manifest of machine %q: %w", machine, err)
	}
	return nil
}
