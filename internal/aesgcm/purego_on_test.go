//go:build purego

package aesgcm

const purego = true
