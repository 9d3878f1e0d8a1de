package channel_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lifeboat-dr/lifeboat/internal/channel"
	"github.com/lifeboat-dr/lifeboat/internal/pki"
	"github.com/lifeboat-dr/lifeboat/internal/wire"
)

// ids returns a process server and an agent identity of one CA.
func ids(t testing.TB) (ps, agent *pki.Identity) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if err := pki.Init(dir); err != nil {
		t.Fatal(err)
	}
	for name, role := range map[string]pki.Role{"ps": pki.RoleProcessServer, "m1": pki.RoleAgent} {
		if err := pki.Issue(dir, name, role); err != nil {
			t.Fatal(err)
		}
	}
	ps, err := pki.Load(dir, "ps")
	if err != nil {
		t.Fatal(err)
	}
	agent, err = pki.Load(dir, "m1")
	if err != nil {
		t.Fatal(err)
	}
	return ps, agent
}

type result struct {
	conn net.Conn
	err  error
}

// pair connects a client and a server over loopback TCP, each end
// running the handshake of channel (or of plain crypto/tls where its
// config is not channel.Config's). wrap, if set, wraps the client's TCP
// connection.
func pair(t testing.TB, serverCfg, clientCfg *tls.Config, wrap func(net.Conn) net.Conn) (client, server net.Conn, serverErr error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr, done := accept(t, ctx, serverCfg)
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		raw = wrap(raw)
	}
	client, err = channel.Client(ctx, raw, clientCfg)
	if err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	r := <-done
	t.Cleanup(func() {
		client.Close()
		if r.conn != nil {
			r.conn.Close()
		}
	})
	return client, r.conn, r.err
}

// accept listens on loopback for one connection and runs the server's
// handshake on it; the result arrives on the channel.
func accept(t testing.TB, ctx context.Context, cfg *tls.Config) (string, <-chan result) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan result, 1)
	go func() {
		defer ln.Close()
		raw, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		c, err := channel.Server(ctx, raw, cfg)
		if err != nil {
			raw.Close()
		}
		done <- result{c, err}
	}()
	return ln.Addr().String(), done
}

func records(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ps, agent := ids(t)
	c, s, err := pair(t, channel.Config(ps.ServerTLS(pki.RoleAgent)), channel.Config(agent.ClientTLS("127.0.0.1", pki.RoleProcessServer)), nil)
	if err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	return c, s
}

func payload(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7+i>>8)
	}
	return p
}

// TestFramesRoundTrip sends frames of many sizes both ways as records;
// the large ones are opened in place in the buffer the reader's caller
// gives (as the process server's open segment is).
func TestFramesRoundTrip(t *testing.T) {
	c, s := records(t)
	if _, ok := c.(*channel.Conn); !ok {
		t.Fatalf("client got %T, want records", c)
	}
	if _, ok := s.(*channel.Conn); !ok {
		t.Fatalf("server got %T, want records", s)
	}
	if cs := s.(*channel.Conn).ConnectionState(); len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].Subject.CommonName != "m1" {
		t.Fatalf("server sees peer %v, want m1's certificate", cs.PeerCertificates)
	}
	sizes := []int{0, 1, 15, 16, 17, 511, 4 << 10, 64<<10 + 3, 1 << 20, wire.MaxPayload}
	go func() {
		w := wire.NewWriter(c)
		for i, n := range sizes {
			if err := w.WriteFrame(wire.TypeBatch, uint16(i), payload(n, byte(i))); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	r := wire.NewReader(s, 0)
	seg := make([]byte, 0, 40<<20)
	for i, n := range sizes {
		var into []byte
		f, err := r.NextInto(func(_ wire.Type, n int) []byte {
			if i%2 == 1 { // odd frames: no room offered
				return nil
			}
			into = seg[len(seg) : len(seg)+wire.HeaderSize+n]
			return into
		})
		if err != nil {
			t.Fatalf("frame %d (%d bytes): %v", i, n, err)
		}
		if f.Flags != uint16(i) || !bytes.Equal(f.Payload, payload(n, byte(i))) {
			t.Fatalf("frame %d: flags %d, %d bytes, want %d bytes as sent", i, f.Flags, len(f.Payload), n)
		}
		if into != nil && n > 0 {
			if &f.Payload[0] != &into[wire.HeaderSize] {
				t.Fatalf("frame %d was not opened in the caller's buffer", i)
			}
			seg = seg[:len(seg)+wire.HeaderSize+n]
		}
	}
	// And back: acks from the server.
	w := wire.NewWriter(s)
	for seq := range uint64(3) {
		if err := w.WriteAck(seq); err != nil {
			t.Fatal(err)
		}
	}
	cr := wire.NewReader(c, 0)
	for seq := range uint64(3) {
		f, err := cr.Next()
		var a wire.Ack
		if err != nil || f.Type != wire.TypeAck || a.UnmarshalBinary(f.Payload) != nil || a.Seq != seq {
			t.Fatalf("ack %d: %v %v %+v", seq, f.Type, err, a)
		}
	}
	// A close between frames reads as the end of the stream.
	c.Close()
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after the client closed: %v, want io.EOF", err)
	}
}

// TestPlainTLSPeers: an end that does not offer or accept records gets
// plain TLS, and frames still flow.
func TestPlainTLSPeers(t *testing.T) {
	ps, agent := ids(t)
	withRecords := func(cfg *tls.Config) *tls.Config { return channel.Config(cfg) }
	plain := func(cfg *tls.Config) *tls.Config { return cfg }
	for _, tc := range []struct {
		name           string
		server, client func(*tls.Config) *tls.Config
	}{
		{"old agent", withRecords, plain},
		{"old process server", plain, withRecords},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s, err := pair(t, tc.server(ps.ServerTLS(pki.RoleAgent)), tc.client(agent.ClientTLS("127.0.0.1", pki.RoleProcessServer)), nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := c.(*tls.Conn); !ok {
				t.Fatalf("client got %T, want *tls.Conn", c)
			}
			if _, ok := s.(*tls.Conn); !ok {
				t.Fatalf("server got %T, want *tls.Conn", s)
			}
			go wire.NewWriter(c).WriteFrame(wire.TypeBatch, 0, payload(100<<10, 3))
			f, err := wire.NewReader(s, 0).Next()
			if err != nil || !bytes.Equal(f.Payload, payload(100<<10, 3)) {
				t.Fatalf("frame over plain TLS: %v", err)
			}
		})
	}
}

// tamper is the client's TCP connection with a man in the middle: it
// changes what the client writes once armed.
type tamper struct {
	net.Conn
	mu     sync.Mutex
	armed  bool
	change func(w []byte) []byte
}

func (c *tamper) Write(p []byte) (int, error) {
	c.mu.Lock()
	armed, change := c.armed, c.change
	c.mu.Unlock()
	if armed {
		if _, err := c.Conn.Write(change(bytes.Clone(p))); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *tamper) arm() {
	c.mu.Lock()
	c.armed = true
	c.mu.Unlock()
}

// TestTamperedRecords: a record changed, replayed or dropped in transit
// fails authentication; nothing of it reaches the reader.
func TestTamperedRecords(t *testing.T) {
	ps, agent := ids(t)
	var last []byte // the previous write, for a replay
	for _, tc := range []struct {
		name   string
		change func(w []byte) []byte
	}{
		{"bit flipped in a payload", func(w []byte) []byte { w[len(w)/2] ^= 0x10; return w }},
		{"bit flipped in a length", func(w []byte) []byte { w[3] ^= 0x01; return w }},
		{"bit flipped in a tag", func(w []byte) []byte { w[len(w)-1] ^= 0x80; return w }},
		{"record replayed", func(w []byte) []byte {
			if last == nil {
				last = w
				return w
			}
			return last
		}},
		{"frame dropped", func(w []byte) []byte {
			if last == nil {
				last = w
				return nil
			}
			return w
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			last = nil
			tm := &tamper{change: tc.change}
			c, s, err := pair(t, channel.Config(ps.ServerTLS(pki.RoleAgent)), channel.Config(agent.ClientTLS("127.0.0.1", pki.RoleProcessServer)),
				func(raw net.Conn) net.Conn { tm.Conn = raw; return tm })
			if err != nil {
				t.Fatal(err)
			}
			tm.arm()
			w := wire.NewWriter(c)
			go func() {
				w.WriteFrame(wire.TypeBatch, 0, payload(8<<10, 1))
				w.WriteFrame(wire.TypeBatch, 0, payload(8<<10, 2))
			}()
			s.SetReadDeadline(time.Now().Add(10 * time.Second))
			r := wire.NewReader(s, 0)
			var err2 error
			for range 2 {
				var f wire.Frame
				if f, err2 = r.Next(); err2 != nil {
					break
				}
				if !bytes.Equal(f.Payload, payload(8<<10, 1)) {
					t.Fatalf("reader got a frame that was not sent first")
				}
			}
			if !errors.Is(err2, channel.ErrAuth) {
				t.Fatalf("tampered stream: %v, want an authentication failure", err2)
			}
			t.Logf("reader: %v", err2)
		})
	}
}

// TestRefusedCertificate: a server that refuses the client's certificate
// does so after the client's handshake is over; the client's first read
// says why, as it would over plain TLS.
func TestRefusedCertificate(t *testing.T) {
	ps, _ := ids(t)
	_, other := ids(t) // an agent of another CA
	cfg := other.ClientTLS("127.0.0.1", pki.RoleProcessServer)
	cfg.VerifyConnection = nil // trusts any server (InsecureSkipVerify is set)
	c, _, err := pair(t, channel.Config(ps.ServerTLS(pki.RoleAgent)), channel.Config(cfg), nil)
	if err == nil {
		t.Fatal("server accepted an agent of another CA")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = wire.NewReader(c, 0).Next()
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "remote error" || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("client read: %v, want the server's TLS alert", err)
	}
	t.Logf("client: %v", err)
}

// TestSteadyStateAllocs: a batch and its ack cost no allocation once the
// buffers have grown.
func TestSteadyStateAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector (the non-race run checks them)")
	}
	c, s := records(t)
	cw, cr := wire.NewWriter(c), wire.NewReader(c, 0)
	sw, sr := wire.NewWriter(s), wire.NewReader(s, 0)
	p := payload(256<<10, 9)
	parts := [][]byte{p} // WriteFrame(…, p) would allocate the slice
	seg := make([]byte, wire.HeaderSize+len(p)+64)
	room := func(_ wire.Type, n int) []byte { return seg[:wire.HeaderSize+n] }
	roundTrip := func() {
		if err := cw.WriteFrame(wire.TypeBatch, 0, parts...); err != nil {
			t.Fatal(err)
		}
		if _, err := sr.NextInto(room); err != nil {
			t.Fatal(err)
		}
		if err := sw.WriteAck(1); err != nil {
			t.Fatal(err)
		}
		if _, err := cr.Next(); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip()
	if n := testing.AllocsPerRun(20, roundTrip); n != 0 {
		t.Fatalf("%v allocations per round trip, want 0", n)
	}
}

// TestCorruptFrameInRecords: a frame damaged before it was sealed (its
// CRC does not match) is refused by the reader, whether its payload was
// opened in the caller's buffer or in the Conn's.
func TestCorruptFrameInRecords(t *testing.T) {
	for _, room := range []bool{true, false} {
		c, s := records(t)
		f, err := wire.AppendFrame(nil, wire.TypeBatch, 0, payload(200<<10, 5))
		if err != nil {
			t.Fatal(err)
		}
		f[wire.HeaderSize+150<<10] ^= 0x04
		go wire.NewWriter(c).WriteRaw(f)
		seg := make([]byte, len(f)+64)
		_, err = wire.NewReader(s, 0).NextInto(func(_ wire.Type, n int) []byte {
			if !room {
				return nil
			}
			return seg[:wire.HeaderSize+n]
		})
		if !errors.Is(err, wire.ErrChecksum) {
			t.Fatalf("room %v: %v, want a checksum error", room, err)
		}
	}
}

// holdBack holds every write after the first (the ClientHello) until
// release, then sends what it held and the next write in one.
type holdBack struct {
	net.Conn
	mu      sync.Mutex
	writes  int
	held    []byte
	release bool
}

func (c *holdBack) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	switch {
	case c.writes == 1:
		return c.Conn.Write(p)
	case !c.release:
		c.held = append(c.held, p...)
		return len(p), nil
	case c.held != nil:
		all := append(c.held, p...)
		c.held = nil
		if _, err := c.Conn.Write(all); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// TestRecordsRightBehindFinished: the client's first records arrive in
// the same segment as its Finished; the server's TLS handshake must not
// read them.
func TestRecordsRightBehindFinished(t *testing.T) {
	ps, agent := ids(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addr, done := accept(t, ctx, channel.Config(ps.ServerTLS(pki.RoleAgent)))
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	hb := &holdBack{Conn: raw}
	c, err := channel.Client(ctx, hb, channel.Config(agent.ClientTLS("127.0.0.1", pki.RoleProcessServer)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hb.mu.Lock()
	if len(hb.held) == 0 {
		t.Fatal("the client's Finished was not held back")
	}
	hb.release = true
	hb.mu.Unlock()
	w := wire.NewWriter(c)
	for i := range 3 {
		if err := w.WriteFrame(wire.TypeMarker, 0, payload(100, byte(i))); err != nil {
			t.Fatal(err)
		}
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.conn.Close()
	r.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	rd := wire.NewReader(r.conn, 0)
	for i := range 3 {
		f, err := rd.Next()
		if err != nil || !bytes.Equal(f.Payload, payload(100, byte(i))) {
			t.Fatalf("frame %d behind the Finished: %v", i, err)
		}
	}
}

// TestRoomWithoutSpare: a caller's buffer without room for the record's
// tag past the frame still gets the frame, opened elsewhere and copied
// in, and nothing past the frame is touched.
func TestRoomWithoutSpare(t *testing.T) {
	c, s := records(t)
	p := payload(100<<10, 7)
	go wire.NewWriter(c).WriteFrame(wire.TypeBatch, 0, p)
	seg := make([]byte, wire.HeaderSize+len(p)+16)
	for i := range seg {
		seg[i] = 0xa5
	}
	f, err := wire.NewReader(s, 0).NextInto(func(_ wire.Type, n int) []byte {
		return seg[: wire.HeaderSize+n : wire.HeaderSize+n]
	})
	if err != nil || !bytes.Equal(f.Payload, p) || &f.Payload[0] != &seg[wire.HeaderSize] {
		t.Fatalf("frame not read into the caller's buffer: %v", err)
	}
	if !bytes.Equal(seg[wire.HeaderSize+len(p):], bytes.Repeat([]byte{0xa5}, 16)) {
		t.Fatal("bytes past the caller's buffer were overwritten")
	}
}

// TestCutBetweenRecords: a stream that ends after a frame's header record
// is a truncated frame, not a clean end.
func TestCutBetweenRecords(t *testing.T) {
	c, s := records(t)
	cc := c.(*channel.Conn)
	f, err := wire.AppendFrame(nil, wire.TypeBatch, 0, payload(1000, 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := cc.AppendRecord(f[:wire.HeaderSize]); err != nil {
		t.Fatal(err)
	}
	if err := cc.Flush(); err != nil {
		t.Fatal(err)
	}
	cc.Close()
	if _, err := wire.NewReader(s, 0).Next(); !errors.Is(err, wire.ErrTruncated) {
		t.Fatalf("%v, want a truncated frame", err)
	}
}

// TestShrinkingFramesOwnBuffer: frames read into the Conn's own buffer,
// largest first, so that later ones are read into a buffer larger than
// they are.
func TestShrinkingFramesOwnBuffer(t *testing.T) {
	c, s := records(t)
	sizes := []int{300 << 10, 70 << 10, 5000, 10, 1}
	go func() {
		w := wire.NewWriter(c)
		for i, n := range sizes {
			w.WriteFrame(wire.TypeMarker, 0, payload(n, byte(i)))
		}
	}()
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	r := wire.NewReader(s, 0)
	for i, n := range sizes {
		f, err := r.Next()
		if err != nil || !bytes.Equal(f.Payload, payload(n, byte(i))) {
			t.Fatalf("frame %d of %d bytes: %v", i, n, err)
		}
	}
}

// trickle writes in small pieces with pauses, as a slow link delivers.
type trickle struct{ net.Conn }

func (c trickle) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := c.Conn.Write(p[n:min(len(p), n+16<<10)])
		n += m
		if err != nil {
			return n, err
		}
		time.Sleep(200 * time.Microsecond)
	}
	return n, nil
}

// TestRecordsTrickleIn: large records read with the socket's low-water
// mark raised arrive whole however their bytes trickle in, and a small
// record right after one (then nothing) is not held back by the mark.
func TestRecordsTrickleIn(t *testing.T) {
	ps, agent := ids(t)
	c, s, err := pair(t, channel.Config(ps.ServerTLS(pki.RoleAgent)), channel.Config(agent.ClientTLS("127.0.0.1", pki.RoleProcessServer)),
		func(c net.Conn) net.Conn { return trickle{c} })
	if err != nil {
		t.Fatal(err)
	}
	sizes := []int{300 << 10, 7, 40 << 10, 1, 2 << 20, 33 << 10, 3}
	// Each frame is sent once the reader waits for it: a mark left above
	// what comes would hold it forever.
	waiting := make(chan struct{})
	go func() {
		w := wire.NewWriter(c)
		for i, n := range sizes {
			<-waiting
			time.Sleep(20 * time.Millisecond)
			if err := w.WriteFrame(wire.TypeBatch, uint16(i), payload(n, byte(i))); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	r := wire.NewReader(s, 0)
	for i, n := range sizes {
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		waiting <- struct{}{}
		f, err := r.Next()
		if err != nil {
			t.Fatalf("frame %d (%d bytes): %v", i, n, err)
		}
		if f.Flags != uint16(i) || !bytes.Equal(f.Payload, payload(n, byte(i))) {
			t.Fatalf("frame %d: %d bytes, want %d as sent", i, len(f.Payload), n)
		}
	}
}
