//go:build !purego

package azure

import "golang.org/x/sys/cpu"

var haveCLMUL = cpu.X86.HasPCLMULQDQ && cpu.X86.HasSSE2

//go:noescape
func fold(p *byte, n int, init uint64, k *[4]uint64, acc *[16]byte)
