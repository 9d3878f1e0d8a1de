package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func testHello() *Hello {
	return &Hello{
		ProtocolVersion: 1,
		Machine:         "web01.example.com",
		Disks: []DiskState{
			{Name: "sda", Size: 64 << 30, Generation: Generation{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, LastAckedSeq: 1234},
			{Name: "nvme0n1", Size: 1 << 40, Generation: Generation{0xff}, LastAckedSeq: 0},
		},
	}
}

func testHelloAck() *HelloAck {
	return &HelloAck{
		ProtocolVersion: 1,
		Disks: []DiskAgreement{
			{Name: "sda", Action: SyncResume, Generation: Generation{1, 2, 3}, ResumeFrom: 1235},
			{Name: "nvme0n1", Action: SyncFull},
			{Name: "sdb", Action: SyncChecksum, Generation: Generation{9}},
		},
	}
}

// testRecords returns records of every op, with data of assorted sizes
// around the Writer's copy threshold.
func testRecords() []Record {
	data := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	return []Record{
		{Seq: 100, Disk: 0, Op: OpWrite, Offset: 4096, Length: 512, Data: data(512, 1)},
		{Seq: 101, Disk: 1, Op: OpZero, Offset: 1 << 20, Length: 1 << 16},
		{Seq: 102, Disk: 1, Op: OpDiscard, Offset: 0, Length: 4096},
		MarkerRecord(Marker{Seq: 103, UnixNano: 1_700_000_000_123_456_789, Kind: MarkerCrashConsistent}),
		{Seq: 105, Disk: 0, Op: OpWrite, Flags: 0x80, Offset: 8192, Length: copyBelow, Data: data(copyBelow, 2)},
		{Seq: 106, Disk: 0, Op: OpWrite, Offset: math.MaxUint64 - 100, Length: 100, Data: data(100, 3)},
		{Seq: 200, Disk: 2, Op: OpWrite, Offset: 0, Length: 100 << 10, Data: data(100<<10, 4)},
	}
}

func testBatch(t testing.TB, recs []Record) *BatchBuilder {
	t.Helper()
	var b BatchBuilder
	for _, r := range recs {
		if err := b.Add(r); err != nil {
			t.Fatalf("Add(%d): %v", r.Seq, err)
		}
	}
	return &b
}

// writeAll writes one frame of every type.
func writeAll(t testing.TB, w *Writer) {
	t.Helper()
	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	check(w.WriteHello(testHello()))
	check(w.WriteHelloAck(testHelloAck()))
	check(w.WriteBatch(testBatch(t, testRecords())))
	check(w.WriteMarker(Marker{Seq: 200, UnixNano: -5, Kind: MarkerAppConsistent}))
	check(w.WriteAck(200))
	check(w.WriteRecoverable(Recoverable{UnixNano: 1_700_000_000_123_456_789}))
	check(w.WriteBackpressure(0))
	check(w.WriteError(Error{Code: CodeVersion, Message: "no common protocol version: agent speaks 1..1, server 2..3"}))
}

// readAll decodes a stream written by writeAll and checks every message.
func readAll(t testing.TB, r *Reader) {
	t.Helper()
	next := func(want Type) []byte {
		t.Helper()
		f, err := r.Next()
		if err != nil {
			t.Fatalf("Next (want %s): %v", want, err)
		}
		if f.Type != want || f.Flags != 0 {
			t.Fatalf("got %s frame with flags %#x, want %s", f.Type, f.Flags, want)
		}
		return f.Payload
	}

	var h Hello
	if err := h.UnmarshalBinary(next(TypeHello)); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&h, testHello()) {
		t.Errorf("hello: got %+v, want %+v", h, testHello())
	}
	var ha HelloAck
	if err := ha.UnmarshalBinary(next(TypeHelloAck)); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&ha, testHelloAck()) {
		t.Errorf("hello-ack: got %+v, want %+v", ha, testHelloAck())
	}

	batch, err := DecodeBatch(next(TypeBatch))
	if err != nil {
		t.Fatal(err)
	}
	want := testRecords()
	if batch.FirstSeq != 100 || int(batch.Count) != len(want) {
		t.Errorf("batch header: first %d count %d", batch.FirstSeq, batch.Count)
	}
	it := batch.Records()
	i := 0
	for ; it.Next(); i++ {
		got := *it.Record()
		if i >= len(want) || !eqHeader(got, want[i]) || !bytes.Equal(got.Data, want[i].Data) {
			t.Errorf("record %d: got %+v, want %+v", i, summary(got), summary(want[i]))
		}
	}
	if i != len(want) {
		t.Errorf("iterated %d records, want %d", i, len(want))
	}
	if m := want[3]; m.Marker() != (Marker{Seq: 103, UnixNano: 1_700_000_000_123_456_789, Kind: MarkerCrashConsistent}) {
		t.Errorf("marker record: %+v", m.Marker())
	}

	var m Marker
	if err := m.UnmarshalBinary(next(TypeMarker)); err != nil || m != (Marker{Seq: 200, UnixNano: -5, Kind: MarkerAppConsistent}) {
		t.Errorf("marker: %+v %v", m, err)
	}
	var a Ack
	if err := a.UnmarshalBinary(next(TypeAck)); err != nil || a.Seq != 200 {
		t.Errorf("ack: %+v %v", a, err)
	}
	var rc Recoverable
	if err := rc.UnmarshalBinary(next(TypeRecoverable)); err != nil || rc.UnixNano != 1_700_000_000_123_456_789 {
		t.Errorf("recoverable: %+v %v", rc, err)
	}
	bp := Backpressure{Window: 1}
	if err := bp.UnmarshalBinary(next(TypeBackpressure)); err != nil || bp.Window != 0 {
		t.Errorf("backpressure: %+v %v", bp, err)
	}
	var e Error
	if err := e.UnmarshalBinary(next(TypeError)); err != nil || e.Code != CodeVersion || !strings.HasPrefix(e.Message, "no common protocol version") {
		t.Errorf("error: %+v %v", e, err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Errorf("Next at end of stream: %v, want io.EOF", err)
	}
}

func eqHeader(a, b Record) bool {
	return a.Seq == b.Seq && a.Disk == b.Disk && a.Op == b.Op && a.Flags == b.Flags && a.Offset == b.Offset && a.Length == b.Length
}

func summary(r Record) string {
	return fmt.Sprintf("{seq %d disk %d %s flags %#x off %d len %d data %d bytes}", r.Seq, r.Disk, r.Op, r.Flags, r.Offset, r.Length, len(r.Data))
}

func TestRoundTripEveryType(t *testing.T) {
	var buf bytes.Buffer
	writeAll(t, NewWriter(&buf))
	readAll(t, NewReader(&buf, 0))
}

// TestRoundTripTCP exercises the writev path (a *net.TCPConn) with a batch
// that has more small pieces than fit in one staging buffer.
func TestRoundTripTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	var recs []Record
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(i * 31)
	}
	// 1 MiB of 4 KiB writes (copied) then three 1 MiB writes (by reference).
	for i := range 256 {
		recs = append(recs, Record{Seq: uint64(i + 1), Op: OpWrite, Offset: uint64(i) * 4096, Length: 4096, Data: data[i*4096 : (i+1)*4096]})
	}
	for i := 1; i < 4; i++ {
		recs = append(recs, Record{Seq: uint64(1000 + i), Disk: 3, Op: OpWrite, Offset: uint64(i) << 20, Length: 1 << 20, Data: data[i<<20 : (i+1)<<20]})
	}

	errc := make(chan error, 1)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			errc <- err
			return
		}
		defer c.Close()
		w := NewWriter(c)
		b := testBatch(t, recs)
		for range 3 {
			if err := w.WriteBatch(b); err != nil {
				errc <- err
				return
			}
		}
		writeAll(t, w)
		errc <- nil
	}()

	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	r := NewReader(c, 0)
	for range 3 {
		f, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		batch, err := DecodeBatch(f.Payload)
		if err != nil {
			t.Fatal(err)
		}
		it, i := batch.Records(), 0
		for ; it.Next(); i++ {
			got := it.Record()
			if got.Seq != recs[i].Seq || got.Offset != recs[i].Offset || !bytes.Equal(got.Data, recs[i].Data) {
				t.Fatalf("record %d differs: %s", i, summary(*got))
			}
		}
		if i != len(recs) {
			t.Fatalf("got %d records, want %d", i, len(recs))
		}
	}
	readAll(t, r)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentWriters(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	var wg sync.WaitGroup
	const goroutines, each = 4, 200
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				seq := uint64(g*each + i)
				var err error
				if i%2 == 0 {
					err = w.WriteAck(seq)
				} else {
					err = w.WriteFrame(TypeMarker, 0, []byte{1, 2, 3}, bytes.Repeat([]byte{byte(g)}, copyBelow+i))
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	r := NewReader(&buf, 0)
	n := 0
	for {
		_, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("frame %d: %v", n, err)
		}
		n++
	}
	if n != goroutines*each {
		t.Fatalf("read %d frames, want %d", n, goroutines*each)
	}
}

// TestEverySingleByteCorruptionDetected flips bits in every byte of a frame of
// each type and requires the Reader to fail rather than return a frame.
func TestEverySingleByteCorruptionDetected(t *testing.T) {
	var all bytes.Buffer
	writeAll(t, NewWriter(&all))
	stream := all.Bytes()

	// Split the stream into single frames.
	var frames [][]byte
	for off := 0; off < len(stream); {
		n := HeaderSize + int(le.Uint32(stream[off+8:]))
		frames = append(frames, stream[off:off+n])
		off += n
	}
	if len(frames) != 8 {
		t.Fatalf("split into %d frames, want 8", len(frames))
	}
	for _, frame := range frames {
		typ := Type(frame[5])
		// The 100 KiB batch record is checked at a stride; its bytes are all
		// covered by the same CRC.
		step := 1
		if len(frame) > 4096 {
			step = 61
		}
		for i := 0; i < len(frame); i += step {
			for _, x := range []byte{0x01, 0x80, 0xff} {
				bad := bytes.Clone(frame)
				bad[i] ^= x
				r := NewReader(bytes.NewReader(bad), 0)
				f, err := r.Next()
				if err == nil {
					t.Fatalf("%s frame: byte %d ^ %#x not detected (read %s frame)", typ, i, x, f.Type)
				}
				if !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrVersion) &&
					!errors.Is(err, ErrTruncated) && !errors.Is(err, ErrTooLarge) {
					t.Fatalf("%s frame: byte %d ^ %#x: unexpected error %v", typ, i, x, err)
				}
				if i >= HeaderSize && !strings.Contains(err.Error(), "corrupt frame: crc mismatch") {
					t.Fatalf("%s frame: payload byte %d: error %q does not say crc mismatch", typ, i, err)
				}
			}
		}
	}
}

func TestReaderErrors(t *testing.T) {
	frame, err := AppendFrame(nil, TypeAck, 0, le.AppendUint64(nil, 7))
	if err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(frame)) }
	withCRC := func(b []byte) []byte { // re-seal a modified header
		n := int(le.Uint32(b[8:]))
		out, _ := AppendFrame(nil, Type(b[5]), le.Uint16(b[6:]), b[HeaderSize:HeaderSize+n])
		out[4] = b[4]
		return out
	}

	tests := []struct {
		name  string
		input []byte
		max   int
		is    error
		text  string
	}{
		{"bad magic", mutate(func(b []byte) []byte { copy(b, "HTTP"); return b }), 0, ErrBadMagic, "bad magic"},
		{"version", mutate(func(b []byte) []byte { b[4] = 2; return withCRC(b) }), 0, ErrVersion, "unsupported frame version 2"},
		{"crc", mutate(func(b []byte) []byte { b[HeaderSize] ^= 1; return b }), 0, ErrChecksum, "corrupt frame: crc mismatch"},
		{"truncated header", frame[:10], 0, ErrTruncated, "inside the header"},
		{"truncated payload", frame[:HeaderSize+3], 0, ErrTruncated, "inside the ack payload"},
		{"oversize", mutate(func(b []byte) []byte { le.PutUint32(b[8:], MaxPayload+1); return b }), 0, ErrTooLarge, "claims 16777217 bytes, limit 16777216"},
		{"over custom limit", frame, 4, ErrTooLarge, "limit 4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tt.input), tt.max)
			_, err := r.Next()
			if !errors.Is(err, tt.is) || !strings.Contains(err.Error(), tt.text) {
				t.Fatalf("got %v, want %v containing %q", err, tt.is, tt.text)
			}
			if _, err2 := r.Next(); err2 != err {
				t.Errorf("error not sticky: second Next returned %v", err2)
			}
			if cap(r.buf) > growStep {
				t.Errorf("reader allocated %d bytes for a rejected frame", cap(r.buf))
			}
		})
	}
	if _, err := NewReader(bytes.NewReader(nil), 0).Next(); err != io.EOF {
		t.Errorf("empty stream: %v, want io.EOF", err)
	}
	if _, err := NewReader(bytes.NewReader(frame[:5]), 0).Next(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated stream: %v does not wrap io.ErrUnexpectedEOF", err)
	}
}

// TestLyingLength: a header claiming a huge payload that never arrives must
// not make the Reader allocate the claimed size.
func TestLyingLength(t *testing.T) {
	hdr := make([]byte, HeaderSize)
	putHeader(hdr, TypeBatch, 0, MaxPayload)
	input := append(hdr, make([]byte, 100<<10)...)
	r := NewReader(bytes.NewReader(input), 0)
	if _, err := r.Next(); !errors.Is(err, ErrTruncated) {
		t.Fatalf("got %v, want truncated", err)
	}
	if c := cap(r.buf); c > 2*(100<<10) {
		t.Fatalf("reader grew its buffer to %d bytes for 100 KiB of input", c)
	}
}

func TestWriterLimits(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	big := make([]byte, MaxPayload/2+1)
	if err := w.WriteFrame(TypeBatch, 0, big, big); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversize frame: %v", err)
	}
	if err := w.WriteBatch(&BatchBuilder{}); !errors.Is(err, ErrMalformed) {
		t.Errorf("empty batch: %v", err)
	}
	if err := w.WriteHello(&Hello{Machine: ""}); err == nil || !strings.Contains(err.Error(), "empty machine name") {
		t.Errorf("hello without machine: %v", err)
	}
	if buf.Len() != 0 {
		t.Fatalf("rejected frames wrote %d bytes", buf.Len())
	}
	// Validation failures are not sticky.
	if err := w.WriteAck(1); err != nil {
		t.Fatal(err)
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.n > 0 {
		f.n--
		return len(p), nil
	}
	return 0, errors.New("connection reset")
}

func TestWriterErrorIsSticky(t *testing.T) {
	w := NewWriter(&failWriter{n: 1})
	if err := w.WriteAck(1); err != nil {
		t.Fatal(err)
	}
	err := w.WriteAck(2)
	if err == nil || !strings.Contains(err.Error(), "write ack frame: connection reset") {
		t.Fatalf("got %v", err)
	}
	if err2 := w.WriteBackpressure(5); err2 != err {
		t.Fatalf("error not sticky: %v", err2)
	}
}

func TestBatchBuilderRejects(t *testing.T) {
	tests := []struct {
		rec  Record
		text string
	}{
		{Record{Seq: 2, Op: OpWrite, Length: 4, Data: []byte{1}}, "Length 4 but 1 bytes of data"},
		{Record{Seq: 2, Op: OpWrite}, "empty write"},
		{Record{Seq: 2, Op: OpZero, Length: 8, Data: []byte{1}}, "zero carries 1 bytes"},
		{Record{Seq: 2, Op: OpDiscard, Offset: math.MaxUint64, Length: 1}, "overflows"},
		{Record{Seq: 2, Op: OpMarker, Flags: 9}, "unknown marker kind 9"},
		{Record{Seq: 2, Op: 0}, "unknown op 0"},
		{Record{Seq: 1, Op: OpZero, Length: 1}, "sequence 1 after 1"},
	}
	for _, tt := range tests {
		b := testBatch(t, []Record{{Seq: 1, Op: OpZero, Length: 1}})
		err := b.Add(tt.rec)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.text) {
			t.Errorf("Add(%s): got %v, want error containing %q", summary(tt.rec), err, tt.text)
		}
		if b.Count() != 1 || b.Len() != batchHeaderSize+RecordHeaderSize {
			t.Errorf("rejected Add changed the builder: count %d len %d", b.Count(), b.Len())
		}
	}

	// Filling a batch: ErrBatchFull leaves the builder intact.
	var b BatchBuilder
	chunk := make([]byte, 4<<20)
	seq := uint64(0)
	for {
		seq++
		err := b.Add(Record{Seq: seq, Op: OpWrite, Length: uint32(len(chunk)), Data: chunk})
		if errors.Is(err, ErrBatchFull) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if b.Count() != 3 || b.Len() != batchHeaderSize+3*(RecordHeaderSize+len(chunk)) {
		t.Errorf("full batch: count %d len %d", b.Count(), b.Len())
	}
	p, err := b.AppendBinary(nil)
	if err != nil || len(p) != b.Len() {
		t.Fatalf("AppendBinary: %d bytes, %v", len(p), err)
	}
	var empty BatchBuilder
	huge := make([]byte, MaxPayload)
	if err := empty.Add(Record{Seq: 1, Op: OpWrite, Length: uint32(len(huge)), Data: huge}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("record larger than any batch: %v", err)
	}
	b.Reset()
	if b.Count() != 0 || b.Len() != 0 {
		t.Errorf("Reset left count %d len %d", b.Count(), b.Len())
	}
}

func TestDecodeBatchRejects(t *testing.T) {
	good, err := testBatch(t, testRecords()[:3]).AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeBatch(good); err != nil {
		t.Fatal(err)
	}
	mutate := func(f func(b []byte)) []byte { b := bytes.Clone(good); f(b); return b }
	rec1 := batchHeaderSize + RecordHeaderSize + 512 // second record
	tests := []struct {
		name string
		p    []byte
		text string
	}{
		{"short", good[:5], "shorter than"},
		{"zero count", mutate(func(b []byte) { le.PutUint32(b[8:], 0) }), "no records"},
		{"huge count", mutate(func(b []byte) { le.PutUint32(b[8:], math.MaxUint32) }), "cannot fit"},
		{"count too small", mutate(func(b []byte) { le.PutUint32(b[8:], 2) }), "trailing bytes"},
		{"first seq", mutate(func(b []byte) { le.PutUint64(b[0:], 99) }), "batch starts at 99"},
		{"seq order", mutate(func(b []byte) { le.PutUint64(b[rec1:], 100) }), "sequence 100 after 100"},
		{"bad op", mutate(func(b []byte) { b[rec1+10] = 9 }), "unknown op 9"},
		{"write past end", mutate(func(b []byte) { le.PutUint32(b[batchHeaderSize+20:], 1<<20) }), "only"},
		{"truncated", good[:len(good)-1], "truncated header"},
	}
	for _, tt := range tests {
		_, err := DecodeBatch(tt.p)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.text) {
			t.Errorf("%s: got %v, want error containing %q", tt.name, err, tt.text)
		}
	}
}

func TestMessageDecodeRejects(t *testing.T) {
	hello, _ := testHello().AppendBinary(nil)
	tests := []struct {
		name string
		m    interface{ UnmarshalBinary([]byte) error }
		p    []byte
		text string
	}{
		{"hello truncated", &Hello{}, hello[:len(hello)-1], "truncated"},
		{"hello trailing", &Hello{}, append(bytes.Clone(hello), 0), "1 trailing bytes"},
		{"hello disk count", &Hello{}, []byte{1, 0, 1, 0, 'm', 0xff, 0xff}, "65535 disks, limit 1024"},
		{"hello disks cannot fit", &Hello{}, []byte{1, 0, 1, 0, 'm', 100, 0}, "cannot fit"},
		{"hello empty machine", &Hello{}, []byte{1, 0, 0, 0, 0, 0}, "empty machine name"},
		{"hello bad utf8", &Hello{}, []byte{1, 0, 1, 0, 0xff, 0, 0}, "not valid UTF-8"},
		{"hello-ack action", &HelloAck{}, append([]byte{1, 0, 1, 0, 1, 0, 'a', 9}, make([]byte, 24)...), "invalid sync action 9"},
		{"marker kind", &Marker{}, make([]byte, 17), "unknown marker kind 0"},
		{"marker withdrawn", &Marker{}, append(make([]byte, 16), byte(MarkerWithdrawn)), "unknown marker kind 4"},
		{"ack short", &Ack{}, make([]byte, 7), "truncated"},
		{"backpressure long", &Backpressure{}, make([]byte, 9), "trailing"},
		{"recoverable negative", &Recoverable{}, bytes.Repeat([]byte{0xff}, 8), "negative time"},
		{"error utf8", &Error{}, []byte{1, 0, 1, 0, 0xff}, "not valid UTF-8"},
		{"error long", &Error{}, []byte{1, 0, 0xff, 0xff}, "limit 4096"},
	}
	for _, tt := range tests {
		err := tt.m.UnmarshalBinary(tt.p)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tt.text) {
			t.Errorf("%s: got %v, want error containing %q", tt.name, err, tt.text)
		}
	}
}

func TestErrorMessageSanitised(t *testing.T) {
	long := strings.Repeat("é", MaxErrorMessageLen) // 2 bytes each
	p, _ := Error{Code: CodeInternal, Message: "bad \xff byte " + long}.AppendBinary(nil)
	var e Error
	if err := e.UnmarshalBinary(p); err != nil {
		t.Fatal(err)
	}
	if len(e.Message) > MaxErrorMessageLen || !strings.HasPrefix(e.Message, "bad \uFFFD byte éé") {
		t.Errorf("message %d bytes, prefix %q", len(e.Message), e.Message[:16])
	}
	if got := e.Error(); !strings.HasPrefix(got, "peer reported internal error: bad") {
		t.Errorf("Error() = %q", got)
	}
}

// TestSteadyStateAllocs checks the hot path (write a batch, read it, walk
// its records) allocates nothing once buffers have grown.
func TestSteadyStateAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts are meaningless under the race detector (the non-race run checks them)")
	}
	var buf bytes.Buffer
	w, r := NewWriter(&buf), NewReader(&buf, 0)
	b := testBatch(t, testRecords())
	var sum uint64
	roundTrip := func() {
		if err := w.WriteBatch(b); err != nil {
			t.Fatal(err)
		}
		if err := w.WriteAck(7); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			f, err := r.Next()
			if err != nil {
				t.Fatal(err)
			}
			if f.Type != TypeBatch {
				continue
			}
			batch, err := DecodeBatch(f.Payload)
			if err != nil {
				t.Fatal(err)
			}
			for it := batch.Records(); it.Next(); {
				sum += uint64(len(it.Record().Data))
			}
		}
	}
	roundTrip() // grow buffers
	if n := testing.AllocsPerRun(50, roundTrip); n != 0 {
		t.Fatalf("%v allocations per batch round trip, want 0", n)
	}
	// Rebuilding the batch in a reused builder is allocation free too.
	recs := testRecords()
	if n := testing.AllocsPerRun(50, func() {
		b.Reset()
		for _, rec := range recs {
			if err := b.Add(rec); err != nil {
				t.Fatal(err)
			}
		}
	}); n != 0 {
		t.Fatalf("%v allocations per batch rebuild", n)
	}
	if sum == 0 {
		t.Fatal("no data read")
	}
}

// Frames read in place (NextInto) into a buffer's spare capacity and
// appended there store the stream as received without a copy; a payload
// changed in place gets its checksum recomputed; frames the room refuses
// go through the Reader's buffer and are appended by copy.
func TestNextIntoInPlace(t *testing.T) {
	var stream []byte
	var err error
	sizes := []int{1, 100, 70_000, 5, 300_000}
	for i, n := range sizes {
		p := bytes.Repeat([]byte{byte(i + 1)}, n)
		if stream, err = AppendFrame(stream, TypeBatch, uint16(i), p); err != nil {
			t.Fatal(err)
		}
	}
	stream, _ = AppendFrame(stream, TypeAck, 0, make([]byte, 8))
	seg := make([]byte, 0, len(stream)+100)
	r := NewReader(bytes.NewReader(stream), 0)
	var given [][]byte
	room := func(ty Type, n int) []byte {
		if ty != TypeBatch || n == 5 { // refused: read into the Reader's buffer
			return nil
		}
		b := seg[len(seg) : len(seg)+HeaderSize+n]
		given = append(given, b)
		return b
	}
	for {
		f, err := r.NextInto(room)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		inPlace := len(f.Payload) > 0 && cap(seg)-len(seg) >= HeaderSize+len(f.Payload) &&
			&seg[:len(seg)+HeaderSize+1][len(seg)+HeaderSize] == &f.Payload[0]
		if want := f.Type == TypeBatch && len(f.Payload) != 5; inPlace != want {
			t.Fatalf("%s frame of %d bytes: read in place %v, want %v", f.Type, len(f.Payload), inPlace, want)
		}
		seg = f.AppendTo(seg)
	}
	if !bytes.Equal(seg, stream) {
		t.Fatal("frames stored in place differ from the stream as received")
	}
	if len(given) != 4 {
		t.Fatalf("room gave %d buffers, want 4", len(given))
	}

	// A payload changed where it lies (a disk index remapped): the
	// header's checksum is recomputed, and the frame reads back.
	seg = seg[:0]
	r = NewReader(bytes.NewReader(stream[:HeaderSize+1]), 0)
	f, err := r.NextInto(func(Type, int) []byte { return seg[:HeaderSize+1] })
	if err != nil {
		t.Fatal(err)
	}
	f.Payload[0] = 0xee
	seg = Frame{Type: f.Type, Flags: f.Flags, Payload: f.Payload}.AppendTo(seg)
	got, err := NewReader(bytes.NewReader(seg), 0).Next()
	if err != nil || len(got.Payload) != 1 || got.Payload[0] != 0xee {
		t.Fatalf("changed frame reads back as %v, %v", got.Payload, err)
	}
}

// A buffered Writer flushes once per frame, after the whole frame (large
// pieces passed by reference included) was written; a failed flush is
// the stream's sticky error.
func TestBufferedWriterFlushesEachFrame(t *testing.T) {
	var held, sent bytes.Buffer
	flushes := 0
	var fail error
	w := NewBufferedWriter(&held, func() error {
		flushes++
		sent.Write(held.Bytes())
		held.Reset()
		return fail
	})
	var b BatchBuilder
	big := bytes.Repeat([]byte{7}, 40<<10) // passed by reference
	if err := b.Add(Record{Seq: 1, Op: OpWrite, Length: uint32(len(big)), Data: big}); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteBatch(&b); err != nil {
		t.Fatal(err)
	}
	if flushes != 1 || held.Len() != 0 {
		t.Fatalf("after one frame: %d flushes, %d bytes held back", flushes, held.Len())
	}
	if err := w.WriteAck(9); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&sent, 0)
	f, err := r.Next()
	if err != nil || f.Type != TypeBatch {
		t.Fatalf("first frame: %v %v", f.Type, err)
	}
	if f, err = r.Next(); err != nil || f.Type != TypeAck {
		t.Fatalf("second frame: %v %v", f.Type, err)
	}
	fail = errors.New("connection reset")
	if err := w.WriteAck(10); err == nil || !strings.Contains(err.Error(), "connection reset") {
		t.Fatalf("failed flush: %v", err)
	}
	if err := w.WriteAck(11); err == nil {
		t.Fatal("the stream wrote on after a failed flush")
	}
}

// WriteBatch, which passes large record data by reference, writes exactly
// the frame AppendFrame makes of the same payload, byte for byte.
func TestWriteBatchEqualsAppendFrame(t *testing.T) {
	for n := 1; n <= 40; n++ {
		var b BatchBuilder
		for i := range n {
			r := Record{Seq: uint64(100 + i), Disk: uint16(i % 3), Offset: uint64(i) << 12}
			switch i % 4 {
			case 0, 1:
				r.Op, r.Data = OpWrite, bytes.Repeat([]byte{byte(i)}, 1+i*977%(20<<10))
				r.Length = uint32(len(r.Data))
			case 2:
				r.Op, r.Length = OpZero, 4096
			case 3:
				r = MarkerRecord(Marker{Seq: r.Seq, UnixNano: int64(i), Kind: MarkerCrashConsistent})
			}
			if err := b.Add(r); err != nil {
				t.Fatal(err)
			}
		}
		var out bytes.Buffer
		if err := NewWriter(&out).WriteBatch(&b); err != nil {
			t.Fatal(err)
		}
		payload, err := b.AppendBinary(nil)
		if err != nil {
			t.Fatal(err)
		}
		want, err := AppendFrame(nil, TypeBatch, 0, payload)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), want) {
			t.Fatalf("%d records: WriteBatch's frame differs from AppendFrame's (header %x, want %x)", n, out.Bytes()[:HeaderSize], want[:HeaderSize])
		}
		b.Reset()
	}
}

// A withdrawn marker keeps its sequence and its place in the batch; only
// consistency markers from the sequence given on are withdrawn, and the
// batch written afterwards carries the change.
func TestWithdrawMarkers(t *testing.T) {
	b := testBatch(t, []Record{
		{Seq: 1, Op: OpWrite, Length: 1, Data: []byte{7}},
		MarkerRecord(Marker{Seq: 2, UnixNano: 20, Kind: MarkerCrashConsistent}),
		MarkerRecord(Marker{Seq: 3, UnixNano: 30, Kind: MarkerTime}),
		MarkerRecord(Marker{Seq: 4, UnixNano: 40, Kind: MarkerAppConsistent}),
		{Seq: 5, Op: OpZero, Length: 512},
		MarkerRecord(Marker{Seq: 6, UnixNano: 60, Kind: MarkerCrashConsistent}),
	})
	if n := b.WithdrawMarkers(3); n != 2 {
		t.Fatalf("withdrew %d markers, want 2 (seq 4 and 6)", n)
	}
	p, err := b.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	d, err := DecodeBatch(p)
	if err != nil {
		t.Fatalf("a batch with withdrawn markers: %v", err)
	}
	want := map[uint64]MarkerKind{2: MarkerCrashConsistent, 3: MarkerTime, 4: MarkerWithdrawn, 6: MarkerWithdrawn}
	var seqs []uint64
	for it := d.Records(); it.Next(); {
		r := it.Record()
		seqs = append(seqs, r.Seq)
		if r.Op != OpMarker {
			continue
		}
		if k := r.Marker().Kind; k != want[r.Seq] {
			t.Errorf("marker %d: kind %s, want %s", r.Seq, k, want[r.Seq])
		}
		if r.Dates() != (want[r.Seq] != MarkerWithdrawn) {
			t.Errorf("marker %d (%s): Dates %v", r.Seq, r.Marker().Kind, r.Dates())
		}
	}
	if !slices.Equal(seqs, []uint64{1, 2, 3, 4, 5, 6}) {
		t.Errorf("records %v, want 1 to 6", seqs)
	}
}
