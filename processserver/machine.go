package processserver

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// segEntry is a segment in the cache.
type segEntry struct {
	id       cache.SegmentID
	size     int64  // 0 until known (segments found at start are read lazily)
	last     uint64 // 0 until known
	uploaded bool
	// suspect: found at start after the newest readable segment, unread
	// (see scanCache).
	suspect bool
	// hot is the segment as cached, kept in memory until applied (nil
	// past hotLimit, or after a restart), so that neither its upload nor
	// the applier need read it back from the cache disks.
	hot *hotSeg
}

// machine is the state of one protected machine: its manifest, data key,
// cached segments and the session of its agent.
type machine struct {
	name string
	s    *Server
	log  *slog.Logger
	wake chan struct{} // uploader has work (capacity 1)

	// Uploads started and not yet published, owned by the uploader's
	// goroutine; each reports on upDone (capacity uploadParallel) when
	// it ends.
	ups    []*upload
	upDone chan *upload
	upWG   sync.WaitGroup // the uploads' goroutines

	takeover sync.Mutex // serialises session replacement
	sess     *session   // current session; guarded by takeover and mu

	manMu    ctxMutex   // serialises loading and manifest writes
	settleMu sync.Mutex // serialises settleSuspects

	// The manifest's version in the account as this server last read or
	// wrote it ("": none), the condition of its next write; unsure are
	// the writes since that failed but may have happened. Under manMu.
	etag   string
	unsure [][]byte
	// keyChecked is when the data key blob was last found in the
	// account (checkKeyBlob). Under manMu.
	keyChecked time.Time

	mu     sync.Mutex
	loaded bool
	// fenced: another writer changed the manifest (or had, before this
	// process started: cache.Fenced), so the machine is not served here
	// until its agent's hello here claims it back (claim).
	fenced bool
	// parked: the uploader, fenced, has ended its uploads and waits
	// (parkCh is closed then): claim changes the cached segments only so.
	parked bool
	parkCh chan struct{}
	man    layout.Manifest
	// claimed is the claim (layout.Manifest.Claim) of the manifest this
	// server last wrote, or loaded as its own: the fence its applier
	// writes the replicas under (Server.Fence). m.man's runs ahead of it
	// while a claim's write is under way.
	claimed int64
	key     *seal.Key
	manKey  *seal.Key // seals the manifest: key, or the one ensureKey is storing
	// wrapped holds the data keys as stored under keys/ (wrapped by the
	// recovery key, so not secret), by key id: put back with a manifest
	// someone deleted (restoreManifest).
	wrapped  map[string][]byte
	durable  uint64 // every record ≤ durable is in the cache or the account
	uploaded uint64 // every record ≤ uploaded is in the journal (manifest durable_seq)
	applied  uint64 // reported by the applier
	segs     []*segEntry
	backlog  int64 // bytes cached and not yet uploaded (known sizes)
	// uploadFailing: the uploader's last step failed; it backs off, and
	// appliers do not yield to uploads that cannot move (a machine the
	// account refuses would hold every other machine's replica back).
	uploadFailing atomic.Bool
	// dropWarned is when dropApplied last warned of a failed delete
	// (uploader's goroutine only).
	dropWarned time.Time
	// Gaps (layout.Gap): gapEpoch counts the openings of a gap in this
	// process, so that only a session answered after the latest one can
	// mend it; mendAt is where that session's agent finished its resync
	// (0: not yet), waiting for the journal to reach it.
	gapEpoch  uint64
	mendAt    uint64
	mendDisks []string // disks of the hello answered at gapEpoch

	// accountRU is the recoverable_until of the manifest in the account
	// as last read or written (not m.man's, which runs ahead of a write
	// that may fail); hintRU the one the cache kept from before a restart
	// (cache.Recoverable), reported until the manifest is read; hintSaved
	// and hintAt what the cache was last given, and when (saveHint).
	accountRU, hintRU, hintSaved time.Time
	hintAt                       time.Time

	lastRun wire.RunID // the agent run that made the newest segment durable (zero: unknown)
	// marked is the newest marker time made durable (in a segment, or as
	// a note), uploaded or not: what the machine's sessions vouched for
	// so far, ahead of recoverable_until while uploads lag.
	marked  time.Time
	note    wire.Marker
	hasNote bool
	idle    wire.Marker // first marker of the current idle run (same seq)

	// applied_seq and durable_seq of the last manifest written or loaded:
	// cached segments are deleted only at or below them, for deleted past
	// what the manifest in the account says, their remains after a crash
	// would look like acknowledged data lost.
	savedApplied, savedDurable uint64
	// savedAt is the updated time of the manifest this server last wrote.
	savedAt time.Time
	// ours is the journal (journalOf) of the manifest this server last
	// wrote or loaded while serving the machine: the history its cached
	// segments continue.
	ours string

	progress chan struct{} // closed and replaced whenever uploaded grows
}

func newMachine(s *Server, name string) *machine {
	m := &machine{
		name:     name,
		s:        s,
		log:      s.log.With(logMachine, name),
		wake:     make(chan struct{}, 1),
		upDone:   make(chan *upload, uploadParallel),
		progress: make(chan struct{}),
		parkCh:   make(chan struct{}),
		gapEpoch: 1, // a gap loaded open from the manifest has epoch 1
	}
	if s.cache != nil {
		if note, fenced := s.cache.Fenced(name); fenced {
			m.fenced, m.ours = true, string(note)
			m.log.Warn("another process server took this machine over before this one stopped: nothing of it is uploaded from this cache until its agent says hello here")
		}
		m.hintRU = s.cache.Recoverable(name)
		m.hintSaved = m.hintRU
	}
	return m
}

// machineReport is what the metrics say of a machine.
type machineReport struct {
	until   time.Time // recoverable_until (zero: none known)
	loaded  bool      // the manifest was read: durable is the account's
	durable uint64
}

// report returns what the metrics say of the machine; false for one
// another process server serves.
func (m *machine) report() (machineReport, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fenced {
		return machineReport{}, false
	}
	if !m.loaded {
		return machineReport{until: m.hintRU}, true
	}
	return machineReport{until: m.accountRU, loaded: true, durable: m.savedDurable}, true
}

// hintEvery spaces the cache's records of recoverable_until: a restart
// reports an RPO at most this much too high until the manifest is read.
const hintEvery = 10 * time.Second

// saveHint gives the cache the machine's recoverable_until, when it
// moved and hintEvery has passed (the monitor's tick).
func (m *machine) saveHint() {
	if m.s.cache == nil {
		return
	}
	m.mu.Lock()
	ru := m.accountRU
	// Any change, back included (another server's manifest taken, an
	// account replaced): a restart must not report an RPO too small.
	due := m.loaded && !m.fenced && !ru.Equal(m.hintSaved) && time.Since(m.hintAt) >= hintEvery
	if due {
		m.hintSaved, m.hintAt = ru, time.Now()
	}
	m.mu.Unlock()
	if !due {
		return
	}
	if err := m.s.cache.SetRecoverable(m.name, ru); err != nil {
		m.log.Debug("cannot keep recoverable_until in the cache (reported after a restart)", logErr, err)
	}
}

func (m *machine) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// ensureLoaded reads the manifest and the data key from the store once.
// A missing manifest is a new machine; a key that does not unwrap with the
// recovery key is an error (a new key would orphan the existing journal).
func (m *machine) ensureLoaded(ctx context.Context) error {
	m.mu.Lock()
	ok := m.loaded
	m.mu.Unlock()
	if ok {
		return nil
	}
	if err := m.lockManifest(ctx); err != nil {
		return err
	}
	defer m.manMu.Unlock()
	m.mu.Lock()
	ok = m.loaded
	m.mu.Unlock()
	if ok {
		return nil
	}
	man, key, etag, err := m.readManifest(ctx)
	if err != nil {
		return err
	}
	m.etag = etag
	m.mu.Lock()
	m.man, m.key, m.manKey, m.loaded = man, key, key, true
	m.accountRU = man.RecoverableUntil
	if !m.fenced && man.Owner != "" && man.Owner != m.s.cfg.Name {
		// Another server claimed the machine since this one last served
		// it (a restart found its cache): its cache may hold a history
		// the other's superseded, and its uploads and applier would
		// write over the other's (see claim).
		m.fenced = true
		m.log.Warn("the manifest names another process server as serving this machine: nothing of it is uploaded or applied here until its agent says hello here", "owner", man.Owner)
	}
	if !m.fenced {
		m.ours = journalOf(&man)
		m.claimed = man.Claim
	}
	// Who sent the newest durable records: the manifest says, unless the
	// cache (scanCache) holds newer ones, or as new ones that say.
	if man.DurableSeq > m.durable || (man.DurableSeq == m.durable && m.lastRun == (wire.RunID{})) {
		m.lastRun = runOf(man.LastRun)
	}
	m.durable = max(m.durable, man.DurableSeq)
	m.uploaded = max(m.uploaded, man.DurableSeq)
	m.applied = max(m.applied, man.AppliedSeq)
	m.savedApplied, m.savedDurable = max(m.savedApplied, man.AppliedSeq), max(m.savedDurable, man.DurableSeq)
	m.mu.Unlock()
	return nil
}

// runOf decodes a manifest's last_run (zero: unknown).
func runOf(h string) wire.RunID {
	var r wire.RunID
	if b, err := hex.DecodeString(h); err == nil && len(b) == len(r) {
		copy(r[:], b)
	}
	return r
}

// journalOf is what of a manifest says which history the journal holds:
// how far it goes, its gaps and the disks' generations (not the
// applier's progress nor recoverable_until).
func journalOf(man *layout.Manifest) string {
	// omitempty: an empty list and none (as read back) are the same.
	b, err := json.Marshal(struct {
		Durable uint64
		Gaps    []layout.Gap  `json:",omitempty"`
		Disks   []layout.Disk `json:",omitempty"`
	}{man.DurableSeq, man.Gaps, man.Disks})
	if err != nil {
		return ""
	}
	return string(b)
}

// readManifest reads the manifest and its data key from the account, and
// checks the manifest's seal. A missing manifest is a new machine.
func (m *machine) readManifest(ctx context.Context) (layout.Manifest, *seal.Key, string, error) {
	man := layout.Manifest{Version: layout.ManifestVersion, Machine: m.name}
	// With its ETag no newer than the content: a write in between makes
	// this server's first write fail, rather than erase it.
	raw, etag, err := blobstore.ReadBack(ctx, m.s.store, layout.ManifestName(m.name))
	switch {
	case blobstore.IsNotFound(err):
		// A new journal: all of it is kept so far. Recorded (and sealed),
		// so that recovery never takes a first segment past 1 (an agent
		// whose numbering continues from its saved lease) for a pruned
		// journal.
		man.JournalFrom = 1
	case err != nil:
		return man, nil, "", fmt.Errorf("read manifest of %s: %w", m.name, err)
	default:
		p, err := layout.UnmarshalManifest(raw)
		if err != nil {
			return man, nil, "", fmt.Errorf("manifest of %s (%s): %w", m.name, layout.ManifestName(m.name), err)
		}
		if p.Machine != m.name {
			return man, nil, "", fmt.Errorf("manifest %s names machine %q", layout.ManifestName(m.name), p.Machine)
		}
		man = *p
	}
	var key *seal.Key
	if man.KeyID != "" {
		if key, err = m.loadKey(ctx, man.KeyID); err != nil {
			return man, nil, "", err
		}
		// Adopted and sealed again, a forged manifest would pass.
		if err := recovery.VerifyManifest(&man, key); err != nil {
			return man, nil, "", err
		}
	} else if raw != nil {
		// Every manifest this server writes is sealed (the data key
		// comes first): an unsealed one with state, or next to data
		// keys, had its seal stripped, and sealing it now would make
		// whatever it says authentic.
		if err := m.checkUnsealed(ctx, &man); err != nil {
			return man, nil, "", err
		}
	}
	return man, key, etag, nil
}

// dropForeignSegments deletes the journal segments past durable, up to
// those starting at acked: uploaded by a process server that no longer
// serves the machine (its cache lost, or the machine claimed from it),
// never vouched for by the manifest. Their records are inside the gap a
// hello opens, or the agent sends them again: it numbers its next records
// from durable+1, and segments of the two histories under overlapping
// ranges would be replayed together.
//
// Those found now start at most at acked, the agent's last acknowledged
// sequence: an upload holds acknowledged records only. A server that
// still runs (cut off from the agent, not from the account) may upload
// more later, past acked too: readers skip them (recovery.StaleFilter).
func (m *machine) dropForeignSegments(ctx context.Context, durable, acked uint64) error {
	segs, err := recovery.ListSegmentsFrom(ctx, m.s.store, m.name, durable+1, acked)
	if err != nil {
		return err
	}
	for _, sg := range segs {
		if sg.First <= durable {
			continue
		}
		m.log.Warn("deleting a journal segment past durable_seq, which no manifest vouched for (a process server that no longer serves the machine uploaded it): the agent sends its records again, or resyncs what they changed",
			logBlob, sg.Name, logGapFrom, durable+1)
		if err := m.s.store.DeleteBlob(ctx, sg.Name); err != nil && !blobstore.IsNotFound(err) {
			return fmt.Errorf("delete journal segment %s past the gap: %w", sg.Name, err)
		}
	}
	return nil
}

// checkUnsealed accepts an unsealed manifest only if it says nothing and
// the machine has no data key yet.
func (m *machine) checkUnsealed(ctx context.Context, man *layout.Manifest) error {
	if len(man.Disks) > 0 || len(man.Gaps) > 0 || man.DurableSeq != 0 || man.AppliedSeq != 0 || man.JournalFrom > 1 || man.Seal != "" {
		return fmt.Errorf("manifest %s holds state but no key_id: its seal was stripped (%w); restore it from a trusted copy",
			layout.ManifestName(m.name), recovery.ErrTampered)
	}
	keys, err := m.s.store.ListBlobs(ctx, layout.KeysPrefix(m.name))
	if err != nil {
		return fmt.Errorf("list data keys of %s: %w", m.name, err)
	}
	if len(keys) > 0 {
		return fmt.Errorf("manifest %s names no data key although %s holds %d: its seal was stripped (%w)",
			layout.ManifestName(m.name), layout.KeysPrefix(m.name), len(keys), recovery.ErrTampered)
	}
	return nil
}

func (m *machine) loadKey(ctx context.Context, idHex string) (*seal.Key, error) {
	var id seal.KeyID
	if b, err := hex.DecodeString(idHex); err != nil || len(b) != len(id) {
		return nil, fmt.Errorf("manifest of %s: malformed key_id %q", m.name, idHex)
	} else {
		copy(id[:], b)
	}
	name := layout.KeyName(m.name, id)
	wrapped, err := m.s.store.GetBlob(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("read data key %s of %s: %w", name, m.name, err)
	}
	material, err := seal.UnwrapKey(m.s.recoveryKey, wrapped, id)
	if err != nil {
		return nil, fmt.Errorf("data key %s of %s does not open with recovery key %s (wrong --recovery-key?): %w",
			name, m.name, seal.Fingerprint(m.s.recoveryKey), err)
	}
	defer clear(material)
	m.keepWrapped(id, wrapped)
	return seal.NewKey(id, material)
}

// keyMeta is a wrapped data key blob's metadata: the recovery key's
// fingerprint, which recovery names when given another key.
func (m *machine) keyMeta() blobstore.Metadata {
	return blobstore.Metadata{layout.MetaKeyFP: seal.Fingerprint(m.s.recoveryKey)}
}

func (m *machine) keepWrapped(id seal.KeyID, wrapped []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.wrapped == nil {
		m.wrapped = map[string][]byte{}
	}
	m.wrapped[id.String()] = wrapped
}

// sealSegment appends the cached form of b (header, then the journal
// segment compressed and encrypted with the machine's data key, which
// agree loaded) to dst.
func (m *machine) sealSegment(dst []byte, b *segBuf) ([]byte, error) {
	key, alg := m.sealParams(b.data)
	if key == nil {
		return dst, errors.New("no data key loaded for the machine")
	}
	// Room for the largest outcome (stored as is): growing dst inside
	// the cipher would copy and zero a whole segment again.
	if need := len(dst) + cachedHeaderSize + seal.Overhead + max(len(b.data), cap(b.data)); cap(dst) < need {
		dst = append(make([]byte, 0, need), dst...)
	}
	dst = appendCachedHeader(dst, b.meta)
	return seal.SealWith(alg, dst, b.data, key, []byte(layout.SegmentName(m.name, b.meta.first, b.meta.last)))
}

// sealInPlace seals b's frames where they lie, behind the header room
// its buffer keeps, and returns the cached segment (header and blob) in
// b's buffer; b's plaintext is gone. ok is false, with nothing done, when
// the frames have outgrown the buffer (a huge frame): seal a copy then.
// The cached segment's shard checksums for c are gathered as the cipher
// writes it (sums), while each piece is in the CPU cache.
func (m *machine) sealInPlace(b *segBuf, c *cache.Cache) (cached []byte, sums *cache.Sums, ok bool, err error) {
	if cap(b.buf) < segPrefix+len(b.data)+seal.TagSize || len(b.data) == 0 ||
		&b.buf[:segPrefix+1][segPrefix] != &b.data[0] {
		return nil, nil, false, nil
	}
	key, alg := m.sealParams(b.data)
	if key == nil {
		return nil, nil, true, errors.New("no data key loaded for the machine")
	}
	plain := len(b.data)
	appendCachedHeader(b.buf[:0], b.meta)
	summed := 0 // blob bytes given to sums
	progress := func(done []byte, total int) {
		if sums == nil {
			sums = c.NewSums(cachedHeaderSize + total)
			sums.Write(b.buf[:cachedHeaderSize])
		}
		sums.Write(done[summed:])
		summed = len(done)
	}
	blob, err := seal.SealInPlace(alg, b.buf[cachedHeaderSize:segPrefix+plain], key, []byte(layout.SegmentName(m.name, b.meta.first, b.meta.last)), progress)
	if err != nil {
		return nil, nil, true, err
	}
	return b.buf[:cachedHeaderSize+len(blob)], sums, true, nil
}

// sealParams returns the machine's data key and the compressor for a
// segment holding plain: none when a sample of it does not compress.
func (m *machine) sealParams(plain []byte) (*seal.Key, seal.Alg) {
	alg := seal.DefaultAlg
	if !seal.Compressible(alg, plain) {
		alg = seal.AlgNone
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.key, alg
}

// ensureKey creates the machine's data key on first use: wrapped key blob
// first, then the manifest naming it, so the manifest never names a
// missing key.
func (m *machine) ensureKey(ctx context.Context) (*seal.Key, error) {
	m.mu.Lock()
	k := m.key
	m.mu.Unlock()
	if k != nil {
		return k, nil
	}
	material, id := seal.NewDataKey()
	defer clear(material)
	key, err := seal.NewKey(id, material)
	if err != nil {
		return nil, err
	}
	wrapped, err := seal.WrapKey(m.s.recoveryKey, material, id)
	if err != nil {
		return nil, err
	}
	name := layout.KeyName(m.name, id)
	if err := m.s.store.PutBlob(blobstore.Unmetered(ctx), name, wrapped, m.keyMeta()); err != nil {
		return nil, fmt.Errorf("store data key %s: %w", name, err)
	}
	m.keepWrapped(id, wrapped)
	if err := m.lockManifest(ctx); err != nil {
		return nil, err
	}
	defer m.manMu.Unlock()
	m.mu.Lock()
	m.man.KeyID, m.manKey = id.String(), key
	m.mu.Unlock()
	if err := m.writeLocked(ctx); err != nil {
		m.mu.Lock()
		m.man.KeyID, m.manKey = "", nil
		m.mu.Unlock()
		return nil, err
	}
	m.mu.Lock()
	m.key = key
	m.mu.Unlock()
	m.log.Info("created data key", logKeyID, id.String(), logBlob, name)
	return key, nil
}

// lockManifest takes manMu, giving up when ctx ends: a hello or a
// session's work must not wait out a manifest write retrying through an
// outage (up to the retry layer's bound, minutes).
func (m *machine) lockManifest(ctx context.Context) error {
	if err := m.manMu.LockCtx(ctx); err != nil {
		return fmt.Errorf("waiting for the manifest of %s (a write retrying through an outage?): %w", m.name, err)
	}
	return nil
}

// writeManifest stores the current manifest. Writes are serialised and
// each writes the state current when it starts, so the last write wins
// with the newest state. Each is conditional on the manifest being as
// this server last read or wrote it: one changed by another writer (a
// second process server serving the machine) is not overwritten, and
// the machine is fenced (see fence).
//
// A change to m.man and the write that stores it hold manMu throughout
// (writeLocked): claim replaces m.man with the account's, and must not
// fall between the two.
func (m *machine) writeManifest(ctx context.Context) error {
	if err := m.lockManifest(ctx); err != nil {
		return err
	}
	defer m.manMu.Unlock()
	return m.writeLocked(ctx)
}

// writeLocked is writeManifest with manMu held.
func (m *machine) writeLocked(ctx context.Context) error {
	if m.isFenced() {
		return fmt.Errorf("write manifest of %s: %w", m.name, errFenced)
	}
	err := m.putManifest(ctx)
	if errors.Is(err, blobstore.ErrConflict) {
		m.fence(err)
		return fmt.Errorf("write manifest of %s: %w", m.name, errFenced)
	}
	if err == nil {
		m.checkKeyBlob(ctx)
	}
	return err
}

// putManifest writes m.man, conditional on m.etag; a conflict with
// another writer's write is returned (blobstore.ErrConflict), not acted
// on. manMu is held.
func (m *machine) putManifest(ctx context.Context) error {
	m.mu.Lock()
	man := m.man
	man.Disks = slices.Clone(man.Disks)
	man.Gaps = slices.Clone(man.Gaps)
	key := m.manKey
	m.mu.Unlock()
	man.Updated = time.Now().UTC()
	if key != nil { // none before the first key: nothing to recover yet
		if err := recovery.SealManifest(&man, key); err != nil {
			return err
		}
	} else if man.DurableSeq > 0 || len(man.Disks) > 0 {
		// Read back, it would be refused as a manifest whose seal was
		// stripped: the state is not written unsealed.
		return fmt.Errorf("write manifest of %s: it holds state (durable_seq %d, %d disks) but no data key of this server's seals it (the manifest deleted from the account while it was down?): not written unsealed", m.name, man.DurableSeq, len(man.Disks))
	}
	raw, err := layout.MarshalManifest(&man)
	if err != nil {
		return err
	}
	name := layout.ManifestName(m.name)
	etag, err := m.s.store.PutBlobIf(blobstore.Unmetered(ctx), name, raw, nil, m.etag)
	if errors.Is(err, blobstore.ErrConflict) {
		etag, err = m.ownConflict(ctx, name, raw, err)
	}
	switch {
	case errors.Is(err, blobstore.ErrConflict):
		return err
	case err != nil:
		// Remembered whatever the error: a permanent one on a retried
		// call says nothing of the attempts before it, which may have
		// landed (and one that did not land never matches).
		if len(m.unsure) < maxUnsure {
			m.unsure = append(m.unsure, raw)
		}
		return fmt.Errorf("write manifest of %s: %w", m.name, err)
	}
	m.etag, m.unsure = etag, nil
	m.mu.Lock()
	m.ours = journalOf(&man)
	if man.DurableSeq > m.savedDurable {
		close(m.progress) // waitUploaded
		m.progress = make(chan struct{})
	}
	m.savedApplied, m.savedDurable = max(m.savedApplied, man.AppliedSeq), max(m.savedDurable, man.DurableSeq)
	m.savedAt = man.Updated
	m.accountRU = man.RecoverableUntil
	m.claimed = man.Claim
	m.mu.Unlock()
	return nil
}

// maxUnsure bounds the failed manifest writes remembered as possibly
// done; past it, a conflict they caused fences the machine.
const maxUnsure = 64

// ownConflict settles a conflicting manifest write (err): the manifest
// may hold one of this server's own writes that failed but happened (a
// reply lost past every retry, a deadline). Then raw is written over it.
// A manifest that cannot be read back now is no proof of another writer:
// the error returned then does not fence. manMu is held.
func (m *machine) ownConflict(ctx context.Context, name string, raw []byte, err error) (string, error) {
	got, etag, rerr := blobstore.ReadBack(ctx, m.s.store, name)
	if blobstore.IsNotFound(rerr) {
		return m.restoreManifest(ctx, name, raw)
	}
	if rerr != nil {
		return "", fmt.Errorf("manifest changed since this server last wrote it, and reading it back failed: %w", rerr)
	}
	if bytes.Equal(got, raw) {
		return etag, nil
	}
	for _, u := range m.unsure {
		if bytes.Equal(got, u) {
			m.etag = etag // ours after all: the next write goes on from it
			return m.s.store.PutBlobIf(blobstore.Unmetered(ctx), name, raw, nil, etag)
		}
	}
	if m.ownOlder(got) {
		// Taken for another writer's, it would fence this server, and the
		// agent's next hello would claim the machine from it and delete
		// the journal segments past its durable_seq: authentic ones.
		m.log.Error("the manifest of this machine was replaced by an older copy of one this process server wrote (rolled back, from a blob version or a saved copy?): writing its current state over it",
			logBlob, name)
		m.etag = etag
		return m.s.store.PutBlobIf(blobstore.Unmetered(ctx), name, raw, nil, etag)
	}
	return "", err
}

// ownOlder reports whether got is an authentic manifest this server
// wrote before its latest write: sealed under the machine's key, in this
// server's name, under no claim above its own, behind its saved
// progress and dated before its latest write (that one itself written
// again is not taken for a rollback). No other writer makes one: another server's write carries
// its own name, and a claim above this server's. manMu is held.
func (m *machine) ownOlder(got []byte) bool {
	man, err := layout.UnmarshalManifest(got)
	return err == nil && m.ownOlderManifest(man)
}

// ownOlderManifest is ownOlder of a manifest read.
func (m *machine) ownOlderManifest(man *layout.Manifest) bool {
	m.mu.Lock()
	key, cur := m.manKey, m.man
	claimed, durable, applied, at := m.claimed, m.savedDurable, m.savedApplied, m.savedAt
	m.mu.Unlock()
	if key == nil || man.Machine != m.name || man.Owner != m.s.cfg.Name || man.KeyID != cur.KeyID || !man.Updated.Before(at) ||
		man.Claim > claimed || man.DurableSeq > durable || man.AppliedSeq > applied || man.JournalFrom > cur.JournalFrom {
		return false
	}
	return recovery.VerifyManifest(man, key) == nil
}

// restoreManifest writes raw where the machine's manifest was deleted by
// someone else (no process server deletes one): this server holds the
// machine's latest state, and without a manifest nothing of the machine
// can be recovered. The data key blob raw names goes back too if it went
// with it. Created only where none is, so a manifest written meanwhile
// by another server still fences this one. manMu is held.
func (m *machine) restoreManifest(ctx context.Context, name string, raw []byte) (string, error) {
	man, err := layout.UnmarshalManifest(raw)
	if err != nil {
		return "", err
	}
	if gone, err := m.blobsGone(ctx, man); err != nil {
		return "", err
	} else if gone {
		return "", fmt.Errorf("the manifest of %s was deleted from the account, and so were its replicas and journal (the machine's blobs removed, or the container replaced?): not writing it back", m.name)
	}
	m.log.Error("the manifest of this machine was deleted from the account by someone else: writing it again from what this process server holds",
		logBlob, name)
	if err := m.restoreKeyBlob(ctx, man.KeyID, ""); err != nil {
		return "", err
	}
	return m.s.store.PutBlobIf(blobstore.Unmetered(ctx), name, raw, nil, "")
}

// keyCheckEvery is how often a running server makes sure the data key
// blob its manifest names is still in the account (checkKeyBlob).
var keyCheckEvery = 10 * time.Minute

// checkKeyBlob makes sure the wrapped data key the manifest names is in
// the account as this server stored or loaded it. It is written once and
// never again, so it is the first blob an age-based lifecycle rule
// deletes; without it nothing of the machine can be recovered, and a
// server that keeps sealing under the key holds its only wrapped copy.
// Deleted, or replaced by something the recovery key does not open, it
// is written back. Errors are logged: the next check tries again. manMu
// is held.
func (m *machine) checkKeyBlob(ctx context.Context) {
	m.mu.Lock()
	id := m.man.KeyID
	m.mu.Unlock()
	if id == "" || time.Since(m.keyChecked) < keyCheckEvery {
		return
	}
	kname := layout.KeysPrefix(m.name) + id
	got, etag, err := blobstore.ReadBack(ctx, m.s.store, kname)
	switch {
	case blobstore.IsNotFound(err):
		err = m.restoreKeyBlob(ctx, id, "")
	case err != nil:
	default:
		err = m.checkWrapped(ctx, id, kname, got, etag)
	}
	// Checked again after keyCheckEvery either way: a blob that cannot
	// be read (archived by a lifecycle rule) is not retried at every
	// manifest write.
	m.keyChecked = time.Now()
	if err != nil {
		m.log.Warn("could not check the data key blob of this machine in the account", logBlob, kname, logErr, err)
	}
}

// checkWrapped writes back the wrapped key id when got, the blob kname
// holds (at etag), is not it and does not open with the recovery key.
func (m *machine) checkWrapped(ctx context.Context, id, kname string, got []byte, etag string) error {
	m.mu.Lock()
	wrapped := m.wrapped[id]
	m.mu.Unlock()
	if wrapped == nil || bytes.Equal(got, wrapped) {
		return nil
	}
	var kid seal.KeyID
	if b, err := hex.DecodeString(id); err == nil && len(b) == len(kid) {
		copy(kid[:], b)
		if material, err := seal.UnwrapKey(m.s.recoveryKey, got, kid); err == nil {
			clear(material) // wrapped again by someone holding the recovery key
			return nil
		}
	}
	m.log.Error("the data key blob of this machine was replaced by something the recovery key does not open: writing it back",
		logBlob, kname)
	return m.restoreKeyBlob(ctx, id, etag)
}

// restoreKeyBlob writes the wrapped data key id back under keys/ where
// it is not (etag "") or where it is as etag (replaced by someone else).
// A conflict means it is there again: nothing to do.
func (m *machine) restoreKeyBlob(ctx context.Context, id, etag string) error {
	m.mu.Lock()
	wrapped := m.wrapped[id]
	m.mu.Unlock()
	if wrapped == nil {
		return nil
	}
	kname := layout.KeysPrefix(m.name) + id
	_, err := m.s.store.PutBlobIf(blobstore.Unmetered(ctx), kname, wrapped, m.keyMeta(), etag)
	switch {
	case err == nil:
		if etag == "" {
			m.log.Error("the data key of this machine was deleted from the account: stored it again", logBlob, kname)
		}
		return nil
	case errors.Is(err, blobstore.ErrConflict):
		return nil
	default:
		return fmt.Errorf("store data key %s again: %w", kname, err)
	}
}

// blobsGone reports whether nothing the deleted manifest vouched for is
// left either: no replica page blob of its disks and no journal segment
// up to its durable_seq. (Retention may have pruned the journal of an
// idle machine up to durable_seq; its replicas stay.)
func (m *machine) blobsGone(ctx context.Context, man *layout.Manifest) (bool, error) {
	m.mu.Lock()
	vouched := m.savedDurable
	m.mu.Unlock()
	if vouched == 0 {
		return false, nil // nothing was: nothing to lose
	}
	for _, d := range man.Disks {
		_, err := m.s.store.Stat(ctx, layout.DiskName(m.name, d.Name))
		if err == nil {
			return false, nil
		}
		if !blobstore.IsNotFound(err) {
			return false, err
		}
	}
	// No replica yet (none applied): the journal is short.
	segs, err := recovery.ListSegments(ctx, m.s.store, m.name)
	if err != nil {
		return false, err
	}
	return !slices.ContainsFunc(segs, func(s recovery.Segment) bool { return s.First <= vouched }), nil
}

// errFenced: this process server no longer serves the machine.
var errFenced = errors.New("another writer changed the manifest: this process server no longer serves the machine")

// fence stops serving the machine after its manifest was changed by
// another writer: most likely a second process server serving it (its
// agent re-pointed while this server was cut off from it). Going on, each
// would erase the other's gaps and generations, and recovery could then
// return an image without acknowledged writes. The current session ends,
// the uploader and the applier stop and the cache is kept, until the
// agent says hello here again (claim). manMu is held.
func (m *machine) fence(err error) {
	m.mu.Lock()
	m.fenced = true
	sess, ours := m.sess, m.ours
	m.mu.Unlock()
	// Kept across a restart: while the other serves the machine, a
	// restarted uploader would publish what this cache holds over the
	// other's journal. With it, what this server knew of the journal,
	// which tells claim whether the cache still continues it.
	if m.s.cache == nil {
		// (test rigs without a cache)
	} else if err := m.s.cache.SetFenced(m.name, true, []byte(ours)); err != nil {
		m.log.Error("cannot record in the cache that another process server serves this machine: after a restart this one would upload its cached segments again", logErr, err)
	}
	m.log.Error("another writer changed the manifest of this machine, or claimed its replicas (another process server serving it?): this process server stops serving the machine and keeps its cache, until the agent says hello here again",
		logBlob, layout.ManifestName(m.name), logErr, err)
	if sess != nil {
		sess.abort(errFenced)
	}
	m.kick() // the uploader stops
	// The replicas and points are the other server's now too.
	if l, ok := m.s.applier.(applierLoops); ok {
		l.Stop(m.name)
	}
}

// applierLoops is an Applier whose applying of a machine can stop (the
// machine fenced) and resume from the account's state (claimed back):
// ManagedApplier's.
type applierLoops interface {
	Stop(machine string)
	Resume(machine string)
}

// isFenced reports whether fence stopped serving the machine.
func (m *machine) isFenced() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.fenced
}

// maxClaims bounds claim's tries against another writer's writes.
const maxClaims = 3

// claimScan is how far past durable_seq claim looks for segments the
// previous writer left: far beyond what an agent sends unacknowledged.
const claimScan = 200_000

// claim makes this server the machine's writer at its agent's hello, when
// it may not hold the manifest's latest state: the machine is fenced
// (another writer changed it), or everything this server cached of it is
// in the journal (the agent may come from another process server, which
// wrote since). It reads the manifest the account holds, takes it
// (takeManifest) and writes it back, conditional on that read: the other
// server's next write then fails, and fences it. A write of the other's
// landing in between (it may still be draining its backlog) makes claim
// read again, up to maxClaims times; then the hello fails, and the agent
// tries again. A machine with segments of its own still to publish
// claims nothing: its writes are conditional, and a conflict fences it.
func (m *machine) claim(ctx context.Context) error {
	for try := 1; ; try++ {
		if err := m.waitParked(ctx); err != nil {
			return err
		}
		err := m.claimOnce(ctx)
		if !errors.Is(err, blobstore.ErrConflict) {
			return err
		}
		if try == maxClaims {
			return fmt.Errorf("the manifest of %s changed %d times while this process server took the machine over (another process server still writing it?): %v; the agent's next hello tries again", m.name, try, err)
		}
		m.log.Info("the manifest changed again while this process server took the machine over; reading it again", logErr, err)
	}
}

// waitParked waits, if the machine is fenced, for its uploader to park:
// what it does until then (an upload step, a lost segment's tombstone)
// must not straddle a claim.
func (m *machine) waitParked(ctx context.Context) error {
	for {
		m.mu.Lock()
		done, ch := !m.fenced || m.parked, m.parkCh
		m.mu.Unlock()
		if done {
			return nil
		}
		m.kick()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for the uploads of %s to stop: %w", m.name, ctx.Err())
		}
	}
}

// setParked records whether the uploader is parked (uploader only).
func (m *machine) setParked(on bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if on == m.parked {
		return
	}
	m.parked = on
	if on {
		close(m.parkCh)
	} else {
		m.parkCh = make(chan struct{})
	}
}

func (m *machine) claimOnce(ctx context.Context) error {
	if !m.isFenced() {
		// Bounded as missingReplicas is: during an outage the store's
		// retries would hold every reconnect past the agent's patience,
		// here or behind a manifest write under way.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, replicaCheckTimeout)
		defer cancel()
	}
	if err := m.manMu.LockCtx(ctx); err != nil {
		if m.isFenced() {
			return fmt.Errorf("wait for the manifest of %s: %w", m.name, err)
		}
		return nil // a write under way: this server writes, its state is current
	}
	defer m.manMu.Unlock()
	m.mu.Lock()
	fenced, busy := m.fenced, len(m.ups) > 0 || (m.fenced && !m.parked)
	cold := !busy && m.man.DurableSeq <= m.savedDurable && !slices.ContainsFunc(m.segs, func(e *segEntry) bool { return !e.uploaded })
	hadKey := m.man.KeyID != ""
	m.mu.Unlock()
	switch {
	case fenced && busy:
		return fmt.Errorf("uploads of %s started before another writer changed its manifest are still ending; the agent's next hello tries again", m.name)
	case !fenced && !cold:
		return nil
	}
	// Settles nothing when it fails on a machine that was not fenced: it
	// goes on as it did before claims (its next write settles who writes).
	soft := func(err error) error {
		if fenced {
			return err
		}
		m.log.Warn("cannot make sure this process server holds the machine's latest manifest; going on with what it holds", logErr, err)
		return nil
	}
	man, key, etag, err := m.readManifest(ctx)
	if err == nil && hadKey && man.KeyID == "" {
		err = fmt.Errorf("manifest %s is gone from the account or names no data key, although this process server wrote one that did: %w", layout.ManifestName(m.name), recovery.ErrTampered)
	}
	if err != nil {
		return soft(err)
	}
	if !fenced && etag != m.etag && m.ownOlderManifest(&man) {
		// An older copy of this server's own manifest put back, met by a
		// hello before any write of the server's: taken over, it would
		// have the journal past it deleted. The write meets it as a
		// conflict, which ownConflict settles by writing over it.
		if err := m.putManifest(ctx); err != nil {
			if errors.Is(err, blobstore.ErrConflict) {
				return err
			}
			return soft(err)
		}
		return nil
	}
	// Another writer since this server's last write, or the agent
	// coming from another server: a takeover.
	takeover := fenced || etag != m.etag || man.Owner != m.s.cfg.Name
	if fenced || etag != m.etag {
		keep, drop := m.superseded(&man)
		for _, e := range drop {
			// Left in the cache, a restart would take it for a current
			// segment: until it can go (a cache disk down), the machine
			// is not served here, and the agent keeps what it has not
			// had acknowledged.
			if err := m.s.cache.Delete(e.id); err != nil {
				err = fmt.Errorf("cannot delete cached segment %s, which another process server's journal superseded (a cache disk down?): this process server takes the machine back once it can; restore the disk, or restart without it: %w", e.id, err)
				if fenced {
					m.log.Error("claim refused", logErr, err)
				}
				return soft(err)
			}
		}
		m.takeManifest(man, key, etag, keep)
		if len(drop) > 0 {
			m.log.Warn("dropped cached segments another process server's journal superseded: any the agent had acknowledged is a gap its checksum resync mends",
				logCount, len(drop), logGapFrom, man.DurableSeq+1)
		}
		if !fenced && m.s.applier != nil {
			// Another writer since this server last wrote: its applier
			// may have moved the replicas and points past this one's
			// view. (A fenced machine's applier is stopped; it resumes
			// below.) It starts again once the write below is done, or
			// has failed (the next claim finds the manifest as taken
			// here): under this claim if it landed, else under the
			// server's last, which meets the replicas' fence if the
			// other's applier has claimed them.
			l, ok := m.s.applier.(applierLoops)
			if ok {
				l.Stop(m.name)
			}
			defer func() {
				if ok {
					l.Resume(m.name)
				}
				m.s.applier.Notify(m.name, man.DurableSeq)
			}()
		}
	}
	m.mu.Lock()
	// A claim of its own fences the replicas against the previous
	// writer's applier, once written (Server.Fence). Not raised when no
	// other writer was (the agent back after a blip): its applier would
	// claim and reload every replica for nothing.
	if takeover {
		m.man.Claim = layout.NextClaim(m.man.Claim)
	}
	m.man.Owner = m.s.cfg.Name
	newMachine := m.man.KeyID == ""
	m.mu.Unlock()
	if newMachine {
		// ensureKey writes the first manifest, sealed, on the condition
		// that there is none yet (or the keyless one read here), owner and
		// all: one written unsealed here would, next to a key stored before
		// a crash, look stripped of its seal. No journal can exist without
		// a sealed manifest naming its key.
		if !fenced {
			return nil
		}
	} else {
		if err := m.putManifest(ctx); err != nil {
			if errors.Is(err, blobstore.ErrConflict) {
				return err
			}
			return soft(err)
		}
		if man.Owner != "" && man.Owner != m.s.cfg.Name {
			m.log.Warn("machine taken over from another process server at its agent's hello", "from", man.Owner)
		}
		// The machine is this server's now: the other's writes of the
		// manifest fail. Segments it uploaded past durable_seq were never
		// published, and the journal goes on from there without them.
		m.mu.Lock()
		durable := m.man.DurableSeq
		m.mu.Unlock()
		if err := m.dropForeignSegments(ctx, durable, durable+claimScan); err != nil {
			m.log.Warn("cannot delete the journal segments past durable_seq that another process server left; readers skip them", logErr, err)
		}
		if !fenced {
			return nil
		}
	}
	if m.s.cache != nil {
		// Left "on", the record would have a restart take what this
		// server acknowledges from now on for a superseded history, and
		// drop it: until it clears, the machine is not served here.
		if err := m.s.cache.SetFenced(m.name, false, nil); err != nil {
			err = fmt.Errorf("cannot clear the record, in the cache, that another process server serves %s (the cache disks failing?): this process server takes the machine back once it can: %w", m.name, err)
			m.log.Error("claim refused", logErr, err)
			return err
		}
	}
	m.mu.Lock()
	m.fenced = false
	up := m.uploaded
	m.mu.Unlock()
	m.log.Warn("the agent said hello here again: this process server serves the machine again, from the manifest the account holds", "durable_seq", up)
	m.kick()
	if m.s.applier != nil {
		if l, ok := m.s.applier.(applierLoops); ok {
			l.Resume(m.name)
		}
		m.s.applier.Notify(m.name, up)
	}
	return nil
}

// superseded tells which cached segments claim keeps when it takes man
// from the account. Those in man's journal stay until applied; those it
// does not hold yet are kept, to be published, only if the journal is
// still the one this server knew (ours: another writer changed the
// applier's fields alone). Otherwise they belong to a history the other
// writer's journal superseded (a generation or a gap recorded past what
// this server published, or segments of its own there) and are dropped:
// any of them the agent had acknowledged lies past durable_seq then, so
// its hello records a gap, which its checksum resync mends. manMu is
// held.
func (m *machine) superseded(man *layout.Manifest) (keep bool, drop []*segEntry) {
	j := journalOf(man)
	keep = j == m.ours
	for _, raw := range m.unsure { // a write of this server's that failed, yet landed
		if u, err := layout.UnmarshalManifest(raw); err == nil && journalOf(u) == j {
			keep = true
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.segs {
		if !m.kept(e, man, keep) {
			drop = append(drop, e)
		}
	}
	return keep, drop
}

func (m *machine) kept(e *segEntry, man *layout.Manifest, keep bool) bool {
	if e.uploaded && e.last != 0 && e.last <= m.savedDurable {
		return true // in the journal a manifest of this server's vouched for
	}
	if e.id.Seq <= man.DurableSeq {
		return false
	}
	return keep
}

// takeManifest takes man, read from the account with etag, as the machine's
// manifest, with the cached segments superseded says to keep (the others
// deleted from the cache). manMu is held.
func (m *machine) takeManifest(man layout.Manifest, key *seal.Key, etag string, keep bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var dropped int64
	m.segs = slices.DeleteFunc(m.segs, func(e *segEntry) bool {
		if m.kept(e, &man, keep) {
			if e.uploaded && e.id.Seq > man.DurableSeq {
				// Uploaded, but the manifest never said so: again (the
				// same bytes are found in place).
				e.uploaded = false
				m.backlog += e.size
			}
			return false
		}
		if !e.uploaded {
			m.backlog -= e.size
		}
		m.s.dropHot(e.hot)
		e.hot = nil
		dropped += e.size
		return true
	})
	m.s.cacheBytes.Add(-dropped)
	if !keep || man.DurableSeq >= m.durable {
		m.durable, m.lastRun = man.DurableSeq, runOf(man.LastRun)
	}
	if !keep {
		// Markers of the superseded history say nothing of this one.
		m.note, m.hasNote, m.idle = wire.Marker{}, false, wire.Marker{}
	}
	m.man, m.key, m.manKey, m.loaded = man, key, key, true
	m.etag, m.unsure = etag, nil
	m.uploaded = man.DurableSeq
	m.applied = max(m.applied, man.AppliedSeq)
	m.savedApplied, m.savedDurable = man.AppliedSeq, man.DurableSeq
	m.accountRU = man.RecoverableUntil
	m.ours = journalOf(&man)
	// A mend under way was another server's, or this one's of another
	// state: the next hello's resync starts over.
	m.gapEpoch++
	m.mendAt = 0
}

// fencedMessage tells a refused agent why.
func (m *machine) fencedMessage() string {
	return fmt.Sprintf("this process server stopped serving machine %s: another writer (another process server?) changed its manifest; the next hello here takes it back", m.name)
}

// agree answers a Hello: per disk, resume, full sync (new generation) or
// checksum resync, as the contract says. New generations and gaps are
// recorded in the manifest before the answer is sent.
//
// It also returns, per Hello disk index, the disk's index in the manifest:
// records name disks by Hello index, the journal by manifest index (which
// is append-only, so old segments keep their meaning), and, when the
// answer asks for a checksum resync because of a gap, the gap's epoch for
// mended (0 otherwise).
func (m *machine) agree(ctx context.Context, h *wire.Hello) (*wire.HelloAck, agreed, []uint16, uint64, error) {
	if err := m.ensureLoaded(ctx); err != nil {
		return nil, agreed{}, nil, 0, err
	}
	// First: a fenced machine writes nothing before it is claimed back.
	if err := m.claim(ctx); err != nil {
		return nil, agreed{}, nil, 0, err
	}
	// The cache holds only sealed segments, so the key must be at hand
	// before the first record is accepted.
	if _, err := m.ensureKey(ctx); err != nil {
		return nil, agreed{}, nil, 0, err
	}
	// Settled before the answer: the agent's resend may reuse their names.
	if err := m.settleSuspects(ctx); err != nil {
		return nil, agreed{}, nil, 0, err
	}
	// An agent acknowledged past what this server holds lost the records
	// in between (a cache lost or restored, another server took them):
	// recorded before anything after them can be published.
	m.mu.Lock()
	durable := m.durable
	// Records a mended gap covers are settled too: lost, and what they
	// changed brought back by its resync (one that found nothing to send
	// leaves durable below what the agent had acknowledged, until its
	// next record).
	settled := durable
	for _, g := range slices.SortedFunc(slices.Values(m.man.Gaps), func(a, b layout.Gap) int { return cmp.Compare(a.From, b.From) }) {
		if !g.Open() && g.From <= settled+1 {
			settled = max(settled, g.LostTo)
		}
	}
	m.mu.Unlock()
	for _, d := range h.Disks {
		if d.LastAckedSeq > settled {
			m.log.Error("the agent had records acknowledged that this process server does not hold; they are missing from the journal until its checksum resync completes",
				logGapFrom, durable+1, logAgentAcked, d.LastAckedSeq)
			if err := m.openGap(ctx, durable+1, d.LastAckedSeq); err != nil {
				return nil, agreed{}, nil, 0, err
			}
			if err := m.dropForeignSegments(ctx, durable, d.LastAckedSeq); err != nil {
				return nil, agreed{}, nil, 0, err
			}
			break
		}
	}
	missing := m.missingReplicas(ctx, h)
	// Edited without manMu, unlike the uploader's and the applier's
	// changes: claim, which replaces m.man, runs only in agree, and agree
	// in one session at a time; and a hello must not wait for a manifest
	// write under way (one retrying through an outage).
	m.mu.Lock()
	var mendEpoch uint64
	gap := m.man.HasOpenGap()
	switch {
	case gap && m.mendAt != 0 && m.mendAt <= durable && m.mendCovers(h):
		// A resync of every disk of this hello already ended there and
		// its records are durable: only their upload is left, which
		// closes the gap. (A disk that resync left out resyncs now.)
		gap = false
	case gap:
		// Only this session's agent, resyncing now, may mend the gap: a
		// mend point an earlier session reported may never have become
		// durable (its records lost with it), and this resync starts over.
		m.gapEpoch++
		m.mendAt = 0
		mendEpoch = m.gapEpoch
		m.mendDisks = m.mendDisks[:0]
		for _, d := range h.Disks {
			m.mendDisks = append(m.mendDisks, d.Name)
		}
	}
	// No record at or below an open gap's end is taken, not even one the
	// agent resends (it never heard the ack of a cached segment lost
	// there): no segment of the journal starts with a write inside a gap,
	// which is how readers tell a stale process server's segments there
	// (recovery.StaleFilter). The agent takes them as acknowledged, and its
	// checksum resync brings back what they changed.
	accepted := settled
	for _, g := range m.man.Gaps {
		if g.Open() {
			accepted = max(accepted, g.LostTo)
		}
	}
	ack := &wire.HelloAck{ProtocolVersion: protocolVersion, Disks: make([]wire.DiskAgreement, len(h.Disks)), LastRun: m.lastRun}
	if accepted > durable {
		// Who sent the records up to accepted is not known: with the run
		// that sent those up to durable, an agent would take records of
		// its own for another agent's (foreign).
		ack.LastRun = wire.RunID{}
	}
	changed := false
	for i, d := range h.Disks {
		a := &ack.Disks[i]
		a.Name, a.ResumeFrom = d.Name, accepted+1
		md := m.man.Disk(d.Name)
		switch {
		case md == nil || d.Generation.IsZero() || md.Generation != d.Generation.String() || md.Size != d.Size || missing[d.Name] || m.leftUnmended(md) ||
			md.UnprotectedFrom != 0: // left out of a hello since: its writes since were not followed
			var g wire.Generation
			rand.Read(g[:])
			a.Action, a.Generation = wire.SyncFull, g
			if md == nil {
				m.man.Disks = append(m.man.Disks, layout.Disk{Name: d.Name})
				md = &m.man.Disks[len(m.man.Disks)-1]
			}
			// The agent resumes at durable+1: records before it are the
			// old generation's, which the applier may not have applied yet.
			md.NewGeneration(g.String(), d.Size, durable+1)
			m.resyncedUnmended(d.Name, durable+1)
			changed = true
		case gap:
			a.Action, a.Generation = wire.SyncChecksum, d.Generation
		default:
			a.Action, a.Generation = wire.SyncResume, d.Generation
		}
	}
	// A disk the hello leaves out is not protected from this session on
	// (its agent no longer lists it, or was refused before it copied it):
	// no point from here on may claim its replica, which stays as it is.
	for i := range m.man.Disks {
		md := &m.man.Disks[i]
		if md.UnprotectedFrom == 0 && !slices.ContainsFunc(h.Disks, func(d wire.DiskState) bool { return d.Name == md.Name }) {
			// Every marker durable so far came from sessions that
			// listed it, uploaded (recoverable_until) or not yet.
			since := m.man.RecoverableUntil
			if m.marked.After(since) {
				since = m.marked
			}
			md.UnprotectedFrom, md.UnprotectedSince = accepted+1, since
			changed = true
			m.log.Warn("the agent's hello leaves out a disk: not protected from here on (listed again, it is copied anew)", logDisk, md.Name, logFromSeq, md.UnprotectedFrom)
		}
	}
	diskMap := make([]uint16, len(h.Disks))
	for i, d := range h.Disks {
		for j := range m.man.Disks {
			if m.man.Disks[j].Name == d.Name {
				diskMap[i] = uint16(j)
			}
		}
	}
	m.mu.Unlock()
	if changed {
		if err := m.writeManifest(ctx); err != nil {
			return nil, agreed{}, nil, 0, err
		}
	}
	return ack, agreed{durable: durable, accepted: accepted}, diskMap, mendEpoch, nil
}

// agreed is where a session starts: its first segment follows the one
// ending at durable, and it takes records past accepted.
type agreed struct{ durable, accepted uint64 }

// leftUnmended reports whether disk md was left out of a gap's mending
// (Gap.Unmended) and has had no full sync since: its replica still lacks
// the lost records, so it needs a new generation. m.mu is held.
func (m *machine) leftUnmended(md *layout.Disk) bool {
	for _, g := range m.man.Gaps {
		for _, u := range g.Unmended {
			if u.Name == md.Name && u.Until == 0 {
				return true
			}
		}
	}
	return false
}

// resyncedUnmended records that disk name, left out of gaps' mending, gets
// its full sync from seq start. m.mu is held.
func (m *machine) resyncedUnmended(name string, start uint64) {
	for i := range m.man.Gaps {
		for j, u := range m.man.Gaps[i].Unmended {
			if u.Name == name && u.Until == 0 {
				// Copied: the manifest being written may share the array.
				un := slices.Clone(m.man.Gaps[i].Unmended)
				un[j].Until = start
				m.man.Gaps[i].Unmended = un
			}
		}
	}
}

// openGap records in the manifest that records from seq from on, up to
// lostTo, may be missing from the journal. Until the gap is mended, every
// hello is answered with a checksum resync; the manifest is written
// before the caller lets durable_seq pass from. A loss while a gap is
// open is a gap of its own (the chain check explains a missing segment
// only by the loss that took it) that the same resync mends.
func (m *machine) openGap(ctx context.Context, from, lostTo uint64) error {
	if err := m.lockManifest(ctx); err != nil {
		return err
	}
	defer m.manMu.Unlock()
	m.mu.Lock()
	merged := false
	for i, g := range m.man.Gaps {
		if g.Open() && g.From == from {
			m.man.Gaps[i].LostTo = max(g.LostTo, lostTo)
			merged = true
		}
	}
	if !merged {
		m.man.Gaps = append(m.man.Gaps, layout.Gap{From: from, LostTo: max(from, lostTo)})
	}
	m.gapEpoch++
	m.mendAt = 0
	m.mu.Unlock()
	return m.writeLocked(ctx)
}

// mended records that the agent of the session last answered for the
// gap (at epoch) has completed its checksum resync: it sends no time
// marker between a resync request and the resync's end (see
// wire.HelloAck), so its first time marker after the answer, at seq, is
// where the replicas are whole again. The gap closes once the journal
// holds every record up to seq.
func (m *machine) mended(epoch, seq uint64) {
	m.mu.Lock()
	if epoch == m.gapEpoch && m.mendAt == 0 && m.man.HasOpenGap() {
		m.mendAt = seq
	}
	m.mu.Unlock()
	m.kick()
}

// mendLocked closes the open gaps when the journal holds every record up
// to where the agent's resync completed. It reports whether the manifest
// changed.
func (m *machine) mendLocked() bool {
	if m.mendAt == 0 || m.uploaded < m.mendAt {
		return false
	}
	// Disks the resyncing agent did not list were not resynced.
	var unmended []layout.UnmendedDisk
	for _, d := range m.man.Disks {
		if !slices.Contains(m.mendDisks, d.Name) {
			unmended = append(unmended, layout.UnmendedDisk{Name: d.Name})
		}
	}
	changed := false
	for i, g := range m.man.Gaps {
		if g.Open() {
			// Every state up to LostTo lacks a lost record, even where
			// the resync found nothing to send (then mendAt may be
			// below it: what this server accepted).
			m.man.Gaps[i].Mended = max(m.mendAt, g.LostTo+1, g.From+1)
			m.man.Gaps[i].Unmended = unmended
			if len(unmended) > 0 {
				m.log.Warn("journal gap mended without these disks (not in the agent's hello): they get a full sync when they come back", logGapFrom, g.From, "disks", unmended)
			}
			m.log.Info("journal gap mended: the agent's checksum resync completed", logGapFrom, g.From, logMendedAt, m.man.Gaps[i].Mended)
			changed = true
		}
	}
	m.mendAt = 0
	return changed
}

// mendCovers reports whether the resync that is mending the open gap
// covered every disk of h. m.mu must be held.
func (m *machine) mendCovers(h *wire.Hello) bool {
	for _, d := range h.Disks {
		if !slices.Contains(m.mendDisks, d.Name) {
			return false
		}
	}
	return true
}

// replicaCheckTimeout bounds missingReplicas' storage calls, and claim's
// on a machine it need not claim to serve (a variable for the tests).
var replicaCheckTimeout = 10 * time.Second

// missingReplicas reports disks whose replica must be rebuilt by a full
// sync: its page blob is gone although the applier has applied
// everything (someone deleted it; while the applier lags, a missing blob
// is simply not created yet), or the applier found it gone after writing
// to it and recreated it empty, marked layout.MetaLost. A lost blob of an
// older generation is not reported: a newer one already replaces it.
func (m *machine) missingReplicas(ctx context.Context, h *wire.Hello) map[string]bool {
	if m.s.applier == nil {
		return nil
	}
	m.mu.Lock()
	caughtUp := m.man.DurableSeq > 0 && m.man.AppliedSeq >= m.man.DurableSeq
	gens := make(map[string]string, len(m.man.Disks))
	for _, d := range m.man.Disks {
		gens[d.Name] = d.Generation
	}
	m.mu.Unlock()
	// Bounded: during an outage the store's retries would hold the
	// hello past the agent's patience, and every reconnect with it.
	ctx, cancel := context.WithTimeout(ctx, replicaCheckTimeout)
	defer cancel()
	out := make(map[string]bool)
	for _, d := range h.Disks {
		info, err := m.s.store.Stat(ctx, layout.DiskName(m.name, d.Name))
		switch {
		case err != nil && !blobstore.IsNotFound(err):
			// Unknown: resume. A replica found lost later ends the
			// session (Server.ReplicaLost), and the next hello sees it.
			m.log.Warn("cannot check the replica page blob; resuming, a lost replica is caught once the account answers", logDisk, d.Name, logErr, err)
		case blobstore.IsNotFound(err) && caughtUp:
			m.log.Warn("replica page blob missing: full sync", logDisk, d.Name)
			out[d.Name] = true
		case err == nil && info.Metadata[layout.MetaLost] == "true" && info.Metadata[layout.MetaGeneration] == gens[d.Name]:
			m.log.Warn("replica page blob was lost and recreated empty: full sync", logDisk, d.Name)
			out[d.Name] = true
		}
	}
	return out
}

// segmentDurable records a segment that Put made durable.
func (m *machine) segmentDurable(id cache.SegmentID, size int64, last uint64, lastTime int64, hot *hotSeg, run wire.RunID) {
	m.mu.Lock()
	m.lastRun = run
	m.markedAt(lastTime)
	// One entry per cached segment, or deleting one would delete the
	// other (suspects under this name are settled before any hello).
	m.segs = slices.DeleteFunc(m.segs, func(x *segEntry) bool { return x.id == id })
	m.segs = append(m.segs, &segEntry{id: id, size: size, last: last, hot: hot})
	m.durable = max(m.durable, last)
	m.backlog += size
	m.mu.Unlock()
	m.s.cacheBytes.Add(size)
	m.kick()
}

// markedAt raises marked to the marker time nanos (0: none). m.mu is
// held.
func (m *machine) markedAt(nanos int64) {
	if t := time.Unix(0, nanos).UTC(); nanos != 0 && t.After(m.marked) {
		m.marked = t
	}
}

// noteMarker records a marker that arrived while every earlier record had
// been handed to the uploader.
func (m *machine) noteMarker(mk wire.Marker) {
	m.mu.Lock()
	m.markedAt(mk.UnixNano)
	if !m.hasNote || mk.UnixNano > m.note.UnixNano {
		m.note, m.hasNote = mk, true
	}
	if mk.Seq != m.idle.Seq || m.idle.UnixNano == 0 {
		m.idle = mk
	}
	m.mu.Unlock()
	m.kick()
}

// backlogBytes returns the bytes waiting for upload.
func (m *machine) backlogBytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fenced {
		return 0 // never uploaded here: it must not hold other applies back
	}
	return m.backlog
}

// appliedSeq is the applier's last report for m.
func (m *machine) appliedSeq() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.applied
}

// cacheShare is the bytes of m's segments in the cache (known sizes)
// that wait for their upload or for the applier. (Not the applied ones
// whose delete failed: a cache disk unmounted keeps them listed.)
func (m *machine) cacheShare() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var n int64
	for _, e := range m.segs {
		if !e.uploaded || e.last == 0 || e.last > m.applied {
			n += e.size
		}
	}
	return n
}

// waitUploaded blocks until every record ≤ seq is uploaded and the
// manifest saying so saved: what follows (a checksum compare applying the
// journal up to seq) must not act on a segment a crash could still make
// the process server take for lost.
func (m *machine) waitUploaded(ctx context.Context, seq uint64) error {
	for {
		m.mu.Lock()
		done, ch := m.savedDurable >= seq, m.progress
		m.mu.Unlock()
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

// current returns the session currently serving the machine, or nil.
func (m *machine) current() *session {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sess
}

var errReplaced = errors.New("agent reconnected on another connection")

// ctxMutex is a mutex that a waiter may give up on when its context
// ends: a hello must not wait out a manifest write that retries through
// an outage. The zero value is unlocked.
type ctxMutex struct {
	once sync.Once
	ch   chan struct{}
}

func (l *ctxMutex) c() chan struct{} {
	l.once.Do(func() { l.ch = make(chan struct{}, 1) })
	return l.ch
}

func (l *ctxMutex) Lock()   { l.c() <- struct{}{} }
func (l *ctxMutex) Unlock() { <-l.c() }

// LockCtx locks, or returns ctx's error once ctx ends first.
func (l *ctxMutex) LockCtx(ctx context.Context) error {
	select {
	case l.c() <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
