// Package cache is the process server's durable segment journal: change
// stream segments are made durable here before the agent is acked, and are
// read back for upload. The process server stores them already compressed
// and encrypted (processserver/segment.go): the cache never sees plaintext.
//
// Each segment is erasure coded (Reed-Solomon) into k data and m parity
// shards, one shard per cache directory, so k+m equals the number of
// directories and any m directories (cache disks) can be lost or corrupted
// without losing a segment. Every shard carries CRC32C checksums of its
// header and data; a shard that fails them is treated as missing, so Get
// returns the original bytes or an error, never wrong data.
//
// On disk, directory i holds shard i of every segment as
// <dir>/<stream>/<segment as 16 hex digits>.shard, plus a marker file
// naming the cache and the directory's position, so a reordered or foreign
// directory is refused and a wiped one is recognised and rebuilt by Scrub.
//
// A Cache is safe for concurrent use. Operations on the same segment are
// serialised; operations on distinct segments run in parallel, and the
// shards of one segment are written and read in parallel across disks.
// One process owns a set of directories at a time: Open locks them, until
// Close.
package cache

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/klauspost/reedsolomon"
	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/crc32c"
)

// Log attribute keys.
const (
	logDir    = "dir"
	logStream = "stream"
	logSeq    = "seq"
	logShard  = "shard"
	logErr    = "err"
	logDisk   = "disk"
	logDirs   = "dirs"
)

const (
	shardExt = ".shard"
	tmpInfix = ".tmp-"

	// DefaultMaxSegmentSize is Options.MaxSegmentSize when unset.
	DefaultMaxSegmentSize = 64 << 20
	// maxReadSegment is the least segment length a read believes from a
	// shard header whose checksum passed (the file's size bounds what is
	// read): not MaxSegmentSize alone, so that lowering the configured
	// segment size does not make segments cached before unreadable.
	maxReadSegment = 1 << 30

	maxDirs      = 64
	maxStreamLen = 128
)

var (
	// ErrNotFound is returned when no directory holds a shard of the segment.
	ErrNotFound = errors.New("segment not in cache")

	// ErrUnrecoverable is returned when some shards of the segment exist but
	// more than m are missing or corrupt, so it cannot be reconstructed.
	ErrUnrecoverable = errors.New("segment unrecoverable: too many shards missing or corrupt")

	// ErrUnavailable is returned when the segment cannot be reconstructed
	// from the shards that could be read, but some could not be: a read
	// failed (EIO, EACCES, EMFILE...) or a directory's disk is not
	// mounted. The segment may well be intact: retry later, do not take
	// it for lost.
	ErrUnavailable = errors.New("segment unavailable: shards cannot be read now")
)

// SegmentID names a segment: the stream (one per protected machine) and the
// segment's sequence number in it.
type SegmentID struct {
	Stream string
	Seq    uint64
}

func (id SegmentID) String() string { return id.Stream + "/" + strconv.FormatUint(id.Seq, 10) }

// Options tune Open. The zero value is valid.
type Options struct {
	// DataShards (k) and ParityShards (m) set the erasure code; k+m must be
	// the number of directories and m >= 1 when there are two or more.
	// Both zero picks DefaultGeometry. Segments keep the geometry they were
	// written with, so changing it affects only new segments.
	DataShards, ParityShards int

	// WriteQuorum is how many shards Put must make durable before it
	// returns nil; 0 means all k+m. A lower value (at least k, or k+1 when
	// m >= 1) keeps the server accepting data with one cache disk failed,
	// at the price of reduced redundancy until Scrub runs.
	WriteQuorum int

	// HangAfter is how long an operation on one directory may run before
	// the directory is taken for hung and left behind (see ErrHung). 0
	// means DefaultHangAfter.
	HangAfter time.Duration

	// MaxSegmentSize bounds Put (and, with a fixed floor of 1 GiB, what
	// Get believes from a shard header). 0 means DefaultMaxSegmentSize.
	MaxSegmentSize int

	// FS replaces the file system, for fault injection. nil means OSFS.
	FS FS

	// Fstab is the file system table consulted before a directory with no
	// cache marker is set up (new cache or replaced disk): one below a
	// mount point it lists that is not mounted is refused. "" means
	// /etc/fstab; a missing table is no table.
	Fstab string

	// Logger receives warnings about degraded directories. nil discards.
	Logger *slog.Logger
}

// DefaultGeometry returns the erasure code used for n directories when
// Options leaves it unset: 1 -> 1+0, 2 -> 1+1, 3 -> 2+1, 4 -> 2+2 and
// n >= 5 -> (n-2)+2. Two parity shards from four disks on tolerate a disk
// failure during the rebuild of another.
func DefaultGeometry(n int) (k, m int) {
	switch {
	case n <= 1:
		return 1, 0
	case n == 2:
		return 1, 1
	case n == 3:
		return 2, 1
	default:
		return n - 2, 2
	}
}

// Cache is an erasure-coded segment store over several directories.
type Cache struct {
	dirs   []string
	k, m   int
	quorum int
	maxSeg int
	fs     FS
	// hangAfter: see Options.HangAfter.
	hangAfter time.Duration
	log       *slog.Logger
	fstab     string
	replaced  []string
	id        string // the cache's identity, in every directory's marker

	enc     reedsolomon.Encoder // for (k, m); nil when m == 0
	encMu   sync.Mutex
	encs    map[[2]uint8]reedsolomon.Encoder // other geometries found on disk
	lastGen atomic.Uint64
	locks   [64]sync.Mutex
	seed    maphash.Seed
	// bufs keeps the buffers that hold all shards of one Put across GC
	// cycles, which empty a sync.Pool: allocating and zeroing 12 MiB per
	// segment showed in profiles.
	bufs chan *[]byte
	// noDirect[i]: directory i's file system refused O_DIRECT.
	noDirect []atomic.Bool

	streamMu   sync.Mutex
	streamDirs map[string]bool // "<slot>/<stream>" known to exist durably
	// vanished[i]: a write found a stream directory of directory i gone,
	// or a Put succeeded without its shard there (see CheckDirs).
	vanished []atomic.Bool
	// pending[i]: directory i was found wiped or replaced and its shards
	// are being rebuilt; its marker is written once a Scrub completes, so
	// that a restart before then finds it unmarked and scrubs again.
	pending []atomic.Bool
	// sentinel[i]: the sentinel of pending directory i was written (its
	// disappearance is then a second loss); epoch[i] moves whenever
	// directory i is found lost or a write to it fails, so that a Scrub
	// marks only a directory nothing happened to while it ran.
	sentinel []atomic.Bool
	epoch    []atomic.Uint64
	dirMu    []sync.Mutex // CheckDirs and markRebuilt, per directory
	// mounts[i]: where directory i's file system was mounted when the
	// cache was set up (markers; "" the root file system), which it must
	// still be on to take writes; unmounted[i]: it was found not to be
	// (logged once until it is again).
	mounts      []string
	mountsKnown bool // mounts may be written into markers (checkMarkers)
	unmounted   []atomic.Bool
	mountedTill []atomic.Int64 // unix ns until which a positive check stands (checkMounted)
	mountMu     []sync.Mutex   // checkMountedNow, per directory: a stale walk never wins

	// hung[i]: operations on directory i abandoned and still running
	// (see Options.HangAfter), since hungSince[i] (unix ns).
	hung      []atomic.Int32
	hungSince []atomic.Int64
	hungMu    []sync.Mutex // abandon and unhang

	heldMu sync.Mutex
	held   []*os.File // the directories' lock files (lockDirs), until Close
}

// Open opens (creating if needed) a cache over dirs. Each directory must be
// on its own disk for the redundancy to mean anything.
//
// Directories that belong to the cache carry a marker. Open refuses
// directories from another cache, or listed in another order or number
// than when the cache was created. A directory without a marker while
// others have one was wiped or replaced: Open adopts it, logs a warning and
// lists it in Replaced; its shards are rebuilt by Scrub, and until then
// reads reconstruct from the other directories. Its marker is written
// when a Scrub completes: until then every Open finds it replaced.
//
// The markers record where each directory's file system was mounted when
// the cache was set up. A directory no longer on that mount has its disk
// unmounted: Open refuses to start, and while the cache is open writes to
// it fail (Put then fails: nothing is acknowledged) rather than land on
// the file system below.
//
// Open locks the directories (a lock file in each) until Close: a second
// Open of any of them, by this process or another, fails until then.
func Open(dirs []string, opts Options) (*Cache, error) {
	n := len(dirs)
	if n == 0 || n > maxDirs {
		return nil, fmt.Errorf("cache: need 1 to %d directories, got %d", maxDirs, n)
	}
	k, m := opts.DataShards, opts.ParityShards
	if k == 0 && m == 0 {
		k, m = DefaultGeometry(n)
	}
	switch {
	case k < 1 || m < 0 || k+m != n:
		return nil, fmt.Errorf("cache: %d data + %d parity shards do not match %d directories", k, m, n)
	case n >= 2 && m < 1:
		return nil, fmt.Errorf("cache: %d directories need at least 1 parity shard", n)
	}
	quorum := opts.WriteQuorum
	// Past k+1 (an acked segment survives a directory's loss), more than
	// m: an overwrite (a stream's state records) that reached only a
	// quorum must leave fewer than k shards of the old version, or a
	// loss of the new one's shards would read the old one back as valid.
	minQuorum := k
	if m > 0 {
		minQuorum = max(k+1, m+1)
	}
	if quorum == 0 {
		quorum = n
	} else if quorum < minQuorum || quorum > n {
		return nil, fmt.Errorf("cache: write quorum %d: with %d directories (%d data + %d parity shards) it must be %d to %d (--cache-write-quorum)", quorum, n, k, m, minQuorum, n)
	}
	c := &Cache{
		k: k, m: m, quorum: quorum,
		maxSeg:      cmp.Or(opts.MaxSegmentSize, DefaultMaxSegmentSize),
		hangAfter:   cmp.Or(opts.HangAfter, DefaultHangAfter),
		fs:          cmp.Or[FS](opts.FS, OSFS{}),
		noDirect:    make([]atomic.Bool, n),
		vanished:    make([]atomic.Bool, n),
		pending:     make([]atomic.Bool, n),
		sentinel:    make([]atomic.Bool, n),
		epoch:       make([]atomic.Uint64, n),
		dirMu:       make([]sync.Mutex, n),
		unmounted:   make([]atomic.Bool, n),
		mountedTill: make([]atomic.Int64, n),
		mountMu:     make([]sync.Mutex, n),
		hung:        make([]atomic.Int32, n),
		hungSince:   make([]atomic.Int64, n),
		hungMu:      make([]sync.Mutex, n),
		log:         opts.Logger,
		fstab:       cmp.Or(opts.Fstab, "/etc/fstab"),
		encs:        make(map[[2]uint8]reedsolomon.Encoder),
		seed:        maphash.MakeSeed(),
		streamDirs:  make(map[string]bool),
		bufs:        make(chan *[]byte, 4),
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	seen := make(map[string]bool)
	for _, d := range dirs {
		abs, err := filepath.Abs(d)
		if err != nil {
			return nil, fmt.Errorf("cache: directory %q: %w", d, err)
		}
		if seen[abs] {
			return nil, fmt.Errorf("cache: directory %s listed twice", abs)
		}
		seen[abs] = true
		c.dirs = append(c.dirs, abs)
	}
	if m > 0 {
		enc, err := c.encoder(uint8(k), uint8(m))
		if err != nil {
			return nil, err
		}
		c.enc = enc
	}
	// Before the markers are read, which would take an existing
	// directory reached twice for a reordered one.
	if err := c.checkDistinct(); err != nil {
		return nil, err
	}
	if err := c.checkMarkers(); err != nil {
		c.Close()
		return nil, err
	}
	c.removeTemps()
	c.warnSharedDisks()
	return c, nil
}

// warnSharedDisks warns when more than m directories lie on one disk
// (partitions, device mapper and loop devices followed down): the cache
// survives the loss of m directories, not of a disk that holds more.
func (c *Cache) warnSharedDisks() {
	if len(c.dirs) < 2 {
		return // no redundancy to lose
	}
	on := map[blockdev.Dev][]string{}
	var disks []blockdev.Dev
	for _, d := range c.dirs {
		fs, err := blockdev.FileSystemDev(d)
		if err != nil {
			continue
		}
		for _, disk := range blockdev.Disks(fs) {
			if on[disk] == nil {
				disks = append(disks, disk)
			}
			on[disk] = append(on[disk], d)
		}
	}
	for _, disk := range disks {
		if dirs := on[disk]; len(dirs) > c.m {
			c.log.Warn("cache directories share one disk: losing it loses more shards of every segment than the cache can rebuild; put each directory on a disk of its own",
				logDisk, blockdev.Name(disk), logDirs, strings.Join(dirs, ","), "shards", len(dirs), "parity", c.m)
		}
	}
}

// lockName is the file in each cache directory that the process holding
// the cache open keeps an exclusive lock on (flock: the kernel releases it
// when the process dies, so a crash leaves nothing to clean up).
const lockName = markerName + ".lock"

// lockDirs locks every directory for this process, before anything is
// written: a second process server on the same cache (one started by hand
// while the service runs) would remove the first's temporary files in
// flight, and the two would overwrite each other's shards.
func (c *Cache) lockDirs() error {
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	for _, d := range c.dirs {
		f, err := os.OpenFile(filepath.Join(d, lockName), os.O_RDWR|os.O_CREATE, 0o640)
		if err != nil {
			return fmt.Errorf("cache: lock directory %s: %w", d, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return fmt.Errorf("cache: cache directory %s is in use by another process server: stop it first", d)
			}
			return fmt.Errorf("cache: lock directory %s: %w", d, err)
		}
		c.held = append(c.held, f)
	}
	return nil
}

// Close releases the cache's directories to another process. The cache
// must not be used after; closing it again does nothing.
func (c *Cache) Close() error {
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	var errs []error
	for _, f := range c.held {
		errs = append(errs, f.Close()) // which drops the lock
	}
	c.held = nil
	return errors.Join(errs...)
}

// checkDistinct fails when two of the directories that exist are one (a
// symlink, a bind mount): both slots would write the same files, and a
// segment would not survive the loss of m disks.
func (c *Cache) checkDistinct() error {
	seen := make([]os.FileInfo, len(c.dirs))
	for i, d := range c.dirs {
		fi, err := os.Stat(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue // not created yet: checked again once it is
		}
		if err != nil {
			return fmt.Errorf("cache: directory %s: %w", d, err)
		}
		for j, other := range seen[:i] {
			if other != nil && os.SameFile(fi, other) {
				return fmt.Errorf("cache: %s and %s are the same directory (a symlink or bind mount): "+
					"each cache directory must be on its own disk", c.dirs[j], d)
			}
		}
		seen[i] = fi
	}
	return nil
}

// Dirs returns the cache directories, in shard order.
func (c *Cache) Dirs() []string { return slices.Clone(c.dirs) }

// Geometry returns the erasure code used for new segments.
func (c *Cache) Geometry() (k, m int) { return c.k, c.m }

// Replaced returns the directories Open found wiped or replaced. Run Scrub
// to restore their shards.
func (c *Cache) Replaced() []string { return slices.Clone(c.replaced) }

func (c *Cache) encoder(k, m uint8) (reedsolomon.Encoder, error) {
	c.encMu.Lock()
	defer c.encMu.Unlock()
	key := [2]uint8{k, m}
	if e, ok := c.encs[key]; ok {
		return e, nil
	}
	// One goroutine: Put codes a 64 KiB stripe at a time, too little to
	// split, and segments are coded in parallel already (one per stream).
	e, err := reedsolomon.New(int(k), int(m), reedsolomon.WithMaxGoroutines(1))
	if err != nil {
		return nil, fmt.Errorf("cache: reed-solomon %d+%d: %w", k, m, err)
	}
	c.encs[key] = e
	return e, nil
}

// lock serialises operations on one segment.
func (c *Cache) lock(id SegmentID) *sync.Mutex {
	var h maphash.Hash
	h.SetSeed(c.seed)
	h.WriteString(id.Stream)
	h.WriteByte(0)
	h.WriteString(strconv.FormatUint(id.Seq, 16))
	return &c.locks[h.Sum64()%uint64(len(c.locks))]
}

// nextGen returns a generation larger than any this process handed out,
// close to wall-clock nanoseconds so that it also grows across restarts.
func (c *Cache) nextGen() uint64 {
	for {
		old := c.lastGen.Load()
		g := max(old+1, uint64(time.Now().UnixNano()))
		if c.lastGen.CompareAndSwap(old, g) {
			return g
		}
	}
}

// CheckStream says why s cannot name a stream (a machine), if it cannot.
func CheckStream(s string) error {
	if s == "" || len(s) > maxStreamLen || s[0] == '.' {
		return fmt.Errorf("cache: invalid stream name %q: want 1-%d characters, not starting with '.'", s, maxStreamLen)
	}
	if strings.HasPrefix(s, markerName) {
		// The cache's own files (marker, lock, sentinel, records) are
		// named so, beside the stream directories.
		return fmt.Errorf("cache: invalid stream name %q: names starting with %q are the cache's own", s, markerName)
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("cache: invalid stream name %q: only letters, digits, '-', '_' and '.' are allowed", s)
		}
	}
	return nil
}

func segName(seq uint64) string {
	return fmt.Sprintf("%016x%s", seq, shardExt)
}

func (c *Cache) shardPath(slot int, id SegmentID) string {
	return filepath.Join(c.dirs[slot], id.Stream, segName(id.Seq))
}

// Put stores data as segment id, replacing any previous content. When Put
// returns nil, at least WriteQuorum shards (by default all) are written,
// fsync'd, renamed into place and their directories fsync'd: the segment
// survives a crash and the loss of any m directories (fewer when the quorum
// was lower than k+m and a shard failed). On error nothing is promised: the
// caller must not ack, and a later Get may return either the old or the
// new content, never a mix.
//
// A directory that hangs (see Options.HangAfter) is left behind: its shard counts
// as failed, and Put returns without waiting for it.
//
// Put is PutSummed for a caller that does not reuse data.
func (c *Cache) Put(id SegmentID, data []byte) error {
	_, err := c.PutSummed(id, data, nil)
	return err
}

// PutSummed is Put with the data shards' checksums gathered by sums (see
// NewSums) as data was produced, which saves reading data again here.
// sums must have been given all of data, and nothing else.
//
// data is not retained, unless held: a shard write to a directory that
// hangs may still read it, and will whenever the disk answers, so the
// caller must not write to data again (its memory is left to the garbage
// collector). The shard that write makes is not renamed into place once
// it is abandoned (one abandoned while it renames lands whole: its bytes
// were written before).
func (c *Cache) PutSummed(id SegmentID, data []byte, sums *Sums) (held bool, err error) {
	if err := CheckStream(id.Stream); err != nil {
		return false, err
	}
	if len(data) == 0 || len(data) > c.maxSeg {
		return false, fmt.Errorf("cache: put %s: segment of %d bytes, want 1 to %d", id, len(data), c.maxSeg)
	}
	if sums != nil && (sums.segLen != len(data) || sums.pos != len(data) || len(sums.crcs) != c.k) {
		return false, fmt.Errorf("cache: put %s: checksums of %d of %d bytes over %d shards for a segment of %d bytes over %d",
			id, sums.pos, sums.segLen, len(sums.crcs), len(data), c.k)
	}
	if err := c.checkQuorum(); err != nil {
		return false, fmt.Errorf("cache: put %s: %w", id, err)
	}
	mu := c.lock(id)
	mu.Lock()
	defer mu.Unlock()

	// The data shards are slices of data, written from it as they are:
	// shardLen is a multiple of directAlign, so that on an aligned data
	// each starts on a boundary that O_DIRECT takes. Only the last
	// partial directAlign block of data, and the zeroes past it, go
	// through a tail buffer; the parity shards are computed into their
	// own buffers.
	// writesHeld: a hung shard write still reads the buffers below.
	writesHeld := false
	copied := false // data is a copy of the caller's
	if !isAligned(data) {
		bp := c.getBuf(len(data) + directAlign)
		defer func() {
			if !writesHeld {
				c.putBuf(bp)
			}
		}()
		b := aligned(*bp)[:len(data)]
		copy(b, data)
		data, copied = b, true
	}
	n := c.k + c.m
	shardLen := int(alignedShardLen(uint64(len(data)), uint8(c.k)))
	hl := fixedHdrLen + len(id.Stream) + 4
	hdrLen := dataOffset(shardVersion, hl)
	// body[i]: the aligned part of data shard i taken from data; tail[i]:
	// the rest of the shard (whole for parity shards).
	body := make([]int, c.k)
	tailLen := 0
	for i := range c.k {
		body[i] = max(0, min(shardLen, len(data)-i*shardLen)) &^ (directAlign - 1)
		tailLen += shardLen - body[i]
	}
	bp := c.getBuf(n*hdrLen + c.m*shardLen + tailLen + directAlign)
	defer func() {
		if !writesHeld {
			c.putBuf(bp)
		}
	}()
	buf := aligned(*bp)[:n*hdrLen+c.m*shardLen+tailLen]
	hdrs := make([][]byte, n)
	tails := make([][]byte, n)
	for i := range n {
		hdrs[i], buf = buf[:hdrLen:hdrLen], buf[hdrLen:]
		clear(hdrs[i])
		tl := shardLen
		if i < c.k {
			tl -= body[i]
		}
		tails[i], buf = buf[:tl:tl], buf[tl:]
		if i < c.k {
			clear(tails[i])
			if o := i*shardLen + body[i]; o < len(data) {
				copy(tails[i], data[o:min(len(data), (i+1)*shardLen)])
			}
		}
	}
	// One pass over the segment, a stripe at a time while it is in the
	// CPU cache: checksum the data, compute the stripe's parity and
	// checksum that. The segment's checksum is combined from the data
	// shards'; their padding (zeroes at the end of the last shards) is
	// checksummed after.
	crcs := make([]uint32, n)
	if sums != nil {
		copy(crcs, sums.crcs)
	}
	dataLen := make([]int, c.k) // data bytes in each data shard
	for i := range c.k {
		dataLen[i] = max(0, min(shardLen, len(data)-i*shardLen))
	}
	stripe := make([][]byte, n)
	var straddle []byte // a stripe across a shard's body and tail
	for o := 0; o < shardLen; o += stripeLen {
		e := min(o+stripeLen, shardLen)
		for i := range n {
			b := 0 // where shard i's tail starts
			if i < c.k {
				b = body[i]
			}
			switch {
			case e <= b:
				stripe[i] = data[i*shardLen+o : i*shardLen+e]
			case o < b:
				// At most one shard's body ends inside a stripe.
				if straddle == nil {
					straddle = make([]byte, stripeLen)
				}
				m := copy(straddle, data[i*shardLen+o:i*shardLen+b])
				copy(straddle[m:e-o], tails[i])
				stripe[i] = straddle[:e-o]
			default:
				stripe[i] = tails[i][o-b : e-b]
			}
		}
		for i := range c.k {
			if de := min(e, dataLen[i]); de > o && sums == nil {
				crcs[i] = crc32c.Update(crcs[i], stripe[i][:de-o])
			}
		}
		if c.enc != nil {
			if err := c.enc.Encode(stripe); err != nil {
				return false, fmt.Errorf("cache: put %s: encode: %w", id, err)
			}
		}
		for i := c.k; i < n; i++ {
			crcs[i] = crc32c.Update(crcs[i], stripe[i])
		}
	}
	var segCRC uint32
	for i := range c.k {
		segCRC = crcCombine(segCRC, crcs[i], dataLen[i])
		crcs[i] = crc32c.Update(crcs[i], tails[i][dataLen[i]-body[i]:])
	}
	h := shardHeader{
		k: uint8(c.k), m: uint8(c.m), seq: id.Seq, gen: c.nextGen(),
		segLen: uint64(len(data)), shardLen: uint32(shardLen),
		segCRC: segCRC, stream: id.Stream,
	}
	var errs []error
	errs, writesHeld = c.onDirs(nil, func(i int, o *dirOp) error {
		parts := [][]byte{tails[i]}
		if i < c.k && body[i] > 0 {
			parts = [][]byte{data[i*shardLen : i*shardLen+body[i]], tails[i]}
		}
		return c.writeShard(i, o, id, h, hdrs[i], parts, crcs[i])
	})
	held = writesHeld && !copied

	var failed []error
	for i, err := range errs {
		if err != nil {
			failed = append(failed, fmt.Errorf("shard %d in %s: %w", i, c.dirs[i], err))
		}
	}
	if ok := n - len(failed); ok < c.quorum {
		return held, fmt.Errorf("cache: put %s: %d of %d shards durable, need %d: %w", id, ok, n, c.quorum, errors.Join(failed...))
	}
	for i, err := range errs {
		if err != nil {
			if !errors.Is(err, ErrHung) { // (logged once, while it lasts)
				c.log.Warn("cache: shard write failed, segment stored with reduced redundancy",
					logStream, id.Stream, logSeq, id.Seq, logShard, i, logDir, c.dirs[i], logErr, err)
			}
			// The next CheckDirs reports the directory, and the scrub it
			// calls for writes the missing shard: redundancy is back
			// before the segment waits out a long outage on one less disk.
			c.vanished[i].Store(true)
		}
	}
	return held, nil
}

// Sums gathers the checksums of a segment's data shards while the
// segment is produced, in order, so that PutSummed need not read it
// again: a producer that writes each piece to Sums right after making it
// reads it from the CPU cache, where Put would read it from memory.
type Sums struct {
	shardLen, segLen, pos int
	crcs                  []uint32
}

// NewSums returns the Sums of a segment of segLen bytes for c.
func (c *Cache) NewSums(segLen int) *Sums {
	return &Sums{shardLen: int(alignedShardLen(uint64(segLen), uint8(c.k))), segLen: segLen, crcs: make([]uint32, c.k)}
}

// Write adds the segment's next bytes. It panics past the segment's
// length.
func (s *Sums) Write(p []byte) {
	if s.pos+len(p) > s.segLen {
		panic(fmt.Sprintf("cache: %d bytes summed into a segment of %d", s.pos+len(p), s.segLen))
	}
	for len(p) > 0 {
		i := s.pos / s.shardLen
		n := min(len(p), (i+1)*s.shardLen-s.pos)
		s.crcs[i] = crc32c.Update(s.crcs[i], p[:n])
		s.pos += n
		p = p[n:]
	}
}

// stripeLen is how much of each shard Put handles at a time: a stripe of
// all shards stays in the CPU cache between its copy, parity and checksums.
const stripeLen = 64 << 10

func (c *Cache) getBuf(n int) *[]byte {
	select {
	case p := <-c.bufs:
		if cap(*p) >= n {
			*p = (*p)[:n]
			return p
		}
	default:
	}
	b := make([]byte, n)
	return &b
}

func (c *Cache) putBuf(p *[]byte) {
	select {
	case c.bufs <- p:
	default: // enough spare buffers: let the GC have it
	}
}

// writeShard durably writes one shard file: temp file, write, fsync,
// rename, fsync of the directory. hdr is the room for the header, up to
// the data (dataOffset); parts are the shard data, in order; shardCRC is
// its checksum.
func (c *Cache) writeShard(slot int, o *dirOp, id SegmentID, h shardHeader, hdr []byte, parts [][]byte, shardCRC uint32) (err error) {
	defer func() {
		if err != nil {
			c.epoch[slot].Add(1) // a directory being rebuilt is not complete
		}
	}()
	if err := c.checkMounted(slot); err != nil {
		return err
	}
	h.index = uint8(slot)
	h.shardCRC = shardCRC
	h.appendTo(hdr[:0])
	final := c.shardPath(slot, id)
	tmp := final + tmpInfix + strconv.FormatUint(h.gen, 16)
	parts = append([][]byte{hdr}, parts...)

	if err := c.ensureStreamDir(slot, id.Stream); err != nil {
		return err
	}
	err = c.writeFile(slot, tmp, parts)
	if errors.Is(err, fs.ErrNotExist) {
		// The directory vanished under us (disk wiped or replaced while
		// running): forget it and recreate once. The shards it held are
		// gone too: CheckDirs reports it for a Scrub.
		c.vanished[slot].Store(true)
		c.epoch[slot].Add(1)
		c.forgetStreamDir(slot, id.Stream)
		// Forgotten, the stream directory is created only after a fresh
		// mount check: not below a disk unmounted since the one above.
		if err = c.ensureStreamDir(slot, id.Stream); err != nil {
			return err
		}
		err = c.writeFile(slot, tmp, parts)
	}
	if err == nil && o.abandoned() {
		// The put counted this shard as failed and went on; the caller
		// may have written to its buffers since.
		err = ErrHung
	}
	if err == nil {
		err = c.fs.Rename(tmp, final)
	}
	if err != nil {
		// After a failed write or fsync the file's content is unknown; it
		// must never be renamed into place.
		c.fs.Remove(tmp)
		return err
	}
	return c.syncDir(filepath.Dir(final))
}

// directAlign is the alignment of O_DIRECT buffers, offsets and lengths:
// the largest logical block size in use.
const directAlign = 4096

func alignUp(n int) int { return (n + directAlign - 1) &^ (directAlign - 1) }

// isAligned reports whether b starts on a directAlign boundary.
func isAligned(b []byte) bool { return addrOff(b) == 0 }

func addrOff(b []byte) int {
	return int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (directAlign - 1))
}

// aligned returns the part of b that starts on a directAlign boundary.
func aligned(b []byte) []byte {
	off := addrOff(b)
	if off == 0 {
		return b
	}
	return b[directAlign-off:]
}

// writeFile writes parts, in order, to a new file and fsyncs it. Where
// the file system allows it, the write bypasses the page cache
// (O_DIRECT): a shard is written once and read back only after a crash,
// and copying it into the page cache cost the process server more CPU
// than the rest of storing it. Put's parts are aligned and written as
// they are; others (Repair) go through an aligned copy, written whole
// and then cut to size.
func (c *Cache) writeFile(slot int, name string, parts [][]byte) error {
	const flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	direct := !c.noDirect[slot].Load()
	var f File
	var err error
	if direct {
		f, err = c.fs.OpenFile(name, flags|unix.O_DIRECT, 0o640)
		if errors.Is(err, unix.EINVAL) {
			c.noDirect[slot].Store(true) // tmpfs and the like
			direct = false
		}
	}
	if !direct {
		f, err = c.fs.OpenFile(name, flags, 0o640)
	}
	if err != nil {
		return err
	}
	size := 0
	allAligned := true
	for _, p := range parts {
		size += len(p)
		allAligned = allAligned && len(p)%directAlign == 0 && isAligned(p)
	}
	t, canTruncate := f.(interface{ Truncate(int64) error })
	if direct && !allAligned && !canTruncate {
		f.Close()
		c.noDirect[slot].Store(true)
		return c.writeFile(slot, name, parts)
	}
	switch {
	case direct && allAligned:
		err = writeAll(f, parts...)
	case direct:
		bp := c.getBuf(alignUp(size) + directAlign)
		b := aligned(*bp)[:alignUp(size)]
		o := 0
		for _, p := range parts {
			o += copy(b[o:], p)
		}
		clear(b[o:])
		err = writeAll(f, b)
		c.putBuf(bp)
		if err == nil {
			err = t.Truncate(int64(size))
		}
	default:
		err = writeAll(f, parts...)
	}
	if direct && errors.Is(err, unix.EINVAL) {
		// The file system took the open but not the write: write
		// through the page cache from now on.
		f.Close()
		c.noDirect[slot].Store(true)
		return c.writeFile(slot, name, parts)
	}
	if err != nil {
		err = fmt.Errorf("write shard: %w", err)
	} else if err = f.Sync(); err != nil {
		err = fmt.Errorf("fsync shard: %w", err)
	}
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close shard: %w", cerr)
	}
	return err
}

func writeAll(f File, parts ...[]byte) error {
	for _, p := range parts {
		n, err := f.Write(p)
		if err == nil && n != len(p) {
			err = fmt.Errorf("short write: %d of %d bytes", n, len(p))
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (c *Cache) syncDir(dir string) error {
	d, err := c.fs.OpenFile(dir, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// ensureStreamDir creates <dir>/<stream> and makes its entry durable.
func (c *Cache) ensureStreamDir(slot int, stream string) error {
	key := strconv.Itoa(slot) + "/" + stream
	c.streamMu.Lock()
	known := c.streamDirs[key]
	c.streamMu.Unlock()
	if known {
		return nil
	}
	if err := c.checkMountedNow(slot); err != nil {
		return err
	}
	if err := c.mkdirDurable(filepath.Join(c.dirs[slot], stream)); err != nil {
		return err
	}
	// Also when it was there: a crash may have left its entry unsynced.
	if err := c.syncDir(c.dirs[slot]); err != nil {
		return err
	}
	c.streamMu.Lock()
	c.streamDirs[key] = true
	c.streamMu.Unlock()
	return nil
}

// mkdirDurable is MkdirAll made durable: the directories it creates are
// fsync'd, and so is the parent of the topmost one, which names it. A
// cache directory recreated after an rm -rf would otherwise lose its entry
// (and with it the shards fsync'd below) in a crash.
func (c *Cache) mkdirDurable(path string) error {
	path = filepath.Clean(path)
	top := "" // the topmost missing directory (os.Stat: FS has none, see mountRoot)
	for p := path; p != filepath.Dir(p); p = filepath.Dir(p) {
		if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
			break
		}
		top = p
	}
	if err := c.fs.MkdirAll(path, 0o750); err != nil {
		return err
	}
	if top == "" {
		return nil
	}
	for p := path; ; p = filepath.Dir(p) {
		if err := c.syncDir(p); err != nil {
			return err
		}
		if p == top {
			return c.syncDir(filepath.Dir(p))
		}
	}
}

func (c *Cache) forgetStreamDir(slot int, stream string) {
	c.streamMu.Lock()
	delete(c.streamDirs, strconv.Itoa(slot)+"/"+stream)
	c.streamMu.Unlock()
}

// slotRead is what one directory holds for a segment.
type slotRead struct {
	hdr  shardHeader
	data []byte
	err  error // nil: valid shard; wraps fs.ErrNotExist: missing
	// unread: the directory could not be read (an I/O error, or its disk
	// not mounted): says nothing of the shard, unlike a checksum failure.
	unread bool
}

func (c *Cache) readShards(id SegmentID, want func(i int) bool) []slotRead {
	reads, errs := dirValues(c, want, func(i int) (slotRead, error) {
		var r slotRead
		file, err := c.fs.ReadFile(c.shardPath(i, id))
		if err != nil {
			r.err, r.unread = err, !errors.Is(err, fs.ErrNotExist)
			return r, nil
		}
		r.hdr, r.data, r.err = parseShard(file, id.Stream, id.Seq, i, uint64(max(c.maxSeg, maxReadSegment)))
		return r, nil
	})
	for i, err := range errs {
		if err != nil { // hung: says nothing of the shard
			reads[i] = slotRead{err: err, unread: true}
		}
	}
	return reads
}

// version identifies the shards of one Put.
type version struct {
	gen, segLen uint64
	k, m        uint8
	segCRC      uint32
}

// decoded is a segment reconstructed from one version's shards.
type decoded struct {
	v      version
	shards [][]byte // all k+m when full reconstruction was asked for
	have   []bool   // slots that held a valid shard of v
}

// decode reconstructs the newest version of the segment that has enough
// valid shards and whose reassembled bytes match the segment checksum.
// With full set it also rebuilds the parity shards (for Repair).
func (c *Cache) decode(id SegmentID, reads []slotRead, full bool) (*decoded, []byte, error) {
	counts := make(map[version]int)
	present := false
	for _, r := range reads {
		if r.err == nil {
			counts[version{r.hdr.gen, r.hdr.segLen, r.hdr.k, r.hdr.m, r.hdr.segCRC}]++
		}
		present = present || !errors.Is(r.err, fs.ErrNotExist)
	}
	if !present {
		if c.notRead(reads) {
			return nil, nil, fmt.Errorf("cache: %s: %w (no shard found, and some directories cannot be read): %s",
				id, ErrUnavailable, describe(c.dirs, reads, nil))
		}
		return nil, nil, fmt.Errorf("cache: %s: %w", id, ErrNotFound)
	}
	versions := slices.SortedFunc(maps.Keys(counts), func(a, b version) int { return cmp.Compare(b.gen, a.gen) })

	var problems []string
	for _, v := range versions {
		if counts[v] < int(v.k) {
			continue
		}
		if int(v.k)+int(v.m) != len(reads) {
			problems = append(problems, fmt.Sprintf("shards written for %d+%d directories", v.k, v.m))
			continue
		}
		d := &decoded{v: v, shards: make([][]byte, len(reads)), have: make([]bool, len(reads))}
		for i, r := range reads {
			if r.err == nil && r.hdr.gen == v.gen {
				d.shards[i], d.have[i] = r.data, true
			}
		}
		if v.m > 0 {
			enc, err := c.encoder(v.k, v.m)
			if err != nil {
				return nil, nil, err
			}
			if full {
				err = enc.Reconstruct(d.shards)
			} else {
				err = enc.ReconstructData(d.shards)
			}
			if err != nil {
				problems = append(problems, fmt.Sprintf("reconstruct: %v", err))
				continue
			}
		}
		seg := make([]byte, 0, v.segLen)
		for _, s := range d.shards[:v.k] {
			seg = append(seg, s[:min(len(s), int(v.segLen)-len(seg))]...)
		}
		if crc(seg) != v.segCRC {
			// Every shard passed its own checksum, so this takes two
			// colliding faults or a bug; refuse rather than guess.
			problems = append(problems, "reassembled segment fails its checksum")
			continue
		}
		return d, seg, nil
	}
	if c.notRead(reads) {
		return nil, nil, fmt.Errorf("cache: %s: %w (need %d of %d valid shards; those that cannot be read may hold them): %s",
			id, ErrUnavailable, c.k, len(reads), describe(c.dirs, reads, problems))
	}
	return nil, nil, fmt.Errorf("cache: %s: %w (need %d of %d valid shards): %s",
		id, ErrUnrecoverable, c.k, len(reads), describe(c.dirs, reads, problems))
}

// notRead reports whether some shard of reads could not be read: a
// segment is lost only when every directory answered. A shard missing
// from a directory whose disk is not mounted was looked for on the file
// system below: it is marked unread too. Checked only once a segment
// fails to decode, so that healthy reads cost no mount check.
func (c *Cache) notRead(reads []slotRead) bool {
	some := false
	for i := range reads {
		r := &reads[i]
		if errors.Is(r.err, fs.ErrNotExist) {
			if err := c.checkMountedNow(i); err != nil {
				r.err, r.unread = err, true
			}
		}
		some = some || r.unread
	}
	return some
}

// describe explains, per directory, why a segment could not be read.
func describe(dirs []string, reads []slotRead, problems []string) string {
	var b strings.Builder
	for i, r := range reads {
		if i > 0 {
			b.WriteString("; ")
		}
		switch {
		case r.err == nil:
			fmt.Fprintf(&b, "%s: ok (generation %d)", dirs[i], r.hdr.gen)
		case errors.Is(r.err, fs.ErrNotExist):
			fmt.Fprintf(&b, "%s: missing", dirs[i])
		default:
			fmt.Fprintf(&b, "%s: %v", dirs[i], r.err)
		}
	}
	for _, p := range problems {
		b.WriteString("; ")
		b.WriteString(p)
	}
	return b.String()
}

// Get returns the content of segment id. Missing, corrupt or unreadable
// shards are treated as erasures and reconstructed from the others; the
// result is checked against the checksum of the whole segment. It returns
// an error wrapping ErrNotFound if no directory has the segment,
// ErrUnrecoverable if more than m shards are lost, and ErrUnavailable
// when it cannot tell because some directories cannot be read (I/O
// errors, disks not mounted). The returned slice is owned by the caller.
func (c *Cache) Get(id SegmentID) ([]byte, error) {
	if err := CheckStream(id.Stream); err != nil {
		return nil, err
	}
	// The data shards alone make the segment when they are all valid
	// and of one store: the parity shards are read only when one is not.
	// (An acknowledged store reached more than m directories, so it has a
	// data shard: data shards all of an older one are of a store that
	// failed, which Put allows Get to return.)
	isData := func(i int) bool { return i < c.k }
	reads := c.readShards(id, isData)
	if seg, ok := c.fromData(reads[:c.k]); ok {
		return seg, nil
	}
	if c.m > 0 {
		more := c.readShards(id, func(i int) bool { return !isData(i) })
		copy(reads[c.k:], more[c.k:])
	}
	_, seg, err := c.decode(id, reads, false)
	return seg, err
}

// fromData assembles a segment from reads of its k data shards, in slot
// order, if they are all valid, of one store of the cache's geometry, and
// their bytes match the segment's checksum.
func (c *Cache) fromData(reads []slotRead) ([]byte, bool) {
	h0 := reads[0].hdr
	for _, r := range reads {
		h := r.hdr
		if r.err != nil || h.gen != h0.gen || h.segLen != h0.segLen || h.segCRC != h0.segCRC ||
			int(h.k) != len(reads) || int(h.k)+int(h.m) != len(c.dirs) {
			return nil, false
		}
	}
	seg := make([]byte, 0, h0.segLen)
	for _, r := range reads {
		seg = append(seg, r.data[:min(len(r.data), int(h0.segLen)-len(seg))]...)
	}
	if uint64(len(seg)) != h0.segLen || crc(seg) != h0.segCRC {
		return nil, false
	}
	return seg, true
}

// Size returns the length of segment id as its shards' headers give it,
// reading only the headers: that of the newest store any directory holds
// (one a crash tore may not decode, and Get then returns an older one).
// It is for accounting, where reading whole segments would cost a restart
// the cache's size in reads; it fails like Get when no header is found.
func (c *Cache) Size(id SegmentID) (int64, error) {
	if err := CheckStream(id.Stream); err != nil {
		return 0, err
	}
	var best shardHeader
	found, notFound := false, true
	var errs []error
	hdrs, rerrs := dirValues(c, nil, func(i int) (shardHeader, error) { return c.readHeader(i, id) })
	for i, err := range rerrs {
		if err != nil {
			notFound = notFound && errors.Is(err, fs.ErrNotExist)
			errs = append(errs, err)
			continue
		}
		if h := hdrs[i]; !found || h.gen > best.gen {
			best, found = h, true
		}
	}
	switch {
	case found:
		return int64(best.segLen), nil
	case notFound:
		return 0, fmt.Errorf("cache: size of %s: %w", id, ErrNotFound)
	}
	return 0, fmt.Errorf("cache: size of %s: %w", id, errors.Join(errs...))
}

// readHeader reads and checks the header of segment id's shard at slot.
func (c *Cache) readHeader(slot int, id SegmentID) (shardHeader, error) {
	path := c.shardPath(slot, id)
	f, err := c.fs.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return shardHeader{}, err
	}
	defer f.Close()
	var b []byte
	if r, ok := f.(io.ReaderAt); ok {
		b = make([]byte, fixedHdrLen+maxStreamLen+4)
		n, err := r.ReadAt(b, 0)
		if err != nil && !errors.Is(err, io.EOF) {
			return shardHeader{}, err
		}
		b = b[:n]
	} else if b, err = c.fs.ReadFile(path); err != nil { // (a wrapped File)
		return shardHeader{}, err
	}
	h, _, err := parseHeader(b, id.Stream, id.Seq, slot, uint64(max(c.maxSeg, maxReadSegment)))
	return h, err
}

// Repair rewrites the shards of segment id that are missing, corrupt or
// left over from an older write, and reports how many it rewrote. It fails
// like Get when the segment cannot be reconstructed.
func (c *Cache) Repair(id SegmentID) (int, error) {
	if err := CheckStream(id.Stream); err != nil {
		return 0, err
	}
	mu := c.lock(id)
	mu.Lock()
	defer mu.Unlock()

	reads := c.readShards(id, nil)
	d, _, err := c.decode(id, reads, true)
	if err != nil {
		return 0, err
	}
	h := shardHeader{
		k: d.v.k, m: d.v.m, seq: id.Seq, gen: d.v.gen, segLen: d.v.segLen,
		shardLen: uint32(len(d.shards[0])), segCRC: d.v.segCRC, stream: id.Stream,
	}
	var repaired atomic.Int32
	werrs, _ := c.onDirs(func(i int) bool { return !d.have[i] }, func(i int, o *dirOp) error {
		hdr := make([]byte, dataOffset(shardVersion, h.size()))
		if err := c.writeShard(i, o, id, h, hdr, [][]byte{d.shards[i]}, crc(d.shards[i])); err != nil {
			return err
		}
		repaired.Add(1)
		c.log.Info("cache: shard rebuilt", logStream, id.Stream, logSeq, id.Seq, logShard, i, logDir, c.dirs[i])
		return nil
	})
	var errs []error
	for i, err := range werrs {
		if err != nil {
			errs = append(errs, fmt.Errorf("shard %d in %s: %w", i, c.dirs[i], err))
		}
	}
	if len(errs) > 0 {
		return int(repaired.Load()), fmt.Errorf("cache: repair %s: %w", id, errors.Join(errs...))
	}
	return int(repaired.Load()), nil
}

// Delete removes every shard of segment id. Deleting a segment that is not
// in the cache is not an error, so a failed Delete can simply be retried.
func (c *Cache) Delete(id SegmentID) error {
	if err := CheckStream(id.Stream); err != nil {
		return err
	}
	mu := c.lock(id)
	mu.Lock()
	defer mu.Unlock()

	errs, _ := c.onDirs(nil, func(i int, _ *dirOp) error {
		if err := c.checkMounted(i); err != nil {
			return err // its shard is on the unmounted disk
		}
		p := c.shardPath(i, id)
		err := c.fs.Remove(p)
		if errors.Is(err, fs.ErrNotExist) {
			// Gone, or its disk was unmounted since the (cached)
			// check: a shard left on the disk would come back
			// when it is mounted again.
			if err := c.checkMountedNow(i); err != nil {
				return err
			}
			// Gone maybe by a Delete whose directory fsync failed:
			// durable only once one succeeds.
			if err := c.syncDir(filepath.Dir(p)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("shard %d in %s: %w", i, c.dirs[i], err)
			}
			return nil
		}
		if err == nil {
			err = c.syncDir(filepath.Dir(p))
		}
		if err != nil {
			return fmt.Errorf("shard %d in %s: %w", i, c.dirs[i], err)
		}
		return nil
	})
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cache: delete %s: %w", id, err)
	}
	return nil
}

// List returns the segments of stream present in any directory, in
// ascending order. A segment is listed as long as one shard of it exists,
// even if it can no longer be read. Directories that cannot be listed are
// skipped with a warning; List fails only if none can be.
func (c *Cache) List(stream string) ([]SegmentID, error) { return c.list(stream, false) }

// list is List; strict, it fails when any directory cannot be listed,
// returning what the others hold all the same.
func (c *Cache) list(stream string, strict bool) ([]SegmentID, error) {
	if err := CheckStream(stream); err != nil {
		return nil, err
	}
	seqs := make(map[uint64]struct{})
	err := c.eachDir(stream, strict, func(name string, isDir bool) {
		if isDir {
			return
		}
		hexSeq, ok := strings.CutSuffix(name, shardExt)
		if !ok || len(hexSeq) != 16 {
			return
		}
		if seq, err := strconv.ParseUint(hexSeq, 16, 64); err == nil {
			seqs[seq] = struct{}{}
		}
	})
	ids := make([]SegmentID, 0, len(seqs))
	for _, s := range slices.Sorted(maps.Keys(seqs)) {
		ids = append(ids, SegmentID{Stream: stream, Seq: s})
	}
	if err != nil {
		return ids, fmt.Errorf("cache: list %s: %w", stream, err)
	}
	return ids, nil
}

// Streams returns the names of the streams present in any directory, sorted.
func (c *Cache) Streams() ([]string, error) { return c.streams(false) }

// streams is Streams; strict, it fails when any directory cannot be
// listed, returning what the others hold all the same.
func (c *Cache) streams(strict bool) ([]string, error) {
	set := make(map[string]struct{})
	err := c.eachDir("", strict, func(name string, isDir bool) {
		if isDir && CheckStream(name) == nil {
			set[name] = struct{}{}
		}
	})
	names := slices.Sorted(maps.Keys(set))
	if err != nil {
		return names, fmt.Errorf("cache: list streams: %w", err)
	}
	return names, nil
}

// eachDir calls fn for every entry of sub in every directory. A missing sub
// directory is empty; other errors skip that directory with a warning, and
// are returned only if every directory failed, or, strict, if any did (fn
// has seen the other directories' entries all the same).
func (c *Cache) eachDir(sub string, strict bool, fn func(name string, isDir bool)) error {
	var errs []error
	listed, lerrs := dirValues(c, nil, func(i int) ([]fs.DirEntry, error) { return c.fs.ReadDir(filepath.Join(c.dirs[i], sub)) })
	for i, d := range c.dirs {
		err := lerrs[i]
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			c.log.Warn("cache: cannot list directory", logDir, d, logErr, err)
			errs = append(errs, fmt.Errorf("%s: %w", d, err))
			continue
		}
		for _, e := range listed[i] {
			fn(e.Name(), e.IsDir())
		}
	}
	if len(errs) == len(c.dirs) || (strict && len(errs) > 0) {
		return errors.Join(errs...)
	}
	return nil
}

// ShortOfShards reports whether some segment lacks a shard file in some
// directory: what a Put at a lowered write quorum, a directory that was
// unmounted or wiped while the server ran, or a Put a crash interrupted
// leaves until a Scrub rebuilds it. That knowledge is not kept across a
// restart; this finds it again from the directories' listings, without
// reading a shard.
func (c *Cache) ShortOfShards() (bool, error) {
	streams, err := c.streams(true)
	if err != nil {
		return false, err
	}
	for _, st := range streams {
		counts := map[string]int{}
		if err := c.eachDir(st, true, func(name string, isDir bool) {
			if !isDir && strings.HasSuffix(name, shardExt) {
				counts[name]++
			}
		}); err != nil {
			return false, fmt.Errorf("cache: list %s: %w", st, err)
		}
		for _, n := range counts {
			if n < len(c.dirs) {
				return true, nil
			}
		}
	}
	return false, nil
}

// ScrubReport summarises a Scrub.
type ScrubReport struct {
	Segments       int         // segments examined
	RepairedShards int         // shard files rewritten
	Lost           []SegmentID // segments that could not be reconstructed
	Failed         []SegmentID // segments whose repair hit I/O errors
}

// Scrub reads every segment, verifying every shard, and rewrites missing
// or corrupt shards (after a cache disk was replaced, or bit rot). It
// continues past bad segments and returns an error when any segment is
// lost or could not be fully repaired; the report says which. Cancelling
// ctx stops it between segments (with ctx's error).
func (c *Cache) Scrub(ctx context.Context) (ScrubReport, error) {
	var rep ScrubReport
	// The directories being rebuilt get their marker back once this
	// scrub, which started after they were found, has gone through every
	// segment without a problem and nothing happened to them meanwhile
	// (their epoch did not move). Otherwise they stay pending: the next
	// scrub (the server runs one periodically while any is) tries again.
	type rebuilding struct {
		slot  int
		epoch uint64
	}
	var rebuilt []rebuilding
	for i := range c.dirs {
		if c.pending[i].Load() {
			rebuilt = append(rebuilt, rebuilding{i, c.epoch[i].Load()})
		}
	}
	// A directory that cannot be listed may hide segments: its error
	// fails the scrub, which then marks nothing rebuilt. What the other
	// directories list is repaired all the same: one unlistable disk
	// must not hold back the rebuild of another.
	var errs []error
	streams, err := c.streams(true)
	if err != nil {
		errs = append(errs, err)
	}
	for _, s := range streams {
		ids, err := c.list(s, true)
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range ids {
			if err := ctx.Err(); err != nil {
				return rep, fmt.Errorf("cache: scrub: %w", err)
			}
			rep.Segments++
			n, err := c.Repair(id)
			rep.RepairedShards += n
			switch {
			case errors.Is(err, ErrNotFound):
				rep.Segments-- // deleted since List
			case errors.Is(err, ErrUnrecoverable):
				rep.Lost = append(rep.Lost, id)
				c.log.Error("cache: segment lost", logStream, id.Stream, logSeq, id.Seq, logErr, err)
			case err != nil:
				rep.Failed = append(rep.Failed, id)
				errs = append(errs, err)
			}
		}
		// A shard whose directory fsync failed after its rename is
		// in place and valid, so Repair leaves it: its entry is made
		// durable here.
		serrs, _ := c.onDirs(nil, func(i int, _ *dirOp) error {
			if c.checkMounted(i) != nil {
				return nil
			}
			if err := c.syncDir(filepath.Join(c.dirs[i], s)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			return nil
		})
		for _, err := range serrs {
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(rep.Lost) > 0 {
		errs = append(errs, fmt.Errorf("%w: %d segments, first %s", ErrUnrecoverable, len(rep.Lost), rep.Lost[0]))
	}
	if len(errs) > 0 {
		return rep, fmt.Errorf("cache: scrub: %w", errors.Join(errs...))
	}
	for _, r := range rebuilt {
		err := c.onDir(r.slot, func(*dirOp) error { return c.markRebuilt(r.slot, r.epoch) })
		if err != nil {
			return rep, fmt.Errorf("cache: scrub: %w", err)
		}
	}
	return rep, nil
}

// Pending returns the directories whose shards are being rebuilt (found
// wiped or replaced, no complete Scrub since).
func (c *Cache) Pending() []string {
	var p []string
	for i, d := range c.dirs {
		if c.pending[i].Load() {
			p = append(p, d)
		}
	}
	return p
}

// rebuildingName marks a directory whose shards are being rebuilt: it
// has no marker then, and the sentinel's disappearance tells CheckDirs it
// was lost again.
const rebuildingName = markerName + ".rebuilding"

// markRebuilding notes that directory i lost its shards: pending, a new
// epoch, and a sentinel in it.
func (c *Cache) markRebuilding(i int) error {
	c.epoch[i].Add(1)
	c.sentinel[i].Store(false)
	c.pending[i].Store(true)
	return c.writeSentinel(i)
}

// writeSentinel writes pending directory i's sentinel.
func (c *Cache) writeSentinel(i int) error {
	if err := c.checkMountedNow(i); err != nil {
		return err
	}
	d := c.dirs[i]
	if err := c.mkdirDurable(d); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	f, err := c.fs.OpenFile(filepath.Join(d, rebuildingName), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	c.sentinel[i].Store(true)
	return nil
}

// markRebuilt gives directory i its marker back once its shards are
// rebuilt by a scrub that started at epoch, if nothing happened to it
// since (its epoch is the same) and its sentinel is still there (else it
// was lost again: CheckDirs reports it). It holds the directory's lock,
// as CheckDirs does: a loss that CheckDirs notes (a new epoch and
// sentinel) is either seen here or comes after the marker.
func (c *Cache) markRebuilt(i int, epoch uint64) error {
	c.dirMu[i].Lock()
	defer c.dirMu[i].Unlock()
	d := c.dirs[i]
	if !c.pending[i].Load() || !c.sentinel[i].Load() || c.epoch[i].Load() != epoch {
		return nil
	}
	// The sentinel becomes the marker (written in place, then renamed):
	// wiped at any point, there is no sentinel to write or rename, and the
	// directory stays pending rather than marked empty.
	if c.checkMountedNow(i) != nil {
		return nil // stays pending
	}
	err := c.markFrom(filepath.Join(d, rebuildingName), 0, c.marker(i))
	if errors.Is(err, fs.ErrNotExist) {
		return nil // lost again: CheckDirs reports it
	}
	if err != nil {
		return fmt.Errorf("mark %s rebuilt: %w", d, err)
	}
	c.pending[i].Store(false)
	c.sentinel[i].Store(false)
	return nil
}

// CheckDirs finds the directories that lost shards while the cache was
// open: wiped or replaced by an empty disk (their marker is gone), or one
// of their stream directories vanished under a write. It returns them,
// once per loss: the caller then runs Scrub to rebuild their shards, so
// that the cache again survives the loss of m directories (until then,
// reads reconstruct from the others). The marker of such a directory is
// written back only when a Scrub completes. It is cheap (one small read
// per directory) and meant to run periodically.
func (c *Cache) CheckDirs() ([]string, error) {
	var lost []string
	var errs []error
	for i, d := range c.dirs {
		now, err := c.checkDir(i)
		if err != nil {
			errs = append(errs, err)
		}
		if now {
			lost = append(lost, d)
		}
	}
	return lost, errors.Join(errs...)
}

// checkQuorum fails when too few directories are on their disks' mounts
// for a Put to reach its quorum: it then writes nothing, rather than
// shards that a failed Put leaves behind.
func (c *Cache) checkQuorum() error {
	var down []error
	errs, _ := c.onDirs(nil, func(i int, _ *dirOp) error { return c.checkMounted(i) })
	for _, err := range errs {
		if err != nil {
			down = append(down, err)
		}
	}
	if up := len(c.dirs) - len(down); up < c.quorum {
		return fmt.Errorf("%d of %d directories can take shards, need %d: %w", up, len(c.dirs), c.quorum, errors.Join(down...))
	}
	return nil
}

// mountCheckFor is how long a directory found on its mount is taken to
// stay there by checkMounted: a walk up its path costs a few stats, for
// every shard written. A shard cannot land below an unmounted disk in
// that time: its stream directory is not there, and the paths that create
// one check afresh (checkMountedNow).
const mountCheckFor = 250 * time.Millisecond

// checkMounted fails when directory i should be on its recorded mount and
// is not (see mountCheckFor): writing there would put shards on the file
// system below, hidden once the disk is mounted again (and could fill it).
func (c *Cache) checkMounted(i int) error {
	if c.mounts[i] == "" || (!c.unmounted[i].Load() && time.Now().UnixNano() < c.mountedTill[i].Load()) {
		return nil
	}
	return c.checkMountedNow(i)
}

// checkMountedNow is checkMounted without the grace of an earlier check.
func (c *Cache) checkMountedNow(i int) error {
	root := c.mounts[i]
	if root == "" {
		return nil
	}
	d := c.dirs[i]
	c.mountMu[i].Lock()
	defer c.mountMu[i].Unlock()
	if mountRoot(d) == root {
		c.mountedTill[i].Store(time.Now().Add(mountCheckFor).UnixNano())
		if c.unmounted[i].Swap(false) {
			// Writes failed meanwhile (or took a lowered quorum): the
			// next CheckDirs asks for a scrub.
			c.vanished[i].Store(true)
			c.log.Info("cache: directory is a mount point again", logDir, d)
		}
		return nil
	}
	c.mountedTill[i].Store(0)
	if !c.unmounted[i].Swap(true) {
		c.log.Error("cache: directory's disk is not mounted; writes to it fail until it is", logDir, d)
	}
	return notMounted(d, root)
}

// checkDir is CheckDirs for directory i: whether it lost its shards now.
func (c *Cache) checkDir(i int) (bool, error) {
	var lost bool // set by the check, unless it was abandoned
	errBusy := errors.New("busy")
	err := c.onDir(i, func(*dirOp) (err error) {
		if !c.dirMu[i].TryLock() {
			// A scrub is marking it: the next check sees the outcome
			// (the monitor does not wait on a slow disk).
			return errBusy
		}
		defer c.dirMu[i].Unlock()
		lost, err = c.checkDirLocked(i)
		return err
	})
	switch {
	case err == errBusy:
		return false, nil
	case errors.Is(err, ErrHung):
		return false, err
	}
	return lost, err
}

// checkDirLocked is checkDir under the directory's lock.
func (c *Cache) checkDirLocked(i int) (bool, error) {
	if err := c.checkMountedNow(i); err != nil {
		// Not a loss to rebuild: its shards are on the unmounted disk.
		return false, err
	}
	d := c.dirs[i]
	now := c.vanished[i].Swap(false)
	var cerr error
	_, err := c.fs.ReadFile(filepath.Join(d, markerName))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := c.checkMountedNow(i); err != nil {
			return false, err // unmounted since the check above: not a loss
		}
		if c.pending[i].Load() {
			if !c.sentinel[i].Load() {
				// Its sentinel could not be written (the disk is
				// failing?): try again, without a new report; what
				// happened meanwhile is unknown, so a new epoch.
				if cerr = c.writeSentinel(i); cerr == nil {
					c.epoch[i].Add(1)
				}
				break
			}
			// Being rebuilt: lost again if its sentinel is gone.
			_, err := c.fs.ReadFile(filepath.Join(d, rebuildingName))
			if err == nil {
				break
			}
			if !errors.Is(err, fs.ErrNotExist) {
				cerr = fmt.Errorf("cache: check directory %s: %w", d, err)
				break
			}
		}
		c.log.Warn("cache: directory lost its contents while in use; rebuilding its shards", logDir, d)
		cerr = c.markRebuilding(i)
		now = true
	case err != nil:
		cerr = fmt.Errorf("cache: check directory %s: %w", d, err)
	}
	if now {
		c.streamMu.Lock()
		for key := range c.streamDirs {
			if strings.HasPrefix(key, strconv.Itoa(i)+"/") {
				delete(c.streamDirs, key)
			}
		}
		c.streamMu.Unlock()
	}
	return now, cerr
}

// DirUsage is the space on the file system holding one cache directory.
// The figures are for the whole file system (statfs): cache disks are
// expected to be dedicated.
type DirUsage struct {
	Dir   string
	Total uint64 // bytes
	Used  uint64 // bytes in use
	Free  uint64 // bytes available to the cache (excludes root's reserve)
	// FreeFraction is Free / Total, or the free fraction of the file
	// system's inodes when lower (each segment takes one file per
	// directory): for "cache disk nearly full" alerts and backpressure.
	FreeFraction float64
	// Err: the directory could not be examined (the figures are zero),
	// itself an alert.
	Err error
}

// Usage reports space per directory, in shard order. A directory that
// cannot be examined has its error in its DirUsage: the others are still
// measured, so that one failing disk does not hide that the rest are full.
func (c *Cache) Usage() []DirUsage {
	out := make([]DirUsage, len(c.dirs))
	stats, errs := dirValues(c, nil, func(i int) (FSStat, error) { return c.fs.Statfs(c.dirs[i]) })
	for i, d := range c.dirs {
		out[i].Dir = d
		if err := errs[i]; err != nil {
			out[i].Err = fmt.Errorf("cache: usage of %s: %w", d, err)
			continue
		}
		st := stats[i]
		out[i].Total, out[i].Used, out[i].Free = st.Total, st.Total-st.Free, st.Avail
		if st.Total > 0 {
			out[i].FreeFraction = float64(st.Avail) / float64(st.Total)
		}
		if st.Files > 0 {
			out[i].FreeFraction = min(out[i].FreeFraction, float64(st.FilesFree)/float64(st.Files))
		}
	}
	return out
}
