package wire

import (
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/lifeboat-dr/lifeboat/internal/crc32c"
)

const (
	// stageSize is the size of the pooled buffers small pieces are
	// gathered in.
	stageSize = 64 << 10
	// copyBelow: payload pieces shorter than this are copied into the
	// staging buffer; longer ones are handed to the kernel as they are.
	// Copying 4 KiB is far cheaper than the syscall (plain TCP) or the
	// separate TLS record (crypto/tls writes every Write as at least one
	// record) that sending it on its own would cost.
	copyBelow = 16 << 10
)

var stagePool = sync.Pool{New: func() any {
	b := make([]byte, 0, stageSize)
	return &b
}}

// Writer writes frames to a stream. Each Write method hands the complete
// frame to the underlying writer before returning (and, for a
// NewBufferedWriter, flushes it); there is nothing left to flush. A
// frame's header and small payload pieces are gathered in a pooled
// buffer and large pieces are passed by reference, all in one
// net.Buffers.WriteTo, which is a single writev on a *net.TCPConn and a
// short sequence of Writes on any other writer (such as a *tls.Conn). On
// a RecordWriter a frame is two records written by one Flush.
//
// A Writer is safe for concurrent use; frames are never interleaved. After
// the underlying writer fails, the stream is broken (a frame may be half
// written) and every later call returns the same error.
type Writer struct {
	mu      sync.Mutex
	w       io.Writer
	rec     RecordWriter // w as a stream of records, or nil
	commit  func() error // NewBufferedWriter's flush
	vec     [][]byte
	bufs    net.Buffers
	scratch []byte    // encodes control messages
	one     [1][]byte // single
	head    [1][]byte // writeRecords
	err     error
}

// RecordWriter is a stream of sealed records (internal/channel's Conn):
// AppendRecord seals the concatenation of parts as one record, which the
// next Flush writes. A Writer writes each frame as two records, header
// and payload (none for an empty payload), in one Flush; see
// RecordReader.
type RecordWriter interface {
	AppendRecord(parts ...[]byte) error
	Flush() error
}

// NewWriter returns a Writer that writes frames to w, as records if w is
// a RecordWriter.
func NewWriter(w io.Writer) *Writer {
	rw, _ := w.(RecordWriter)
	return &Writer{w: w, rec: rw}
}

// NewBufferedWriter returns a Writer for a w that holds back what it is
// given until flush is called: each frame is flushed once written whole,
// so that a frame handed to a *tls.Conn in many records leaves in a few
// large writes rather than one system call a record.
func NewBufferedWriter(w io.Writer, flush func() error) *Writer {
	return &Writer{w: w, commit: flush}
}

// WriteFrame writes one frame whose payload is the concatenation of
// payload. The slices are only read, and not retained after the call.
func (w *Writer) WriteFrame(t Type, flags uint16, payload ...[]byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeLocked(t, flags, payload)
}

// WriteBatch writes b as a Batch frame. b is not modified; call b.Reset
// before reusing it.
func (w *Writer) WriteBatch(b *BatchBuilder) error {
	if b.Count() == 0 {
		return fmt.Errorf("%w: batch has no records", ErrMalformed)
	}
	parts := b.parts()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeLocked(TypeBatch, 0, parts)
}

// WriteHello writes a Hello frame.
func (w *Writer) WriteHello(h *Hello) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeMessage(TypeHello, h.AppendBinary)
}

// WriteHelloAck writes a HelloAck frame.
func (w *Writer) WriteHelloAck(a *HelloAck) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeMessage(TypeHelloAck, a.AppendBinary)
}

// WriteMarker writes a Marker frame.
func (w *Writer) WriteMarker(m Marker) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scratch, _ = m.AppendBinary(w.scratch[:0])
	return w.writeLocked(TypeMarker, 0, w.single(w.scratch))
}

// WriteAck writes an Ack frame saying that every record up to and including
// seq is durable.
func (w *Writer) WriteAck(seq uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scratch, _ = Ack{Seq: seq}.AppendBinary(w.scratch[:0])
	return w.writeLocked(TypeAck, 0, w.single(w.scratch))
}

// WriteRecoverable writes a Recoverable frame.
func (w *Writer) WriteRecoverable(r Recoverable) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scratch, _ = r.AppendBinary(w.scratch[:0])
	return w.writeLocked(TypeRecoverable, 0, w.single(w.scratch))
}

// WriteBackpressure writes a Backpressure frame granting window bytes of
// unacknowledged batch payload (0: stop sending batches).
func (w *Writer) WriteBackpressure(window uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scratch, _ = Backpressure{Window: window}.AppendBinary(w.scratch[:0])
	return w.writeLocked(TypeBackpressure, 0, w.single(w.scratch))
}

// WriteError writes an Error frame. The sender should close the stream
// afterwards.
func (w *Writer) WriteError(e Error) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.writeMessage(TypeError, e.AppendBinary)
}

func (w *Writer) writeMessage(t Type, appendTo func([]byte) ([]byte, error)) error {
	b, err := appendTo(w.scratch[:0])
	if err != nil {
		return fmt.Errorf("wire: encode %s: %w", t, err)
	}
	w.scratch = b
	return w.writeLocked(t, 0, w.single(b))
}

// writeLocked writes one frame. w.mu must be held.
func (w *Writer) writeLocked(t Type, flags uint16, parts [][]byte) error {
	if w.err != nil {
		return w.err
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > MaxPayload {
		return fmt.Errorf("%w: %s frame of %d bytes, limit %d", ErrTooLarge, t, n, MaxPayload)
	}

	sp := stagePool.Get().(*[]byte)
	defer stagePool.Put(sp)
	st := (*sp)[:HeaderSize]
	crc := putHeader(st, t, flags, n)
	for _, p := range parts {
		crc = crc32c.Update(crc, p)
	}
	le.PutUint32(st[12:], crc)
	if w.rec != nil {
		return w.writeRecords(t, st, parts, n)
	}

	// Gather: runs of small pieces become one slice of st; large pieces go
	// out by reference. st never reallocates (it is flushed when full), so
	// the slices of it in vec stay valid.
	vec := w.vec[:0]
	mark := 0 // start of the part of st not yet in vec
	for _, p := range parts {
		switch {
		case len(p) == 0:
		case len(p) < copyBelow:
			if len(st)+len(p) > cap(st) {
				vec = append(vec, st[mark:])
				if err := w.flush(t, vec); err != nil {
					return err
				}
				vec, st, mark = vec[:0], st[:0], 0
			}
			st = append(st, p...)
		default:
			if len(st) > mark {
				vec = append(vec, st[mark:])
				mark = len(st)
			}
			vec = append(vec, p)
		}
	}
	if len(st) > mark {
		vec = append(vec, st[mark:])
	}
	if err := w.flush(t, vec); err != nil {
		return err
	}
	if w.commit != nil {
		if err := w.commit(); err != nil {
			w.err = fmt.Errorf("wire: write %s frame: %w", t, err)
			return w.err
		}
	}
	return nil
}

// single returns b as the only part of a payload, without allocating:
// a slice literal would escape through RecordWriter's interface call.
func (w *Writer) single(b []byte) [][]byte {
	w.one[0] = b
	return w.one[:]
}

// WriteRaw writes frame, an encoded frame (header and payload), as it
// is, unchecked: for tests that send a damaged frame.
func (w *Writer) WriteRaw(frame []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return w.err
	}
	if w.rec != nil && len(frame) >= HeaderSize {
		return w.writeRecords(Type(frame[5]), frame[:HeaderSize], [][]byte{frame[HeaderSize:]}, len(frame)-HeaderSize)
	}
	_, err := w.w.Write(frame)
	if err == nil && w.commit != nil {
		err = w.commit()
	}
	if err != nil {
		w.err = fmt.Errorf("wire: write raw frame: %w", err)
	}
	return w.err
}

func (w *Writer) writeRecords(t Type, hdr []byte, parts [][]byte, n int) error {
	w.head[0] = hdr
	err := w.rec.AppendRecord(w.head[:]...)
	if err == nil && n > 0 {
		err = w.rec.AppendRecord(parts...)
	}
	if err == nil {
		err = w.rec.Flush()
	}
	w.head[0], w.one[0] = nil, nil // they may point into a pooled buffer
	if err != nil {
		w.err = fmt.Errorf("wire: write %s frame: %w", t, err)
	}
	return w.err
}

func (w *Writer) flush(t Type, vec [][]byte) error {
	w.bufs = vec
	_, err := w.bufs.WriteTo(w.w)
	clear(vec) // drop references to the caller's data
	w.vec = vec[:0]
	if err != nil {
		w.err = fmt.Errorf("wire: write %s frame: %w", t, err)
		return w.err
	}
	return nil
}
