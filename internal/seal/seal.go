// Package seal turns a cache segment into the blob that is uploaded to
// object storage, and back: compress, then encrypt with AES-256-GCM under a
// per-machine data key (internal/aesgcm: VAES where the CPU has it).
//
// A sealed blob is
//
//	magic "LBSL" | version 1 | alg | 2 reserved zero bytes | key id (8) |
//	nonce (12) | plain length (uint64 LE) | GCM(ciphertext || 16-byte tag)
//
// The 36-byte header is authenticated (it is GCM additional data) together
// with caller-supplied additional data, typically the blob name: a blob that
// is renamed, truncated, swapped for another machine's blob or modified in
// any single byte fails to open with ErrTampered.
//
// Seal, Open and a Key are safe for concurrent use.
//
// # Choice of compressor
//
// Measured with BenchmarkCompress on 16 MiB inputs (-benchtime=1s
// -count=3, median; AMD EPYC VM with 2 shared cores, go1.26.8,
// klauspost/compress v1.20.4; MB/s of plain data, ratio is
// compressed/plain, one goroutine per call):
//
//	input   alg           compress   decompress   ratio
//	random  zstd fastest   1446 MB/s    8681 MB/s  1.000
//	random  s2            14925 MB/s   25474 MB/s  1.000
//	mixed   zstd fastest    514 MB/s    2322 MB/s  0.379
//	mixed   s2             1474 MB/s    3236 MB/s  0.398
//
// "mixed" imitates an ext4 change stream: 4 KiB blocks that are 40% text,
// 30% zeros and 30% random. S2 compresses 2.9x faster on mixed data (10x on
// incompressible data, where zstd burns CPU for nothing) for output 5%
// larger. The process server seals every byte every agent sends and is
// CPU-bound on small boxes, so DefaultAlg is AlgS2; AlgZstd remains for
// links where egress costs more than CPU. The algorithm is recorded in the
// header, so Open reads both; data that does not shrink is stored as
// AlgNone. End to end (BenchmarkSealOpen, 4 MiB, S2 + AES-GCM): seal 1400
// MB/s and open 2780 MB/s on mixed data, 4370 / 4660 MB/s on random data.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/lifeboat-dr/lifeboat/internal/aesgcm"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
)

// Alg identifies the compression applied before encryption.
type Alg uint8

// Compression algorithms. The numeric values are part of the sealed format.
const (
	AlgNone Alg = 0 // stored as is (used when compression does not shrink the data)
	AlgZstd Alg = 1 // zstd, SpeedFastest
	AlgS2   Alg = 2 // S2 block format
)

// DefaultAlg is the compressor Seal uses; see the package doc for the
// measurements behind it.
const DefaultAlg = AlgS2

func (a Alg) String() string {
	switch a {
	case AlgNone:
		return "none"
	case AlgZstd:
		return "zstd"
	case AlgS2:
		return "s2"
	}
	return fmt.Sprintf("alg(%d)", uint8(a))
}

const (
	magic      = "LBSL"
	version    = 1
	nonceSize  = 12
	tagSize    = 16
	headerSize = 4 + 1 + 1 + 2 + 8 + nonceSize + 8 // 36

	// KeySize is the length of data and recovery keys (AES-256).
	KeySize = 32

	// MaxPlainSize bounds the plaintext of one blob. Segments are at most
	// tens of MiB; the bound stops a corrupt (or hostile but keyed) header
	// from making Open allocate without limit.
	MaxPlainSize = 1 << 30
)

// Overhead is the number of bytes Seal adds to the compressed payload.
const Overhead = headerSize + tagSize

// HeaderSize and TagSize are the parts of Overhead before and after the
// payload (see SealInPlace).
const (
	HeaderSize = headerSize
	TagSize    = tagSize
)

var (
	// ErrTampered is returned (wrapped with context) by Open and UnwrapKey
	// when a blob fails authentication: it was modified or truncated, was
	// sealed with other additional data (e.g. under another blob name), or
	// the key is wrong or missing. Its content must not be used.
	ErrTampered = errors.New("sealed data failed authentication (tampered, truncated, wrong key or wrong name)")

	// ErrUnknownKey is returned together with ErrTampered when the keyring
	// has no key with the blob's key id.
	ErrUnknownKey = errors.New("no key with this id in keyring")

	// ErrCorrupt is returned when an authenticated payload does not
	// decompress to its recorded length: the data was produced by a broken
	// sealer, not modified in transit.
	ErrCorrupt = errors.New("sealed payload is authentic but does not decompress")
)

// KeyID names a data key. It is stored in clear in every sealed blob so
// Open can pick the key from a keyring; it reveals nothing about the key.
type KeyID [8]byte

func (id KeyID) String() string { return hex.EncodeToString(id[:]) }

// Key is a data key ready for sealing. It never exposes its material:
// String, GoString, Format and LogValue print only the id, so a Key can be
// logged or put in an error without leaking.
type Key struct {
	id   KeyID
	aead *aesgcm.GCM // standard GCM, with VAES where the CPU has it
}

// NewKey builds a Key from 32 bytes of key material. material is not
// retained; callers should clear it when done.
func NewKey(id KeyID, material []byte) (*Key, error) {
	if len(material) != KeySize {
		return nil, fmt.Errorf("seal: data key %s has %d bytes, want %d", id, len(material), KeySize)
	}
	aead, err := aesgcm.New(material)
	if err != nil {
		return nil, fmt.Errorf("seal: data key %s: %w", id, err)
	}
	return &Key{id: id, aead: aead}, nil
}

// NewDataKey returns fresh random key material and a random id for it.
func NewDataKey() (material []byte, id KeyID) {
	material = make([]byte, KeySize)
	rand.Read(material)
	rand.Read(id[:])
	return material, id
}

// ID returns the key's id.
func (k *Key) ID() KeyID { return k.id }

// String prints only the key id.
func (k *Key) String() string {
	if k == nil {
		return "seal.Key(nil)"
	}
	return "seal.Key(" + k.id.String() + ")"
}

// GoString prints only the key id, also for %#v.
func (k *Key) GoString() string { return k.String() }

// Format prints only the key id for every verb, so no fmt verb can reach
// the cipher state.
func (k *Key) Format(f fmt.State, _ rune) { fmt.Fprint(f, k.String()) }

// LogValue makes slog print only the key id.
func (k *Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// Lookup makes a single Key usable as a Keyring.
func (k *Key) Lookup(id KeyID) (*Key, bool) {
	if k == nil || k.id != id {
		return nil, false
	}
	return k, true
}

// Keyring finds data keys by id, so that blobs sealed before a key
// rotation still open.
type Keyring interface {
	Lookup(id KeyID) (*Key, bool)
}

// Keys is a fixed Keyring.
type Keys map[KeyID]*Key

// NewKeyring returns a Keyring holding keys.
func NewKeyring(keys ...*Key) Keys {
	m := make(Keys, len(keys))
	for _, k := range keys {
		m[k.id] = k
	}
	return m
}

// Lookup returns the key with the given id.
func (m Keys) Lookup(id KeyID) (*Key, bool) {
	k, ok := m[id]
	return k, ok
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// The zstd coders are safe for concurrent EncodeAll/DecodeAll and costly to
// build, so they are shared. CRCs are off: GCM already authenticates.
var (
	zstdEnc = sync.OnceValue(func() *zstd.Encoder {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderCRC(false))
		if err != nil {
			panic(fmt.Sprintf("seal: zstd encoder: %v", err)) // only fails on invalid options
		}
		return e
	})
	zstdDec = sync.OnceValue(func() *zstd.Decoder {
		d, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(MaxPlainSize), zstd.WithDecodeAllCapLimit(true), zstd.IgnoreChecksum(true))
		if err != nil {
			panic(fmt.Sprintf("seal: zstd decoder: %v", err))
		}
		return d
	})
)

// scratch holds the compressed form between the compressor and the cipher;
// pooling it keeps Seal and Open free of per-call large allocations.
var scratch sync.Pool

func getScratch(n int) *[]byte {
	if p, ok := scratch.Get().(*[]byte); ok && cap(*p) >= n {
		return p
	}
	b := make([]byte, 0, n)
	return &b
}

func putScratch(p *[]byte) {
	*p = (*p)[:0]
	scratch.Put(p)
}

// Seal compresses plain with DefaultAlg, encrypts it under key binding aad,
// appends the sealed blob to dst and returns the extended slice. aad is not
// stored; Open must be given the same bytes.
func Seal(dst, plain []byte, key *Key, aad []byte) ([]byte, error) {
	return SealWith(DefaultAlg, dst, plain, key, aad)
}

// SealWith is Seal with an explicit compressor. If compression does not
// shrink plain, the blob records AlgNone and stores plain as is.
func SealWith(alg Alg, dst, plain []byte, key *Key, aad []byte) ([]byte, error) {
	return sealWith(alg, dst, plain, key, aad, nil)
}

// Progress is told, while a blob is sealed, how much of it is final:
// done is the blob's first bytes, which grow from call to call until the
// last call, which has the whole blob (total bytes, known from the first
// call). It lets the caller read each piece once, while it is still in
// the CPU cache (for checksums); it must not modify done.
type Progress func(done []byte, total int)

// progressChunk is the ciphertext Progress is told of at a time: small
// enough to stay in the CPU cache until read.
const progressChunk = 64 << 10

func sealWith(alg Alg, dst, plain []byte, key *Key, aad []byte, progress Progress) ([]byte, error) {
	if key == nil || key.aead == nil {
		return dst, errors.New("seal: nil key")
	}
	if len(plain) > MaxPlainSize {
		return dst, fmt.Errorf("seal: plaintext of %d bytes exceeds limit of %d", len(plain), MaxPlainSize)
	}

	body, put, err := compress(alg, plain)
	if err != nil {
		return dst, err
	}
	defer put()
	if body == nil {
		alg, body = AlgNone, plain
	}
	hdr, nonce := newHeader(alg, key, len(plain))
	start, total := len(dst), headerSize+len(body)+tagSize
	if progress == nil {
		dst = append(dst, hdr[:]...)
		return key.aead.Seal(dst, nonce, body, additionalData(hdr[:], aad)), nil
	}
	if cap(dst)-start < total {
		// Progress is handed views of dst: the cipher must not move it.
		dst = append(make([]byte, 0, start+total), dst...)
	}
	dst = append(dst, hdr[:]...)
	blob := dst[start : start+total]
	done := headerSize
	dst = key.aead.SealChunks(dst, nonce, body, additionalData(hdr[:], aad), progressChunk, func(ct []byte) {
		done += len(ct)
		progress(blob[:done:done], total)
	})
	progress(blob[:total:total], total)
	return dst, nil
}

// SealInPlace is SealWith with the blob built in buf itself, without a
// second buffer: buf holds HeaderSize bytes of room, then the plaintext,
// and its capacity leaves TagSize more bytes. It returns the blob, which
// starts at buf[0]; the plaintext is gone. progress, when not nil, is
// told of the blob as it is sealed.
func SealInPlace(alg Alg, buf []byte, key *Key, aad []byte, progress Progress) ([]byte, error) {
	if len(buf) < headerSize || cap(buf)-len(buf) < tagSize {
		return nil, fmt.Errorf("seal: in-place buffer of %d bytes (capacity %d) lacks room for the header or the tag", len(buf), cap(buf))
	}
	// The header goes in front of the plaintext, and the ciphertext
	// exactly over it (dst's spare capacity is the plaintext, which the
	// cipher allows); the capacity check keeps append from moving dst.
	return sealWith(alg, buf[:0], buf[headerSize:], key, aad, progress)
}

// Sampling for Compressible: a few windows spread over the data.
const (
	sampleWindows = 4
	sampleWindow  = 32 << 10
)

// sampleScratch holds Compressible's output buffers, apart from scratch:
// a small buffer drawn there by a segment-sized caller would be dropped
// and a segment-sized one allocated and zeroed instead.
var sampleScratch = sync.Pool{New: func() any {
	b := make([]byte, s2.MaxEncodedLen(sampleWindow))
	return &b
}}

// Compressible estimates, from a sample, whether compressing plain with
// alg would shrink it by at least 1/64: it compresses sampleWindows
// windows of sampleWindow bytes spread evenly over plain with S2 (the
// cheapest estimator; zstd only does better). Data whose sample does not
// shrink is sealed as AlgNone without compressing all of it, which on
// incompressible churn (encrypted or compressed files, media) costs S2's
// slow path for every byte; the decision is made per segment, so a stream
// that becomes compressible is compressed again from its next segment.
// The sample is 1.6 % of an 8 MiB segment: a compressible stretch that
// lies between the windows, or repeats further apart than a window, is
// missed, and that segment is stored as it is. Short data is reported
// compressible: compressing it whole is cheap.
func Compressible(alg Alg, plain []byte) bool {
	if alg == AlgNone {
		return false
	}
	if len(plain) <= 2*sampleWindows*sampleWindow {
		return true
	}
	p := sampleScratch.Get().(*[]byte)
	defer sampleScratch.Put(p)
	step := (len(plain) - sampleWindow) / (sampleWindows - 1)
	in, out := 0, 0
	for i := range sampleWindows {
		w := plain[i*step : i*step+sampleWindow]
		in += len(w)
		out += len(s2.Encode(*p, w))
	}
	return out < in*63/64
}

// compress returns plain compressed with alg in a scratch buffer that put
// gives back, or a nil body when alg is AlgNone or compression does not
// shrink plain.
func compress(alg Alg, plain []byte) (body []byte, put func(), err error) {
	put = func() {}
	switch alg {
	case AlgNone:
		return nil, put, nil
	case AlgS2:
		p := getScratch(s2.MaxEncodedLen(len(plain)))
		body = s2.Encode((*p)[:cap(*p)], plain)
		put = func() { putScratch(p) }
	case AlgZstd:
		p := getScratch(len(plain) + len(plain)/64 + 1024)
		body = zstdEnc().EncodeAll(plain, (*p)[:0])
		*p = body[:0] // keep a grown buffer for the next caller
		put = func() { putScratch(p) }
	default:
		return nil, put, fmt.Errorf("seal: unknown compression %s", alg)
	}
	if len(body) >= len(plain) {
		return nil, put, nil
	}
	return body, put, nil
}

// newHeader returns a blob header for plainLen bytes of plaintext
// compressed with alg, with a fresh random nonce, and that nonce.
func newHeader(alg Alg, key *Key, plainLen int) (hdr [headerSize]byte, nonce []byte) {
	copy(hdr[:], magic)
	hdr[4] = version
	hdr[5] = byte(alg)
	copy(hdr[8:16], key.id[:])
	nonce = hdr[16 : 16+nonceSize]
	// Random 96-bit nonces: NIST's 2^32-messages-per-key bound is 64 PiB of
	// 16 MiB segments per machine key, and no nonce state to lose or roll back.
	rand.Read(nonce)
	binary.LittleEndian.PutUint64(hdr[28:36], uint64(plainLen))
	return hdr, nonce
}

// additionalData is header||aad. The header has a fixed length, so the
// concatenation is unambiguous.
func additionalData(hdr, aad []byte) []byte {
	ad := make([]byte, 0, len(hdr)+len(aad))
	return append(append(ad, hdr...), aad...)
}

// Open authenticates and decrypts sealed with the key its header names,
// using aad as given to Seal, decompresses it, appends the plaintext to dst
// and returns the extended slice. Any authentication failure, including a
// malformed header or an unknown key id, returns an error wrapping
// ErrTampered; nothing is appended then.
func Open(dst, sealed []byte, keys Keyring, aad []byte) ([]byte, error) {
	if len(sealed) < headerSize+tagSize {
		return dst, fmt.Errorf("seal: blob of %d bytes is shorter than the %d-byte minimum: %w", len(sealed), headerSize+tagSize, ErrTampered)
	}
	hdr := sealed[:headerSize]
	if string(hdr[:4]) != magic {
		return dst, fmt.Errorf("seal: bad magic %q: %w", hdr[:4], ErrTampered)
	}
	if hdr[4] != version {
		return dst, fmt.Errorf("seal: unsupported version %d: %w", hdr[4], ErrTampered)
	}
	alg := Alg(hdr[5])
	if alg > AlgS2 || hdr[6] != 0 || hdr[7] != 0 {
		return dst, fmt.Errorf("seal: unknown compression %s or flags %#x: %w", alg, hdr[6:8], ErrTampered)
	}
	var id KeyID
	copy(id[:], hdr[8:16])
	plainLen := binary.LittleEndian.Uint64(hdr[28:36])
	if plainLen > MaxPlainSize {
		return dst, fmt.Errorf("seal: recorded length %d exceeds limit: %w", plainLen, ErrTampered)
	}
	if keys == nil {
		return dst, errors.New("seal: nil keyring")
	}
	key, ok := keys.Lookup(id)
	if !ok || key == nil {
		return dst, fmt.Errorf("seal: key %s: %w: %w", id, ErrTampered, ErrUnknownKey)
	}
	nonce := hdr[16 : 16+nonceSize]
	ct := sealed[headerSize:]
	ad := additionalData(hdr, aad)

	if alg == AlgNone {
		if uint64(len(ct)-tagSize) != plainLen {
			return dst, fmt.Errorf("seal: stored payload length %d, header says %d: %w", len(ct)-tagSize, plainLen, ErrTampered)
		}
		out, err := key.aead.Open(dst, nonce, ct, ad)
		if err != nil {
			return dst, fmt.Errorf("seal: open with key %s: %w", id, ErrTampered)
		}
		return out, nil
	}

	p := getScratch(len(ct))
	defer putScratch(p)
	body, err := key.aead.Open((*p)[:0], nonce, ct, ad)
	if err != nil {
		return dst, fmt.Errorf("seal: open with key %s: %w", id, ErrTampered)
	}
	start := len(dst)
	switch alg {
	case AlgS2:
		n, err := s2.DecodedLen(body)
		if err != nil || uint64(n) != plainLen {
			return dst, fmt.Errorf("seal: s2 payload decodes to %d bytes, header says %d (%v): %w", n, plainLen, err, ErrCorrupt)
		}
		dst = grow(dst, n)
		if _, err := s2.Decode(dst[start:start+n], body); err != nil {
			return dst[:start], fmt.Errorf("seal: s2: %v: %w", err, ErrCorrupt)
		}
		return dst[:start+n], nil
	default: // AlgZstd
		// Check the frame's own size before allocating plainLen bytes, as
		// S2's DecodedLen does above. The encoder omits the size only for
		// content under 256 bytes. With the cap limit set, DecodeAll never
		// writes past plainLen either way.
		var zh zstd.Header
		err := zh.Decode(body)
		if err != nil || (zh.HasFCS && zh.FrameContentSize != plainLen) || (!zh.HasFCS && plainLen >= 256) {
			return dst, fmt.Errorf("seal: zstd frame of %d bytes (%v), header says %d: %w", zh.FrameContentSize, err, plainLen, ErrCorrupt)
		}
		dst = grow(dst, int(plainLen))
		out, err := zstdDec().DecodeAll(body, dst[:start:start+int(plainLen)])
		if err != nil || uint64(len(out)-start) != plainLen {
			return dst[:start], fmt.Errorf("seal: zstd payload (%v) decoded to %d bytes, header says %d: %w", err, len(out)-start, plainLen, ErrCorrupt)
		}
		return out, nil
	}
}

// grow returns b extended by n bytes, reallocating only when cap is short.
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b[:len(b)+n]
	}
	nb := make([]byte, len(b)+n)
	copy(nb, b)
	return nb
}
