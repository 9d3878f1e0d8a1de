//go:build !purego

package crc32c

import "golang.org/x/sys/cpu"

var haveFold = cpu.X86.HasAVX512F && cpu.X86.HasAVX512VL && cpu.X86.HasAVX512VPCLMULQDQ && cpu.X86.HasPCLMULQDQ

// fold folds n bytes of p (a multiple of 256, at least 256) into one
// 16-byte block whose CRC from a zero state is that of p from state
// init.
//
//go:noescape
func fold(p *byte, n int, init uint32, k *[10]uint64, acc *[16]byte)
