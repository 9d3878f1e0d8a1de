package processserver

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/blobstore/blobstoretest"
	"github.com/lifeboat-dr/lifeboat/internal/blobstore/mem"
	"github.com/lifeboat-dr/lifeboat/internal/layout"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
	"github.com/prometheus/client_golang/prometheus"
)

// gauge returns the value of a per-machine metric gathered from reg.
func gauge(t *testing.T, reg *prometheus.Registry, name, machine string) (float64, bool) {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "machine" && l.GetValue() == machine {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

// A machine whose cache is empty (everything published) is still reported
// after a restart, and its RPO grows while its agent stays away: that is
// the disaster the metric is for. A restart while the account is down
// reports the recoverable_until the cache kept, and the account's once
// it answers.
func TestRPOReportedAfterRestart(t *testing.T) {
	faulty := blobstoretest.NewFaulty(mem.New())
	e := newEnv(t, faulty, 2)
	e.segAge = 20 * time.Millisecond
	e.reg = prometheus.NewRegistry()
	s := e.start()
	if _, ok := gauge(t, e.reg, "lifeboat_rpo_seconds", "m1"); ok {
		t.Fatal("RPO reported for a machine never seen")
	}
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	if v, ok := gauge(t, e.reg, "lifeboat_ps_recoverable", "m1"); !ok || v != 0 {
		t.Fatalf("recoverable before any marker: %v %v, want 0", v, ok)
	}
	if _, ok := gauge(t, e.reg, "lifeboat_rpo_seconds", "m1"); ok {
		t.Fatal("RPO reported before anything was recoverable")
	}
	eventually(t, 5*time.Second, "the agent told nothing is recoverable", func() bool { return a.rus.Load() > 0 })
	if a.ru.Load() != 0 {
		t.Fatalf("agent told recoverable_until %d before any marker", a.ru.Load())
	}
	a.waitAck(a.batch(1, 5))
	at := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	a.marker(5, wire.MarkerTime, at)
	eventually(t, 10*time.Second, "recoverable_until in the account", func() bool {
		_, _, man := journal(t, faulty, e.rk, "m1")
		return man.RecoverableUntil.Equal(at)
	})
	eventually(t, 10*time.Second, "the cache emptied and the hint kept", func() bool {
		ids, _ := s.cache.List("m1")
		return len(ids) == 0 && s.cache.Recoverable("m1").Equal(at)
	})
	if v, ok := gauge(t, e.reg, "lifeboat_rpo_seconds", "m1"); !ok || v < time.Since(at).Seconds()-1 {
		t.Fatalf("RPO %v (%v), want about %v", v, ok, time.Since(at))
	}
	eventually(t, 5*time.Second, "the agent told recoverable_until", func() bool { return a.ru.Load() == at.UnixNano() })
	if v, ok := gauge(t, e.reg, "lifeboat_ps_durable_seq", "m1"); !ok || v != 5 {
		t.Fatalf("durable_seq %v (%v), want 5", v, ok)
	}
	a.conn.Close()
	s.Close()

	faulty.FailFor(time.Hour) // the account is down at the restart
	e.reg = prometheus.NewRegistry()
	e.start()
	time.Sleep(1500 * time.Millisecond)
	v, ok := gauge(t, e.reg, "lifeboat_rpo_seconds", "m1")
	if !ok || v < time.Since(at).Seconds()-1 {
		t.Fatalf("RPO after a restart with the account down: %v (%v), want at least %v", v, ok, time.Since(at))
	}
	if _, ok := gauge(t, e.reg, "lifeboat_ps_durable_seq", "m1"); ok {
		t.Error("durable_seq reported before the manifest was read")
	}
	faulty.FailFor(0)
	eventually(t, 30*time.Second, "the manifest read", func() bool {
		_, ok := gauge(t, e.reg, "lifeboat_ps_durable_seq", "m1")
		return ok
	})
	v2, ok := gauge(t, e.reg, "lifeboat_rpo_seconds", "m1")
	if !ok || v2 <= v || v2 < time.Since(at).Seconds()-1 {
		t.Fatalf("RPO once the account answered: %v (%v), want it growing from %v", v2, ok, v)
	}
}

// A machine another process server took over is not reported here: its
// RPO would grow for ever on the server that no longer serves it.
func TestFencedMachineNotReported(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segAge = 20 * time.Millisecond
	e.reg = prometheus.NewRegistry()
	s, a, _ := e.serveFirst()
	a.marker(5, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "the RPO reported", func() bool {
		_, ok := gauge(t, e.reg, "lifeboat_rpo_seconds", "m1")
		return ok
	})
	// Another server writes the manifest: the next write here fences.
	m := s.machine("m1")
	raw, err := layout.MarshalManifest(&layout.Manifest{Machine: "m1", Owner: "ps2"})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.store.PutBlob(t.Context(), layout.ManifestName("m1"), raw, nil); err != nil {
		t.Fatal(err)
	}
	a.waitAck(a.batch(6, 2))
	eventually(t, 10*time.Second, "fenced", m.isFenced)
	for _, name := range []string{"lifeboat_rpo_seconds", "lifeboat_ps_recoverable", "lifeboat_ps_durable_seq"} {
		if _, ok := gauge(t, e.reg, name, "m1"); ok {
			t.Errorf("%s still reported for the fenced machine", name)
		}
	}
}

// An agent of protocol 2 (process servers upgraded first) is served in
// its own protocol, without Recoverable frames; one of an unknown
// protocol is refused, saying which the server speaks.
func TestOlderProtocolServed(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()
	a := dialAgent(t, e, s, "m1")
	if err := a.w.WriteHello(&wire.Hello{ProtocolVersion: 2, Machine: "m1", Disks: []wire.DiskState{disk0}}); err != nil {
		t.Fatal(err)
	}
	f := a.next(10 * time.Second)
	var ack wire.HelloAck
	if f.typ != wire.TypeHelloAck || ack.UnmarshalBinary(f.payload) != nil || ack.ProtocolVersion != 2 {
		t.Fatalf("protocol 2 hello answered with %s %v (version %d)", f.typ, f.err, ack.ProtocolVersion)
	}
	a.waitAck(a.batch(1, 5))
	a.marker(5, wire.MarkerTime, time.Now())
	eventually(t, 10*time.Second, "the marker in the account", func() bool {
		_, _, man := journal(t, e.store, e.rk, "m1")
		return !man.RecoverableUntil.IsZero()
	})
	time.Sleep(1500 * time.Millisecond) // the monitor's tick
	if n := a.rus.Load(); n != 0 {
		t.Fatalf("%d Recoverable frames sent to a protocol 2 agent", n)
	}

	b := dialAgent(t, e, s, "m2")
	if err := b.w.WriteHello(&wire.Hello{ProtocolVersion: protocolVersion + 1, Machine: "m2"}); err != nil {
		t.Fatal(err)
	}
	if we := errorFrame(t, b); we.Code != wire.CodeVersion || !strings.Contains(we.Message, "speaks 2 to "+strconv.Itoa(protocolVersion)) {
		t.Fatalf("unknown protocol answered with %+v", we)
	}
}

// TestStuckAgentDoesNotStallOthers: the monitor sends every session its
// window and recoverable_until; one whose agent stopped reading (its
// socket full) must not hold back the others' updates for the write
// timeout.
func TestStuckAgentDoesNotStallOthers(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.segAge = 20 * time.Millisecond
	s := e.start()

	// m2's session writes into a pipe nobody reads: each send blocks.
	stuck, peer := net.Pipe()
	t.Cleanup(func() { stuck.Close(); peer.Close() })
	m2 := s.machine("m2")
	ctx, cancel := context.WithCancel(context.Background())
	st := &session{s: s, conn: stuck, w: wire.NewWriter(stuck), m: m2, version: protocolVersion,
		log: s.log, done: make(chan struct{}), updates: make(chan struct{}, 1), ctx: ctx, cancel: cancel}
	go func() { <-ctx.Done(); close(st.done) }()
	st.ackSent.Store(true)
	m2.mu.Lock()
	m2.sess = st
	m2.mu.Unlock()
	time.Sleep(1500 * time.Millisecond) // the monitor meets it

	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	a.waitAck(a.batch(1, 5))
	at := time.Now().Add(-time.Minute).Truncate(time.Millisecond)
	a.marker(5, wire.MarkerTime, at)
	eventually(t, 10*time.Second, "m1's agent told its recoverable_until", func() bool { return a.ru.Load() == at.UnixNano() })
}

// TestCertificateExpiry: the server exports when its certificate stops
// being accepted, and warns, at an agent's hello, of an agent certificate
// about to end (past it the agent cannot connect, and its RPO grows).
func TestCertificateExpiry(t *testing.T) {
	e := newEnv(t, mem.New(), 1)
	e.reg = prometheus.NewRegistry()
	for _, f := range []string{"m2.crt", "m2.key"} {
		if err := os.Remove(filepath.Join(e.pki, f)); err != nil {
			t.Fatal(err)
		}
	}
	if err := pki.Issue(e.pki, "m2", pki.RoleAgent, pki.WithValidity(10*24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	// Restored after the server closed (cleanups run last first).
	t.Cleanup(func(d time.Duration) func() { return func() { expiryEvery = d } }(expiryEvery))
	expiryEvery = 100 * time.Millisecond // and again while connected
	s := e.start()
	id, err := pki.Load(e.pki, "ps")
	if err != nil {
		t.Fatal(err)
	}
	fams, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got float64
	for _, f := range fams {
		if f.GetName() == pki.ExpiryMetric {
			got = f.GetMetric()[0].GetGauge().GetValue()
		}
	}
	if want := float64(id.NotAfter().Unix()); got != want {
		t.Fatalf("%s = %v, want %v", pki.ExpiryMetric, got, want)
	}
	a := dialAgent(t, e, s, "m1")
	a.hello("m1", disk0)
	if strings.Contains(e.logs.String(), "certificate expires") {
		t.Fatal("warned of an agent certificate valid for two years")
	}
	b := dialAgent(t, e, s, "m2")
	b.hello("m2", disk0)
	eventually(t, 5*time.Second, "warnings of m2's certificate at its hello and while it stays", func() bool {
		return strings.Count(e.logs.String(), "the agent's certificate expires on") >= 3
	})
	for _, l := range strings.Split(e.logs.String(), "\n") {
		if strings.Contains(l, "the agent's certificate") && !strings.HasSuffix(l, "machine=m2") {
			t.Fatalf("warned of another certificate than m2's: %s", l)
		}
	}
}
