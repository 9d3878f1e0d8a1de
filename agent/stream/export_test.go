package stream

// SetSyncDir replaces how state directories are synced, until the
// returned function restores it.
func SetSyncDir(f func(dir string) error) (restore func()) {
	old := syncDir
	syncDir = f
	return func() { syncDir = old }
}
