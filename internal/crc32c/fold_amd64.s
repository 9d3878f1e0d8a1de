//go:build !purego

#include "textflag.h"

// FOLD folds the 128-bit lanes of A over the distance of the constants
// in K into B: B ^= A.lo·K.lo ⊕ A.hi·K.hi (carry-less products, lane by
// lane; T is scratch).
#define FOLD(A, K, B, T) \
	VPCLMULQDQ $0x00, K, A, T; \
	VPCLMULQDQ $0x11, K, A, A; \
	VPTERNLOGD $0x96, T, A, B

// func fold(p *byte, n int, init uint32, k *[10]uint64, acc *[16]byte)
TEXT ·fold(SB), NOSPLIT, $0-40
	MOVQ p+0(FP), SI
	MOVQ n+8(FP), CX
	MOVL init+16(FP), AX
	MOVQ k+24(FP), BX
	MOVQ acc+32(FP), DI

	VMOVDQU64       (SI), Z0
	VMOVDQU64       64(SI), Z1
	VMOVDQU64       128(SI), Z2
	VMOVDQU64       192(SI), Z3
	VMOVD           AX, X8
	VPXORD          Z8, Z0, Z0
	VBROADCASTI32X4 (BX), Z9
	VBROADCASTI32X4 16(BX), Z10
	ADDQ            $256, SI
	SUBQ            $256, CX
	JZ              reduce

loop:
	VPCLMULQDQ $0x00, Z9, Z0, Z4
	VPCLMULQDQ $0x11, Z9, Z0, Z0
	VPTERNLOGD $0x96, (SI), Z4, Z0
	VPCLMULQDQ $0x00, Z9, Z1, Z5
	VPCLMULQDQ $0x11, Z9, Z1, Z1
	VPTERNLOGD $0x96, 64(SI), Z5, Z1
	VPCLMULQDQ $0x00, Z9, Z2, Z6
	VPCLMULQDQ $0x11, Z9, Z2, Z2
	VPTERNLOGD $0x96, 128(SI), Z6, Z2
	VPCLMULQDQ $0x00, Z9, Z3, Z7
	VPCLMULQDQ $0x11, Z9, Z3, Z3
	VPTERNLOGD $0x96, 192(SI), Z7, Z3
	ADDQ       $256, SI
	SUBQ       $256, CX
	JNZ        loop

reduce:
	// Four accumulators 64 bytes apart into the last one, then its four
	// lanes, 48, 32 and 16 bytes before its last, into that lane.
	FOLD(Z0, Z10, Z1, Z4)
	FOLD(Z1, Z10, Z2, Z4)
	FOLD(Z2, Z10, Z3, Z4)
	VMOVDQU         32(BX), X11
	VMOVDQU         48(BX), X12
	VMOVDQU         64(BX), X13
	VEXTRACTI32X4   $1, Z3, X4
	VEXTRACTI32X4   $2, Z3, X5
	VEXTRACTI32X4   $3, Z3, X6
	FOLD(X3, X11, X6, X7)
	FOLD(X4, X12, X6, X7)
	FOLD(X5, X13, X6, X7)
	VMOVDQU X6, (DI)
	VZEROUPPER
	RET
