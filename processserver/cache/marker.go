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
// it belongs to, its position and where the file systems of the cache's
// directories were mounted when the cache was set up (markers written
// before that existed lack the last lines):
//
//	lifeboat-cache v1
//	cache <32 hex digits>
//	slot <i> of <n>
//	mounts recorded
//	mount <slot> "<mount point>"   (for each directory not on the root file system)
const markerName = "lifeboat-cache"

type marker struct {
	cache  string
	slot   int
	n      int
	mounts []string // per slot, its mountRoot; nil: not recorded
}

func (m marker) String() string {
	s := fmt.Sprintf("lifeboat-cache v1\ncache %s\nslot %d of %d\n", m.cache, m.slot, m.n)
	if m.mounts == nil {
		return s
	}
	s += "mounts recorded\n"
	for i, root := range m.mounts {
		if root != "" {
			s += fmt.Sprintf("mount %d %s\n", i, strconv.Quote(root))
		}
	}
	return s
}

func parseMarker(b []byte) (marker, error) {
	var m marker
	bad := fmt.Errorf("malformed cache marker %q", strings.TrimSpace(string(b)))
	_, err := fmt.Sscanf(string(b), "lifeboat-cache v1\ncache %s\nslot %d of %d\n", &m.cache, &m.slot, &m.n)
	if err != nil || len(m.cache) != 32 || m.n < 1 || m.n > maxDirs {
		return m, bad
	}
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "mounts recorded" {
			m.mounts = make([]string, m.n)
			continue
		}
		rest, ok := strings.CutPrefix(line, "mount ")
		if !ok || strings.HasPrefix(line, "mount points ") {
			// "mount points …" was an earlier form of the record (never
			// released): measured again as for an older cache.
			continue
		}
		slot, q, _ := strings.Cut(rest, " ")
		i, err := strconv.Atoi(slot)
		root, qerr := strconv.Unquote(q)
		if m.mounts == nil || err != nil || i < 0 || i >= m.n || qerr != nil || !filepath.IsAbs(root) {
			return m, bad
		}
		m.mounts[i] = root
	}
	return m, nil
}

// mountRoot returns where the file system holding dir (or, if dir is
// missing, its nearest existing ancestor) is mounted, "" for the root
// file system: the nearest ancestor whose device differs from its
// parent's. Bind mounts of the same file system are not told apart.
func mountRoot(dir string) string {
	p := filepath.Clean(dir)
	var st unix.Stat_t
	for unix.Stat(p, &st) != nil {
		if p == "/" {
			return ""
		}
		p = filepath.Dir(p)
	}
	for p != "/" {
		var pst unix.Stat_t
		parent := filepath.Dir(p)
		if unix.Stat(parent, &pst) != nil {
			return ""
		}
		if pst.Dev != st.Dev {
			return p
		}
		p, st = parent, pst
	}
	return ""
}

// fstabMountPoint returns the deepest mount point other than / that the
// file system table at path lists and that holds dir, or "" (no table, or
// none). Swap entries are skipped; octal escapes (\040) are decoded.
func fstabMountPoint(path, dir string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	dir = filepath.Clean(dir)
	best := ""
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(f[0], "#") || (len(f) > 2 && f[2] == "swap") {
			continue
		}
		mp := filepath.Clean(unescapeFstab(f[1]))
		if !filepath.IsAbs(mp) || mp == "/" {
			continue
		}
		if (dir == mp || strings.HasPrefix(dir, mp+"/")) && len(mp) > len(best) {
			best = mp
		}
	}
	return best
}

// unescapeFstab decodes fstab's octal escapes (\040 for a space).
func unescapeFstab(s string) string {
	var out strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				out.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		out.WriteByte(s[i])
	}
	return out.String()
}

// notMounted is the error for cache directory dir whose file system was
// mounted at root when the cache was set up and is not now: its disk is
// not mounted, and anything written there would land on the file system
// below.
func notMounted(dir, root string) error {
	return fmt.Errorf("cache: %s was on the disk mounted at %s when the cache was set up; that disk is not mounted now "+
		"(mount it, or mount an empty disk there to have its shards rebuilt)", dir, root)
}

// checkMarkers verifies that the directories form one cache in the
// configured order, creates the directories and markers of a new cache, and
// adopts directories that were wiped.
func (c *Cache) checkMarkers() error {
	n := len(c.dirs)
	found := make([]*marker, n)
	cacheID := ""
	for i, d := range c.dirs {
		// Not created yet: a directory whose disk is not mounted must
		// not appear on the file system below.
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
		c.mounts = make([]string, n)
		for i, d := range c.dirs {
			c.mounts[i] = mountRoot(d)
		}
	}
	for i, d := range c.dirs {
		if root := c.mounts[i]; root != "" && mountRoot(d) != root {
			return notMounted(d, root)
		}
		if found[i] == nil {
			// Nothing recorded says where its disk is: the system's
			// table does, when the disk should be mounted at boot.
			if mp := fstabMountPoint(c.fstab, d); mp != "" && mountRoot(mp) != mp {
				return fmt.Errorf("cache: %s is below %s, a mount point listed in %s that is not mounted: "+
					"mount it (shards written now would land on the file system below, and vanish when it is mounted)", d, mp, c.fstab)
			}
		}
		if err := c.mkdirDurable(d); err != nil {
			return fmt.Errorf("cache: create directory %s: %w", d, err)
		}
	}
	if err := c.checkDistinct(); err != nil {
		return err
	}
	if err := c.lockDirs(); err != nil {
		return err
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
				// Record the mounts in the markers of an older
				// cache (or those an older binary rewrote), so that a
				// later Open can tell an unmounted disk.
				if err := c.writeMarker(d, c.marker(i)); err != nil {
					c.log.Warn("cache: cannot record mounts in the marker", logDir, d, logErr, err)
				}
			}
			continue
		}
		if !fresh {
			if measured && c.mounts[i] == "" && slices.ContainsFunc(c.mounts, func(r string) bool { return r != "" }) {
				c.log.Warn("cache: directory without a marker is on the root file system while other cache directories are not; "+
					"if its disk is not mounted, stop and mount it before its shards are rebuilt here", logDir, d)
			}
			// Marked when a Scrub has rebuilt it (Scrub).
			c.replaced = append(c.replaced, d)
			if err := c.markRebuilding(i); err != nil {
				// Pending all the same; CheckDirs tries again.
				c.log.Warn("cache: cannot note the rebuild in the directory", logDir, d, logErr, err)
			}
			c.log.Warn("cache: directory has no cache marker while the others do; "+
				"treating it as a replaced disk: its shards are rebuilt from the other directories", logDir, d)
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
