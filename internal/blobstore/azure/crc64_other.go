//go:build !amd64 || purego

package azure

const haveCLMUL = false

func fold(*byte, int, uint64, *[4]uint64, *[16]byte) { panic("unreachable") }
