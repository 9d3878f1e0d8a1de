// Package aesgcm seals with AES-256-GCM faster than crypto/cipher where
// the CPU has VAES and VPCLMULQDQ on 512-bit registers (x86-64 with
// AVX-512): 32 blocks per loop round instead of 8 with 128-bit AES-NI.
// The output is standard GCM, byte for byte what crypto/cipher produces
// (tests compare them), so anything opens it; Open is the same loop with
// GHASH over its input. Elsewhere both are crypto/cipher's.
//
// Seal also hands the caller each chunk of ciphertext as soon as it is
// sealed (SealChunks), while it is still in the CPU cache, for work that
// must read every byte anyway (checksums).
package aesgcm

import (
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"fmt"
)

// NonceSize and Overhead are GCM's standard 12-byte nonce and 16-byte tag.
const (
	NonceSize = 12
	Overhead  = 16
	KeySize   = 32
)

// GCM seals with one AES-256 key. It is safe for concurrent use.
type GCM struct {
	std  cipher.AEAD // crypto/cipher's, the fallback and the reference
	fast *fastGCM    // nil without the CPU features
}

// New returns a sealer for a 32-byte key.
func New(key []byte) (*GCM, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("aesgcm: key of %d bytes, want %d", len(key), KeySize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	std, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &GCM{std: std, fast: newFast(key)}, nil
}

// Format prints no key material, whatever the verb.
func (g *GCM) Format(f fmt.State, _ rune) { fmt.Fprint(f, "aesgcm.GCM") }

// Accelerated reports whether Seal and Open use the VAES path.
func (g *GCM) Accelerated() bool { return g.fast != nil }

// errOpen is crypto/cipher's message for a message that fails
// authentication.
var errOpen = errors.New("cipher: message authentication failed")

// Open is cipher.AEAD's Open: it authenticates ciphertext (with its tag)
// and aad and appends the plaintext to dst. To open in place, dst must be
// ciphertext[:0]. On failure it returns an error and appends nothing (the
// bytes it had written are cleared).
func (g *GCM) Open(dst, nonce, ciphertext, aad []byte) ([]byte, error) {
	return g.OpenChunks(dst, nonce, ciphertext, aad, 0, nil)
}

// OpenChunks is Open that calls fn with each successive piece of the
// plaintext, chunk bytes long (a multiple of 512; the last piece may be
// shorter), in order, as soon as it is decrypted, while it is in the CPU
// cache: for work that reads every byte anyway (a checksum). fn sees the
// plaintext before the tag is checked; if Open then fails, whatever fn
// made of it must be dropped. Without the fast path the message is opened
// first and then handed out in pieces.
func (g *GCM) OpenChunks(dst, nonce, ciphertext, aad []byte, chunk int, fn func([]byte)) ([]byte, error) {
	if fn != nil && (chunk <= 0 || chunk%512 != 0) {
		panic(errors.New("aesgcm: chunk must be a positive multiple of 512"))
	}
	if g.fast == nil {
		out, err := g.std.Open(dst, nonce, ciphertext, aad)
		if err == nil && fn != nil {
			pieces(out[len(dst):], chunk, fn)
		}
		return out, err
	}
	if len(nonce) != NonceSize {
		panic("aesgcm: incorrect nonce length")
	}
	if len(ciphertext) < Overhead || uint64(len(ciphertext)) > (1<<32-2)*16+Overhead {
		return nil, errOpen
	}
	out, ok := g.fast.open(dst, nonce, ciphertext, aad, chunk, fn)
	if !ok {
		return nil, errOpen
	}
	return out, nil
}

// pieces calls fn with p, chunk bytes at a time.
func pieces(p []byte, chunk int, fn func([]byte)) {
	for len(p) > 0 {
		n := min(chunk, len(p))
		fn(p[:n:n])
		p = p[n:]
	}
}

// Seal is cipher.AEAD's Seal: it appends the ciphertext of plaintext and
// the tag to dst. To seal in place, plaintext must be exactly dst's spare
// capacity (dst[len(dst):len(dst)+len(plaintext)]).
func (g *GCM) Seal(dst, nonce, plaintext, aad []byte) []byte {
	return g.SealChunks(dst, nonce, plaintext, aad, 0, nil)
}

// SealChunks is Seal that calls fn with each successive piece of the
// ciphertext, chunk bytes long (a multiple of 512; the last piece may be
// shorter), in order, once it is sealed, before the tag is appended.
// Without the fast path the whole message is sealed first and then
// handed out in pieces: the result is the same, only colder.
func (g *GCM) SealChunks(dst, nonce, plaintext, aad []byte, chunk int, fn func([]byte)) []byte {
	if len(nonce) != NonceSize {
		panic("aesgcm: incorrect nonce length")
	}
	if uint64(len(plaintext)) > (1<<32-2)*16 {
		panic("aesgcm: message too large for GCM")
	}
	if fn != nil && (chunk <= 0 || chunk%512 != 0) {
		panic(errors.New("aesgcm: chunk must be a positive multiple of 512"))
	}
	if g.fast == nil {
		out := g.std.Seal(dst, nonce, plaintext, aad)
		if fn != nil {
			pieces(out[len(dst):len(dst)+len(plaintext)], chunk, fn)
		}
		return out
	}
	return g.fast.seal(dst, nonce, plaintext, aad, chunk, fn)
}
