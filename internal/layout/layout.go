// Package layout names everything Lifeboat keeps in the storage account,
// so that the process server that writes it and the recovery tools that
// read it (with nothing but the account and the recovery key) agree.
//
//	<machine>/manifest.json                       Manifest (JSON block blob)
//	<machine>/keys/<key id hex>                   data key wrapped by the recovery key
//	<machine>/journal/<first seq>-<last seq>      sealed journal segment (block blob)
//	<machine>/disks/<disk>                        replica page blob; snapshots are recovery points
package layout

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// DefaultContainer is the container Lifeboat uses unless told otherwise.
const DefaultContainer = "lifeboat"

// ManifestVersion is the manifest format written and accepted.
const ManifestVersion = 1

// Metadata keys of journal segments and recovery points.
const (
	MetaFirstSeq   = "first_seq"
	MetaLastSeq    = "last_seq"
	MetaFirstTime  = "first_time" // unix nanos of the first marker in the segment, 0 if none
	MetaLastTime   = "last_time"  // unix nanos of the last marker in the segment, 0 if none
	MetaMarkers    = "markers"    // comma-separated marker kinds present (crash, app)
	MetaSeq        = "seq"        // recovery point: every record ≤ seq is in the snapshot
	MetaTime       = "time"       // recovery point time, RFC 3339 nano, UTC
	MetaKind       = "kind"       // recovery point kind: crash | app
	MetaPoint      = "point"      // id shared by the snapshots of all disks of one point
	MetaAppliedSeq = "applied_seq"
	// MetaPointAnchor: on a replica page blob, unix nanos of the marker
	// the applier times the next crash-consistent point from while the
	// machine has no recorded point (0: none yet), as of applied_seq.
	MetaPointAnchor = "point_anchor"
	// MetaWritingTo: on a replica page blob, the highest sequence whose
	// records a flush began to write (absent: applied_seq): past
	// applied_seq, the pages may hold records up to it.
	MetaWritingTo  = "writing_to"
	MetaGeneration = "generation"
	MetaKeyFP      = "fingerprint" // recovery key fingerprint (seal.Fingerprint) on wrapped keys
	// MetaCut: when the applier cut a recovery point, RFC 3339 nano, UTC,
	// by the applier's clock. Retention ages points by it: MetaTime comes
	// from the agent's clock, which may be off.
	MetaCut = "cut"
	// MetaLost ("true") marks a replica page blob recreated empty after
	// its blob went missing: it holds no usable state until the disk's
	// next generation, so no point is cut from it.
	MetaLost = "replica_lost"
)

// Manifest is the per-machine state in the account.
type Manifest struct {
	Version    int    `json:"version"`
	Machine    string `json:"machine"`
	Disks      []Disk `json:"disks"`
	KeyID      string `json:"key_id"`      // hex of the machine's data key id
	DurableSeq uint64 `json:"durable_seq"` // every record ≤ this is in the journal (uploaded)
	AppliedSeq uint64 `json:"applied_seq"` // every record ≤ this is in the replica page blobs
	// JournalFrom: every record ≥ JournalFrom (up to DurableSeq) is in the
	// journal; retention raises it before deleting segments. 0: the whole
	// journal is there.
	JournalFrom      uint64    `json:"journal_from,omitempty"`
	RecoverableUntil time.Time `json:"recoverable_until"`
	// IdleSeq and IdleSince: every record ≤ IdleSeq was written before
	// IdleSince, the first time marker of an idle period. The journal
	// only receives that period's markers with the next write, so
	// recovery to a time inside it resolves through these.
	IdleSeq   uint64    `json:"idle_seq,omitempty"`
	IdleSince time.Time `json:"idle_since,omitzero"`
	// Gaps are where the journal lacks acknowledged records (see Gap).
	Gaps []Gap `json:"gaps,omitempty"`
	// LastRun is the agent run (hex of wire.RunID) that sent the newest
	// segment of the journal: after a process server restart with an
	// empty cache, agents still learn whose records are durable.
	LastRun string `json:"last_run,omitempty"`
	// Owner is the process server (its certificate's name) whose agent
	// hello last claimed the machine: another finding a cache of the
	// machine at its start uploads nothing of it until a hello claims it
	// back.
	Owner string `json:"owner,omitempty"`
	// Claim fences the replicas: each claim that takes the machine over
	// (a hello from an agent another process server served, or back
	// after a fence) raises it (NextClaim), and that server's applier
	// claims the replica page blobs with it before writing them
	// (blobstore.ClaimPageBlob), so that the writes of a server that
	// lost the machine no longer land. 0: none yet.
	Claim   int64     `json:"claim,omitempty"`
	Updated time.Time `json:"updated"`
	// Seal authenticates the rest under the machine's data key
	// (recovery.SealManifest): base64 of a sealed blob with no plaintext
	// whose associated data is the manifest without it.
	Seal string `json:"seal,omitempty"`
}

// NextClaim returns the claim after prev: the time in microseconds, or
// one more than prev when the clock is behind it. A manifest written anew
// (its machine's blobs left behind) thus still claims above the fences
// of the replicas it finds. (Microseconds stay below
// blobstore.MaxFence, which Azurite keeps exactly, until the year 2255.)
func NextClaim(prev int64) int64 { return max(prev+1, time.Now().UnixMicro()) }

// A Gap is a range of sequences at which the journal and the replicas are
// not the disks: records from From on were acknowledged to the agent but
// lost before they reached the journal (a cache lost beyond its parity, a
// process server restored from an old state). The agent's checksum resync
// repairs the replicas; Mended is the first sequence at which it is known
// complete (0 while it is not), so that every state at From ≤ seq <
// Mended, or seq ≥ From while open, is wrong and must not be recovered.
// The process server records a gap before durable_seq passes From.
//
// LostTo is the last sequence that may have been lost. A journal segment
// lost is replaced by a tombstone (a segment with only its header), so
// that the chain of segment headers stays whole.
//
// Unmended lists the disks the mending resync did not cover (not in the
// agent's hello then): their states stay inside the gap until the full
// sync they get when they come back (Until, 0 while not yet).
type Gap struct {
	From     uint64         `json:"from"`
	LostTo   uint64         `json:"lost_to"`
	Mended   uint64         `json:"mended,omitempty"`
	Unmended []UnmendedDisk `json:"unmended,omitempty"`
}

// UnmendedDisk is a disk a gap's mending left out.
type UnmendedDisk struct {
	Name  string `json:"name"`
	Until uint64 `json:"until,omitempty"` // start of its full sync's generation; 0: none yet
}

// Open reports whether g's resync has not completed yet.
func (g Gap) Open() bool { return g.Mended == 0 }

// Covers reports whether the state after every record ≤ seq is inside g.
func (g Gap) Covers(seq uint64) bool { return seq >= g.From && (g.Open() || seq < g.Mended) }

// GapAt returns the gap covering seq, if any.
func (m *Manifest) GapAt(seq uint64) (Gap, bool) { return GapAt(m.Gaps, seq) }

// GapAt returns the gap of gaps covering seq, if any.
func GapAt(gaps []Gap, seq uint64) (Gap, bool) {
	for _, g := range gaps {
		if g.Covers(seq) {
			return g, true
		}
	}
	return Gap{}, false
}

// DiskGapAt returns the gap covering the state after every record ≤ seq
// of disk d: a machine-wide one, or one d was left out of when it was
// mended, until its full sync's generation starts.
func (m *Manifest) DiskGapAt(d *Disk, seq uint64) (Gap, bool) { return DiskGapAt(m.Gaps, d.Name, seq) }

// DiskGapAt is Manifest.DiskGapAt over gaps, for the disk named disk.
func DiskGapAt(gaps []Gap, disk string, seq uint64) (Gap, bool) {
	if g, ok := GapAt(gaps, seq); ok {
		return g, true
	}
	for _, g := range gaps {
		for _, u := range g.Unmended {
			if u.Name == disk && seq >= g.From && (u.Until == 0 || seq < u.Until) {
				return g, true
			}
		}
	}
	return Gap{}, false
}

// HasOpenGap reports whether a gap is open (not mended yet).
func (m *Manifest) HasOpenGap() bool {
	for _, g := range m.Gaps {
		if g.Open() {
			return true
		}
	}
	return false
}

// Disk is one protected disk of a machine.
type Disk struct {
	Name       string `json:"name"`
	Size       uint64 `json:"size"`
	Generation string `json:"generation"` // hex of wire.Generation; a new one means a new replica
	// GenerationStart is the first sequence of Generation: the replica
	// restarts from zeros there (the agent's full sync follows), and the
	// records before it belong to earlier generations. 0 (manifests
	// written before this field): unknown.
	GenerationStart uint64 `json:"generation_start,omitempty"`
	// UnprotectedFrom: from this sequence on, the agent's hellos left the
	// disk out (it no longer protects it, or was refused before it copied
	// it): its replica stays as it was, and no state of the disk from
	// there on is in the account. A hello that lists it again starts a
	// new generation (a full copy). 0: protected.
	UnprotectedFrom uint64 `json:"unprotected_from,omitempty"`
	// UnprotectedSince is the newest marker time the process server held
	// when that hello came, uploaded or not (zero: none yet): the last
	// time vouched for while the disk was protected. Markers dated later
	// may still carry sequences below UnprotectedFrom (an idle machine),
	// and say nothing of this disk.
	UnprotectedSince time.Time `json:"unprotected_since,omitzero"`
	// Previous lists the disk's earlier generations, oldest first, so that
	// applying and recovering records from before GenerationStart knows
	// where each generation began and how big the disk was.
	Previous []Generation `json:"previous_generations,omitempty"`
}

// Generation is one generation of a disk's replica: from Start on, the
// replica is zeros plus the records from Start.
type Generation struct {
	Generation       string    `json:"generation"`
	Size             uint64    `json:"size"`
	Start            uint64    `json:"start,omitempty"`
	UnprotectedFrom  uint64    `json:"unprotected_from,omitempty"` // see Disk
	UnprotectedSince time.Time `json:"unprotected_since,omitzero"` // see Disk
}

// NewGeneration makes gen, of size bytes and starting at sequence start,
// the disk's current generation; the current one, if any, joins Previous.
func (d *Disk) NewGeneration(gen string, size, start uint64) {
	if d.Generation != "" {
		// Clipped: the manifest being written may share the old array.
		d.Previous = append(slices.Clip(d.Previous), d.Current())
	}
	d.Generation, d.Size, d.GenerationStart = gen, size, start
	d.UnprotectedFrom, d.UnprotectedSince = 0, time.Time{}
}

// Current returns the disk's current generation.
func (d *Disk) Current() Generation {
	return Generation{Generation: d.Generation, Size: d.Size, Start: d.GenerationStart,
		UnprotectedFrom: d.UnprotectedFrom, UnprotectedSince: d.UnprotectedSince}
}

// UnprotectedAt reports whether the account lacks the disk's state at
// sequence seq, or at time at when it is not zero (a state asked for by
// time, or a point's): its agent had left it out by then (see
// UnprotectedFrom and UnprotectedSince). It returns the generation whose
// protection ended.
func (d *Disk) UnprotectedAt(seq uint64, at time.Time) (Generation, bool) {
	g := d.Generations()[d.GenerationAt(seq)]
	return g, g.UnprotectedFrom != 0 && (seq >= g.UnprotectedFrom || !at.IsZero() && at.After(g.UnprotectedSince))
}

// Generations returns every generation of the disk, oldest first.
func (d *Disk) Generations() []Generation {
	return append(slices.Clone(d.Previous), d.Current())
}

// GenerationAt returns the index in Generations of the generation that
// record seq belongs to: the newest that starts at or before seq, or the
// oldest when seq precedes them all (the disk read as zeros then).
func (d *Disk) GenerationAt(seq uint64) int {
	gens := d.Generations()
	for i := len(gens) - 1; i > 0; i-- {
		if gens[i].Start <= seq {
			return i
		}
	}
	return 0
}

// ForgetGaps drops the gaps that only states before sequence oldest
// needed, once retention has made those unrecoverable (no recovery point
// and no journal before oldest): mended gaps that end at or before it,
// with every disk they left out fully synced by then. Open gaps stay; no
// recovery point is ever cut inside a gap. It returns how many it dropped.
// Without it the list grows for the life of the machine. (Replaced disk
// generations are kept: recovery takes the oldest one for the disk's
// first, and they are rare.)
func (m *Manifest) ForgetGaps(oldest uint64) int {
	kept := m.Gaps[:0:0]
	for _, g := range m.Gaps {
		done := !g.Open() && g.Mended <= oldest
		for _, u := range g.Unmended {
			done = done && u.Until != 0 && u.Until <= oldest
		}
		if !done {
			kept = append(kept, g)
		}
	}
	n := len(m.Gaps) - len(kept)
	if n > 0 {
		m.Gaps = kept
	}
	return n
}

// Disk returns the named disk, or nil.
func (m *Manifest) Disk(name string) *Disk {
	for i := range m.Disks {
		if m.Disks[i].Name == name {
			return &m.Disks[i]
		}
	}
	return nil
}

// MarshalManifest encodes m.
func MarshalManifest(m *Manifest) ([]byte, error) { return json.MarshalIndent(m, "", "  ") }

// UnmarshalManifest decodes and checks a manifest.
func UnmarshalManifest(b []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if m.Version != ManifestVersion {
		return nil, fmt.Errorf("manifest: version %d, this build reads %d", m.Version, ManifestVersion)
	}
	return &m, nil
}

// ManifestName is the manifest blob of machine.
func ManifestName(machine string) string { return machine + "/manifest.json" }

// KeyName is the wrapped data key blob of machine.
func KeyName(machine string, keyID [8]byte) string {
	return KeysPrefix(machine) + hex.EncodeToString(keyID[:])
}

// KeysPrefix lists machine's wrapped data keys.
func KeysPrefix(machine string) string { return machine + "/keys/" }

// JournalPrefix lists machine's journal segments.
func JournalPrefix(machine string) string { return machine + "/journal/" }

// SegmentName names the segment holding records first..last. Zero-padded,
// so that names sort in sequence order.
func SegmentName(machine string, first, last uint64) string {
	return fmt.Sprintf("%s%020d-%020d", JournalPrefix(machine), first, last)
}

// ParseSegmentName returns the sequence range of a segment blob name.
func ParseSegmentName(name string) (first, last uint64, err error) {
	i := strings.LastIndexByte(name, '/')
	a, b, ok := strings.Cut(name[i+1:], "-")
	if !ok {
		return 0, 0, fmt.Errorf("segment name %q: no sequence range", name)
	}
	if first, err = strconv.ParseUint(a, 10, 64); err == nil {
		last, err = strconv.ParseUint(b, 10, 64)
	}
	if err != nil || last < first {
		return 0, 0, fmt.Errorf("segment name %q: bad sequence range", name)
	}
	return first, last, nil
}

// PointsPrefix lists machine's sealed recovery point records.
func PointsPrefix(machine string) string { return machine + "/points/" }

// PointRecordName is the sealed record of the recovery point with id
// point (recovery.PointID) and kind (crash or app: an app-consistent
// marker at a crash point's sequence snapshots the disks again).
func PointRecordName(machine, point, kind string) string {
	return PointsPrefix(machine) + point + "-" + kind
}

// ParsePointRecordName returns the sequence and kind of a point record
// name (PointRecordName) under prefix PointsPrefix(machine).
func ParsePointRecordName(machine, name string) (seq uint64, kind string, err error) {
	rest, ok := strings.CutPrefix(name, PointsPrefix(machine))
	id, kind, ok2 := strings.Cut(rest, "-")
	if ok && ok2 && len(id) == 20 && kind != "" {
		if seq, err = strconv.ParseUint(id, 10, 64); err == nil {
			return seq, kind, nil
		}
	}
	return 0, "", fmt.Errorf("point record name %q: want %s<20-digit sequence>-<kind>", name, PointsPrefix(machine))
}

// DiskName is the replica page blob of a machine's disk.
func DiskName(machine, disk string) string { return machine + "/disks/" + disk }

// CheckName rejects machine and disk names that would escape their place
// in the layout, or end a blob name with a dot (Azure drops it: the
// replica of disk "data." could not be created).
func CheckName(what, s string) error {
	if s == "" || len(s) > 128 || strings.ContainsAny(s, "/\\") || strings.HasSuffix(s, ".") {
		return fmt.Errorf("%s %q: must be 1-128 characters without slashes, not ending with a dot", what, s)
	}
	return nil
}

// MaxDiskSize is the largest disk a replica page blob holds (8 TiB).
const MaxDiskSize = 8 << 40

// CheckDiskSize rejects a disk too large for its replica page blob.
func CheckDiskSize(name string, size uint64) error {
	if size > MaxDiskSize {
		return fmt.Errorf("disk %q is %d bytes: a replica page blob holds at most 8 TiB", name, size)
	}
	return nil
}
