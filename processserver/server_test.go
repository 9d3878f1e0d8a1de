package processserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/recovery"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

var disk0 = wire.DiskState{Name: "sda", Size: 1 << 30}

// TestStreamToJournal: acks follow durability, segments are cut on size,
// age and crash markers, and the journal opens with the recovery key and
// holds exactly the frames sent; a reconnect resumes without resync and
// drops resent duplicates.
func TestStreamToJournal(t *testing.T) {
	store := azureStore(t)
	e := newEnv(t, store, 3)
	e.segBytes = 64 << 10
	// Long enough that no stall of a loaded host between the frames
	// below cuts a segment on age before the size or marker cut (the
	// test counts segments); short enough for the age cut of seq 26 to
	// come well within waitAck's 30 s.
	e.segAge = 2 * time.Second
	s := e.start()

	a := dialAgent(t, e, s, "m1")
	ack, window := a.hello("m1", disk0)
	if len(ack.Disks) != 1 || ack.Disks[0].Action != wire.SyncFull || ack.Disks[0].Generation.IsZero() || ack.Disks[0].ResumeFrom != 1 {
		t.Fatalf("first hello: got %+v, want full sync with a new generation from seq 1", ack.Disks)
	}
	if window != DefaultWindow {
		t.Fatalf("window %d, want %d", window, DefaultWindow)
	}
	gen := ack.Disks[0].Generation

	t0 := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	last := a.batch(1, 3)
	a.marker(last, wire.MarkerTime, t0)
	last = a.batch(4, 20) // 80 KiB: cut on size
	a.waitAck(last)
	last = a.batch(24, 2)
	a.marker(last, wire.MarkerCrashConsistent, t0.Add(time.Second)) // cut on marker
	a.waitAck(last)
	last = a.batch(26, 1)
	a.marker(last, wire.MarkerTime, t0.Add(2*time.Second))
	a.waitAck(last) // cut on age
	want := bytes.Clone(a.sent)

	eventually(t, 20*time.Second, "upload of seq 26", func() bool { return durableSeq(t, store, "m1") >= 26 })
	plain, infos, man := journal(t, store, e.rk, "m1")
	if !bytes.Equal(plain, want) {
		t.Fatalf("journal holds %d bytes, want exactly the %d bytes of frames sent", len(plain), len(want))
	}
	if len(infos) != 3 {
		t.Errorf("%d segments, want 3 (size, marker and age cuts)", len(infos))
	}
	md := infos[1].Metadata
	if md[layout.MetaFirstSeq] != "24" || md[layout.MetaLastSeq] != "25" || md[layout.MetaMarkers] != "crash" {
		t.Errorf("segment %s metadata %v", infos[1].Name, md)
	}
	if !man.RecoverableUntil.Equal(t0.Add(2*time.Second)) || man.DurableSeq != 26 || man.Disk("sda").Generation != gen.String() {
		t.Errorf("manifest %+v", man)
	}

	// Idle: a time marker alone advances recoverable_until.
	t1 := t0.Add(10 * time.Second)
	a.marker(26, wire.MarkerTime, t1)
	eventually(t, 10*time.Second, "recoverable_until from an idle marker", func() bool {
		_, _, man := journal(t, store, e.rk, "m1")
		return man.RecoverableUntil.Equal(t1)
	})
	// The idle run's first marker stays in the manifest: recovery to a
	// time inside the idle period resolves to its sequence.
	t2 := t1.Add(time.Second)
	a.marker(26, wire.MarkerTime, t2)
	eventually(t, 10*time.Second, "recoverable_until from a second idle marker", func() bool {
		_, _, man := journal(t, store, e.rk, "m1")
		return man.RecoverableUntil.Equal(t2)
	})
	if _, _, man := journal(t, store, e.rk, "m1"); man.IdleSeq != 26 || !man.IdleSince.Equal(t1) {
		t.Fatalf("idle period: seq %d since %v, want 26 since %v", man.IdleSeq, man.IdleSince, t1)
	}

	// A second connection of the same machine replaces the first; the
	// agent resumes, resending a little more than was acked.
	b := dialAgent(t, e, s, "m1")
	ack, _ = b.hello("m1", wire.DiskState{Name: "sda", Size: disk0.Size, Generation: gen, LastAckedSeq: 25})
	if d := ack.Disks[0]; d.Action != wire.SyncResume || d.ResumeFrom != 27 || d.Generation != gen {
		t.Fatalf("reconnect: got %+v, want resume from 27", d)
	}
	if f := a.next(5 * time.Second); f.err == nil {
		for f.err == nil {
			f = a.next(5 * time.Second)
		}
	}
	b.batch(20, 10) // 20..29: 20..26 are duplicates
	b.waitAck(29)
	eventually(t, 20*time.Second, "upload of seq 29", func() bool { return durableSeq(t, store, "m1") >= 29 })
	plain, infos, _ = journal(t, store, e.rk, "m1")
	if n := infos[len(infos)-1].Name; n != layout.SegmentName("m1", 27, 29) {
		t.Errorf("last segment %s, want the duplicates dropped (27-29)", n)
	}
	recs := journalRecords(t, plain)
	for i, rec := range recs {
		if rec.Seq != uint64(i+1) {
			t.Fatalf("journal record %d has sequence %d: want 1..29, each once", i, rec.Seq)
		}
	}
	if len(recs) != 29 {
		t.Fatalf("journal holds %d records, want 29", len(recs))
	}
	for _, rec := range recs[26:] {
		if !bytes.Equal(rec.Data, batchData(rec.Seq, int(rec.Seq-20))) {
			t.Fatalf("resent record %d does not hold what the agent sent", rec.Seq)
		}
	}
}

// TestRestartUploadsCachedSegments: with the storage account down, batches
// are still acked (the cache absorbs them); a process server stopped in
// that state uploads them after its restart, and the reconnecting agent
// resumes without any resync.
func TestRestartUploadsCachedSegments(t *testing.T) {
	faulty := blobstoretest.NewFaulty(azureStore(t))
	e := newEnv(t, faulty, 2)
	e.segAge = 50 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0)
	gen := ack.Disks[0].Generation

	faulty.FailFor(time.Hour)
	for i := range 5 {
		last := a.batch(uint64(1+10*i), 10)
		a.waitAck(last)
	}
	a.marker(50, wire.MarkerAppConsistent, time.Now())
	time.Sleep(100 * time.Millisecond)
	ids, err := s.cache.List("m1")
	if err != nil || len(ids) < 5 {
		t.Fatalf("cache holds %v (%v), want at least 5 segments", ids, err)
	}
	cached := s.cacheBytes.Load()
	s.Close()
	// Restarted with the account still down: the cache's size counts
	// every segment, not only those read so far.
	s2 := e.start()
	if got := s2.cacheBytes.Load(); got != cached {
		t.Errorf("cache bytes after the restart %d, want the %d cached before", got, cached)
	}
	faulty.FailFor(0)
	eventually(t, 20*time.Second, "upload of the cached segments", func() bool { return durableSeq(t, faulty, "m1") >= 50 })
	plain, _, _ := journal(t, faulty, e.rk, "m1")
	// The app marker arrived with no record pending: it waits for the next
	// record at the head of the open segment, so it is not in the journal.
	want := a.sent[:len(a.sent)-markerFrameSize]
	if !bytes.Equal(plain, want) {
		t.Fatalf("journal after restart holds %d bytes, want the %d bytes acked before", len(plain), len(want))
	}
	eventually(t, 5*time.Second, "cache emptied", func() bool {
		ids, _ := s2.cache.List("m1")
		return len(ids) == 0
	})
	b := dialAgent(t, e, s2, "m1")
	ack, _ = b.hello("m1", wire.DiskState{Name: "sda", Size: disk0.Size, Generation: gen, LastAckedSeq: 50})
	if d := ack.Disks[0]; d.Action != wire.SyncResume || d.ResumeFrom != 51 {
		t.Fatalf("after restart: %+v, want resume from 51", d)
	}
}

// TestCorruptFrame: a frame with a flipped byte is refused with a clear
// log line and an Error frame, the connection is closed, and nothing of
// that frame is cached.
func TestCorruptFrame(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 2)
	e.segAge = 50 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 4))

	var b wire.BatchBuilder
	b.Add(wire.Record{Seq: 5, Op: wire.OpWrite, Offset: 0, Length: 512, Data: make([]byte, 512)})
	p, _ := b.AppendBinary(nil)
	f, _ := wire.AppendFrame(nil, wire.TypeBatch, 0, p)
	f[wire.HeaderSize+100] ^= 0x10
	if err := a.w.WriteRaw(f); err != nil {
		t.Fatal(err)
	}
	if we := errorFrame(t, a); we.Code != wire.CodeProtocol {
		t.Fatalf("want a protocol Error frame, got %+v", we)
	}
	if got := a.next(10 * time.Second); got.err == nil {
		t.Fatalf("connection still open after the error: %s", got.typ)
	}
	if !strings.Contains(e.logs.String(), "corrupt frame from agent m1: wire: corrupt frame: crc mismatch") ||
		!strings.Contains(e.logs.String(), "dropped, closing connection") {
		t.Errorf("log lacks the corrupt-frame error:\n%s", e.logs)
	}
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, store, "m1") >= 4 })
	// The uploader deletes a segment from the cache after its upload:
	// once the cache is empty, anything cached (the corrupt frame
	// included, were it accepted) is in the journal.
	eventually(t, 10*time.Second, "cache emptied", func() bool {
		ids, _ := s.cache.List("m1")
		return len(ids) == 0
	})
	plain, _, man := journal(t, store, e.rk, "m1")
	if !bytes.Equal(plain, a.sent) || man.DurableSeq != 4 {
		t.Fatalf("journal %d bytes durable_seq %d, want only the good batch", len(plain), man.DurableSeq)
	}
}

// TestTamperedRecord: a batch changed in transit (one bit of the record
// carrying it) fails authentication: the process server says so, closes
// the connection and caches nothing of it.
func TestTamperedRecord(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 2)
	e.segAge = 50 * time.Millisecond
	s := e.start()
	tc := &tamperConn{}
	a := dialAgentWith(t, e, s.Addr(), "m1", dialOpts{wrap: func(c net.Conn) net.Conn { tc.Conn = c; return tc }})
	if _, ok := a.conn.(*channel.Conn); !ok {
		t.Fatalf("agent connection is %T, want records", a.conn)
	}
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 4))
	good := bytes.Clone(a.sent)
	tc.armed.Store(true)
	a.batch(5, 4)
	if we := errorFrame(t, a); we.Code != wire.CodeInternal || !strings.Contains(we.Message, "authentication") {
		t.Fatalf("want a retryable Error frame naming the failed authentication, got %+v", we)
	}
	if got := a.next(10 * time.Second); got.err == nil {
		t.Fatalf("connection still open after the error: %s", got.typ)
	}
	if !strings.Contains(e.logs.String(), "damaged record from agent m1: channel: record failed authentication") {
		t.Errorf("log lacks the authentication failure:\n%s", e.logs)
	}
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, store, "m1") >= 4 })
	time.Sleep(200 * time.Millisecond)
	plain, _, man := journal(t, store, e.rk, "m1")
	if !bytes.Equal(plain, good) || man.DurableSeq != 4 {
		t.Fatalf("journal %d bytes durable_seq %d, want only the batch before the tampered one", len(plain), man.DurableSeq)
	}
}

// TestPlainTLSAgent: an agent that predates records (no ALPN) streams
// over plain TLS, and its journal is what it sent.
func TestPlainTLSAgent(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 2)
	e.segAge = 50 * time.Millisecond
	s := e.start()
	a := dialAgentWith(t, e, s.Addr(), "m1", dialOpts{plainTLS: true})
	if _, ok := a.conn.(*tls.Conn); !ok {
		t.Fatalf("agent connection is %T, want plain TLS", a.conn)
	}
	a.hello("m1", disk0)
	a.batch(1, 4)
	a.waitAck(a.batch(5, 64))
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, store, "m1") >= 68 })
	plain, _, _ := journal(t, store, e.rk, "m1")
	if !bytes.Equal(plain, a.sent) {
		t.Fatalf("journal of %d bytes differs from the %d bytes sent", len(plain), len(a.sent))
	}
}

// TestRefusesWrongCertificate: certificates of the wrong role or from
// another CA are refused at the handshake with a clear log line, and an
// agent cannot speak for another machine.
func TestRefusesWrongCertificate(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	s := e.start()

	other := filepath.Join(t.TempDir(), "other")
	if err := pki.Init(other); err != nil {
		t.Fatal(err)
	}
	if err := pki.Issue(other, "m1", pki.RoleAgent); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ dir, name, want string }{
		{e.pki, "ps2", `presented role \"process-server\"; expected role \"agent\"`},
	} {
		c, err := dialAs(t, tc.dir, tc.name, s.Addr())
		if err == nil {
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		if err == nil {
			t.Fatalf("%s: connection accepted", tc.name)
		}
		eventually(t, 5*time.Second, "refusal logged", func() bool {
			return strings.Contains(e.logs.String(), "refused connection") && strings.Contains(e.logs.String(), tc.want)
		})
	}
	// Another CA: the client trusts anything; the server must refuse it.
	c, err := tlsDialForeign(t, other, s.Addr())
	if err == nil {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if err == nil {
		t.Fatal("certificate of another CA accepted")
	}
	eventually(t, 5*time.Second, "foreign CA refusal logged", func() bool {
		return strings.Contains(e.logs.String(), "not by this deployment's CA")
	})

	a := dialAgent(t, e, s, "m2")
	if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{disk0}}); err != nil {
		t.Fatal(err)
	}
	f := a.next(10 * time.Second)
	var we wire.Error
	if f.typ != wire.TypeError || we.UnmarshalBinary(f.payload) != nil || we.Code != wire.CodeUnknownAgent {
		t.Fatalf("m2 speaking for m1: got %s %v", f.typ, f.err)
	}

	// A machine named like the cache's own files (its lock, say) could
	// never have a segment cached: refused at its hello.
	if err := pki.Issue(e.pki, "lifeboat-cache.lock", pki.RoleAgent); err != nil {
		t.Fatal(err)
	}
	a = dialAgent(t, e, s, "lifeboat-cache.lock")
	if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "lifeboat-cache.lock", Disks: []wire.DiskState{disk0}}); err != nil {
		t.Fatal(err)
	}
	if we := errorFrame(t, a); we.Code != wire.CodeUnknownAgent || !strings.Contains(we.Message, "the cache's own") {
		t.Fatalf("machine lifeboat-cache.lock: %+v", we)
	}
}

// stalledUploads starts a server on three cache directories (2 data + 1
// parity) whose storage account fails, and an agent of m1 whose first 32
// records (4 batches, 4 segments) are acknowledged: cached, not uploaded.
func stalledUploads(t *testing.T) (*blobstoretest.Faulty, *env, *Server, *agent) {
	t.Helper()
	faulty := blobstoretest.NewFaulty(mem.New())
	e := newEnv(t, faulty, 3)
	e.segAge = 50 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	faulty.FailFor(time.Hour)
	for i := range 4 {
		a.waitAck(a.batch(uint64(1+8*i), 8))
	}
	return faulty, e, s, a
}

// TestCacheDirWiped: with uploads stalled, one of three cache directories
// (2 data + 1 parity) is wiped while the server runs; every acked record
// is still uploaded, and the next start reports and rebuilds the wiped
// directory.
func TestCacheDirWiped(t *testing.T) {
	faulty, e, s, a := stalledUploads(t)
	wipeDir(t, e.cache[1])
	for i := 4; i < 6; i++ {
		a.waitAck(a.batch(uint64(1+8*i), 8))
	}
	faulty.FailFor(0)
	eventually(t, 20*time.Second, "upload after the wipe", func() bool { return durableSeq(t, faulty, "m1") >= 48 })
	plain, _, _ := journal(t, faulty, e.rk, "m1")
	if !bytes.Equal(plain, a.sent) {
		t.Fatalf("journal holds %d bytes, want %d", len(plain), len(a.sent))
	}
	s.Close()
	e.start()
	eventually(t, 5*time.Second, "wiped directory reported", func() bool {
		return strings.Contains(e.logs.String(), "wiped or replaced")
	})
}

// TestCacheDirRebuiltWhileRunning: during a storage account outage one of
// three cache directories (2 data + 1 parity) is wiped and the running
// server rebuilds its shards; then another is wiped and the server stops
// before any upload. After a restart every acknowledged record is
// uploaded: without the rebuild, the segments cached before the first
// wipe would have kept one shard of the two they need.
func TestCacheDirRebuiltWhileRunning(t *testing.T) {
	faulty, e, s, a := stalledUploads(t)
	before := shardFiles(t, e.cache[0])
	wipeDir(t, e.cache[1])
	eventually(t, 20*time.Second, "shards rebuilt in the wiped directory", func() bool {
		return strings.Contains(e.logs.String(), "cache scrub done") && shardFiles(t, e.cache[1]) >= before
	})
	var m dto.Metric
	if err := s.metrics.rebuiltShards.Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetCounter().GetValue(); got < float64(before) {
		t.Errorf("rebuilt shards metric %v, want at least %d", got, before)
	}
	for i := 4; i < 6; i++ {
		a.waitAck(a.batch(uint64(1+8*i), 8))
	}
	a.conn.Close()
	s.Close()
	wipeDir(t, e.cache[2])
	e.start()
	faulty.FailFor(0)
	eventually(t, 20*time.Second, "upload after both wipes", func() bool { return durableSeq(t, faulty, "m1") >= 48 })
	plain, _, _ := journal(t, faulty, e.rk, "m1")
	if !bytes.Equal(plain, a.sent) {
		t.Fatalf("journal holds %d bytes, want %d", len(plain), len(a.sent))
	}
}

// wipeDir removes a cache directory as a failed disk loses it. It moves
// the directory aside first: removing it in place races with the server's
// check, which may write a new marker into it meanwhile.
func wipeDir(t *testing.T, dir string) {
	t.Helper()
	aside := dir + ".wiped"
	if err := os.Rename(dir, aside); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(aside); err != nil {
		t.Fatal(err)
	}
}

// shardFiles counts the shard files under a cache directory.
func shardFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".shard") {
			n++
		}
		return nil
	})
	return n
}

// TestBackpressure: a machine over its upload backlog bound is paused with
// Backpressure{0} and resumed with the window once uploads drain; it is
// acked all along.
func TestBackpressure(t *testing.T) {
	faulty, a := pausedAgent(t)
	faulty.FailFor(0)
	a.waitWindow(20*time.Second, DefaultWindow)
}

// TestBackpressureStuckApplier: a machine whose segments are uploaded but
// never applied (its journal tampered, its replica refused) is paused by
// its cache bound, not left to fill the cache every machine shares, and
// resumed once they are applied.
func TestBackpressureStuckApplier(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segAge = 20 * time.Millisecond
	e.backlog = 256
	e.reg = prometheus.NewRegistry()
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	// Not waitAck: the pause may come before the ack, and waitAck passes
	// over Backpressure frames.
	a.batch(1, 40)
	a.waitWindow(10*time.Second, 0)
	// Uploaded meanwhile (nothing fails), the segments stay: so does the
	// pause, over several of the monitor's rounds.
	eventually(t, 10*time.Second, "the uploads", func() bool { return s.known("m1").backlogBytes() == 0 })
	for quiet := time.After(3 * time.Second); ; {
		var f frame
		select {
		case f = <-a.frames:
		case <-quiet:
		}
		if f.typ == 0 && f.err == nil {
			break
		}
		var bp wire.Backpressure
		if f.err == nil && f.typ == wire.TypeBackpressure && bp.UnmarshalBinary(f.payload) == nil && bp.Window != 0 {
			t.Fatalf("window %d with every segment uploaded and none applied", bp.Window)
		}
	}
	if v, ok := gauge(t, e.reg, "lifeboat_ps_machine_cache_bytes", "m1"); !ok || v <= 256 {
		t.Errorf("machine cache bytes %v (%v), want over the bound", v, ok)
	}
	s.Applied("m1", 40)
	a.waitWindow(20*time.Second, DefaultWindow)
	if v, ok := gauge(t, e.reg, "lifeboat_ps_applied_seq", "m1"); !ok || v != 40 {
		t.Errorf("applied seq %v (%v), want 40", v, ok)
	}
	if v, ok := gauge(t, e.reg, "lifeboat_ps_machine_cache_bytes", "m1"); !ok || v > 256 {
		t.Errorf("machine cache bytes %v (%v) after the applier caught up", v, ok)
	}
}

// pausedAgent starts a process server whose uploads fail and an agent
// whose 40 records then go over its backlog bound (256 bytes; the backlog
// counts sealed bytes, and batch's data compresses 160 KiB to a few KiB):
// it returns once the agent is paused (Backpressure{0}).
func pausedAgent(t *testing.T) (*blobstoretest.Faulty, *agent) {
	t.Helper()
	faulty := blobstoretest.NewFaulty(mem.New())
	e := newEnv(t, faulty, 1)
	e.segAge = 20 * time.Millisecond
	e.backlog = 256
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	faulty.FailFor(time.Hour)
	a.batch(1, 40)
	a.waitWindow(10*time.Second, 0)
	return faulty, a
}

// An agent that goes on sending after it was paused, past what it may
// have had in flight then (the window, or one batch), is refused: it
// would fill the cache every machine shares.
func TestPausedAgentMustStop(t *testing.T) {
	faulty := blobstoretest.NewFaulty(mem.New())
	e := newEnv(t, faulty, 1)
	e.segAge = 20 * time.Millisecond
	e.backlog = 256
	e.window = 64 << 10
	a := dialAgent(t, e, e.start(), "m1")
	a.hello("m1", disk0)
	faulty.FailFor(time.Hour)
	a.batch(1, 40)
	a.waitWindow(10*time.Second, 0)
	// In flight when the pause came: a window's worth, or one batch.
	a.waitAck(a.batch(41, 20)) // 80 KiB, alone
	a.batch(61, 10)
	for deadline := time.Now().Add(10 * time.Second); ; {
		f := a.next(time.Until(deadline))
		if f.err != nil {
			t.Fatalf("no error frame after the paused agent went on sending: %v", f.err)
		}
		if f.typ == wire.TypeError {
			if !strings.Contains(string(f.payload), "after it was paused") {
				t.Fatalf("error frame %q, want the backpressure refusal", f.payload)
			}
			return
		}
	}
}

// fakeApplier records notifications.
type fakeApplier struct {
	mu   sync.Mutex
	upTo map[string]uint64
}

func (f *fakeApplier) Notify(machine string, seq uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.upTo[machine] = max(f.upTo[machine], seq)
}

func (f *fakeApplier) CompareSums(ctx context.Context, machine string, upTo uint64, s *wire.Sums) (wire.SumsReply, error) {
	return wire.SumsReply{Differs: make([]bool, len(s.Sums))}, nil
}

// TestApplierHook: segments stay in the cache until the applier reports
// them applied; applied_seq reaches the manifest.
func TestApplierHook(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	a.waitAck(a.batch(6, 5))
	eventually(t, 10*time.Second, "notify", func() bool {
		fa.mu.Lock()
		defer fa.mu.Unlock()
		return fa.upTo["m1"] == 10
	})
	if ids, _ := s.cache.List("m1"); len(ids) != 2 {
		t.Fatalf("cache holds %v before apply, want 2 segments", ids)
	}
	s.Applied("m1", 5)
	eventually(t, 5*time.Second, "first segment dropped", func() bool {
		ids, _ := s.cache.List("m1")
		return len(ids) == 1
	})
	s.Applied("m1", 10)
	eventually(t, 5*time.Second, "applied_seq in the manifest", func() bool {
		_, _, man := journal(t, store, e.rk, "m1")
		ids, _ := s.cache.List("m1")
		return man.AppliedSeq == 10 && len(ids) == 0
	})
}

// TestDiskIndicesFollowManifest: records name disks by their index in the
// Hello; the journal names them by their index in the (append-only)
// manifest, so an agent listing its disks in another order, or a new disk,
// does not misdirect records.
func TestDiskIndicesFollowManifest(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", wire.DiskState{Name: "sda", Size: 1 << 20})
	a.waitAck(a.batch(1, 1))

	b := dialAgent(t, e, s, "m1")
	b.hello("m1", wire.DiskState{Name: "sdb", Size: 1 << 20}, wire.DiskState{Name: "sda", Size: 1 << 20})
	var bb wire.BatchBuilder
	bb.Add(wire.Record{Seq: 2, Disk: 0, Op: wire.OpZero, Offset: 0, Length: 512})                           // sdb
	bb.Add(wire.Record{Seq: 3, Disk: 1, Op: wire.OpWrite, Offset: 0, Length: 512, Data: make([]byte, 512)}) // sda
	p, _ := bb.AppendBinary(nil)
	b.sendFrame(wire.TypeBatch, p)
	b.waitAck(3)
	eventually(t, 10*time.Second, "upload", func() bool { return durableSeq(t, store, "m1") >= 3 })
	plain, _, man := journal(t, store, e.rk, "m1")
	if len(man.Disks) != 2 || man.Disks[0].Name != "sda" || man.Disks[1].Name != "sdb" {
		t.Fatalf("manifest disks %+v, want sda then sdb", man.Disks)
	}
	var disks []uint16
	for _, rec := range journalRecords(t, plain) {
		disks = append(disks, rec.Disk)
	}
	if fmt.Sprint(disks) != "[0 1 0]" {
		t.Fatalf("journal disk indices %v, want [0 1 0] (sda, sdb, sda)", disks)
	}
}

// TestCacheHoldsNoPlaintext: what the cache directories hold of an
// acknowledged, not yet uploaded segment is sealed, so the disk data
// never lies in clear on the process server's cache disks.
func TestCacheHoldsNoPlaintext(t *testing.T) {
	faulty := blobstoretest.NewFaulty(mem.New())
	e := newEnv(t, faulty, 3)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	faulty.FailFor(time.Hour) // keep the segment in the cache
	a.waitAck(a.batch(1, 40))

	// batch's record 1: the 4 bytes {1, 0, 0x5a, 0} repeated.
	needle := bytes.Repeat([]byte{1, 0, 0x5a, 0}, 16)
	var files, size int
	for _, dir := range e.cache {
		err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			files++
			size += len(b)
			if bytes.Contains(b, needle) {
				t.Errorf("%s holds record data in clear", path)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if files < len(e.cache) {
		t.Fatalf("%d files in %d cache directories: the segment is not cached", files, len(e.cache))
	}
	t.Logf("%d cache files, %d bytes, none with plaintext", files, size)
}

// TestPausedAgentNotTimedOut: an agent paused by backpressure sends
// nothing (no batch, and it holds its time markers during a sync); the
// session must wait for it longer than the idle time-out of a streaming
// one, and resume it once uploads drain.
func TestPausedAgentNotTimedOut(t *testing.T) {
	old := idleTimeout
	// Already in force while pausedAgent sets up (hello, then batch):
	// long enough that a loaded host does not time that out.
	idleTimeout = 2 * time.Second
	t.Cleanup(func() { idleTimeout = old })
	faulty, a := pausedAgent(t)
	time.Sleep(3 * idleTimeout) // silent, as a paused agent is
	faulty.FailFor(0)
	a.waitWindow(20*time.Second, DefaultWindow)
	a.waitAck(a.batch(41, 2))
}

// TestReconnectDuringOutage: an agent that reconnects while the account
// is down gets its hello answered (the check of its replicas is bounded)
// instead of waiting out the storage retries, so the cache goes on
// absorbing its stream.
func TestReconnectDuringOutage(t *testing.T) {
	old := replicaCheckTimeout
	replicaCheckTimeout = 200 * time.Millisecond
	t.Cleanup(func() { replicaCheckTimeout = old })
	faulty := blobstoretest.NewFaulty(mem.New())
	// Retried as in production: a dead account holds each call until
	// its context ends.
	e := newEnv(t, blobstore.Stack(faulty, blobstore.StackConfig{}), 1)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}}
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0)
	last := a.batch(1, 5)
	a.waitAck(last)
	faulty.FailFor(time.Hour)
	d := disk0
	d.Generation, d.LastAckedSeq = ack.Disks[0].Generation, last
	start := time.Now()
	b := dialAgent(t, e, s, "m1")
	ack, _ = b.hello("m1", d)
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("hello answered after %s during the outage", took)
	}
	if ack.Disks[0].Action != wire.SyncResume {
		t.Fatalf("reconnect during the outage told %v, want resume", ack.Disks[0].Action)
	}
	b.waitAck(b.batch(last+1, 5))
	if !strings.Contains(e.logs.String(), "cannot check the replica page blob") {
		t.Errorf("the unchecked replica is not logged")
	}
}

// TestMarkersWithoutRecordsBounded: markers that no record follows fill
// no segment an agent sends; a misbehaving agent sending them without end
// is refused before the open segment outgrows the segment size.
func TestMarkersWithoutRecordsBounded(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segBytes = 64 << 10
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 2))
	at := time.Now()
	for i := 0; ; i++ {
		if i > 100_000 {
			t.Fatal("100 000 markers without a record accepted")
		}
		if err := a.w.WriteMarker(wire.Marker{Seq: 2, UnixNano: at.UnixNano(), Kind: wire.MarkerCrashConsistent}); err != nil {
			break // refused: the connection is closed
		}
	}
	eventually(t, 10*time.Second, "protocol error logged", func() bool {
		return strings.Contains(e.logs.String(), "bytes of markers with no record between them")
	})
}

// refusingStore is an account that refuses to create the container (a
// wrong key, or a token scoped to one container), and to list it unless
// listable (a token that may use the container it is scoped to).
type refusingStore struct {
	blobstore.Store
	listable bool
}

func (refusingStore) EnsureContainer(context.Context) error {
	return blobstore.Permanent(errors.New("AuthorizationFailure (HTTP 403)"))
}

func (r refusingStore) ListBlobs(ctx context.Context, prefix string) ([]blobstore.BlobInfo, error) {
	if !r.listable {
		return nil, blobstore.Permanent(errors.New("AuthorizationFailure (HTTP 403)"))
	}
	return r.Store.ListBlobs(ctx, prefix)
}

// TestStartRefusedByAccount: a storage account that refuses the container
// for good stops the process server at start with a clear error, instead
// of caching forever what it will never upload.
func TestStartRefusedByAccount(t *testing.T) {
	e := newEnv(t, refusingStore{Store: mem.New()}, 1)
	cfg := Config{Listen: "127.0.0.1:0", PKIDir: e.pki, Name: "ps", CacheDirs: e.cache, RecoveryKeyFile: e.rkFile,
		Store: e.store, Container: "lifeboat"}
	s, err := Start(context.Background(), cfg)
	if err == nil {
		s.Close()
		t.Fatal("started against an account that refuses the container")
	}
	if !strings.Contains(err.Error(), `refuses container "lifeboat"`) || !strings.Contains(err.Error(), "403") {
		t.Fatalf("error %q does not say the account refused the container", err)
	}
	// A token scoped to the existing container may not create it, and
	// needs not.
	existing := mem.New()
	if err := existing.EnsureContainer(context.Background()); err != nil {
		t.Fatal(err)
	}
	cfg.Store = refusingStore{Store: existing, listable: true}
	if s, err = Start(context.Background(), cfg); err != nil {
		t.Fatalf("token scoped to an existing container: %v", err)
	}
	s.Close()
}

// TestSecondServerOnSameCacheRefused: a process server started by hand
// while the service runs on the same cache refuses to start (its start-up
// would remove the running one's temporary files); once the first is
// closed, it starts.
func TestSecondServerOnSameCacheRefused(t *testing.T) {
	e := newEnv(t, mem.New(), 2)
	s := e.start()
	cfg := Config{Listen: "127.0.0.1:0", PKIDir: e.pki, Name: "ps", CacheDirs: e.cache, RecoveryKeyFile: e.rkFile, Store: e.store}
	if s2, err := Start(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), "in use by another process server") {
		if err == nil {
			s2.Close()
		}
		t.Fatalf("second server on the same cache: %v, want it refused", err)
	}
	s.Close()
	e.start()
}

// TestRestartRebuildsShortSegments: a segment missing a shard when the
// server stops (a lowered quorum, a disk away, a crash mid-Put) gets it
// rebuilt after the restart too, although nothing recorded it: the
// listings show it.
func TestRestartRebuildsShortSegments(t *testing.T) {
	e := newEnv(t, mem.New(), 3)
	e.segAge = 20 * time.Millisecond
	fa := &fakeApplier{upTo: map[string]uint64{}} // never applies: segments stay cached
	e.applier = func(*Server) (Applier, error) { return fa, nil }
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	s.Close()
	if n := shardFiles(t, e.cache[1]); n == 0 {
		t.Fatal("no shard in the second cache directory")
	}
	var shard string
	filepath.WalkDir(e.cache[1], func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".shard") {
			shard = p
		}
		return nil
	})
	want, err := os.ReadFile(shard)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(shard); err != nil {
		t.Fatal(err)
	}
	e.start()
	eventually(t, 10*time.Second, "the shard rebuilt", func() bool { _, err := os.Stat(shard); return err == nil })
	// A shard is written whole under a temporary name, then renamed.
	if got, err := os.ReadFile(shard); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("rebuilt shard: %d bytes (%v), want the %d bytes it held", len(got), err, len(want))
	}
}

// TestRecoverJournalStartingPastOne: an agent keeps its numbering across
// a new storage account (its saved lease): the journal starts past 1.
// Nothing was pruned, and recovery says so from the sealed manifest,
// instead of refusing every state until a recovery point exists.
func TestRecoverJournalStartingPastOne(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	last := a.batch(1000, 5)
	a.waitAck(last)
	at := time.Now().UTC().Truncate(time.Millisecond)
	a.marker(last, wire.MarkerTime, at)
	eventually(t, 10*time.Second, "the journal and its marker", func() bool {
		man, ok := s.Manifest("m1")
		return ok && man.DurableSeq == last && !man.RecoverableUntil.IsZero()
	})
	out := filepath.Join(t.TempDir(), "sda.img")
	res, err := recovery.RecoverFile(context.Background(), store, recovery.Request{Machine: "m1", Disk: "sda", Point: "latest", RecoveryKey: e.rk}, out)
	if err != nil || res.Seq != last {
		t.Fatalf("recover latest: seq %d, %v; want %d", res.Seq, err, last)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 4096)
	if _, err := f.ReadAt(got, 1002*4096); err != nil {
		t.Fatal(err)
	}
	if want := bytes.Repeat([]byte{byte(1002 & 0xff), byte(1002 >> 8), 0x5a, 2}, 1024); !bytes.Equal(got, want) {
		t.Fatalf("record 1002 not in the recovered disk: % x…", got[:8])
	}
}

// errorFrame reads frames until an Error arrives and returns it.
func errorFrame(t *testing.T, a *agent) wire.Error {
	t.Helper()
	var got frame
	for got = a.next(10 * time.Second); got.err == nil && got.typ != wire.TypeError; got = a.next(10 * time.Second) {
	}
	var we wire.Error
	if got.err != nil || we.UnmarshalBinary(got.payload) != nil {
		t.Fatalf("want an Error frame, got %s %v", got.typ, got.err)
	}
	return we
}

// TestRefusesWhatItCouldNotApply: frames that are well formed and
// checksummed, from an authenticated agent, but whose records the journal
// could not hold in order or the replica could not take, are refused
// before they are acknowledged. Accepted, each stopped the applier on the
// machine's journal for good (and a record after a marker that covered it
// made recovery to that marker silently miss it).
func TestRefusesWhatItCouldNotApply(t *testing.T) {
	start := func(t *testing.T) (*env, *agent) {
		store := mem.New()
		e := newEnv(t, store, 2)
		e.segAge = 50 * time.Millisecond
		s := e.start()
		return e, dialAgent(t, e, s, "m1")
	}
	t.Run("record beyond the disk", func(t *testing.T) {
		e, a := start(t)
		a.hello("m1", wire.DiskState{Name: "sda", Size: 1 << 20})
		a.waitAck(a.batch(1, 4))
		var b wire.BatchBuilder
		b.Add(wire.Record{Seq: 5, Op: wire.OpWrite, Offset: 1 << 40, Length: 512, Data: make([]byte, 512)})
		p, _ := b.AppendBinary(nil)
		a.sendFrame(wire.TypeBatch, p)
		if we := errorFrame(t, a); we.Code != wire.CodeProtocol || !strings.Contains(we.Message, "beyond the 1048576 bytes") {
			t.Fatalf("error = %+v, want a protocol error naming the disk size", we)
		}
		if d := durableSeq(t, e.store, "m1"); d > 4 {
			t.Fatalf("durable_seq %d: the record beyond the disk was stored", d)
		}
	})
	t.Run("marker past the records received", func(t *testing.T) {
		// Taken, it dated recoverable_until past records the journal
		// lacked, and the records it covered came after it.
		e, a := start(t)
		a.hello("m1", disk0)
		a.waitAck(a.batch(1, 4))
		a.marker(100, wire.MarkerTime, time.Now())
		a.batch(5, 4)
		if we := errorFrame(t, a); we.Code != wire.CodeProtocol || !strings.Contains(we.Message, "time marker at sequence 100, past the last record received (4)") {
			t.Fatalf("error = %+v, want a protocol error naming the marker", we)
		}
		if d := durableSeq(t, e.store, "m1"); d > 4 {
			t.Fatalf("durable_seq %d: records covered by an earlier marker were stored after it", d)
		}
	})
	for _, d := range []wire.DiskState{{Name: "big", Size: 9 << 40}, {Name: "data.", Size: 1 << 20}} {
		t.Run("hello with disk "+d.Name, func(t *testing.T) {
			_, a := start(t)
			if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: "m1", Disks: []wire.DiskState{disk0, d}}); err != nil {
				t.Fatal(err)
			}
			if we := errorFrame(t, a); we.Code != wire.CodeUnknownAgent || !strings.Contains(we.Message, d.Name) {
				t.Fatalf("error = %+v, want the hello refused naming disk %q", we, d.Name)
			}
		})
	}
}

// An agent whose clock runs far ahead dates recoverable_until in the
// future, where it stays: the process server says so in its log.
func TestAgentClockAheadWarned(t *testing.T) {
	e := newEnv(t, mem.New(), 2)
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 4))
	a.marker(4, wire.MarkerTime, time.Now().Add(time.Hour))
	eventually(t, 10*time.Second, "warning", func() bool {
		return strings.Contains(e.logs.String(), "agent's clock runs ahead")
	})
}

// A busy --listen or --metrics address is said at once, before the cache
// is set up (or the account tried): a service restarting on it would
// otherwise wait 30 s each time and leave cache directories behind.
func TestBusyPortRefusedFirst(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	e := newEnv(t, mem.New(), 2)
	for _, c := range []struct{ listen, metrics string }{{busy.Addr().String(), ""}, {"127.0.0.1:0", busy.Addr().String()}} {
		_, err := Start(context.Background(), Config{
			Listen: c.listen, MetricsListen: c.metrics, PKIDir: e.pki, Name: "ps", CacheDirs: e.cache,
			RecoveryKeyFile: e.rkFile, Store: e.store, Logger: slog.New(slog.DiscardHandler),
		})
		if err == nil || !strings.Contains(err.Error(), "address already in use") {
			t.Errorf("listen %q metrics %q: %v, want the busy port named", c.listen, c.metrics, err)
		}
		if _, err := os.Stat(e.cache[0]); err == nil {
			t.Errorf("listen %q metrics %q: the cache was set up before the ports were checked", c.listen, c.metrics)
		}
	}
}

// checkRevocationsEvery has sessions check their agent's certificate every
// d for the rest of the test.
func checkRevocationsEvery(t *testing.T, d time.Duration) {
	old := revocationCheckEvery
	revocationCheckEvery = d
	t.Cleanup(func() { revocationCheckEvery = old }) // after the server's Close
}

// Revoking an agent's certificate ends its session too, not only its next
// handshakes: a stolen key's stream must not go on while the real agent
// is down.
func TestRevokedAgentSessionEnds(t *testing.T) {
	checkRevocationsEvery(t, 50*time.Millisecond)
	e := newEnv(t, mem.New(), 1)
	a := dialAgent(t, e, e.start(), "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	if err := pki.Revoke(e.pki, "m1"); err != nil {
		t.Fatal(err)
	}
	we := errorFrame(t, a)
	if we.Code != wire.CodeUnknownAgent || !strings.Contains(we.Message, "revoked") {
		t.Fatalf("error = %+v, want the revocation", we)
	}
}

// A revocation list that cannot be read refuses new connections but does
// not end live sessions as if their certificates were revoked.
func TestBrokenRevocationListKeepsSessions(t *testing.T) {
	checkRevocationsEvery(t, 20*time.Millisecond)
	e := newEnv(t, mem.New(), 1)
	a := dialAgent(t, e, e.start(), "m1")
	a.hello("m1", disk0)
	if err := os.WriteFile(filepath.Join(e.pki, "revoked"), []byte("not-hex m9\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	a.waitAck(a.batch(1, 5))
	eventually(t, 10*time.Second, "the list error said", func() bool {
		return strings.Contains(e.logs.String(), "cannot check the agent's certificate against the revocation list")
	})
}

// Connections that open and stall before their TLS handshake (no
// certificate needed for that) hold a slot each for handshakeTimeout at
// most, and past maxHandshakesIP from one address the next is closed at
// once: an agent gets through once they are gone, and the refusals are
// not logged one by one.
func TestStalledHandshakesBounded(t *testing.T) {
	oldT, oldIP := handshakeTimeout, maxHandshakesIP
	handshakeTimeout, maxHandshakesIP = 500*time.Millisecond, 4
	t.Cleanup(func() { handshakeTimeout, maxHandshakesIP = oldT, oldIP })
	e := newEnv(t, mem.New(), 1)
	s := e.start()
	var stalled []net.Conn
	for range maxHandshakesIP {
		c, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		stalled = append(stalled, c)
	}
	eventually(t, 5*time.Second, "the stalled connections admitted", func() bool {
		s.shakes.mu.Lock()
		defer s.shakes.mu.Unlock()
		return s.shakes.total == maxHandshakesIP
	})
	for range 30 {
		c, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		_, err = c.Read(make([]byte, 1))
		c.Close()
		if err == nil || time.Since(start) > 2*time.Second {
			t.Fatalf("a connection past the limit was served (%v after %v)", err, time.Since(start))
		}
	}
	if n := strings.Count(e.logs.String(), "too many TLS handshakes"); n > warnBurst {
		t.Errorf("%d refusals logged for 30, want at most %d", n, warnBurst)
	}
	// The stalled ones are dropped after the handshake timeout.
	for _, c := range stalled {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a stalled connection got data")
		}
	}
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 1))
}

// A consistency marker the agent withdrew (numbered before a resync it
// learned of at a reconnect) is stored with its sequence but dates
// nothing: recoverable_until stays at the time marker's, and no segment
// is labelled a point by it.
func TestWithdrawnMarkerDatesNothing(t *testing.T) {
	e := newEnv(t, mem.New(), 3)
	e.segAge = 500 * time.Millisecond
	_, a, _ := e.serveFirst()
	t0 := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	var b wire.BatchBuilder
	if err := b.Add(wire.MarkerRecord(wire.Marker{Seq: 6, UnixNano: t0.Add(30 * time.Second).UnixNano(), Kind: wire.MarkerWithdrawn})); err != nil {
		t.Fatal(err)
	}
	p, err := b.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	a.sendFrame(wire.TypeBatch, p)
	last := a.batch(7, 20)
	a.marker(last, wire.MarkerTime, t0)
	a.waitAck(last)
	eventually(t, 20*time.Second, "the upload of 6..26", func() bool { return durableSeq(t, e.store, "m1") >= last })
	plain, infos, man := journal(t, e.store, e.rk, "m1")
	if !bytes.Equal(plain, a.sent) {
		t.Errorf("journal holds %d bytes, want the %d bytes of frames sent", len(plain), len(a.sent))
	}
	for _, in := range infos {
		if md := in.Metadata; md[layout.MetaMarkers] != "" || md[layout.MetaLastTime] == strconv.FormatInt(t0.Add(30*time.Second).UnixNano(), 10) {
			t.Errorf("segment %s metadata %v: dated by the withdrawn marker", in.Name, md)
		}
	}
	if man.RecoverableUntil.After(t0) {
		t.Errorf("recoverable_until %s, past the last time marker's %s", man.RecoverableUntil, t0)
	}
}

// refusedJournal refuses every journal upload of one machine, as an
// account policy or a permission on its path would.
type refusedJournal struct {
	blobstore.Store
	prefix string
}

func (r refusedJournal) PutBlob(ctx context.Context, name string, data []byte, md blobstore.Metadata) error {
	if strings.HasPrefix(name, r.prefix) {
		return fmt.Errorf("refused %s: %w", name, blobstore.ErrInvalid)
	}
	return r.Store.PutBlob(ctx, name, data, md)
}

func (r refusedJournal) PutBlobIf(ctx context.Context, name string, data []byte, md blobstore.Metadata, match string) (string, error) {
	if strings.HasPrefix(name, r.prefix) {
		return "", fmt.Errorf("refused %s: %w", name, blobstore.ErrInvalid)
	}
	return r.Store.PutBlobIf(ctx, name, data, md, match)
}

// Appliers yield to journal uploads, but not to those of a machine whose
// uploads fail: its backlog, which cannot move, held every other
// machine's apply passes back 2 s each (and with them each question of a
// checksum resync).
func TestYieldSkipsFailingUploads(t *testing.T) {
	e := newEnv(t, refusedJournal{mem.New(), layout.JournalPrefix("m1")}, 1)
	e.segAge = 20 * time.Millisecond
	e.segBytes = 1024
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 40))
	m := s.known("m1")
	eventually(t, 10*time.Second, "m1's uploads failing with a backlog", func() bool {
		return m.uploadFailing.Load() && m.backlogBytes() > 1024
	})
	t0 := time.Now()
	s.YieldToUploads(e.ctx)
	if d := time.Since(t0); d > time.Second {
		t.Fatalf("an apply pass waited %v for uploads that cannot move", d)
	}
}

// A machine's cache share counts what waits for its upload or for the
// applier, not applied segments still listed because their delete failed
// (a cache disk unmounted): those would pause its agent for good.
func TestCacheShare(t *testing.T) {
	m := &machine{applied: 20, segs: []*segEntry{
		{size: 100, last: 10, uploaded: true}, // applied, its delete failed
		{size: 200, last: 30, uploaded: true}, // waits for the applier
		{size: 400, last: 40},                 // waits for its upload
		{size: 800},                           // found at start, unread
	}}
	if got := m.cacheShare(); got != 1400 {
		t.Fatalf("cache share %d, want 1400 (all but the applied segment)", got)
	}
}

// TestHelloLeavingDiskOut: a disk the agent's hello leaves out (no longer
// protected, or its agent refused before it copied it) is recorded
// unprotected from the session's first record on, so that no later point
// claims its replica; listed again, it is copied anew in a new generation.
func TestHelloLeavingDiskOut(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	disk1 := wire.DiskState{Name: "sdb", Size: 1 << 20}
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0, disk1)
	gen0, gen1 := ack.Disks[0].Generation, ack.Disks[1].Generation
	last := a.batch(1, 5)
	a.waitAck(last)
	a.conn.Close()

	manifest := func() *layout.Manifest {
		t.Helper()
		man, err := recovery.ReadManifest(context.Background(), e.store, "m1")
		if err != nil {
			t.Fatal(err)
		}
		return man
	}
	b := dialAgent(t, e, s, "m1")
	ack, _ = b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen0, LastAckedSeq: last})
	if d := ack.Disks[0]; d.Action != wire.SyncResume {
		t.Fatalf("the disk still listed: %+v, want resumed", d)
	}
	man := manifest()
	if d := man.Disk(disk1.Name); d.UnprotectedFrom != last+1 {
		t.Fatalf("disk left out of the hello: unprotected from %d, want %d", d.UnprotectedFrom, last+1)
	}
	if d := man.Disk(disk0.Name); d.UnprotectedFrom != 0 {
		t.Fatalf("disk listed: unprotected from %d", d.UnprotectedFrom)
	}
	last2 := b.batch(last+1, 5)
	b.waitAck(last2)
	eventually(t, 10*time.Second, "the upload", func() bool { return durableSeq(t, e.store, "m1") >= last2 })
	b.conn.Close()

	c := dialAgent(t, e, s, "m1")
	ack, _ = c.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen0, LastAckedSeq: last2},
		wire.DiskState{Name: disk1.Name, Size: disk1.Size, Generation: gen1, LastAckedSeq: last2})
	if d := ack.Disks[1]; d.Action != wire.SyncFull || d.Generation == gen1 {
		t.Fatalf("the disk listed again: %+v, want a full sync in a new generation", d)
	}
	d := manifest().Disk(disk1.Name)
	if _, left := d.UnprotectedAt(last2+1, time.Now()); left || d.UnprotectedFrom != 0 || d.GenerationStart != last2+1 {
		t.Fatalf("listed again: %+v, want protected in a generation from %d", d, last2+1)
	}
	for seq := last + 1; seq <= last2; seq++ {
		if g, left := d.UnprotectedAt(seq, time.Time{}); !left || g.UnprotectedFrom != last+1 {
			t.Fatalf("at %d, while left out: unprotected %v from %d (%+v)", seq, left, g.UnprotectedFrom, d)
		}
	}
}

// leaveSdbOut connects an agent protecting disk0 and sdb that sends
// records 1..5 and a time marker at t0, lets settle wait (given the last
// sequence) and goes; a second agent's hello then lists disk0 alone. It
// returns that agent, the last sequence and t0.
func leaveSdbOut(t *testing.T, e *env, s *Server, settle func(last uint64)) (*agent, uint64, time.Time) {
	t.Helper()
	a := dialAgent(t, e, s, "m1")
	ack, _ := a.hello("m1", disk0, wire.DiskState{Name: "sdb", Size: 1 << 20})
	gen0 := ack.Disks[0].Generation
	last := a.batch(1, 5)
	a.waitAck(last)
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	a.marker(last, wire.MarkerTime, t0)
	settle(last)
	a.conn.Close()
	b := dialAgent(t, e, s, "m1")
	b.hello("m1", wire.DiskState{Name: disk0.Name, Size: disk0.Size, Generation: gen0, LastAckedSeq: last})
	return b, last, t0
}

// A disk left out of a hello, while the disk still listed is idle: the
// new session's time markers date the acked sequence (below
// unprotected_from) at times after the hello; recover of the left-out
// disk at latest must be refused, not served as its stale replica.
func TestLeftOutDiskIdleMarkers(t *testing.T) {
	store := mem.New()
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	b, last, _ := leaveSdbOut(t, e, s, func(last uint64) {
		eventually(t, 10*time.Second, "marker", func() bool {
			man, ok := s.Manifest("m1")
			return ok && man.DurableSeq == last && !man.RecoverableUntil.IsZero()
		})
	})
	time.Sleep(50 * time.Millisecond)
	t1 := time.Now().UTC().Truncate(time.Millisecond)
	b.marker(last, wire.MarkerTime, t1) // idle: nothing written since
	b.marker(last, wire.MarkerTime, t1.Add(time.Second))
	eventually(t, 10*time.Second, "recoverable_until past the hello", func() bool {
		man, ok := s.Manifest("m1")
		return ok && !man.RecoverableUntil.Before(t1)
	})
	man, _ := s.Manifest("m1")
	t.Logf("manifest: durable %d until %v idle %d disks %+v", man.DurableSeq, man.RecoverableUntil, man.IdleSeq, man.Disks)
	for _, p := range []string{"latest", t1.Add(time.Second).Format(time.RFC3339Nano)} {
		res, err := recovery.RecoverFile(context.Background(), store, recovery.Request{Machine: "m1", Disk: "sdb", Point: p, RecoveryKey: e.rk}, filepath.Join(t.TempDir(), "sdb.img"))
		if !errors.Is(err, recovery.ErrOutOfRange) {
			t.Errorf("recover sdb (left out at the hello before %v) at %s: seq %d time %v, err %v; want refused", t1, p, res.Seq, res.Time, err)
		}
	}
}

// The old session's last marker (disk sdb still listed) is acked but not
// yet uploaded when the next hello leaves sdb out: unprotected_since is
// that marker's time, not the older recoverable_until: sdb's state at
// it, vouched while it was protected, is recovered by time too.
func TestLeftOutBeforeMarkerUploaded(t *testing.T) {
	store := &gateJournal{Store: mem.New()}
	e := newEnv(t, store, 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	_, last, t0 := leaveSdbOut(t, e, s, func(uint64) { time.Sleep(100 * time.Millisecond) })
	store.open.Store(true)
	eventually(t, 20*time.Second, "recoverable_until at t0", func() bool {
		man, ok := s.Manifest("m1")
		return ok && !man.RecoverableUntil.Before(t0)
	})
	man, _ := s.Manifest("m1")
	t.Logf("until %v disks %+v", man.RecoverableUntil, man.Disks)
	for _, p := range []string{"latest", t0.Format(time.RFC3339Nano), "5"} {
		res, err := recovery.RecoverFile(context.Background(), store, recovery.Request{Machine: "m1", Disk: "sdb", Point: p, RecoveryKey: e.rk}, filepath.Join(t.TempDir(), "sdb.img"))
		if err != nil || res.Seq != last {
			t.Errorf("recover sdb at %s: seq %d, %v; want seq %d", p, res.Seq, err, last)
		}
	}
}
