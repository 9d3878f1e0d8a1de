//go:build !amd64 || purego

package crc32c

const haveFold = false

func fold(*byte, int, uint32, *[10]uint64, *[16]byte) { panic("unreachable") }
