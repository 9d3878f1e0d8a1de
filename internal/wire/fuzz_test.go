package wire

import (
	"bytes"
	"encoding"
	"errors"
	"io"
	"testing"
)

// FuzzReader feeds arbitrary bytes to a Reader and decodes every frame it
// returns. It must never panic, must bound its buffer by what it was given,
// and every payload that decodes must re-encode to the same bytes (the
// encoding is canonical, so a decoder cannot accept something the encoder
// would not produce). The seed corpus is in testdata/fuzz/FuzzReader: whole
// streams and frames, and "payload-*" inputs that are a type byte followed by
// a bare payload.
func FuzzReader(f *testing.F) {
	// Seeds from today's encoders, besides the stored corpus, so that the
	// decoders' success paths stay seeded as the messages change.
	var buf bytes.Buffer
	w := NewWriter(&buf)
	seed := func(typ Type, p []byte, err error) {
		if err != nil {
			f.Fatal(err)
		}
		f.Add(append([]byte{byte(typ)}, p...))
		buf.Reset()
		if err := w.WriteFrame(typ, 0, p); err != nil {
			f.Fatal(err)
		}
		f.Add(bytes.Clone(buf.Bytes()))
	}
	hello := Hello{ProtocolVersion: 2, Machine: "m1", Run: RunID{1, 2},
		Disks: []DiskState{{Name: "sda", Size: 1 << 30, Generation: Generation{3}, LastAckedSeq: 7}}}
	p, err := hello.AppendBinary(nil)
	seed(TypeHello, p, err)
	ack := HelloAck{ProtocolVersion: 2, LastRun: RunID{4},
		Disks: []DiskAgreement{{Name: "sda", Action: SyncResume, Generation: Generation{3}, ResumeFrom: 8}}}
	p, err = ack.AppendBinary(nil)
	seed(TypeHelloAck, p, err)
	sums := Sums{ID: 1, Disk: "sda", Offset: 1 << 20, ChunkSize: 64 << 10, Sums: make([][32]byte, 2)}
	p, err = sums.AppendBinary(nil)
	seed(TypeSums, p, err)
	reply := SumsReply{ID: 1, Differs: []bool{true, false, true}}
	p, err = reply.AppendBinary(nil)
	seed(TypeSumsReply, p, err)

	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), 0)
		for {
			fr, err := r.Next()
			if err != nil {
				if err != io.EOF && !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrVersion) &&
					!errors.Is(err, ErrChecksum) && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrTruncated) {
					t.Fatalf("unexpected error class: %v", err)
				}
				if _, err2 := r.Next(); err2 != err {
					t.Fatalf("error not sticky: %v then %v", err, err2)
				}
				break
			}
			if len(fr.Payload) > len(data) {
				t.Fatalf("payload of %d bytes from %d bytes of input", len(fr.Payload), len(data))
			}
			checkCanonical(t, fr)
		}
		if c := cap(r.buf); c > max(growStep, 2*len(data)) {
			t.Fatalf("reader buffer grew to %d bytes on %d bytes of input", c, len(data))
		}

		// The CRC keeps mutated frames from reaching the decoders, so also
		// decode the input directly: first byte the type, the rest the
		// payload.
		if len(data) > 0 {
			checkCanonical(t, Frame{Type: Type(data[0]), Payload: data[1:]})
		}
	})
}

func checkCanonical(t *testing.T, fr Frame) {
	t.Helper()
	var m interface {
		encoding.BinaryUnmarshaler
	}
	var enc func() ([]byte, error)
	switch fr.Type {
	case TypeHello:
		var h Hello
		m, enc = &h, func() ([]byte, error) { return h.AppendBinary(nil) }
	case TypeHelloAck:
		var a HelloAck
		m, enc = &a, func() ([]byte, error) { return a.AppendBinary(nil) }
	case TypeMarker:
		var mk Marker
		m, enc = &mk, func() ([]byte, error) { return mk.AppendBinary(nil) }
	case TypeAck:
		var a Ack
		m, enc = &a, func() ([]byte, error) { return a.AppendBinary(nil) }
	case TypeBackpressure:
		var b Backpressure
		m, enc = &b, func() ([]byte, error) { return b.AppendBinary(nil) }
	case TypeError:
		var e Error
		m, enc = &e, func() ([]byte, error) { return e.AppendBinary(nil) }
	case TypeSums:
		var s Sums
		m, enc = &s, func() ([]byte, error) { return s.AppendBinary(nil) }
	case TypeSumsReply:
		var r SumsReply
		m, enc = &r, func() ([]byte, error) { return r.AppendBinary(nil) }
	case TypeBatch:
		batch, err := DecodeBatch(fr.Payload)
		if err != nil {
			return
		}
		var b BatchBuilder
		n := uint32(0)
		for it := batch.Records(); it.Next(); n++ {
			if err := b.Add(*it.Record()); err != nil {
				t.Fatalf("decoded record %d rejected by the builder: %v", n, err)
			}
		}
		if n != batch.Count {
			t.Fatalf("iterated %d records, header says %d", n, batch.Count)
		}
		again, err := b.AppendBinary(nil)
		if err != nil || !bytes.Equal(again, fr.Payload) {
			t.Fatalf("batch re-encodes differently (%v)", err)
		}
		return
	default:
		return
	}
	if err := m.UnmarshalBinary(fr.Payload); err != nil {
		return
	}
	again, err := enc()
	if err != nil {
		t.Fatalf("decoded %s does not re-encode: %v", fr.Type, err)
	}
	if !bytes.Equal(again, fr.Payload) {
		t.Fatalf("%s re-encodes differently:\n got %x\nwant %x", fr.Type, again, fr.Payload)
	}
}
