//go:build !purego

package crc32c

const purego = false
