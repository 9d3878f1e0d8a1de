package stream

import "time"

// SetSyncDir replaces how state directories are synced, until the
// returned function restores it.
func SetSyncDir(f func(dir string) error) (restore func()) {
	old := syncDir
	syncDir = f
	return func() { syncDir = old }
}

// SetPeerCheckEvery sets how often Config.CheckPeer is asked, until the
// returned function restores it.
func SetPeerCheckEvery(d time.Duration) (restore func()) {
	old := peerCheckEvery
	peerCheckEvery = d
	return func() { peerCheckEvery = old }
}
