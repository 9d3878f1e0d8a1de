package aesgcm

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	mrand "math/rand/v2"
	"runtime"
	"slices"
	"testing"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

func reference(t testing.TB, key []byte) cipher.AEAD {
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func newPair(t testing.TB) (*GCM, cipher.AEAD) {
	key := make([]byte, KeySize)
	rand.Read(key)
	g, err := New(key)
	if err != nil {
		t.Fatal(err)
	}
	return g, reference(t, key)
}

// TestAccelerated checks, against the CPU flags Linux lists, that the
// fast path is on wherever the CPU has what it needs (so that the
// comparisons below test it) and off elsewhere.
func TestAccelerated(t *testing.T) {
	flags, err := testenv.CPUFlags()
	if err != nil {
		t.Skipf("no CPU flags to check against: %v", err)
	}
	want := runtime.GOARCH == "amd64" && !purego
	for _, f := range []string{"aes", "pclmulqdq", "avx2", "avx512f", "avx512bw", "avx512vl", "vaes", "vpclmulqdq"} {
		want = want && slices.Contains(flags, f)
	}
	g, _ := newPair(t)
	t.Logf("accelerated: %v", g.Accelerated())
	if g.Accelerated() != want {
		t.Fatalf("accelerated %v, want %v from the CPU flags %v", g.Accelerated(), want, flags)
	}
}

// TestSealMatchesCryptoCipher compares every length up to 2100 bytes,
// around multiples of the 512-byte round, and a few large ones, with
// AAD of several lengths, against crypto/cipher.
func TestSealMatchesCryptoCipher(t *testing.T) {
	g, ref := newPair(t)
	nonce := make([]byte, NonceSize)
	lengths := []int{}
	for n := 0; n <= 2100; n++ {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, 4096, 65536-1, 65536, 65536+17, 1<<20, 8<<20+36)
	for _, n := range lengths {
		for _, adLen := range []int{0, 13, 16, 36 + 40} {
			plain := make([]byte, n)
			rand.Read(plain)
			ad := make([]byte, adLen)
			rand.Read(ad)
			rand.Read(nonce)
			want := ref.Seal(nil, nonce, plain, ad)
			got := g.Seal(nil, nonce, plain, ad)
			if !bytes.Equal(got, want) {
				t.Fatalf("len %d aad %d: sealed differs from crypto/cipher (first difference at %d)", n, adLen, firstDiff(got, want))
			}
			if n > 2000 {
				break // large ones once
			}
		}
	}
}

// TestSealInPlaceAndPrefix seals where the plaintext lies, after a
// prefix kept in dst, and opens the result with crypto/cipher.
func TestSealInPlaceAndPrefix(t *testing.T) {
	g, ref := newPair(t)
	for _, n := range []int{0, 1, 255, 256, 4097, 1 << 20} {
		prefix := []byte("header--")
		buf := make([]byte, len(prefix)+n, len(prefix)+n+Overhead)
		copy(buf, prefix)
		rand.Read(buf[len(prefix):])
		plain := bytes.Clone(buf[len(prefix):])
		nonce := make([]byte, NonceSize)
		rand.Read(nonce)
		out := g.Seal(buf[:len(prefix)], nonce, buf[len(prefix):], prefix)
		if &out[0] != &buf[0] {
			t.Fatalf("len %d: sealed in place moved", n)
		}
		back, err := ref.Open(nil, nonce, out[len(prefix):], prefix)
		if err != nil || !bytes.Equal(back, plain) {
			t.Fatalf("len %d: crypto/cipher cannot open the in-place seal: %v", n, err)
		}
	}
}

// TestSealChunks checks that the pieces handed out are the ciphertext,
// in order, whole, and of the size asked.
func TestSealChunks(t *testing.T) {
	g, ref := newPair(t)
	for _, tc := range []struct{ n, chunk int }{
		{0, 512}, {100, 512}, {512, 512}, {513, 512}, {1000, 512}, {65536, 4096}, {65536 + 300, 65536}, {8<<20 + 36, 65536}, {5000, 1 << 20},
	} {
		plain := make([]byte, tc.n)
		rand.Read(plain)
		nonce := make([]byte, NonceSize)
		rand.Read(nonce)
		var pieces [][]byte
		out := g.SealChunks(nil, nonce, plain, nil, tc.chunk, func(b []byte) { pieces = append(pieces, bytes.Clone(b)) })
		if want := ref.Seal(nil, nonce, plain, nil); !bytes.Equal(out, want) {
			t.Fatalf("n %d chunk %d: sealed differs", tc.n, tc.chunk)
		}
		joined := bytes.Join(pieces, nil)
		if !bytes.Equal(joined, out[:tc.n]) {
			t.Fatalf("n %d chunk %d: pieces are not the ciphertext", tc.n, tc.chunk)
		}
		for i, p := range pieces {
			if i < len(pieces)-1 && len(p) != tc.chunk || len(p) == 0 || len(p) > tc.chunk {
				t.Fatalf("n %d chunk %d: piece %d of %d bytes", tc.n, tc.chunk, i, len(p))
			}
		}
	}
}

// TestOpenChunks checks that the pieces handed out are the plaintext, in
// order, whole, and of the size asked, and that a tampered message still
// fails.
func TestOpenChunks(t *testing.T) {
	g, ref := newPair(t)
	for _, tc := range []struct{ n, chunk int }{
		{0, 512}, {100, 512}, {512, 512}, {513, 512}, {1000, 512}, {65536, 4096}, {65536 + 300, 65536}, {8<<20 + 36, 65536}, {5000, 1 << 20}, {3 << 20, 1 << 20},
	} {
		plain := make([]byte, tc.n)
		rand.Read(plain)
		nonce := make([]byte, NonceSize)
		rand.Read(nonce)
		sealed := ref.Seal(nil, nonce, plain, []byte("aad"))
		var pieces [][]byte
		out, err := g.OpenChunks(nil, nonce, sealed, []byte("aad"), tc.chunk, func(b []byte) { pieces = append(pieces, bytes.Clone(b)) })
		if err != nil || !bytes.Equal(out, plain) {
			t.Fatalf("n %d chunk %d: opened %v, equal %v", tc.n, tc.chunk, err, bytes.Equal(out, plain))
		}
		if joined := bytes.Join(pieces, nil); !bytes.Equal(joined, plain) {
			t.Fatalf("n %d chunk %d: pieces are not the plaintext", tc.n, tc.chunk)
		}
		for i, p := range pieces {
			if i < len(pieces)-1 && len(p) != tc.chunk || len(p) == 0 || len(p) > tc.chunk {
				t.Fatalf("n %d chunk %d: piece %d of %d bytes", tc.n, tc.chunk, i, len(p))
			}
		}
		if tc.n > 0 {
			sealed[tc.n/2] ^= 1
			if _, err := g.OpenChunks(nil, nonce, sealed, []byte("aad"), tc.chunk, func([]byte) {}); err == nil {
				t.Fatalf("n %d chunk %d: tampered message opened", tc.n, tc.chunk)
			}
		}
	}
}

// TestRandomLengths compares messages of random lengths under fresh
// nonces. (With a 12-byte nonce the 32-bit block counter starts at 2 and
// GCM's length limit keeps it from wrapping.)
func TestRandomLengths(t *testing.T) {
	g, ref := newPair(t)
	r := mrand.New(mrand.NewPCG(1, 2))
	for range 200 {
		n := r.IntN(40000)
		plain := make([]byte, n)
		rand.Read(plain)
		nonce := make([]byte, NonceSize)
		rand.Read(nonce)
		if !bytes.Equal(g.Seal(nil, nonce, plain, nil), ref.Seal(nil, nonce, plain, nil)) {
			t.Fatalf("len %d differs", n)
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func FuzzSeal(f *testing.F) {
	f.Add([]byte("k"), []byte("nonce"), []byte("plain"), []byte("ad"))
	f.Fuzz(func(t *testing.T, k, n, plain, ad []byte) {
		key := make([]byte, KeySize)
		copy(key, k)
		nonce := make([]byte, NonceSize)
		copy(nonce, n)
		g, err := New(key)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(g.Seal(nil, nonce, plain, ad), reference(t, key).Seal(nil, nonce, plain, ad)) {
			t.Fatalf("sealed %d bytes (aad %d) differs from crypto/cipher", len(plain), len(ad))
		}
	})
}

func BenchmarkOpen(b *testing.B) {
	for _, impl := range []string{"crypto-cipher", "aesgcm"} {
		b.Run(impl, func(b *testing.B) {
			g, ref := newPair(b)
			nonce := make([]byte, NonceSize)
			sealed := ref.Seal(nil, nonce, make([]byte, 8<<20), nil)
			out := make([]byte, 0, len(sealed))
			b.SetBytes(int64(len(sealed) - Overhead))
			for b.Loop() {
				var err error
				if impl == "aesgcm" {
					_, err = g.Open(out, nonce, sealed, nil)
				} else {
					_, err = ref.Open(out, nonce, sealed, nil)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkSeal(b *testing.B) {
	for _, impl := range []string{"crypto-cipher", "aesgcm"} {
		b.Run(impl, func(b *testing.B) {
			g, ref := newPair(b)
			buf := make([]byte, 8<<20, 8<<20+Overhead)
			nonce := make([]byte, NonceSize)
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				if impl == "aesgcm" {
					g.Seal(buf[:0], nonce, buf, nil)
				} else {
					ref.Seal(buf[:0], nonce, buf, nil)
				}
			}
		})
	}
}

// TestOpenMatchesCryptoCipher opens crypto/cipher's output of every length
// to 2100 bytes and large ones, in a new buffer and in place, and refuses
// any of them with one bit flipped in the ciphertext, the tag or the aad,
// appending nothing.
func TestOpenMatchesCryptoCipher(t *testing.T) {
	g, ref := newPair(t)
	nonce := make([]byte, NonceSize)
	lengths := []int{}
	for n := 0; n <= 2100; n++ {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, 65536+17, 1<<20, 8<<20+36)
	r := mrand.New(mrand.NewPCG(3, 4))
	for _, n := range lengths {
		plain := make([]byte, n)
		rand.Read(plain)
		ad := make([]byte, r.IntN(80))
		rand.Read(ad)
		rand.Read(nonce)
		sealed := ref.Seal(nil, nonce, plain, ad)
		got, err := g.Open([]byte("prefix"), nonce, sealed, ad)
		if err != nil || !bytes.Equal(got, append([]byte("prefix"), plain...)) {
			t.Fatalf("len %d: open = %v (equal %v)", n, err, bytes.Equal(got[min(6, len(got)):], plain))
		}
		inPlace := bytes.Clone(sealed)
		got, err = g.Open(inPlace[:0], nonce, inPlace, ad)
		if err != nil || !bytes.Equal(got, plain) || &got[:1][0] != &inPlace[0] {
			t.Fatalf("len %d: open in place = %v", n, err)
		}
		// One flipped bit anywhere fails, and appends nothing.
		bad := bytes.Clone(sealed)
		bad[r.IntN(len(bad))] ^= 1 << r.IntN(8)
		if out, err := g.Open(nil, nonce, bad, ad); err == nil || out != nil {
			t.Fatalf("len %d: tampered ciphertext opened", n)
		}
		if len(ad) > 0 {
			badAD := bytes.Clone(ad)
			badAD[r.IntN(len(badAD))] ^= 1
			if _, err := g.Open(nil, nonce, sealed, badAD); err == nil {
				t.Fatalf("len %d: wrong aad accepted", n)
			}
		}
	}
	if _, err := g.Open(nil, nonce, make([]byte, Overhead-1), nil); err == nil {
		t.Fatal("a message shorter than the tag opened")
	}
	// A failed open in place clears what it decrypted.
	plain := bytes.Repeat([]byte("secret!!"), 200)
	sealed := g.Seal(nil, nonce, plain, nil)
	sealed[len(sealed)-1] ^= 1
	if _, err := g.Open(sealed[:0], nonce, sealed, nil); err == nil {
		t.Fatal("tampered tag accepted")
	}
	if bytes.Contains(sealed, []byte("secret!!")) {
		t.Fatal("a failed open left plaintext in the buffer")
	}
}

func FuzzOpen(f *testing.F) {
	f.Add([]byte("plain"), []byte("ad"), -1)
	f.Add(bytes.Repeat([]byte{7}, 1500), []byte{}, 700)
	key := make([]byte, KeySize)
	g, err := New(key)
	if err != nil {
		f.Fatal(err)
	}
	ref := reference(f, key)
	nonce := make([]byte, NonceSize)
	f.Fuzz(func(t *testing.T, plain, ad []byte, flip int) {
		sealed := ref.Seal(nil, nonce, plain, ad)
		if flip >= 0 {
			sealed[flip%len(sealed)] ^= 0x10
		}
		want, werr := ref.Open(nil, nonce, sealed, ad)
		got, err := g.Open(nil, nonce, sealed, ad)
		if (err == nil) != (werr == nil) || !bytes.Equal(got, want) {
			t.Fatalf("%d bytes, flip %d: open = %v, crypto/cipher %v", len(plain), flip, err, werr)
		}
	})
}

// TestKnownAnswer is test case 16 of McGrew and Viega's GCM specification
// (AES-256, 60-byte plaintext, 20-byte aad), independent of crypto/cipher.
func TestKnownAnswer(t *testing.T) {
	h := func(s string) []byte {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	key := h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
	plain := h("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
	ad := h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
	nonce := h("cafebabefacedbaddecaf888")
	want := h("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662" + "76fc6ece0f4e1768cddf8853bb2d551b")
	g, err := New(key)
	if err != nil {
		t.Fatal(err)
	}
	if got := g.Seal(nil, nonce, plain, ad); !bytes.Equal(got, want) {
		t.Fatalf("sealed %x\nwant   %x", got, want)
	}
	if got, err := g.Open(nil, nonce, want, ad); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("open: %v", err)
	}
}
