//go:build !purego

#include "textflag.h"

// AES-256-GCM with VAES and VPCLMULQDQ on 512-bit registers: 32 blocks
// (512 bytes) per iteration, four to a register. GHASH works in the
// byte-reversed domain with H doubled, as Go's own gcm_amd64.s does (its
// reduction by gcmPoly is copied here), so its partial products of 16
// blocks are summed and reduced once.

DATA bswapMask<>+0(SB)/8, $0x08090a0b0c0d0e0f
DATA bswapMask<>+8(SB)/8, $0x0001020304050607
GLOBL bswapMask<>(SB), RODATA|NOPTR, $16

DATA gcmPoly<>+0(SB)/8, $0x0000000000000001
DATA gcmPoly<>+8(SB)/8, $0xc200000000000000
GLOBL gcmPoly<>(SB), RODATA|NOPTR, $16

// Lane i of the first counter register is the counter plus i (in the
// little-endian domain the counter's low dword comes first).
DATA laneInc<>+0(SB)/8, $0
DATA laneInc<>+8(SB)/8, $0
DATA laneInc<>+16(SB)/8, $1
DATA laneInc<>+24(SB)/8, $0
DATA laneInc<>+32(SB)/8, $2
DATA laneInc<>+40(SB)/8, $0
DATA laneInc<>+48(SB)/8, $3
DATA laneInc<>+56(SB)/8, $0
GLOBL laneInc<>(SB), RODATA|NOPTR, $64

DATA fourInc<>+0(SB)/8, $4
DATA fourInc<>+8(SB)/8, $0
GLOBL fourInc<>(SB), RODATA|NOPTR, $16

// GFMUL sets A to A·H (both in the doubled byte-reversed domain); T0-T2
// are clobbered, P holds gcmPoly.
#define GFMUL(A, H, P, T0, T1, T2) \
	VPCLMULQDQ $0x00, H, A, T0; \
	VPCLMULQDQ $0x11, H, A, T1; \
	VPCLMULQDQ $0x01, H, A, T2; \
	VPCLMULQDQ $0x10, H, A, A; \
	VPXOR      T2, A, A; \
	VPSLLDQ    $8, A, T2; \
	VPSRLDQ    $8, A, A; \
	VPXOR      T2, T0, T0; \
	VPXOR      A, T1, T1; \
	VPCLMULQDQ $0x01, T0, P, T2; \
	VPSHUFD    $0x4e, T0, T0; \
	VPXOR      T2, T0, T0; \
	VPCLMULQDQ $0x01, T0, P, T2; \
	VPSHUFD    $0x4e, T0, T0; \
	VPXOR      T2, T0, T0; \
	VPXOR      T1, T0, A

// The two bulk loops, encBulk and decBulk, share their parts:
//
//	AX round keys, BX htab, DI dst, SI src, CX rounds, DX ctr, R8 acc;
//	Z8 counters (little-endian, lane i = ctr+i), Z9 four per lane,
//	X10 the running hash, X11 gcmPoly, Z16-Z30 round keys, Z31 bswap.

// BULK_START loads the arguments, constants, counters and round keys.
#define BULK_START \
	MOVQ rk+0(FP), AX; \
	MOVQ htab+8(FP), BX; \
	MOVQ dst+16(FP), DI; \
	MOVQ src+24(FP), SI; \
	MOVQ n+32(FP), CX; \
	MOVQ ctr+40(FP), DX; \
	MOVQ acc+48(FP), R8; \
	VBROADCASTI32X4 bswapMask<>(SB), Z31; \
	VBROADCASTI32X4 fourInc<>(SB), Z9; \
	VMOVDQU         gcmPoly<>(SB), X11; \
	VMOVDQU         (R8), X10; \
	VBROADCASTI32X4 (DX), Z8; \
	VPSHUFB         Z31, Z8, Z8; \
	VPADDD          laneInc<>(SB), Z8, Z8; \
	VBROADCASTI32X4 (AX), Z16; \
	VBROADCASTI32X4 16(AX), Z17; \
	VBROADCASTI32X4 32(AX), Z18; \
	VBROADCASTI32X4 48(AX), Z19; \
	VBROADCASTI32X4 64(AX), Z20; \
	VBROADCASTI32X4 80(AX), Z21; \
	VBROADCASTI32X4 96(AX), Z22; \
	VBROADCASTI32X4 112(AX), Z23; \
	VBROADCASTI32X4 128(AX), Z24; \
	VBROADCASTI32X4 144(AX), Z25; \
	VBROADCASTI32X4 160(AX), Z26; \
	VBROADCASTI32X4 176(AX), Z27; \
	VBROADCASTI32X4 192(AX), Z28; \
	VBROADCASTI32X4 208(AX), Z29; \
	VBROADCASTI32X4 224(AX), Z30

// BULK_END stores the next counter and the hash, and clears the round
// keys: they do not outlive the call in registers Go never uses.
#define BULK_END \
	VPSHUFB Z31, Z8, Z8; \
	VMOVDQU X8, (DX); \
	VMOVDQU X10, (R8); \
	VPXORQ Z16, Z16, Z16; \
	VPXORQ Z17, Z17, Z17; \
	VPXORQ Z18, Z18, Z18; \
	VPXORQ Z19, Z19, Z19; \
	VPXORQ Z20, Z20, Z20; \
	VPXORQ Z21, Z21, Z21; \
	VPXORQ Z22, Z22, Z22; \
	VPXORQ Z23, Z23, Z23; \
	VPXORQ Z24, Z24, Z24; \
	VPXORQ Z25, Z25, Z25; \
	VPXORQ Z26, Z26, Z26; \
	VPXORQ Z27, Z27, Z27; \
	VPXORQ Z28, Z28, Z28; \
	VPXORQ Z29, Z29, Z29; \
	VPXORQ Z30, Z30, Z30; \
	VZEROUPPER; \
	RET

#define CTR(R) VPSHUFB Z31, Z8, R; VPADDD Z9, Z8, Z8; VPXORQ Z16, R, R
#define ROUND(K) VAESENC K, Z0, Z0; VAESENC K, Z1, Z1; VAESENC K, Z2, Z2; VAESENC K, Z3, Z3; VAESENC K, Z4, Z4; VAESENC K, Z5, Z5; VAESENC K, Z6, Z6; VAESENC K, Z7, Z7

// KEYSTREAM runs AES on the next 32 counter blocks in Z0-Z7, all but the
// last round (VAESENCLAST Z30).
#define KEYSTREAM \
	CTR(Z0); CTR(Z1); CTR(Z2); CTR(Z3); CTR(Z4); CTR(Z5); CTR(Z6); CTR(Z7); \
	ROUND(Z17); ROUND(Z18); ROUND(Z19); ROUND(Z20); ROUND(Z21); ROUND(Z22); ROUND(Z23); \
	ROUND(Z24); ROUND(Z25); ROUND(Z26); ROUND(Z27); ROUND(Z28); ROUND(Z29)

#define ACCUM(C, OFF) \
	VPCLMULQDQ $0x00, OFF(BX), C, Z15; \
	VPXORQ     Z15, Z12, Z12; \
	VPCLMULQDQ $0x11, OFF(BX), C, Z15; \
	VPXORQ     Z15, Z13, Z13; \
	VPCLMULQDQ $0x01, OFF(BX), C, Z15; \
	VPCLMULQDQ $0x10, OFF(BX), C, C; \
	VPTERNLOGQ $0x96, Z15, C, Z14

// GHASH32 folds the 32 byte-reversed blocks in Z0-Z7 into X10: the
// running hash goes into the first, block i is multiplied by H^(32-i),
// the middle terms go into the halves, the four lanes are summed and
// reduced once.
#define GHASH32 \
	VPXORQ        Z10, Z0, Z0; \
	VPCLMULQDQ    $0x00, (BX), Z0, Z12; \
	VPCLMULQDQ    $0x11, (BX), Z0, Z13; \
	VPCLMULQDQ    $0x01, (BX), Z0, Z14; \
	VPCLMULQDQ    $0x10, (BX), Z0, Z15; \
	VPXORQ        Z15, Z14, Z14; \
	ACCUM(Z1, 64); ACCUM(Z2, 128); ACCUM(Z3, 192); ACCUM(Z4, 256); \
	ACCUM(Z5, 320); ACCUM(Z6, 384); ACCUM(Z7, 448); \
	VPSLLDQ       $8, Z14, Z15; \
	VPSRLDQ       $8, Z14, Z14; \
	VPXORQ        Z15, Z12, Z12; \
	VPXORQ        Z14, Z13, Z13; \
	VEXTRACTI64X4 $1, Z12, Y15; \
	VPXORQ        Y15, Y12, Y12; \
	VEXTRACTI128  $1, Y12, X15; \
	VPXOR         X15, X12, X12; \
	VEXTRACTI64X4 $1, Z13, Y15; \
	VPXORQ        Y15, Y13, Y13; \
	VEXTRACTI128  $1, Y13, X15; \
	VPXOR         X15, X13, X13; \
	VPCLMULQDQ    $0x01, X12, X11, X15; \
	VPSHUFD       $0x4e, X12, X12; \
	VPXOR         X15, X12, X12; \
	VPCLMULQDQ    $0x01, X12, X11, X15; \
	VPSHUFD       $0x4e, X12, X12; \
	VPXOR         X15, X12, X12; \
	VPXOR         X13, X12, X10

// _expand_key_256a/b are Go's (crypto/internal/fips140/aes/aes_amd64.s).
TEXT expand256a<>(SB), NOSPLIT, $0
	PSHUFD $0xff, X1, X1
	SHUFPS $0x10, X0, X4
	PXOR   X4, X0
	SHUFPS $0x8c, X0, X4
	PXOR   X4, X0
	PXOR   X1, X0
	MOVUPS X0, (BX)
	ADDQ   $0x10, BX
	RET

TEXT expand256b<>(SB), NOSPLIT, $0
	PSHUFD $0xaa, X1, X1
	SHUFPS $0x10, X2, X4
	PXOR   X4, X2
	SHUFPS $0x8c, X2, X4
	PXOR   X4, X2
	PXOR   X1, X2
	MOVUPS X2, (BX)
	ADDQ   $0x10, BX
	RET

// func expandKey(key *[32]byte, rk *[240]byte)
TEXT ·expandKey(SB), NOSPLIT, $0-16
	MOVQ   key+0(FP), AX
	MOVQ   rk+8(FP), BX
	MOVUPS (AX), X0
	MOVUPS X0, (BX)
	ADDQ   $0x10, BX
	PXOR   X4, X4
	MOVUPS 16(AX), X2
	MOVUPS X2, (BX)
	ADDQ   $0x10, BX
	AESKEYGENASSIST $0x01, X2, X1
	CALL   expand256a<>(SB)
	AESKEYGENASSIST $0x01, X0, X1
	CALL   expand256b<>(SB)
	AESKEYGENASSIST $0x02, X2, X1
	CALL   expand256a<>(SB)
	AESKEYGENASSIST $0x02, X0, X1
	CALL   expand256b<>(SB)
	AESKEYGENASSIST $0x04, X2, X1
	CALL   expand256a<>(SB)
	AESKEYGENASSIST $0x04, X0, X1
	CALL   expand256b<>(SB)
	AESKEYGENASSIST $0x08, X2, X1
	CALL   expand256a<>(SB)
	AESKEYGENASSIST $0x08, X0, X1
	CALL   expand256b<>(SB)
	AESKEYGENASSIST $0x10, X2, X1
	CALL   expand256a<>(SB)
	AESKEYGENASSIST $0x10, X0, X1
	CALL   expand256b<>(SB)
	AESKEYGENASSIST $0x20, X2, X1
	CALL   expand256a<>(SB)
	AESKEYGENASSIST $0x20, X0, X1
	CALL   expand256b<>(SB)
	AESKEYGENASSIST $0x40, X2, X1
	CALL   expand256a<>(SB)
	RET

// func initTable(rk *[240]byte, htab *[512]byte)
// htab[16*(32-k):] holds H^k, k = 1..32, in the doubled byte-reversed
// domain.
TEXT ·initTable(SB), NOSPLIT, $0-16
	MOVQ    rk+0(FP), SI
	MOVQ    htab+8(FP), DI
	VMOVDQU bswapMask<>(SB), X15
	VMOVDQU gcmPoly<>(SB), X14

	// H = AES(K, 0)
	VPXOR      X0, X0, X0
	VPXOR      (SI), X0, X0
	VAESENC    16(SI), X0, X0
	VAESENC    32(SI), X0, X0
	VAESENC    48(SI), X0, X0
	VAESENC    64(SI), X0, X0
	VAESENC    80(SI), X0, X0
	VAESENC    96(SI), X0, X0
	VAESENC    112(SI), X0, X0
	VAESENC    128(SI), X0, X0
	VAESENC    144(SI), X0, X0
	VAESENC    160(SI), X0, X0
	VAESENC    176(SI), X0, X0
	VAESENC    192(SI), X0, X0
	VAESENC    208(SI), X0, X0
	VAESENCLAST 224(SI), X0, X0
	VPSHUFB    X15, X0, X0

	// H·2 (Go's gcmAesInit)
	VPSHUFD $0xff, X0, X11
	VMOVDQA X0, X12
	VPSRAD  $31, X11, X11
	VPAND   X14, X11, X11
	VPSRLD  $31, X12, X12
	VPSLLDQ $4, X12, X12
	VPSLLD  $1, X0, X0
	VPXOR   X11, X0, X0
	VPXOR   X12, X0, X0

	VMOVDQU X0, 496(DI)
	VMOVDQA X0, X1
	MOVQ    $31, CX
	LEAQ    480(DI), DI

powers:
	GFMUL(X1, X0, X14, X2, X3, X4)
	VMOVDQU X1, (DI)
	LEAQ    -16(DI), DI
	DECQ    CX
	JNE     powers
	VZEROUPPER
	RET

// func ghashBlocks(htab *[512]byte, acc *[16]byte, data *byte, n int)
// Folds n 16-byte blocks into acc, one at a time with H.
TEXT ·ghashBlocks(SB), NOSPLIT, $0-32
	MOVQ    htab+0(FP), SI
	MOVQ    acc+8(FP), DI
	MOVQ    data+16(FP), DX
	MOVQ    n+24(FP), CX
	VMOVDQU bswapMask<>(SB), X15
	VMOVDQU gcmPoly<>(SB), X14
	VMOVDQU 496(SI), X13
	VMOVDQU (DI), X0
	TESTQ   CX, CX
	JE      ghashDone

ghashLoop:
	VMOVDQU (DX), X1
	VPSHUFB X15, X1, X1
	VPXOR   X1, X0, X0
	GFMUL(X0, X13, X14, X2, X3, X4)
	LEAQ    16(DX), DX
	DECQ    CX
	JNE     ghashLoop

ghashDone:
	VMOVDQU X0, (DI)
	VZEROUPPER
	RET

// func encBulk(rk *[240]byte, htab *[512]byte, dst, src *byte, n int, ctr, acc *[16]byte)
// Encrypts n 512-byte chunks of src into dst (which may be src) in
// counter mode from ctr and folds the ciphertext into acc; ctr and acc
// are updated. Eight registers of four blocks each keep VAESENC's
// latency covered.
TEXT ·encBulk(SB), NOSPLIT, $0-56
	BULK_START
	TESTQ CX, CX
	JE    encDone

encLoop:
	KEYSTREAM
	// Last round, plaintext in, ciphertext out, then byte-reversed for
	// GHASH.
#define LAST(R, OFF) VAESENCLAST Z30, R, R; VPXORQ OFF(SI), R, R; VMOVDQU64 R, OFF(DI); VPSHUFB Z31, R, R
	LAST(Z0, 0)
	LAST(Z1, 64)
	LAST(Z2, 128)
	LAST(Z3, 192)
	LAST(Z4, 256)
	LAST(Z5, 320)
	LAST(Z6, 384)
	LAST(Z7, 448)
#undef LAST
	GHASH32
	LEAQ 512(SI), SI
	LEAQ 512(DI), DI
	DECQ CX
	JNE  encLoop

encDone:
	BULK_END

// func decBulk(rk *[240]byte, htab *[512]byte, dst, src *byte, n int, ctr, acc *[16]byte)
// Folds n 512-byte chunks of ciphertext src into acc, then decrypts them
// into dst (which may be src) in counter mode from ctr; ctr and acc are
// updated. Each chunk is hashed before it is decrypted, so that in place
// the hash reads ciphertext.
TEXT ·decBulk(SB), NOSPLIT, $0-56
	BULK_START
	TESTQ CX, CX
	JE    decDone

decLoop:
	// The ciphertext, byte-reversed, for GHASH.
#define LOADC(R, OFF) VMOVDQU64 OFF(SI), R; VPSHUFB Z31, R, R
	LOADC(Z0, 0)
	LOADC(Z1, 64)
	LOADC(Z2, 128)
	LOADC(Z3, 192)
	LOADC(Z4, 256)
	LOADC(Z5, 320)
	LOADC(Z6, 384)
	LOADC(Z7, 448)
#undef LOADC
	GHASH32
	KEYSTREAM
	// Last round, ciphertext in, plaintext out.
#define LAST(R, OFF) VAESENCLAST Z30, R, R; VPXORQ OFF(SI), R, R; VMOVDQU64 R, OFF(DI)
	LAST(Z0, 0)
	LAST(Z1, 64)
	LAST(Z2, 128)
	LAST(Z3, 192)
	LAST(Z4, 256)
	LAST(Z5, 320)
	LAST(Z6, 384)
	LAST(Z7, 448)
#undef LAST
	LEAQ 512(SI), SI
	LEAQ 512(DI), DI
	DECQ CX
	JNE  decLoop

decDone:
	BULK_END

// func encBlock(rk *[240]byte, dst, src *[16]byte)
// One AES-256 block with AES-NI: the counter blocks of a tail and of the
// tag, without crypto/aes's interface call (which made them escape).
TEXT ·encBlock(SB), NOSPLIT, $0-24
	MOVQ   rk+0(FP), AX
	MOVQ   dst+8(FP), DI
	MOVQ   src+16(FP), SI
	MOVUPS (SI), X0
	MOVUPS (AX), X1
	PXOR   X1, X0
	MOVUPS 16(AX), X1
	AESENC X1, X0
	MOVUPS 32(AX), X1
	AESENC X1, X0
	MOVUPS 48(AX), X1
	AESENC X1, X0
	MOVUPS 64(AX), X1
	AESENC X1, X0
	MOVUPS 80(AX), X1
	AESENC X1, X0
	MOVUPS 96(AX), X1
	AESENC X1, X0
	MOVUPS 112(AX), X1
	AESENC X1, X0
	MOVUPS 128(AX), X1
	AESENC X1, X0
	MOVUPS 144(AX), X1
	AESENC X1, X0
	MOVUPS 160(AX), X1
	AESENC X1, X0
	MOVUPS 176(AX), X1
	AESENC X1, X0
	MOVUPS 192(AX), X1
	AESENC X1, X0
	MOVUPS 208(AX), X1
	AESENC X1, X0
	MOVUPS 224(AX), X1
	AESENCLAST X1, X0
	MOVUPS X0, (DI)
	PXOR   X0, X0 // no key material outlives the call
	PXOR   X1, X1
	RET
