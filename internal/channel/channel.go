// Package channel carries the agent → process server stream, once its
// TLS 1.3 handshake is done, in records sealed with AES-256-GCM under keys
// exported from that handshake (RFC 8446 §7.5). It exists for speed: the
// process server opens every byte an agent sends, and crypto/tls opens
// with 128-bit AES-NI into a buffer of its own and then copies out, while
// internal/aesgcm opens with VAES on 512-bit registers in place, in the
// caller's buffer (the open cache segment). TLS still authenticates both
// ends (mutual certificates) and agrees the secrets; the records only
// replace its record layer.
//
// Both ends opt in through ALPN (Protocol). A peer that does not offer or
// select it gets plain TLS, so agents and process servers of different
// versions keep talking.
//
// A record is its plaintext length L (4 bytes, big-endian), then L bytes
// of ciphertext and a 16-byte GCM tag; the length is the additional data.
// Each direction has its own key and IV; the nonce is the IV XOR the
// record's sequence number, counted from 0, as in TLS 1.3 (§5.3), so a
// record reordered, replayed, dropped or moved to the other direction
// fails authentication. A stream cut between records reads as io.EOF: the
// frames above carry their own acknowledgements, and nothing that was not
// acknowledged is taken for done.
package channel

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/aesgcm"
)

const (
	// Protocol is the ALPN name of the record layer.
	Protocol = "lifeboat-records/1"
	// MaxRecord is the largest plaintext a record may hold: a frame of
	// internal/wire's largest payload, with room to spare.
	MaxRecord = 16<<20 + 4096
	// Overhead is what a record adds to its plaintext.
	Overhead = headerSize + aesgcm.Overhead

	exporterLabel = "EXPORTER-lifeboat-records-1"
	headerSize    = 4
	// readBuffer is the buffer record headers are read through. Whatever
	// a read brings in beyond the header is copied out of it, so it is
	// small: large records are read into their destination directly.
	readBuffer = 4 << 10
	// eachChunk is the size of the pieces ReadRecord hands its caller:
	// well inside the CPU's L2 cache.
	eachChunk = 64 << 10
	// growStep is the first size of the Conn's own record buffer.
	growStep = 64 << 10
	// plainBuffer reads a plain TLS stream (a peer without records).
	plainBuffer = 256 << 10
	// A record body longer than lowatMin is read with the socket's
	// SO_RCVLOWAT at what is left of it (at most lowatMax): the reader
	// wakes once for it, not at every segment that arrives. Wake-ups,
	// not bytes, were most of the receive cost on a paravirtualised host.
	lowatMin = 32 << 10
	lowatMax = 4 << 20
)

// ErrAuth is returned for a record that fails authentication: it was
// changed, reordered or replayed in transit, or the peer does not hold
// the keys.
var ErrAuth = errors.New("channel: record failed authentication (changed, reordered, replayed or forged in transit)")

// Config returns a copy of cfg that offers (client) or accepts (server)
// the record layer. Session tickets are turned off: a server would send
// them as TLS records after the handshake, where records of ours belong,
// and mutual-certificate connections gain nothing from resumption.
func Config(cfg *tls.Config) *tls.Config {
	c := cfg.Clone()
	if !slices.Contains(c.NextProtos, Protocol) {
		c.NextProtos = append([]string{Protocol}, c.NextProtos...)
	}
	c.SessionTicketsDisabled = true
	return c
}

// Stream is a connection whose handshake is done: a *Conn, or the
// *tls.Conn of a peer without records.
type Stream interface {
	net.Conn
	ConnectionState() tls.ConnectionState
}

// Client runs a TLS handshake as a client over raw. It returns a *Conn if
// the server selected Protocol and the *tls.Conn otherwise. On error the
// caller closes raw.
func Client(ctx context.Context, raw net.Conn, cfg *tls.Config) (Stream, error) {
	return handshake(ctx, raw, cfg, false)
}

// Server runs a TLS handshake as a server over raw, as Client does.
func Server(ctx context.Context, raw net.Conn, cfg *tls.Config) (Stream, error) {
	return handshake(ctx, raw, cfg, true)
}

func handshake(ctx context.Context, raw net.Conn, cfg *tls.Config, server bool) (Stream, error) {
	hs := &handshakeConn{Conn: raw, br: bufioReader(raw)}
	var t *tls.Conn
	if server {
		t = tls.Server(hs, cfg)
	} else {
		t = tls.Client(hs, cfg)
	}
	if err := t.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	cs := t.ConnectionState()
	if cs.NegotiatedProtocol != Protocol {
		hs.plain = bufio.NewReaderSize(hs.br, plainBuffer)
		return t, nil
	}
	if cs.Version != tls.VersionTLS13 {
		return nil, fmt.Errorf("channel: %s needs TLS 1.3, the handshake gave %s", Protocol, tls.VersionName(cs.Version))
	}
	hs.closed = true // crypto/tls must never write again: records follow
	return newConn(raw, t, hs.br, cs.ExportKeyingMaterial, server)
}

func bufioReader(raw net.Conn) *bufio.Reader { return bufio.NewReaderSize(raw, readBuffer) }

// exporter is tls.ConnectionState.ExportKeyingMaterial.
type exporter func(label string, context []byte, length int) ([]byte, error)

func newConn(raw net.Conn, t *tls.Conn, br *bufio.Reader, export exporter, server bool) (*Conn, error) {
	c := &Conn{raw: raw, tls: t, br: br, lowat: 1}
	if sc, ok := raw.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			c.rc = rc
			// Made once: a closure per call would allocate.
			c.lowatFn = func(fd uintptr) {
				c.lowatErr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, c.lowatSet)
			}
		}
	}
	c.in = direction{export: export, up: server}
	c.out = direction{export: export, up: !server}
	if err := c.in.rekey(0); err != nil {
		return nil, err
	}
	if err := c.out.rekey(0); err != nil {
		return nil, err
	}
	return c, nil
}

// handshakeConn is what crypto/tls reads the handshake through. It never
// reads past the end of the TLS record at hand, so that the records of
// ours the peer may send right after its Finished stay unread, in br, for
// the Conn. For a plain TLS stream it reads through a large buffer once
// the handshake is done (one read syscall per TLS record was slow).
type handshakeConn struct {
	net.Conn
	br     *bufio.Reader
	remain int           // bytes left of the TLS record being read
	plain  *bufio.Reader // set when the stream stays plain TLS
	closed bool          // set when records take over: no TLS writes
}

// errTLSClosed refuses what crypto/tls would write once records took
// over (an alert while tlsError reads the peer's).
var errTLSClosed = errors.New("channel: TLS record layer closed: the stream carries records")

func (c *handshakeConn) Write(p []byte) (int, error) {
	if c.closed {
		return 0, errTLSClosed
	}
	return c.Conn.Write(p)
}

func (c *handshakeConn) Read(p []byte) (int, error) {
	if c.plain != nil {
		return c.plain.Read(p)
	}
	if c.remain == 0 {
		h, err := c.br.Peek(5)
		if err != nil {
			if len(h) > 0 {
				return c.br.Read(p) // let crypto/tls see what there is
			}
			return 0, err
		}
		c.remain = 5 + int(binary.BigEndian.Uint16(h[3:]))
	}
	n, err := c.br.Read(p[:min(len(p), c.remain)])
	c.remain -= n
	return n, err
}

// rekeyBytes is how much a key seals (plaintext and tags) before the
// next record of its direction moves to a fresh one: far inside the
// 2^38.5 bytes RFC 8446 §5.5 allows AES-GCM, which a busy stream would
// pass in hours. (crypto/tls never sends a KeyUpdate by itself.) A
// variable for tests.
var rekeyBytes uint64 = 16 << 30

// direction is one way's key, IV and record count.
type direction struct {
	gcm    *aesgcm.GCM
	iv     [aesgcm.NonceSize]byte
	seq    uint64
	nonce  [aesgcm.NonceSize]byte // the last record's (here, not on the stack, which would escape)
	export exporter
	up     bool   // client → server
	epoch  uint64 // keys in use: exported with this context (0: none)
	sealed uint64 // bytes under the current key
}

// rekey exports the keys of epoch e and takes this direction's: the
// first 2 × 32 bytes are the client's and the server's keys, the next
// 2 × 12 their IVs.
func (d *direction) rekey(e uint64) error {
	var ctx []byte
	if e > 0 {
		ctx = binary.BigEndian.AppendUint64(nil, e)
	}
	const k, n = aesgcm.KeySize, aesgcm.NonceSize
	km, err := d.export(exporterLabel, ctx, 2*(k+n))
	if err != nil {
		return fmt.Errorf("channel: export keys: %w", err)
	}
	defer clear(km)
	key, iv := km[k:2*k], km[2*k+n:]
	if d.up {
		key, iv = km[:k], km[2*k:2*k+n]
	}
	g, err := aesgcm.New(key)
	if err != nil {
		return err
	}
	d.gcm, d.epoch, d.sealed = g, e, 0
	copy(d.iv[:], iv)
	return nil
}

// next returns the nonce of the next record, of n plaintext bytes, and
// counts it, first moving to the next epoch's key if this one is worn.
func (d *direction) next(n int) ([]byte, error) {
	if d.seq == ^uint64(0) {
		return nil, errors.New("channel: record sequence exhausted")
	}
	if d.sealed >= rekeyBytes {
		if err := d.rekey(d.epoch + 1); err != nil {
			return nil, err
		}
	}
	d.sealed += uint64(n) + aesgcm.Overhead
	d.nonce = d.iv
	for i := range 8 {
		d.nonce[4+i] ^= byte(d.seq >> (56 - 8*i))
	}
	d.seq++
	return d.nonce[:], nil
}

// Conn is a stream of records over a connection whose TLS handshake is
// done. One goroutine may read (ReadRecord, Read) while another writes
// (AppendRecord and Flush, Write); each side is not safe for concurrent
// use. Errors are sticky: after one, the stream is broken that way.
type Conn struct {
	raw net.Conn
	rc  syscall.RawConn // raw's socket, for SO_RCVLOWAT (nil: not a socket)
	// lowat is the socket's SO_RCVLOWAT as last set (1: the default);
	// lowatFn sets it to lowatSet, with lowatErr the outcome.
	lowat, lowatSet int
	lowatFn         func(fd uintptr)
	lowatErr        error
	tls             *tls.Conn // read only for the alert of a server that refused us
	br              *bufio.Reader
	in              direction
	out             direction

	aad  [headerSize]byte
	rbuf []byte // records that do not fit the caller's buffer
	left []byte // Read: plaintext not yet returned
	got  bool   // a record has been read
	rerr error

	wbuf []byte // sealed records not yet written
	werr error
}

// Format prints no key material, whatever the verb.
func (c *Conn) Format(f fmt.State, _ rune) { fmt.Fprintf(f, "channel.Conn(%s)", c.raw.RemoteAddr()) }

// ConnectionState is the TLS handshake's.
func (c *Conn) ConnectionState() tls.ConnectionState { return c.tls.ConnectionState() }

// ReadRecord reads the next record and opens it. A record whose length is
// not want (any up to MaxRecord if want < 0) is refused before its body
// is read, as it could not be authenticated. If buf has the capacity
// for the record's ciphertext and tag (Overhead beyond its plaintext),
// the record is read and opened in place there, buf[:cap(buf)] serving as
// scratch, and the plaintext returned is buf[:n]; otherwise it is read
// into a buffer of the Conn's, valid until the next read. A stream that
// ends between records returns io.EOF.
//
// each, if not nil, is given the plaintext piece by piece as it is
// decrypted, while it is in the CPU cache, before the record is
// authenticated (see aesgcm.OpenChunks): for a checksum the caller
// computes anyway, to be dropped if ReadRecord fails.
//
// Every error is final, a read deadline's included: the stream may have
// stopped inside a record.
func (c *Conn) ReadRecord(buf []byte, want int, each func([]byte)) ([]byte, error) {
	if c.rerr != nil {
		return nil, c.rerr
	}
	p, err := c.readRecord(buf, want, each)
	if err != nil {
		c.rerr = err
	}
	return p, err
}

func (c *Conn) readRecord(buf []byte, want int, each func([]byte)) ([]byte, error) {
	h, err := c.br.Peek(headerSize)
	if err != nil {
		if err == io.EOF && len(h) == 0 {
			return nil, io.EOF
		}
		return nil, readError("header", len(h), err)
	}
	if !c.got && (h[0] == recordAlert || h[0] == recordApplicationData) && h[1] == 3 && h[2] == 3 {
		// A TLS 1.3 record header, where our length's top byte (at
		// most 1) belongs: a server that refused our certificate after
		// our side of the handshake ended sends an alert.
		return nil, c.tlsError()
	}
	n := int(binary.BigEndian.Uint32(h))
	if n > MaxRecord || want >= 0 && n != want {
		if want < 0 {
			want = MaxRecord
		}
		return nil, fmt.Errorf("%w: record %d claims %d bytes, want %d", ErrAuth, c.in.seq, n, want)
	}
	copy(c.aad[:], h)
	c.br.Discard(headerSize)
	need := n + aesgcm.Overhead
	var b []byte
	if cap(buf) >= need {
		b = buf[:need]
		if m, err := c.body(b); err != nil {
			return nil, readError("body", headerSize+m, err)
		}
	} else if b, err = c.bodyGrowing(need); err != nil {
		return nil, err
	}
	nonce, err := c.in.next(n)
	if err != nil {
		return nil, err
	}
	p, err := c.in.gcm.OpenChunks(b[:0], nonce, b, c.aad[:], eachChunk, each)
	if err != nil {
		return nil, fmt.Errorf("%w: record %d of %d bytes", ErrAuth, c.in.seq-1, n)
	}
	c.got = true
	return p, nil
}

// body reads a record's ciphertext and tag into b: what the header's read
// brought in is copied, the rest comes straight from the socket.
func (c *Conn) body(b []byte) (int, error) {
	k, _ := c.br.Read(b[:min(len(b), c.br.Buffered())])
	m, err := c.readFull(b[k:])
	return k + m, err
}

// readFull is io.ReadFull from the socket, which, once a read came back
// short of a large p, wakes the reader only when what is left of it has
// arrived (SO_RCVLOWAT): a body already there costs no system call more.
// The mark never exceeds what the record still owes, so the sender,
// which wrote the whole record, always meets it; it is back at 1 (any
// byte) before anything else is read.
func (c *Conn) readFull(p []byte) (int, error) {
	if c.rc == nil || len(p) < lowatMin {
		return io.ReadFull(c.raw, p)
	}
	defer c.setLowat(1)
	n := 0
	for n < len(p) {
		if left := len(p) - n; n > 0 && left >= lowatMin {
			c.setLowat(min(left, lowatMax))
		} else {
			c.setLowat(1)
		}
		m, err := c.raw.Read(p[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// setLowat sets the socket's SO_RCVLOWAT to v if it is not already. A
// failure leaves the mark where it was: reads still work, they only
// wake sooner.
func (c *Conn) setLowat(v int) {
	if c.lowat == v {
		return
	}
	c.lowatSet = v
	if err := c.rc.Control(c.lowatFn); err == nil && c.lowatErr == nil {
		c.lowat = v
	}
}

// bodyGrowing reads a record's ciphertext and tag into c.rbuf, which
// grows only as bytes arrive (growStep at a time, then doubling): a peer
// claiming a large record makes it hold about twice what it sent, not
// the claim.
func (c *Conn) bodyGrowing(need int) ([]byte, error) {
	b := c.rbuf[:0]
	for len(b) < need {
		if len(b) == cap(b) {
			nb := make([]byte, len(b), min(max(2*cap(b), growStep), need))
			copy(nb, b)
			b, c.rbuf = nb, nb
		}
		m, err := c.body(b[len(b):min(cap(b), need)])
		b = b[:len(b)+m]
		if err != nil {
			return nil, readError("body", headerSize+len(b), err)
		}
	}
	return b, nil
}

// tlsError reads the TLS record at hand through crypto/tls, which says
// what it was ("remote error: tls: …").
func (c *Conn) tlsError() error {
	if c.tls == nil {
		return fmt.Errorf("%w: a TLS record where a record belongs", ErrAuth)
	}
	var one [1]byte
	if _, err := c.tls.Read(one[:]); err != nil {
		return err
	}
	return errors.New("channel: peer sent TLS application data instead of records")
}

// TLS content types (RFC 8446 §5.1).
const (
	recordAlert           = 21
	recordApplicationData = 23
)

// readError says what reading got bytes of a record into did not finish.
func readError(what string, got int, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	if got > 0 {
		return fmt.Errorf("channel: stream ended inside a record %s (%d bytes in): %w", what, got, err)
	}
	return fmt.Errorf("channel: read record %s: %w", what, err)
}

// Read reads plaintext, record after record. It copies; ReadRecord is for
// readers that know record boundaries.
func (c *Conn) Read(p []byte) (int, error) {
	for len(c.left) == 0 {
		r, err := c.ReadRecord(nil, -1, nil)
		if err != nil {
			return 0, err
		}
		c.left = r
	}
	n := copy(p, c.left)
	c.left = c.left[n:]
	return n, nil
}

// AppendRecord seals the concatenation of parts as one record, to be
// written by the next Flush.
func (c *Conn) AppendRecord(parts ...[]byte) error {
	if c.werr != nil {
		return c.werr
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > MaxRecord {
		return fmt.Errorf("channel: record of %d bytes, limit %d", n, MaxRecord)
	}
	nonce, err := c.out.next(n)
	if err != nil {
		c.werr = err
		return err
	}
	start := len(c.wbuf)
	c.wbuf = slices.Grow(c.wbuf, headerSize+n+aesgcm.Overhead)
	c.wbuf = binary.BigEndian.AppendUint32(c.wbuf, uint32(n))
	body := len(c.wbuf)
	for _, p := range parts {
		c.wbuf = append(c.wbuf, p...)
	}
	// In place: the plaintext is exactly the spare capacity of dst.
	c.wbuf = c.out.gcm.Seal(c.wbuf[:body], nonce, c.wbuf[body:], c.wbuf[start:body])
	return nil
}

// Flush writes the records appended since the last Flush, in one write.
func (c *Conn) Flush() error {
	if c.werr != nil {
		return c.werr
	}
	if len(c.wbuf) == 0 {
		return nil
	}
	_, err := c.raw.Write(c.wbuf)
	c.wbuf = c.wbuf[:0]
	if err != nil {
		c.werr = fmt.Errorf("channel: write: %w", err)
	}
	return c.werr
}

// Write writes p as one record.
func (c *Conn) Write(p []byte) (int, error) {
	if err := c.AppendRecord(p); err != nil {
		return 0, err
	}
	if err := c.Flush(); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close closes the connection. No TLS close_notify is sent: crypto/tls
// would write it where records belong.
func (c *Conn) Close() error                       { return c.raw.Close() }
func (c *Conn) LocalAddr() net.Addr                { return c.raw.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr               { return c.raw.RemoteAddr() }
func (c *Conn) SetDeadline(t time.Time) error      { return c.raw.SetDeadline(t) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.raw.SetReadDeadline(t) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.raw.SetWriteDeadline(t) }
