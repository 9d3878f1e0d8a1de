package cache

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// fencedPrefix names the file, in each cache directory, recording that
// this process server stopped serving a stream's machine because another
// took it over. It outlives a restart: while the other serves the
// machine, what is cached for it here must not be published.
const fencedPrefix = markerName + ".fenced-"

// SetFenced records (on, with note: what the server knew of the journal
// then) or clears that the machine of stream is served by another
// process server, in every cache directory; it fails only if no
// directory took the change.
func (c *Cache) SetFenced(stream string, on bool, note []byte) error {
	if err := validStream(stream); err != nil {
		return err
	}
	var errs []error
	for _, d := range c.dirs {
		name := filepath.Join(d, fencedPrefix+stream)
		if !on {
			if err := c.fs.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		f, err := c.fs.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
		if err == nil {
			_, err = f.Write(note)
		}
		if err == nil {
			err = f.Sync()
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
		return fmt.Errorf("cache: record that %s is served elsewhere: %w", stream, errors.Join(errs...))
	}
	return nil
}

// Fenced reports whether a cache directory records that the machine of
// stream is served by another process server (SetFenced), and the note
// recorded with it (nil when no directory holds it whole: a crash while
// writing it).
func (c *Cache) Fenced(stream string) (note []byte, fenced bool) {
	if validStream(stream) != nil {
		return nil, false
	}
	for _, d := range c.dirs {
		if b, err := c.fs.ReadFile(filepath.Join(d, fencedPrefix+stream)); err == nil {
			fenced = true
			if len(b) > len(note) {
				note = b
			}
		}
	}
	return note, fenced
}
