//go:build !purego

package aesgcm

import (
	"crypto/subtle"
	"encoding/binary"

	"golang.org/x/sys/cpu"
)

var haveVAES = cpu.X86.HasAVX2 && cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VL &&
	cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ && cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ

//go:noescape
func expandKey(key *[32]byte, rk *[240]byte)

//go:noescape
func initTable(rk *[240]byte, htab *[512]byte)

//go:noescape
func ghashBlocks(htab *[512]byte, acc *[16]byte, data *byte, n int)

//go:noescape
func decBulk(rk *[240]byte, htab *[512]byte, dst, src *byte, n int, ctr, acc *[16]byte)

//go:noescape
func encBlock(rk *[240]byte, dst, src *[16]byte)

//go:noescape
func encBulk(rk *[240]byte, htab *[512]byte, dst, src *byte, n int, ctr, acc *[16]byte)

// round is what one turn of encBulk seals: 32 blocks.
const round = 512

// maxCall bounds the bytes one assembly call handles (about 120 µs).
const maxCall = 1 << 20

type fastGCM struct {
	htab [512]byte // H^32 … H^1 for GHASH (first: 64-byte loads stay in one cache line)
	rk   [240]byte // AES-256 round keys
}

func newFast(key []byte) *fastGCM {
	if !haveVAES {
		return nil
	}
	f := &fastGCM{}
	expandKey((*[32]byte)(key), &f.rk)
	initTable(&f.rk, &f.htab)
	return f
}

// ghash folds data into acc, the last partial block padded with zeros.
func (f *fastGCM) ghash(acc *[16]byte, data []byte) {
	if n := len(data) / 16; n > 0 {
		ghashBlocks(&f.htab, acc, &data[0], n)
	}
	if r := len(data) % 16; r > 0 {
		var last [16]byte
		copy(last[:], data[len(data)-r:])
		ghashBlocks(&f.htab, acc, &last[0], 1)
	}
}

func (f *fastGCM) seal(dst, nonce, plaintext, aad []byte, chunk int, fn func([]byte)) []byte {
	ret, out := sliceForAppend(dst, len(plaintext)+Overhead)
	if inexactOverlap(out, plaintext) {
		panic("aesgcm: invalid buffer overlap")
	}
	j0, ctr, acc := f.start(nonce, aad)

	if fn == nil {
		chunk = maxCall // the goroutine cannot be preempted inside encBulk
	}
	for done := 0; done < len(plaintext); {
		n := min(chunk, len(plaintext)-done)
		bulk := n &^ (round - 1)
		if bulk > 0 {
			encBulk(&f.rk, &f.htab, &out[done], &plaintext[done], bulk/round, &ctr, &acc)
		}
		if bulk < n {
			f.tail(out[done+bulk:done+n], plaintext[done+bulk:done+n], &ctr, &acc)
		}
		if fn != nil {
			fn(out[done : done+n : done+n])
		}
		done += n
	}

	f.tag((*[16]byte)(out[len(plaintext):]), &acc, &j0, len(aad), len(plaintext))
	return ret
}

// start returns a message's J0 (its tag's counter block), its first data
// counter block and GHASH folded over aad.
func (f *fastGCM) start(nonce, aad []byte) (j0, ctr, acc [16]byte) {
	copy(j0[:], nonce)
	j0[15] = 1
	ctr = j0
	ctr[15] = 2
	f.ghash(&acc, aad)
	return j0, ctr, acc
}

// tail seals the last bytes of a message, under a round.
func (f *fastGCM) tail(out, in []byte, ctr, acc *[16]byte) {
	f.ctrTail(out, in, ctr)
	f.ghash(acc, out)
}

// ctrTail XORs in with the key stream from ctr into out, a block at a
// time (the last bytes of a message, under a round).
func (f *fastGCM) ctrTail(out, in []byte, ctr *[16]byte) {
	var ks [16]byte
	for i := 0; i < len(in); i += 16 {
		encBlock(&f.rk, &ks, ctr)
		binary.BigEndian.PutUint32(ctr[12:], binary.BigEndian.Uint32(ctr[12:])+1)
		e := min(i+16, len(in))
		subtle.XORBytes(out[i:e], in[i:e], ks[:e-i])
	}
}

// open authenticates and decrypts; on failure dst's new bytes are cleared
// and ok is false.
func (f *fastGCM) open(dst, nonce, ciphertext, aad []byte, chunk int, fn func([]byte)) (out []byte, ok bool) {
	tag := ciphertext[len(ciphertext)-Overhead:]
	ct := ciphertext[:len(ciphertext)-Overhead]
	ret, plain := sliceForAppend(dst, len(ct))
	if inexactOverlap(plain, ciphertext) {
		panic("aesgcm: invalid buffer overlap")
	}
	j0, ctr, acc := f.start(nonce, aad)
	if fn == nil {
		chunk = maxCall // the goroutine cannot be preempted inside decBulk
	}
	bulk := len(ct) &^ (round - 1)
	given := 0 // plaintext handed to fn
	for done := 0; done < bulk; {
		n := min(chunk, bulk-done)
		for o := 0; o < n; o += maxCall {
			m := min(maxCall, n-o)
			decBulk(&f.rk, &f.htab, &plain[done+o], &ct[done+o], m/round, &ctr, &acc)
		}
		done += n
		if fn != nil && n == chunk {
			fn(plain[given:done:done])
			given = done
		}
	}
	if bulk < len(ct) {
		// Hash the tail before decrypting it: in place, it is overwritten.
		f.ghash(&acc, ct[bulk:])
		f.ctrTail(plain[bulk:], ct[bulk:], &ctr)
	}
	if fn != nil && given < len(ct) {
		fn(plain[given:len(ct):len(ct)]) // a short last bulk piece and the tail
	}
	var want [16]byte
	f.tag(&want, &acc, &j0, len(aad), len(ct))
	if subtle.ConstantTimeCompare(want[:], tag) != 1 {
		clear(plain)
		return nil, false
	}
	return ret, true
}

// tag finishes GHASH with the lengths block and writes the tag.
func (f *fastGCM) tag(dst *[16]byte, acc, j0 *[16]byte, aadLen, textLen int) {
	var lens [16]byte
	binary.BigEndian.PutUint64(lens[:8], uint64(aadLen)*8)
	binary.BigEndian.PutUint64(lens[8:], uint64(textLen)*8)
	ghashBlocks(&f.htab, acc, &lens[0], 1)
	// acc is byte-reversed; the tag is its reverse XOR AES(K, J0).
	var ks [16]byte
	encBlock(&f.rk, &ks, j0)
	for i := range 16 {
		dst[i] = acc[15-i] ^ ks[i]
	}
}
