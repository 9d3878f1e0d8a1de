package cache

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// markerName is the file in each cache directory that records which cache
// it belongs to, its position and which of the cache's directories were
// mount points when the cache was set up (markers written before that
// line existed lack it):
//
//	lifeboat-cache v1
//	cache <32 hex digits>
//	slot <i> of <n>
//	mount points <slot>,<slot>… | none
const markerName = "lifeboat-cache"

type marker struct {
	cache  string
	slot   int
	n      int
	mounts []bool // nil: not recorded
}

func (m marker) String() string {
	s := fmt.Sprintf("lifeboat-cache v1\ncache %s\nslot %d of %d\n", m.cache, m.slot, m.n)
	if m.mounts == nil {
		return s
	}
	var slots []string
	for i, mp := range m.mounts {
		if mp {
			slots = append(slots, strconv.Itoa(i))
		}
	}
	if len(slots) == 0 {
		slots = []string{"none"}
	}
	return s + "mount points " + strings.Join(slots, ",") + "\n"
}

func parseMarker(b []byte) (marker, error) {
	var m marker
	_, err := fmt.Sscanf(string(b), "lifeboat-cache v1\ncache %s\nslot %d of %d\n", &m.cache, &m.slot, &m.n)
	if err != nil || len(m.cache) != 32 || m.n < 1 || m.n > maxDirs {
		return m, fmt.Errorf("malformed cache marker %q", strings.TrimSpace(string(b)))
	}
	for line := range strings.Lines(string(b)) {
		list, ok := strings.CutPrefix(strings.TrimSpace(line), "mount points ")
		if !ok {
			continue
		}
		m.mounts = make([]bool, m.n)
		if list == "none" {
			break
		}
		for f := range strings.SplitSeq(list, ",") {
			i, err := strconv.Atoi(f)
			if err != nil || i < 0 || i >= m.n {
				return m, fmt.Errorf("malformed cache marker %q", strings.TrimSpace(string(b)))
			}
			m.mounts[i] = true
		}
	}
	return m, nil
}

// isMountPoint reports whether dir is the root of a mounted file system
// (its device differs from its parent's, or it is /). Bind mounts of the
// same file system are not told apart.
func isMountPoint(dir string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(dir, &st) != nil {
		return false
	}
	if unix.Stat(filepath.Dir(dir), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev || st.Ino == parent.Ino
}

// notMounted is the error for cache directory dir that was a mount point
// when the cache was set up and is not one now: its disk is not mounted,
// and anything written there would land on the file system below.
func notMounted(dir string) error {
	return fmt.Errorf("cache: %s was a mount point when the cache was set up and is not one now: "+
		"its disk is not mounted (mount it, or mount an empty disk there to have its shards rebuilt)", dir)
}

// checkMarkers verifies that the directories form one cache in the
// configured order, creates the directories and markers of a new cache, and
// adopts directories that were wiped.
func (c *Cache) checkMarkers() error {
	n := len(c.dirs)
	found := make([]*marker, n)
	cacheID := ""
	for i, d := range c.dirs {
		if err := c.fs.MkdirAll(d, 0o750); err != nil {
			return fmt.Errorf("cache: create directory %s: %w", d, err)
		}
		b, err := c.fs.ReadFile(filepath.Join(d, markerName))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("cache: read marker of %s: %w", d, err)
		}
		m, err := parseMarker(b)
		if err != nil {
			return fmt.Errorf("cache: %s: %w", d, err)
		}
		switch {
		case cacheID != "" && m.cache != cacheID:
			return fmt.Errorf("cache: %s belongs to cache %s but %s to cache %s; directories of different caches cannot be mixed",
				d, m.cache, c.dirs[firstMarked(found)], cacheID)
		case m.n != n:
			return fmt.Errorf("cache: %s was created as one of %d cache directories, now %d are configured; "+
				"changing the number of directories needs a new cache", d, m.n, n)
		case m.slot != i:
			return fmt.Errorf("cache: %s holds shard %d of the cache but is configured at position %d; "+
				"list the directories in their original order", d, m.slot, i)
		}
		cacheID = m.cache
		found[i] = &m
		if m.mounts != nil && c.mounts == nil {
			c.mounts = m.mounts
		}
	}
	allMarked := !slices.Contains(found, nil)
	fresh := firstMarked(found) < 0
	// Mount points are measured for a new cache, and for markers from
	// before they were recorded; they are trusted (and written into
	// markers) only when every directory has its marker: one without may
	// be a disk not mounted right now, which would be recorded as no mount
	// point for good.
	c.mountsKnown = c.mounts != nil || allMarked || fresh
	measured := c.mounts == nil
	if measured {
		c.mounts = make([]bool, n)
		for i, d := range c.dirs {
			c.mounts[i] = isMountPoint(d)
		}
	}
	for i, d := range c.dirs {
		if c.mounts[i] && !isMountPoint(d) {
			return notMounted(d)
		}
	}
	if cacheID == "" {
		var id [16]byte
		rand.Read(id[:])
		cacheID = hex.EncodeToString(id[:])
	}
	c.id = cacheID
	for i, d := range c.dirs {
		if found[i] != nil {
			if found[i].mounts == nil && c.mountsKnown {
				// Record the mount points in the markers of an older
				// cache (or those an older binary rewrote), so that a
				// later Open can tell an unmounted disk.
				if err := c.writeMarker(d, c.marker(i)); err != nil {
					c.log.Warn("cache: cannot record mount points in the marker", logDir, d, logErr, err)
				}
			}
			continue
		}
		if !fresh {
			if measured && !c.mounts[i] && slices.Contains(c.mounts, true) {
				c.log.Warn("cache: directory without a marker is not a mount point while other cache directories are; "+
					"if its disk is not mounted, stop and mount it before its shards are rebuilt here", logDir, d)
			}
			// Marked when a Scrub has rebuilt it (Scrub).
			c.replaced = append(c.replaced, d)
			if err := c.markRebuilding(i); err != nil {
				// Pending all the same; CheckDirs tries again.
				c.log.Warn("cache: cannot note the rebuild in the directory", logDir, d, logErr, err)
			}
			c.log.Warn("cache: directory has no cache marker while the others do; "+
				"treating it as a replaced disk, run Scrub to rebuild its shards", logDir, d)
			continue
		}
		if err := c.writeMarker(d, c.marker(i)); err != nil {
			return fmt.Errorf("cache: write marker in %s: %w", d, err)
		}
	}
	return nil
}

// marker is directory i's marker.
func (c *Cache) marker(i int) marker {
	m := marker{cache: c.id, slot: i, n: len(c.dirs)}
	if c.mountsKnown {
		m.mounts = c.mounts
	}
	return m
}

// firstMarked is the index of the first directory with a marker, -1 if
// none has one.
func firstMarked(found []*marker) int {
	for i, m := range found {
		if m != nil {
			return i
		}
	}
	return -1
}

func (c *Cache) writeMarker(dir string, m marker) error {
	final := filepath.Join(dir, markerName)
	tmp := final + tmpInfix + "marker"
	if err := c.markFrom(tmp, os.O_CREATE, m); err != nil {
		c.fs.Remove(tmp)
		return err
	}
	return nil
}

// markFrom writes m into the file src (opened with extra flags: O_CREATE,
// or none for a file that must already be there), syncs it and renames it
// to dir's marker, then syncs dir.
func (c *Cache) markFrom(src string, flags int, m marker) error {
	f, err := c.fs.OpenFile(src, os.O_WRONLY|os.O_TRUNC|flags, 0o640)
	if err != nil {
		return err
	}
	err = writeAll(f, []byte(m.String()))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	dir := filepath.Dir(src)
	if err == nil {
		err = c.fs.Rename(src, filepath.Join(dir, markerName))
	}
	if err != nil {
		return err
	}
	return c.syncDir(dir)
}

// removeTemps deletes temporary files left by writes interrupted by a
// crash. It runs only in Open, before any write of this process can have a
// temporary file in flight.
func (c *Cache) removeTemps() {
	for _, d := range c.dirs {
		streams, err := c.fs.ReadDir(d)
		if err != nil {
			continue
		}
		for _, s := range streams {
			if !s.IsDir() {
				continue
			}
			sd := filepath.Join(d, s.Name())
			entries, err := c.fs.ReadDir(sd)
			if err != nil {
				continue
			}
			for _, e := range entries {
				if strings.Contains(e.Name(), tmpInfix) {
					if err := c.fs.Remove(filepath.Join(sd, e.Name())); err != nil {
						c.log.Warn("cache: cannot remove temporary file", logDir, sd, logErr, err)
					}
				}
			}
		}
	}
}
