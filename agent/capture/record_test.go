package capture

import (
	"bytes"
	"testing"
	"unsafe"
)

// The decoder reads the C layout of struct lb_record by offset: keep the
// generated Go twin and the offsets in step.
func TestRecordLayout(t *testing.T) {
	var r captureLbRecord
	checks := []struct {
		name      string
		got, want uintptr
	}{
		{"size", unsafe.Sizeof(r), 32},
		{"seq", unsafe.Offsetof(r.Seq), 0},
		{"sector", unsafe.Offsetof(r.Sector), 8},
		{"len", unsafe.Offsetof(r.Len), 16},
		{"data_len", unsafe.Offsetof(r.DataLen), 20},
		{"dev", unsafe.Offsetof(r.Dev), 24},
		{"op", unsafe.Offsetof(r.Op), 26},
		{"flags", unsafe.Offsetof(r.Flags), 27},
		{"epoch", unsafe.Offsetof(r.Epoch), 28},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("lb_record %s at %d, decoder assumes %d", c.name, c.got, c.want)
		}
	}
}

// The agent sweeps the pending table through its mapping, by the C layout
// of struct lb_bucket: eight tags in one cache line, then the entries.
func TestBucketLayout(t *testing.T) {
	var b captureLbBucket
	if s := unsafe.Sizeof(b); s != 320 || s%64 != 0 {
		t.Errorf("lb_bucket is %d bytes, want 320 (whole cache lines)", s)
	}
	if o := unsafe.Offsetof(b.P); o != 64 {
		t.Errorf("lb_bucket entries at %d, want 64 (after one line of tags)", o)
	}
	if s := unsafe.Sizeof(b.P[0]); s != 32 {
		t.Errorf("lb_pending is %d bytes, want 32", s)
	}
	if pendWays != 8 || pendSlots != pendBuckets*8 {
		t.Errorf("%d ways, %d slots: out of step with capture.h", pendWays, pendSlots)
	}
}

func TestDecodeRoundTrip(t *testing.T) {
	in := Record{Seq: 42, Offset: 8 << 9, Len: 4096, Dev: 3, Op: OpWrite, Flags: FlagFUA, Epoch: 9, Data: bytes.Repeat([]byte{7}, 4096)}
	var out Record
	if err := Decode(Encode(nil, &in), &out); err != nil {
		t.Fatal(err)
	}
	if out.Seq != in.Seq || out.Offset != in.Offset || out.Len != in.Len || out.Dev != in.Dev || out.Op != in.Op ||
		out.Flags != in.Flags || out.Epoch != in.Epoch || !bytes.Equal(out.Data, in.Data) {
		t.Fatalf("got %+v, want %+v", out, in)
	}
	ext := Record{Seq: 1, Offset: 1 << 20, Len: 1 << 20, Op: OpDiscard}
	if err := Decode(Encode(nil, &ext), &out); err != nil || out.Data != nil || out.Op != OpDiscard {
		t.Fatalf("extent-only record: %+v, %v", out, err)
	}
}

func TestDecodeRejects(t *testing.T) {
	good := Encode(nil, &Record{Seq: 1, Len: 512, Op: OpWrite, Data: make([]byte, 512)})
	cases := map[string][]byte{
		"short header":      good[:HeaderSize-1],
		"truncated payload": good[:len(good)-1],
		"unknown op":        func() []byte { b := bytes.Clone(good); b[26] = 9; return b }(),
		"payload len != extent len": func() []byte {
			b := bytes.Clone(good)
			b[16] = 0 // len 0 while data_len is 512
			b[17] = 4
			return b
		}(),
		"payload on a discard": func() []byte { b := bytes.Clone(good); b[26] = byte(OpDiscard); return b }(),
	}
	for name, b := range cases {
		var r Record
		if err := Decode(b, &r); err == nil {
			t.Errorf("%s: decoded %+v", name, r)
		}
	}
}

func FuzzDecode(f *testing.F) {
	f.Add(Encode(nil, &Record{Seq: 1, Len: 512, Op: OpWrite, Data: make([]byte, 512)}))
	f.Add(Encode(nil, &Record{Seq: 2, Offset: 1 << 30, Len: 1 << 20, Op: OpZero}))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r Record
		if err := Decode(b, &r); err != nil {
			return
		}
		// Whatever decodes must stay inside its buffer, have a valid
		// offset and re-encode to the same header and payload.
		if r.Offset < 0 || (len(r.Data) != 0 && int(r.Len) != len(r.Data)) {
			t.Fatalf("decoded an invalid record: offset %d, payload %d bytes for extent %d", r.Offset, len(r.Data), r.Len)
		}
		again := Encode(nil, &r)
		if !bytes.Equal(again[:28], b[:28]) || !bytes.Equal(again[HeaderSize:], b[HeaderSize:len(again)]) {
			t.Fatalf("re-encoding changed the record")
		}
	})
}
