//go:build race

package channel_test

// The race detector allocates on its own; allocation counts mean nothing under it.
const raceEnabled = true
