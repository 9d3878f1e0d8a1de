//go:build race

package wire

// The race detector allocates on its own; allocation counts mean nothing under it.
const raceEnabled = true
