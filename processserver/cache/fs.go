package cache

import (
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/lifeboat-dr/lifeboat/internal/blockdev"
)

// FS is the file system surface the cache uses. It exists so tests can
// inject the faults disks really produce (failed fsync, short or torn
// writes, ENOSPC, bit rot, a wiped directory); production uses OSFS.
type FS interface {
	// OpenFile is os.OpenFile. Directories are opened O_RDONLY to fsync them.
	OpenFile(name string, flag int, perm fs.FileMode) (File, error)
	ReadFile(name string) ([]byte, error)
	ReadDir(name string) ([]fs.DirEntry, error)
	Rename(oldpath, newpath string) error
	Remove(name string) error
	MkdirAll(path string, perm fs.FileMode) error
	Statfs(path string) (FSStat, error)
}

// File is the part of *os.File the cache writes through.
type File interface {
	Write(p []byte) (int, error)
	Sync() error
	Close() error
}

// FSStat is the capacity of the file system holding a path, in bytes.
type FSStat struct {
	Total uint64 // size of the file system
	Free  uint64 // free blocks including those reserved for root
	Avail uint64 // free blocks usable by unprivileged writers
	// Files and FilesFree count inodes (0 and 0 where the file system
	// has no fixed number, as btrfs).
	Files, FilesFree uint64
}

// OSFS is the real file system.
type OSFS struct{}

func (OSFS) OpenFile(name string, flag int, perm fs.FileMode) (File, error) {
	return os.OpenFile(name, flag, perm)
}
func (OSFS) ReadFile(name string) ([]byte, error)       { return os.ReadFile(name) }
func (OSFS) ReadDir(name string) ([]fs.DirEntry, error) { return os.ReadDir(name) }
func (OSFS) Rename(oldpath, newpath string) error       { return os.Rename(oldpath, newpath) }
func (OSFS) Remove(name string) error                   { return os.Remove(name) }
func (OSFS) MkdirAll(path string, perm fs.FileMode) error {
	return os.MkdirAll(path, perm)
}

func (OSFS) Statfs(path string) (FSStat, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return FSStat{}, &fs.PathError{Op: "statfs", Path: path, Err: err}
	}
	bs := uint64(blockdev.StatfsUnit(&st))
	return FSStat{Total: st.Blocks * bs, Free: st.Bfree * bs, Avail: st.Bavail * bs, Files: st.Files, FilesFree: st.Ffree}, nil
}
