package seal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
)

// sealChunked seals plain as a chunked blob in a fresh buffer, preparing
// ranges in a shuffled order first (as the cache does), and returns it.
func sealChunked(t testing.TB, alg Alg, plain []byte, key *Key, aad []byte, seed uint64) []byte {
	t.Helper()
	buf := make([]byte, ChunkedHeaderSize+len(plain), ChunkedHeaderSize+len(plain)+ChunkedTrailer(len(plain)))
	copy(buf[ChunkedHeaderSize:], plain)
	c, err := NewChunked(alg, buf, key, aad)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 3))
	for range 8 {
		off := rng.IntN(c.Len() + 1)
		c.Seal(off, rng.IntN(40<<10))
	}
	blob := c.Finish()
	if &blob[0] != &buf[0] || len(blob) != c.Len() {
		t.Fatal("blob not built in place")
	}
	return blob
}

func TestChunkedRoundTrip(t *testing.T) {
	key := testKey(t)
	aad := []byte("m/journal/1-2")
	sizes := []int{0, 1, 1<<chunkShift - 1, 1 << chunkShift, 1<<chunkShift + 1, 5<<chunkShift + 77}
	for _, n := range sizes {
		for _, plain := range [][]byte{randomData(n, uint64(n)), mixedData(n, uint64(n))} {
			for _, alg := range []Alg{AlgNone, AlgS2, AlgZstd} {
				blob := sealChunked(t, alg, plain, key, aad, uint64(n))
				got, err := Open([]byte("prefix"), blob, key, aad)
				if err != nil || !bytes.Equal(got, append([]byte("prefix"), plain...)) {
					t.Fatalf("%s, %d bytes: Open = %d bytes, %v", alg, n, len(got), err)
				}
				if blob[4] != chunkedVersion {
					t.Fatalf("version %d", blob[4])
				}
			}
		}
	}
}

// Sealing in any order gives a blob that opens: every chunk, and the tag
// of each, ends up in place whatever was sealed before it.
func TestChunkedAnyOrder(t *testing.T) {
	key := testKey(t)
	plain := randomData(7<<chunkShift+100, 9)
	for seed := range uint64(20) {
		blob := sealChunked(t, AlgNone, plain, key, nil, seed)
		if got, err := Open(nil, blob, key, nil); err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("seed %d: %v", seed, err)
		}
	}
}

func TestChunkedTampered(t *testing.T) {
	key := testKey(t)
	aad := []byte("m/journal/5-9")
	plain := randomData(3<<chunkShift+500, 4)
	blob := sealChunked(t, AlgNone, plain, key, aad, 1)
	body := blob[ChunkedHeaderSize : ChunkedHeaderSize+len(plain)]
	tags := blob[ChunkedHeaderSize+len(plain):]
	tampered := func(what string, b []byte, aad []byte) {
		t.Helper()
		if out, err := Open(nil, b, key, aad); !errors.Is(err, ErrTampered) || len(out) != 0 {
			t.Errorf("%s: Open = %d bytes, %v; want ErrTampered", what, len(out), err)
		}
	}
	// Every header and tag byte, and body bytes at a stride.
	flip := func(i int) []byte { b := bytes.Clone(blob); b[i] ^= 0x40; return b }
	for i := range ChunkedHeaderSize {
		tampered("header byte", flip(i), aad)
	}
	for i := range tags {
		tampered("tag byte", flip(ChunkedHeaderSize+len(plain)+i), aad)
	}
	for i := 0; i < len(body); i += 997 {
		tampered("body byte", flip(ChunkedHeaderSize+i), aad)
	}
	tampered("other name", blob, []byte("m/journal/5-10"))
	// Two whole chunks swapped, ciphertext and tags.
	sw := bytes.Clone(blob)
	c := 1 << chunkShift
	b0, b1 := sw[ChunkedHeaderSize:][:c], sw[ChunkedHeaderSize+c:][:c]
	tmp := bytes.Clone(b0)
	copy(b0, b1)
	copy(b1, tmp)
	t0, t1 := sw[len(sw)-len(tags):][:tagSize], sw[len(sw)-len(tags)+tagSize:][:tagSize]
	tmpT := bytes.Clone(t0)
	copy(t0, t1)
	copy(t1, tmpT)
	tampered("chunks swapped", sw, aad)
	// The last chunk and its tag cut off, lengths in the header fixed up.
	last := len(plain) - 3<<chunkShift
	cut := append(bytes.Clone(blob[:ChunkedHeaderSize+len(plain)-last]), tags[:3*tagSize]...)
	binary.LittleEndian.PutUint64(cut[28:], uint64(len(plain)-last))
	binary.LittleEndian.PutUint64(cut[headerSize:], uint64(len(plain)-last))
	tampered("last chunk cut", cut, aad)
	tampered("truncated", blob[:len(blob)-1], aad)
	tampered("extended", append(bytes.Clone(blob), 0), aad)
}

func TestChunkedRoom(t *testing.T) {
	key := testKey(t)
	if _, err := NewChunked(AlgNone, make([]byte, ChunkedHeaderSize+10), key, nil); err == nil {
		t.Error("a buffer with no room for the tags was accepted")
	}
	if _, err := NewChunked(AlgNone, make([]byte, ChunkedHeaderSize-1), key, nil); err == nil {
		t.Error("a buffer with no room for the header was accepted")
	}
}
