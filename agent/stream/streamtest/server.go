// Package streamtest is an in-memory process server for tests of the
// agent's stream: it speaks internal/wire over mutual TLS with a test PKI,
// keeps one image per disk, acknowledges batches once their records are
// applied, and can misbehave on demand (drop the connection before or
// after storing a batch, withhold acknowledgements, close the window).
package streamtest

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// Fault is what the server does with a batch.
type Fault int

const (
	Store           Fault = iota // apply and acknowledge
	DropBeforeStore              // close the connection without applying it
	DropAfterStore               // apply it, then close without acknowledging
)

// Received is one record as it arrived (Data is not kept).
type Received struct {
	wire.Record
	Conn int // 1-based connection number
}

// Marker is a time marker as it arrived.
type Marker struct {
	wire.Marker
	At   time.Time
	Conn int
}

type disk struct {
	gen   wire.Generation
	image []byte
}

// Server is the fake process server.
type Server struct {
	Addr   string // 127.0.0.1:port
	PKIDir string // CA, "ps" (process-server) and the agents' identities

	// Fault, if set, decides the fate of the n-th batch (1-based, over all
	// connections). Set it before the agent connects.
	Fault func(n int, first, last uint64) Fault

	t       testing.TB
	ln      net.Listener
	id      *pki.Identity
	tlsConf *tls.Config
	wg      sync.WaitGroup

	mu      sync.Mutex
	disks   map[string]*disk
	durable uint64
	lastRun wire.RunID // the run of the connection that made durable durable
	curRun  wire.RunID
	acked   uint64 // last Ack sent
	// recoverable is the last Recoverable sent (unix nanoseconds);
	// holdRU withholds them (HoldRecoverable).
	recoverable int64
	holdRU      bool
	v2          bool // speak protocol 2 (SpeakProtocol2)
	batches     int
	conns       int
	cur         net.Conn
	curW        *wire.Writer
	window      *uint64
	holdAcks    bool
	received    []Received
	markers     []Marker
	sums        []wire.Sums
	hellos      []wire.Hello
	violations  []string
	ackedDups   int
	closed      bool
	plainTLS    atomic.Bool // may be set from Fault, which runs under mu
	withRecs    []bool      // per connection: it carried records
}

// SetPlainTLS makes the server, from its next connection, speak plain
// TLS, as a process server that predates internal/channel's records does.
func (s *Server) SetPlainTLS(plain bool) { s.plainTLS.Store(plain) }

// New starts a server on 127.0.0.1 with a fresh PKI in t.TempDir() and
// stops it in t.Cleanup.
func New(t testing.TB) *Server {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if err := pki.Init(dir); err != nil {
		t.Fatal(err)
	}
	if err := pki.Issue(dir, "ps", pki.RoleProcessServer); err != nil {
		t.Fatal(err)
	}
	id, err := pki.Load(dir, "ps")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Addr: ln.Addr().String(), PKIDir: dir, t: t, ln: ln, id: id, disks: map[string]*disk{},
		tlsConf: channel.Config(id.ServerTLS(pki.RoleAgent))}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.Close)
	return s
}

// ClientTLS issues (once) an agent certificate for name and returns the
// client configuration an agent would use.
func (s *Server) ClientTLS(t testing.TB, name string) *tls.Config {
	t.Helper()
	id, err := pki.Load(s.PKIDir, name)
	if err != nil {
		if err := pki.Issue(s.PKIDir, name, pki.RoleAgent); err != nil {
			t.Fatal(err)
		}
		if id, err = pki.Load(s.PKIDir, name); err != nil {
			t.Fatal(err)
		}
	}
	return id.ClientTLS(s.Addr, pki.RoleProcessServer)
}

// Close stops the server.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	if s.cur != nil {
		s.cur.Close()
	}
	s.mu.Unlock()
	s.ln.Close()
	s.wg.Wait()
}

// Drop closes the current connection.
func (s *Server) Drop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil {
		s.cur.Close()
	}
}

// Lose forgets every record after seq, acknowledged or not (the images
// keep their bytes), as a process server whose storage went back in time,
// and drops the connection.
func (s *Server) Lose(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.durable = min(s.durable, seq)
	s.acked = min(s.acked, seq)
	if s.cur != nil {
		s.cur.Close()
	}
}

// Advance makes the server hold every sequence up to seq, as if another
// agent streaming under the same name (another run) had made them
// durable, and drops the connection.
func (s *Server) Advance(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.durable = max(s.durable, seq)
	s.acked = max(s.acked, seq)
	s.lastRun = wire.RunID{0xff}
	if s.cur != nil {
		s.cur.Close()
	}
}

// Forget deletes a disk's replica: the next hello gets a full sync.
func (s *Server) Forget(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.disks, name)
}

// SetWindow sends Backpressure{w} now and on every later connection
// (before the hello-ack).
func (s *Server) SetWindow(w uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.window = &w
	if s.curW != nil {
		s.curW.WriteBackpressure(w)
	}
}

// HoldAcks withholds acknowledgements while on; turning it off
// acknowledges everything stored.
func (s *Server) HoldAcks(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.holdAcks = on
	if !on && s.curW != nil && s.durable > s.acked {
		s.acked = s.durable
		s.curW.WriteAck(s.durable)
	}
}

// SpeakProtocol2 makes the server answer hellos in protocol 2, as a
// process server that predates Recoverable frames does.
func (s *Server) SpeakProtocol2() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.v2 = true
}

// HoldRecoverable withholds Recoverable frames while on, as a process
// server whose uploads fail does (acknowledgements go on).
func (s *Server) HoldRecoverable(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.holdRU = on
}

// Image returns a copy of a disk's replica, nil if unknown.
func (s *Server) Image(name string) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.disks[name]
	if d == nil {
		return nil
	}
	return append([]byte(nil), d.image...)
}

// Generation returns a disk's generation.
func (s *Server) Generation(name string) wire.Generation {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.disks[name]; d != nil {
		return d.gen
	}
	return wire.Generation{}
}

// Durable is the highest sequence applied.
func (s *Server) Durable() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.durable
}

// Received returns every record received, duplicates included, in order.
func (s *Server) Received() []Received {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Received(nil), s.received...)
}

// Markers returns the time markers received.
func (s *Server) Markers() []Marker {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Marker(nil), s.markers...)
}

// Sums returns the checksum questions received.
func (s *Server) Sums() []wire.Sums {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]wire.Sums(nil), s.sums...)
}

// Hellos returns the hellos received.
func (s *Server) Hellos() []wire.Hello {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]wire.Hello(nil), s.hellos...)
}

// Records tells, for each connection whose handshake succeeded, whether
// it carried internal/channel's records (else plain TLS).
func (s *Server) Records() []bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]bool(nil), s.withRecs...)
}

// Conns is the number of connections accepted.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

// Violations lists protocol breaches seen: a record skipping sequence
// numbers, or one resent although it had been acknowledged.
func (s *Server) Violations() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := append([]string(nil), s.violations...)
	if s.ackedDups > 0 {
		v = append(v, fmt.Sprintf("%d records resent after their acknowledgement", s.ackedDups))
	}
	return v
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			if err := s.serve(c); err != nil && !errors.Is(err, io.EOF) {
				s.t.Logf("fake process server: %v", err)
			}
		}()
	}
}

func (s *Server) serve(raw net.Conn) error {
	cfg := s.tlsConf
	if s.plainTLS.Load() {
		cfg = s.id.ServerTLS(pki.RoleAgent)
	}
	c, err := channel.Server(context.Background(), raw, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	_, recs := c.(*channel.Conn)
	s.mu.Lock()
	s.withRecs = append(s.withRecs, recs)
	s.mu.Unlock()
	r := wire.NewReader(c, 0)
	w := wire.NewWriter(c)
	f, err := r.Next()
	if err != nil {
		return err
	}
	if f.Type != wire.TypeHello {
		return fmt.Errorf("first frame is %s", f.Type)
	}
	var h wire.Hello
	if err := h.UnmarshalBinary(f.Payload); err != nil {
		return err
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	if s.cur != nil {
		s.cur.Close()
	}
	s.conns++
	conn := s.conns
	s.cur, s.curW = c, w
	s.hellos = append(s.hellos, h)
	s.curRun = h.Run
	version := uint16(4)
	if s.v2 {
		version = 2
	}
	ack := wire.HelloAck{ProtocolVersion: version, LastRun: s.lastRun}
	if h.ProtocolVersion != version {
		// As a process server of protocol 2 does: exactly its own.
		w.WriteError(wire.Error{Code: wire.CodeVersion, Message: fmt.Sprintf("protocol version %d not supported; this process server speaks %d", h.ProtocolVersion, version)})
		s.mu.Unlock()
		return nil
	}
	for _, d := range h.Disks {
		sd := s.disks[d.Name]
		a := wire.DiskAgreement{Name: d.Name, ResumeFrom: s.durable + 1}
		switch {
		case sd == nil || sd.gen != d.Generation || uint64(len(sd.image)) != d.Size:
			sd = &disk{image: make([]byte, d.Size)}
			rand.Read(sd.gen[:])
			s.disks[d.Name] = sd
			a.Action = wire.SyncFull
		case d.LastAckedSeq > s.durable:
			a.Action = wire.SyncChecksum
		default:
			a.Action = wire.SyncResume
		}
		a.Generation = sd.gen
		ack.Disks = append(ack.Disks, a)
	}
	names := make([]string, len(h.Disks))
	for i, d := range h.Disks {
		names[i] = d.Name
	}
	s.acked = s.durable // the resume point tells the agent as much
	if s.window != nil {
		w.WriteBackpressure(*s.window)
	}
	err = w.WriteHelloAck(&ack)
	if err == nil && !s.v2 && !s.holdRU {
		// As a process server does: what the account holds so far.
		err = w.WriteRecoverable(wire.Recoverable{UnixNano: s.recoverable})
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}

	for {
		f, err := r.Next()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		switch f.Type {
		case wire.TypeBatch:
			b, err := wire.DecodeBatch(f.Payload)
			if err != nil {
				w.WriteError(wire.Error{Code: wire.CodeProtocol, Message: err.Error()})
				return err
			}
			if drop := s.batch(c, conn, names, b, w); drop {
				return nil
			}
		case wire.TypeMarker:
			var m wire.Marker
			if err := m.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			s.mu.Lock()
			s.markers = append(s.markers, Marker{Marker: m, At: time.Now(), Conn: conn})
			// As if uploads were instant: a marker whose records are
			// durable is in the account at once.
			if m.Seq <= s.durable && !s.holdAcks && !s.holdRU && !s.v2 && m.UnixNano > s.recoverable {
				s.recoverable = m.UnixNano
				w.WriteRecoverable(wire.Recoverable{UnixNano: m.UnixNano})
			}
			s.mu.Unlock()
		case wire.TypeSums:
			var q wire.Sums
			if err := q.UnmarshalBinary(f.Payload); err != nil {
				return err
			}
			s.mu.Lock()
			s.sums = append(s.sums, q)
			rep := wire.SumsReply{ID: q.ID, Differs: make([]bool, len(q.Sums))}
			d := s.disks[q.Disk]
			for i, sum := range q.Sums {
				if d == nil {
					rep.Differs[i] = true
					continue
				}
				size, rel := uint64(len(d.image)), uint64(i)*uint64(q.ChunkSize)
				if q.Offset >= size || rel >= size-q.Offset { // beyond the image, or past 2^64
					rep.Differs[i] = true
					continue
				}
				start := q.Offset + rel
				end := min(start+uint64(q.ChunkSize), size)
				rep.Differs[i] = sha256.Sum256(d.image[start:end]) != sum
			}
			err := w.WriteSumsReply(&rep)
			s.mu.Unlock()
			if err != nil {
				return err
			}
		default:
			return fmt.Errorf("unexpected %s frame", f.Type)
		}
	}
}

// batch applies b; it reports whether the connection is to be dropped.
func (s *Server) batch(c net.Conn, conn int, names []string, b wire.Batch, w *wire.Writer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batches++
	fault := Store
	if s.Fault != nil {
		last := b.FirstSeq
		for it := b.Records(); it.Next(); {
			last = it.Record().Seq
		}
		fault = s.Fault(s.batches, b.FirstSeq, last)
	}
	if fault == DropBeforeStore {
		c.Close()
		return true
	}
	stored := false
	for it := b.Records(); it.Next(); {
		r := it.Record()
		rec := *r
		rec.Data = nil
		s.received = append(s.received, Received{Record: rec, Conn: conn})
		if r.Seq <= s.acked {
			s.ackedDups++
		}
		if r.Seq <= s.durable {
			continue // a duplicate: already applied
		}
		stored = true
		if r.Seq != s.durable+1 {
			s.violations = append(s.violations, fmt.Sprintf("record %d follows %d", r.Seq, s.durable))
		}
		s.durable, s.lastRun = r.Seq, s.curRun
		if int(r.Disk) >= len(names) || s.disks[names[r.Disk]] == nil {
			continue
		}
		img := s.disks[names[r.Disk]].image
		if r.Op != wire.OpMarker && r.Offset+uint64(r.Length) > uint64(len(img)) {
			s.violations = append(s.violations, fmt.Sprintf("record %d: %d bytes at %d are beyond the disk", r.Seq, r.Length, r.Offset))
			continue
		}
		switch r.Op {
		case wire.OpWrite:
			copy(img[r.Offset:], r.Data)
		case wire.OpZero, wire.OpDiscard:
			clear(img[r.Offset : r.Offset+uint64(r.Length)])
		}
	}
	if fault == DropAfterStore {
		c.Close()
		return true
	}
	// As the process server: an ack for records it stored, none for a
	// batch of duplicates only.
	if !s.holdAcks && stored {
		s.acked = s.durable
		w.WriteAck(s.durable)
	}
	return false
}
