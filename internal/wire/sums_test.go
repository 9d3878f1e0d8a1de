package wire

import (
	"bytes"
	"crypto/sha256"
	"testing"
)

func TestSumsRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w, r := NewWriter(&buf), NewReader(&buf, 0)
	in := Sums{ID: 7, Disk: "sda", Offset: 1 << 20, ChunkSize: 1 << 20,
		Sums: [][sha256.Size]byte{sha256.Sum256([]byte("a")), sha256.Sum256([]byte("b"))}}
	if err := w.WriteSums(&in); err != nil {
		t.Fatal(err)
	}
	reply := SumsReply{ID: 7, Differs: []bool{false, true, false, false, false, false, false, false, true}}
	if err := w.WriteSumsReply(&reply); err != nil {
		t.Fatal(err)
	}
	f, err := r.Next()
	if err != nil || f.Type != TypeSums {
		t.Fatalf("frame %v, %v", f.Type, err)
	}
	var out Sums
	if err := out.UnmarshalBinary(f.Payload); err != nil {
		t.Fatal(err)
	}
	if out.ID != in.ID || out.Disk != in.Disk || out.Offset != in.Offset || out.ChunkSize != in.ChunkSize || len(out.Sums) != 2 || out.Sums[1] != in.Sums[1] {
		t.Fatalf("got %+v", out)
	}
	f, err = r.Next()
	if err != nil || f.Type != TypeSumsReply {
		t.Fatalf("frame %v, %v", f.Type, err)
	}
	var rep SumsReply
	if err := rep.UnmarshalBinary(f.Payload); err != nil {
		t.Fatal(err)
	}
	if len(rep.Differs) != 9 || !rep.Differs[1] || !rep.Differs[8] || rep.Differs[0] {
		t.Fatalf("got %+v", rep)
	}
	if err := (&Sums{}).UnmarshalBinary([]byte{1}); err == nil {
		t.Fatal("truncated sums decoded")
	}
}

// A chunk is read into the process server's memory whole: one of 4 GiB,
// from a buggy agent, would exhaust it. Both ends refuse it.
func TestSumsChunkSizeBounded(t *testing.T) {
	in := Sums{ID: 1, Disk: "sda", ChunkSize: 0xFFFFFE00, Sums: [][sha256.Size]byte{{}}}
	if _, err := in.AppendBinary(nil); err == nil {
		t.Error("encoded a 4 GiB chunk")
	}
	in.ChunkSize = MaxChunkSize
	p, err := in.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	// The same payload with the size patched past the bound.
	at := bytes.Index(p, le.AppendUint32(nil, MaxChunkSize))
	le.PutUint32(p[at:], 0xFFFFFE00)
	if err := (&Sums{}).UnmarshalBinary(p); err == nil {
		t.Error("decoded a 4 GiB chunk")
	}
}

// A reply has one encoding: bits past its chunks are refused, not ignored.
func TestSumsReplyPaddingRefused(t *testing.T) {
	p, err := (&SumsReply{ID: 1, Differs: []bool{true, false, true}}).AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	p[len(p)-1] |= 0x80
	if err := (&SumsReply{}).UnmarshalBinary(p); err == nil {
		t.Error("decoded a reply with a bit set past its 3 chunks")
	}
}
