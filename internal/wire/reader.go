package wire

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/lifeboat-dr/lifeboat/internal/crc32c"
)

const (
	readBufferSize = 32 << 10
	// growStep is the first payload buffer size; beyond it the buffer grows
	// only as payload bytes actually arrive (see readPayload).
	growStep = 64 << 10
)

// Reader reads frames from a stream. It reuses one payload buffer, so Next
// does not allocate once the buffer has grown to the largest frame seen.
// A Reader is not safe for concurrent use.
type Reader struct {
	br  *bufio.Reader
	rec RecordReader // instead of br, for a stream of records
	max int
	hdr [HeaderSize]byte
	// scratch receives a header record: room for its tag.
	scratch [HeaderSize + 32]byte
	buf     []byte
	err     error
	crc     uint32       // of the payload record being read
	sum     func([]byte) // adds to crc
}

// RecordReader is a stream of sealed records (internal/channel's Conn).
// ReadRecord returns the next record's plaintext, which must be want
// bytes long, opened in place in buf
// when buf's capacity allows (buf[:cap(buf)] is scratch), else in a buffer
// of its own valid until its next call; io.EOF between records. each, if
// not nil, is given the plaintext piece by piece as it is opened (the
// Reader computes the frame's CRC there, while the piece is in the CPU
// cache).
//
// A Reader reads each frame from it as two records, the header and then
// the payload (if any), as a Writer on a RecordWriter writes them: the
// header is authenticated before the payload is read, and the payload is
// opened where the caller wants it stored.
type RecordReader interface {
	ReadRecord(buf []byte, want int, each func([]byte)) ([]byte, error)
}

// NewReader returns a Reader for r that rejects payloads larger than
// maxPayload bytes; maxPayload <= 0 or > MaxPayload means MaxPayload. The
// Reader buffers r, so it may read past the last frame it returns; an r
// that is a RecordReader is read record by record instead.
func NewReader(r io.Reader, maxPayload int) *Reader {
	if maxPayload <= 0 || maxPayload > MaxPayload {
		maxPayload = MaxPayload
	}
	if rr, ok := r.(RecordReader); ok {
		rd := &Reader{rec: rr, max: maxPayload}
		rd.sum = func(p []byte) { rd.crc = crc32c.Update(rd.crc, p) }
		return rd
	}
	return &Reader{br: bufio.NewReaderSize(r, readBufferSize), max: maxPayload}
}

// Reset discards any state and makes the Reader read from rd, keeping its
// buffers. rd is read as a byte stream, never as records.
func (r *Reader) Reset(rd io.Reader) {
	if r.br == nil {
		r.br = bufio.NewReaderSize(rd, readBufferSize)
	}
	r.br.Reset(rd)
	r.rec = nil
	r.err = nil
}

// Next reads and verifies the next frame. The returned Payload aliases the
// Reader's buffer and is valid only until the next call to Next or Reset;
// copy whatever must outlive it.
//
// Next returns io.EOF, unwrapped, if the stream ends cleanly between frames.
// Any other error means the stream can no longer be trusted (ErrBadMagic,
// ErrVersion, ErrChecksum, ErrTooLarge, ErrTruncated, or the underlying
// reader's error); it is sticky, and every later call returns it again.
// Unknown frame types are returned, not rejected, so that callers can reply
// with a protocol error that names them.
func (r *Reader) Next() (Frame, error) {
	return r.NextInto(nil)
}

// NextInto is Next, but room, given a frame's type and payload length
// once its header has been checked, may return a buffer of at least
// HeaderSize+n bytes: the frame, header then payload, is read into it,
// and the returned Payload aliases it. A nil room, or a nil buffer from
// it, reads into the Reader's own buffer. The caller's buffer saves a
// copy when the frame is to be stored as received (see Frame.AppendTo).
// From a RecordReader the payload is opened in place only if the buffer's
// capacity holds the record's tag (16 bytes) past the frame, which it
// overwrites; without that room it is opened elsewhere and copied in.
func (r *Reader) NextInto(room func(t Type, n int) []byte) (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.next(room)
	if err != nil {
		r.err = err
	}
	return f, err
}

func (r *Reader) next(room func(t Type, n int) []byte) (Frame, error) {
	if r.rec != nil {
		return r.nextRecords(room)
	}
	h := r.hdr[:]
	if _, err := io.ReadFull(r.br, h); err != nil {
		if err == io.EOF {
			return Frame{}, io.EOF
		}
		return Frame{}, readError("header", err)
	}
	t, n, err := r.checkHeader(h)
	if err != nil {
		return Frame{}, err
	}
	var p []byte
	if buf := roomFor(room, t, n); buf != nil {
		copy(buf, h)
		p = buf[HeaderSize : HeaderSize+n]
		_, err = io.ReadFull(r.br, p)
	} else {
		p, err = r.readPayload(n)
	}
	if err != nil {
		return Frame{}, readError(t.String()+" payload", err)
	}
	return r.verify(t, n, p)
}

// nextRecords reads a frame as a header record and a payload record.
func (r *Reader) nextRecords(room func(t Type, n int) []byte) (Frame, error) {
	h, err := r.rec.ReadRecord(r.scratch[:0], HeaderSize, nil)
	if err != nil {
		return Frame{}, err
	}
	if len(h) != HeaderSize {
		return Frame{}, fmt.Errorf("%w: a record of %d bytes where a %d-byte frame header belongs", ErrMalformed, len(h), HeaderSize)
	}
	copy(r.hdr[:], h)
	t, n, err := r.checkHeader(r.hdr[:])
	if err != nil {
		return Frame{}, err
	}
	var p []byte
	r.crc = crc32c.Update(0, r.hdr[:12])
	if n > 0 {
		buf := roomFor(room, t, n)
		if buf != nil {
			p, err = r.rec.ReadRecord(buf[HeaderSize:HeaderSize+n], n, r.sum)
		} else {
			p, err = r.rec.ReadRecord(nil, n, r.sum)
		}
		if err == io.EOF {
			err = fmt.Errorf("%w: stream ended before the %s payload: %w", ErrTruncated, t, io.ErrUnexpectedEOF)
		}
		if err != nil {
			return Frame{}, err
		}
		if len(p) != n {
			return Frame{}, fmt.Errorf("%w: %s frame of %d bytes came in a record of %d", ErrMalformed, t, n, len(p))
		}
		if buf != nil {
			copy(buf, r.hdr[:])
			if &p[0] != &buf[HeaderSize] { // did not fit in place
				p = buf[HeaderSize : HeaderSize+copy(buf[HeaderSize:], p)]
			}
		}
	}
	return r.check(t, n, p, r.crc)
}

// checkHeader checks a frame header and returns its type and length.
func (r *Reader) checkHeader(h []byte) (Type, int, error) {
	if m := le.Uint32(h[0:]); m != Magic {
		return 0, 0, fmt.Errorf("%w (got %#08x, want %#08x)", ErrBadMagic, m, Magic)
	}
	if v := h[4]; v != Version {
		return 0, 0, fmt.Errorf("%w %d (this build speaks version %d)", ErrVersion, v, Version)
	}
	t := Type(h[5])
	n := le.Uint32(h[8:])
	// Checked before any allocation: the length is not yet covered by a
	// verified CRC.
	if uint64(n) > uint64(r.max) {
		return 0, 0, fmt.Errorf("%w: %s frame claims %d bytes, limit %d", ErrTooLarge, t, n, r.max)
	}
	return t, int(n), nil
}

// verify checks the CRC of the frame whose header is r.hdr.
func (r *Reader) verify(t Type, n int, p []byte) (Frame, error) {
	return r.check(t, n, p, crc32c.Update(crc32c.Update(0, r.hdr[:12]), p))
}

// check compares crc, computed over r.hdr's first 12 bytes and payload p,
// with the header's.
func (r *Reader) check(t Type, n int, p []byte, crc uint32) (Frame, error) {
	h := r.hdr[:]
	if want := le.Uint32(h[12:]); crc != want {
		return Frame{}, fmt.Errorf("%w (%s frame of %d bytes: header says %#08x, computed %#08x)", ErrChecksum, t, n, want, crc)
	}
	return Frame{Type: t, Flags: le.Uint16(h[6:]), Payload: p, crc: crc, verified: true}, nil
}

// roomFor returns room's buffer for a frame, nil if there is none or it
// is too short.
func roomFor(room func(t Type, n int) []byte, t Type, n int) []byte {
	if room == nil {
		return nil
	}
	if b := room(t, n); len(b) >= HeaderSize+n {
		return b
	}
	return nil
}

// readPayload reads n bytes into r.buf. When the buffer must grow, it grows
// step by step as bytes arrive instead of trusting the (not yet verified)
// length, so a peer that lies about the length makes us hold at most about
// twice what it actually sent, not MaxPayload.
func (r *Reader) readPayload(n int) ([]byte, error) {
	if n <= cap(r.buf) {
		p := r.buf[:n]
		_, err := io.ReadFull(r.br, p)
		return p, err
	}
	p := r.buf[:0]
	for len(p) < n {
		if len(p) == cap(p) {
			np := make([]byte, len(p), min(max(2*cap(p), growStep), n))
			copy(np, p)
			p = np
			r.buf = np
		}
		m, err := io.ReadFull(r.br, p[len(p):cap(p)])
		p = p[:len(p)+m]
		if err != nil {
			return nil, err
		}
	}
	return p, nil
}

func readError(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: stream ended inside the %s: %w", ErrTruncated, what, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("wire: read frame %s: %w", what, err)
}
