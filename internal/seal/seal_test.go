package seal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/s2"

	"github.com/lifeboat-dr/lifeboat/internal/testenv"
)

// testKeyMaterial is fixed so the committed fuzz corpus stays openable.
var testKeyMaterial = []byte("lifeboat-seal-test-key-32-bytes!")

func testKey(t testing.TB) *Key {
	t.Helper()
	k, err := NewKey(KeyID{1, 2, 3, 4, 5, 6, 7, 8}, testKeyMaterial)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// mixedData imitates a block-device change stream: 4 KiB blocks of text,
// zeros or random bytes (40/30/30), deterministic for a given seed.
func mixedData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	words := strings.Fields("the quick process server seals segments of changed blocks from agents " +
		"ext4 inode journal superblock extent /var/log/syslog kernel: eth0 link up " +
		"GET /api/v1/status 200 OK user=root pid=1234 systemd[1]: Started session")
	out := make([]byte, 0, n)
	blk := make([]byte, 4096)
	for len(out) < n {
		switch p := r.IntN(10); {
		case p < 4:
			blk = blk[:0]
			for len(blk) < 4096 {
				blk = append(blk, words[r.IntN(len(words))]...)
				blk = append(blk, ' ')
			}
			blk = blk[:4096]
		case p < 7:
			blk = blk[:4096]
			clear(blk)
		default:
			blk = blk[:4096]
			fillRandom(r, blk)
		}
		out = append(out, blk...)
	}
	return out[:n]
}

func randomData(n int, seed uint64) []byte {
	b := make([]byte, n)
	fillRandom(rand.New(rand.NewPCG(seed, 2)), b)
	return b
}

func fillRandom(r *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

func TestRoundTrip(t *testing.T) {
	key := testKey(t)
	inputs := map[string][]byte{
		"empty":  {},
		"byte":   {42},
		"zeros":  make([]byte, 1<<20),
		"random": randomData(300_000, 1),
		"mixed":  mixedData(1<<20, 2),
	}
	for name, plain := range inputs {
		for _, alg := range []Alg{AlgNone, AlgZstd, AlgS2} {
			t.Run(fmt.Sprintf("%s/%s", name, alg), func(t *testing.T) {
				aad := []byte("machine-a/000000000000002a")
				prefix := []byte("keep")
				sealed, err := SealWith(alg, bytes.Clone(prefix), plain, key, aad)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.HasPrefix(sealed, prefix) {
					t.Fatal("Seal did not append to dst")
				}
				sealed = sealed[len(prefix):]
				stored := Alg(sealed[5])
				if len(plain) > 0 && bytes.Count(plain, []byte{0}) == len(plain) && stored != alg && alg != AlgNone {
					t.Errorf("zeros stored as %s, want %s", stored, alg)
				}
				if name == "random" && stored != AlgNone {
					t.Errorf("incompressible data stored as %s, want none", stored)
				}
				got, err := Open([]byte("x"), sealed, key, aad)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got[1:], plain) || got[0] != 'x' {
					t.Fatalf("round trip mismatch (len %d, want %d)", len(got)-1, len(plain))
				}
			})
		}
	}
}

func TestCompressionShrinks(t *testing.T) {
	plain := mixedData(1<<20, 3)
	sealed, err := Seal(nil, plain, testKey(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(sealed) > len(plain)/2 {
		t.Fatalf("mixed data sealed to %d of %d bytes; compression not applied", len(sealed), len(plain))
	}
	if Alg(sealed[5]) != DefaultAlg {
		t.Fatalf("alg %s, want default %s", Alg(sealed[5]), DefaultAlg)
	}
}

// Compressible judges from a sample, and agrees with what compressing the
// whole would give where the data is alike throughout.
func TestCompressible(t *testing.T) {
	const n = 8 << 20
	headZeros := randomData(n, 5)
	clear(headZeros[:n/8]) // the whole shrinks by 1/8: worth it, and the first window sees it
	for _, c := range []struct {
		name  string
		alg   Alg
		plain []byte
		want  bool
	}{
		{"random", AlgS2, randomData(n, 1), false},
		{"random zstd", AlgZstd, randomData(n, 1), false},
		{"zeros", AlgS2, make([]byte, n), true},
		{"mixed", AlgS2, mixedData(n, 2), true},
		{"mixed, no compressor", AlgNone, mixedData(n, 2), false},
		{"random with a run of zeros at its head", AlgS2, headZeros, true},
		{"short random: compressing it whole is cheap", AlgS2, randomData(64<<10, 3), true},
	} {
		if got := Compressible(c.alg, c.plain); got != c.want {
			t.Errorf("%s: Compressible = %v, want %v", c.name, got, c.want)
		}
		if c.alg == AlgNone || len(c.plain) < n {
			continue
		}
		// Where the sample says no, compressing the whole would not have
		// shrunk it by 1/64 either.
		whole, put, err := compress(c.alg, c.plain)
		shrinks := err == nil && whole != nil && len(whole) < len(c.plain)*63/64
		put()
		if shrinks != c.want {
			t.Errorf("%s: the whole shrinks by 1/64: %v, but Compressible = %v", c.name, shrinks, c.want)
		}
	}
}

func BenchmarkCompressible(b *testing.B) {
	plain := randomData(8<<20, 1)
	b.SetBytes(int64(len(plain)))
	for b.Loop() {
		Compressible(AlgS2, plain)
	}
}

func TestNoncesDiffer(t *testing.T) {
	key := testKey(t)
	a, _ := Seal(nil, []byte("same"), key, nil)
	b, _ := Seal(nil, []byte("same"), key, nil)
	if bytes.Equal(a[16:28], b[16:28]) {
		t.Fatal("two seals used the same nonce")
	}
}

// Every single-byte change anywhere in a sealed blob must be detected.
func TestEveryByteFlipIsTampered(t *testing.T) {
	key := testKey(t)
	aad := []byte("blob/name")
	for _, alg := range []Alg{AlgNone, AlgZstd, AlgS2} {
		plain := mixedData(6000, 4)
		sealed, err := SealWith(alg, nil, plain, key, aad)
		if err != nil {
			t.Fatal(err)
		}
		for i := range sealed {
			for _, mask := range []byte{0x01, 0x80, 0xff} {
				c := bytes.Clone(sealed)
				c[i] ^= mask
				got, err := Open(nil, c, key, aad)
				if !errors.Is(err, ErrTampered) {
					t.Fatalf("%s: byte %d ^ %#x: err = %v, want ErrTampered", alg, i, mask, err)
				}
				if len(got) != 0 {
					t.Fatalf("%s: byte %d: Open returned data with an error", alg, i)
				}
			}
		}
		// Truncation at every length and an extra trailing byte.
		for n := range len(sealed) {
			if _, err := Open(nil, sealed[:n], key, aad); !errors.Is(err, ErrTampered) {
				t.Fatalf("%s: truncated to %d: err = %v, want ErrTampered", alg, n, err)
			}
		}
		if _, err := Open(nil, append(bytes.Clone(sealed), 0), key, aad); !errors.Is(err, ErrTampered) {
			t.Fatalf("%s: extended: err = %v, want ErrTampered", alg, err)
		}
	}
}

func TestWrongAADOrKey(t *testing.T) {
	key := testKey(t)
	sealed, err := Seal(nil, []byte("segment body"), key, []byte("machine-a/00000001"))
	if err != nil {
		t.Fatal(err)
	}
	for _, aad := range [][]byte{nil, []byte("machine-a/00000002"), []byte("machine-b/00000001"), []byte("machine-a/00000001\x00")} {
		if _, err := Open(nil, sealed, key, aad); !errors.Is(err, ErrTampered) {
			t.Errorf("aad %q: err = %v, want ErrTampered", aad, err)
		}
	}

	// Same id, other material: a restored keyring with the wrong key.
	other, _ := NewKey(key.ID(), bytes.Repeat([]byte{7}, KeySize))
	if _, err := Open(nil, sealed, other, []byte("machine-a/00000001")); !errors.Is(err, ErrTampered) {
		t.Errorf("wrong key: err = %v, want ErrTampered", err)
	}

	// Key missing from the keyring: tampered and unknown key, both.
	material, id := NewDataKey()
	k2, _ := NewKey(id, material)
	_, err = Open(nil, sealed, NewKeyring(k2), []byte("machine-a/00000001"))
	if !errors.Is(err, ErrTampered) || !errors.Is(err, ErrUnknownKey) {
		t.Errorf("unknown key: err = %v, want ErrTampered and ErrUnknownKey", err)
	}

	// Keyring with both keys opens it.
	if _, err := Open(nil, sealed, NewKeyring(k2, key), []byte("machine-a/00000001")); err != nil {
		t.Errorf("keyring: %v", err)
	}
}

func TestKeyNeverPrintsMaterial(t *testing.T) {
	material := bytes.Repeat([]byte{0xab}, KeySize)
	k, err := NewKey(KeyID{0xde, 0xad, 0xbe, 0xef}, material)
	if err != nil {
		t.Fatal(err)
	}
	var logged bytes.Buffer
	slog.New(slog.NewTextHandler(&logged, nil)).Info("x", "key", k)
	outs := []string{
		fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s %x %q", k, k, k, k, k, k),
		fmt.Sprintf("%+v", struct{ K *Key }{k}), fmt.Sprintf("%#v", []*Key{k}),
		logged.String(),
	}
	for _, s := range outs {
		if strings.Contains(s, "abab") || strings.Contains(strings.ToLower(s), "ababab") || strings.Contains(s, "\xab\xab") {
			t.Errorf("key material printed: %q", s)
		}
		if !strings.Contains(s, "deadbeef") {
			t.Errorf("key id missing from %q", s)
		}
	}
	if _, err := NewKey(KeyID{}, material[:16]); err == nil {
		t.Error("NewKey accepted a 16-byte key")
	}
}

func TestWrapUnwrap(t *testing.T) {
	rk := NewRecoveryKey()
	dk, id := NewDataKey()
	w, err := WrapKey(rk, dk, id)
	if err != nil {
		t.Fatal(err)
	}
	if len(w) != WrappedKeySize || bytes.Contains(w, dk) {
		t.Fatalf("wrapped key has %d bytes or contains the key", len(w))
	}
	got, err := UnwrapKey(rk, w, id)
	if err != nil || !bytes.Equal(got, dk) {
		t.Fatalf("unwrap: %v", err)
	}
	otherID := id
	otherID[0] ^= 1
	if _, err := UnwrapKey(rk, w, otherID); !errors.Is(err, ErrTampered) {
		t.Errorf("other key id: err = %v, want ErrTampered", err)
	}
	if _, err := UnwrapKey(NewRecoveryKey(), w, id); !errors.Is(err, ErrTampered) {
		t.Errorf("other recovery key: err = %v, want ErrTampered", err)
	}
	for i := range w {
		c := bytes.Clone(w)
		c[i] ^= 0x10
		if _, err := UnwrapKey(rk, c, id); !errors.Is(err, ErrTampered) {
			t.Fatalf("byte %d flipped: err = %v, want ErrTampered", i, err)
		}
	}
	if _, err := WrapKey(rk[:16], dk, id); err == nil {
		t.Error("WrapKey accepted a short recovery key")
	}
}

func TestRecoveryKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "recovery.key")
	rk := NewRecoveryKey()
	if err := WriteRecoveryKey(path, rk); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %o, want 600", fi.Mode().Perm())
	}
	got, err := LoadRecoveryKey(path)
	if err != nil || !bytes.Equal(got, rk) {
		t.Fatalf("load: %v", err)
	}
	if err := WriteRecoveryKey(path, NewRecoveryKey()); err == nil {
		t.Fatal("WriteRecoveryKey overwrote an existing recovery key")
	}
	if again, _ := LoadRecoveryKey(path); !bytes.Equal(again, rk) {
		t.Fatal("recovery key changed by refused overwrite")
	}

	raw, _ := os.ReadFile(path)
	if !strings.HasPrefix(string(raw), "lifeboat-recovery-key v1\n") {
		t.Errorf("file lacks header line: %q", raw[:30])
	}

	// A typo in the key is caught by the fingerprint, and not echoed.
	for name, content := range map[string][]byte{
		"typo":     flipHexDigit(raw),
		"garbage":  []byte("lifeboat-recovery-key v1\nfingerprint: 00\nkey: zz\n"),
		"noheader": raw[len("lifeboat-recovery-key v1\n"):],
	} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, content, 0o600)
		_, err := LoadRecoveryKey(p)
		if err == nil {
			t.Errorf("%s: loaded a bad recovery key file", name)
			continue
		}
		if strings.Contains(err.Error(), fmt.Sprintf("%x", rk[:8])) {
			t.Errorf("%s: error leaks key material: %v", name, err)
		}
	}

	os.Chmod(path, 0o644)
	if _, err := LoadRecoveryKey(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("world-readable key file: err = %v", err)
	}
	// To read the account (recover from a key on a FAT stick, whose
	// modes cannot change): used, with a warning.
	var warn strings.Builder
	if got, err := LoadRecoveryKeyToRead(path, &warn); err != nil || !bytes.Equal(got, rk) || !strings.Contains(warn.String(), "chmod 600") {
		t.Errorf("world-readable key file to read: %v, warned %q", err, warn.String())
	}

	// Another user's file in its place (as root: chown to nobody).
	t.Run("another user's file", func(t *testing.T) {
		testenv.RequireRoot(t)
		os.Chmod(path, 0o600)
		if err := os.Chown(path, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadRecoveryKey(path); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
			t.Errorf("key file of another user: err = %v", err)
		}
	})

	// A directory named by mistake is not "accessible by others".
	if _, err := LoadRecoveryKey(dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory: err = %v", err)
	}

	// A hand-made key whose fingerprint matches (anyone can compute one).
	zero := make([]byte, KeySize)
	weak := filepath.Join(dir, "weak")
	os.WriteFile(weak, fmt.Appendf(nil, "lifeboat-recovery-key v1\nfingerprint: %s\nkey: %x\n", Fingerprint(zero), zero), 0o600)
	if _, err := LoadRecoveryKey(weak); err == nil || !strings.Contains(err.Error(), "one byte repeated") {
		t.Errorf("all-zero key: err = %v", err)
	}
}

// flipHexDigit changes the last hex digit of the key line.
func flipHexDigit(raw []byte) []byte {
	c := bytes.Clone(raw)
	i := bytes.LastIndexByte(c[:len(c)-1], '\n') + len("key: ") + 10 + 1
	if c[i] == '0' {
		c[i] = '1'
	} else {
		c[i] = '0'
	}
	return c
}

func FuzzOpen(f *testing.F) {
	key := testKey(f)
	aad := []byte("fuzz/blob")
	for _, alg := range []Alg{AlgNone, AlgZstd, AlgS2} {
		s, _ := SealWith(alg, nil, mixedData(2000, 5), key, aad)
		f.Add(s)
	}
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, sealed []byte) {
		out, err := Open(nil, sealed, key, aad)
		if err != nil {
			if !errors.Is(err, ErrTampered) && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("unexpected error class: %v", err)
			}
			if len(out) != 0 {
				t.Fatal("data returned with error")
			}
			return
		}
		// Anything that opens must be bound to its aad.
		if _, err := Open(nil, sealed, key, []byte("other")); !errors.Is(err, ErrTampered) {
			t.Fatalf("opened under two different aads: %v", err)
		}
	})
}

func benchInputs() map[string][]byte {
	const n = 16 << 20
	return map[string][]byte{"random": randomData(n, 10), "mixed": mixedData(n, 11)}
}

// BenchmarkCompress measures the candidate compressors alone; the numbers
// in the package doc come from here. ratio = compressed/plain.
func BenchmarkCompress(b *testing.B) {
	for _, input := range []string{"random", "mixed"} {
		plain := benchInputs()[input]
		for _, alg := range []Alg{AlgZstd, AlgS2} {
			var comp []byte
			switch alg {
			case AlgZstd:
				comp = zstdEnc().EncodeAll(plain, nil)
			case AlgS2:
				comp = s2.Encode(nil, plain)
			}
			b.Run(fmt.Sprintf("%s/%s/compress", input, alg), func(b *testing.B) {
				b.SetBytes(int64(len(plain)))
				buf := make([]byte, 0, len(comp)+1<<20)
				for b.Loop() {
					switch alg {
					case AlgZstd:
						buf = zstdEnc().EncodeAll(plain, buf[:0])
					case AlgS2:
						buf = s2.Encode(buf[:cap(buf)], plain)
					}
				}
				b.ReportMetric(float64(len(comp))/float64(len(plain)), "ratio")
			})
			b.Run(fmt.Sprintf("%s/%s/decompress", input, alg), func(b *testing.B) {
				b.SetBytes(int64(len(plain)))
				buf := make([]byte, 0, len(plain))
				for b.Loop() {
					var err error
					switch alg {
					case AlgZstd:
						buf, err = zstdDec().DecodeAll(comp, buf[:0])
					case AlgS2:
						buf, err = s2.Decode(buf[:cap(buf)], comp)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkSealOpen(b *testing.B) {
	key := testKey(b)
	aad := []byte("machine/0000000000000001")
	for _, input := range []string{"random", "mixed"} {
		plain := benchInputs()[input][:4<<20]
		sealed, _ := Seal(nil, plain, key, aad)
		b.Run(input+"/seal", func(b *testing.B) {
			b.SetBytes(int64(len(plain)))
			buf := make([]byte, 0, len(plain)+Overhead)
			for b.Loop() {
				buf, _ = Seal(buf[:0], plain, key, aad)
			}
		})
		b.Run(input+"/open", func(b *testing.B) {
			b.SetBytes(int64(len(plain)))
			buf := make([]byte, 0, len(plain))
			for b.Loop() {
				var err error
				if buf, err = Open(buf[:0], sealed, key, aad); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// A payload that authenticates but whose header lies about the length (a
// broken sealer holding the key) must fail cleanly, not over-allocate.
func TestAuthenticCorruptPayload(t *testing.T) {
	key := testKey(t)
	plain := mixedData(10_000, 8)
	for _, alg := range []Alg{AlgZstd, AlgS2} {
		for _, claim := range []uint64{1, 9_999, 10_001, MaxPlainSize} {
			var body []byte
			if alg == AlgS2 {
				body = s2.Encode(nil, plain)
			} else {
				body = zstdEnc().EncodeAll(plain, nil)
			}
			sealed, _ := SealWith(AlgNone, nil, body, key, nil) // header for len(body) ...
			hdr := bytes.Clone(sealed[:headerSize])
			hdr[5] = byte(alg)
			binary.LittleEndian.PutUint64(hdr[28:], claim) // ... rewritten and re-sealed
			forged := key.aead.Seal(hdr, hdr[16:28], body, additionalData(hdr, nil))
			out, err := Open(nil, forged, key, nil)
			if !errors.Is(err, ErrCorrupt) || len(out) != 0 {
				t.Errorf("%s claiming %d bytes: %d bytes, %v; want ErrCorrupt", alg, claim, len(out), err)
			}
		}
	}
}

// Open relies on zstd frames recording their content size; check it holds
// across block-size boundaries.
func TestZstdFrameSizes(t *testing.T) {
	key := testKey(t)
	for _, n := range []int{2, 64, 255, 256, 1 << 16, 1<<16 + 1, 128<<10 + 7, 5 << 20} {
		plain := make([]byte, n)
		sealed, err := SealWith(AlgZstd, nil, plain, key, nil)
		if err != nil {
			t.Fatal(err)
		}
		if Alg(sealed[5]) != AlgZstd {
			continue
		}
		if got, err := Open(nil, sealed, key, nil); err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("%d zero bytes: %v", n, err)
		}
	}
}

// SealInPlace builds, in the plaintext's own buffer, a blob Open reads
// like SealWith's, compressed or not; a buffer without room for the tag
// is refused. Its progress calls grow a prefix of the blob, in order, to
// the whole blob, whose length the first call already gives.
func TestSealInPlace(t *testing.T) {
	key := testKey(t)
	aad := []byte("m/journal/x")
	rng := rand.New(rand.NewPCG(1, 2))
	random := make([]byte, 100_000)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := bytes.Repeat([]byte("lifeboat in place "), 5000)
	for _, plain := range [][]byte{random, text, {}} {
		for _, alg := range []Alg{AlgNone, AlgS2, AlgZstd} {
			buf := make([]byte, HeaderSize+len(plain), HeaderSize+len(plain)+TagSize)
			copy(buf[HeaderSize:], plain)
			var calls, last, first int
			var seen []byte // the bytes progress reported, as reported
			blob, err := SealInPlace(alg, buf, key, aad, func(done []byte, total int) {
				if calls++; calls == 1 {
					first = total
				}
				if len(done) < last || len(done) > total || total != first {
					t.Fatalf("%s: progress %d of %d after %d of %d", alg, len(done), total, last, first)
				}
				seen = append(seen, done[last:]...)
				last = len(done)
			})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(seen, blob) || first != len(blob) || calls < 1+len(blob)/(64<<10) {
				t.Fatalf("%s, %d bytes: progress saw %d bytes in %d calls, blob %d bytes", alg, len(plain), len(seen), calls, len(blob))
			}
			if &blob[0] != &buf[0] {
				t.Fatalf("%s: blob not built in place", alg)
			}
			got, err := Open(nil, blob, key, aad)
			if err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("%s, %d bytes: Open = %d bytes, %v", alg, len(plain), len(got), err)
			}
			if alg != AlgNone && len(plain) > 0 && bytes.Equal(plain, text) && len(blob) >= len(plain) {
				t.Errorf("%s: compressible text not compressed (%d bytes sealed)", alg, len(blob))
			}
		}
	}
	if _, err := SealInPlace(AlgNone, make([]byte, HeaderSize+10), key, aad, nil); err == nil {
		t.Error("a buffer with no room for the tag was accepted")
	}
}
