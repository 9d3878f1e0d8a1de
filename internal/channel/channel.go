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
	"time"

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
	// plainBuffer reads a plain TLS stream (a peer without records).
	plainBuffer = 256 << 10
)

// ErrAuth is returned for a record that fails authentication: it was
// changed, reordered or replayed in transit, or the peer does not hold
// the keys.
var ErrAuth = errors.New("channel: record failed authentication (changed, replayed or cut in transit)")

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

// Client runs a TLS handshake as a client over raw. It returns a *Conn if
// the server selected Protocol and the *tls.Conn otherwise; either has
// ConnectionState. On error the caller closes raw.
func Client(ctx context.Context, raw net.Conn, cfg *tls.Config) (net.Conn, error) {
	return handshake(ctx, raw, cfg, false)
}

// Server runs a TLS handshake as a server over raw, as Client does.
func Server(ctx context.Context, raw net.Conn, cfg *tls.Config) (net.Conn, error) {
	return handshake(ctx, raw, cfg, true)
}

func handshake(ctx context.Context, raw net.Conn, cfg *tls.Config, server bool) (net.Conn, error) {
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
	km, err := cs.ExportKeyingMaterial(exporterLabel, nil, 2*(aesgcm.KeySize+aesgcm.NonceSize))
	if err != nil {
		return nil, fmt.Errorf("channel: export keys: %w", err)
	}
	defer clear(km)
	const k, n = aesgcm.KeySize, aesgcm.NonceSize
	up := keys{km[:k], km[2*k : 2*k+n]}   // client → server
	down := keys{km[k : 2*k], km[2*k+n:]} // server → client
	if server {
		return newConn(raw, t, hs.br, up, down)
	}
	return newConn(raw, t, hs.br, down, up)
}

func bufioReader(raw net.Conn) *bufio.Reader { return bufio.NewReaderSize(raw, readBuffer) }

// keys are one direction's key and IV.
type keys struct{ key, iv []byte }

func newConn(raw net.Conn, t *tls.Conn, br *bufio.Reader, in, out keys) (*Conn, error) {
	c := &Conn{raw: raw, tls: t, br: br}
	if err := c.in.init(in.key, in.iv); err != nil {
		return nil, err
	}
	if err := c.out.init(out.key, out.iv); err != nil {
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

// direction is one way's key and record count.
type direction struct {
	gcm   *aesgcm.GCM
	iv    [aesgcm.NonceSize]byte
	seq   uint64
	nonce [aesgcm.NonceSize]byte // the last record's (here, not on the stack, which would escape)
}

func (d *direction) init(key, iv []byte) error {
	g, err := aesgcm.New(key)
	if err != nil {
		return err
	}
	d.gcm = g
	copy(d.iv[:], iv)
	return nil
}

// next returns the nonce of the next record and counts the record.
func (d *direction) next() ([]byte, error) {
	if d.seq == ^uint64(0) {
		return nil, errors.New("channel: record sequence exhausted")
	}
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
	tls *tls.Conn // read only for the alert of a server that refused us
	br  *bufio.Reader
	in  direction
	out direction

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

// ReadRecord reads the next record and opens it. If buf has the capacity
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
func (c *Conn) ReadRecord(buf []byte, each func([]byte)) ([]byte, error) {
	if c.rerr != nil {
		return nil, c.rerr
	}
	p, err := c.readRecord(buf, each)
	if err != nil {
		c.rerr = err
	}
	return p, err
}

func (c *Conn) readRecord(buf []byte, each func([]byte)) ([]byte, error) {
	h, err := c.br.Peek(headerSize)
	if len(h) > 0 && !c.got && h[0] >= 20 && h[0] <= 24 {
		// A TLS record (a content type where our length's top byte,
		// at most 1, belongs): a server that refused our certificate
		// after our side of the handshake ended sends an alert.
		return nil, c.tlsError()
	}
	if err != nil {
		if err == io.EOF && len(h) == 0 {
			return nil, io.EOF
		}
		return nil, readError("header", err)
	}
	n := int(binary.BigEndian.Uint32(h))
	if n > MaxRecord {
		return nil, fmt.Errorf("%w: record %d claims %d bytes, limit %d", ErrAuth, c.in.seq, n, MaxRecord)
	}
	copy(c.aad[:], h)
	c.br.Discard(headerSize)
	need := n + aesgcm.Overhead
	var b []byte
	if cap(buf) >= need {
		b = buf[:need]
	} else {
		if cap(c.rbuf) < need {
			c.rbuf = make([]byte, need)
		}
		b = c.rbuf[:need]
	}
	// What the header's read brought in is copied; the rest comes
	// straight from the socket into place.
	k, _ := c.br.Read(b[:min(need, c.br.Buffered())])
	if _, err := io.ReadFull(c.raw, b[k:]); err != nil {
		return nil, readError("body", err)
	}
	nonce, err := c.in.next()
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

func readError(what string, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("channel: stream ended inside a record %s: %w", what, err)
}

// Read reads plaintext, record after record. It copies; ReadRecord is for
// readers that know record boundaries.
func (c *Conn) Read(p []byte) (int, error) {
	for len(c.left) == 0 {
		r, err := c.ReadRecord(nil, nil)
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
	nonce, err := c.out.next()
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
