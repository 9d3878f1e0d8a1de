package cache

import (
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
	if err := CheckStream(stream); err != nil {
		return err
	}
	ns := int64(0) // nothing recoverable
	if !t.IsZero() {
		ns = t.UnixNano()
	}
	// Stamped with the time of writing: the newest write decides
	// (Recoverable), not the latest time, which may have moved back.
	rec := []byte(strconv.FormatInt(ns, 10) + " " + strconv.FormatInt(time.Now().UnixNano(), 10) + "\n")
	err := c.everyDir(func(d string) error {
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
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("cache: record recoverable_until of %s: %w", stream, err)
	}
	return nil
}

// Recoverable returns the recoverable_until of the newest record any
// cache directory holds for stream (SetRecoverable): a directory that
// missed a later write (its disk unmounted then) does not decide. The
// zero time: none, or nothing recoverable.
func (c *Cache) Recoverable(stream string) time.Time {
	var until time.Time
	if CheckStream(stream) != nil {
		return until
	}
	b, ok := c.newestRecord(recoverablePrefix+stream, recoverableStamp)
	if !ok {
		return until
	}
	f := strings.Fields(string(b))
	if ns, _ := strconv.ParseInt(f[0], 10, 64); ns > 0 {
		until = time.Unix(0, ns).UTC()
	}
	return until
}

// recoverableStamp returns when a hint was written; false for a torn one.
func recoverableStamp(b []byte) (int64, bool) {
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, false
	}
	if _, err := strconv.ParseInt(f[0], 10, 64); err != nil {
		return 0, false
	}
	stamp, err := strconv.ParseInt(f[1], 10, 64)
	return stamp, err == nil
}
