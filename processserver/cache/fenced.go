package cache

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// fencedPrefix names the file, in each cache directory, recording that
// this process server stopped serving a stream's machine because another
// took it over. It outlives a restart: while the other serves the
// machine, what is cached for it here must not be published.
const fencedPrefix = markerName + ".fenced-"

// SetFenced records (on, with note: what the server knew of the journal
// then) or clears that the machine of stream is served by another
// process server, in every cache directory; it fails only if no
// directory took the change. Each record is stamped with the time: the
// newest found decides (Fenced), so a directory that missed a change (a
// disk unmounted meanwhile) does not bring an older record back.
func (c *Cache) SetFenced(stream string, on bool, note []byte) error {
	if err := validStream(stream); err != nil {
		return err
	}
	state := "off"
	if on {
		state = "on"
	}
	rec := append(fmt.Appendf(nil, "%s %s %d\n", fenceMagic, state, time.Now().UnixNano()), note...)
	var errs []error
	for i, d := range c.dirs {
		if err := c.checkMountedNow(i); err != nil {
			// Below the mount point, the record would be hidden once the
			// disk is back, and an older one there would decide. (Checked
			// without checkMounted's grace: records are few.)
			errs = append(errs, err)
			continue
		}
		name := filepath.Join(d, fencedPrefix+stream)
		f, err := c.fs.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
		if err == nil {
			_, err = f.Write(rec)
			if serr := f.Sync(); err == nil {
				err = serr
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err == nil {
			err = c.syncDir(d)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == len(c.dirs) {
		return fmt.Errorf("cache: record whether %s is served elsewhere: %w", stream, errors.Join(errs...))
	}
	return nil
}

// fenceMagic starts a fence record; a file without it (written before
// records were stamped) is an "on" record older than any stamped one.
const fenceMagic = "lifeboat-fence"

// Fenced reports whether the newest record of the cache directories says
// that the machine of stream is served by another process server
// (SetFenced), and the note recorded with it.
func (c *Cache) Fenced(stream string) (note []byte, fenced bool) {
	if validStream(stream) != nil {
		return nil, false
	}
	newest := int64(-1)
	for _, d := range c.dirs {
		b, err := c.fs.ReadFile(filepath.Join(d, fencedPrefix+stream))
		if err != nil {
			continue
		}
		on, stamp, rest := true, int64(0), b
		if head, tail, ok := bytes.Cut(b, []byte("\n")); ok && bytes.HasPrefix(head, []byte(fenceMagic+" ")) {
			var state string
			if _, err := fmt.Sscanf(string(head), fenceMagic+" %s %d", &state, &stamp); err != nil {
				continue // torn: another directory's copy decides
			}
			on, rest = state == "on", tail
		}
		if stamp > newest {
			newest, fenced, note = stamp, on, rest
		}
	}
	if !fenced {
		note = nil
	}
	return note, fenced
}
