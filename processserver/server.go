package processserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/stage"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
)

// Log attribute keys.
const (
	logMachine    = "machine"
	logAgent      = "agent"
	logRemote     = "remote"
	logErr        = "err"
	logBlob       = "blob"
	logBytes      = "bytes"
	logSealed     = "sealed_bytes"
	logDuration   = "duration"
	logWait       = "retry_in"
	logDisk       = "disk"
	logAction     = "action"
	logGeneration = "generation"
	logResumeFrom = "resume_from"
	logVersion    = "version"
	logKeyID      = "key_id"
	logSegment    = "segment"
	logAddr       = "addr"
	logFree       = "free_ratio"
	logDir        = "dir"
	logCount      = "segments"
	logGapFrom    = "gap_from"
	logMendedAt   = "mended_at"
	logAgentAcked = "agent_acked"
	logFromSeq    = "from_seq"
)

// Server is a running process server.
type Server struct {
	cfg         Config
	log         *slog.Logger
	store       blobstore.Store
	cache       *cache.Cache
	recoveryKey []byte
	tlsConf     *tls.Config
	id          *pki.Identity
	ln          net.Listener
	applier     Applier
	metrics     *metrics
	httpSrv     *http.Server

	cacheBytes  atomic.Int64 // logical bytes of segments in the cache
	cachePaused atomic.Bool  // cache nearly full: every agent paused
	// scrubReq asks the scrubber for a scrub of the cache (buffered: a
	// request while one runs makes it run once more); scrubEnd is when the
	// last one ended (unix nanos; MaxInt64 while one runs).
	scrubReq chan struct{}
	scrubEnd atomic.Int64
	// scrubStart is when the last scrub started (0: none yet).
	scrubStart atomic.Int64

	mu       sync.Mutex
	machines map[string]*machine

	ctx    context.Context
	cancel context.CancelFunc
	conns  sync.WaitGroup // connection goroutines
	shakes handshakes     // TLS handshakes in flight
	bg     sync.WaitGroup // accept loop, uploaders, monitor

	closeOnce sync.Once
	closeErr  error

	// freeBufs keeps segment buffers across GC cycles, which empty a
	// sync.Pool: allocating and zeroing 10 MiB per segment cost more
	// than appending the data. Room for as many as hot segments hold,
	// which the applier releases in bursts: one dropped is one
	// allocated, zeroed and faulted in again (page faults are dear on
	// a paravirtualised host).
	freeBufs chan *segBuf
	// Sealed segments kept in memory until applied (newHot).
	hotBytes atomic.Int64
	// coldReads bounds the uploads that read their segment back from the
	// cache at once, across machines (nil: no bound): each holds it whole
	// while it waits for the upload limit or Azure's retries, and after a
	// restart or a long outage every machine has four under way.
	coldReads chan struct{}
}

// maxColdReads is coldReads' bound: with 8 MiB segments, as much memory as
// the hot segments (hotLimit).
const maxColdReads = hotLimit / DefaultSegmentBytes

// acquireCold takes one of the coldReads slots, waiting for one while
// ctx allows; release gives it back.
func (s *Server) acquireCold(ctx context.Context) (release func(), err error) {
	if s.coldReads == nil {
		return func() {}, nil
	}
	select {
	case s.coldReads <- struct{}{}:
		return func() { <-s.coldReads }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Start loads the server's identity and recovery key, opens the cache,
// resumes uploading what the cache holds (after a crash or restart) and
// starts accepting agents. It returns once the listener is bound; Addr
// reports it. Stop the server with Close.
func Start(ctx context.Context, c Config) (*Server, error) {
	cfg, err := c.withDefaults()
	if err != nil {
		return nil, err
	}
	id, err := pki.Load(cfg.PKIDir, cfg.Name)
	if err != nil {
		return nil, fmt.Errorf("process server identity: %w", err)
	}
	if id.Role() != pki.RoleProcessServer {
		return nil, fmt.Errorf("certificate %s is for role %q; the process server needs one issued with --role %s", id, id.Role(), pki.RoleProcessServer)
	}
	if id.CAKeyNextTo() && cfg.Logger != nil {
		cfg.Logger.Warn("the --pki directory holds ca.key: anyone who can read it on this host can issue certificates; keep ca.key where certificates are issued only", "dir", cfg.PKIDir)
	}
	if w := pki.Expiring("the process server's certificate "+cfg.Name+" (or its CA)", id.NotAfter(), time.Now()); w != "" && cfg.Logger != nil {
		cfg.Logger.Warn(w)
	}
	rk, err := seal.LoadRecoveryKey(cfg.RecoveryKeyFile)
	if err != nil {
		return nil, err
	}
	// The ports first: a busy or mistyped address is said at once, not
	// after the cache is set up and the account tried for 30 s. Agents
	// that connect meanwhile wait in the backlog.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	var metricsLn net.Listener
	if cfg.MetricsListen != "" {
		if metricsLn, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			ln.Close()
			return nil, fmt.Errorf("metrics: listen on %s: %w", cfg.MetricsListen, err)
		}
	}
	started := false
	defer func() {
		if !started {
			ln.Close()
			if metricsLn != nil {
				metricsLn.Close()
			}
		}
	}()
	ch, err := cache.Open(cfg.CacheDirs, cfg.CacheOptions)
	if err != nil {
		return nil, err
	}
	defer func() {
		if !started {
			ch.Close() // for the next start
		}
	}()
	s := &Server{
		cfg:         cfg,
		log:         cfg.Logger,
		store:       cfg.Store,
		cache:       ch,
		recoveryKey: rk,
		tlsConf:     channel.Config(id.ServerTLS(pki.RoleAgent)),
		id:          id,
		machines:    make(map[string]*machine),
		freeBufs:    make(chan *segBuf, hotLimit/max(cfg.SegmentBytes, 1<<20)+8),
		scrubReq:    make(chan struct{}, 1),
		coldReads:   make(chan struct{}, maxColdReads),
	}
	if cfg.Metrics != nil {
		s.metrics = newMetrics(s, cfg.Metrics)
	} else {
		s.metrics = newMetrics(s, nil)
	}
	ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = cfg.Store.EnsureContainer(ectx)
	cancel()
	// A host name that does not resolve may be a resolver not up yet at
	// boot: cached until it is, as for an outage (below), not refused.
	var dnsErr *net.DNSError
	if err != nil && blobstore.IsPermanent(err) && ctx.Err() == nil && !errors.As(err, &dnsErr) {
		// A wrong key, a SAS without the permissions, a container name the
		// service refuses: waiting will not fix it, and agents would fill
		// the cache meanwhile. But a token scoped to an existing container
		// may not create one: it only needs to use it.
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, lerr := cfg.Store.ListBlobs(lctx, layout.ManifestName("probe"))
		cancel()
		if lerr != nil {
			return nil, fmt.Errorf("the storage account refuses container %q (check the connection string's key or SAS permissions, and the container name): %w", cfg.Container, err)
		}
		s.log.Info("the container exists, but this connection may not create containers", "container", cfg.Container)
		err = nil
	}
	if cfg.NewApplier != nil {
		a, aerr := cfg.NewApplier(s)
		if aerr != nil {
			return nil, fmt.Errorf("applier: %w", aerr)
		}
		s.applier = a
	}
	containerReady := err == nil
	if err != nil {
		// Not fatal: the cache absorbs the stream until the account is
		// back, and the container is created then (ensureContainer).
		s.log.Error("cannot reach the storage account; caching until it is back", "container", cfg.Container, logErr, err)
	}
	if err := s.scanCache(); err != nil {
		return nil, err
	}
	if rep := ch.Replaced(); len(rep) > 0 {
		s.log.Warn("cache directories were wiped or replaced; rebuilding their shards", logDir, rep)
		s.scrubReq <- struct{}{}
	} else if short, err := ch.ShortOfShards(); err != nil || short {
		// Shards missing since before the restart (a lowered quorum, a
		// disk unmounted, a crash): a second loss would cost segments.
		s.log.Warn("cached segments are missing shards; rebuilding them", logErr, err)
		s.scrubReq <- struct{}{}
	}

	s.ln = ln
	if metricsLn != nil {
		s.serveMetrics(metricsLn)
	}
	s.ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	s.mu.Lock()
	for _, m := range s.machines {
		s.bg.Go(func() { m.runUploader(s.ctx) })
		m.kick()
	}
	s.mu.Unlock()
	if !containerReady {
		s.bg.Go(s.ensureContainer)
	}
	s.bg.Go(s.monitor)
	s.bg.Go(s.scrubber)
	s.bg.Go(s.acceptLoop)
	s.log.Info("process server listening", logAddr, ln.Addr().String(), "identity", id,
		"cache", ch.Dirs(), "container", cfg.Container, "recovery_key", seal.Fingerprint(rk))
	started = true
	return s, nil
}

// Run runs a process server until ctx is done.
func Run(ctx context.Context, cfg Config) error {
	s, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	<-ctx.Done()
	s.log.Info("stopping: agents resend what is not acknowledged, cached segments are uploaded after the next start")
	err = s.Close()
	s.log.Info("process server stopped")
	return err
}

var errShuttingDown = errors.New("process server shutting down")

// Addr returns the address agents connect to.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close stops accepting, closes every agent connection (unacknowledged
// data is resent by the agents), stops the uploaders (cached segments
// are uploaded after the next start) and releases the cache. The work of
// sessions and uploaders is cancelled before Close waits for them: during
// an outage a hello or an upload may otherwise be retrying the account
// for minutes (and a hello may wait for an uploader's manifest lock all
// that time).
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.ln.Close()
		if s.httpSrv != nil {
			s.httpSrv.Close()
		}
		s.mu.Lock()
		for _, m := range s.machines {
			if st := m.current(); st != nil {
				st.abort(errShuttingDown)
			}
		}
		s.mu.Unlock()
		s.cancel()
		s.conns.Wait()
		s.bg.Wait()
		// Released once nothing uses it: a new server may open it.
		if err := s.cache.Close(); s.closeErr == nil {
			s.closeErr = err
		}
	})
	return s.closeErr
}

// Applied is how the applier reports that every record of machine up to
// and including seq is in the replica page blobs. Segments covered are
// then deleted from the cache and the manifest's applied_seq advances.
// It does not block.
func (s *Server) Applied(machine string, seq uint64) {
	m := s.known(machine)
	if m == nil {
		return
	}
	m.mu.Lock()
	m.applied = max(m.applied, seq)
	m.mu.Unlock()
	m.kick()
}

// UpdateManifest lets the applier record its progress through the
// server, which owns the manifest: update is applied to a copy of the
// current manifest and only its applied_seq and journal_from are kept
// (raised, never lowered), so neither side
// overwrites the other's fields. Covered segments are then dropped from
// the cache, as with Applied.
func (s *Server) UpdateManifest(ctx context.Context, machine string, update func(*layout.Manifest)) error {
	m := s.machine(machine)
	if err := m.ensureLoaded(ctx); err != nil {
		return err
	}
	// The change and its write hold manMu (see writeManifest).
	m.manMu.Lock()
	defer m.manMu.Unlock()
	m.mu.Lock()
	man := m.man
	man.Disks = append([]layout.Disk(nil), man.Disks...)
	update(&man)
	if man.AppliedSeq > m.man.AppliedSeq {
		m.man.AppliedSeq = man.AppliedSeq
		m.applied = max(m.applied, man.AppliedSeq)
	}
	if man.JournalFrom > m.man.JournalFrom {
		m.man.JournalFrom = man.JournalFrom
		// Retention made every state before JournalFrom-1 unrecoverable:
		// the gaps only those needed go.
		if n := m.man.ForgetGaps(m.man.JournalFrom - 1); n > 0 {
			s.log.Info("retention forgot mended gaps", logMachine, machine, "gaps", n, "journal_from", m.man.JournalFrom)
		}
	}
	m.mu.Unlock()
	m.kick()
	return m.writeLocked(ctx)
}

// Fence returns the fence the applier writes machine's replicas under:
// the claim of the manifest this server last wrote or loaded as its own
// (layout.Manifest.Claim). A machine this server does not serve now
// (fenced) has none: the error wraps blobstore.ErrFenced. Nor has one
// whose manifest, as the applier read it (man), holds another server's
// claim since: a blobstore.FenceError then. (A claim above this
// server's in its own name is its own, whose write failed but landed.)
func (s *Server) Fence(ctx context.Context, machine string, man *layout.Manifest) (int64, error) {
	m := s.machine(machine)
	if err := m.ensureLoaded(ctx); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fenced {
		return 0, fmt.Errorf("%s: %w", m.fencedMessage(), blobstore.ErrFenced)
	}
	if man != nil && man.Claim > m.claimed && man.Owner != s.cfg.Name {
		return m.claimed, fmt.Errorf("%s claimed the machine: %w", man.Owner,
			blobstore.Fenced("manifest", "claim", layout.ManifestName(machine), m.claimed, man.Claim))
	}
	return m.claimed, nil
}

// ReplicaFenced is how the applier reports that a replica page blob of
// machine was claimed by a newer writer than fence n (another process
// server's applier): this server stops serving the machine, as when
// another writer changes the manifest (fence). Not when n is not its
// fence now (it claimed the machine again since), nor while a claim of
// its own is unsure (its write failed, maybe after it landed): its next
// manifest write settles who serves the machine.
func (s *Server) ReplicaFenced(machine string, n int64, err error) {
	m := s.known(machine)
	if m == nil {
		return
	}
	m.manMu.Lock()
	defer m.manMu.Unlock()
	m.mu.Lock()
	stale := m.fenced || m.claimed != n || m.man.Claim != n || !blobstore.NewerFence(err)
	m.mu.Unlock()
	if !stale {
		m.fence(fmt.Errorf("a replica page blob: %w", err))
	}
}

// ReplicaLost is how the applier reports that the replica page blob of
// generation of disk went missing after records were applied to it; it
// recreated the blob empty and marked it layout.MetaLost. The agent's
// session ends if it streams that generation of the disk, so that its next
// hello gets a full sync of the disk (missingReplicas); a session already
// on a newer generation, or not protecting the disk, goes on. The applier
// reports it again when it reloads the disk, in case a hello could not
// check the replica then. It does not block.
func (s *Server) ReplicaLost(machine, disk, generation string) {
	m := s.known(machine)
	if m == nil {
		return
	}
	m.mu.Lock()
	st := m.sess
	var agreed string
	if st != nil {
		agreed = st.synced[disk]
	}
	m.mu.Unlock()
	if agreed != "" && agreed == generation {
		st.abort(fmt.Errorf("replica page blob of disk %s lost: the agent reconnects for a full sync", disk))
	}
}

// DataKey returns machine's data key, to open its journal segments, once
// the server has loaded or created it (before its first segment upload).
func (s *Server) DataKey(machine string) (*seal.Key, bool) {
	m := s.known(machine)
	if m == nil {
		return nil, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.key, m.key != nil
}

// Manifest returns a copy of machine's manifest as the server last wrote
// or loaded it (disks, generations, durable_seq, …).
func (s *Server) Manifest(machine string) (layout.Manifest, bool) {
	m := s.known(machine)
	if m == nil {
		return layout.Manifest{}, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	man := m.man
	// The slices the machine changes in place (openGap, mendLocked).
	man.Disks = slices.Clone(man.Disks)
	man.Gaps = slices.Clone(man.Gaps)
	for i := range man.Gaps {
		man.Gaps[i].Unmended = slices.Clone(man.Gaps[i].Unmended)
	}
	return man, m.loaded
}

// machineList returns the machines the server knows.
func (s *Server) machineList() []*machine {
	s.mu.Lock()
	defer s.mu.Unlock()
	ms := make([]*machine, 0, len(s.machines))
	for _, m := range s.machines {
		ms = append(ms, m)
	}
	return ms
}

// known returns machine's state, or nil if this server has none.
func (s *Server) known(machine string) *machine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.machines[machine]
}

// machine returns the state of name, creating it (and its uploader).
func (s *Server) machine(name string) *machine {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.machines[name]
	if m == nil {
		m = newMachine(s, name)
		s.machines[name] = m
		if s.ctx != nil {
			s.bg.Go(func() { m.runUploader(s.ctx) })
		}
	}
	return m
}

// scanCache picks up the segments a previous run left in the cache: they
// were acknowledged, so they are uploaded (if not yet) and kept until
// applied. The durable sequence of each machine starts at the last record
// of its newest cached segment.
func (s *Server) scanCache() error {
	streams, err := s.cache.Streams()
	if err != nil {
		return fmt.Errorf("scan cache: %w", err)
	}
	for _, name := range streams {
		ids, err := s.cache.List(name)
		if err != nil {
			return fmt.Errorf("scan cache: %w", err)
		}
		m := s.machine(name)
		if len(ids) == 0 {
			// Served before, everything published: known all the same,
			// so that its RPO is reported (and grows if its agent
			// never comes back).
			continue
		}
		for _, id := range ids {
			m.segs = append(m.segs, &segEntry{id: id})
		}
		sort.Slice(m.segs, func(i, j int) bool { return m.segs[i].id.Seq < m.segs[j].id.Seq })
		// The newest readable segment bounds what was acknowledged. Those
		// after it are suspect: a flusher stores segments in order and
		// stops at the first failure, so they are most likely what a
		// crash left of a store never acknowledged (uploadOne drops them
		// if still unreadable; the agent resends those records). Were
		// they acknowledged, the agent's hello says so (acked past
		// durable) and the loss is recorded then.
		newest := -1
		for i := len(m.segs) - 1; i >= 0; i-- {
			e := m.segs[i]
			e.suspect = true
			data, err := s.cache.Get(e.id)
			if err == nil {
				var meta segMeta
				if meta, _, err = parseCached(data); err == nil {
					e.size, e.last, e.suspect = int64(len(data)), meta.last, false
					m.backlog += e.size
					s.cacheBytes.Add(e.size)
					m.durable, m.lastRun = meta.last, meta.run
					m.markedAt(meta.lastTime)
					newest = i
					break
				}
			}
			s.log.Error("cached segment unreadable", logSegment, e.id.String(), logErr, err)
		}
		// The older ones are read when uploaded; the backlog and the
		// cache's size count them from their shards' headers now.
		for _, e := range m.segs[:max(newest, 0)] {
			if n, err := s.cache.Size(e.id); err == nil {
				e.size = n
				m.backlog += n
				s.cacheBytes.Add(n)
			}
		}
		s.log.Info("resuming cached segments", logMachine, name, logCount, len(ids), "durable_seq", m.durable)
	}
	return nil
}

func (s *Server) acceptLoop() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Error("accept", logErr, err)
			select {
			case <-time.After(100 * time.Millisecond):
			case <-s.ctx.Done():
				return
			}
			continue
		}
		release, ok := s.shakes.admit(c.RemoteAddr())
		if !ok {
			s.shakes.warn(s.log, "refused connection: too many TLS handshakes in flight (from this address, or in all)", logRemote, c.RemoteAddr().String())
			c.Close()
			continue
		}
		s.conns.Add(1)
		go stage.Do(s.ctx, stage.Ingest, func(ctx context.Context) { s.serveConn(ctx, c, release) })
	}
}

// monitor watches cache usage: metrics, alerts and backpressure.
// ensureContainer creates the container once the account answers, when
// the first try at start failed: a process server first started during an
// outage would otherwise find every write refused (ContainerNotFound) until
// restarted.
func (s *Server) ensureContainer() {
	wait := uploadRetryMin
	for {
		select {
		case <-time.After(wait):
		case <-s.ctx.Done():
			return
		}
		ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
		err := s.cfg.Store.EnsureContainer(ctx)
		cancel()
		if err == nil {
			s.log.Info("storage account reachable again; container ready", "container", s.cfg.Container)
			s.mu.Lock()
			for _, m := range s.machines {
				m.kick()
			}
			s.mu.Unlock()
			return
		}
		if s.ctx.Err() != nil {
			return
		}
		wait = min(2*wait, uploadRetryMax)
	}
}

// expiryEvery spaces the warnings of certificates about to end: a
// server runs for months, and an agent says hello only when it connects.
var expiryEvery = 24 * time.Hour

// warnExpiring warns of this server's certificate, and those of the
// agents connected, if they end soon (pki.Expiring).
func (s *Server) warnExpiring() {
	if s.id != nil {
		if w := pki.Expiring("the process server's certificate "+s.cfg.Name+" (or its CA)", s.id.NotAfter(), time.Now()); w != "" {
			s.log.Warn(w)
		}
	}
	for _, m := range s.machineList() {
		if st := m.current(); st != nil {
			st.warnExpiring()
		}
	}
}

func (s *Server) monitor() {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	usage := usageWatch{level: slog.LevelInfo}
	watch := cacheWatch{pending: time.Now()} // Start asked for the first scrub
	expiry := time.Now()                     // Start and each hello warned
	for {
		s.checkCache(&usage)
		s.checkCacheDirs(&watch)
		if time.Since(expiry) >= expiryEvery {
			expiry = time.Now()
			s.warnExpiring()
		}
		for _, m := range s.machineList() {
			m.saveHint()
			if st := m.current(); st != nil {
				st.poke()
			}
		}
		select {
		case <-tick.C:
		case <-s.ctx.Done():
			return
		}
	}
}

// scrubber rebuilds the shards of cache directories that were wiped or
// replaced, one scrub at a time, so that the cache again survives the loss
// of its parity count of directories: during a long storage account
// outage it holds every acknowledged write.
func (s *Server) scrubber() {
	for {
		select {
		case <-s.scrubReq:
		case <-s.ctx.Done():
			return
		}
		if s.ctx.Err() != nil {
			return // both were ready: stopping wins
		}
		s.scrubStart.Store(time.Now().UnixNano())
		s.scrubEnd.Store(math.MaxInt64) // running: no rescrub counts from it
		r, err := s.cache.Scrub(s.ctx)
		s.scrubEnd.Store(time.Now().UnixNano())
		s.metrics.rebuiltShards.Add(float64(r.RepairedShards))
		if s.ctx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Error("cache scrub failed", logErr, err, "lost", len(r.Lost))
			continue
		}
		s.log.Info("cache scrub done", logCount, r.Segments, "repaired_shards", r.RepairedShards)
	}
}

// rescrubAfter is when a second scrub follows one for a directory lost
// while running: a wipe still under way when the first one started may
// delete what it rebuilt.
const rescrubAfter = 5 * time.Second

// lostRescrub spaces the scrubs for directories found losing shards
// again right after one.
const lostRescrub = time.Minute

// pendingRescrub is how often a scrub runs while a cache directory's
// rebuild is not complete (a scrub that met a problem leaves it pending).
const pendingRescrub = 10 * time.Minute

// cacheWatch is the monitor's state for checkCacheDirs.
type cacheWatch struct {
	dirErr  string    // the last error reported, not repeated every second
	rescrub time.Time // the follow-up scrub after a loss
	pending time.Time // the last scrub asked for while a rebuild is pending
	// lostWarned is when losses were last logged.
	lostWarned time.Time
}

// checkCacheDirs asks for a scrub when a cache directory lost its shards
// while the server runs, again rescrubAfter later, and every
// pendingRescrub while a rebuild is not complete.
func (s *Server) checkCacheDirs(w *cacheWatch) {
	lost, err := s.cache.CheckDirs()
	now := time.Now()
	scrub := false
	start, end := s.scrubStart.Load(), s.scrubEnd.Load()
	recent := func(ns int64) bool { return ns != 0 && ns != math.MaxInt64 && now.Sub(time.Unix(0, ns)) < lostRescrub }
	switch {
	case len(lost) > 0 && (end == math.MaxInt64 || recent(start) || recent(end)):
		// Lost while a scrub runs or within lostRescrub of one: a
		// directory that keeps failing writes (read-only, say) while a
		// lowered quorum acks without it. Back-to-back scrubs would read
		// every cached segment from the healthy disks over and over:
		// the next follows lostRescrub after the last one's start and
		// end, or, once the losses stop, at the rescrub time.
		at := now.Add(rescrubAfter)
		if end != math.MaxInt64 {
			at = time.Unix(0, max(start, end)).Add(lostRescrub)
		}
		if w.rescrub.IsZero() || w.rescrub.After(at) {
			w.rescrub = at
		}
		if now.Sub(w.lostWarned) >= lostRescrub {
			w.lostWarned = now
			s.log.Warn("cache directories keep losing shards (a disk failing writes?); the next rebuild follows shortly", logDir, lost)
		}
	case len(lost) > 0:
		w.lostWarned = now
		s.log.Warn("cache directories lost their shards while in use; rebuilding them", logDir, lost)
		w.rescrub, scrub = now.Add(rescrubAfter), true
	case !w.rescrub.IsZero() && now.After(w.rescrub):
		w.rescrub, scrub = time.Time{}, true
	case len(s.cache.Pending()) > 0 && now.Sub(w.pending) > pendingRescrub &&
		now.Sub(time.Unix(0, end)) > pendingRescrub:
		// Counted from the last scrub's end too: one longer than the
		// interval is not followed at once by the next.
		scrub = true
	}
	if scrub {
		w.pending = now
		select {
		case s.scrubReq <- struct{}{}:
		default: // one is already queued
		}
	}
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != w.dirErr {
		if err != nil {
			s.log.Error("cache directory check failed", logErr, err)
		} else {
			s.log.Info("cache directories healthy again")
		}
		w.dirErr = msg
	}
}

// usageWatch is the monitor's state for checkCache.
type usageWatch struct {
	level slog.Level
	err   string // the last usage error reported, not repeated every second
}

// checkCache sets the free space metric and pauses agents while the cache
// is nearly full, going by the fullest directory it could measure: one
// that cannot be measured must not turn backpressure off for the others.
func (s *Server) checkCache(w *usageWatch) {
	s.metrics.cacheBytes.Set(float64(s.cacheBytes.Load()))
	free, measured, fullest := 1.0, 0, ""
	var errs []error
	for _, u := range s.cache.Usage() {
		if u.Err != nil {
			errs = append(errs, u.Err)
			continue
		}
		if u.FreeFraction <= free {
			free, fullest = u.FreeFraction, u.Dir
		}
		measured++
	}
	msg := ""
	if len(errs) > 0 {
		msg = errors.Join(errs...).Error()
	}
	if msg != "" && msg != w.err {
		if measured == 0 {
			s.log.Error("cache usage unavailable for every directory; backpressure stays as it was", logErr, msg)
		} else {
			s.log.Error("cache usage unavailable for some directories; going by the others", logErr, msg)
		}
	}
	w.err = msg
	if measured == 0 {
		// Nothing to go by: backpressure stays as it was, and the gauge
		// says unknown rather than keep the last healthy value.
		s.metrics.freeRatio.Set(math.NaN())
		return
	}
	s.metrics.freeRatio.Set(free)
	level := func(free float64) slog.Level {
		switch {
		case free < freeError:
			return slog.LevelError
		case free < freeWarn:
			return slog.LevelWarn
		}
		return slog.LevelInfo
	}
	want := level(free)
	if want < w.level && level(free-freeSettle) == w.level {
		want = w.level // not clear of the threshold yet
	}
	if want != w.level {
		switch want {
		case slog.LevelError:
			s.log.Error("cache almost full: uploads are not keeping up (storage account down or too slow?), or something else fills its file system; agents will be paused below 10% free", logFree, free, logDir, fullest)
		case slog.LevelWarn:
			s.log.Warn("cache filling up", logFree, free, logDir, fullest)
		default:
			s.log.Info("cache usage back to normal", logFree, free)
		}
		w.level = want
	}
	if free < freePause {
		s.cachePaused.Store(true)
	} else if free > freeResume {
		s.cachePaused.Store(false)
	}
}

func (s *Server) serveMetrics(ln net.Listener) {
	reg := s.cfg.Metrics
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		s.metrics.register(reg)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	if s.cfg.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	s.httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go s.httpSrv.Serve(ln)
	s.log.Info("serving metrics", logAddr, ln.Addr().String())
}

func (s *Server) getBuf() *segBuf {
	select {
	case b := <-s.freeBufs:
		b.reset()
		return b
	default:
	}
	// A segment is cut after the batch that reaches SegmentBytes; agents
	// send batches of about 1 MiB, so this rarely grows. Aligned: the
	// cache writes the sealed segment from it with O_DIRECT, uncopied.
	b := &segBuf{buf: blockdev.AlignedBuffer(segPrefix + s.cfg.SegmentBytes + 2<<20 + seal.TagSize)[:segPrefix]}
	b.reset()
	return b
}

// hotSegment returns the in-memory copy of a cached segment, if any,
// acquired: the caller releases it.
func (s *Server) hotSegment(machine string, first uint64) *hotSeg {
	m := s.known(machine)
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.segs {
		if e.id.Seq == first {
			return e.hot.acquire()
		}
	}
	return nil
}

func (s *Server) putBuf(b *segBuf) {
	if cap(b.data) > 2*s.cfg.SegmentBytes+maxFrame {
		return // grown by a huge frame: let it go
	}
	select {
	case s.freeBufs <- b:
	default:
	}
}

func peerIdentity(c channel.Stream) (string, pki.Role, error) {
	return pki.PeerIdentity(c.ConnectionState())
}
