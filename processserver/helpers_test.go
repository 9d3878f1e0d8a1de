package processserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/azurite"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/azure"
	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/seal"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/lifeboat-dr/lifeboat/processserver/cache"
	"github.com/prometheus/client_golang/prometheus"
)

// One Azurite for the package: starting one per test costs seconds.
var (
	azOnce sync.Once
	azSrv  *azurite.Server
	azErr  error
	azSeq  atomic.Int64
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		runChild()
		return
	}
	code := m.Run()
	if azSrv != nil {
		azSrv.Stop()
	}
	os.Exit(code)
}

// azureStore returns a store on a fresh container of the shared Azurite (or
// of the account in AZURE_STORAGE_CONNECTION_STRING).
func azureStore(t *testing.T) blobstore.Store {
	t.Helper()
	s, _, _ := azureStoreNamed(t)
	return s
}

// azureStoreNamed is azureStore, also returning the connection string and
// the container name.
func azureStoreNamed(t *testing.T) (blobstore.Store, string, string) {
	t.Helper()
	azOnce.Do(func() {
		if cs := os.Getenv(azurite.EnvConnectionString); cs != "" {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		azSrv, azErr = azurite.Start(ctx, azurite.Options{})
	})
	cs := os.Getenv(azurite.EnvConnectionString)
	if cs == "" {
		if errors.Is(azErr, azurite.ErrNoNode) && os.Getenv("CI") != "true" {
			t.Skipf("azurite: %v", azErr)
		}
		if azErr != nil {
			t.Fatal(azErr)
		}
		cs = azSrv.ConnectionString()
	}
	name := fmt.Sprintf("lbps-%d-%d", time.Now().UnixNano()%1e9, azSeq.Add(1))
	s, err := azure.New(azure.Config{ConnectionString: cs, Container: name})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.EnsureContainer(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = s.DeleteContainer(ctx)
	})
	return s, cs, name
}

// logBuf collects log output for assertions.
type logBuf = testenv.LogBuffer

// env is a PKI, recovery key and cache directories for one test.
type env struct {
	t         *testing.T
	pki       string
	rkFile    string
	rk        []byte
	cache     []string
	store     blobstore.Store
	logs      *logBuf
	ctx       context.Context
	segBytes  int
	segAge    time.Duration
	backlog   int64
	window    uint64 // the Backpressure window (DefaultWindow if 0)
	applier   func(*Server) (Applier, error)
	cacheFS   cache.FS
	quorum    int                  // the cache's write quorum (0: every directory)
	hangAfter time.Duration        // cache.Options.HangAfter
	name      string               // the process server's ("ps" if empty; "ps2" is issued too)
	reg       *prometheus.Registry // registers the server's metrics (nil: none)
}

func newEnv(t *testing.T, store blobstore.Store, cacheDirs int) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{t: t, pki: filepath.Join(dir, "pki"), rkFile: filepath.Join(dir, "recovery.key"), store: store, logs: &logBuf{}, ctx: context.Background()}
	if err := pki.Init(e.pki); err != nil {
		t.Fatal(err)
	}
	for name, role := range map[string]pki.Role{"ps": pki.RoleProcessServer, "m1": pki.RoleAgent, "m2": pki.RoleAgent, "ps2": pki.RoleProcessServer} {
		if err := pki.Issue(e.pki, name, role); err != nil {
			t.Fatal(err)
		}
	}
	e.rk = seal.NewRecoveryKey()
	if err := seal.WriteRecoveryKey(e.rkFile, e.rk); err != nil {
		t.Fatal(err)
	}
	for i := range cacheDirs {
		e.cache = append(e.cache, filepath.Join(dir, fmt.Sprintf("cache%d", i)))
	}
	return e
}

func (e *env) start() *Server {
	e.t.Helper()
	name := e.name
	if name == "" {
		name = "ps"
	}
	cfg := Config{
		Listen: "127.0.0.1:0", PKIDir: e.pki, Name: name, CacheDirs: e.cache,
		RecoveryKeyFile: e.rkFile, Store: e.store, SegmentBytes: e.segBytes, SegmentAge: e.segAge,
		MaxMachineCacheBytes: e.backlog, Window: e.window, NewApplier: e.applier, CacheOptions: cache.Options{FS: e.cacheFS, WriteQuorum: e.quorum, HangAfter: e.hangAfter},
		Metrics: e.reg,
		Logger:  slog.New(slog.NewTextHandler(io.MultiWriter(e.logs, testWriter{e.t}), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	s, err := Start(e.ctx, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { s.Close() })
	return s
}

// serveFirst starts e's process server, has an agent of m1 send it
// records 1..5 and waits for the journal to hold them.
func (e *env) serveFirst() (*Server, *agent, wire.HelloAck) {
	e.t.Helper()
	s := e.start()
	a := dialAgent(e.t, e, s, "m1")
	ack, _ := a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	eventually(e.t, 10*time.Second, "the upload of 1..5", func() bool { return durableSeq(e.t, e.store, "m1") == 5 })
	return s, a, ack
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	if testing.Verbose() {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

// agent is a fake agent speaking the wire protocol.
type agent struct {
	t      *testing.T
	conn   net.Conn // records (internal/channel), as agents speak
	w      *wire.Writer
	frames chan frame
	sent   []byte // every Batch and Marker frame sent, as AppendFrame
	// ru is the last Recoverable received (unix nanoseconds), rus how
	// many were.
	ru, rus atomic.Int64
}

type frame struct {
	typ     wire.Type
	payload []byte
	err     error
}

// dialOpts changes how a test agent connects.
type dialOpts struct {
	plainTLS bool                    // as an agent that predates records does
	wrap     func(net.Conn) net.Conn // its TCP connection, e.g. to tamper with it
}

func dialAs(t *testing.T, pkiDir, name string, addr net.Addr) (net.Conn, error) {
	return dialAsWith(t, pkiDir, name, addr, dialOpts{})
}

func dialAsWith(t *testing.T, pkiDir, name string, addr net.Addr, o dialOpts) (net.Conn, error) {
	id, err := pki.Load(pkiDir, name)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		return nil, err
	}
	if o.wrap != nil {
		raw = o.wrap(raw)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cfg := id.ClientTLS(addr.String(), pki.RoleProcessServer)
	if !o.plainTLS {
		cfg = channel.Config(cfg)
	}
	c, err := channel.Client(ctx, raw, cfg)
	if err != nil {
		raw.Close()
		return nil, err
	}
	// TLS 1.3: the server verifies the client certificate after the
	// client's handshake returned; a refusal shows on the first read.
	return c, nil
}

func dialAgent(t *testing.T, e *env, s *Server, name string) *agent {
	t.Helper()
	return dialAgentAddr(t, e, s.Addr(), name)
}

func dialAgentAddr(t *testing.T, e *env, addr net.Addr, name string) *agent {
	t.Helper()
	return dialAgentWith(t, e, addr, name, dialOpts{})
}

func dialAgentWith(t *testing.T, e *env, addr net.Addr, name string, o dialOpts) *agent {
	t.Helper()
	c, err := dialAsWith(t, e.pki, name, addr, o)
	if err != nil {
		t.Fatal(err)
	}
	a := &agent{t: t, conn: c, w: wire.NewWriter(c), frames: make(chan frame, 1024)}
	go func() {
		r := wire.NewReader(c, 0)
		for {
			f, err := r.Next()
			if err != nil {
				a.frames <- frame{err: err}
				close(a.frames)
				return
			}
			if f.Type == wire.TypeRecoverable {
				// Kept aside: the tests' frame sequences leave it out.
				var rc wire.Recoverable
				if err := rc.UnmarshalBinary(f.Payload); err != nil {
					a.frames <- frame{err: err}
					close(a.frames)
					return
				}
				a.ru.Store(rc.UnixNano)
				a.rus.Add(1)
				continue
			}
			a.frames <- frame{typ: f.Type, payload: bytes.Clone(f.Payload)}
		}
	}()
	t.Cleanup(func() { c.Close() })
	return a
}

func (a *agent) next(timeout time.Duration) frame {
	a.t.Helper()
	select {
	case f, ok := <-a.frames:
		if !ok {
			return frame{err: io.EOF}
		}
		return f
	case <-time.After(timeout):
		a.t.Fatalf("no frame from the process server within %s", timeout)
	}
	return frame{}
}

// waitWindow waits for a Backpressure frame of window want.
func (a *agent) waitWindow(timeout time.Duration, want uint64) {
	a.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		f := a.next(time.Until(deadline))
		if f.err != nil {
			a.t.Fatalf("waiting for window %d: %v", want, f.err)
		}
		var bp wire.Backpressure
		if f.typ == wire.TypeBackpressure && bp.UnmarshalBinary(f.payload) == nil && bp.Window == want {
			return
		}
	}
}

// hello sends a Hello and returns the HelloAck and the first Backpressure.
func (a *agent) hello(machine string, disks ...wire.DiskState) (wire.HelloAck, uint64) {
	a.t.Helper()
	if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion, Machine: machine, Disks: disks}); err != nil {
		a.t.Fatal(err)
	}
	f := a.next(30 * time.Second)
	if f.err != nil || f.typ != wire.TypeHelloAck {
		a.t.Fatalf("want hello-ack, got %s %v %s", f.typ, f.err, f.payload)
	}
	var ack wire.HelloAck
	if err := ack.UnmarshalBinary(f.payload); err != nil {
		a.t.Fatal(err)
	}
	f = a.next(10 * time.Second)
	var bp wire.Backpressure
	if f.typ != wire.TypeBackpressure || bp.UnmarshalBinary(f.payload) != nil {
		a.t.Fatalf("want backpressure after hello-ack, got %s %v", f.typ, f.err)
	}
	return ack, bp.Window
}

// batch sends records seq..seq+n-1 (writes of 4 KiB with content derived
// from seq) and returns the last seq.
// batchData is what batch writes at block seq, the i-th of its batch.
func batchData(seq uint64, i int) []byte {
	return bytes.Repeat([]byte{byte(seq), byte(seq >> 8), 0x5a, byte(i)}, 1024)
}

func (a *agent) batch(first uint64, n int) uint64 {
	a.t.Helper()
	var b wire.BatchBuilder
	for i := range n {
		seq := first + uint64(i)
		if err := b.Add(wire.Record{Seq: seq, Disk: 0, Op: wire.OpWrite, Offset: seq * 4096, Length: 4096, Data: batchData(seq, i)}); err != nil {
			a.t.Fatal(err)
		}
	}
	p, err := b.AppendBinary(nil)
	if err != nil {
		a.t.Fatal(err)
	}
	a.sendFrame(wire.TypeBatch, p)
	return first + uint64(n) - 1
}

func (a *agent) marker(seq uint64, kind wire.MarkerKind, at time.Time) {
	a.t.Helper()
	p, _ := wire.Marker{Seq: seq, UnixNano: at.UnixNano(), Kind: kind}.AppendBinary(nil)
	a.sendFrame(wire.TypeMarker, p)
}

func (a *agent) sendFrame(t wire.Type, p []byte) {
	a.t.Helper()
	if err := a.w.WriteFrame(t, 0, p); err != nil {
		a.t.Fatal(err)
	}
	a.sent, _ = wire.AppendFrame(a.sent, t, 0, p)
}

// waitAck reads frames until an Ack ≥ seq arrives.
func (a *agent) waitAck(seq uint64) {
	a.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		f := a.next(time.Until(deadline))
		if f.err != nil {
			a.t.Fatalf("waiting for ack %d: %v", seq, f.err)
		}
		switch f.typ {
		case wire.TypeAck:
			var ack wire.Ack
			ack.UnmarshalBinary(f.payload)
			if ack.Seq >= seq {
				return
			}
		case wire.TypeBackpressure:
		default:
			a.t.Fatalf("waiting for ack %d: unexpected %s frame %q", seq, f.typ, f.payload)
		}
	}
}

// journal reads back machine's journal with the recovery key: the
// concatenated plaintext of its segments, in order, and the segments'
// metadata.
func journal(t *testing.T, store blobstore.Store, rk []byte, machine string) ([]byte, []blobstore.BlobInfo, layout.Manifest) {
	t.Helper()
	ctx := context.Background()
	raw, err := store.GetBlob(ctx, layout.ManifestName(machine))
	if err != nil {
		t.Fatalf("manifest: %v", err)
	}
	man, err := layout.UnmarshalManifest(raw)
	if err != nil {
		t.Fatal(err)
	}
	var id seal.KeyID
	b, _ := hex.DecodeString(man.KeyID)
	copy(id[:], b)
	wrapped, err := store.GetBlob(ctx, layout.KeyName(machine, id))
	if err != nil {
		t.Fatalf("data key: %v", err)
	}
	material, err := seal.UnwrapKey(rk, wrapped, id)
	if err != nil {
		t.Fatal(err)
	}
	key, err := seal.NewKey(id, material)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := store.ListBlobs(ctx, layout.JournalPrefix(machine))
	if err != nil {
		t.Fatal(err)
	}
	// Each segment starts with a header chaining it to the one before
	// (listed in name order, which is sequence order here); the frames
	// after it are returned.
	var plain []byte
	var prevLast uint64
	for _, bi := range infos {
		sealed, err := store.GetBlob(ctx, bi.Name)
		if err != nil {
			t.Fatal(err)
		}
		seg, err := seal.Open(nil, sealed, seal.NewKeyring(key), []byte(bi.Name))
		if err != nil {
			t.Fatalf("open %s: %v", bi.Name, err)
		}
		h, err := wire.ParseSegmentHeader(seg)
		if err != nil {
			t.Fatalf("segment %s: %v", bi.Name, err)
		}
		if h.Prev != prevLast {
			t.Fatalf("segment %s names %d as its predecessor's last sequence, want %d", bi.Name, h.Prev, prevLast)
		}
		if _, prevLast, err = layout.ParseSegmentName(bi.Name); err != nil {
			t.Fatal(err)
		}
		plain = append(plain, seg[wire.SegmentHeaderSize:]...)
	}
	return plain, infos, *man
}

// journalRecords decodes the records of the batch frames in plain (as
// journal returns it), in order.
func journalRecords(t *testing.T, plain []byte) []wire.Record {
	t.Helper()
	var recs []wire.Record
	r := wire.NewReader(bytes.NewReader(plain), 0)
	for {
		f, err := r.Next()
		if err == io.EOF {
			return recs
		}
		if err != nil {
			t.Fatal(err)
		}
		if f.Type != wire.TypeBatch {
			continue
		}
		bt, err := wire.DecodeBatch(f.Payload)
		if err != nil {
			t.Fatal(err)
		}
		for it := bt.Records(); it.Next(); {
			rec := it.Record()
			rec.Data = bytes.Clone(rec.Data)
			recs = append(recs, *rec)
		}
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func durableSeq(t *testing.T, store blobstore.Store, machine string) uint64 {
	raw, err := store.GetBlob(context.Background(), layout.ManifestName(machine))
	if err != nil {
		return 0
	}
	man, err := layout.UnmarshalManifest(raw)
	if err != nil {
		t.Fatal(err)
	}
	return man.DurableSeq
}

// tamperConn changes one byte in the middle of the next write once armed,
// as a man in the middle would.
type tamperConn struct {
	net.Conn
	armed atomic.Bool
}

func (c *tamperConn) Write(p []byte) (int, error) {
	if c.armed.CompareAndSwap(true, false) {
		q := bytes.Clone(p)
		q[len(q)/2] ^= 0x10
		if _, err := c.Conn.Write(q); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// tlsDialForeign connects with other's m1 certificate, trusting any server.
func tlsDialForeign(t *testing.T, other string, addr net.Addr) (*tls.Conn, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(other, "m1.crt"), filepath.Join(other, "m1.key"))
	if err != nil {
		t.Fatal(err)
	}
	return tls.Dial("tcp", addr.String(), &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true,
	})
}
