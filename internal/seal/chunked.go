package seal

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// A chunked blob (version 2) is sealed a chunk at a time, in any order, so
// that its maker can seal each part of it just before it reads that part
// for something else (the cache's checksums and parity) while the part is
// in the CPU cache. A version 1 blob is one GCM message, which must be
// sealed whole before any of it can be read: on the process server that
// cost a second pass over every segment from memory.
//
//	magic "LBSL" | version 2 | alg | chunk shift | reserved zero byte |
//	key id (8) | nonce (12) | plain length (uint64 LE) |
//	body length (uint64 LE) | body ciphertext | one 16-byte tag per chunk
//
// The body (the compressed payload, or the plaintext with AlgNone) is cut
// into chunks of 1<<chunk shift bytes, the last one shorter, at least one
// chunk even when the body is empty. Chunk c is a GCM message of its own
// with the header's nonce whose last 8 bytes are XORed with c, and the
// header (which holds both lengths) and the caller's additional data as
// additional data: a chunk moved, dropped, cut or taken from another blob
// fails to open. Chunk nonces of one blob differ from its random nonce in
// their low bits only, so two blobs' chunks can share a nonce only if the
// random nonces agree on the other bits (at least 80 of them).
const (
	chunkedVersion    = 2
	chunkedHeaderSize = headerSize + 8 // 44
	chunkShift        = 16             // 64 KiB: one cache stripe
	minChunkShift     = 12
	maxChunkShift     = 24
)

// ChunkedHeaderSize is the room a chunked blob's header takes in front of
// the body (see NewChunked).
const ChunkedHeaderSize = chunkedHeaderSize

// ChunkedTrailer is the room a chunked blob of plainLen bytes of plaintext
// needs after it for its tags (see NewChunked).
func ChunkedTrailer(plainLen int) int {
	return chunkCount(plainLen, chunkShift) * tagSize
}

func chunkCount(bodyLen, shift int) int {
	return max(1, (bodyLen+1<<shift-1)>>shift)
}

// Chunked is a blob being sealed in place, chunk by chunk (see
// NewChunked). It is not safe for concurrent use.
type Chunked struct {
	key    *Key
	blob   []byte // header, body, tags
	body   []byte
	tags   []byte
	ad     []byte
	nonce  [nonceSize]byte
	sealed []bool
	left   int // chunks not sealed yet
}

// NewChunked starts sealing, in place, the plaintext that buf holds after
// ChunkedHeaderSize bytes of room; cap(buf) must leave
// ChunkedTrailer(plaintext length) bytes more. The plaintext is compressed
// with alg first if that shrinks it (the compressed body then replaces it
// in buf), and the header written. Nothing is encrypted yet: Seal does
// that for the chunks a range covers, Finish for all that are left.
func NewChunked(alg Alg, buf []byte, key *Key, aad []byte) (*Chunked, error) {
	if key == nil || key.aead == nil {
		return nil, errors.New("seal: nil key")
	}
	if len(buf) < chunkedHeaderSize {
		return nil, fmt.Errorf("seal: in-place buffer of %d bytes lacks room for the %d-byte header", len(buf), chunkedHeaderSize)
	}
	plain := buf[chunkedHeaderSize:]
	if len(plain) > MaxPlainSize {
		return nil, fmt.Errorf("seal: plaintext of %d bytes exceeds limit of %d", len(plain), MaxPlainSize)
	}
	if cap(buf)-len(buf) < ChunkedTrailer(len(plain)) {
		return nil, fmt.Errorf("seal: in-place buffer of %d bytes (capacity %d) lacks room for %d bytes of tags", len(buf), cap(buf), ChunkedTrailer(len(plain)))
	}
	body, put, err := compress(alg, plain)
	if err != nil {
		return nil, err
	}
	if body == nil {
		alg, body = AlgNone, plain
	} else {
		body = plain[:copy(plain, body)]
	}
	put()
	n := chunkCount(len(body), chunkShift)
	c := &Chunked{
		key:    key,
		blob:   buf[:chunkedHeaderSize+len(body)+n*tagSize],
		body:   body,
		sealed: make([]bool, n),
		left:   n,
	}
	c.tags = c.blob[chunkedHeaderSize+len(body):]
	v1, nonce := newHeader(alg, key, len(plain))
	hdr := c.blob[:chunkedHeaderSize]
	copy(hdr, v1[:])
	hdr[4] = chunkedVersion
	hdr[6] = chunkShift
	binary.LittleEndian.PutUint64(hdr[headerSize:], uint64(len(body)))
	copy(c.nonce[:], nonce)
	c.ad = additionalData(hdr, aad)
	return c, nil
}

// Len is the length of the finished blob.
func (c *Chunked) Len() int { return len(c.blob) }

// BodyLen is the length of the body: the plaintext's, or less when
// compression shrank it.
func (c *Chunked) BodyLen() int { return len(c.body) }

// Seal encrypts the chunks under blob bytes [off, off+n) that are not
// encrypted yet, so that those bytes are final. A range that reaches the
// tags seals every chunk left first (each tag is written when its chunk
// is sealed).
func (c *Chunked) Seal(off, n int) {
	if c.left == 0 || n <= 0 {
		return
	}
	end := off + n
	tagsAt := len(c.blob) - len(c.tags)
	if end > tagsAt {
		c.sealRange(0, len(c.sealed))
		return
	}
	lo := max(off-chunkedHeaderSize, 0)
	hi := end - chunkedHeaderSize
	if hi <= lo {
		return // the header only
	}
	c.sealRange(lo>>chunkShift, min((hi-1)>>chunkShift+1, len(c.sealed)))
}

// Finish seals whatever is left and returns the blob, which starts at
// buf[0] of NewChunked.
func (c *Chunked) Finish() []byte {
	c.sealRange(0, len(c.sealed))
	return c.blob
}

func (c *Chunked) sealRange(from, to int) {
	for i := from; i < to; i++ {
		if !c.sealed[i] {
			c.sealChunk(i)
		}
	}
}

// sealChunk encrypts chunk i where it lies. GCM writes the tag right
// after the ciphertext, over the next 16 bytes (the next chunk, or tags):
// they are kept aside and put back, and the tag moved to its slot.
func (c *Chunked) sealChunk(i int) {
	s := i << chunkShift
	e := min(s+1<<chunkShift, len(c.body))
	var keep, nonce [tagSize]byte
	after := c.blob[chunkedHeaderSize+e : chunkedHeaderSize+e+tagSize]
	copy(keep[:], after)
	chunkNonce(nonce[:nonceSize], c.nonce[:], i)
	c.key.aead.Seal(c.body[s:s], nonce[:nonceSize], c.body[s:e], c.ad)
	var tag [tagSize]byte
	copy(tag[:], after)
	copy(after, keep[:]) // before the tag goes in: they may overlap
	copy(c.tags[i*tagSize:], tag[:])
	c.sealed[i] = true
	c.left--
}

// chunkNonce writes chunk i's nonce: base with i XORed into its last 8
// bytes.
func chunkNonce(dst, base []byte, i int) {
	copy(dst, base)
	binary.LittleEndian.PutUint64(dst[4:], binary.LittleEndian.Uint64(base[4:])^uint64(i))
}

// openChunked authenticates and decrypts the body of chunked blob sealed
// (its header already checked by Open) into a buffer from out.
func openChunked(sealed []byte, key *Key, aad []byte, out func(n int) []byte) ([]byte, error) {
	hdr := sealed[:chunkedHeaderSize]
	shift := int(hdr[6])
	if shift < minChunkShift || shift > maxChunkShift || hdr[7] != 0 {
		return nil, fmt.Errorf("seal: chunk shift %d or flags %#x: %w", shift, hdr[7], ErrTampered)
	}
	bodyLen := binary.LittleEndian.Uint64(hdr[headerSize:])
	if bodyLen > MaxPlainSize {
		return nil, fmt.Errorf("seal: recorded body length %d exceeds limit: %w", bodyLen, ErrTampered)
	}
	n := chunkCount(int(bodyLen), shift)
	if want := uint64(chunkedHeaderSize) + bodyLen + uint64(n*tagSize); uint64(len(sealed)) != want {
		return nil, fmt.Errorf("seal: blob of %d bytes, header says %d: %w", len(sealed), want, ErrTampered)
	}
	ct := sealed[chunkedHeaderSize : chunkedHeaderSize+int(bodyLen)]
	tags := sealed[chunkedHeaderSize+int(bodyLen):]
	ad := additionalData(hdr, aad)
	body := out(int(bodyLen))
	p := getScratch(1<<shift + tagSize)
	defer putScratch(p)
	var nonce [nonceSize]byte
	for i := range n {
		s := i << shift
		e := min(s+1<<shift, len(ct))
		msg := append(append((*p)[:0], ct[s:e]...), tags[i*tagSize:(i+1)*tagSize]...)
		chunkNonce(nonce[:], hdr[16:16+nonceSize], i)
		if _, err := key.aead.Open(body[s:s], nonce[:], msg, ad); err != nil {
			return nil, fmt.Errorf("seal: open chunk %d with key %s: %w", i, key.id, ErrTampered)
		}
	}
	return body, nil
}
