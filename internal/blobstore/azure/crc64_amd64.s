//go:build !purego

#include "textflag.h"

// FOLD1 folds accumulator A over the distance of the constants in K and
// XORs in B: A = A.lo·K.lo ⊕ A.hi·K.hi ⊕ B (carry-less products).
#define FOLD1(A, K, T) \
	MOVOU     A, T; \
	PCLMULQDQ $0x00, K, A; \
	PCLMULQDQ $0x11, K, T; \
	PXOR      T, A

// func fold(p *byte, n int, init uint64, k *[4]uint64, acc *[16]byte)
// Folds n bytes (a multiple of 64, at least 64) into one 16-byte block
// whose CRC from a zero state is that of p from state init. k holds the
// constants for 64-byte and 16-byte folding distances.
TEXT ·fold(SB), NOSPLIT, $0-40
	MOVQ p+0(FP), SI
	MOVQ n+8(FP), CX
	MOVQ init+16(FP), AX
	MOVQ k+24(FP), BX
	MOVQ acc+32(FP), DI

	MOVOU (SI), X0
	MOVOU 16(SI), X1
	MOVOU 32(SI), X2
	MOVOU 48(SI), X3
	MOVQ  AX, X8
	PXOR  X8, X0
	MOVOU (BX), X9
	MOVOU 16(BX), X10
	ADDQ  $64, SI
	SUBQ  $64, CX
	JZ    reduce

loop:
	FOLD1(X0, X9, X4)
	FOLD1(X1, X9, X5)
	FOLD1(X2, X9, X6)
	FOLD1(X3, X9, X7)
	MOVOU (SI), X4
	MOVOU 16(SI), X5
	MOVOU 32(SI), X6
	MOVOU 48(SI), X7
	PXOR  X4, X0
	PXOR  X5, X1
	PXOR  X6, X2
	PXOR  X7, X3
	ADDQ  $64, SI
	SUBQ  $64, CX
	JNZ   loop

reduce:
	FOLD1(X0, X10, X4)
	PXOR X0, X1
	FOLD1(X1, X10, X4)
	PXOR X1, X2
	FOLD1(X2, X10, X4)
	PXOR X2, X3
	MOVOU X3, (DI)
	RET
