package cache

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// recoverablePrefix names the file, in each cache directory, keeping the
// last recoverable_until this server knows the account holds for a
// stream's machine: after a restart it reports the machine's RPO at once,
// before the account answers (it may be down: then RPO is what matters).
const recoverablePrefix = markerName + ".recoverable-"

// recoverableTmpPrefix names a hint being written.
const recoverableTmpPrefix = markerName + ".recoverable.tmp-"

// SetRecoverable records t as the stream's recoverable_until in every
// cache directory mounted where it belongs. It is a hint for reporting,
// never a basis for recovery: written whole (a rename) but not synced.
// It fails only if no directory took it.
func (c *Cache) SetRecoverable(stream string, t time.Time) error {
	if err := validStream(stream); err != nil {
		return err
	}
	ns := int64(0) // nothing recoverable
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	rec := []byte(strconv.FormatInt(ns, 10) + "\n")
	var errs []error
	for i, d := range c.dirs {
		if err := c.checkMountedNow(i); err != nil {
			errs = append(errs, err)
			continue
		}
		name := filepath.Join(d, recoverablePrefix+stream)
		// Not a name another stream's hint could have ("a.tmp" is a
		// stream name): a prefix of its own.
		tmp := filepath.Join(d, recoverableTmpPrefix+stream)
		f, err := c.fs.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
		if err == nil {
			_, err = f.Write(rec)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err == nil {
			err = c.fs.Rename(tmp, name)
		}
		if err != nil {
			c.fs.Remove(tmp)
			errs = append(errs, err)
		}
	}
	if len(errs) == len(c.dirs) {
		return fmt.Errorf("cache: record recoverable_until of %s: %w", stream, errors.Join(errs...))
	}
	return nil
}

// Recoverable returns the latest recoverable_until any cache directory
// holds for stream (SetRecoverable), or the zero time (none, or nothing
// recoverable).
func (c *Cache) Recoverable(stream string) time.Time {
	var latest time.Time
	if validStream(stream) != nil {
		return latest
	}
	for _, d := range c.dirs {
		b, err := c.fs.ReadFile(filepath.Join(d, recoverablePrefix+stream))
		if err != nil {
			continue
		}
		ns, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil || ns <= 0 {
			continue
		}
		if t := time.Unix(0, ns).UTC(); t.After(latest) {
			latest = t
		}
	}
	return latest
}
